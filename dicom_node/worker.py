"""Workers: threads of ``serve`` that take queued jobs and run them through the pipeline.

Each worker thread loads its own analyzer (torch modules with Grad-CAM hooks are not
thread-safe), warms it up, then loops: claim up to ``batch_size`` jobs — most urgent
first, then in arrival order — and hand them to :class:`~dicom_node.pipeline.Pipeline`;
when the queue is empty, sleep until the listener signals a new job
(:class:`~dicom_node.wakeup.Wakeup`) or ``poll_interval`` passes. A burst that arrives
while a batch runs is therefore claimed as the next batch, and a lone image starts the
moment its job is committed.

Claims are leases (``job_lease``). A lease keeper thread renews the leases of the jobs
this process holds every quarter lease, so a long batch never looks abandoned; it also
re-queues, every quarter lease, jobs whose lease expired (a worker on another host that
died) and jobs of dead processes on this host (:func:`storage.queue.recover_orphans`, no
need to wait for the lease). So with several worker processes — ``dicom-node worker`` on
one or more hosts sharing the database and the spool — a ``kill -9`` of one leaves its
jobs to the others. Inference never runs on the listener's threads.
If the analyzer cannot be loaded (missing or corrupt bundle) the node keeps receiving; the
jobs wait in the queue and the worker tries to load again every minute.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analyzer import Analyzer, warm_up
from dicom_node.config import Settings
from dicom_node.logs import get_logger
from dicom_node.models.following import FollowingAnalyzer
from dicom_node.notify import StudyNotifier
from dicom_node.pipeline import ClaimedJob, Pipeline, PipelineContext
from dicom_node.processes import owner_id, process_alive
from dicom_node.results.common import Equipment
from dicom_node.wakeup import Wakeup
from storage import queue
from storage.db import session_scope
from storage.models import Instance, Series
from storage.spool import Spool

log = get_logger(__name__)
ENGINE_RETRY_S = 60.0
STOP_TIMEOUT_S = 120.0
REGISTRY_POLL_S = 5.0  # an idle worker looks at the registry at least this often
LEASE_RENEWALS = 4  # lease renewals per lease: three may fail before another worker steps in
JOB_KINDS = ("analyze",)

AnalyzerFactory = Callable[[], Analyzer]


def claim_jobs(
    sessions: sessionmaker[Session], worker_id: str, *, limit: int, lease: timedelta
) -> list[ClaimedJob]:
    """Claim up to ``limit`` jobs and read what the pipeline needs of their instances
    (and the study each belongs to) in one query."""
    with session_scope(sessions) as session:
        jobs = queue.claim_batch(session, worker_id, limit=limit, kinds=JOB_KINDS, lease=lease)
        rows = session.execute(
            select(Instance, Series.study_id)
            .join(Series, Instance.series_id == Series.id)
            .where(Instance.id.in_([job.instance_id for job in jobs]))
        ).all()
        by_id = {instance.id: (instance, study_id) for instance, study_id in rows}
        claimed = []
        for job in jobs:
            instance, study_id = by_id[job.instance_id]  # foreign keys: always there
            claimed.append(
                ClaimedJob(
                    job_id=job.id,
                    instance_id=instance.id,
                    study_id=study_id,
                    sop_instance_uid=instance.sop_instance_uid,
                    version=instance.version,
                    sha256=instance.sha256,
                    spool_path=instance.spool_path,
                    calling_ae=instance.calling_ae,
                    called_ae=instance.called_ae,
                    created_at=job.created_at,
                )
            )
        return claimed


class Worker:
    """The worker threads of one node process (a :class:`~dicom_node.node.Service`)."""

    name = "worker"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        spool: Spool,
        *,
        jobs_wakeup: Wakeup,
        sends_wakeup: Wakeup | None = None,
        analyzer_factory: AnalyzerFactory | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.jobs_wakeup = jobs_wakeup
        self.analyzer_factory = analyzer_factory or (lambda: FollowingAnalyzer(settings, sessions))
        self.context = PipelineContext(
            sessions=sessions,
            spool=spool,
            rules=settings.rule_set,
            equipment=Equipment(station_name=settings.node.ae_title),
            destinations={d.name: d for d in settings.destinations},
            sends_wakeup=sends_wakeup,
            priority=settings.priority,
            notifier=StudyNotifier.from_settings(settings),
        )
        self.ready = threading.Event()  # set once a thread has its analyzer
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held: dict[str, list[int]] = {}  # worker id → ids of the jobs it runs now
        self._held_lock = threading.Lock()
        self._keeper = threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._recover_orphans()
        self._keeper.start()
        for index in range(self.settings.worker.threads):
            thread = threading.Thread(
                target=self._run,
                args=(f"worker-{index + 1}",),
                name=f"worker-{index + 1}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        log.info("workers started", threads=len(self._threads))

    def stop(self) -> None:
        """Finish the batches in progress, then return (unfinished ones fall to the lease)."""
        self._stop.set()
        self.jobs_wakeup.interrupt()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._keeper.is_alive():
            self._keeper.join(timeout=max(1.0, deadline - time.monotonic()))
        log.info("workers stopped", unfinished=sum(t.is_alive() for t in self._threads))

    def _recover_orphans(self) -> None:
        actor = owner_id("worker")
        with session_scope(self.sessions) as session:
            orphans = queue.recover_orphans(
                session, socket.gethostname(), process_alive, actor=actor
            )
            expired = queue.recover_expired(session, actor=actor)
        if orphans or expired:
            log.warning("re-queued jobs of a worker that died", jobs=orphans + expired)
            self.jobs_wakeup.notify()  # our idle threads take them now, not at the next poll

    def _keep_leases(self) -> None:
        """Renew our leases and take back dead workers' jobs, every quarter lease."""
        lease = timedelta(seconds=self.settings.worker.job_lease)
        while not self._stop.wait(lease.total_seconds() / LEASE_RENEWALS):
            with self._held_lock:
                held = {worker: list(ids) for worker, ids in self._held.items()}
            try:
                with session_scope(self.sessions) as session:
                    queue.extend_leases(
                        session, list(held), [i for ids in held.values() for i in ids], lease=lease
                    )
                self._recover_orphans()
            except SQLAlchemyError as exc:  # the lease still covers a short outage
                log.warning("job leases not renewed", error=str(exc)[:200])
            except Exception:
                log.exception("lease keeper failed; continuing")

    def _hold(self, worker_id: str, jobs: list[ClaimedJob]) -> None:
        """Record which jobs ``worker_id`` runs now (an empty list: none)."""
        with self._held_lock:
            self._held[worker_id] = [job.job_id for job in jobs]

    def _run(self, name: str) -> None:
        worker_id = owner_id(name)
        analyzer = self._load_analyzer(worker_id)
        if analyzer is None:
            return
        pipeline = Pipeline(self.context, analyzer, worker_id)
        self.ready.set()
        settings = self.settings.worker
        lease = timedelta(seconds=settings.job_lease)
        while not self._stop.is_set():
            seen = self.jobs_wakeup.mark()
            self._follow_registry(analyzer, name)
            try:
                jobs = claim_jobs(self.sessions, worker_id, limit=settings.batch_size, lease=lease)
            except SQLAlchemyError as exc:
                log.warning("cannot claim jobs", worker=name, error=str(exc)[:200])
                self._stop.wait(settings.poll_interval)
                continue
            except Exception:  # a bug must not silently stop the analysis for good
                log.exception("worker loop failed; continuing", worker=name)
                self._stop.wait(settings.poll_interval)
                continue
            if jobs:
                self._hold(worker_id, jobs)
                try:
                    pipeline.run(jobs)
                finally:
                    self._hold(worker_id, [])
            else:
                self.jobs_wakeup.wait(seen, min(settings.poll_interval, REGISTRY_POLL_S))

    def _follow_registry(self, analyzer: Analyzer, name: str) -> None:
        """Between batches: pick up an activation or a shadow change (no restart)."""
        refresh = getattr(analyzer, "refresh", None)
        if refresh is None:
            return
        try:
            refresh(lambda loaded: warm_up(loaded, self.context.equipment))
        except SQLAlchemyError as exc:  # the registry is unreadable: keep what runs
            log.warning("model registry not read", worker=name, error=str(exc)[:200])

    def _load_analyzer(self, worker_id: str) -> Analyzer | None:
        """Load (and warm up) the analyzer, retrying until it works or the node stops."""
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                analyzer = self.analyzer_factory()
            except Exception as exc:
                log.error(
                    "analyzer cannot be loaded; jobs stay queued",
                    worker=worker_id,
                    error_type=type(exc).__name__,
                    error=str(exc)[:300],
                    retry_in_s=ENGINE_RETRY_S,
                )
                self._stop.wait(ENGINE_RETRY_S)
                continue
            warm_up(analyzer, self.context.equipment)
            log.info(
                "worker ready",
                worker=worker_id,
                models=analyzer.identity,
                load_ms=round((time.perf_counter() - started) * 1000),
            )
            return analyzer
        return None
