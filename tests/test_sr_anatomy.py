"""The SR's anatomy: the ratio, widths and lung areas, their finding sites, the SEG
segments they reference; the explanation check; cardiomegaly as a measured finding."""

from __future__ import annotations

import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset

from dicom_node.outputs import build_outputs
from dicom_node.results.common import Equipment
from dicom_node.results.registry import BuildInputs, output_types
from dicom_node.results.sr import measurement_report
from dicom_node.results.uids import segmentation_uids
from inference import anatomy
from inference.bundle import Label
from inference.findings import Finding
from tests.dciodvfy import assert_conformant
from tests.pixelmed import assert_valid_sr
from tests.results_data import make_finding, make_result, read_source

SOURCE = "nih-00000001_000-dx-sc.dcm"
SEG_MODEL = ("cxr_anatomy_segment_unet", "1.0.0")
CARDIOMEGALY = Label("cardiomegaly", "8186001", "SCT", "Cardiomegaly")
MOMENT = datetime.datetime(2026, 12, 3, 7, 0, 0)


def chest_masks(size: int = 256) -> np.ndarray:
    masks = np.zeros((3, size, size), dtype=bool)
    masks[1, 40:200, 40:120] = True
    masks[2, 40:200, 136:216] = True
    masks[0, 120:190, 90:180] = True
    return masks


def adult_result(source: Dataset, explained_share: float | None = None):  # type: ignore[no-untyped-def]
    found = anatomy.measure(
        chest_masks(), (source.Rows, source.Columns), (0.143, 0.143), "PixelSpacing"
    )
    found.model_name, found.model_version = SEG_MODEL
    found.source_shape = (source.Rows, source.Columns)
    ratio = found.ctr
    assert ratio is not None
    cardiomegaly = Finding(CARDIOMEGALY, 0.8, ratio > 0.5, "measurement", 0.5, *SEG_MODEL)
    findings = [cardiomegaly]
    if explained_share is not None:
        pneumonia = make_finding(False, "screen")
        findings.insert(
            0,
            Finding(
                **{**pneumonia.__dict__, "cam_lung_share": explained_share, "cam_heart_share": 0.1}
            ),
        )
    result = make_result(source, findings)
    result.anatomy = found
    return result


def _numbers(reference: Dataset) -> list[int]:
    value = reference.ReferencedSOPSequence[0].ReferencedSegmentNumber
    return [int(v) for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value])]


def nums(sr: Dataset) -> dict[str, list[Dataset]]:
    """Every NUM of the report by concept code value."""
    out: dict[str, list[Dataset]] = {}
    for item in find_content_items(sr, value_type=hd.sr.ValueTypeValues.NUM, recursive=True):
        out.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(item)
    return out


def test_with_the_seg_the_groups_reference_its_segments(tmp_path: Path) -> None:
    source = read_source(SOURCE)
    result = adult_result(source)
    sr = measurement_report(source, result, priority="routine", with_segmentation=True)
    assert_conformant(sr, tmp_path, "Comprehensive3DSR")
    assert_valid_sr(sr, tmp_path)
    found = nums(sr)
    (ratio,) = found["CTR"]
    assert float(ratio.MeasuredValueSequence[0].NumericValue) == pytest.approx(
        result.anatomy.ctr, abs=1e-4
    )
    assert ratio.ConceptNameCodeSequence[0].CodeMeaning == "Cardiothoracic ratio"
    assert len(found["103355008"]) == 2 and len(found["42798000"]) == 2  # widths, areas
    units = {
        i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        for i in found["42798000"]
    }
    assert units == {"cm2"}
    seg_uid = segmentation_uids(source, *SEG_MODEL).sop_instance_uid
    references = [
        item
        for item in find_content_items(sr, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
        if item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg_uid
    ]
    segments = [_numbers(r) for r in references]
    # ratio: all three; heart width: the heart; thoracic width: both lungs; each lung area
    assert sorted(segments) == sorted([[1, 2, 3], [1], [2, 3], [2], [3]])
    sites = {
        item.ConceptCodeSequence[0].CodeValue
        for item in find_content_items(
            sr, name=hd.sr.CodedConcept("363698007", "SCT", "Finding Site"), recursive=True
        )
    }
    assert {"80891009", "3341006", "44029006", "816094009"} <= sites


def test_without_the_seg_the_groups_carry_their_finding_sites_only(tmp_path: Path) -> None:
    source = read_source(SOURCE)
    sr = measurement_report(source, adult_result(source), with_segmentation=False)
    assert_valid_sr(sr, tmp_path)
    images = find_content_items(sr, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert all(
        i.ReferencedSOPSequence[0].ReferencedSOPClassUID != "1.2.840.10008.5.1.4.1.1.66.4"
        for i in images
    )
    assert "CTR" in nums(sr)


def test_the_pipeline_tells_the_sr_that_the_seg_is_written(tmp_path: Path) -> None:
    """Built through the registry with the default outputs: the SR points at the SEG that
    is built beside it, by UID."""
    source = read_source(SOURCE)
    result = adult_result(source)
    types = output_types(["sr", "sc", "seg"])
    made = frozenset(t.name for t in types if t.applies_to(result))
    assert made == {"sr", "sc", "seg"}
    inputs = BuildInputs(source, result, Equipment(), MOMENT, None, "routine", made)
    built = dict(build_outputs(types, inputs))
    seg_uid = built["seg"].SOPInstanceUID
    referenced = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in find_content_items(
            built["sr"], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True
        )
    }
    assert seg_uid in referenced


def test_explanation_share_and_warning_are_reported(tmp_path: Path) -> None:
    source = read_source(SOURCE)
    result = adult_result(source, explained_share=0.3)
    result.warnings.append(
        "the model looked mostly outside the lungs: 30% of the pneumonia heatmap lies "
        "inside the lung fields"
    )
    sr = measurement_report(source, result)
    assert_valid_sr(sr, tmp_path)
    (share,) = nums(sr)["CAMLUNG"]
    assert float(share.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.3)
    comments = [
        i.TextValue
        for i in find_content_items(sr, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True)
    ]
    assert any("looked mostly outside the lungs" in c for c in comments)


def test_the_measured_finding_names_the_segmentation_model(tmp_path: Path) -> None:
    source = read_source(SOURCE)
    sr = measurement_report(source, adult_result(source))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path)).content
    (group,) = report.get_image_measurement_groups(
        finding_type=hd.sr.CodedConcept("8186001", "SCT", "Cardiomegaly")
    )
    names = [
        item.TextValue
        for item in find_content_items(
            group[0], value_type=hd.sr.ValueTypeValues.TEXT, recursive=True
        )
        if item.ConceptNameCodeSequence[0].CodeValue == "111001"  # Algorithm Name
    ]
    assert names == [SEG_MODEL[0]]
