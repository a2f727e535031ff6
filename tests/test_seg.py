"""The anatomy Segmentation: conformance (dciodvfy, dcentvfy, Orthanc), segments, pixels,
identity.

Built from the real chest sources of :mod:`tests.results_data` and a flat-panel-sized DX
(:func:`large_dx`: the shared data has no DX chest that large), with synthetic but
plausible masks on the network's 256 × 256 grid (:func:`chest_masks`: two lung ellipses
and a heart ellipse overlapping the left lung, which :func:`inference.anatomy.implausible`
accepts).
"""

from __future__ import annotations

import datetime
import logging
import subprocess
import warnings
from copy import deepcopy
from functools import cache
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node.dispatch import DicomDestination, get_sender
from dicom_node.outputs import build_outputs, encode, pin_timestamps
from dicom_node.results.common import Equipment
from dicom_node.results.heatmap_sc import heatmap_secondary_capture
from dicom_node.results.registry import BuildInputs, check_output_names, get_output_type
from dicom_node.results.seg import (
    SEG_SERIES_DESCRIPTION,
    anatomy_segmentation,
    resample_masks,
)
from dicom_node.results.sr import measurement_report
from dicom_node.results.uids import algorithm_uid, derived_uid, segmentation_uids
from inference.anatomy import SEGMENT_SIZE, STRUCTURES, Anatomy, implausible
from inference.cascade import ImageResult
from tests.dciodvfy import assert_conformant
from tests.e2e.orthanc import Orthanc, orthanc, orthanc_modalities  # noqa: F401
from tests.results_data import (
    CHEST_SOURCES,
    RG1_UNCR,
    make_result,
    read_source,
    source_path,
)

SEG_IOD = "Segmentation"
MODEL = ("cxr_anatomy_segment_unet", "1.0.0")
MOMENT = datetime.datetime(2026, 3, 4, 5, 6, 7, 890000)
LARGE_DX = "large-dx"  # built by large_dx(), not a file of the shared data
LARGE_DX_SHAPE = (2500, 2048)
SOURCES = (*CHEST_SOURCES, LARGE_DX)
NODE_AET = "CXR_AI"


