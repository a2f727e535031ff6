"""Liveness records of running node processes (what ``dicom-node status`` reports as "up").

A process that dies with ``kill -9`` cannot say goodbye, so "up" means "a heartbeat
was written recently", not merely "a row exists".

Two roles beat here: the **listener** (``dicom-node serve``, one row per host, AE title
and port, so a restart reuses its row) and **workers** (``dicom-node worker``, one row per
process: several may run on one host, none has a port).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import NodeHeartbeat, utcnow

HeartbeatAction = Callable[[Session, str], None]
LISTENER = "listener"
WORKER = "worker"
ROLES = (LISTENER, WORKER)


@dataclass(frozen=True)
class NodeIdentity:
    """Who is beating: one listener or worker process on one host."""

    hostname: str
    pid: int
    ae_title: str
    host: str
    port: int
    version: str
    role: str = LISTENER

    @property
    def node_id(self) -> str:
        if self.role == LISTENER:
            return f"{self.hostname}:{self.ae_title}:{self.port}"
        return f"{self.hostname}:{self.role}:{self.pid}"


def node_started(session: Session, identity: NodeIdentity) -> None:
    """Insert or reset the heartbeat row when a listener or worker process starts."""
    now = utcnow()
    row = session.get(NodeHeartbeat, identity.node_id)
    if row is None:
        row = NodeHeartbeat(node_id=identity.node_id)
        session.add(row)
    row.hostname = identity.hostname
    row.pid = identity.pid
    row.ae_title = identity.ae_title
    row.host = identity.host
    row.port = identity.port
    row.version = identity.version
    row.role = identity.role
    row.started_at = now
    row.heartbeat_at = now
    row.stopped_at = None


def beat(session: Session, node_id: str) -> None:
    """Refresh the heartbeat timestamp."""
    row = session.get(NodeHeartbeat, node_id)
    if row is not None:
        row.heartbeat_at = utcnow()


def node_stopped(session: Session, node_id: str) -> None:
    """Mark an orderly shutdown."""
    row = session.get(NodeHeartbeat, node_id)
    if row is not None:
        row.stopped_at = utcnow()


def find_heartbeat(
    session: Session, ae_title: str, port: int, hostname: str | None = None
) -> NodeHeartbeat | None:
    """Latest heartbeat of the listener with this AE title and port (preferring this host)."""
    query = select(NodeHeartbeat).where(
        NodeHeartbeat.ae_title == ae_title,
        NodeHeartbeat.port == port,
        NodeHeartbeat.role == LISTENER,
    )
    rows = list(session.scalars(query.order_by(NodeHeartbeat.heartbeat_at.desc())))
    local = [row for row in rows if row.hostname == hostname]
    candidates = local or rows
    return candidates[0] if candidates else None


def list_heartbeats(session: Session, role: str | None = None) -> list[NodeHeartbeat]:
    """Every heartbeat row (of one role), most recent first, for ``status``."""
    query = select(NodeHeartbeat).order_by(NodeHeartbeat.heartbeat_at.desc())
    if role is not None:
        query = query.where(NodeHeartbeat.role == role)
    return list(session.scalars(query))


def is_alive(row: NodeHeartbeat, *, max_age: timedelta, now: datetime | None = None) -> bool:
    """A process is alive if it has not stopped and its heartbeat is fresh."""
    now = now or utcnow()
    return row.stopped_at is None and now - row.heartbeat_at <= max_age
