"""``dicom-node status``: what an operator (or a monitoring probe) needs at a glance.

The report (a JSON-ready dict; ``/api/status`` serves it as is) is built from

* the database: heartbeats of every listener and worker process, job counts per state,
  the queue's depth and oldest wait, throughput and p50/p95 latency of the last 5 and 60
  minutes (definitions in :mod:`storage.metrics`: latency = instance ``received_at`` →
  job ``finished_at`` of ``done`` jobs), results, the outbox per destination and its dead
  letters, the bytes of received images the spool keeps;
* the destinations: each one's ``check()`` (C-ECHO for DICOM), concurrently and with a
  short timeout, *while* the database is read — skipped with ``echo=False``;
* the model bundles' manifests (name, version, sha256, thresholds in force) — no network
  is loaded, so no torch is imported;
* the spool's file system and a TCP probe of the DICOM port.

It never writes anything and never migrates: it must be safe to run against a production
node at any time, and it still answers (with ``reachable: false``) when the database is
down. Counts per state read narrow indexes (index-only scans, migration 0005), the time
windows read index ranges, the instances are read in one pass, and the destinations are
checked while the database is read — ``bench/bench_status.py`` times it with 100k jobs.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, make_url, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node import __version__
from dicom_node.config import Settings
from dicom_node.dispatch.reachability import Reachability, check_destinations
from dicom_node.model_bundles import describe_all
from dicom_node.models import registry
from dicom_node.models.monitor import model_health
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
from storage.metrics import instance_figures, queue_figures, window_figures
from storage.models import Job, JobState, NodeHeartbeat, ResultStatus, SendState, utcnow
from storage.outbox import counts_by_destination
from storage.queue import counts_by_state
from storage.results import counts_by_status
from storage.spool import Spool

PROBE_TIMEOUT_S = 2.0
ECHO_TIMEOUT_S = 2.0
STALE_AFTER_INTERVALS = 3


def collect_status(settings: Settings, *, echo: bool = True) -> dict[str, Any]:
    """The full status report as a JSON-ready dict (``echo=False``: no C-ECHO)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="status-echo") as pool:
        checks = pool.submit(_check_destinations, settings) if echo else None
        report = _empty_report(settings)
        _fill_from_database(settings, report)
        report["listener"]["accepting_connections"] = _probe(settings)
        report["destinations"] = _destinations(settings, checks)
    report["healthy"] = bool(
        report["database"]["reachable"] and report["listener"]["state"] == "up"
    )
    report["elapsed_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
    return report


def _empty_report(settings: Settings) -> dict[str, Any]:
    """Every key present from the start, so a report without a database has the same shape."""
    return {
        "version": __version__,
        "generated_at": utcnow().isoformat(),
        "listener": _listener_config(settings),
        "nodes": [],
        "workers": {"alive": None, "stale": None, "stopped": None, "busy": None},
        "database": {},
        "jobs": {state.value: None for state in JobState},
        "queue": {"waiting": None, "due": None, "oldest_wait_s": None},
        "throughput": {},
        "instances": {"last_hour": None, "total": None},
        "results": {status.value: None for status in ResultStatus},
        "sends": {
            d.name: {state.value: None for state in SendState} for d in settings.destinations
        },
        "dead_letters": None,
        "destinations": {},
        "models": describe_all(settings),
        "drift": [],  # per model version and signal: see dicom_node.models.drift
        "model_warnings": [],
        "spool": _spool(settings),
    }


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
    total, _used, free = spool.disk_usage()
    return {
        "path": str(spool.root),
        "free_bytes": free,
        "total_bytes": total,
        "free_percent": round(100.0 * free / total, 1) if total else None,
        "images_bytes": None,  # received images still kept, from the database
    }


# -- destinations --------------------------------------------------------------------------


def _check_destinations(settings: Settings) -> list[Reachability]:
    return check_destinations(
        settings.destinations, settings.node.ae_title, timeout_s=ECHO_TIMEOUT_S
    )


def _destinations(
    settings: Settings, checks: Future[list[Reachability]] | None
) -> dict[str, dict[str, Any]]:
    """``{name: {type, peer, reachable, category, message, latency_ms}}``."""
    if checks is None:
        return {
            d.name: {"type": d.type, "reachable": None, "category": "not_checked"}
            for d in settings.destinations
        }
    report: dict[str, dict[str, Any]] = {}
    for outcome in checks.result():
        entry = outcome.as_dict()
        report[str(entry.pop("name"))] = entry
    return report


# -- database ------------------------------------------------------------------------------


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
        now = utcnow()
        report["jobs"] = counts_by_state(session)
        report["queue"] = queue_figures(session, now=now).as_dict()
        report["throughput"] = {
            f"last_{w.minutes}_min": w.as_dict() for w in window_figures(session, now=now)
        }
        instances = instance_figures(session, now - timedelta(hours=1))
        report["instances"] = {"last_hour": instances.recent, "total": instances.total}
        report["spool"]["images_bytes"] = instances.kept_bytes
        report["results"] = counts_by_status(session)
        _fill_sends(session, settings, report)
        _fill_processes(session, settings, report, now)
        in_force = registry.listing(settings, session)  # the registry's choice, if any
        report["models"] = [m for m in in_force if m["state"] in ("active", "shadow")]
        health = model_health(settings, session)
        report["drift"] = health.status_drift()
        report["model_warnings"] = health.warnings()


def _fill_sends(session: Session, settings: Settings, report: dict[str, Any]) -> None:
    """Sends per state for every configured destination (and any left from older configs)."""
    counts = counts_by_destination(session)
    for destination in settings.destinations:
        counts.setdefault(destination.name, {state.value: 0 for state in SendState})
    report["sends"] = counts
    report["dead_letters"] = sum(states[SendState.DEAD.value] for states in counts.values())


# -- listener and worker processes --------------------------------------------------------


def _fill_processes(
    session: Session, settings: Settings, report: dict[str, Any], now: datetime
) -> None:
    """The listener (as before), every heartbeat row with its role, and worker counts."""
    max_age = timedelta(seconds=settings.node.heartbeat_interval * STALE_AFTER_INTERVALS)
    rows = list(session.scalars(select(NodeHeartbeat).order_by(NodeHeartbeat.heartbeat_at.desc())))
    report["nodes"] = [_node_entry(row, max_age, now) for row in rows]
    workers = [node for node in report["nodes"] if node["role"] == "worker"]
    busy = select(func.count(func.distinct(Job.worker))).where(Job.state == JobState.RUNNING)
    report["workers"] = {
        state: sum(1 for node in workers if node["state"] == state)
        for state in ("alive", "stale", "stopped")
    }
    report["workers"]["busy"] = session.scalar(busy) or 0
    report["workers"]["threads_in_serve"] = settings.worker.threads
    _fill_listener(session, settings, report, max_age, now)


def _node_entry(row: NodeHeartbeat, max_age: timedelta, now: datetime) -> dict[str, Any]:
    return {
        "node_id": row.node_id,
        "role": row.role,
        "hostname": row.hostname,
        "pid": row.pid,
        "ae_title": row.ae_title,
        "port": row.port,
        "version": row.version,
        "state": _process_state(row, max_age, now),
        "started_at": row.started_at.isoformat(),
        "last_heartbeat": row.heartbeat_at.isoformat(),
        "stopped_at": row.stopped_at.isoformat() if row.stopped_at else None,
    }


def _process_state(row: NodeHeartbeat, max_age: timedelta, now: datetime) -> str:
    """``alive``, ``stale`` (no heartbeat lately, or its local process is gone) or
    ``stopped`` (said goodbye)."""
    if row.stopped_at is not None:
        return "stopped"
    alive = heartbeat.is_alive(row, max_age=max_age, now=now)
    if alive and row.hostname == socket.gethostname():
        alive = _pid_running(row.pid)  # a kill -9 leaves a fresh-looking heartbeat
    return "alive" if alive else "stale"


def _fill_listener(
    session: Session,
    settings: Settings,
    report: dict[str, Any],
    max_age: timedelta,
    now: datetime,
) -> None:
    row = heartbeat.find_heartbeat(
        session, settings.node.ae_title, settings.node.port, socket.gethostname()
    )
    if row is None:
        report["listener"]["state"] = "never started"
        return
    alive = _process_state(row, max_age, now) == "alive"
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
