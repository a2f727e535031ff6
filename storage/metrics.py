"""Throughput and latency of the job queue over recent windows (what ``status`` reports).

Definitions, the same on both backends:

* **throughput** of a window = jobs that *finished* in it (``finished_at`` within the last
  N minutes), per terminal state (``done``, ``failed``, ``skipped``) and in total;
* **latency** = the job's instance ``received_at`` → the job's ``finished_at``: how long
  an image that arrived waited for its result, queueing and analysis included. Only
  ``done`` jobs count — a skipped job (no rule matched) is fast and a failed one produced
  nothing, so either would flatter or blur the figure;
* **p50 / p95** are continuous percentiles (linear interpolation between neighbours,
  PostgreSQL's ``percentile_cont``), in seconds; ``None`` when the window has no job.

Why the split by backend: PostgreSQL computes the percentiles of both windows in one
statement over the ``ix_jobs_finished (state, finished_at)`` range, so nothing but two
numbers leaves the server however busy the node is. SQLite has no ordered-set
aggregates; it returns the latencies of the (bounded, longest) window and Python
interpolates them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Job, JobState, utcnow

WINDOWS_MIN: tuple[int, ...] = (5, 60)
PERCENTILES: tuple[float, ...] = (0.50, 0.95)
FINISHED = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)


@dataclass(frozen=True)
class WindowFigures:
    """Throughput and latency of one window."""

    minutes: int
    finished: int
    done: int
    failed: int
    skipped: int
    per_minute: float
    latency_p50_s: float | None
    latency_p95_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueueFigures:
    """How much waits, and for how long the oldest of it has waited."""

    waiting: int  # received + queued
    due: int  # queued and available now (not backing off after a failure)
    oldest_wait_s: float | None  # age of the oldest queued job's queueing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InstanceFigures:
    """Received instances: all of them, the recent ones, and the bytes the spool keeps."""

    total: int
    recent: int  # received since the given moment
    kept_bytes: int  # images not yet removed by retention (outputs not included)


def instance_figures(session: Session, since: datetime) -> InstanceFigures:
    """One pass over ``instances`` for the three figures (not three scans)."""
    row = session.execute(
        select(
            func.count(),
            func.count().filter(Instance.received_at >= since),
            func.coalesce(func.sum(Instance.size_bytes).filter(Instance.purged_at.is_(None)), 0),
        )
    ).one()
    return InstanceFigures(int(row[0]), int(row[1]), int(row[2]))


def window_figures(
    session: Session, windows: Sequence[int] = WINDOWS_MIN, *, now: datetime | None = None
) -> list[WindowFigures]:
    """Figures for each window (minutes), shortest first."""
    now = now or utcnow()
    windows = sorted(windows)
    since = [now - timedelta(minutes=minutes) for minutes in windows]
    counts = _finished_counts(session, since)
    if session.get_bind().dialect.name == "postgresql":
        latencies = _percentiles_in_sql(session, since)
    else:
        latencies = _percentiles_in_python(session, since)
    return [_figures(minutes, counts[i], latencies[i]) for i, minutes in enumerate(windows)]


def _figures(
    minutes: int, counts: dict[JobState, int], latency: tuple[float | None, ...]
) -> WindowFigures:
    finished = sum(counts.values())
    return WindowFigures(
        minutes=minutes,
        finished=finished,
        done=counts.get(JobState.DONE, 0),
        failed=counts.get(JobState.FAILED, 0),
        skipped=counts.get(JobState.SKIPPED, 0),
        per_minute=round(finished / minutes, 2),
        latency_p50_s=_rounded(latency[0]),
        latency_p95_s=_rounded(latency[1]),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _finished_counts(session: Session, since: list[datetime]) -> list[dict[JobState, int]]:
    """Jobs finished per state in each window: one index range scan per state."""
    columns = [func.count().filter(Job.finished_at >= start) for start in since]
    rows = session.execute(
        select(Job.state, *columns)
        .where(Job.state.in_(FINISHED), Job.finished_at >= min(since))
        .group_by(Job.state)
    )
    counts: list[dict[JobState, int]] = [{} for _ in since]
    for state, *per_window in rows:
        for index, count in enumerate(per_window):
            counts[index][JobState(state)] = int(count)
    return counts


def _done_since(start: datetime) -> Any:
    """``done`` jobs finished since ``start``, joined to their instance."""
    return (
        select()
        .select_from(Job)
        .join(Instance, Instance.id == Job.instance_id)
        .where(Job.state == JobState.DONE, Job.finished_at >= start)
    )


def _percentiles_in_sql(session: Session, since: list[datetime]) -> list[tuple[float | None, ...]]:
    latency = func.extract("epoch", Job.finished_at - Instance.received_at)
    columns = [
        func.percentile_cont(q).within_group(latency).filter(Job.finished_at >= start)
        for start in since
        for q in PERCENTILES
    ]
    row = session.execute(_done_since(min(since)).add_columns(*columns)).one()
    n = len(PERCENTILES)
    return [tuple(row[i * n : (i + 1) * n]) for i in range(len(since))]


def _percentiles_in_python(
    session: Session, since: list[datetime]
) -> list[tuple[float | None, ...]]:
    latency = cast(
        (func.julianday(Job.finished_at) - func.julianday(Instance.received_at)) * 86_400.0,
        Float,
    )
    # Smallest window index that still contains the job (windows are sorted shortest first).
    first_window: ColumnElement[int] = case(
        *[(Job.finished_at >= start, index) for index, start in enumerate(since)],
        else_=len(since),
    )
    rows = session.execute(_done_since(min(since)).add_columns(latency, first_window)).all()
    result: list[tuple[float | None, ...]] = []
    for index in range(len(since)):
        values = sorted(float(value) for value, first in rows if first <= index)
        result.append(tuple(percentile(values, q) for q in PERCENTILES))
    return result


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Continuous percentile of sorted values, interpolated as ``percentile_cont`` does."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def queue_figures(session: Session, *, now: datetime | None = None) -> QueueFigures:
    """Waiting jobs, those due now, and the age of the oldest one queued."""
    now = now or utcnow()
    waiting_states = (JobState.RECEIVED, JobState.QUEUED)
    row = session.execute(
        select(
            func.count(),
            func.count().filter(Job.state == JobState.QUEUED, Job.available_at <= now),
            func.min(Job.queued_at).filter(Job.state == JobState.QUEUED),
        ).where(Job.state.in_(waiting_states))
    ).one()
    waiting, due, oldest = row
    oldest_wait = (now - oldest).total_seconds() if oldest is not None else None
    return QueueFigures(int(waiting), int(due), _rounded(oldest_wait))
