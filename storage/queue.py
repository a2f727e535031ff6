"""The job queue: a small state machine on the ``jobs`` table.

::

    received ──► queued ──► running ──► done
        │          │  ▲        │
        │          │  └────────┤ (retry while attempts < max_attempts)
        │          ▼           ▼
        └──────► skipped     failed ──► queued (operator retry, :func:`requeue`)
                   └──────────────────► queued (operator retry, e.g. after a rule change)

Every transition is validated here and written to the audit trail in the caller's
transaction, so the state of a job and the record of how it got there cannot disagree.
Claiming uses ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite (where the clause is
not rendered) the write lock taken by ``BEGIN IMMEDIATE`` serialises claimers, and the
conditional update below guards against double claims on either backend.

A claim is a *lease*: ``available_at`` of a running job is the moment its worker is
presumed dead. A job whose worker died (``kill -9``, power loss) is therefore never lost:
it goes back to the queue when the lease expires, or at once when a live worker on the
same host finds the claiming process gone (:func:`recover_orphans`). Live workers renew
the leases of the jobs they hold (:func:`extend_leases`), so a long job is not mistaken
for an abandoned one, and recover expired leases on every claim and periodically in
between, so any surviving process picks up a dead one's jobs. Each claim counts
as an attempt, so an image that kills its worker every time ends ``failed`` after
``max_attempts`` instead of taking the node down forever.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.models import Job, JobState, utcnow

TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.QUEUED, JobState.SKIPPED, JobState.FAILED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SKIPPED}),
    JobState.RUNNING: frozenset(
        {JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.QUEUED}
    ),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.DONE: frozenset(),
    JobState.SKIPPED: frozenset({JobState.QUEUED}),
}
TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED})
RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.SKIPPED})
MAX_ERROR_LENGTH = 4000
DEFAULT_LEASE = timedelta(minutes=10)


class InvalidTransition(ValueError):
    """Raised when a job is asked to move along an edge the state machine does not have."""


def _new_job(instance_id: int, kind: str, priority: int) -> Job:
    now = utcnow()
    return Job(
        instance_id=instance_id,
        kind=kind,
        state=JobState.RECEIVED,
        priority=priority,
        created_at=now,
        updated_at=now,
        available_at=now,
    )


def create_job(
    session: Session, instance_id: int, *, kind: str = "analyze", actor: str, priority: int = 0
) -> Job:
    """Create a job for an instance in state ``received`` (flushed, so it has an id)."""
    job = _new_job(instance_id, kind, priority)
    session.add(job)
    session.flush()
    record_event(session, "job.received", actor=actor, job_id=job.id, instance_id=instance_id)
    return job


def enqueue(
    session: Session, instance_id: int, *, actor: str, kind: str = "analyze", priority: int = 0
) -> Job:
    """Create a job and make it available to workers: received → queued in one step.

    The row is inserted already queued and one audit event records the edge, which is
    what the C-STORE path needs: one INSERT fewer per received image.
    """
    job = _new_job(instance_id, kind, priority)
    _apply(job, JobState.QUEUED, error=None)
    session.add(job)
    session.flush()
    record_event(
        session,
        "job.queued",
        actor=actor,
        job_id=job.id,
        instance_id=instance_id,
        details={"from": JobState.RECEIVED.value, "to": JobState.QUEUED.value},
    )
    return job


def transition(
    session: Session, job: Job, target: JobState, *, actor: str, error: str | None = None
) -> Job:
    """Move ``job`` to ``target`` if the state machine allows it, and audit the move."""
    previous = _apply(job, target, error=error)
    session.flush()
    details: dict[str, object] = {"from": previous.value, "to": target.value}
    if error:
        details["error"] = job.last_error
    record_event(
        session,
        f"job.{target.value}",
        actor=actor,
        job_id=job.id,
        instance_id=job.instance_id,
        details=details,
    )
    return job


def _apply(job: Job, target: JobState, *, error: str | None) -> JobState:
    """Validate the edge and update state and timestamps; returns the previous state."""
    if target not in TRANSITIONS[job.state]:
        raise InvalidTransition(f"job {job.id}: {job.state.value} -> {target.value} not allowed")
    previous = job.state
    now = utcnow()
    job.state = target
    job.updated_at = now
    _stamp(job, target, now, error)
    return previous


def _stamp(job: Job, target: JobState, now: datetime, error: str | None) -> None:
    if target is JobState.QUEUED:
        job.queued_at = now
        job.worker = None
    elif target is JobState.RUNNING:
        job.started_at = now
        job.attempts += 1
    elif target in TERMINAL_STATES:
        job.finished_at = now
    if error is not None:
        job.last_error = error[:MAX_ERROR_LENGTH]


def claim_next(
    session: Session,
    worker: str,
    *,
    kinds: tuple[str, ...] | None = None,
    lease: timedelta = DEFAULT_LEASE,
) -> Job | None:
    """Claim the most urgent available job for ``worker`` (queued → running), or None."""
    claimed = claim_batch(session, worker, limit=1, kinds=kinds, lease=lease)
    return claimed[0] if claimed else None


def claim_batch(
    session: Session,
    worker: str,
    *,
    limit: int,
    kinds: tuple[str, ...] | None = None,
    lease: timedelta = DEFAULT_LEASE,
) -> list[Job]:
    """Claim up to ``limit`` available jobs, most urgent first (priority, then arrival).

    Jobs whose worker's lease has expired are recovered first, so a dead worker's job is
    picked up by whoever claims next.
    """
    now = utcnow()
    recover_expired(session, actor=worker, now=now)
    query = (
        select(Job)
        .where(Job.state == JobState.QUEUED, Job.available_at <= now)
        .order_by(Job.priority.desc(), Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if kinds:
        query = query.where(Job.kind.in_(kinds))
    candidates = list(session.scalars(query))
    return [job for job in candidates if _claim(session, job, worker, now, lease)]


def _claim(session: Session, job: Job, worker: str, now: datetime, lease: timedelta) -> bool:
    claimed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.QUEUED)
        .values(
            state=JobState.RUNNING,
            worker=worker,
            started_at=now,
            updated_at=now,
            available_at=now + lease,
            attempts=Job.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return False  # somebody else was faster; the caller simply polls again
    session.refresh(job)
    record_event(
        session,
        "job.running",
        actor=worker,
        job_id=job.id,
        instance_id=job.instance_id,
        details={"from": "queued", "to": "running"},
    )
    return True


def recover_expired(session: Session, *, actor: str, now: datetime | None = None) -> int:
    """Give running jobs whose lease expired back to the queue (or fail them)."""
    now = now or utcnow()
    expired = session.scalars(
        select(Job)
        .where(Job.state == JobState.RUNNING, Job.available_at <= now)
        .with_for_update(skip_locked=True)
    )
    jobs = list(expired)
    for job in jobs:
        _requeue_abandoned(session, job, f"lease of worker {job.worker} expired", actor, now)
    return len(jobs)


def extend_leases(
    session: Session,
    workers: Collection[str],
    job_ids: Collection[int],
    *,
    lease: timedelta,
    now: datetime | None = None,
) -> int:
    """Move the lease of running jobs still held by ``workers`` to ``now + lease``.

    Why: a live worker on a long batch must not look dead. Its process renews the leases
    of the jobs it is working on every fraction of a lease, so ``job_lease`` only bounds
    how long a *dead* worker's jobs wait, not how long a job may take. A job already
    taken over (lease expired while the database was unreachable) is not touched.
    """
    if not workers or not job_ids:
        return 0
    now = now or utcnow()
    renewed = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.state == JobState.RUNNING)
        .where(Job.worker.in_(list(workers)))
        .values(available_at=now + lease)
        .execution_options(synchronize_session=False)
    )
    return int(renewed.rowcount)  # type: ignore[attr-defined]


def owner_is_gone(owner: str, hostname: str, is_alive: Callable[[int], bool]) -> bool:
    """Whether ``owner`` (``host:pid:name``) is a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != hostname or not pid_text.isdigit():
        return False
    return not is_alive(int(pid_text))


