"""The heatmap secondary capture: conformance (dciodvfy), pixels, references, identity."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.results.heatmap_sc import SC_SERIES_DESCRIPTION, heatmap_secondary_capture
from dicom_node.results.sr import measurement_report
from dicom_node.results.uids import algorithm_uid
from tests.dciodvfy import assert_conformant
from tests.results_data import (
    CHEST_SOURCES,
    OUTCOMES,
    RG1_UNCR,
    make_finding,
    make_result,
    read_source,
)

SC_IOD = "SCImage"


def _round_trip(sc: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


# -- conformance ---------------------------------------------------------------------------


@pytest.mark.parametrize("present,stage", OUTCOMES)
@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_dciodvfy_reports_no_errors(name: str, present: bool, stage: str, tmp_path: Path) -> None:
    source = read_source(name)
    result = make_result(source, [make_finding(present, stage)])
    assert_conformant(heatmap_secondary_capture(source, result), tmp_path, SC_IOD)


@pytest.mark.parametrize("body_part", ["THORAX", "LUNG", "CHEST_LAT", None])
def test_body_part_is_chest_and_laterality_absent(body_part: str | None, tmp_path: Path) -> None:
    """The gate's chest synonyms and a missing body part all become the unpaired CHEST."""
    source = read_source(RG1_UNCR)
    if body_part is None:
        del source.BodyPartExamined
    else:
        source.BodyPartExamined = body_part
    sc = heatmap_secondary_capture(source, make_result(source))
    assert sc.BodyPartExamined == "CHEST"
    assert "Laterality" not in sc
    assert_conformant(sc, tmp_path, SC_IOD)


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_modality_is_ot_whatever_the_source(name: str, tmp_path: Path) -> None:
    """A PACS rule that forwards CR and DX to the node must not send the heatmap back."""
    source = read_source(name)
    assert source.Modality in ("CR", "DX")
    sc = heatmap_secondary_capture(source, make_result(source))
    assert sc.Modality == "OT"
    assert "AI" in sc.SeriesDescription and "heatmap" in sc.SeriesDescription


def test_modality_override(tmp_path: Path) -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")
    sc = heatmap_secondary_capture(source, make_result(source), modality="CR")
    assert sc.Modality == "CR"
    assert_conformant(sc, tmp_path, SC_IOD)


# -- image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_rgb_pixels_are_the_overlay(name: str, tmp_path: Path) -> None:
    source = read_source(name)
    result = make_result(source)
    sc = _round_trip(heatmap_secondary_capture(source, result), tmp_path)
    assert result.overlay is not None
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
    assert (sc.BitsAllocated, sc.BitsStored, sc.PlanarConfiguration) == (8, 8, 0)
    assert (sc.Rows, sc.Columns) == result.overlay.shape[:2]
    assert max(sc.Rows, sc.Columns) <= 1024
    np.testing.assert_array_equal(sc.pixel_array, result.overlay)


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_header_marks_a_derived_annotated_capture(name: str, tmp_path: Path) -> None:
    source = read_source(name)
    finding = make_finding()
    sc = _round_trip(heatmap_secondary_capture(source, make_result(source, [finding])), tmp_path)
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    assert sc.Modality == "OT"
    assert sc.BodyPartExamined == "CHEST"
    assert "Laterality" not in sc
    assert f"{finding.model_name} {finding.model_version}" in sc.DerivationDescription
    assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
    assert "PixelSpacing" not in sc
    assert sc.ContentDate and sc.ContentTime


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_same_study_new_series_and_source_reference(name: str, tmp_path: Path) -> None:
    source = read_source(name)
    sc = _round_trip(heatmap_secondary_capture(source, make_result(source)), tmp_path)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.PatientID == source.PatientID
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    resampled = (sc.Rows, sc.Columns) != (source.Rows, source.Columns)
    assert reference.SpatialLocationsPreserved == ("NO" if resampled else "YES")
    assert ("DerivationCodeSequence" in sc) == resampled


