"""One study in full: its instances with their jobs, results (findings) and sends.

Read in four statements whatever the number of images (study, instances with series,
then jobs, results and sends of those instances), and grouped per instance here. The
study's status is the worklist's rollup of its jobs, so the detail and the list agree.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.api.schemas import (
    FindingOut,
    InstanceOut,
    JobOut,
    MeasurementOut,
    ResultOut,
    SendOut,
    StudyDetail,
)
from storage.models import Instance, Job, JobState, Result, Send, Series, Study
from storage.queue import RETRYABLE_STATES
from storage.worklist import rollup_status

_Row = TypeVar("_Row", Job, Result, Send)


def study_url(study_instance_uid: str) -> str:
    return f"/api/studies/{study_instance_uid}"


def heatmap_url(result_id: int) -> str:
    return f"/api/results/{result_id}/heatmap.png"


def study_detail(session: Session, study_instance_uid: str) -> StudyDetail | None:
    """The study with everything the node did with its images, or None if unknown."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        return None
    rows = session.execute(
        select(Instance, Series)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .order_by(Instance.received_at, Instance.id)
    ).all()
    ids = [instance.id for instance, _ in rows]
    jobs = _by_instance(session.scalars(select(Job).where(Job.instance_id.in_(ids))))
    results = _by_instance(session.scalars(select(Result).where(Result.instance_id.in_(ids))))
    sends = _by_instance(session.scalars(select(Send).where(Send.instance_id.in_(ids))))
    states = Counter(job.state.value for rows_ in jobs.values() for job in rows_)
    return StudyDetail(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number or None,
        study_date=study.study_date,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        status=rollup_status(states),
        priority=study.priority,
        priority_score=study.priority_score,
        top_finding=study.top_finding,
        top_probability=study.top_probability,
        instances=[
            _instance(instance, series, jobs[instance.id], results[instance.id], sends[instance.id])
            for instance, series in rows
        ],
    )


def _by_instance(rows: Iterable[_Row]) -> defaultdict[int, list[_Row]]:
    grouped: defaultdict[int, list[_Row]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.id):
        grouped[row.instance_id].append(row)
    return grouped


def _instance(
    instance: Instance,
    series: Series,
    jobs: Sequence[Job],
    results: Sequence[Result],
    sends: Sequence[Send],
) -> InstanceOut:
    return InstanceOut(
        sop_instance_uid=instance.sop_instance_uid,
        version=instance.version,
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        view_position=instance.view_position,
        received_at=instance.received_at,
        jobs=[job_out(job) for job in jobs],
        results=[_result(result) for result in results],
        sends=[_send(send) for send in sends],
    )


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        kind=job.kind,
        state=job.state.value,
        attempts=job.attempts,
        error=job.last_error if job.state is JobState.FAILED else None,
        created_at=job.created_at,
        finished_at=job.finished_at,
        retry_url=f"/api/jobs/{job.id}/retry" if job.state in RETRYABLE_STATES else None,
    )


def _result(result: Result) -> ResultOut:
    kept = result.sc_path is not None and result.purged_at is None
    return ResultOut(
        id=result.id,
        status=result.status.value,
        reason=result.reason,
        pipeline=result.pipeline,
        model_key=result.model_key,
        findings=[_finding(finding) for finding in result.findings or []],
        measurements=[MeasurementOut.model_validate(m) for m in result.measurements or []],
        in_domain=result.in_domain,
        warnings=list(result.warnings or []),
        timings_ms=dict(result.timings_ms or {}),
        sr_sop_instance_uid=result.sr_sop_instance_uid,
        sc_sop_instance_uid=result.sc_sop_instance_uid,
        heatmap_url=heatmap_url(result.id) if kept else None,
        updated_at=result.updated_at,
    )


def _finding(finding: dict[str, Any]) -> FindingOut:
    return FindingOut.model_validate({k: v for k, v in finding.items() if k in _FINDING_KEYS})


_FINDING_KEYS = frozenset(FindingOut.model_fields)


def _send(send: Send) -> SendOut:
    return SendOut(
        id=send.id,
        destination=send.destination,
        kind=send.kind,
        sop_instance_uid=send.sop_instance_uid,
        state=send.state.value,
        attempts=send.attempts,
        last_error=send.last_error,
        sent_at=send.sent_at,
        updated_at=send.updated_at,
    )
