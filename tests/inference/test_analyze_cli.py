"""``dicom-node analyze``: the engine offline, as an admin runs it."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from dicom_node.cli import app

from .conftest import CHEST_FILES

REQUIRED = {"file", "sop_instance_uid", "status", "reason", "findings"}
FINDING_KEYS = {"code", "scheme", "meaning", "probability", "present", "stage"}


def test_json_output_is_one_object_per_file(dicom_dir: Path, tmp_path: Path) -> None:
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("not a DICOM file")
    files = [dicom_dir / CHEST_FILES[1], dicom_dir / "rg3-tibia-cr-j2k-lossless.dcm", not_dicom]
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
    assert tibia["status"] == "not_scored" and "EXTREMITY" in tibia["reason"]
    assert broken["status"] == "error" and "cannot read DICOM" in broken["reason"]
    with Image.open(chest["heatmap"]) as png:
        assert png.mode == "RGB"
    assert tibia["heatmap"] is None and len(list(heatmaps.iterdir())) == 1


def test_human_output_names_every_file(dicom_dir: Path) -> None:
    files = [dicom_dir / name for name in CHEST_FILES[:2]]
    result = CliRunner().invoke(app, ["analyze", *map(str, files)])
    assert result.exit_code == 0, result.output
    for name in CHEST_FILES[:2]:
        assert name in result.stdout
    assert "Pneumonia" in result.stdout
