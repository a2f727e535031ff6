"""The ``serve`` runtime: one process that owns the database, the spool and the services.

The services, in start order: the sender (outbox → destinations), the workers (queue →
engine → results → outbox), the retention sweep, the DICOM listener (C-STORE → spool →
queue), the heartbeat and the HTTP API (with the listener only: it reports on the whole
node from the database). They start in order and stop in reverse order — the listener
stops accepting first, then the workers finish their batches, then the sender its
association — and a node never stays half-started. In-process wake-ups connect them: a
committed job wakes the workers, committed sends wake the sender.

``dicom-node worker`` runs the same node without the listener (``listener=False``):
workers, sender and a heartbeat with the role ``worker``, on the database and spool it
shares with the listener's process; its workers find new jobs by polling.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.api import HttpService
from dicom_node.config import Settings
from dicom_node.listener import Listener, receive_limits
from dicom_node.logs import get_logger
from dicom_node.receive import StoreService
from dicom_node.retention import Retention
from dicom_node.sender import Sender
from dicom_node.wakeup import Wakeup
from dicom_node.worker import Worker
from storage import heartbeat
from storage.db import (
    backend_name,
    make_engine,
    make_session_factory,
    redact_url,
    session_scope,
    upgrade,
)
from storage.spool import Spool

log = get_logger(__name__)


class NodeStartError(RuntimeError):
    """The node cannot start; the message is one line for the operator."""


class Service(Protocol):
    """Anything the node starts and stops (listener, heartbeat, later workers…)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Heartbeat:
    """Writes the liveness row that ``status`` reads, every ``interval`` seconds."""

    name = "heartbeat"

    def __init__(
        self, sessions: sessionmaker[Session], identity: heartbeat.NodeIdentity, interval: float
    ) -> None:
        self.sessions = sessions
        self.identity = identity
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        with session_scope(self.sessions) as session:
            heartbeat.node_started(session, self.identity)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._write(heartbeat.node_stopped)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write(heartbeat.beat)

    def _write(self, action: heartbeat.HeartbeatAction) -> None:
        try:
            with session_scope(self.sessions) as session:
                action(session, self.identity.node_id)
        except SQLAlchemyError as exc:  # a database hiccup must not kill the node
            log.warning("heartbeat not written", error=str(exc)[:200])


class Node:
    """Database, spool and services of one ``dicom-node serve`` process."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: bool = True,
        listener: bool = True,
        retention: bool = True,
    ) -> None:
        self.settings = settings
        self.run_workers = workers and settings.worker.threads > 0
        self.run_listener = listener
        self.run_retention = retention and settings.retention.enabled
        self.engine: Engine | None = None
        self.services: list[Service] = []
        self.jobs_wakeup = Wakeup()
        self.sends_wakeup = Wakeup()
        self.http: HttpService | None = None

    def start(self) -> None:
        """Migrate, prepare the spool, then start every service (or none)."""
        sessions = self._open_database()
        spool = self._open_spool()
        self._start_service(Sender(self.settings, sessions, spool, wakeup=self.sends_wakeup))
        if self.run_workers:
            self._start_service(
                Worker(
                    self.settings,
                    sessions,
                    spool,
                    jobs_wakeup=self.jobs_wakeup,
                    sends_wakeup=self.sends_wakeup,
                )
            )
        if self.run_retention:
            self._start_service(Retention(self.settings.retention, sessions, spool))
        port = self._start_listener(sessions, spool) if self.run_listener else 0
        identity = heartbeat.NodeIdentity(
            hostname=socket.gethostname(),
            pid=os.getpid(),
            ae_title=self.settings.node.ae_title,
            host=self.settings.node.host if self.run_listener else "",
            port=port,
            version=__version__,
            role=heartbeat.LISTENER if self.run_listener else heartbeat.WORKER,
        )
        self._start_service(Heartbeat(sessions, identity, self.settings.node.heartbeat_interval))
        if self.settings.http.enabled and self.run_listener:
            self.http = HttpService(self.settings, sessions, spool)
            self._start_service(self.http)
        log.info(
            "node started",
            version=__version__,
            pid=os.getpid(),
            role=identity.role,
            home=str(self.settings.storage.home),
            workers=self.settings.worker.threads if self.run_workers else 0,
            destinations=[d.name for d in self.settings.destinations],
            http_port=self.http.port if self.http else None,
        )

    def _start_listener(self, sessions: sessionmaker[Session], spool: Spool) -> int:
        """Start the DICOM listener; returns the port it listens on."""
        store = StoreService(
            spool,
            sessions,
            min_free_bytes=self.settings.storage.min_free_mb * 1024 * 1024,
            on_queued=self.jobs_wakeup.notify if self.run_workers else None,
            limits=receive_limits(self.settings.node),
        )
        listener = Listener(self.settings.node, store)
        self._start_service(listener)
        return listener.port

    def stop(self) -> None:
        """Stop services in reverse order; safe to call more than once."""
        while self.services:
            service = self.services.pop()
            try:
                service.stop()
            except Exception:
                log.exception("service did not stop cleanly", service=service.name)
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        log.info("node stopped")

    def serve_until(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set (by a signal handler), then stop the node."""
        try:
            stop.wait()
        finally:
            self.stop()

    def _open_database(self) -> sessionmaker[Session]:
        url = self.settings.storage.effective_database_url
        try:
            self.engine = make_engine(url)
            upgrade(self.engine)
        except SQLAlchemyError as exc:
            message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise NodeStartError(f"database {redact_url(url)} unusable: {message}") from exc
        log.info("database ready", backend=backend_name(url), url=redact_url(url))
        return make_session_factory(self.engine)

    def _open_spool(self) -> Spool:
        root = self.settings.storage.spool_root
        spool = Spool(root, durable=self.settings.storage.durable_writes)
        try:
            removed = spool.prepare(remove_partial=self.run_listener)
        except OSError as exc:
            raise NodeStartError(f"spool {root} unusable: {exc.strerror}") from exc
        if removed:
            log.warning("removed unacknowledged partial files from the spool", count=removed)
        log.info(
            "spool ready", path=str(root), durable=spool.durable, free_bytes=spool.free_bytes()
        )
        return spool

    def _start_service(self, service: Service) -> None:
        try:
            service.start()
        except OSError as exc:
            self.stop()
            raise NodeStartError(f"{service.name} cannot start: {exc.strerror or exc}") from exc
        except SQLAlchemyError as exc:
            self.stop()
            raise NodeStartError(f"{service.name} cannot start: database error") from exc
        self.services.append(service)
