"""Reading jobs for operators: the list, and everything about one job.

``dicom-node jobs list|show`` (and the HTTP API) need a job together with what it
worked on and what came of it: its instance, series and study (UIDs and technical
attributes only — the database holds no patient demographics), the results, the sends of
those results and the audit trail. Loading that here, with one query per table over
indexed columns, keeps ``show`` fast however long the audit trail has grown.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from storage.models import AuditEvent, Instance, Job, JobState, Result, Send, Series, Study


@dataclass(frozen=True)
class JobDetails:
    """One job and what belongs to it."""

    job: Job
    instance: Instance
    series: Series
    study: Study
    results: list[Result]
    sends: list[Send]
    audit: list[AuditEvent]


def list_jobs(
    session: Session, *, state: JobState | None = None, limit: int = 100
) -> list[tuple[Job, Instance]]:
    """Newest jobs first, each with its instance."""
    query = (
        select(Job, Instance)
        .join(Instance, Instance.id == Job.instance_id)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(Job.state == state)
    return [(job, instance) for job, instance in session.execute(query)]


def job_details(session: Session, job_id: int) -> JobDetails | None:
    """Everything about one job, or None if there is no such job."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    instance = job.instance
    series = instance.series
    results = list(
        session.scalars(select(Result).where(Result.instance_id == instance.id).order_by(Result.id))
    )
    sends = list(
        session.scalars(select(Send).where(Send.instance_id == instance.id).order_by(Send.id))
    )
    # Send and store events name the instance only; job moves name the job.
    audit = list(
        session.scalars(
            select(AuditEvent)
            .where(or_(AuditEvent.job_id == job.id, AuditEvent.instance_id == instance.id))
            .order_by(AuditEvent.occurred_at, AuditEvent.id)
        )
    )
    return JobDetails(job, instance, series, series.study, results, sends, audit)
