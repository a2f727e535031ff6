"""The worklist: studies by priority, then by arrival, with what the node made of them.

Pure query code: one SQL statement per call, whatever the number of studies. The page of
studies is chosen first on ``studies`` alone, and only that page is joined to its series,
instances and jobs for the counts, so a long history costs nothing but the rows shown.
The page is the union of one ``LIMIT n`` range per priority rank, each read in arrival
order straight off ``ix_studies_worklist`` (rank, first_received_at): the index runs in
one direction and the worklist wants rank descending but arrival ascending, so a single
``ORDER BY`` over both would have the database sort every study of the top rank present
— with mostly ROUTINE studies, nearly the whole table — to show the first ``n``.

Study status is rolled up from the jobs of all its instances (:func:`rollup_status`):

===========  ==========================================================================
status       when
===========  ==========================================================================
received     no job yet (an instance is being recorded)
running      some job is running
queued       none running, some still waiting (received or queued)
done         all finished, at least one done and none failed (skipped ones, e.g. a
             lateral routed nowhere, do not count against the study)
partial      all finished, some done and some failed
failed       all finished, some failed and none done
skipped      all finished and every one skipped
===========  ==========================================================================

No patient identifiers are read or returned here: the database does not hold them
(migration 0003). The CLI reads them from the spooled file when an operator asks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, case, func, select, union_all
from sqlalchemy.orm import Session

from storage.models import Instance, Job, JobState, Series, Study

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

# ``studies.priority_rank`` of each level (migration 0003); 0 = no priority yet.
PRIORITY_RANKS: Mapping[str, int] = {"STAT": 3, "URGENT": 2, "ROUTINE": 1}
NO_PRIORITY_RANK = 0
PRIORITY_LEVELS = tuple(PRIORITY_RANKS)
STATUSES = ("received", "running", "queued", "done", "partial", "failed", "skipped")
DEFAULT_LIMIT = 200
_WAITING = (JobState.RECEIVED, JobState.QUEUED)


@dataclass(frozen=True)
class WorklistEntry:
    """One study on the worklist (no patient identifiers: the database has none)."""

    study_instance_uid: str
    accession_number: str | None
    first_received_at: datetime
    last_received_at: datetime
    status: str  # study-level rollup of its jobs (see the module docstring)
    priority: str | None  # "STAT" | "URGENT" | "ROUTINE" | None
    priority_score: float | None
    top_finding: str | None
    top_probability: float | None
    instances: int
    study_date: str | None = None
    priority_updated_at: datetime | None = None
    jobs: Mapping[str, int] | None = None  # job counts by state, zeros left out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 in UTC, floats rounded for display."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "study_date": self.study_date,
            "first_received_at": _iso(self.first_received_at),
            "last_received_at": _iso(self.last_received_at),
            "status": self.status,
            "priority": self.priority,
            "priority_score": _rounded(self.priority_score),
            "top_finding": self.top_finding,
            "top_probability": _rounded(self.top_probability),
            "priority_updated_at": _iso(self.priority_updated_at),
            "instances": self.instances,
            "jobs": dict(self.jobs or {}),
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def rollup_status(jobs: Mapping[str, int]) -> str:
    """The study status from its job counts by state (see the module docstring)."""
    count = {state: jobs.get(state.value, 0) for state in JobState}
    if not any(count.values()):
        return "received"
    if count[JobState.RUNNING]:
        return "running"
    if any(count[state] for state in _WAITING):
        return "queued"
    done, failed = count[JobState.DONE], count[JobState.FAILED]
    if done and failed:
        return "partial"
    if done:
        return "done"
    if failed:
        return "failed"
    return "skipped"


def worklist(
    session: Session,
    *,
    since: datetime | None = None,
    priorities: Sequence[str] | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[WorklistEntry]:
    """Studies by priority (STAT first), then arrival (oldest first).

    ``since`` keeps studies that received an image at or after that moment;
    ``priorities`` keeps the given levels (case-insensitive). Raises ``ValueError`` for an
    unknown level or a limit below 1.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    levels = priority_levels(priorities)
    if levels == []:
        return []
    page = _page(since, levels, limit).subquery("page")
    job_counts = [
        func.count(case((Job.state == state, Job.id))).label(state.value) for state in JobState
    ]
    query = (
        select(
            Study,
            func.count(func.distinct(Instance.sop_instance_uid)).label("instances"),
            *job_counts,
        )
        .join(page, page.c.id == Study.id)
        .outerjoin(Series, Series.study_id == Study.id)
        .outerjoin(Instance, Instance.series_id == Series.id)
        .outerjoin(Job, Job.instance_id == Instance.id)
        .group_by(Study.id)
        .order_by(*_ORDER)
    )
    return [_entry(row) for row in session.execute(query)]


