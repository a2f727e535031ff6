"""``dicom-node worker``: analysis capacity without a listener, for scale-out.

One ``dicom-node serve --no-workers`` (or a ``serve`` with its own workers) receives;
any number of ``dicom-node worker`` processes, on this host or on others, claim the
queued jobs from the shared PostgreSQL database (``FOR UPDATE SKIP LOCKED`` under
leases), read the images from the shared spool, and deliver their results through their
own sender (the outbox is claimed the same way, so each object is sent by one process).
Each process beats in ``node_heartbeats`` with the role ``worker``.

SQLite is refused: it is one file with one writer at a time, unsafe on the network file
systems several hosts would need, and a single ``serve`` with ``[worker] threads = N``
already uses every core of its host.
"""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from dicom_node.cli import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ConfigOption,
    _install_stop_signals,
    load_or_exit,
    log,
)
from dicom_node.config import Settings
from dicom_node.logs import configure_logging
from storage.db import backend_name

SQLITE_REFUSED = (
    "dicom-node: worker processes share a database server; storage.database_url is "
    "SQLite, which serves one process only: run `dicom-node serve` with "
    "[worker] threads = N instead, or use PostgreSQL"
)


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
    configure_logging(settings.logging, settings.storage.log_dir)
    from dicom_node.node import Node, NodeStartError

    stop = threading.Event()
    _install_stop_signals(stop)
    node = Node(settings, listener=False, retention=retention)
    try:
        node.start()
    except NodeStartError as exc:
        log.error("worker cannot start", reason=str(exc))
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    node.serve_until(stop)


def _refuse_sqlite(settings: Settings) -> None:
    if backend_name(settings.storage.effective_database_url) == "sqlite":
        typer.echo(SQLITE_REFUSED, err=True)
        raise typer.Exit(EXIT_CONFIG)
