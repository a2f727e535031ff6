"""The retention sweep of ``serve``: delivered images and outputs leave the spool.

Every ``[retention] interval`` seconds (and once at start-up) the rules of
:mod:`storage.retention` are applied: an instance whose jobs finished and whose outputs
were all delivered more than ``keep_days`` ago loses its spooled file and its outputs;
failed jobs and undelivered (pending, in-flight or dead) sends keep theirs.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import RetentionSettings
from dicom_node.logs import get_logger
from storage.retention import PurgeReport, purge
from storage.spool import Spool

log = get_logger(__name__)
BATCH = 500


class Retention:
    """Periodic purge of the spool (a :class:`~dicom_node.node.Service`)."""

    name = "retention"

    def __init__(
        self, settings: RetentionSettings, sessions: sessionmaker[Session], spool: Spool
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info(
            "retention started", keep_days=self.settings.keep_days, interval=self.settings.interval
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def sweep(self) -> PurgeReport:
        """Purge until nothing is left to purge (in batches, one transaction each)."""
        keep = timedelta(days=self.settings.keep_days)
        instances = files = 0
        while not self._stop.is_set():
            report = purge(self.sessions, self.spool, keep_for=keep, limit=BATCH)
            instances += report.instances
            files += report.files
            if report.instances < BATCH:
                break
        return PurgeReport(instances, files)

    def _run(self) -> None:
        while True:
            try:
                report = self.sweep()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("retention sweep failed", error=str(exc)[:200])
            except Exception:  # keep sweeping later; a full spool is worse than a log line
                log.exception("retention sweep failed unexpectedly")
            else:
                if report.instances:
                    log.info("spool purged", instances=report.instances, files=report.files)
            if self._stop.wait(self.settings.interval):
                return