def test_patient_orientation_copied_or_empty(tmp_path: Path) -> None:
    rg1 = read_source(RG1_UNCR)
    sc = _round_trip(heatmap_secondary_capture(rg1, make_result(rg1)), tmp_path)
    assert list(sc.PatientOrientation) == list(rg1.PatientOrientation)
    siim = read_source("siim-cr-jpegbaseline.dcm")
    sc = heatmap_secondary_capture(siim, make_result(siim))
    assert "PatientOrientation" in sc and not sc.PatientOrientation


def test_lossy_history_is_kept(tmp_path: Path) -> None:
    """PS3.3 C.7.6.1.1.5: an image derived from a lossy one says so."""
    source = read_source("siim-cr-jpegbaseline.dcm")
    sc = heatmap_secondary_capture(source, make_result(source))
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == source.LossyImageCompressionMethod
    uncompressed = read_source(RG1_UNCR)
    assert "LossyImageCompression" not in heatmap_secondary_capture(
        uncompressed, make_result(uncompressed)
    )


def test_acquisition_equipment_is_recorded_when_known() -> None:
    rg1 = read_source(RG1_UNCR)
    sc = heatmap_secondary_capture(rg1, make_result(rg1))
    assert rg1.Manufacturer in [e.Manufacturer for e in sc.ContributingEquipmentSequence]
    nih = read_source("nih-00000001_000-dx-sc.dcm")  # no Manufacturer: algorithm, highdicom
    sequence = heatmap_secondary_capture(nih, make_result(nih)).ContributingEquipmentSequence
    assert [e.PurposeOfReferenceCodeSequence[0].CodeValue for e in sequence] == [
        "109102",
        "109102",
    ]


def test_the_model_behind_the_heatmap_is_contributing_equipment(tmp_path: Path) -> None:
    """Processing Equipment named as the SR's TID 4019 names it, with the same Device UID."""
    source = read_source(RG1_UNCR)
    finding = make_finding(True, "screen")
    result = make_result(source, [finding])
    sc = _round_trip(heatmap_secondary_capture(source, result), tmp_path)
    (item,) = [e for e in sc.ContributingEquipmentSequence if e.get("DeviceUID") is not None]
    assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert (item.ManufacturerModelName, item.SoftwareVersions) == (
        finding.model_name,
        finding.model_version,
    )
    assert item.DeviceUID == algorithm_uid(finding.model_name, finding.model_version)
    sr = measurement_report(source, result)
    assert item.DeviceUID in [e.get("DeviceUID") for e in sr.ContributingEquipmentSequence]


def test_missing_type2_attributes_are_sent_empty() -> None:
    source = read_source("nih-00000001_000-dx-sc.dcm")
    sc = heatmap_secondary_capture(source, make_result(source))
    for keyword in ("PatientName", "PatientBirthDate", "StudyID", "AccessionNumber"):
        assert keyword in sc and not sc[keyword].value, keyword


# -- identity and refusals -------------------------------------------------------------------


def test_building_twice_gives_identical_uids_and_other_version_others() -> None:
    source = read_source(RG1_UNCR)
    first = heatmap_secondary_capture(source, make_result(source))
    again = heatmap_secondary_capture(read_source(RG1_UNCR), make_result(source))
    other = heatmap_secondary_capture(source, make_result(source, [make_finding(version="2")]))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert first.SOPInstanceUID != other.SOPInstanceUID


def test_sc_and_sr_of_one_image_are_distinct_objects() -> None:
    source = read_source(RG1_UNCR)
    result = make_result(source)
    sc = heatmap_secondary_capture(source, result)
    sr = measurement_report(source, result)
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
    assert sc.SOPInstanceUID != sr.SOPInstanceUID


def test_result_without_overlay_is_refused() -> None:
    source = read_source(RG1_UNCR)
    with pytest.raises(ValueError, match="overlay"):
        heatmap_secondary_capture(source, make_result(source, overlay=False))


def test_result_of_another_image_is_refused() -> None:
    source = read_source(RG1_UNCR)
    with pytest.raises(ValueError, match="belongs to"):
        heatmap_secondary_capture(source, make_result(read_source("siim-cr-jpegbaseline.dcm")))


def test_no_patient_data_in_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")  # a name without "^"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc = heatmap_secondary_capture(source, make_result(source))
    assert sc.PatientName == source.PatientName
    emitted = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for value in (str(source.PatientName), str(source.PatientID)):
        assert not [m for m in emitted if value in m]
