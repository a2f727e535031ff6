"""``dicom-node serve`` against real senders, on SQLite and on PostgreSQL.

One node process per backend serves every test of this module (they are written to be
independent of order: each looks up its own instances by UID and content).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest

from dicom_node.receive import StoreStatus
from tests.support import (
    NodeProcess,
    dataset_bytes,
    echoscu,
    instance_rows,
    scalar,
    send_raw,
    sop_instance_uid_of,
    split_part10,
    storescu,
    transfer_syntax_of,
)


def stored_datasets(node: NodeProcess, uid: str) -> dict[bytes, dict[str, object]]:
    """Data set bytes of every stored version of ``uid`` → its database row."""
    found = {}
    for row in instance_rows(node.database_url, uid):
        raw = (node.spool / str(row["spool_path"])).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == row["sha256"], "spool file != recorded hash"
        assert len(raw) == row["size_bytes"]
        found[split_part10(raw)[1]] = row
    return found


def test_echoscu(running_node: NodeProcess) -> None:
    result = echoscu(running_node.port)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_storescu_images_are_stored_exactly_as_sent(
    running_node: NodeProcess,
    image_files: list[Path],
    rg1_uncr: Path,
    wire_datasets: dict[Path, bytes],
) -> None:
    for path in [*image_files, rg1_uncr]:
        result = storescu(running_node.port, path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Received Store Response (Success)" in result.stdout + result.stderr
    for path in [*image_files, rg1_uncr]:
        stored = stored_datasets(running_node, sop_instance_uid_of(path))
        assert wire_datasets[path] in stored, f"{path.name}: stored bytes differ from the wire"
        row = stored[wire_datasets[path]]
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert row["transfer_syntax_uid"] == transfer_syntax_of(path)
        assert row["sop_class_uid"] == header.SOPClassUID
        assert (row["calling_ae"], row["called_ae"]) == ("STORESCU", "CXR_AI")
        assert row["peer_address"] == "127.0.0.1"


def test_same_uid_different_content_is_kept_as_versions(
    running_node: NodeProcess, image_files: list[Path]
) -> None:
    """The two SIIM files share a SOP Instance UID but differ (photometric header)."""
    pair = [p for p in image_files if p.name.startswith("siim-")]
    assert len(pair) == 2 and len({sop_instance_uid_of(p) for p in pair}) == 1
    for path in pair:
        assert storescu(running_node.port, path).returncode == 0
    versions = instance_rows(running_node.database_url, sop_instance_uid_of(pair[0]))
    assert sorted(int(str(row["version"])) for row in versions) == [1, 2]


def test_pynetdicom_raw_sends_are_stored_byte_identical(
    running_node: NodeProcess, image_files: list[Path], rg1_uncr: Path
) -> None:
    """A sender that does not re-encode: stored data set == the file's data set."""
    files = [*image_files, rg1_uncr]
    assert send_raw(running_node.port, files) == [0x0000] * len(files)
    for path in files:
        assert dataset_bytes(path) in stored_datasets(running_node, sop_instance_uid_of(path))


def test_identical_resend_is_acknowledged_not_stored_twice(
    running_node: NodeProcess, image_files: list[Path]
) -> None:
    path = next(p for p in image_files if p.name.startswith("nih-"))
    uid = sop_instance_uid_of(path)
    assert storescu(running_node.port, path).returncode == 0
    before = len(instance_rows(running_node.database_url, uid))
    duplicates = "SELECT count(*) FROM audit_events WHERE kind = 'instance.duplicate'"
    audited = scalar(running_node.database_url, duplicates)
    assert storescu(running_node.port, path).returncode == 0
    assert len(instance_rows(running_node.database_url, uid)) == before
    assert scalar(running_node.database_url, duplicates) == audited + 1


def test_structured_report_is_refused_at_negotiation(
    running_node: NodeProcess, sr_file: Path
) -> None:
    result = storescu(running_node.port, sr_file)
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in result.stdout + result.stderr
    assert instance_rows(running_node.database_url, sop_instance_uid_of(sr_file)) == []


@pytest.mark.parametrize("damage", ["truncated", "bad_length"])
def test_corrupt_data_set_fails_and_listener_keeps_serving(
    running_node: NodeProcess, rg1_uncr: Path, tmp_path: Path, damage: str
) -> None:
    raw = bytearray(rg1_uncr.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # Rows (0028,0010) US claims 40000 bytes instead of 2
        offset = raw.index(b"\x28\x00\x10\x00US")
        raw[offset + 6 : offset + 8] = (40000).to_bytes(2, "little")
    broken = tmp_path / f"{damage}.dcm"
    broken.write_bytes(bytes(raw))
    quarantine = running_node.spool / "quarantine"
    before = len(list(quarantine.glob("*.dcm")))
    assert send_raw(running_node.port, [broken]) == [StoreStatus.UNDECODABLE_DATASET]
    assert len(list(quarantine.glob("*.dcm"))) == before + 1
    assert echoscu(running_node.port).returncode == 0
    assert storescu(running_node.port, rg1_uncr).returncode == 0


def test_status_json_is_one_document(running_node: NodeProcess) -> None:
    result = running_node.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # exactly one JSON document, nothing else
    assert report["listener"]["ae_title"] == "CXR_AI"
    assert report["listener"]["port"] == running_node.port
    assert report["listener"]["state"] == "up" and report["listener"]["up_since"]
    assert report["listener"]["accepting_connections"] is True
    assert report["database"]["reachable"] is True
    assert report["database"]["backend"] == running_node.database_url.split("+")[0].split(":")[0]
    assert report["database"]["schema_revision"] == report["database"]["schema_head"]
    assert set(report["jobs"]) == {"received", "queued", "running", "done", "failed", "skipped"}
    assert report["instances"]["last_hour"] >= 1
    assert report["spool"]["free_bytes"] > 0
    assert report["healthy"] is True


def test_human_status(running_node: NodeProcess) -> None:
    result = running_node.cli("status")
    assert result.returncode == 0, result.stderr
    assert "CXR_AI" in result.stdout and "reachable" in result.stdout


def test_logs_are_json_lines_without_patient_data(
    running_node: NodeProcess, image_files: list[Path]
) -> None:
    log_text = running_node.stderr() + (running_node.home / "logs" / "node.log").read_text()
    lines = [line for line in log_text.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["event"] for line in lines)
    assert any(json.loads(line)["event"] == "instance stored" for line in lines)
    for path in image_files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            value = str(header.get(keyword) or "").strip()
            if len(value) >= 4:
                assert value not in log_text, f"{keyword} of {path.name} leaked into the logs"
