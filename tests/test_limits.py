"""Listener limits, each driven by a real client that must see the specific refusal.

For every limit: the client gets the refusal (A-ASSOCIATE-RJ or a C-STORE failure status,
never Success), the listener keeps serving, nothing of the refused object is left in the
spool (no object, no temporary file, no quarantine), and the refusal is logged without
patient attributes. Limits concern the listener alone, so these tests run on SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import load_settings
from dicom_node.listener import Listener, receive_limits
from dicom_node.receive import StoreService, StoreStatus
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import Instance
from storage.spool import Spool
from tests.support import NODE_AE, echoscu, free_port, send_raw, storescu
from tests.test_listener import count

PHI_VALUES = ("ZZLIMIT^PATIENT", "PID-LIMIT-991")


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def start(spool: Spool, sqlite_sessions: sessionmaker[Session]) -> Iterator[Any]:
    """Start a listener with some ``[node]`` limits; stopped at teardown."""
    listeners: list[Listener] = []

    def _start(**node: Any) -> Listener:
        settings = load_settings(
            node={"host": "127.0.0.1", "port": free_port(), "ae_title": NODE_AE, **node}
        )
        store = StoreService(
            spool, sqlite_sessions, min_free_bytes=0, limits=receive_limits(settings.node)
        )
        listener = Listener(settings.node, store)
        listener.start()
        listeners.append(listener)
        return listener

    yield _start
    for listener in listeners:
        listener.stop(grace_seconds=5)


def assert_spool_clean(spool: Spool) -> None:
    """Nothing accepted, nothing half-written, nothing quarantined."""
    for folder in (spool.objects_dir, spool.tmp_dir, spool.quarantine_dir):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files == [], f"{folder.name}: {files}"


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    found = [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == event]
    for fields in found:
        assert not any(value in str(fields) for value in PHI_VALUES), fields
    return found


def with_phi(source: Path, folder: Path) -> Path:
    """A copy of ``source`` with distinctive patient attributes and a fresh UID."""
    ds = pydicom.dcmread(source)
    ds.PatientName, ds.PatientID = PHI_VALUES
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_associations_beyond_the_limit_are_rejected_transiently(
    start: Any, caplog: pytest.LogCaptureFixture, dcmtk: None
) -> None:
    listener = start(max_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
    assert held.is_established
    try:
        refused = echoscu(listener.port)
        assert refused.returncode != 0
        text = (refused.stdout + refused.stderr).lower()
        assert "rejected transient" in text and "local limit exceeded" in text, text
    finally:
        held.release()
    assert echoscu(listener.port).returncode == 0, "the listener serves again"
    [rejection] = logged(caplog, "association rejected")
    assert rejection["reason"] == "local limit exceeded: 1 associations"


def test_maximum_pdu_size_is_announced_and_honoured(
    start: Any, rg1_uncr: Path, sqlite_sessions: sessionmaker[Session], dcmtk: None
) -> None:
    listener = start(max_pdu_size=16384)
    probe = AE(ae_title="PROBE")
    probe.add_requested_context(Verification)
    assoc = probe.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
    assert assoc.is_established and assoc.acceptor.maximum_length == 16384
    assoc.release()
    result = storescu(listener.port, rg1_uncr, extra=["-v"])
    assert result.returncode == 0, result.stderr
    assert count(sqlite_sessions, Instance) == 1


def test_data_set_over_the_limit_is_refused_with_a700(
    start: Any,
    spool: Spool,
    rg1_uncr: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sqlite_sessions: sessionmaker[Session],
    dcmtk: None,
) -> None:
    listener = start(max_dataset_bytes=1024 * 1024)  # RG1 is about 7 MB
    result = storescu(listener.port, with_phi(rg1_uncr, tmp_path))
    output = result.stdout + result.stderr
    assert "Refused: OutOfResources" in output or "0xa700" in output.lower(), output
    assert count(sqlite_sessions, Instance) == 0
    assert_spool_clean(spool)
    [refusal] = logged(caplog, "refusing C-STORE: over a configured limit")
    assert refusal["status"] == "0xA700" and "> limit 1048576" in refusal["reason"]
    assert echoscu(listener.port).returncode == 0


def test_image_over_the_size_limit_is_refused_with_c214(
    start: Any,
    spool: Spool,
    rg1_uncr: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sqlite_sessions: sessionmaker[Session],
) -> None:
    listener = start(max_image_rows=1024, max_image_columns=1024)
    assert send_raw(listener.port, [with_phi(rg1_uncr, tmp_path)]) == [StoreStatus.IMAGE_TOO_LARGE]
    assert count(sqlite_sessions, Instance) == 0
    assert_spool_clean(spool)
    [refusal] = logged(caplog, "refusing C-STORE: over a configured limit")
    assert refusal["reason"].startswith("image ") and "> limit 1024x1024" in refusal["reason"]
    assert send_raw(listener.port, [rg1_uncr]) == [StoreStatus.IMAGE_TOO_LARGE]


def test_compressed_bomb_is_refused_at_receive_time(
    start: Any, spool: Spool, tmp_path: Path, sqlite_sessions: sessionmaker[Session]
) -> None:
    """A 2 kB JPEG declaring 60000 x 60000 pixels: refused from its header, not decoded."""
    path = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    bomb = pydicom.dcmread(path)
    bomb.Rows = bomb.Columns = 60000
    bomb.SOPInstanceUID = bomb.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bomb_path = tmp_path / "bomb.dcm"
    bomb.save_as(bomb_path, enforce_file_format=True)
    assert bomb_path.stat().st_size < 10_000
    listener = start()  # the defaults: 8192 x 8192, 1 GiB
    assert send_raw(listener.port, [bomb_path]) == [StoreStatus.IMAGE_TOO_LARGE]
    assert count(sqlite_sessions, Instance) == 0
    assert_spool_clean(spool)
    assert send_raw(listener.port, [path]) == [0x0000], "an ordinary image is still stored"


def test_decoded_pixel_size_over_the_limit_is_refused(
    start: Any, spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))  # 100 x 100 RGB, 8 bit
    listener = start(max_image_bytes=20_000)
    assert send_raw(listener.port, [path]) == [StoreStatus.IMAGE_TOO_LARGE]
    [refusal] = logged(caplog, "refusing C-STORE: over a configured limit")
    assert refusal["reason"] == "decoded pixels 30000 bytes > limit 20000"
    assert_spool_clean(spool)


@pytest.fixture(autouse=True)
def _capture_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
