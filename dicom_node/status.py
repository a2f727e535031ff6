"""``dicom-node status``: what an operator (or a monitoring probe) needs at a glance.

The report is built from the database (heartbeat, job counts, recent instances, results,
the outbox per destination and its dead letters), the spool's file system and a TCP
probe of the DICOM port. It never writes anything and
never migrates: it must be safe to run against a production node at any time, and it
still answers (with ``reachable: false``) when the database is down.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node import __version__
from dicom_node.config import Settings
from storage import heartbeat
from storage.db import (
    backend_name,
    current_revision,
    head_revision,
    make_engine,
    make_session_factory,
    ping,
    redact_url,
    session_scope,
)
from storage.models import JobState, ResultStatus, SendState, utcnow
from storage.outbox import count_in_state, counts_by_destination
from storage.queue import counts_by_state
from storage.records import count_instances, count_instances_since
from storage.results import counts_by_status
from storage.spool import Spool

PROBE_TIMEOUT_S = 2.0
STALE_AFTER_INTERVALS = 3


def collect_status(settings: Settings) -> dict[str, Any]:
    """The full status report as a JSON-ready dict."""
    report: dict[str, Any] = {
        "version": __version__,
        "generated_at": utcnow().isoformat(),
        "listener": _listener_config(settings),
        "database": {},
        "jobs": {state.value: None for state in JobState},
        "instances": {"last_hour": None, "total": None},
        "results": {status.value: None for status in ResultStatus},
        "sends": {
            d.name: {state.value: None for state in SendState} for d in settings.destinations
        },
        "dead_letters": None,
        "spool": _spool(settings),
    }
    _fill_from_database(settings, report)
    report["listener"]["accepting_connections"] = _probe(settings)
    report["healthy"] = bool(
        report["database"]["reachable"] and report["listener"]["state"] == "up"
    )
    return report


def _listener_config(settings: Settings) -> dict[str, Any]:
    node = settings.node
    return {
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port,
        "state": "unknown",
        "up_since": None,
        "last_heartbeat": None,
        "pid": None,
        "hostname": None,
    }


def _spool(settings: Settings) -> dict[str, Any]:
    spool = Spool(settings.storage.spool_root)
    total, used, free = spool.disk_usage()
    return {
        "path": str(spool.root),
        "free_bytes": free,
        "total_bytes": total,
        "free_percent": round(100.0 * free / total, 1) if total else None,
    }


def _fill_from_database(settings: Settings, report: dict[str, Any]) -> None:
    url = settings.storage.effective_database_url
    database: dict[str, Any] = {
        "backend": backend_name(url),
        "url": redact_url(url),
        "reachable": False,
        "error": None,
        "schema_revision": None,
        "schema_head": head_revision(),
    }
    report["database"] = database
    missing = _missing_sqlite_file(url)
    if missing:
        database["error"] = f"database file {missing} does not exist (node never started?)"
        return
    engine = make_engine(url)
    try:
        ping(engine)
        database["reachable"] = True
        database["schema_revision"] = current_revision(engine)
        if database["schema_revision"] is not None:
            _fill_counts(engine, settings, report)
    except SQLAlchemyError as exc:
        database["error"] = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    finally:
        engine.dispose()


def _missing_sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _fill_counts(engine: Engine, settings: Settings, report: dict[str, Any]) -> None:
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        report["jobs"] = counts_by_state(session)
        report["instances"] = {
            "last_hour": count_instances_since(session, utcnow() - timedelta(hours=1)),
            "total": count_instances(session),
        }
        report["results"] = counts_by_status(session)
        _fill_sends(session, settings, report)
        row = heartbeat.find_heartbeat(
            session, settings.node.ae_title, settings.node.port, socket.gethostname()
        )
        if row is None:
            report["listener"]["state"] = "never started"
            return
        max_age = timedelta(seconds=settings.node.heartbeat_interval * STALE_AFTER_INTERVALS)
        alive = heartbeat.is_alive(row, max_age=max_age)
        if alive and row.hostname == socket.gethostname():
            alive = _pid_running(row.pid)  # a kill -9 leaves a fresh-looking heartbeat
        report["listener"].update(
            {
                "state": "up" if alive else "down",
                "up_since": row.started_at.isoformat() if alive else None,
                "last_heartbeat": row.heartbeat_at.isoformat(),
                "stopped_at": row.stopped_at.isoformat() if row.stopped_at else None,
                "pid": row.pid,
                "hostname": row.hostname,
            }
        )


def _fill_sends(session: Session, settings: Settings, report: dict[str, Any]) -> None:
    """Sends per state for every configured destination (and any left from older configs)."""
    counts = counts_by_destination(session)
    for destination in settings.destinations:
        counts.setdefault(destination.name, {state.value: 0 for state in SendState})
    report["sends"] = counts
    report["dead_letters"] = count_in_state(session, SendState.DEAD)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _probe(settings: Settings) -> bool:
    """Can we open a TCP connection to the DICOM port? (No association is attempted.)"""
    host = settings.node.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    try:
        with socket.create_connection((host, settings.node.port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
