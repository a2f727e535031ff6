"""The outbox: a persistent queue of objects to deliver, one row per destination and object.

::

    pending ──► sending ──► sent
       ▲           │
       └───────────┤ retryable failure, younger than max_age: back off, try again
                   ▼
                 dead ──► pending (operator: ``dicom-node sends retry``)

Why a table and not a loop in memory: a result that was committed must reach the archive
even if the node restarts, the PACS is down for a night, or the sender dies between
"sent" and "recorded as sent". Rules that follow from that:

* **idempotent enqueue** — ``(destination, sop_instance_uid)`` is unique; enqueueing the
  same object again (a re-run job) is a no-op. Re-sending an object whose response was
  lost is harmless: the result UIDs are deterministic, and a PACS receiving a SOP
  Instance UID it already holds keeps one copy.
* **claims with a lease** — claimed rows are ``sending`` with ``next_attempt_at`` moved
  to the end of the lease; a sender that dies leaves them to be claimed again after it.
  PostgreSQL claims with ``FOR UPDATE SKIP LOCKED``; on SQLite ``BEGIN IMMEDIATE``
  serialises claimers.
* **exponential backoff with full jitter** — the n-th retry waits a uniformly random time
  in ``[0, min(cap, base·2ⁿ⁻¹)]`` (the "full jitter" of Brooker, *Exponential Backoff And
  Jitter*, AWS Architecture Blog 2015), so many sends failing together do not retry in
  lock-step against a PACS that is just coming back;
* **never an infinite loop** — a permanent failure (the peer says the object is wrong)
  is dead at once; a retryable one is dead once the send is older than ``max_age``.
  Dead sends stay visible (``status``) and can be re-queued.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.db import dialect_insert
from storage.models import Send, SendState, utcnow
from storage.queue import owner_is_gone

MAX_ERROR_LENGTH = 2000
CLAIMABLE = (SendState.PENDING, SendState.SENDING)


@dataclass(frozen=True)
class OutgoingObject:
    """One file to deliver to one destination (what the worker enqueues)."""

    destination: str
    kind: str  # "sr" | "sc"
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    file_path: str  # relative to the spool root
    instance_id: int
    result_id: int | None = None


@dataclass(frozen=True)
class BackoffPolicy:
    """When to try again, and when to give up (seconds)."""

    base: float = 5.0
    cap: float = 600.0
    max_age: float = 86_400.0

    def delay(self, attempts: int, rng: Callable[[float, float], float] = random.uniform) -> float:
        """Full jitter: uniform in ``[0, min(cap, base · 2^(attempts-1))]``."""
        ceiling = min(self.cap, self.base * 2 ** max(0, min(attempts - 1, 62)))
        return rng(0.0, ceiling)


def enqueue_send(session: Session, item: OutgoingObject, *, actor: str) -> int | None:
    """Queue ``item``; returns the new row's id, or None if it was already queued."""
    now = utcnow()
    values = {
        "result_id": item.result_id,
        "instance_id": item.instance_id,
        "destination": item.destination,
        "kind": item.kind,
        "sop_class_uid": item.sop_class_uid,
        "sop_instance_uid": item.sop_instance_uid,
        "study_instance_uid": item.study_instance_uid,
        "file_path": item.file_path,
        "state": SendState.PENDING.value,
        "attempts": 0,
        "next_attempt_at": now,
        "first_enqueued_at": now,
        "updated_at": now,
    }
    insert = dialect_insert(session)
    statement = (
        insert(Send)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"])
    )
    send_id = session.scalar(statement.returning(Send.id))
    if send_id is not None:
        record_event(
            session,
            "send.queued",
            actor=actor,
            instance_id=item.instance_id,
            sop_instance_uid=item.sop_instance_uid,
            details={"send_id": send_id, "destination": item.destination, "kind": item.kind},
        )
    return send_id


