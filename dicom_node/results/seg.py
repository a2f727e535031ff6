"""The heart and the lung fields as a viewer can overlay them: a Segmentation (PS3.3 A.51).

The anatomy model (:mod:`inference.anatomy`) outlines the heart shadow and both lung
fields; the SR reports what was measured from them (cardiothoracic ratio, widths, areas).
This object carries the outlines themselves, so that a viewer can show *what* was
measured over the radiograph and the SR can point at it: the SR references its segments
by this object's SOP Instance UID (:func:`dicom_node.results.uids.segmentation_uids`,
shared by both builders) and by segment number — **1 heart, 2 right lung, 3 left lung**
(:data:`SEGMENT_NUMBERS`, the channel order of :data:`inference.anatomy.STRUCTURES`),
which must not change. It is off by default: a rule asks for it with
``outputs = ["sr", "sc", "seg"]``, and only images whose anatomy was assessed get one
(``needs = {"mask"}``: masks found implausible are not written).

Encoding (built with highdicom's ``Segmentation``, PS3.3 C.8.20):

* **Segmentation Type BINARY** (1 bit per pixel), one frame per segment, empty frames
  kept (``omit_empty_frames=False``), so that frame *n* is always segment *n*; the three
  segments overlap (the heart shadow lies over the lungs), which BINARY allows and a
  LABELMAP would not. Size: rows × columns / 8 bytes a frame, e.g. 1.9 MB for the three
  frames of a 2500 × 2048 flat-panel image, uncompressed (Explicit VR Little Endian, the
  syntax the sender proposes).
* **On the source's own grid.** The masks live on the network's square working grid
  (256 × 256: the whole image stretched to a square); each is resampled onto the
  source's rows × columns with the same bilinear convention as the Grad-CAM map
  (:func:`inference.explain.to_original_grid`) and thresholded at 0.5, so a pixel of the
  SEG is a pixel of the radiograph (Derivation Image Sequence, Spatial Locations
  Preserved YES).
* **Segment descriptions** (C.8.20.4.1): Segmented Property Category (123037004, SCT,
  "Anatomical Structure"), the code current editions of CID 7150 use since SNOMED CT
  retired 91723000 (which pydicom's older code dictionary still lists under that name),
  Segmented Property Type the
  structure's own SNOMED CT code as :mod:`inference.anatomy` names it (80891009 "Heart",
  3341006 "Right lung", 44029006 "Left lung"; CID 7151 is extensible, and pre-coordinated
  sides keep the SR's finding sites and the segments one code each), Segment Label the code
  meaning, Segment Algorithm Type AUTOMATIC with the segmentation model as Algorithm
  Identification (family (123110, DCM, "Artificial Intelligence"), CID 7162), and a
  recommended display colour each: the overlay's (magenta heart, cyan lungs).
* **Geometry.** A projection radiograph (CR, DX, SC) has no Frame of Reference, and the
  Segmentation IOD does not need one: its Frame of Reference module is required only
  without the Derivation Image functional group (PS3.3 A.51-1), which highdicom writes. So,
  unlike the Parametric Map (:mod:`dicom_node.results.parametric_map`), no plane is
  invented; a Frame of Reference UID the source may carry without a plane is not copied.
  What the General Image module then requires (Type 2C, PS3.3 C.7.6.1) is Patient
  Orientation: the source's, since the masks are on its grid (empty when the source has
  none, as in the heatmap SC). No Pixel Measures either (optional without a Frame of
  Reference): the SR carries what was measured, a detector's Imager Pixel Spacing or a
  nominal 1 mm would invite measurements the SEG cannot support, and a Pixel Spacing
  without Slice Thickness — which a projection does not have — makes highdicom (0.28)
  unable to read the object back, although it writes it so itself.
* Modality ``SEG`` (the IOD's, never routed back as CR or DX), Body Part Examined CHEST,
  the study of the source, a series of its own, the segmentation model as Contributing
  Equipment (Processing Equipment, Device UID :func:`dicom_node.results.uids.algorithm_uid`)
  as in the other objects, Content Date/Time the job's moment; highdicom's random
  Dimension Organization UID is replaced by one derived from the instance, so a re-run
  gives the same bytes (:func:`dicom_node.outputs.pin_timestamps` pins the rest).
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import torch
from highdicom.seg import Segmentation, SegmentDescription
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from dicom_node.results.common import (
    Algorithm,
    Equipment,
    algorithm_equipment,
    instance_number,
    pin_dimension_organization,
    source_header,
    without_person_names,
)
from dicom_node.results.registry import BuildInputs, OutputType, register
from dicom_node.results.uids import segmentation_uids
from inference.anatomy import HEART, LEFT_LUNG, RIGHT_LUNG, STRUCTURES, Anatomy, Structure
from inference.cascade import ImageResult
from inference.explain import to_original_grid

SEG_SERIES_NUMBER = 9904
SEG_SERIES_DESCRIPTION = "AI CXR anatomy segmentation"
CHEST = "CHEST"
CONTENT_LABEL = "ANATOMY"
CONTENT_DESCRIPTION = "Heart shadow and lung fields"
THRESHOLD = 0.5  # of the bilinear resample of a 0/1 mask

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
"""Segmented Property Category of every segment (CID 7150)."""
ARTIFICIAL_INTELLIGENCE = codes.cid7162.ArtificialIntelligence
"""Algorithm Family of the segmentation model: (123110, DCM, "Artificial Intelligence")."""
PROPERTY_TYPES: dict[str, Code] = {s.name: Code(s.code, "SCT", s.meaning) for s in STRUCTURES}
"""Segmented Property Type of each structure: its code in :mod:`inference.anatomy`."""
SEGMENT_NUMBERS: dict[str, int] = {s.name: n for n, s in enumerate(STRUCTURES, start=1)}
"""Segment number of each structure (1 heart, 2 right lung, 3 left lung): the SR's
references depend on it."""
DISPLAY_RGB: dict[str, tuple[int, int, int]] = {
    HEART.name: (255, 0, 255),  # the overlay's outline colours (inference.explain)
    RIGHT_LUNG.name: (0, 255, 255),
    LEFT_LUNG.name: (0, 255, 255),
}


def anatomy_segmentation(
    source: Dataset,
    result: ImageResult,
    *,
    equipment: Equipment | None = None,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = SEG_SERIES_DESCRIPTION,
    content_datetime: datetime.datetime | None = None,
    source_variant: str | None = None,
) -> Segmentation:
    """The heart and lung masks of ``result`` as a Segmentation in the study of ``source``.

    Raises ``ValueError`` when the anatomy was not assessed (no masks), when the masks are
    not three square channels, when the segmentation model is not named, or when the
    result belongs to another image.
    """
    anatomy, masks = _check_masks(source, result)
    equipment = equipment or Equipment()
    header = source_header(source)
    uids = segmentation_uids(header, anatomy.model_name, anatomy.model_version, source_variant)
    moment = content_datetime or datetime.datetime.now()
    shape = (int(header.Rows), int(header.Columns))
    seg = Segmentation(
        source_images=[_as_source_image(header)],
        pixel_array=resample_masks(masks, shape)[np.newaxis],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(anatomy),
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        # Type 1 in the Enhanced General Equipment module: the installation's device UID
        # stands in when no serial number is configured (as in the Parametric Map).
        device_serial_number=equipment.device_serial_number or str(equipment.device_uid),
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        omit_empty_frames=False,
        contributing_equipment=algorithm_equipment(
            [Algorithm(anatomy.model_name, anatomy.model_version)],
            equipment,
            moment,
            "Heart and lung segmentation",
        ),
        series_description=series_description,
        institution_name=equipment.institution_name,
        institutional_department_name=equipment.institutional_department_name,
        content_date=moment.date(),
        content_time=moment.time(),
    )
    # Names and the other patient/study attributes go in by copy (see common.py).
    seg.copy_patient_and_study_information(header)
    _complete(seg, header, anatomy, equipment)
    return seg


def resample_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Masks (C × S × S, working grid) → bool rows × columns × C on the source's grid.

    Bilinear with the Grad-CAM map's convention (pixel centres aligned, the whole field
    of view on both grids), thresholded at :data:`THRESHOLD`: smoother edges than nearest
    neighbour and the same area, up to the boundary pixels. One channel at a time, into
    the channel-last layout highdicom takes, so that a 2500 × 2048 image needs one
    float32 plane (20 MB) at a time.
    """
    out = np.empty((*shape, masks.shape[0]), dtype=bool)
    for channel, mask in enumerate(masks):
        plane = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        out[..., channel] = to_original_grid(plane, shape) >= THRESHOLD
    return out


