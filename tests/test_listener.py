"""The listener in-process, driven by real peers (pynetdicom SCU, dcmtk), on both backends.

These tests run the real pynetdicom server with the real store pipeline and database;
only the process boundary is skipped, which keeps them quick. The end-to-end tests in
``tests/e2e`` repeat the important paths against ``dicom-node serve``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeSettings
from dicom_node.listener import Allowlist, Listener
from dicom_node.receive import StoreService, StoreStatus
from storage.db import session_scope
from storage.models import AuditEvent, Instance, Job, JobState
from storage.spool import Spool
from tests.support import (
    NODE_AE,
    dataset_bytes,
    echoscu,
    free_port,
    mounted_tmpfs,
    send_raw,
    split_part10,
    storescu,
)


@dataclass
class RunningListener:
    listener: Listener
    store: StoreService
    spool: Spool
    sessions: sessionmaker[Session]

    @property
    def port(self) -> int:
        return self.listener.port


def start_listener(
    spool: Spool, sessions: sessionmaker[Session], *, min_free_bytes: int = 0, **node: object
) -> RunningListener:
    settings = NodeSettings.model_validate(
        {"host": "127.0.0.1", "port": free_port(), "ae_title": NODE_AE, **node}
    )
    store = StoreService(spool, sessions, min_free_bytes=min_free_bytes)
    listener = Listener(settings, store)
    listener.start()
    return RunningListener(listener, store, spool, sessions)


@pytest.fixture
def scp(spool: Spool, sessions: sessionmaker[Session]) -> Iterator[RunningListener]:
    running = start_listener(spool, sessions)
    yield running
    running.listener.stop(grace_seconds=5)


def count(sessions: sessionmaker[Session], model: type[Instance] | type[Job]) -> int:
    with session_scope(sessions) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def write_part10(
    path: Path, dataset: pydicom.Dataset, *, meta_sop_class: str | None = None
) -> Path:
    """Write ``dataset`` as a Part 10 file (optionally lying about its SOP class)."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    dataset.file_meta = create_file_meta(
        sop_class_uid=dataset.SOPClassUID,
        sop_instance_uid=dataset.SOPInstanceUID,
        transfer_syntax=ExplicitVRLittleEndian,
    )
    dataset.save_as(path, enforce_file_format=True)
    if meta_sop_class:
        meta = create_file_meta(
            sop_class_uid=UID(meta_sop_class),
            sop_instance_uid=dataset.SOPInstanceUID,
            transfer_syntax=ExplicitVRLittleEndian,
        )
        body = split_part10(path.read_bytes())[1]
        path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return path


def small_cr(tmp_path: Path, **changes: object) -> pydicom.Dataset:
    source = Path(str(pydicom.data.get_testdata_file("RG1_UNCR.dcm")))
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


# -- success path ---------------------------------------------------------------------------


def test_store_writes_exact_bytes_row_and_job(scp: RunningListener, rg1_uncr: Path) -> None:
    assert send_raw(scp.port, [rg1_uncr]) == [0x0000]
    with session_scope(scp.sessions) as s:
        instance = s.scalars(select(Instance)).one()
        stored = scp.spool.path_of(instance.spool_path).read_bytes()
        assert split_part10(stored)[1] == dataset_bytes(rg1_uncr)
        assert instance.size_bytes == len(stored)
        assert instance.calling_ae == "RAWSCU" and instance.called_ae == NODE_AE
        assert instance.peer_address == "127.0.0.1"
        assert instance.transfer_syntax_uid == ExplicitVRLittleEndian
        assert s.scalars(select(Job.state)).one() is JobState.QUEUED
    meta = pydicom.dcmread(scp.spool.path_of(instance.spool_path), stop_before_pixels=True)
    assert meta.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_echo(scp: RunningListener) -> None:
    result = echoscu(scp.port)
    assert result.returncode == 0, result.stderr


