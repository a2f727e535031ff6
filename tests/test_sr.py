"""The TID 1500 measurement report: conformance (dciodvfy, PixelMed), content tree, identity."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, Comprehensive3DSRStorage

from dicom_node.results.common import PRIVATE_SCHEME, Equipment, source_header
from dicom_node.results.sr import (
    ABSENT,
    IN_DOMAIN,
    PRESENT,
    PRIORITY,
    PROBABILITY,
    PROCEDURE_REPORTED,
    QUALITATIVE_EVALUATIONS,
    SR_SERIES_DESCRIPTION,
    measurement_report,
)
from dicom_node.results.uids import algorithm_uid, derived_uid
from inference.cascade import NOT_SCORED, ImageResult
from tests.dciodvfy import assert_conformant
from tests.pixelmed import assert_valid_sr
from tests.results_data import (
    CHEST_SOURCES,
    OUTCOMES,
    PNEUMONIA,
    RG1_UNCR,
    make_finding,
    make_result,
    read_source,
)

SR_IOD = "Comprehensive3DSR"
FINDING = hd.sr.CodedConcept(PNEUMONIA.code, PNEUMONIA.scheme, PNEUMONIA.meaning)


def _round_trip(sr: Dataset, tmp_path: Path) -> hd.sr.Comprehensive3DSR:
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))


def _report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr.content


def _group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = _report(sr).get_image_measurement_groups(finding_type=FINDING)
    assert len(groups) == 1
    return groups[0]


def _evaluations(sr: hd.sr.Comprehensive3DSR) -> dict[str, object]:
    """The document's Qualitative Evaluations (TID 1500 row 12) by concept name meaning."""
    (container,) = find_content_items(sr.content[0], name=QUALITATIVE_EVALUATIONS)
    return {item.name.meaning: item.value for item in container.ContentSequence}


def _two_models_result(source: Dataset) -> ImageResult:
    """Pneumonia confirmed by the confirm model, effusion ruled out by the screen model."""
    effusion = make_finding(False, "screen", probability=0.2)
    effusion = type(effusion)(
        label=type(PNEUMONIA)("effusion", "60046008", "SCT", "Pleural effusion"),
        probability=0.2,
        present=False,
        stage="screen",
        threshold=0.3,
        model_name=effusion.model_name,
        model_version=effusion.model_version,
    )
    return make_result(source, [make_finding(True, "confirm"), effusion])


# -- conformance ---------------------------------------------------------------------------


@pytest.mark.parametrize("present,stage", OUTCOMES)
@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_dciodvfy_reports_no_errors(name: str, present: bool, stage: str, tmp_path: Path) -> None:
    source = read_source(name)
    result = make_result(source, [make_finding(present, stage)])
    assert_conformant(measurement_report(source, result), tmp_path, SR_IOD)


def test_dciodvfy_with_priority_warnings_and_no_gate(tmp_path: Path) -> None:
    source = read_source("nih-00000001_000-dx-sc.dcm")
    result = make_result(source, in_domain=None, ood_distance=None, warnings=["inverted"])
    assert_conformant(measurement_report(source, result, priority="stat"), tmp_path, SR_IOD)


def test_pixelmed_finds_no_error_and_no_warning_in_a_full_report(tmp_path: Path) -> None:
    """Image library, a call, the gate, the priority and a warning: every row we write."""
    source = read_source(RG1_UNCR)
    source.ImagerPixelSpacing = [0.1, 0.1]
    result = make_result(source, warnings=["pixel polarity contradicts PI; image was inverted"])
    report = assert_valid_sr(measurement_report(source, result, priority="urgent"), tmp_path)
    assert report.iod == SR_IOD


def test_pixelmed_with_two_models_an_absent_call_and_no_gate(tmp_path: Path) -> None:
    source = read_source("nih-00000001_000-dx-sc.dcm")
    result = _two_models_result(source)
    result.in_domain, result.ood_distance = None, None
    assert_valid_sr(measurement_report(source, result), tmp_path)