@cache
def chest_masks(size: int = SEGMENT_SIZE) -> np.ndarray:
    """Heart, right lung, left lung (bool, 3 × size × size): ellipses where a frontal
    chest has them — the patient's right lung on the image's left, the heart shadow
    left of centre and over part of the left lung."""
    y, x = np.mgrid[0:size, 0:size] / size
    right = ((x - 0.3) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2 <= 1
    left = ((x - 0.7) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2 <= 1
    heart = ((x - 0.55) / 0.15) ** 2 + ((y - 0.62) / 0.12) ** 2 <= 1
    masks = np.stack([heart, right, left])
    masks.flags.writeable = False  # shared between tests
    return masks


@cache
def _large_dx() -> Dataset:
    source = read_source(RG1_UNCR)
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, For Presentation
    source.SOPInstanceUID = derived_uid("test-seg", "large-dx", "instance")
    source.SeriesInstanceUID = derived_uid("test-seg", "large-dx", "series")
    source.file_meta.MediaStorageSOPClassUID = source.SOPClassUID
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    source.Modality = "DX"
    source.Rows, source.Columns = LARGE_DX_SHAPE
    del source.PixelSpacing  # a detector's spacing only: no Pixel Measures in the SEG
    source.ImagerPixelSpacing = [0.139, 0.139]
    source.PixelData = np.zeros(LARGE_DX_SHAPE, dtype=np.uint16).tobytes()
    return source


def large_dx() -> Dataset:
    """A flat-panel-sized DX (2500 × 2048): RG1_UNCR's patient and study, other UIDs."""
    return deepcopy(_large_dx())


def source_of(name: str) -> Dataset:
    return large_dx() if name == LARGE_DX else read_source(name)


def saved_source(name: str, directory: Path) -> Path:
    if name != LARGE_DX:
        return source_path(name)
    path = directory / "large-dx.dcm"
    large_dx().save_as(path, enforce_file_format=True)
    return path


def anatomy(status: str = "assessed", version: str = MODEL[1]) -> Anatomy:
    return Anatomy(np.array(chest_masks()), status, model_name=MODEL[0], model_version=version)


def seg_result(source: Dataset, **kwargs: object) -> ImageResult:
    """A scored result with assessed anatomy."""
    result = make_result(source, **kwargs)  # type: ignore[arg-type]
    result.anatomy = anatomy()
    return result


def _round_trip(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _frames_by_segment(seg: Dataset) -> dict[int, np.ndarray]:
    """Decoded frames (bool) by the Referenced Segment Number of their functional group."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    numbers = [
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    return {number: pixels[i].astype(bool) for i, number in enumerate(numbers)}


def test_the_test_masks_are_a_plausible_chest() -> None:
    assert implausible(chest_masks()) is None


# -- conformance ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_dciodvfy_reports_no_error(name: str, tmp_path: Path) -> None:
    """Zero errors, and only the warnings every output has (tests/dciodvfy.py)."""
    source = source_of(name)
    assert_conformant(anatomy_segmentation(source, seg_result(source)), tmp_path, SEG_IOD)


def _dcentvfy(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("name", SOURCES)
def test_dcentvfy_finds_source_sr_and_seg_of_one_patient_and_study(
    name: str, tmp_path: Path
) -> None:
    source = source_of(name)
    result = seg_result(source)
    paths = [saved_source(name, tmp_path)]
    for kind, ds in (
        ("sr", measurement_report(source, result, priority="routine")),
        ("seg", anatomy_segmentation(source, result)),
    ):
        paths.append(tmp_path / f"{kind}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    proc = _dcentvfy(paths)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output
    assert "different value" not in output, output


def test_orthanc_accepts_it_from_the_nodes_sender(orthanc: Orthanc) -> None:  # noqa: F811
    """C-STORE with the node's own ``dicom`` sender (Explicit VR Little Endian); Orthanc
    files it in the source's study and gives back the same pixels."""
    source = read_source("rg1-chest-cr-mono1-j2k.dcm")
    seg = anatomy_segmentation(source, seg_result(source))
    target = DicomDestination(
        name="pacs", ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port
    )
    (outcome,) = get_sender("dicom").send(target, [seg], NODE_AET)
    assert outcome.success and outcome.status == 0x0000, outcome
    instance = orthanc.find_instance(str(seg.SOPInstanceUID))
    assert instance
    tags = orthanc.get_instance_tags(instance)
    assert tags["SOPClassUID"] == SegmentationStorage
    assert tags["Modality"] == "SEG"
    assert tags["StudyInstanceUID"] == source.StudyInstanceUID
    stored = pydicom.dcmread(BytesIO(orthanc.download(instance)))
    assert stored.PixelData == seg.PixelData
    assert len(stored.SegmentSequence) == len(STRUCTURES)


# -- segments --------------------------------------------------------------------------------


def test_segments_are_heart_right_lung_left_lung_by_number(tmp_path: Path) -> None:
    """Numbers 1-3 in the order the SR references them; category, type, label, algorithm."""
    source = read_source(RG1_UNCR)
    seg = _round_trip(anatomy_segmentation(source, seg_result(source)), tmp_path)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    for segment, structure in zip(seg.SegmentSequence, STRUCTURES, strict=True):
        assert segment.SegmentLabel == structure.meaning
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("123037004", "SCT")
        assert category.CodeMeaning == "Anatomical Structure"
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            structure.code,
            "SCT",
            structure.meaning,
        )
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == MODEL
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert "RecommendedDisplayCIELabValue" in segment
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Heart", "Right lung", "Left lung"]
    assert seg.SegmentsOverlap == "YES"  # the heart shadow lies over the left lung


def test_highdicom_reads_it_back_by_segment_number(tmp_path: Path) -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")  # with a Pixel Spacing
    seg = hd.seg.Segmentation.from_dataset(
        _round_trip(anatomy_segmentation(source, seg_result(source)), tmp_path)
    )
    (heart,) = seg.get_segment_numbers(segment_label="Heart")
    assert heart == 1
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(source.SOPInstanceUID)], segment_numbers=[1, 2, 3]
    )
    expected = resample_masks(chest_masks(), (source.Rows, source.Columns))
    np.testing.assert_array_equal(pixels[0].astype(bool), expected)


