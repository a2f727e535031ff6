"""Header rules of the input gate on real files and on typical non-frontal headers."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.gate import check_header

from .conftest import CHEST_FILES

EXPECTED_REASONS = {
    "dental-cr-modality-lut-jpeglossless.dcm": "TEETH",
    "rg2-hip-cr-jpegextended.dcm": "Body Part Examined HIP",
    "rg2-hip-cr-jpeglossless.dcm": "Body Part Examined HIP",
    "rg3-tibia-cr-j2k-lossless.dcm": "Body Part Examined EXTREMITY",
    "dog-thorax-dx-lateral.dcm": "Image Laterality L",
    "example-tid1500-sr.dcm": "Modality SR",
}


@pytest.mark.parametrize("name", CHEST_FILES)
def test_chest_radiographs_pass_the_header_rules(dicom_dir: Path, name: str) -> None:
    decision = check_header(pydicom.dcmread(dicom_dir / name, stop_before_pixels=False))
    assert decision.eligible, decision.reason


@pytest.mark.parametrize(("name", "reason"), sorted(EXPECTED_REASONS.items()))
def test_non_chest_files_are_refused_with_a_reason(dicom_dir: Path, name: str, reason: str) -> None:
    decision = check_header(pydicom.dcmread(dicom_dir / name))
    assert not decision.eligible
    assert reason in decision.reason


def _chest(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows = ds.Columns = 2048
    ds.PixelData = b"\0\0"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"ViewPosition": "LL"}, "View Position LL"),
        ({"ViewPosition": "RLD"}, "View Position RLD"),
        ({"SeriesDescription": "CHEST LAT"}, "mentions LAT"),
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, "not human"),
        ({"Modality": "CT"}, "Modality CT"),
        ({"BodyPartExamined": "ABDOMEN"}, "ABDOMEN"),
        ({"Rows": 169}, "too small"),
    ],
)
def test_non_frontal_or_non_human_headers_are_refused(
    attrs: dict[str, object], reason: str
) -> None:
    decision = check_header(_chest(**attrs))
    assert not decision.eligible and reason in decision.reason


def test_lateral_view_code_is_refused() -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "399198007",
        "SCT",
        "right lateral",
    )
    ds = _chest(ViewPosition="")
    ds.ViewCodeSequence = [code]
    assert "right lateral" in check_header(ds).reason


def test_portable_ap_and_empty_body_part_are_eligible() -> None:
    assert check_header(_chest(ViewPosition="AP", BodyPartExamined="")).eligible


def test_mediastinal_contrast_tells_inverted_chests(
    dicom_dir: Path, rg1_uncr: pydicom.Dataset
) -> None:
    from inference.decode import decode
    from inference.gate import mediastinal_contrast

    for ds in (rg1_uncr, pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm")):
        display = decode(ds).pixels
        assert mediastinal_contrast(display) > 0.5
        assert mediastinal_contrast(1.0 - display) < -0.5
    wrong = decode(pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline-mono1-header.dcm")).pixels
    assert mediastinal_contrast(wrong) < 0


ADULT_SETS = {  # folder: column naming the image
    "nih-sample": "image",
    "nih-pneumonia": "image",
    "tb-sakha": "path",
    "cxr-anatomy": "image",
}


@pytest.mark.parametrize("folder", sorted(ADULT_SETS))
def test_the_image_gate_admits_adult_chests_of_every_reference_set(
    cascade: object, folder: str
) -> None:
    """The feature gate knows adults: a fixed sample of 24 images of each adult chest set
    passes (cross-validated refusal rates are in the screen bundle's card)."""
    import csv

    import numpy as np
    from PIL import Image

    from inference.decode import DecodedImage

    from .conftest import data_root

    root = data_root() / folder
    with (root / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))[::7][:24]
    images = [
        DecodedImage(
            np.asarray(Image.open(root / row[ADULT_SETS[folder]]).convert("L"), np.float32) / 255,
            None,
            None,
            "test",
        )
        for row in rows
    ]
    results = cascade.analyze_pixels(images)  # type: ignore[attr-defined]
    refused = [r for r in results if r.in_domain is False]
    assert len(refused) <= 1, [r.reason for r in refused]
