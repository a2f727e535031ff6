"""The append-only audit trail: one helper so every writer records events the same way,
and one query for those who read it (``dicom-node audit list``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from storage.models import AE_LENGTH, AuditEvent, utcnow


def record_event(
    session: Session,
    kind: str,
    *,
    actor: str,
    instance_id: int | None = None,
    job_id: int | None = None,
    sop_instance_uid: str | None = None,
    calling_ae: str | None = None,
    peer_address: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit event to the caller's transaction (it commits or rolls back with it).

    ``details`` must never carry patient demographics: the audit trail is exported to
    people who are not entitled to see them.
    """
    event = AuditEvent(
        occurred_at=utcnow(),
        kind=kind,
        actor=actor[:64],
        instance_id=instance_id,
        job_id=job_id,
        sop_instance_uid=sop_instance_uid,
        calling_ae=calling_ae[:AE_LENGTH] if calling_ae else None,
        peer_address=peer_address,
        details=dict(details) if details else None,
    )
    session.add(event)
    return event


DEFAULT_LIMIT = 100


def list_events(
    session: Session,
    *,
    since: datetime | None = None,
    kinds: Sequence[str] | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[AuditEvent]:
    """Events, newest first: at or after ``since``, of the ``kinds`` given.

    A kind ending in ``.`` or ``*`` is a prefix: ``api.`` is every API access event,
    ``job.*`` every job transition. Reads the ``occurred_at`` and ``kind`` indexes.
    """
    query = select(AuditEvent)
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    if kinds:
        exact = [kind for kind in kinds if not kind.endswith((".", "*"))]
        prefixes = [kind.rstrip("*") for kind in kinds if kind.endswith((".", "*"))]
        conditions: list[ColumnElement[bool]] = [AuditEvent.kind.in_(exact)] if exact else []
        conditions += [AuditEvent.kind.startswith(prefix, autoescape=True) for prefix in prefixes]
        query = query.where(or_(*conditions))
    query = query.order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc()).limit(limit)
    return list(session.scalars(query))


def event_as_dict(event: AuditEvent) -> dict[str, Any]:
    """One event as ``audit list --json`` prints it."""
    return {
        "id": event.id,
        "occurred_at": event.occurred_at.isoformat(),
        "kind": event.kind,
        "actor": event.actor,
        "instance_id": event.instance_id,
        "job_id": event.job_id,
        "sop_instance_uid": event.sop_instance_uid,
        "calling_ae": event.calling_ae,
        "peer_address": event.peer_address,
        "details": event.details,
    }
