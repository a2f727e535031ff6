"""The outbox on both backends: idempotent enqueue, leases, backoff with jitter, dead letters.

Plus the sender loop against real pynetdicom peers: delivery in one association per
destination, a closed port (retry with backoff), a permanent refusal (dead at once), and
the ``sends`` commands an operator uses to look at and re-queue dead letters.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pynetdicom.events import Event
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.sender import Sender
from dicom_node.wakeup import Wakeup
from storage.db import session_scope
from storage.models import AuditEvent, Send, SendState, utcnow
from storage.outbox import (
    BackoffPolicy,
    OutgoingObject,
    claim_due,
    counts_by_destination,
    enqueue_send,
    mark_sent,
    record_failure,
    recover_orphans,
    retry_dead,
)
from storage.records import record_received
from storage.spool import Spool
from tests.pipeline_support import Node, RecordingSCP, destination_toml, settings_for
from tests.support import free_port, run
from tests.test_storage import received

POLICY = BackoffPolicy(base=10.0, cap=100.0, max_age=3600.0)


def outgoing(instance_id: int, uid: str = "2.25.1", destination: str = "pacs") -> OutgoingObject:
    return OutgoingObject(
        destination=destination,
        kind="sr",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        sop_instance_uid=uid,
        study_instance_uid="1.2.3",
        file_path=f"outputs/sr/{uid}.dcm",
        instance_id=instance_id,
    )


@pytest.fixture
def instance_id(sessions: sessionmaker[Session]) -> int:
    return record_received(sessions, received(), actor="test").instance_id


def claim(sessions: sessionmaker[Session], lease: float = 60.0, **kw: object) -> list[Send]:
    with session_scope(sessions) as s:
        return claim_due(s, "host:1:sender", limit=10, lease=timedelta(seconds=lease), **kw)  # type: ignore[arg-type]


def only_send(sessions: sessionmaker[Session]) -> Send:
    with session_scope(sessions) as s:
        (send,) = s.scalars(select(Send))
        return send


# -- storage --------------------------------------------------------------------------------


def test_enqueue_is_idempotent_per_destination_and_object(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    with session_scope(sessions) as s:
        first = enqueue_send(s, outgoing(instance_id), actor="t")
        again = enqueue_send(s, outgoing(instance_id), actor="t")
        other = enqueue_send(s, outgoing(instance_id, destination="backup"), actor="t")
    assert first is not None and again is None and other is not None
    with session_scope(sessions) as s:
        assert counts_by_destination(s) == {
            "pacs": {"pending": 1, "sending": 0, "sent": 0, "dead": 0},
            "backup": {"pending": 1, "sending": 0, "sent": 0, "dead": 0},
        }
        kinds = [e.kind for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert kinds.count("send.queued") == 2


def test_claim_is_a_lease(sessions: sessionmaker[Session], instance_id: int) -> None:
    with session_scope(sessions) as s:
        enqueue_send(s, outgoing(instance_id), actor="t")
    (send,) = claim(sessions)
    assert (send.state, send.attempts) == (SendState.SENDING, 1)
    assert claim(sessions) == []  # held by its sender
    later = utcnow() + timedelta(seconds=61)
    (again,) = claim(sessions, now=later)  # the sender died: its lease ran out
    assert (again.id, again.attempts) == (send.id, 2)


def test_claims_are_exclusive_between_concurrent_senders(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    import threading

    with session_scope(sessions) as s:
        for i in range(30):
            enqueue_send(s, outgoing(instance_id, uid=f"2.25.{i}"), actor="t")
    got: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            with session_scope(sessions) as s:
                batch = claim_due(s, name, limit=4, lease=timedelta(minutes=1))
                ids = [send.id for send in batch]
            if not ids:
                return
            with lock:
                got.extend(ids)

    threads = [threading.Thread(target=work, args=(f"h:1:s{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == sorted(set(got)) and len(got) == 30


def test_retryable_failure_backs_off_exponentially_with_full_jitter(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    with session_scope(sessions) as s:
        enqueue_send(s, outgoing(instance_id), actor="t")
    waits = []
    now = utcnow()
    for _ in range(6):
        (send,) = claim(sessions, now=now)
        with session_scope(sessions) as s:
            row = s.get(Send, send.id)
            assert row is not None
            state = record_failure(
                s,
                row,
                "connection refused",
                retryable=True,
                policy=POLICY,
                actor="t",
                now=now,
                rng=lambda low, high: high,
            )
            assert state is SendState.PENDING
            waits.append((row.next_attempt_at - now).total_seconds())
            now = row.next_attempt_at
    assert waits == [10.0, 20.0, 40.0, 80.0, 100.0, 100.0]  # base · 2^(n-1), capped
    assert POLICY.delay(3, rng=lambda low, high: low) == 0.0  # the jitter's lower bound


def test_permanent_failure_is_dead_at_once_and_counted(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    with session_scope(sessions) as s:
        enqueue_send(s, outgoing(instance_id), actor="t")
    (send,) = claim(sessions)
    with session_scope(sessions) as s:
        row = s.get(Send, send.id)
        assert row is not None
        state = record_failure(
            s,
            row,
            "0xA900 error: data set does not match SOP class",
            retryable=False,
            policy=POLICY,
            actor="t",
        )
        assert state is SendState.DEAD
        assert sum(per["dead"] for per in counts_by_destination(s).values()) == 1
    assert "permanent failure" in (only_send(sessions).last_error or "")


def test_retryable_failures_are_dead_after_max_age_never_endless(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    with session_scope(sessions) as s:
        enqueue_send(s, outgoing(instance_id), actor="t")
    now = utcnow()
    attempts = 0
    while True:
        sends = claim(sessions, now=now)
        if not sends:
            break
        attempts += 1
        with session_scope(sessions) as s:
            row = s.get(Send, sends[0].id)
            assert row is not None
            record_failure(s, row, "timeout", retryable=True, policy=POLICY, actor="t", now=now)
            now = max(now, row.next_attempt_at)
        assert attempts < 200
    send = only_send(sessions)
    assert send.state is SendState.DEAD and "older than 3600 s" in (send.last_error or "")
    assert (now - send.first_enqueued_at) >= timedelta(seconds=3600)


def test_dead_sends_are_requeued_with_a_fresh_window(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    with session_scope(sessions) as s:
        enqueue_send(s, outgoing(instance_id), actor="t")
    (send,) = claim(sessions)
    with session_scope(sessions) as s:
        row = s.get(Send, send.id)
        assert row is not None
        record_failure(s, row, "refused", retryable=False, policy=POLICY, actor="t")
    with session_scope(sessions) as s:
        assert retry_dead(s, [send.id, 999], actor="t") == [send.id]
    again = only_send(sessions)
    assert (again.state, again.attempts) == (SendState.PENDING, 0)
    assert again.first_enqueued_at > send.first_enqueued_at
    (claimed,) = claim(sessions)
    with session_scope(sessions) as s:
        row = s.get(Send, claimed.id)
        assert row is not None
        mark_sent(s, row, actor="t")
        assert retry_dead(s, None, actor="t") == []  # only dead ones
    assert only_send(sessions).state is SendState.SENT


def test_sends_of_a_dead_local_sender_are_due_at_once(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    with session_scope(sessions) as s:
        enqueue_send(s, outgoing(instance_id), actor="t")
        claim_due(s, "thishost:4242:sender", limit=5, lease=timedelta(hours=1))
    with session_scope(sessions) as s:
        assert recover_orphans(s, "otherhost", lambda pid: False, actor="t") == 0
        assert recover_orphans(s, "thishost", lambda pid: pid != 4242, actor="t") == 1
    assert len(claim(sessions)) == 1


# -- the sender loop ------------------------------------------------------------------------


@pytest.fixture
def scp() -> Iterator[RecordingSCP]:
    peer = RecordingSCP(free_port()).start()
    try:
        yield peer
    finally:
        peer.stop()


def _produce(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    toml: str,
    data_dir: Path,
    names: tuple[str, ...],
) -> Sender:
    """Receive and analyse images (fake engine), return a sender for the same config."""
    node = Node(tmp_path, database_url, sessions, spool, toml)
    node.analyse(*(data_dir / "dicom" / name for name in names))
    return node.sender


CHESTS = ("siim-cr-jpegbaseline.dcm", "nih-00000001_000-dx-sc.dcm")


def test_sender_delivers_a_batch_in_one_association_per_destination(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    scp: RecordingSCP,
    data_dir: Path,
) -> None:
    sender = _produce(
        tmp_path,
        database_url,
        sessions,
        spool,
        destination_toml("pacs", scp.port),
        data_dir,
        CHESTS,
    )
    assert sender.run_once() == 4
    assert sender.run_once() == 0
    assert scp.associations == 1 and len(scp.uids()) == 4
    with session_scope(sessions) as s:
        sends = list(s.scalars(select(Send)))
        assert {send.state for send in sends} == {SendState.SENT}
        assert sorted(scp.uids()) == sorted(send.sop_instance_uid for send in sends)
        sent_events = [e for e in s.scalars(select(AuditEvent)) if e.kind == "send.sent"]
    assert len(sent_events) == 4


def test_closed_port_backs_off_then_delivers_once_it_listens(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
) -> None:
    port = free_port()
    toml = destination_toml("pacs", port) + "[sender]\nbackoff_base = 0.05\nbackoff_cap = 0.1\n"
    sender = _produce(tmp_path, database_url, sessions, spool, toml, data_dir, CHESTS[:1])
    assert sender.run_once() == 2
    with session_scope(sessions) as s:
        sends = list(s.scalars(select(Send)))
    assert {send.state for send in sends} == {SendState.PENDING}
    assert all("cannot connect" in (send.last_error or "") for send in sends)
    peer = RecordingSCP(port).start()
    try:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(peer.uids()) < 2:
            sender.run_once()
            time.sleep(0.05)
        assert sorted(peer.uids()) == sorted(send.sop_instance_uid for send in sends)
    finally:
        peer.stop()
    with session_scope(sessions) as s:
        assert {send.state for send in s.scalars(select(Send))} == {SendState.SENT}


def test_refusal_is_dead_lettered_and_listed_and_retried_by_the_cli(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
) -> None:
    def refuse(event: Event) -> int:
        return 0xA900  # data set does not match SOP class: permanent

    peer = RecordingSCP(free_port(), status=refuse).start()
    try:
        sender = _produce(
            tmp_path,
            database_url,
            sessions,
            spool,
            destination_toml("pacs", peer.port),
            data_dir,
            CHESTS[:1],
        )
        sender.run_once()
    finally:
        peer.stop()
    env_cli = [sys.executable, "-m", "dicom_node"]
    env = {
        "DICOM_NODE_CONFIG": str(tmp_path / "node.toml"),
        "DICOM_NODE_DATABASE_URL": database_url,
        "DICOM_NODE_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    listed = run([*env_cli, "sends", "list", "--state", "dead", "--json"], env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 2 and all("0xA900" in row["last_error"] for row in rows)
    status = json.loads(run([*env_cli, "status", "--json"], env=env).stdout)
    assert status["dead_letters"] == 2 and status["sends"]["pacs"]["dead"] == 2
    retried = run([*env_cli, "sends", "retry", "--dead", "--json"], env=env)
    assert retried.returncode == 0, retried.stderr
    assert sorted(json.loads(retried.stdout)["requeued"]) == sorted(r["id"] for r in rows)
    with session_scope(sessions) as s:
        assert {send.state for send in s.scalars(select(Send))} == {SendState.PENDING}
    unknown = run([*env_cli, "sends", "retry", "424242", "--json"], env=env)
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["not_dead"] == [424242]


def test_send_to_a_destination_removed_from_the_config_is_dead(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    scp: RecordingSCP,
    data_dir: Path,
) -> None:
    _produce(
        tmp_path,
        database_url,
        sessions,
        spool,
        destination_toml("old", scp.port),
        data_dir,
        CHESTS[:1],
    )
    sender = Sender(settings_for(tmp_path, database_url), sessions, spool, wakeup=Wakeup())
    assert sender.run_once() == 2
    with session_scope(sessions) as s:
        sends = list(s.scalars(select(Send)))
    assert {send.state for send in sends} == {SendState.DEAD}
    assert "not configured" in (sends[0].last_error or "")
