"""Spool retention on both backends: only delivered *and* expired work leaves the spool."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.receive import StoreService
from storage.db import session_scope
from storage.models import Instance, Job, JobState, Result, Send, SendState, utcnow
from storage.outbox import mark_sent
from storage.retention import purge
from storage.spool import Spool
from tests.pipeline_support import (
    FakeAnalyzer,
    destination_toml,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)

CHEST = "siim-cr-jpegbaseline.dcm"
CHEST_2 = "nih-00000001_000-dx-sc.dcm"
HIP = "rg2-hip-cr-jpegextended.dcm"
LATER = timedelta(days=8)
KEEP = timedelta(days=7)


@pytest.fixture
def analysed(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
) -> dict[str, int]:
    """Three images received and analysed: two chests (with sends), one hip (skipped)."""
    settings = settings_for(tmp_path, database_url, destination_toml("pacs", 11104))
    store = StoreService(spool, sessions, min_free_bytes=0)
    ids = {name: receive_file(store, data_dir / "dicom" / name) for name in (CHEST, CHEST_2, HIP)}
    run_queue(make_pipeline(settings, sessions, spool, FakeAnalyzer()), sessions)
    return ids


def deliver(sessions: sessionmaker[Session], instance_id: int) -> None:
    with session_scope(sessions) as s:
        for send in s.scalars(select(Send).where(Send.instance_id == instance_id)):
            mark_sent(s, send, actor="test")


def files_of(sessions: sessionmaker[Session], spool: Spool, instance_id: int) -> list[Path]:
    with session_scope(sessions) as s:
        instance = s.get(Instance, instance_id)
        assert instance is not None
        paths = [spool.path_of(instance.spool_path)]
        for result in s.scalars(select(Result).where(Result.instance_id == instance_id)):
            paths += [spool.path_of(p) for p in (result.sr_path, result.sc_path) if p]
        return paths


def test_delivered_and_expired_is_removed_the_rest_is_kept(
    analysed: dict[str, int], sessions: sessionmaker[Session], spool: Spool
) -> None:
    deliver(sessions, analysed[CHEST])  # CHEST_2's sends stay pending
    files = {name: files_of(sessions, spool, i) for name, i in analysed.items()}
    assert len(files[CHEST]) == 3 and all(p.exists() for p in files[CHEST])

    assert purge(sessions, spool, keep_for=KEEP).instances == 0  # not yet expired
    report = purge(sessions, spool, keep_for=KEEP, now=utcnow() + LATER)
    assert (report.instances, report.files) == (2, 4)  # the chest (3 files), the hip (1)
    assert not any(p.exists() for p in files[CHEST] + files[HIP])
    assert all(p.exists() for p in files[CHEST_2])  # undelivered: kept
    with session_scope(sessions) as s:
        purged = {i.id: i.purged_at is not None for i in s.scalars(select(Instance))}
    assert purged == {analysed[CHEST]: True, analysed[CHEST_2]: False, analysed[HIP]: True}
    assert purge(sessions, spool, keep_for=KEEP, now=utcnow() + LATER).instances == 0


def test_zero_retention_removes_at_once(
    analysed: dict[str, int], sessions: sessionmaker[Session], spool: Spool
) -> None:
    deliver(sessions, analysed[CHEST])
    assert purge(sessions, spool, keep_for=timedelta(0)).instances == 2


@pytest.mark.parametrize("state", [SendState.DEAD, SendState.SENDING])
def test_undelivered_sends_keep_their_files(
    analysed: dict[str, int], sessions: sessionmaker[Session], spool: Spool, state: SendState
) -> None:
    deliver(sessions, analysed[CHEST])
    with session_scope(sessions) as s:
        s.scalars(select(Send).where(Send.instance_id == analysed[CHEST])).first().state = state  # type: ignore[union-attr]
    purge(sessions, spool, keep_for=KEEP, now=utcnow() + LATER)
    assert all(p.exists() for p in files_of(sessions, spool, analysed[CHEST]))


def test_failed_and_unfinished_jobs_keep_their_files(
    analysed: dict[str, int], sessions: sessionmaker[Session], spool: Spool
) -> None:
    with session_scope(sessions) as s:
        s.scalars(select(Job).where(Job.instance_id == analysed[HIP])).one().state = JobState.FAILED
    deliver(sessions, analysed[CHEST])
    with session_scope(sessions) as s:  # a re-analysis is queued for the delivered chest
        from storage.queue import enqueue

        enqueue(s, analysed[CHEST], actor="test")
    assert purge(sessions, spool, keep_for=KEEP, now=utcnow() + LATER).instances == 0
    assert all(p.exists() for p in files_of(sessions, spool, analysed[HIP]))