def test_image_library_for_a_describable_projection_radiograph(tmp_path: Path) -> None:
    """With Imager Pixel Spacing and Patient Orientation the TID 1600 library is written."""
    source = read_source(RG1_UNCR)
    source.ImagerPixelSpacing = [0.1, 0.1]
    sr = measurement_report(source, make_result(source))
    assert_conformant(sr, tmp_path, SR_IOD)
    library = find_content_items(sr.content[0], name=codes.DCM.ImageLibrary)
    assert len(library) == 1


def test_no_image_library_when_highdicom_cannot_describe_the_source() -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")  # empty Patient Orientation
    sr = measurement_report(source, make_result(source))
    assert find_content_items(sr.content[0], name=codes.DCM.ImageLibrary) == []


# -- header ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_same_study_new_series(name: str, tmp_path: Path) -> None:
    source = read_source(name)
    sr = _round_trip(measurement_report(source, make_result(source)), tmp_path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID != source.SOPInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.ContentDate and sr.ContentTime
    evidence = sr.get_evidence()
    assert [e[2] for e in evidence] == [source.SOPInstanceUID]


def test_missing_type2_attributes_are_sent_empty(tmp_path: Path) -> None:
    """The NIH SC image has no name, birth date, study ID, accession or referrer."""
    source = read_source("nih-00000001_000-dx-sc.dcm")
    for keyword in ("PatientName", "PatientBirthDate", "StudyID", "AccessionNumber"):
        assert keyword not in source
    sr = _round_trip(measurement_report(source, make_result(source)), tmp_path)
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDate",
        "StudyTime",
    ):
        assert keyword in sr and not sr[keyword].value, keyword
    assert sr.PatientSex == source.PatientSex
    assert "PatientAge" not in sr  # the source's "58" is not a valid Age String


