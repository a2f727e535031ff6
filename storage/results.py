"""Recording what the engine concluded about an instance: one row per models, upserted.

The row is keyed by (instance version, pipeline, model identity). A job that is re-run —
after a crash between writing its outputs and committing, or on an operator's request —
updates the same row, so the database never holds two opinions of the same models on the
same image, just as the archive never holds two SRs for it (the output UIDs are derived
from the same key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.models import Result, ResultStatus, utcnow


@dataclass(frozen=True)
class ResultRecord:
    """Everything the database keeps about one analysis (no pixel data, no demographics)."""

    instance_id: int
    job_id: int | None
    pipeline: str
    model_key: str
    status: ResultStatus
    reason: str | None = None
    findings: Sequence[Mapping[str, Any]] = ()
    in_domain: bool | None = None
    ood_distance: float | None = None
    warnings: Sequence[str] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    measurements: Sequence[Mapping[str, Any]] = ()


def record_result(session: Session, record: ResultRecord, *, actor: str) -> Result:
    """Insert or update the result row of ``record`` in the caller's transaction."""
    now = utcnow()
    row = session.scalar(
        select(Result)
        .where(
            Result.instance_id == record.instance_id,
            Result.pipeline == record.pipeline,
            Result.model_key == record.model_key,
        )
        .with_for_update()
    )
    created = row is None
    if row is None:
        row = Result(
            instance_id=record.instance_id,
            pipeline=record.pipeline,
            model_key=record.model_key,
            created_at=now,
        )
        session.add(row)
    _fill(row, record, now)
    session.flush()
    record_event(
        session,
        "result.recorded" if created else "result.updated",
        actor=actor,
        instance_id=record.instance_id,
        job_id=record.job_id,
        details={"result_id": row.id, "status": record.status.value, "pipeline": record.pipeline},
    )
    return row


def _fill(row: Result, record: ResultRecord, now: Any) -> None:
    row.job_id = record.job_id
    row.status = record.status
    row.reason = record.reason or None
    row.findings = [dict(finding) for finding in record.findings]
    row.measurements = [dict(measurement) for measurement in record.measurements]
    row.in_domain = record.in_domain
    row.ood_distance = record.ood_distance
    row.warnings = list(record.warnings)
    row.timings_ms = dict(record.timings_ms)
    row.outputs = []  # set_outputs: the objects written for this analysis
    row.updated_at = now
    row.purged_at = None


@dataclass(frozen=True)
class OutputFile:
    """One output object written for a result, as the row lists it."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # in the spool


def set_outputs(row: Result, files: Sequence[OutputFile]) -> None:
    """List the objects written for ``row`` (replacing those of an earlier run)."""
    row.outputs = [
        {
            "kind": item.kind,
            "sop_class_uid": item.sop_class_uid,
            "sop_instance_uid": item.sop_instance_uid,
            "path": item.path,
        }
        for item in files
    ]


def counts_by_status(session: Session) -> dict[str, int]:
    """Number of results per status (all statuses present, zeros included)."""
    counts = {status.value: 0 for status in ResultStatus}
    rows = session.execute(select(Result.status, func.count()).group_by(Result.status))
    for status, count in rows:
        counts[ResultStatus(status).value] = count
    return counts


def results_of_instance(session: Session, instance_id: int) -> list[Result]:
    return list(
        session.scalars(select(Result).where(Result.instance_id == instance_id).order_by(Result.id))
    )