def test_parallel_associations(scp: RunningListener, image_files: list[Path]) -> None:
    statuses: list[int | None] = []
    lock = threading.Lock()

    def send(path: Path) -> None:
        result = send_raw(scp.port, [path])
        with lock:
            statuses.extend(result)

    threads = [threading.Thread(target=send, args=(p,)) for p in image_files[:6]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert statuses == [0] * len(threads)
    assert count(scp.sessions, Instance) == len(threads)


# -- refusals -------------------------------------------------------------------------------


def quarantined(spool: Spool) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(spool.quarantine_dir.glob("*.json"))]


def test_truncated_data_set_is_refused_and_quarantined(
    scp: RunningListener, rg1_uncr: Path, tmp_path: Path
) -> None:
    raw = rg1_uncr.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    assert send_raw(scp.port, [truncated]) == [StoreStatus.UNDECODABLE_DATASET]
    notes = quarantined(scp.spool)
    assert len(notes) == 1 and notes[0]["status"] == "0xC210"
    kept = next(scp.spool.quarantine_dir.glob("*.dcm"))
    assert split_part10(kept.read_bytes())[1] == split_part10(truncated.read_bytes())[1]
    assert count(scp.sessions, Instance) == 0
    assert send_raw(scp.port, [rg1_uncr]) == [0x0000], "listener must keep serving"