# -- pixels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [RG1_UNCR, LARGE_DX])
def test_frames_are_the_masks_on_the_source_grid(name: str, tmp_path: Path) -> None:
    """One frame per segment, on the source's rows × columns, equal to the resampled
    masks; each structure keeps its share of the image within 2 %."""
    source = source_of(name)
    seg = _round_trip(anatomy_segmentation(source, seg_result(source)), tmp_path)
    grid = (int(source.Rows), int(source.Columns))
    assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (*grid, len(STRUCTURES))
    assert (seg.BitsAllocated, seg.BitsStored) == (1, 1)
    frames = _frames_by_segment(seg)
    expected = resample_masks(chest_masks(), grid)
    assert expected.shape == (*grid, len(STRUCTURES))
    for number, structure in enumerate(STRUCTURES, start=1):
        np.testing.assert_array_equal(frames[number], expected[..., number - 1], structure.name)
        share = frames[number].mean()
        working_share = chest_masks()[number - 1].mean()
        assert share == pytest.approx(working_share, rel=0.02), structure.name


def test_an_empty_segment_keeps_its_frame(tmp_path: Path) -> None:
    """Frame n is segment n even when a mask is empty."""
    source = read_source("siim-cr-jpegbaseline.dcm")
    result = seg_result(source)
    assert result.anatomy is not None
    result.anatomy.masks = np.array(chest_masks())
    result.anatomy.masks[0] = False
    seg = _round_trip(anatomy_segmentation(source, result), tmp_path)
    frames = _frames_by_segment(seg)
    assert sorted(frames) == [1, 2, 3]
    assert not frames[1].any() and frames[2].any() and frames[3].any()


