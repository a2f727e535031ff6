"""``dicom-node analyze``: the engine offline, as an admin runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from typer.testing import CliRunner

from dicom_node.cli import app
from tests.support import as_child, child_copy

from .conftest import CHEST_FILES

REQUIRED = {"file", "sop_instance_uid", "status", "reason", "findings"}
FINDING_KEYS = {
    "code",
    "scheme",
    "meaning",
    "status",
    "reason",
    "probability",
    "present",
    "stage",
    "threshold",
}
NOT_ASSESSED_KEYS = {"code", "scheme", "meaning", "status", "reason"}


def test_json_output_is_one_object_per_file(dicom_dir: Path, tmp_path: Path) -> None:
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("not a DICOM file")
    child = child_copy(dicom_dir / CHEST_FILES[1], tmp_path / "child.dcm")
    files = [child, dicom_dir / "rg3-tibia-cr-j2k-lossless.dcm", not_dicom]
    heatmaps = tmp_path / "heatmaps"
    result = CliRunner().invoke(
        app, ["analyze", "--json", "--heatmap-dir", str(heatmaps), *map(str, files)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(f) for f in files]
    assert all(set(r) >= REQUIRED for r in records)
    chest, tibia, broken = records
    assert chest["status"] == "scored" and set(chest["findings"][0]) >= FINDING_KEYS
    assert chest["findings"][0]["code"] == "233604007"
    assert chest["findings"][0]["status"] == "assessed"
    assert tibia["status"] == "not_scored" and "EXTREMITY" in tibia["reason"]
    (not_assessed,) = tibia["findings"]  # every finding in force is listed, and why
    assert set(not_assessed) >= NOT_ASSESSED_KEYS and "probability" not in not_assessed
    assert not_assessed["status"] == "not_assessed" and "EXTREMITY" in not_assessed["reason"]
    assert broken["status"] == "error" and "not a DICOM file" in broken["reason"]
    with Image.open(chest["heatmap"]) as png:
        assert png.mode == "RGB"
    assert tibia["heatmap"] is None and len(list(heatmaps.iterdir())) == 1


def test_an_adult_is_not_assessed_and_a_raw_data_set_is_read(
    dicom_dir: Path, tmp_path: Path
) -> None:
    adult = dicom_dir / "siim-cr-jpegbaseline.dcm"  # Patient Age 62
    raw = tmp_path / "raw-child.dcm"
    dataset = as_child(pydicom.dcmread(adult))
    dataset.decompress(generate_instance_uid=False)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, dataset)  # no preamble, no File Meta Information
    raw.write_bytes(buffer.getvalue())
    result = CliRunner().invoke(app, ["analyze", "--json", str(adult), str(raw)])
    assert result.exit_code == 0, result.output
    grown, child = (json.loads(line) for line in result.stdout.splitlines())
    (entry,) = grown["findings"]
    assert grown["status"] == "not_scored" and entry["status"] == "not_assessed"
    assert "62 years" in entry["reason"] and entry["present"] is False
    assert child["status"] == "scored" and child["findings"][0]["status"] == "assessed"


def test_human_output_names_every_file(dicom_dir: Path, tmp_path: Path) -> None:
    files = [child_copy(dicom_dir / name, tmp_path / f"child-{name}") for name in CHEST_FILES[:2]]
    result = CliRunner().invoke(app, ["analyze", *map(str, files)])
    assert result.exit_code == 0, result.output
    for name in CHEST_FILES[:2]:
        assert name in result.stdout
    assert "Pneumonia" in result.stdout