def claim_due(
    session: Session,
    sender: str,
    *,
    limit: int,
    lease: timedelta,
    now: datetime | None = None,
) -> list[Send]:
    """Claim up to ``limit`` due sends (oldest due first) for ``sender``.

    Due means pending and ``next_attempt_at`` reached, or sending with an expired lease
    (its sender died mid-attempt).
    """
    now = now or utcnow()
    query = (
        select(Send)
        .where(Send.state.in_(CLAIMABLE), Send.next_attempt_at <= now)
        .order_by(Send.next_attempt_at, Send.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = list(session.scalars(query))
    for send in claimed:
        send.state = SendState.SENDING
        send.sender = sender
        send.attempts += 1
        send.last_attempt_at = now
        send.next_attempt_at = now + lease
        send.updated_at = now
    session.flush()
    return claimed


def mark_sent(session: Session, send: Send, *, actor: str, note: str | None = None) -> None:
    """The destination acknowledged the object (possibly with a warning status)."""
    now = utcnow()
    send.state = SendState.SENT
    send.sent_at = now
    send.updated_at = now
    send.last_error = note[:MAX_ERROR_LENGTH] if note else None
    session.flush()
    _audit(session, send, "send.sent", actor, note)


def record_failure(
    session: Session,
    send: Send,
    error: str,
    *,
    retryable: bool,
    policy: BackoffPolicy,
    actor: str,
    now: datetime | None = None,
    rng: Callable[[float, float], float] = random.uniform,
) -> SendState:
    """A failed attempt: back off and retry, or dead-letter; returns the new state."""
    now = now or utcnow()
    send.last_error = error[:MAX_ERROR_LENGTH]
    send.updated_at = now
    deadline = send.first_enqueued_at + timedelta(seconds=policy.max_age)
    if not retryable or now >= deadline:
        why = "permanent failure" if not retryable else f"older than {policy.max_age:g} s"
        return dead_letter(session, send, f"{why}: {error}", actor=actor)
    send.state = SendState.PENDING
    send.next_attempt_at = min(deadline, now + timedelta(seconds=policy.delay(send.attempts, rng)))
    session.flush()
    _audit(session, send, "send.retry_scheduled", actor, error)
    return send.state


def dead_letter(session: Session, send: Send, reason: str, *, actor: str) -> SendState:
    """Give up on a send: kept, visible in ``status``, re-triable by an operator."""
    send.state = SendState.DEAD
    send.last_error = reason[:MAX_ERROR_LENGTH]
    send.updated_at = utcnow()
    session.flush()
    _audit(session, send, "send.dead", actor, reason)
    return send.state


def retry_dead(session: Session, ids: Sequence[int] | None, *, actor: str) -> list[int]:
    """Re-queue dead sends (all when ``ids`` is None) with a fresh max-age window.

    Returns the ids actually re-queued; ids that are not dead are left alone.
    """
    query = select(Send).where(Send.state == SendState.DEAD).with_for_update()
    if ids is not None:
        query = query.where(Send.id.in_(list(ids)))
    now = utcnow()
    requeued: list[int] = []
    for send in session.scalars(query.order_by(Send.id)):
        send.state = SendState.PENDING
        send.attempts = 0
        send.next_attempt_at = now
        send.first_enqueued_at = now
        send.updated_at = now
        requeued.append(send.id)
        _audit(session, send, "send.requeued", actor, None)
    session.flush()
    return requeued


def recover_orphans(
    session: Session, hostname: str, is_alive: Callable[[int], bool], *, actor: str
) -> int:
    """Make sends claimed by dead local processes due now instead of after their lease."""
    rows = session.scalars(
        select(Send).where(Send.state == SendState.SENDING).with_for_update(skip_locked=True)
    )
    recovered = 0
    for send in rows:
        if send.sender and owner_is_gone(send.sender, hostname, is_alive):
            send.state = SendState.PENDING
            send.next_attempt_at = utcnow()
            recovered += 1
            _audit(session, send, "send.recovered", actor, f"sender {send.sender} is gone")
    session.flush()
    return recovered


def _audit(session: Session, send: Send, kind: str, actor: str, error: str | None) -> None:
    details: dict[str, object] = {
        "send_id": send.id,
        "destination": send.destination,
        "kind": send.kind,
        "attempts": send.attempts,
    }
    if error:
        details["error"] = error[:500]
    record_event(
        session,
        kind,
        actor=actor,
        instance_id=send.instance_id,
        sop_instance_uid=send.sop_instance_uid,
        details=details,
    )


# -- reading -------------------------------------------------------------------------------


def counts_by_destination(session: Session) -> dict[str, dict[str, int]]:
    """``{destination: {state: count}}`` with every state present."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(
        select(Send.destination, Send.state, func.count()).group_by(Send.destination, Send.state)
    )
    for destination, state, count in rows:
        per = counts.setdefault(destination, {s.value: 0 for s in SendState})
        per[SendState(state).value] = count
    return counts


def list_sends(
    session: Session,
    *,
    state: SendState | None = None,
    destination: str | None = None,
    limit: int = 100,
) -> list[Send]:
    """Most recently changed sends first."""
    query = select(Send).order_by(Send.updated_at.desc(), Send.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Send.state == state)
    if destination is not None:
        query = query.where(Send.destination == destination)
    return list(session.scalars(query))