def recover_orphans(
    session: Session, hostname: str, is_alive: Callable[[int], bool], *, actor: str
) -> int:
    """Re-queue running jobs of dead processes on this host without waiting for the lease."""
    running = session.scalars(
        select(Job).where(Job.state == JobState.RUNNING).with_for_update(skip_locked=True)
    )
    orphans = [
        job for job in running if job.worker and owner_is_gone(job.worker, hostname, is_alive)
    ]
    for job in orphans:
        _requeue_abandoned(session, job, f"worker {job.worker} is gone", actor, utcnow())
    return len(orphans)


def _requeue_abandoned(session: Session, job: Job, why: str, actor: str, now: datetime) -> None:
    """Back to the queue while attempts remain; an image that keeps killing workers fails."""
    if job.attempts >= job.max_attempts:
        transition(
            session,
            job,
            JobState.FAILED,
            actor=actor,
            error=f"{why}; gave up after {job.attempts} attempts",
        )
        return
    transition(session, job, JobState.QUEUED, actor=actor, error=why)
    job.available_at = now
    session.flush()


def fail(
    session: Session,
    job: Job,
    error: str,
    *,
    actor: str,
    retry_delay: timedelta = timedelta(seconds=30),
) -> Job:
    """Record a failed attempt: back to the queue while attempts remain, else ``failed``."""
    if job.state is JobState.RUNNING and job.attempts < job.max_attempts:
        transition(session, job, JobState.QUEUED, actor=actor, error=error)
        job.available_at = utcnow() + retry_delay * job.attempts
        session.flush()
        return job
    return transition(session, job, JobState.FAILED, actor=actor, error=error)


def requeue(session: Session, job: Job, *, actor: str) -> Job:
    """Operator retry: a failed or skipped job goes back to the queue with fresh attempts.

    Why fresh attempts: ``max_attempts`` protects the node from an image that kills its
    worker; an operator who retries has decided to try again (after fixing a rule, a
    model or the disk), so the job gets the full allowance. ``finished_at`` is cleared so
    throughput figures count the job once more only when it finishes again. Raises
    :class:`InvalidTransition` for any other state (done, or still in the queue).
    """
    if job.state not in RETRYABLE_STATES:
        allowed = " or ".join(sorted(state.value for state in RETRYABLE_STATES))
        raise InvalidTransition(
            f"job {job.id} is {job.state.value}; only {allowed} jobs can be retried"
        )
    transition(session, job, JobState.QUEUED, actor=actor)
    job.attempts = 0
    job.available_at = utcnow()
    job.finished_at = None
    session.flush()
    return job


def requeue_failed(session: Session, *, actor: str) -> list[int]:
    """Re-queue every failed job (oldest first); returns their ids."""
    query = select(Job).where(Job.state == JobState.FAILED).order_by(Job.id).with_for_update()
    return [requeue(session, job, actor=actor).id for job in list(session.scalars(query))]


def counts_by_state(session: Session) -> dict[str, int]:
    """Number of jobs in every state (all states present, zeros included)."""
    counts = {state.value: 0 for state in JobState}
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
    for state, count in rows:
        counts[JobState(state).value] = count
    return counts
