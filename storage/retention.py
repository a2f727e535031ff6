"""Spool retention: remove what has been delivered, keep what still needs a human.

An instance's spooled file and its outputs (SR, SC) are removed once

* every job of the instance has finished as ``done`` or ``skipped`` — a ``failed`` job
  keeps its image for whoever investigates; a queued or running one obviously needs it;
* every send of its outputs is ``sent`` — a pending, in-flight or dead send keeps its file,
  so an operator can still re-queue it;
* the last of those events is older than the retention period.

Rows are kept (``purged_at`` set): the database is the history, the spool only the
working set. Files are deleted before the row is marked, so a crash in between merely
repeats a deletion that finds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, select
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


def purge(
    sessions: sessionmaker[Session],
    spool: Spool,
    *,
    keep_for: timedelta,
    now: datetime | None = None,
    limit: int = 500,
) -> PurgeReport:
    """Remove the files of every purgeable instance (one batch of up to ``limit``)."""
    cutoff = (now or utcnow()) - keep_for
    with session_scope(sessions) as session:
        candidates = purgeable_instances(session, cutoff, limit=limit)
        removed_files = 0
        for instance in candidates:
            removed_files += _purge_instance(session, spool, instance)
    return PurgeReport(len(candidates), removed_files)


def _purge_instance(session: Session, spool: Spool, instance: Instance) -> int:
    now = utcnow()
    removed = 0
    results = session.scalars(
        select(Result).where(Result.instance_id == instance.id, Result.purged_at.is_(None))
    )
    for result in results:
        for relpath in (result.sr_path, result.sc_path):
            if relpath and spool.remove(relpath):
                removed += 1
        result.purged_at = now
    if not _shared(session, instance) and spool.remove(instance.spool_path):
        removed += 1
    instance.purged_at = now
    session.flush()
    return removed


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
