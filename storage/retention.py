"""Spool retention: remove what has been delivered, keep what still needs a human.

An instance's spooled file and its outputs (SR, SC, HL7 messages) are removed once

* every job of the instance has finished as ``done`` or ``skipped`` — a ``failed`` job
  keeps its image for whoever investigates; a queued or running one obviously needs it;
* every send of its outputs is ``sent`` — a pending, in-flight or dead send keeps its file,
  so an operator can still re-queue it;
* the last of those events is older than the retention period.

Rows are kept (``purged_at`` set): the database is the history, the spool only the
working set. Files are deleted before the rows are marked, so a crash in between merely
repeats a deletion that finds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import session_scope
from storage.models import Instance, Job, JobState, Result, Send, SendState, utcnow
from storage.spool import Spool

FINISHED_STATES = (JobState.DONE, JobState.SKIPPED)


@dataclass(frozen=True)
class PurgeReport:
    """What one sweep removed."""

    instances: int
    files: int


def purgeable_instances(session: Session, cutoff: datetime, *, limit: int = 500) -> list[Instance]:
    """Instances whose work is finished and delivered, all of it before ``cutoff``."""
    unfinished_job = exists().where(
        Job.instance_id == Instance.id, Job.state.not_in(FINISHED_STATES)
    )
    recent_job = exists().where(Job.instance_id == Instance.id, Job.finished_at > cutoff)
    undelivered = exists().where(Send.instance_id == Instance.id, Send.state != SendState.SENT)
    recent_send = exists().where(Send.instance_id == Instance.id, Send.sent_at > cutoff)
    any_job = exists().where(Job.instance_id == Instance.id)
    query = (
        select(Instance)
        .where(
            Instance.purged_at.is_(None),
            any_job,
            ~unfinished_job,
            ~recent_job,
            ~undelivered,
            ~recent_send,
        )
        .order_by(Instance.id)
        .limit(limit)
    )
    return list(session.scalars(query))


@dataclass(frozen=True)
class _Purgeable:
    """What to delete for one instance, read in the selecting transaction."""

    instance_id: int
    result_ids: list[int]
    files: list[str]  # relative to the spool root


def purge(
    sessions: sessionmaker[Session],
    spool: Spool,
    *,
    keep_for: timedelta,
    now: datetime | None = None,
    limit: int = 500,
) -> PurgeReport:
    """Remove the files of every purgeable instance (one batch of up to ``limit``).

    Three short steps rather than one long transaction, so that the listener is never
    kept waiting for the database (SQLite has one writer) while files are deleted:
    select, delete the files, mark the rows.
    """
    cutoff = (now or utcnow()) - keep_for
    with session_scope(sessions) as session:
        batch = [_describe(session, i) for i in purgeable_instances(session, cutoff, limit=limit)]
    removed = sum(spool.remove(relpath) for item in batch for relpath in item.files)
    with session_scope(sessions) as session:
        _mark_purged(session, batch)
    return PurgeReport(len(batch), removed)


def _describe(session: Session, instance: Instance) -> _Purgeable:
    results = list(
        session.scalars(
            select(Result).where(Result.instance_id == instance.id, Result.purged_at.is_(None))
        )
    )
    files = [item["path"] for r in results for item in r.outputs or [] if item.get("path")]
    # Whatever else the outbox delivered for it (an HL7 message naming the patient).
    sent = session.scalars(select(Send.file_path).where(Send.instance_id == instance.id))
    files += sorted(set(sent) - set(files))
    if not _shared(session, instance):
        files.append(instance.spool_path)
    return _Purgeable(instance.id, [r.id for r in results], files)


def _mark_purged(session: Session, batch: list[_Purgeable]) -> None:
    now = utcnow()
    instance_ids = [item.instance_id for item in batch]
    result_ids = [rid for item in batch for rid in item.result_ids]
    if instance_ids:
        session.execute(update(Instance).where(Instance.id.in_(instance_ids)).values(purged_at=now))
    if result_ids:
        session.execute(update(Result).where(Result.id.in_(result_ids)).values(purged_at=now))


def _shared(session: Session, instance: Instance) -> bool:
    """Whether another unpurged instance row points at the same spooled file."""
    others = session.scalar(
        select(func.count())
        .select_from(Instance)
        .where(
            and_(
                Instance.spool_path == instance.spool_path,
                Instance.id != instance.id,
                Instance.purged_at.is_(None),
            )
        )
    )
    return bool(others)
