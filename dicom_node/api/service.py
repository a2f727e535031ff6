"""The HTTP API as a service of ``serve``: uvicorn in a thread, started and stopped by the node.

The socket is bound here, before the thread starts, so that a port already in use stops
the node at start-up with a clear message (like the DICOM port does), and so that port
0 — any free port, for tests — is known at once (:attr:`HttpService.port`). uvicorn
installs no signal handlers outside the main thread: the node's own SIGTERM handling
stops it, through :meth:`HttpService.stop`.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.api.app import create_app
from dicom_node.api.auth import ApiToken, resolve_tokens
from dicom_node.config import Settings
from dicom_node.logs import get_logger
from storage.spool import Spool

log = get_logger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
GRACEFUL_SHUTDOWN_S = 5


class HttpService:
    """uvicorn serving :func:`~dicom_node.api.app.create_app` (a node service)."""

    name = "http"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self.tokens: tuple[ApiToken, ...] = ()
        self.app: FastAPI | None = None
        self._socket: socket.socket | None = None
        self._bound_port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (differs from the configured one only when that was 0)."""
        return self._bound_port or self.settings.http.port

    def start(self) -> None:
        self.tokens = resolve_tokens(self.settings)
        self.app = app = create_app(self.settings, self.sessions, self.spool, self.tokens)
        http = self.settings.http
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        self._socket = socket.create_server((http.host, http.port), family=family)
        self._bound_port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_config=None,  # our handlers on the root logger format uvicorn's records
            log_level="warning",
            access_log=False,  # paths carry study UIDs; the API logs what matters itself
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True
        )
        self._thread.start()
        self._wait_started()
        log.info("http api started", host=http.host, port=self.port)

    def _wait_started(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError("http server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop accepting, let running requests finish (a few seconds at most)."""
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_S + GRACEFUL_SHUTDOWN_S)
        if self._socket is not None:
            self._socket.close()
        self._server = None
        self._thread = None
        log.info("http api stopped")