def test_failure_carries_error_comment(
    scp: RunningListener, rg1_uncr: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(rg1_uncr.read_bytes()[:5000])
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", [ExplicitVRLittleEndian])
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
        status = assoc.send_c_store(truncated)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == 0xC210
    assert "past the end" in status.ErrorComment or "truncated" in status.ErrorComment


def test_sop_class_mismatch_is_refused(scp: RunningListener, tmp_path: Path) -> None:
    ds = small_cr(tmp_path)
    path = write_part10(tmp_path / "liar.dcm", ds, meta_sop_class="1.2.840.10008.5.1.4.1.1.1.1")
    assert send_raw(scp.port, [path]) == [StoreStatus.SOP_CLASS_MISMATCH]
    assert count(scp.sessions, Instance) == 0


def test_missing_study_uid_is_refused(scp: RunningListener, tmp_path: Path) -> None:
    path = write_part10(tmp_path / "nostudy.dcm", small_cr(tmp_path, StudyInstanceUID=None))
    assert send_raw(scp.port, [path]) == [StoreStatus.INVALID_IDENTIFIERS]
    assert quarantined(scp.spool)[0]["reason"] == "Study Instance UID missing"


def test_unsupported_sop_class_is_refused_at_negotiation(scp: RunningListener) -> None:
    ae = AE(ae_title="CTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
    try:
        assert assoc.is_established
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert rejected == {"1.2.840.10008.5.1.4.1.1.2"}
        assert accepted == {"1.2.840.10008.5.1.4.1.1.1"}
    finally:
        assoc.release()


def test_refuses_when_below_free_space_threshold(
    spool: Spool, sessions: sessionmaker[Session], rg1_uncr: Path
) -> None:
    running = start_listener(spool, sessions, min_free_bytes=spool.free_bytes() + 1)
    try:
        assert send_raw(running.port, [rg1_uncr]) == [StoreStatus.OUT_OF_RESOURCES]
        assert list(spool.objects_dir.rglob("*.dcm")) == []
    finally:
        running.listener.stop(grace_seconds=5)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB file system, so the disk really fills up (needs root)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "3m") as mount_point:
        yield mount_point


def test_disk_full_answers_a700_and_keeps_serving(
    tiny_tmpfs: Path, sessions: sessionmaker[Session], rg1_uncr: Path, image_files: list[Path]
) -> None:
    spool = Spool(tiny_tmpfs / "spool")
    spool.prepare()
    running = start_listener(spool, sessions, min_free_bytes=0)
    try:
        assert send_raw(running.port, [rg1_uncr]) == [StoreStatus.OUT_OF_RESOURCES]  # 7 MB
        assert list(spool.tmp_dir.iterdir()) == [], "partial file must be cleaned up"
        small = next(p for p in image_files if p.stat().st_size < 100_000)
        assert send_raw(running.port, [small]) == [0x0000]
        assert echoscu(running.port).returncode == 0
        assert count(sessions, Instance) == 1
    finally:
        running.listener.stop(grace_seconds=5)


def test_write_error_is_refused_not_fatal(
    scp: RunningListener, rg1_uncr: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any spool failure (here ENOSPC injected at fsync) is a failure status, not a crash."""
    import errno

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert send_raw(scp.port, [rg1_uncr]) == [StoreStatus.OUT_OF_RESOURCES]
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    assert send_raw(scp.port, [rg1_uncr]) == [StoreStatus.SPOOL_WRITE_FAILED]
    monkeypatch.undo()
    assert send_raw(scp.port, [rg1_uncr]) == [0x0000]


def test_database_failure_answers_c211_and_keeps_serving(
    scp: RunningListener, engine: Engine, database_url: str, rg1_uncr: Path, image_files: list[Path]
) -> None:
    assert send_raw(scp.port, [image_files[0]]) == [0x0000]
    _break_database(engine, database_url)
    assert send_raw(scp.port, [rg1_uncr]) == [StoreStatus.DATABASE_UNAVAILABLE]
    assert list(scp.spool.quarantine_dir.iterdir()) == [], "good data is not quarantined"
    assert echoscu(scp.port).returncode == 0, "listener must survive a database outage"


def _break_database(engine: Engine, database_url: str) -> None:
    """PostgreSQL: the database disappears. SQLite (embedded): its schema is broken."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy import create_engine, make_url

        url = make_url(database_url)
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
        admin.dispose()
    else:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE jobs"))


# -- allowlists -------------------------------------------------------------------------------


def test_allowlist_rules() -> None:
    anyone = Allowlist([], [])
    assert anyone.refusal("WHOEVER", "192.0.2.1") is None
    strict = Allowlist(["PACS", "CR1"], ["10.0.0.0/8", "127.0.0.1"])
    assert strict.refusal("PACS", "10.1.2.3") is None
    assert strict.refusal("CR1 ", "127.0.0.1") is None
    assert strict.refusal("OTHER", "10.1.2.3") == "calling AE title not allowed"
    assert strict.refusal("PACS", "192.0.2.1") == "peer host not allowed"
    assert strict.refusal("PACS", "::ffff:10.0.0.5") is None
    assert strict.refusal("PACS", "not-an-ip") == "peer host not allowed"


def test_unknown_calling_ae_is_rejected(
    spool: Spool, sessions: sessionmaker[Session], image_files: list[Path]
) -> None:
    running = start_listener(spool, sessions, allowed_calling_aets=["PACS"])
    try:
        rejected = echoscu(running.port, calling_ae="INTRUDER")
        assert rejected.returncode != 0
        assert "Association Rejected" in rejected.stdout + rejected.stderr
        assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        assert storescu(running.port, image_files[0], calling_ae="INTRUDER").returncode != 0
        assert echoscu(running.port, calling_ae="PACS").returncode == 0
        assert storescu(running.port, image_files[0], calling_ae="PACS").returncode == 0
        with session_scope(sessions) as s:
            events = s.scalars(
                select(AuditEvent).where(AuditEvent.kind == "association.rejected")
            ).all()
            assert {e.calling_ae for e in events} == {"INTRUDER"} and len(events) == 2
        assert count(sessions, Instance) == 1
    finally:
        running.listener.stop(grace_seconds=5)


def test_unknown_host_is_rejected(spool: Spool, sessions: sessionmaker[Session]) -> None:
    running = start_listener(spool, sessions, allowed_hosts=["192.0.2.0/24"])
    try:
        rejected = echoscu(running.port)
        assert rejected.returncode != 0
        assert "Association Rejected" in rejected.stdout + rejected.stderr
    finally:
        running.listener.stop(grace_seconds=5)


def test_called_ae_can_be_required(spool: Spool, sessions: sessionmaker[Session]) -> None:
    running = start_listener(spool, sessions, require_called_ae=True)
    try:
        wrong = echoscu(running.port, called_ae="ANY-SCP")
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
        assert echoscu(running.port, called_ae=NODE_AE).returncode == 0
    finally:
        running.listener.stop(grace_seconds=5)
