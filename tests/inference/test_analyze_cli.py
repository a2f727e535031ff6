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
    # Every finding in force is listed, and why: pneumonia and cardiomegaly.
    assert [f["code"] for f in tibia["findings"]] == ["233604007", "8186001"]
    for not_assessed in tibia["findings"]:
        assert set(not_assessed) >= NOT_ASSESSED_KEYS and "probability" not in not_assessed
        assert not_assessed["status"] == "not_assessed"
        assert "EXTREMITY" in not_assessed["reason"]
    assert broken["status"] == "error" and "not a DICOM file" in broken["reason"]
    with Image.open(chest["heatmap"]) as png:
        assert png.mode == "RGB"
    assert tibia["heatmap"] is None and len(list(heatmaps.iterdir())) == 1


def test_an_adult_is_assessed_for_cardiomegaly_only_and_a_raw_data_set_is_read(
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
    by_code = {f["code"]: f for f in grown["findings"]}
    entry = by_code["233604007"]  # the pediatric pneumonia model
    assert entry["status"] == "not_assessed"
    assert "62 years" in entry["reason"] and entry["present"] is False
    # An adult PA film: the cardiothoracic ratio answers for cardiomegaly.
    assert grown["status"] == "scored" and by_code["8186001"]["status"] == "assessed"
    assert child["status"] == "scored" and child["findings"][0]["status"] == "assessed"


def test_human_output_names_every_file(dicom_dir: Path, tmp_path: Path) -> None:
    files = [child_copy(dicom_dir / name, tmp_path / f"child-{name}") for name in CHEST_FILES[:2]]
    result = CliRunner().invoke(app, ["analyze", *map(str, files)])
    assert result.exit_code == 0, result.output
    for name in CHEST_FILES[:2]:
        assert name in result.stdout
    assert "Pneumonia" in result.stdout


def test_measurements_and_masks_of_an_adult_pa_film(tmp_path: Path) -> None:
    """An adult PA DX: the ratio, widths in mm and lung areas in cm² in the JSON, and the
    three masks as PNG on the source grid with --masks-dir."""
    from tests.inference.conftest import data_root
    from tests.nih_dicom import dx_dataset, pick, read_labels, write

    image = pick(read_labels(data_root() / "nih-sample"), {"PA": 1})[0]
    path = write(dx_dataset(image), tmp_path / "adult.dcm")
    masks_dir = tmp_path / "masks"
    result = CliRunner().invoke(
        app, ["analyze", "--json", "--masks-dir", str(masks_dir), str(path)]
    )
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["status"] == "scored"
    measured = {m["name"]: m for m in record["measurements"]}
    assert set(measured) == {
        "cardiothoracic_ratio",
        "heart_width",
        "thoracic_width",
        "right_lung_area",
        "left_lung_area",
    }
    assert all(set(m) >= {"name", "code", "scheme", "value", "unit"} for m in measured.values())
    ratio = measured["cardiothoracic_ratio"]
    assert (ratio["code"], ratio["scheme"], ratio["unit"]) == ("CTR", "99CXRAI", "1")
    width = measured["thoracic_width"]["value"] * 1.0
    assert 200 < width < 450  # an adult chest, in mm at the detector
    assert record["anatomy"]["spacing"].startswith("from PixelSpacing")  # the wrapper's
    cardiomegaly = next(f for f in record["findings"] if f["code"] == "8186001")
    assert cardiomegaly["status"] == "assessed"
    assert cardiomegaly["present"] == (ratio["value"] > 0.5)
    assert len(record["masks"]) == 3
    ds = pydicom.dcmread(path)
    for mask_path in record["masks"]:
        with Image.open(mask_path) as png:
            assert png.size == (ds.Columns, ds.Rows) and png.mode == "L"
            assert set(png.getdata()) == {0, 255}
