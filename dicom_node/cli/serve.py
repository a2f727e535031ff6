"""``dicom-node serve`` and ``dicom-node worker``: the long-running processes.

``serve`` runs the node: listener, workers, sender and retention in one process.

``worker`` is analysis capacity without a listener, for scale-out. One ``dicom-node serve
--no-workers`` (or a ``serve`` with its own workers) receives; any number of ``dicom-node
worker`` processes, on this host or on others, claim the queued jobs from the shared
PostgreSQL database (``FOR UPDATE SKIP LOCKED`` under leases), read the images from the
shared spool, and deliver their results through their own sender (the outbox is claimed
the same way, so each object is sent by one process). Each process beats in
``node_heartbeats`` with the role ``worker``.

SQLite is refused for workers: it is one file with one writer at a time, unsafe on the
network file systems several hosts would need, and a single ``serve`` with ``[worker]
threads = N`` already uses every core of its host.

Both start the same way (:func:`run_node`): logging as configured, SIGTERM and SIGINT
ask for a clean stop, a node that cannot start exits 1 with one line on stderr.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from dicom_node.cli.common import EXIT_CONFIG, EXIT_FAILURE, ConfigOption, load_or_exit, log
from dicom_node.config import Settings
from dicom_node.logs import configure_logging
from storage.db import backend_name

SQLITE_REFUSED = (
    "dicom-node: worker processes share a database server; storage.database_url is "
    "SQLite, which serves one process only: run `dicom-node serve` with "
    "[worker] threads = N instead, or use PostgreSQL"
)


def serve(
    config: ConfigOption = None,
    no_workers: Annotated[
        bool,
        typer.Option("--no-workers", help="Receive and send only; analyse nothing here."),
    ] = False,
) -> None:
    """Run the node: listener, workers, sender and retention in one process."""
    settings = load_or_exit(config)
    run_node(settings, role="node", workers=not no_workers)


def worker(
    config: ConfigOption = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, max=32, help="Worker threads [default: [worker] threads]."
        ),
    ] = None,
    retention: Annotated[
        bool,
        typer.Option("--retention", help="Also run the retention sweep in this process."),
    ] = False,
) -> None:
    """Run workers and a sender only (no listener) on the shared database and spool."""
    settings = load_or_exit(config)
    if threads is not None:
        settings.worker.threads = threads
    _refuse_sqlite(settings)
    run_node(settings, role="worker", listener=False, retention=retention)


def run_node(
    settings: Settings,
    *,
    role: str,
    workers: bool = True,
    listener: bool = True,
    retention: bool = True,
) -> None:
    """Start a node with these services and block until a signal stops it (exit 1 if it
    cannot start; ``role`` names it in that message)."""
    configure_logging(settings.logging, settings.storage.log_dir)
    from dicom_node.node import Node, NodeStartError

    stop = threading.Event()
    _install_stop_signals(stop)
    node = Node(settings, workers=workers, listener=listener, retention=retention)
    try:
        node.start()
    except NodeStartError as exc:
        log.error(f"{role} cannot start", reason=str(exc))
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    node.serve_until(stop)


def _install_stop_signals(stop: threading.Event) -> None:
    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def _refuse_sqlite(settings: Settings) -> None:
    if backend_name(settings.storage.effective_database_url) == "sqlite":
        typer.echo(SQLITE_REFUSED, err=True)
        raise typer.Exit(EXIT_CONFIG)
