"""Storage on both backends: migrations, records and de-duplication, queue, audit, spool."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from storage import heartbeat
from storage.db import current_revision, head_revision, make_engine, session_scope, upgrade
from storage.metrics import instance_figures
from storage.models import AuditEvent, Base, Instance, Job, JobState, Series, Study, utcnow
from storage.queue import (
    InvalidTransition,
    claim_next,
    counts_by_state,
    create_job,
    enqueue,
    fail,
    transition,
)
from storage.records import (
    Disposition,
    ReceivedInstance,
    count_instances,
    record_received,
)
from storage.spool import Spool


def received(uid: str = "1.2.3.4.5", sha: str = "a" * 64, **changes: object) -> ReceivedInstance:
    base = ReceivedInstance(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        sha256=sha,
        size_bytes=1234,
        spool_path=f"objects/{sha[:2]}/{sha}.dcm",
        calling_ae="PACS",
        called_ae="CXR_AI",
        peer_address="127.0.0.1",
        peer_port=4242,
        received_at=utcnow(),
        modality="CR",
        body_part_examined="CHEST",
        view_position="PA",
        rows=2048,
        columns=2500,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# -- migrations -----------------------------------------------------------------------


def test_migrations_reach_head_and_are_idempotent(engine: Engine) -> None:
    assert current_revision(engine) == head_revision() == "0008"
    upgrade(engine)  # second run is a no-op
    assert current_revision(engine) == head_revision()


def test_models_match_migrations(engine: Engine) -> None:
    """Autogenerate finds nothing to do: the models and the revision agree."""
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []


def test_concurrent_upgrades_do_not_collide(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(3)]
    errors: list[BaseException] = []

    def migrate(e: Engine) -> None:
        try:
            upgrade(e)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert current_revision(engines[0]) == head_revision()
    for e in engines:
        e.dispose()


def test_cli_db_upgrade(database_url: str, tmp_path: Path) -> None:
    from tests.support import run

    env = {**os.environ, "DICOM_NODE_DATABASE_URL": database_url, "DICOM_NODE_HOME": str(tmp_path)}
    import sys

    result = run([sys.executable, "-m", "dicom_node", "db", "upgrade"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    engine = make_engine(database_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


# -- records and de-duplication --------------------------------------------------------


def test_record_creates_study_series_instance_job_and_audit(
    sessions: sessionmaker[Session],
) -> None:
    result = record_received(sessions, received(), actor="test")
    assert result.disposition is Disposition.STORED and result.version == 1
    with session_scope(sessions) as s:
        instance = s.get(Instance, result.instance_id)
        assert instance is not None
        assert instance.series.study.study_instance_uid == "1.2.3"
        assert instance.series.modality == "CR" and instance.view_position == "PA"
        assert instance.received_at.tzinfo is not None
        job = s.scalars(select(Job).where(Job.instance_id == instance.id)).one()
        assert job.state is JobState.QUEUED and job.queued_at is not None
        kinds = s.scalars(select(AuditEvent.kind).order_by(AuditEvent.id)).all()
        assert kinds == ["job.queued", "instance.stored"]


def test_identical_resend_is_a_duplicate(sessions: sessionmaker[Session]) -> None:
    first = record_received(sessions, received(), actor="test")
    again = record_received(sessions, received(calling_ae="OTHER"), actor="test")
    assert again.disposition is Disposition.DUPLICATE
    assert again.instance_id == first.instance_id and again.job_id is None
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        duplicate = s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "instance.duplicate")
        ).one()
        assert duplicate.calling_ae == "OTHER" and duplicate.instance_id == first.instance_id


def test_changed_content_becomes_a_new_version(sessions: sessionmaker[Session]) -> None:
    record_received(sessions, received(sha="a" * 64), actor="test")
    second = record_received(sessions, received(sha="b" * 64), actor="test")
    third = record_received(sessions, received(sha="c" * 64), actor="test")
    back = record_received(sessions, received(sha="a" * 64), actor="test")
    assert (second.disposition, second.version) == (Disposition.NEW_VERSION, 2)
    assert third.version == 3 and third.previous_versions == 2
    assert back.disposition is Disposition.DUPLICATE and back.version == 1
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert s.scalar(select(func.count()).select_from(Series)) == 1


def test_concurrent_first_arrivals_of_one_study(sessions: sessionmaker[Session]) -> None:
    """Several associations delivering one study at once must not collide on it."""
    errors: list[BaseException] = []

    def deliver(i: int) -> None:
        try:
            record_received(sessions, received(uid=f"1.2.3.4.{i}", sha=f"{i:064x}"), actor="t")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert s.scalar(select(func.count()).select_from(Instance)) == 8
        assert count_instances(s) == 8
        assert instance_figures(s, utcnow() - timedelta(hours=1)).recent == 8
        assert instance_figures(s, utcnow() + timedelta(minutes=1)).recent == 0


def test_concurrent_identical_resends_store_once(sessions: sessionmaker[Session]) -> None:
    results = []
    lock = threading.Lock()

    def deliver() -> None:
        result = record_received(sessions, received(), actor="t")
        with lock:
            results.append(result.disposition)

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == sorted([Disposition.STORED] + [Disposition.DUPLICATE] * 5)


# -- audit trail ------------------------------------------------------------------------


def test_audit_events_are_append_only(sessions: sessionmaker[Session], engine: Engine) -> None:
    record_received(sessions, received(), actor="test")
    for statement in ("UPDATE audit_events SET kind = 'forged'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar() == 2


# -- job state machine --------------------------------------------------------------------


def _instance_id(sessions: sessionmaker[Session]) -> int:
    return record_received(sessions, received(), actor="test").instance_id


def test_job_life_cycle(sessions: sessionmaker[Session]) -> None:
    instance_id = _instance_id(sessions)
    with session_scope(sessions) as s:
        job = claim_next(s, "worker-1")
        assert job is not None and job.instance_id == instance_id
        assert (job.state, job.attempts, job.worker) == (JobState.RUNNING, 1, "worker-1")
        assert claim_next(s, "worker-2") is None
        transition(s, job, JobState.DONE, actor="worker-1")
        assert job.finished_at is not None
        with pytest.raises(InvalidTransition):
            transition(s, job, JobState.RUNNING, actor="worker-1")
    with session_scope(sessions) as s:
        assert counts_by_state(s) == {
            "received": 0,
            "queued": 0,
            "running": 0,
            "done": 1,
            "failed": 0,
            "skipped": 0,
        }


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ([JobState.QUEUED, JobState.SKIPPED], True),
        ([JobState.SKIPPED], True),
        ([JobState.RUNNING], False),
        ([JobState.DONE], False),
        ([JobState.QUEUED, JobState.DONE], False),
        ([JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.QUEUED], True),
    ],
)
def test_transitions(sessions: sessionmaker[Session], path: list[JobState], allowed: bool) -> None:
    instance_id = _instance_id(sessions)
    with session_scope(sessions) as s:
        job = create_job(s, instance_id, actor="test")
        if allowed:
            for state in path:
                transition(s, job, state, actor="test")
            assert job.state is path[-1]
        else:
            with pytest.raises(InvalidTransition):
                for state in path:
                    transition(s, job, state, actor="test")


def test_failures_retry_then_fail(sessions: sessionmaker[Session]) -> None:
    _instance_id(sessions)
    with session_scope(sessions) as s:
        job = claim_next(s, "w")
        assert job is not None
        fail(s, job, "model crashed", actor="w", retry_delay=timedelta(0))
        assert job.state is JobState.QUEUED and job.last_error == "model crashed"
        for _ in range(2):
            again = claim_next(s, "w")
            assert again is not None and again.id == job.id
            fail(s, again, "still crashing", actor="w", retry_delay=timedelta(0))
        assert job.state is JobState.FAILED and job.attempts == 3


def test_retry_backoff_hides_job_until_due(sessions: sessionmaker[Session]) -> None:
    _instance_id(sessions)
    with session_scope(sessions) as s:
        job = claim_next(s, "w")
        assert job is not None
        fail(s, job, "transient", actor="w", retry_delay=timedelta(minutes=5))
        assert claim_next(s, "w") is None


def test_claims_are_exclusive_under_concurrency(sessions: sessionmaker[Session]) -> None:
    for i in range(10):
        record_received(sessions, received(uid=f"1.2.9.{i}", sha=f"{i:064x}"), actor="t")
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            with session_scope(sessions) as s:
                job = claim_next(s, name)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 10


def test_priority_orders_claims(sessions: sessionmaker[Session]) -> None:
    instance_id = _instance_id(sessions)
    with session_scope(sessions) as s:
        urgent = enqueue(s, instance_id, actor="t", priority=10)
    with session_scope(sessions) as s:
        job = claim_next(s, "w")
        assert job is not None and job.id == urgent.id


# -- heartbeat ------------------------------------------------------------------------------


def test_heartbeat_life_cycle(sessions: sessionmaker[Session]) -> None:
    me = heartbeat.NodeIdentity("host", 123, "CXR_AI", "0.0.0.0", 11112, "1.0")
    with session_scope(sessions) as s:
        heartbeat.node_started(s, me)
    with session_scope(sessions) as s:
        row = heartbeat.find_heartbeat(s, "CXR_AI", 11112, "host")
        assert row is not None and heartbeat.is_alive(row, max_age=timedelta(seconds=30))
        assert not heartbeat.is_alive(
            row, max_age=timedelta(seconds=30), now=utcnow() + timedelta(minutes=5)
        )
        heartbeat.node_stopped(s, me.node_id)
    with session_scope(sessions) as s:
        row = heartbeat.find_heartbeat(s, "CXR_AI", 11112)
        assert row is not None and not heartbeat.is_alive(row, max_age=timedelta(seconds=30))


def test_worker_processes_beat_one_row_each_and_are_not_the_listener(
    sessions: sessionmaker[Session],
) -> None:
    listener = heartbeat.NodeIdentity("host", 10, "CXR_AI", "0.0.0.0", 11112, "1.0")
    workers = [
        heartbeat.NodeIdentity("host", pid, "CXR_AI", "", 0, "1.0", role=heartbeat.WORKER)
        for pid in (11, 12)
    ]
    with session_scope(sessions) as s:
        for identity in (listener, *workers):
            heartbeat.node_started(s, identity)
    with session_scope(sessions) as s:
        rows = heartbeat.list_heartbeats(s, heartbeat.WORKER)
        assert sorted(row.pid for row in rows) == [11, 12]
        found = heartbeat.find_heartbeat(s, "CXR_AI", 11112, "host")
        assert found is not None and (found.role, found.pid) == ("listener", 10)
        assert heartbeat.find_heartbeat(s, "CXR_AI", 0, "host") is None


# -- spool ------------------------------------------------------------------------------------


def test_spool_store_is_content_addressed(spool: Spool) -> None:
    stored = spool.store((b"head", b"-", b"body"))
    digest = hashlib.sha256(b"head-body").hexdigest()
    assert stored.sha256 == digest and stored.size == 9
    assert stored.relpath == f"objects/{digest[:2]}/{digest}.dcm"
    assert stored.path.read_bytes() == b"head-body" and not stored.already_present
    again = spool.store((b"head-body",))
    assert again.already_present and again.path == stored.path
    assert list(spool.tmp_dir.iterdir()) == []


def test_spool_prepare_removes_partial_writes(spool: Spool) -> None:
    (spool.tmp_dir / "abc.part").write_bytes(b"half")
    assert spool.prepare() == 1
    assert list(spool.tmp_dir.iterdir()) == []


def test_spool_quarantine_keeps_bytes_and_reason(spool: Spool) -> None:
    kept = spool.quarantine((b"garbage",), {"reason": "truncated"})
    assert kept.read_bytes() == b"garbage"
    assert '"truncated"' in kept.with_suffix(".json").read_text()


def test_spool_write_failure_leaves_no_temp_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError) as caught:
        spool.store((b"x" * 100,))
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert list(spool.tmp_dir.iterdir()) == []
    assert list(spool.objects_dir.rglob("*.dcm")) == []


def test_claim_batch_takes_priority_then_arrival(sessions: sessionmaker[Session]) -> None:
    from storage.queue import claim_batch

    ids = [
        record_received(sessions, received(uid=f"1.2.8.{i}", sha=f"{i:064x}"), actor="t").job_id
        for i in range(4)
    ]
    with session_scope(sessions) as s:
        urgent = enqueue(s, _instance_id_of(s, "1.2.8.3"), actor="t", priority=5).id
    with session_scope(sessions) as s:
        batch = [job.id for job in claim_batch(s, "w", limit=3)]
    assert batch == [urgent, ids[0], ids[1]]


def _instance_id_of(session: Session, uid: str) -> int:
    found = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == uid))
    assert found is not None
    return found


def test_running_job_of_an_expired_lease_is_requeued_then_failed(
    sessions: sessionmaker[Session],
) -> None:
    from storage.queue import claim_batch

    _instance_id(sessions)
    for attempt in range(1, 4):
        with session_scope(sessions) as s:
            (job,) = claim_batch(s, "dead-worker", limit=1, lease=timedelta(seconds=-1))
            assert job.attempts == attempt
    with session_scope(sessions) as s:
        assert claim_batch(s, "w", limit=1) == []  # the third expiry gives up on it
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.FAILED and "gave up after 3 attempts" in (job.last_error or "")


def test_migrations_downgrade_and_upgrade_again(engine: Engine) -> None:
    from storage.db import alembic_config

    with engine.begin() as connection:
        from alembic import command

        command.downgrade(alembic_config(connection), "0001")
    assert current_revision(engine) == "0001"
    upgrade(engine)
    assert current_revision(engine) == head_revision()


def test_spool_outputs_are_replaced_atomically_and_removable(spool: Spool) -> None:
    relpath = spool.store_output("sr", "2.25.123", [b"first"])
    assert relpath == "outputs/sr/2.25.123.dcm"
    assert spool.store_output("sr", "2.25.123", [b"second"]) == relpath
    assert spool.path_of(relpath).read_bytes() == b"second"
    assert list(spool.tmp_dir.iterdir()) == []
    assert spool.remove(relpath) is True and spool.remove(relpath) is False
    for bad in ("../x", "a/b"):
        with pytest.raises(ValueError):
            spool.store_output("sr", bad, [b""])
    with pytest.raises(ValueError):
        spool.remove("../../etc/passwd")
