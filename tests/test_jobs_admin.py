"""Operator retries of jobs (``storage.queue.requeue``) on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import session_scope
from storage.models import AuditEvent, Job, JobState
from storage.queue import (
    InvalidTransition,
    claim_next,
    fail,
    requeue,
    requeue_failed,
    transition,
)
from storage.records import record_received
from tests.test_storage import received


def _failed_job(sessions: sessionmaker[Session], uid: str) -> int:
    record_received(sessions, received(uid=uid, sha=uid.replace(".", "").rjust(64, "0")), actor="t")
    with session_scope(sessions) as s:
        job = claim_next(s, "w")
        assert job is not None
        job.attempts = job.max_attempts
        fail(s, job, "decoder crashed", actor="w")
        assert job.state is JobState.FAILED
        return job.id


def test_requeue_gives_a_failed_job_fresh_attempts_and_audits_it(
    sessions: sessionmaker[Session],
) -> None:
    job_id = _failed_job(sessions, "1.2.77.1")
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        requeue(s, job, actor="cli:operator")
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.finished_at) == (JobState.QUEUED, 0, None)
        events = s.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id)).all()
        assert events[-1].kind == "job.queued" and events[-1].actor == "cli:operator"
        assert events[-1].details == {"from": "failed", "to": "queued"}
        again = claim_next(s, "w2")
        assert again is not None and again.id == job_id


def test_requeue_refuses_jobs_that_are_done_or_queued(sessions: sessionmaker[Session]) -> None:
    record_received(sessions, received(), actor="t")
    with session_scope(sessions) as s:
        job = s.scalars(select(Job)).one()
        with pytest.raises(InvalidTransition, match="only failed or skipped"):
            requeue(s, job, actor="cli")
        transition(s, job, JobState.SKIPPED, actor="t")
        requeue(s, job, actor="cli")  # skipped: e.g. retried after a rule change
        assert job.state is JobState.QUEUED


def test_requeue_failed_takes_every_failed_job(sessions: sessionmaker[Session]) -> None:
    ids = [_failed_job(sessions, f"1.2.78.{i}") for i in range(3)]
    with session_scope(sessions) as s:
        assert requeue_failed(s, actor="cli") == ids
    with session_scope(sessions) as s:
        assert requeue_failed(s, actor="cli") == []
