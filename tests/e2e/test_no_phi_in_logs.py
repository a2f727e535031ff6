"""No patient data and no secrets in any log the node writes, errors included.

A full ``dicom-node serve`` (listener, worker with the real engine, sender) receives real
chest radiographs whose patient attributes are rewritten to distinctive values, plus
objects that take the error paths: a truncated data set (refused and quarantined), a
non-chest image (skipped by the rules), a chest image whose JPEG stream is broken (a
decode error in the worker), an image over the size limit, and results addressed to a
PACS that is down (sends retried, then dead-lettered). Once everything has settled,
stderr and every file under ``<home>/logs`` are searched for the patient values and for
the database password given in the configuration: none may appear. Logging runs at
DEBUG, the most talkative level an operator can choose.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from sqlalchemy import make_url

from tests.support import (
    NodeProcess,
    as_child,
    free_port,
    provision_database,
    send_raw,
    storescu,
)

PHI = {
    "PatientName": "ZZTESTPATIENT^UNIQUE",
    "PatientID": "PID-7731XQ",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC5521ZQ",
    "OtherPatientIDs": "OPID-4410KW",
}
PASSWORD = "Db-Pa55word-9QZX"
CHEST = [
    "siim-cr-jpegbaseline.dcm",
    "siim-cr-jpegbaseline-mono1-header.dcm",
    "nih-00000001_000-dx-sc.dcm",
]
NON_CHEST = "dog-thorax-dx-lateral.dcm"
TOO_LARGE = "rg1-chest-cr-mono1-jpegls-near.dcm"  # 1955 rows, over max_image_rows
SETTLE_S = 300.0


def with_phi(
    source: Path, folder: Path, change: Callable[[pydicom.Dataset], None] | None = None
) -> Path:
    ds = as_child(pydicom.dcmread(source))  # scored: in the pneumonia model's population
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if change is not None:
        change(ds)
    path = folder / f"{source.stem}-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def broken_stream(ds: pydicom.Dataset) -> None:
    """Framing stays valid (the node must accept it); the JPEG inside does not decode."""
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc0\x00\x11" + b"\x08" + b"\x5a" * 60])


def node_config(path: Path, database_url: str, pacs_port: int) -> Path:
    path.write_text(
        f"""
[node]
max_image_rows = 1900

[storage]
database_url = "{database_url}"

[logging]
level = "DEBUG"

[sender]
backoff_base = 0.2
backoff_cap = 0.5
max_age = 3

[[destinations]]
name = "pacs"
ae_title = "DOWN_PACS"
host = "127.0.0.1"
port = {pacs_port}
timeout_s = 5
"""
    )
    return path


def status(node: NodeProcess) -> dict[str, object]:
    result = node.cli("status", "--json")
    return dict(json.loads(result.stdout))


def settled(node: NodeProcess, instances: int) -> bool:
    report = status(node)
    jobs = report["jobs"]
    sends = report["sends"]
    assert isinstance(jobs, dict) and isinstance(sends, dict)
    finished = jobs["done"] + jobs["failed"] + jobs["skipped"]
    pacs = sends.get("pacs", {})
    return (
        finished == instances
        and not pacs.get("pending")
        and not pacs.get("sending")
        and pacs.get("dead", 0) > 0
    )


def log_texts(node: NodeProcess) -> dict[str, str]:
    files = list(node.home.glob("serve-*.stderr"))
    files += [p for p in (node.home / "logs").rglob("*") if p.is_file()]
    files += [p for p in node.home.rglob("*.log*") if p.is_file() and p not in files]
    return {str(p.relative_to(node.home)): p.read_text(errors="replace") for p in files}


def test_logs_hold_no_patient_data_and_no_password(
    data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    images = data_dir / "dicom"
    sent = tmp_path / "sent"
    sent.mkdir()
    chest = [with_phi(images / name, sent) for name in CHEST]
    non_chest = with_phi(images / NON_CHEST, sent)
    undecodable = with_phi(images / CHEST[0], sent, broken_stream)
    too_large = with_phi(images / TOO_LARGE, sent)
    truncated = sent / "truncated.dcm"
    truncated.write_bytes(chest[2].read_bytes()[:-4096])
    with provision_database("postgresql", tmp_path) as url:
        secret_url = make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
        config = node_config(tmp_path / "node.toml", secret_url, free_port())
        node = NodeProcess(
            home=tmp_path / "home", database_url=secret_url, config_file=config, workers=True
        )
        node.start()
        try:
            for path in [*chest, non_chest, undecodable]:
                result = storescu(node.port, path)
                assert result.returncode == 0, result.stderr
            assert send_raw(node.port, [truncated]) == [0xC210]
            assert send_raw(node.port, [too_large]) == [0xC214]
            deadline = time.monotonic() + SETTLE_S
            while not settled(node, 5):
                assert time.monotonic() < deadline, f"not settled: {status(node)}"
                time.sleep(1)
            jobs = status(node)["jobs"]
            assert isinstance(jobs, dict) and jobs["failed"] == 1 and jobs["skipped"] >= 1, jobs
            shown = node.cli("config", "show")
            assert shown.returncode == 0 and PASSWORD not in shown.stdout + shown.stderr
        finally:
            node.stop()
    logs = log_texts(node)
    assert "logs/node.log" in logs and any(name.endswith(".stderr") for name in logs)
    everything = "\n".join(logs.values())
    for event in ("instance stored", "refusing C-STORE: bad data set", "c-store failed"):
        assert event in everything, f"expected a {event!r} log line: the test would prove nothing"
    leaks = [
        f"{name}: {value}"
        for name, text in logs.items()
        for value in [*PHI.values(), PASSWORD]
        if value in text
    ]
    assert leaks == []


@pytest.fixture(autouse=True)
def _fresh_data(data_dir: Path) -> None:
    missing = [n for n in [*CHEST, NON_CHEST, TOO_LARGE] if not (data_dir / "dicom" / n).is_file()]
    assert not missing, f"shared data lacks {missing}"