def test_equipment_identifies_the_node(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    equipment = Equipment(
        manufacturer="ACME", model_name="cxr", software_versions="2.0", station_name="AI1"
    )
    sr = _round_trip(measurement_report(source, make_result(source), equipment=equipment), tmp_path)
    assert sr.Manufacturer == "ACME"
    assert (sr.ManufacturerModelName, sr.SoftwareVersions) == ("cxr", "2.0")
    assert sr.StationName == "AI1"
    observers = _report(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    device = observers[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == equipment.device_uid
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert PRIVATE_SCHEME in schemes


# -- content tree ------------------------------------------------------------------------------


@pytest.mark.parametrize("present,stage", OUTCOMES)
def test_finding_group_content(present: bool, stage: str, tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    finding = make_finding(present, stage, probability=0.6543, threshold=0.42)
    sr = _round_trip(measurement_report(source, make_result(source, [finding])), tmp_path)

    assert sr.content[0].ContentSequence  # the root container
    procedure = find_content_items(sr.content[0], name=codes.DCM.ProcedureReported)
    assert procedure[0].value == PROCEDURE_REPORTED

    group = _group(sr)
    assert group.finding_type == FINDING
    assert group.tracking_uid is not None
    (probability,) = group.get_measurements(name=PROBABILITY)
    assert probability.value == pytest.approx(0.6543)
    assert probability.unit == hd.sr.CodedConcept("1", "UCUM", "no units")
    assert group.get_qualitative_evaluations() == []  # the calls are at document level
    evaluations = _evaluations(sr)
    assert evaluations[FINDING.meaning] == (PRESENT if present else ABSENT)
    assert evaluations[IN_DOMAIN.meaning] == codes.SCT.Yes

    algorithm = {
        item.name.meaning: item.value
        for item in find_content_items(group[0], relationship_type="HAS CONCEPT MOD")
    }
    assert algorithm["Algorithm Name"] == finding.model_name
    assert algorithm["Algorithm Version"] == finding.model_version
    parameters = [
        item.value for item in find_content_items(group[0], name=codes.DCM.AlgorithmParameters)
    ]
    assert parameters == ["threshold=0.42", f"stage={stage}"]

    (image,) = group.source_images
    assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    assert probability.referenced_images[0].referenced_sop_instance_uid == source.SOPInstanceUID


def test_one_group_per_finding(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    sr = _round_trip(measurement_report(source, _two_models_result(source)), tmp_path)
    groups = _report(sr).get_image_measurement_groups()
    assert [g.finding_type for g in groups] == [
        FINDING,
        hd.sr.CodedConcept("60046008", "SCT", "Pleural effusion"),
    ]
    assert len({g.tracking_uid for g in groups}) == 2
    evaluations = _evaluations(sr)
    assert evaluations[FINDING.meaning] == PRESENT
    assert evaluations["Pleural effusion"] == ABSENT


def test_priority_and_warnings_at_study_level(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    result = make_result(source, warnings=["pixel polarity contradicts PI; image was inverted"])
    sr = _round_trip(measurement_report(source, result, priority="Urgent"), tmp_path)
    values = _evaluations(sr)
    assert values[PRIORITY.meaning] == hd.sr.CodedConcept("103391001", "SCT", "Urgent")
    assert values["Comment"] == result.warnings[0]


def test_without_priority_warnings_or_gate_only_the_calls_are_evaluated() -> None:
    source = read_source(RG1_UNCR)
    sr = measurement_report(source, make_result(source, in_domain=None))
    (container,) = find_content_items(sr.content[0], name=QUALITATIVE_EVALUATIONS)
    assert [item.name for item in container.ContentSequence] == [FINDING]


# -- contributing equipment (IHE AI Results) --------------------------------------------------


def _algorithm_items(ds: Dataset) -> list[Dataset]:
    return [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and item.Manufacturer != "Highdicom open-source contributors"
    ]


def test_every_model_is_contributing_equipment_as_tid_4019_names_it(tmp_path: Path) -> None:
    source = read_source(RG1_UNCR)
    result = _two_models_result(source)
    equipment = Equipment(manufacturer="ACME")
    sr = _round_trip(measurement_report(source, result, equipment=equipment), tmp_path)
    items = _algorithm_items(sr)
    names = [(f.model_name, f.model_version) for f in result.findings]
    assert [(i.ManufacturerModelName, i.SoftwareVersions) for i in items] == names
    for item, (name, version) in zip(items, names, strict=True):
        assert item.Manufacturer == "ACME"
        assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
        assert item.DeviceUID == algorithm_uid(name, version)
        assert item.DeviceUID.startswith("2.25.")
    tid_4019 = [
        tuple(
            item.value
            for item in find_content_items(group[0], relationship_type="HAS CONCEPT MOD")
            if item.name in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)
        )
        for group in _report(sr).get_image_measurement_groups()
    ]
    assert tid_4019 == names


def test_one_item_for_findings_of_the_same_model() -> None:
    source = read_source(RG1_UNCR)
    second = make_finding(False, "confirm")
    second = type(second)(
        type(PNEUMONIA)("effusion", "60046008", "SCT", "Pleural effusion"),
        *[getattr(second, f) for f in ("probability", "present", "stage", "threshold")],
        second.model_name,
        second.model_version,
    )
    sr = measurement_report(source, make_result(source, [make_finding(), second]))
    assert len(_algorithm_items(sr)) == 1


def test_algorithm_device_uid_is_the_model_identity() -> None:
    assert algorithm_uid("m", "1") == algorithm_uid("m", "1")
    assert algorithm_uid("m", "1") != algorithm_uid("m", "2")
    assert algorithm_uid("m", "1", "ab" * 32) != algorithm_uid("m", "1")


def test_unknown_priority_is_refused() -> None:
    source = read_source(RG1_UNCR)
    with pytest.raises(ValueError, match="priority"):
        measurement_report(source, make_result(source), priority="asap")


def test_unscored_result_is_refused() -> None:
    source = read_source(RG1_UNCR)
    result = ImageResult(source.SOPInstanceUID, NOT_SCORED, "not a chest radiograph")
    with pytest.raises(ValueError, match="not_scored"):
        measurement_report(source, result)


def test_result_of_another_image_is_refused() -> None:
    source = read_source(RG1_UNCR)
    result = make_result(read_source("siim-cr-jpegbaseline.dcm"))
    with pytest.raises(ValueError, match="belongs to"):
        measurement_report(source, result)


# -- identity ----------------------------------------------------------------------------------


def _uids(sr: Dataset) -> tuple[str, str]:
    return str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)


@pytest.mark.parametrize("name", CHEST_SOURCES)
def test_building_twice_gives_identical_uids(name: str) -> None:
    source = read_source(name)
    first = measurement_report(source, make_result(source))
    again = measurement_report(read_source(name), make_result(source))
    assert _uids(first) == _uids(again)
    for uid in _uids(first):
        assert uid.startswith("2.25.") and UID(uid).is_valid


def test_other_model_version_or_threshold_gives_other_uids() -> None:
    source = read_source(RG1_UNCR)
    base = _uids(measurement_report(source, make_result(source, [make_finding()])))
    version = _uids(measurement_report(source, make_result(source, [make_finding(version="9")])))
    threshold = _uids(
        measurement_report(source, make_result(source, [make_finding(threshold=0.3)]))
    )
    assert len({base[0], version[0], threshold[0]}) == 3
    assert len({base[1], version[1], threshold[1]}) == 3


def test_probability_alone_does_not_change_the_identity() -> None:
    """A re-run may differ in the last float digits; it is the same result."""
    source = read_source(RG1_UNCR)
    a = measurement_report(source, make_result(source, [make_finding(probability=0.81)]))
    b = measurement_report(source, make_result(source, [make_finding(probability=0.8100001)]))
    assert _uids(a) == _uids(b)


def test_images_of_one_series_share_the_result_series() -> None:
    rg1 = read_source(RG1_UNCR)
    j2k = read_source("rg1-chest-cr-mono1-j2k.dcm")  # same series, another instance
    assert rg1.SeriesInstanceUID == j2k.SeriesInstanceUID
    a = measurement_report(rg1, make_result(rg1))
    b = measurement_report(j2k, make_result(j2k))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert (a.InstanceNumber, b.InstanceNumber) == (1, 3)  # the sources' numbers


def test_derived_uids_respect_part_boundaries() -> None:
    """Unlike generate_uid's concatenated entropy, ("ab", "c") and ("a", "bc") differ."""
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert derived_uid("ab", "c") == derived_uid("ab", "c")
    assert len(derived_uid("x" * 200)) <= 64


# -- privacy -------------------------------------------------------------------------------------


def test_no_patient_data_in_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    """highdicom echoes odd person names in warnings; names must go in by copy instead."""
    source = read_source("siim-cr-jpegbaseline.dcm")  # a name without "^"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = measurement_report(source, make_result(source))
    assert sr.PatientName == source.PatientName
    emitted = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for value in (str(source.PatientName), str(source.PatientID)):
        assert not [m for m in emitted if value in m]


def test_header_copy_drops_invalid_values_and_bulk_data() -> None:
    source = read_source("nih-00000001_000-dx-sc.dcm")
    header = source_header(source)
    assert "PixelData" not in header and "PatientAge" not in header
    assert header.PatientID == source.PatientID


def test_header_copy_keeps_identifiers_verbatim_even_when_invalid() -> None:
    """The PACS matches the SR to its patient by these; a mismatch would misfile it."""
    source = read_source(RG1_UNCR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.PatientID = "X" * 70  # longer than LO allows
        source.PatientAge = "58"  # not an Age String
    header = source_header(source)
    assert header.PatientID == source.PatientID
    assert "PatientAge" not in header


def test_source_variant_gives_a_changed_source_its_own_report_uid() -> None:
    """A source re-sent with other content under its old UID must not share the SR UID."""
    from tests.results_data import make_finding, make_result, read_source

    source = read_source("nih-00000001_000-dx-sc.dcm")
    result = make_result(source, [make_finding(True, "confirm")])
    plain = measurement_report(source, result)
    variant = measurement_report(source, result, source_variant="ab" * 32)
    assert variant.SOPInstanceUID != plain.SOPInstanceUID
    assert variant.SeriesInstanceUID == plain.SeriesInstanceUID
    again = measurement_report(source, result, source_variant="ab" * 32)
    assert again.SOPInstanceUID == variant.SOPInstanceUID
