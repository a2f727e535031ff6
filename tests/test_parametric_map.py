"""The Grad-CAM Parametric Map: conformance (dciodvfy, dcentvfy), values, geometry, identity.

dciodvfy's check of the Debian dicom3tools release (2022) has two defects that every
COLOR_RANGE Parametric Map trips, whatever its content; they are the only errors
allowed (:data:`COLOR_RANGE_DEFECTS`), and the same map without palette must have none:

* the palette attributes are checked against the Image Pixel Description macro's
  condition (Photometric Interpretation PALETTE COLOR), which does not know the Palette
  Color Lookup Table module that the IOD includes for Pixel Presentation COLOR_RANGE;
* Minimum/Maximum Stored Value Mapped (FD) go through a string enumerated-value check.
"""

from __future__ import annotations

import datetime
import logging
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ParametricMapStorage

from dicom_node.outputs import build_outputs, encode, pin_timestamps
from dicom_node.results.common import Equipment
from dicom_node.results.heatmap_sc import heatmap_secondary_capture
from dicom_node.results.parametric_map import (
    MAX_STORED,
    NOMINAL_SPACING_MM,
    PM_SERIES_DESCRIPTION,
    frame_of_reference_uid,
    heatmap_parametric_map,
    orientation,
    stored_values,
)
from dicom_node.results.registry import (
    DEFAULT_OUTPUTS,
    BuildInputs,
    check_output_names,
    get_output_type,
)
from dicom_node.results.sr import measurement_report
from dicom_node.results.uids import algorithm_uid
from inference.cascade import ImageResult
from tests.dciodvfy import EXPECTED_WARNINGS, verify
from tests.results_data import (
    CHEST_SOURCES,
    RG1_UNCR,
    make_finding,
    make_result,
    read_source,
    source_path,
)

PM_IOD = "ParametricMap"
MOMENT = datetime.datetime(2026, 3, 4, 5, 6, 7, 890000)
COLOR_RANGE_DEFECTS = (
    *(
        f"Error - Attribute present when condition unsatisfied (which may not be present "
        f"otherwise) Type 1C Conditional Element=<{colour}PaletteColorLookupTable{part}> "
        f"Module=<ImagePixelDescriptionMacro>"
        for part in ("Descriptor", "Data")
        for colour in ("Red", "Green", "Blue")
    ),
    "Error - Non-string attribute while verifying string enumerated value for attribute "
    "<Minimum Stored Value Mappe>",
    "Error - Non-string attribute while verifying string enumerated value for attribute "
    "<Maximum Stored Value Mapped>",
)
PM_WARNINGS = {
    # Image Type / Frame Type value 4 QUANTITY is the Parametric Map's defined term
    # (PS3.3 C.8.32.1.1); the dicom3tools release does not list it.
    r"Unrecognized defined term <QUANTITY> for value 4 of attribute <(Image|Frame) Type>",
    *EXPECTED_WARNINGS,
}


def cam_result(source: Dataset, **kwargs: object) -> ImageResult:
    """A scored result with a Grad-CAM map on a 16 × 16 network grid: a hot spot."""
    result = make_result(source, **kwargs)  # type: ignore[arg-type]
    y, x = np.mgrid[0:16, 0:16]
    result.cam = np.exp(-((y - 9.0) ** 2 + (x - 5.0) ** 2) / 12.0).astype(np.float32)
    result.image_shape = (int(source.Rows), int(source.Columns))
    return result


def _unexpected_warnings(warnings_: list[str]) -> list[str]:
    return [w for w in warnings_ if not any(re.search(p, w) for p in PM_WARNINGS)]