def segment_descriptions(anatomy: Anatomy) -> list[SegmentDescription]:
    """One description per structure, numbered as :data:`SEGMENT_NUMBERS`."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=anatomy.model_name,
        family=ARTIFICIAL_INTELLIGENCE,
        version=anatomy.model_version,
    )
    return [_description(structure, algorithm) for structure in STRUCTURES]


def _description(
    structure: Structure, algorithm: hd.AlgorithmIdentificationSequence
) -> SegmentDescription:
    return SegmentDescription(
        segment_number=SEGMENT_NUMBERS[structure.name],
        segment_label=structure.meaning,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=PROPERTY_TYPES[structure.name],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*DISPLAY_RGB[structure.name]),
    )


def _check_masks(source: Dataset, result: ImageResult) -> tuple[Anatomy, np.ndarray]:
    masks = result.masks
    if masks is None or result.anatomy is None:
        raise ValueError("no segmentation for a result whose anatomy was not assessed")
    if result.sop_instance_uid and result.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            f"result belongs to {result.sop_instance_uid}, not to {source.SOPInstanceUID}"
        )
    if masks.ndim != 3 or masks.shape[0] != len(STRUCTURES) or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be {len(STRUCTURES)} × S × S, not {masks.shape}")
    anatomy = result.anatomy
    if not anatomy.model_name or not anatomy.model_version:
        raise ValueError("the segmentation model is not named (Algorithm Identification)")
    return anatomy, masks


def _as_source_image(header: Dataset) -> Dataset:
    """The source header as highdicom's source image: no plane, no spacing.

    Person names are blanked (highdicom would echo a suspicious one in a warning). A
    Frame of Reference UID (some DX headers carry one without a plane) would make
    highdicom look for a patient-coordinate plane, and a Pixel Spacing would be copied
    into Pixel Measures (see the module docstring). The copy is not written anywhere.
    """
    image = without_person_names(header)
    for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator", "PixelSpacing"):
        if keyword in image:
            delattr(image, keyword)
    return image


def _complete(seg: Segmentation, header: Dataset, anatomy: Anatomy, equipment: Equipment) -> None:
    """What highdicom leaves to the caller: orientation, body part, station, stable UIDs.

    * Patient Orientation (General Image, Type 2C without a plane): the source's two
      values — the masks are only resampled, never flipped or rotated —, else empty.
    * Content Creator's Name empty (Content Identification macro, Type 2): no person
      drew the masks; the model is named in each segment's Algorithm Identification.
    * Body Part Examined CHEST, Laterality absent (General Series 2C, as the SC).
    * Station Name (General Equipment, Type 3): the node's AE title, as in the SR and SC.
    * The Dimension Organization UID, which highdicom draws at random, derived from the
      instance UID, so that a re-run gives the same bytes.
    """
    orientation = header.get("PatientOrientation")
    seg.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else []
    seg.ContentCreatorName = None
    seg.BodyPartExamined = CHEST
    if equipment.station_name:
        seg.StationName = equipment.station_name
    pin_dimension_organization(seg)
    size = anatomy.masks.shape[1]
    seg.DerivationDescription = (
        f"Heart and lung masks of {anatomy.model_name} {anatomy.model_version} "
        f"({size} x {size} grid, the whole image stretched to a square) resampled onto "
        f"the source grid (bilinear, threshold {THRESHOLD})"
    )[:1024]


def _build(inputs: BuildInputs) -> Dataset:
    return anatomy_segmentation(
        inputs.source,
        inputs.result,
        equipment=inputs.equipment,
        content_datetime=inputs.content_datetime,
        source_variant=inputs.source_variant,
    )


SEG = register(
    OutputType(
        name="seg",
        sop_class_uid=SegmentationStorage,
        build=_build,
        needs=frozenset({"mask"}),
        description="Segmentation of the heart and both lung fields on the source grid",
    )
)