def test_resampling_a_large_image_is_quick_and_small() -> None:
    masks = resample_masks(chest_masks(), LARGE_DX_SHAPE)
    assert masks.dtype == bool and masks.shape == (*LARGE_DX_SHAPE, 3)
    source = large_dx()
    seg = anatomy_segmentation(source, seg_result(source))
    # 1 bit a pixel: three 2500 × 2048 frames in under 2 MB.
    assert len(seg.PixelData) == -(-LARGE_DX_SHAPE[0] * LARGE_DX_SHAPE[1] * 3 // 8)
    assert len(encode(seg)) < 2_000_000


# -- geometry ----------------------------------------------------------------------------------


def test_no_invented_plane_on_a_projection_radiograph(tmp_path: Path) -> None:
    """No Frame of Reference, the source's Patient Orientation, the source referenced
    pixel for pixel."""
    source = read_source(RG1_UNCR)  # Patient Orientation L\F
    seg = _round_trip(anatomy_segmentation(source, seg_result(source)), tmp_path)
    assert "FrameOfReferenceUID" not in seg
    assert list(seg.PatientOrientation) == ["L", "F"]
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        assert "PlanePositionSequence" not in frame
        reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.SpatialLocationsPreserved == "YES"
        assert frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number


@pytest.mark.parametrize("name", SOURCES)
def test_no_pixel_measures(name: str) -> None:
    """Not even the source's Pixel Spacing (siim has 0.168 mm): see the module docstring."""
    source = source_of(name)
    seg = anatomy_segmentation(source, seg_result(source))
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert "PixelSpacing" not in seg


def test_a_frame_of_reference_without_a_plane_is_not_copied() -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")
    source.FrameOfReferenceUID = derived_uid("test-seg", "frame-of-reference")
    seg = anatomy_segmentation(source, seg_result(source))
    assert "FrameOfReferenceUID" not in seg


def test_patient_orientation_is_empty_when_the_source_has_none() -> None:
    source = read_source("nih-00000001_000-dx-sc.dcm")
    assert not source.get("PatientOrientation")
    seg = anatomy_segmentation(source, seg_result(source))
    assert "PatientOrientation" in seg and not seg.PatientOrientation


# -- header and identity ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_same_study_own_series_modality_seg(name: str, tmp_path: Path) -> None:
    source = source_of(name)
    result = seg_result(source)
    seg = _round_trip(anatomy_segmentation(source, result, content_datetime=MOMENT), tmp_path)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientID == source.PatientID
    assert str(seg.PatientName or "") == str(source.get("PatientName") or "")  # NIH: none
    assert seg.Modality == "SEG"
    assert seg.BodyPartExamined == "CHEST" and "Laterality" not in seg
    assert seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert (seg.ContentDate, seg.ContentTime) == ("20260304", "050607.890000")
    others = {
        measurement_report(source, result).SeriesInstanceUID,
        heatmap_secondary_capture(source, result).SeriesInstanceUID,
        source.SeriesInstanceUID,
    }
    assert seg.SeriesInstanceUID not in others


def test_uids_are_the_ones_the_sr_references() -> None:
    source = read_source(RG1_UNCR)
    seg = anatomy_segmentation(source, seg_result(source), source_variant="v2")
    uids = segmentation_uids(source, *MODEL, "v2")
    assert (seg.SOPInstanceUID, seg.SeriesInstanceUID) == (
        uids.sop_instance_uid,
        uids.series_instance_uid,
    )


def test_the_model_is_contributing_equipment() -> None:
    source = read_source(RG1_UNCR)
    equipment = Equipment(
        manufacturer="ACME", station_name="CXR_AI", institution_name="General Hospital"
    )
    seg = anatomy_segmentation(source, seg_result(source), equipment=equipment)
    assert (seg.Manufacturer, seg.ManufacturerModelName) == ("ACME", equipment.model_name)
    assert (seg.StationName, seg.InstitutionName) == ("CXR_AI", "General Hospital")
    assert seg.DeviceSerialNumber == str(equipment.device_uid)  # Type 1: none configured
    (item,) = [e for e in seg.ContributingEquipmentSequence if "DeviceUID" in e]
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == (
        "ACME",
        *MODEL,
    )
    assert item.DeviceUID == algorithm_uid(*MODEL)


def test_a_rerun_gives_the_same_bytes() -> None:
    """Every UID derived and every timestamp pinned: the re-run job's object is the
    first one, byte for byte."""
    objects = []
    for _ in range(2):
        source = read_source(RG1_UNCR)
        seg = anatomy_segmentation(source, seg_result(source), content_datetime=MOMENT)
        pin_timestamps(seg, MOMENT)
        objects.append(encode(seg))
    assert objects[0] == objects[1]


def test_other_model_version_other_uids() -> None:
    source = read_source(RG1_UNCR)
    first = anatomy_segmentation(source, seg_result(source))
    result = make_result(source)
    result.anatomy = anatomy(version="2.0.0")
    other = anatomy_segmentation(source, result)
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID


# -- registry and refusals -------------------------------------------------------------------


def test_seg_is_a_registered_output_type() -> None:
    seg = get_output_type("seg")
    assert seg.sop_class_uid == SegmentationStorage
    assert seg.needs == frozenset({"mask"}) and not seg.needs_priority
    assert check_output_names(["sr", "seg"]) == ("sr", "seg")


@pytest.mark.parametrize(
    "anatomy_,built",
    [(anatomy(), ["sr", "seg"]), (anatomy("not_assessed"), ["sr"]), (None, ["sr"])],
    ids=["assessed", "not-assessed", "no-anatomy"],
)
def test_built_only_when_the_anatomy_was_assessed(
    anatomy_: Anatomy | None, built: list[str]
) -> None:
    source = read_source(RG1_UNCR)
    result = make_result(source)
    result.anatomy = anatomy_
    inputs = BuildInputs(source, result, Equipment(), MOMENT, None, priority="routine")
    types = [get_output_type(name) for name in ("sr", "seg")]
    made = build_outputs(types, inputs)
    assert [name for name, _ in made] == built


def test_result_without_assessed_anatomy_is_refused() -> None:
    source = read_source(RG1_UNCR)
    result = make_result(source)
    result.anatomy = anatomy("not_assessed")
    with pytest.raises(ValueError, match="not assessed"):
        anatomy_segmentation(source, result)


def test_result_of_another_image_is_refused() -> None:
    source = read_source(RG1_UNCR)
    with pytest.raises(ValueError, match="belongs to"):
        anatomy_segmentation(source, seg_result(read_source("siim-cr-jpegbaseline.dcm")))


def test_masks_of_another_shape_are_refused() -> None:
    source = read_source(RG1_UNCR)
    result = seg_result(source)
    assert result.anatomy is not None
    result.anatomy.masks = np.array(chest_masks())[:2]
    with pytest.raises(ValueError, match="masks"):
        anatomy_segmentation(source, result)


def test_an_unnamed_model_is_refused() -> None:
    source = read_source(RG1_UNCR)
    result = make_result(source)
    result.anatomy = Anatomy(np.array(chest_masks()), "assessed")
    with pytest.raises(ValueError, match="not named"):
        anatomy_segmentation(source, result)


def test_no_patient_data_in_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")  # a name without "^"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = anatomy_segmentation(source, seg_result(source))
    assert seg.PatientName == source.PatientName
    emitted = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for value in (str(source.PatientName), str(source.PatientID)):
        assert not [m for m in emitted if value in m]
