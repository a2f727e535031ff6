"""Operator retries of jobs (``storage.queue.requeue``) on both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
from tests.support import run
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


# -- the command line -----------------------------------------------------------------------


def _cli(database_url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_NODE_DATABASE_URL": database_url, "DICOM_NODE_HOME": str(home)}
    return run([sys.executable, "-m", "dicom_node", "jobs", *args], env=env, cwd=home)


def test_jobs_list_show_and_retry_from_the_command_line(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    failed_id = _failed_job(sessions, "1.2.79.1")
    record_received(sessions, received(uid="1.2.79.2", sha="b" * 64), actor="t")

    listed = _cli(database_url, tmp_path, "list", "--state", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["state"], row["last_error"]) == (failed_id, "failed", "decoder crashed")
    everything = json.loads(_cli(database_url, tmp_path, "list", "--json").stdout)
    assert [r["state"] for r in everything] == ["queued", "failed"]  # newest first

    shown = _cli(database_url, tmp_path, "show", str(failed_id), "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["instance"]["sop_instance_uid"] == "1.2.79.1"
    assert not [key for key in document["instance"] if key.lower().startswith("patient")]
    kinds = [event["kind"] for event in document["audit"]]
    assert "instance.stored" in kinds and kinds[-2:] == ["job.running", "job.failed"]

    retried = _cli(database_url, tmp_path, "retry", str(failed_id), "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout) == {"requeued": [failed_id], "refused": {}}
    with session_scope(sessions) as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.job_id == failed_id)).all()
        assert events[-1].kind == "job.queued" and events[-1].actor.startswith("cli:")

    again = _cli(database_url, tmp_path, "retry", str(failed_id))
    assert again.returncode == 1
    assert f"job {failed_id} is queued; only failed or skipped jobs can be retried" in again.stderr
    missing = _cli(database_url, tmp_path, "show", "424242")
    assert missing.returncode == 1 and "no job 424242" in missing.stderr


def test_jobs_retry_failed_requeues_them_all(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    ids = [_failed_job(sessions, f"1.2.80.{i}") for i in range(2)]
    retried = _cli(database_url, tmp_path, "retry", "--failed", "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["requeued"] == ids
    assert _cli(database_url, tmp_path, "retry").returncode == 2  # neither ids nor --failed