_ORDER = (Study.priority_rank.desc(), Study.first_received_at.asc(), Study.id.asc())


def priority_levels(priorities: Sequence[str] | None) -> list[str] | None:
    """``priorities`` in upper case, checked; None (all levels) stays None."""
    if priorities is None:
        return None
    levels = [level.strip().upper() for level in priorities if level.strip()]
    unknown = sorted(set(levels) - set(PRIORITY_LEVELS))
    if unknown:
        raise ValueError(f"unknown priority {', '.join(unknown)}; use {', '.join(PRIORITY_LEVELS)}")
    return levels


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``1d`` … ago, or an ISO 8601 moment (local time when naive)."""
    match = _DURATION.match(value)
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"since {value!r}: give a duration (30m, 2h, 1d) or an ISO 8601 date/time"
        ) from None
    return moment.astimezone(UTC)  # a naive moment is taken as local time


def _page(since: datetime | None, levels: list[str] | None, limit: int) -> Select[Any]:
    """The ids of the studies to show: on ``studies`` alone, in worklist order.

    The first ``limit`` of each rank (an index range scan each), then the first ``limit``
    of their union (at most four times ``limit`` rows to sort).
    """
    if levels is None:
        ranks = [*PRIORITY_RANKS.values(), NO_PRIORITY_RANK]
    else:
        ranks = sorted({PRIORITY_RANKS[level] for level in levels}, reverse=True)
    per_rank = []
    for rank in ranks:
        query = select(Study.id, Study.priority_rank, Study.first_received_at).where(
            Study.priority_rank == rank
        )
        if since is not None:
            query = query.where(Study.last_received_at >= since)
        ordered = query.order_by(Study.first_received_at, Study.id).limit(limit).subquery()
        per_rank.append(select(ordered))
    ranked = union_all(*per_rank).subquery("ranked")
    return (
        select(ranked.c.id)
        .order_by(ranked.c.priority_rank.desc(), ranked.c.first_received_at, ranked.c.id)
        .limit(limit)
    )


def _entry(row: Any) -> WorklistEntry:
    study: Study = row.Study
    jobs = {state.value: getattr(row, state.value) for state in JobState}
    return WorklistEntry(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number or None,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        status=rollup_status(jobs),
        priority=study.priority,
        priority_score=study.priority_score,
        top_finding=study.top_finding,
        top_probability=study.top_probability,
        instances=row.instances,
        study_date=study.study_date,
        priority_updated_at=study.priority_updated_at,
        jobs={state: count for state, count in jobs.items() if count},
    )


def latest_spooled_files(
    session: Session, study_instance_uids: Sequence[str]
) -> dict[str, str | None]:
    """Spool path of each study's most recently received instance still in the spool.

    ``None`` for a study whose every file retention has removed. One query for all the
    studies (for the patient identifiers an operator may ask to see next to the list).
    """
    if not study_instance_uids:
        return {}
    query = (
        select(Study.study_instance_uid, Instance.spool_path, Instance.purged_at)
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(Study.study_instance_uid.in_(list(study_instance_uids)))
        .order_by(Instance.received_at, Instance.id)
    )
    files: dict[str, str | None] = dict.fromkeys(study_instance_uids)
    for study_uid, spool_path, purged_at in session.execute(query):
        if purged_at is None:
            files[study_uid] = spool_path
    return files
