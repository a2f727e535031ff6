"""The append-only audit trail: one helper so every writer records events the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

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