def _round_trip(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / "pm.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


# -- conformance ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_dciodvfy_reports_only_its_color_range_defects(name: str, tmp_path: Path) -> None:
    source = read_source(name)
    report = verify(heatmap_parametric_map(source, cam_result(source)), tmp_path)
    assert report.iod == PM_IOD, report.output
    assert sorted(report.errors) == sorted(COLOR_RANGE_DEFECTS), report.output
    assert _unexpected_warnings(report.warnings) == [], report.output


@pytest.mark.parametrize("name", [RG1_UNCR, "nih-00000001_000-dx-sc.dcm"])
def test_dciodvfy_reports_no_error_for_the_map_without_palette(name: str, tmp_path: Path) -> None:
    """Everything but the COLOR_RANGE part — geometry, equipment, mapping — is clean."""
    source = read_source(name)
    pm = heatmap_parametric_map(source, cam_result(source), palette=False)
    assert pm.PixelPresentation == "MONOCHROME"
    report = verify(pm, tmp_path)
    assert report.iod == PM_IOD, report.output
    assert report.errors == [], report.output
    assert _unexpected_warnings(report.warnings) == [], report.output


def _dcentvfy(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_dcentvfy_finds_source_and_every_output_of_one_patient_and_study(
    name: str, tmp_path: Path
) -> None:
    """dicom3tools' entity check across the source, the SR, the SC and the PM: no patient,
    study or series attribute differs (its remarks on attributes one file has and the
    other lacks — Type 2 ones we must write empty, an invalid Patient's Age we drop — are
    warnings)."""
    source = read_source(name)
    result = cam_result(source, warnings=["image was inverted"])
    paths = [source_path(name)]
    for kind, ds in (
        ("sr", measurement_report(source, result, priority="urgent")),
        ("sc", heatmap_secondary_capture(source, result)),
        ("pm", heatmap_parametric_map(source, result)),
    ):
        paths.append(tmp_path / f"{kind}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    proc = _dcentvfy(paths)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output
    assert "different value" not in output, output


def test_dcentvfy_does_catch_an_inconsistency(tmp_path: Path) -> None:
    """The check above can fail: a PM that disagrees with its source on the patient."""
    source = read_source(RG1_UNCR)
    pm = heatmap_parametric_map(source, cam_result(source))
    pm.PatientSex = "M" if source.PatientSex != "M" else "F"
    pm.save_as(tmp_path / "pm.dcm", enforce_file_format=True)
    proc = _dcentvfy([source_path(RG1_UNCR), tmp_path / "pm.dcm"])
    assert proc.returncode != 0
    assert "PatientSex" in proc.stdout + proc.stderr


# -- values ----------------------------------------------------------------------------------


def test_stored_values_are_the_heatmap_on_the_source_grid(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    result = cam_result(source)
    heatmap = result.heatmap
    assert heatmap is not None
    pm = _round_trip(heatmap_parametric_map(source, result), tmp_path)
    assert pm.SOPClassUID == ParametricMapStorage
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (source.Rows, source.Columns, 1)
    assert (pm.BitsAllocated, pm.BitsStored, pm.PixelRepresentation) == (16, 16, 0)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = pm.pixel_array * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept
    np.testing.assert_allclose(values, np.clip(heatmap, 0, 1), atol=0.5 / MAX_STORED + 1e-7)


def test_real_world_value_mapping_names_the_quantity_and_unit(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    pm = _round_trip(heatmap_parametric_map(source, cam_result(source)), tmp_path)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (
        0,
        MAX_STORED,
    )
    assert mapping.RealWorldValueSlope == pytest.approx(1 / MAX_STORED)
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130403", "DCM")
    assert quantity.CodeMeaning == "Gradient-weighted class activation"


def test_palette_colour_range_and_window_for_an_overlay(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    pm = _round_trip(heatmap_parametric_map(source, cam_result(source)), tmp_path)
    assert pm.PixelPresentation == "COLOR_RANGE"
    for colour in ("Red", "Green", "Blue"):
        assert list(pm[f"{colour}PaletteColorLookupTableDescriptor"].value) == [256, 0, 16]
    assert pm.ICCProfile
    shared = pm.SharedFunctionalGroupsSequence[0]
    color_range = shared.StoredValueColorRangeSequence[0]
    assert (color_range.MinimumStoredValueMapped, color_range.MaximumStoredValueMapped) == (
        0.0,
        float(MAX_STORED),
    )
    voi = shared.FrameVOILUTSequence[0]
    assert float(voi.WindowWidth) == MAX_STORED + 1


def test_stored_values_clip_and_round() -> None:
    values = stored_values(np.array([[-0.5, 0.0, 0.5, 1.0, 1.5, np.nan]], dtype=np.float32))
    assert values.dtype == np.uint16
    assert values.tolist() == [[0, 0, 32768, MAX_STORED, MAX_STORED, 0]]


# -- geometry ------------------------------------------------------------------------------


def test_geometry_of_its_own_for_a_projection_radiograph(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)  # Patient Orientation L\F, Pixel Spacing 0\0
    assert "FrameOfReferenceUID" not in source
    pm = _round_trip(heatmap_parametric_map(source, cam_result(source)), tmp_path)
    assert pm.FrameOfReferenceUID == frame_of_reference_uid(source)
    shared = pm.SharedFunctionalGroupsSequence[0]
    orientation_ = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation_] == [1, 0, 0, 0, 0, -1]
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [NOMINAL_SPACING_MM] * 2  # the source's are 0
    frame = pm.PerFrameFunctionalGroupsSequence[0]
    position = frame.PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == [0, 0, 0]
    derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derivation.SpatialLocationsPreserved == "YES"


def test_the_source_pixel_spacing_is_kept_when_it_has_one() -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")
    pm = heatmap_parametric_map(source, cam_result(source))
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [float(v) for v in source.PixelSpacing]


@pytest.mark.parametrize(
    "patient_orientation,expected",
    [
        (["L", "F"], (1, 0, 0, 0, 0, -1)),
        (["R", "F"], (-1, 0, 0, 0, 0, -1)),
        (["A", "F"], (0, -1, 0, 0, 0, -1)),  # a lateral, were one ever accepted
        (["P", "L"], (0, 1, 0, 1, 0, 0)),
        (["FL", "A"], (1, 0, 0, 0, 0, -1)),  # oblique: the frontal chest convention
        (["L", "L"], (1, 0, 0, 0, 0, -1)),  # not perpendicular
        ([], (1, 0, 0, 0, 0, -1)),
        (None, (1, 0, 0, 0, 0, -1)),
    ],
)
def test_orientation_from_patient_orientation(
    patient_orientation: list[str] | None, expected: tuple[int, ...]
) -> None:
    assert orientation(patient_orientation) == tuple(float(v) for v in expected)


# -- header and identity ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_same_study_own_series_modality_ot(name: str, tmp_path: Path) -> None:
    source = read_source(name)
    result = cam_result(source)
    pm = _round_trip(heatmap_parametric_map(source, result), tmp_path)
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    assert pm.PatientID == source.PatientID
    assert pm.Modality == "OT"
    assert pm.BodyPartExamined == "CHEST" and "Laterality" not in pm
    assert pm.SeriesDescription == PM_SERIES_DESCRIPTION
    others = {
        measurement_report(source, result).SeriesInstanceUID,
        heatmap_secondary_capture(source, result).SeriesInstanceUID,
        source.SeriesInstanceUID,
    }
    assert pm.SeriesInstanceUID not in others
    assert pm.SOPInstanceUID.startswith("2.25.")


def test_the_model_is_contributing_equipment_as_in_the_sr() -> None:
    source = read_source(RG1_UNCR)
    finding = make_finding(True, "confirm")
    result = cam_result(source, findings=[finding])
    pm = heatmap_parametric_map(source, result, equipment=Equipment(manufacturer="ACME"))
    (item,) = [e for e in pm.ContributingEquipmentSequence if "DeviceUID" in e]
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == (
        "ACME",
        finding.model_name,
        finding.model_version,
    )
    assert item.DeviceUID == algorithm_uid(finding.model_name, finding.model_version)
    assert pm.DeviceSerialNumber  # Type 1 in Enhanced General Equipment


def test_a_rerun_gives_the_same_bytes() -> None:
    """Every UID derived (highdicom's random Dimension Organization UID replaced) and
    every timestamp pinned: the re-run job's object is the first one, byte for byte."""
    objects = []
    for _ in range(2):
        source = read_source(RG1_UNCR)
        pm = heatmap_parametric_map(source, cam_result(source), content_datetime=MOMENT)
        pin_timestamps(pm, MOMENT)
        objects.append(encode(pm))
    assert objects[0] == objects[1]


def test_other_model_version_other_uids() -> None:
    source = read_source(RG1_UNCR)
    first = heatmap_parametric_map(source, cam_result(source))
    other = heatmap_parametric_map(source, cam_result(source, findings=[make_finding(version="9")]))
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert first.FrameOfReferenceUID == other.FrameOfReferenceUID  # the same plane


# -- registry and refusals -------------------------------------------------------------------


def test_pm_is_an_output_type_off_by_default() -> None:
    assert DEFAULT_OUTPUTS == ("sr", "sc", "seg")
    assert check_output_names(["sr", "sc", "pm"]) == ("sr", "sc", "pm")
    pm = get_output_type("pm")
    assert pm.sop_class_uid == ParametricMapStorage
    assert pm.needs == frozenset({"cam"}) and not pm.needs_priority


def test_built_with_the_rule_outputs_only_when_there_is_a_cam() -> None:
    source = read_source(RG1_UNCR)
    types = [get_output_type(name) for name in ("sr", "sc", "pm")]

    def inputs(result: ImageResult) -> BuildInputs:
        return BuildInputs(source, result, Equipment(), MOMENT, None, priority="routine")

    assert [name for name, _ in build_outputs(types, inputs(cam_result(source)))] == [
        "sr",
        "sc",
        "pm",
    ]
    without = make_result(source)  # Grad-CAM switched off: no cam (the overlay is kept)
    assert [name for name, _ in build_outputs(types, inputs(without))] == ["sr", "sc"]


def test_result_without_cam_is_refused() -> None:
    source = read_source(RG1_UNCR)
    with pytest.raises(ValueError, match="Grad-CAM"):
        heatmap_parametric_map(source, make_result(source))


def test_heatmap_on_another_grid_is_refused() -> None:
    source = read_source(RG1_UNCR)
    result = cam_result(source)
    result.image_shape = (100, 100)
    with pytest.raises(ValueError, match="grid"):
        heatmap_parametric_map(source, result)


def test_result_of_another_image_is_refused() -> None:
    source = read_source(RG1_UNCR)
    with pytest.raises(ValueError, match="belongs to"):
        heatmap_parametric_map(source, cam_result(read_source("siim-cr-jpegbaseline.dcm")))


def test_no_patient_data_in_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")  # a name without "^"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = heatmap_parametric_map(source, cam_result(source))
    assert pm.PatientName == source.PatientName
    emitted = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for value in (str(source.PatientName), str(source.PatientID)):
        assert not [m for m in emitted if value in m]
