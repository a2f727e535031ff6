"""Liveness records of running listeners (what ``dicom-node status`` reports as "up").

A process that dies with ``kill -9`` cannot say goodbye, so "up" means "a heartbeat
was written recently", not merely "a row exists".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import NodeHeartbeat, utcnow

HeartbeatAction = Callable[[Session, str], None]


@dataclass(frozen=True)
class NodeIdentity:
    """Who is beating: one listener process on one host."""

    hostname: str
    pid: int
    ae_title: str
    host: str
    port: int
    version: str

    @property
    def node_id(self) -> str:
        return f"{self.hostname}:{self.ae_title}:{self.port}"


def node_started(session: Session, identity: NodeIdentity) -> None:
    """Insert or reset the heartbeat row when a listener starts."""
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
        NodeHeartbeat.ae_title == ae_title, NodeHeartbeat.port == port
    )
    rows = list(session.scalars(query.order_by(NodeHeartbeat.heartbeat_at.desc())))
    local = [row for row in rows if row.hostname == hostname]
    candidates = local or rows
    return candidates[0] if candidates else None


def is_alive(row: NodeHeartbeat, *, max_age: timedelta, now: datetime | None = None) -> bool:
    """A listener is alive if it has not stopped and its heartbeat is fresh."""
    now = now or utcnow()
    return row.stopped_at is None and now - row.heartbeat_at <= max_age
