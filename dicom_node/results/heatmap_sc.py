"""Where the model looked, as an image a PACS shows beside the radiograph.

A Secondary Capture Image (PS3.3 A.8.1) holding the rendered Grad-CAM overlay of
:func:`inference.explain.render_overlay`: RGB, 8 bits, Planar Configuration 0, with the
"AI-GENERATED" marking and colour legend burned in (Burned In Annotation YES). The image is
DERIVED\\SECONDARY, made on a workstation (Conversion Type WSD), references its source
radiograph in the Source Image Sequence and says in Derivation Description which model
produced the heatmap.

Modality is ``OT`` (other), not the source's CR or DX. PS3.3 C.7.3.1.1.1 lets Modality
name the equipment that originally acquired the data, and an earlier version copied it,
but PACS route by Modality: the rule that forwards every CR and DX image to this node
would forward the heatmap too, and the node would be sent its own output back — at best
refused by the input gate after a round trip, at worst a loop. Hanging protocols and
worklist filters set up per modality would likewise show the heatmap as if it were an
acquisition. ``OT`` keeps it out of both; the series (Series Description "AI CXR
heatmap"), ImageType DERIVED\\SECONDARY, the burned-in marking, the Source Image Sequence
and the algorithm's Contributing Equipment item (Processing Equipment, model name and
version as in the SR's TID 4019, IHE AI Results) say what it is and where it came from.
Body Part Examined is CHEST and Laterality absent, as the General Series module's 2C
condition wants for an unpaired region (see :func:`_copy_series_and_image`).

No Pixel Spacing is written: the overlay is resampled for viewing (at most 1024 pixels a
side), and a calibrated-looking secondary capture invites measurements it cannot support.
"""

from __future__ import annotations

import datetime

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from highdicom.sc.enum import ConversionTypeValues
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage
from pydicom.valuerep import DA, TM

from dicom_node.results.common import (
    Algorithm,
    Equipment,
    algorithm_equipment,
    instance_number,
    source_header,
)
from dicom_node.results.registry import BuildInputs, OutputType, register
from dicom_node.results.uids import model_identities, result_uids
from inference.cascade import Finding, ImageResult

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI CXR heatmap"
SC_MODALITY = "OT"  # not the source's: see the module docstring
CHEST = "CHEST"  # Body Part Examined defined term (PS3.16 Annex L)
IMAGE_COMMENTS = "AI-generated heatmap (Grad-CAM); not for diagnosis"
SOURCE_FOR_PROCESSING = CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
SPATIAL_RESAMPLING = CodedConcept.from_code(codes.DCM.SpatialResampling)
LOSSY_HISTORY = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)
# highdicom insists on a single-letter orientation for PATIENT images; the source's own
# value replaces this placeholder right after construction (see _copy_orientation).
_ORIENTATION_PLACEHOLDER = ("L", "F")


def heatmap_secondary_capture(
    source: Dataset,
    result: ImageResult,
    *,
    equipment: Equipment | None = None,
    modality: str = SC_MODALITY,
    series_number: int = SC_SERIES_NUMBER,
    series_description: str = SC_SERIES_DESCRIPTION,
    content_datetime: datetime.datetime | None = None,
    source_variant: str | None = None,
) -> SCImage:
    """The overlay of ``result`` as an SC image in the study of ``source``.

    Patient and study attributes are copied from the source (Type 2 ones empty when
    unknown); series and instance UIDs are derived from the source and the models
    (:mod:`dicom_node.results.uids`). ``modality`` overrides ``OT`` for a PACS that files
    secondary captures otherwise; ``source_variant`` as for the SR
    (:mod:`dicom_node.results.uids`).
    Raises ``ValueError`` when the result has no overlay, no finding to attribute it to,
    or belongs to another image.
    """
    overlay = _check_overlay(source, result)
    explained = result.explained_finding
    heatmap = explained is not None  # else: an anatomy-only annotation (measured findings)
    finding = explained or result.findings[0]
    equipment = equipment or Equipment()
    header = source_header(source)
    uids = result_uids(header, "sc", model_identities(result.findings), source_variant)
    moment = content_datetime or datetime.datetime.now()
    sc = SCImage(
        pixel_array=overlay,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=equipment.manufacturer,
        patient_orientation=_ORIENTATION_PLACEHOLDER,
        series_description=series_description,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        institution_name=equipment.institution_name,
        institutional_department_name=equipment.institutional_department_name,
        content_date=moment.date(),
        content_time=moment.time(),
        specific_character_set=header.get("SpecificCharacterSet"),
        contributing_equipment=[
            *_acquisition_equipment(header),
            *algorithm_equipment(
                [Algorithm.of(finding)],
                equipment,
                moment,
                "Grad-CAM heatmap" if heatmap else "Anatomy annotation",
            ),
        ],
    )
    # Names and the other patient/study attributes go in by copy, not through the
    # constructor, whose person-name check would echo them in a warning.
    sc.copy_patient_and_study_information(header)
    _copy_series_and_image(sc, header, modality)
    _describe_capture(sc, equipment, moment)
    _describe_derivation(sc, header, finding, overlay, heatmap)
    return sc


def _acquisition_equipment(header: Dataset) -> list[ContributingEquipment]:
    """The source's modality as Contributing Equipment (SOP Common), as the SR records it
    (highdicom adds it there from the evidence).

    Sources without a Manufacturer (Type 2, often empty) cannot be described and are left
    out; highdicom adds itself either way.
    """
    try:
        return [ContributingEquipment.for_image_acquisition(header)]
    except (AttributeError, ValueError):
        return []


def _check_overlay(source: Dataset, result: ImageResult) -> np.ndarray:
    """The overlay as a contiguous uint8 H×W×3 array, or ``ValueError``."""
    if result.overlay is None or not result.findings:
        raise ValueError("no heatmap secondary capture for a result without overlay or finding")
    if result.sop_instance_uid and result.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            f"result belongs to {result.sop_instance_uid}, not to {source.SOPInstanceUID}"
        )
    overlay = np.ascontiguousarray(result.overlay)
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(f"overlay must be uint8 H×W×3, not {overlay.dtype} {overlay.shape}")
    return overlay


def _copy_series_and_image(sc: SCImage, header: Dataset, modality: str) -> None:
    """Modality (``OT``), body part, orientation and lossy history of the source.

    Body Part Examined is always ``CHEST`` and Laterality is never written. Results exist
    only for images the input gate accepted as frontal chest radiographs: their body part
    is CHEST or a synonym (THORAX, LUNG, CHEST_LAT — not defined terms; LUNG even a paired
    structure) or missing, and one-sided images are refused. Laterality (General Series,
    Type 2C) must be absent for an unpaired body part, and is required — with R or L — for
    a paired or unknown one, so an explicit CHEST is what keeps the object conformant.
    """
    sc.Modality = modality
    sc.BodyPartExamined = CHEST
    _copy_orientation(sc, header)
    for keyword in LOSSY_HISTORY:
        # PS3.3 C.7.6.1.1.5: once lossy, every derived image says so.
        if header.get("LossyImageCompression") == "01" and keyword in header:
            setattr(sc, keyword, header[keyword].value)


def _copy_orientation(sc: SCImage, header: Dataset) -> None:
    """Patient Orientation as the source has it (Type 2C: empty when unknown).

    The overlay is only scaled, never flipped or rotated, so the source's row and column
    directions hold; compound values such as ``FL`` (PS3.3 C.7.6.1.1.1) are kept too.
    """
    orientation = header.get("PatientOrientation")
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else []


def _describe_capture(sc: SCImage, equipment: Equipment, moment: datetime.datetime) -> None:
    """SC Equipment and SC Image modules (PS3.3 C.8.6.1, C.8.6.2)."""
    sc.ConversionType = ConversionTypeValues.WSD.value
    sc.SecondaryCaptureDeviceManufacturer = equipment.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = equipment.model_name
    sc.SecondaryCaptureDeviceSoftwareVersions = equipment.software_versions
    sc.DateOfSecondaryCapture = DA(moment.date())
    sc.TimeOfSecondaryCapture = TM(moment.time())
    if equipment.station_name:
        sc.StationName = equipment.station_name


def _describe_derivation(
    sc: SCImage, header: Dataset, finding: Finding, overlay: np.ndarray, heatmap: bool
) -> None:
    """Image Type, Source Image Sequence and derivation (General Image, PS3.3 C.7.6.1)."""
    resampled = overlay.shape[:2] != (header.get("Rows"), header.get("Columns"))
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = IMAGE_COMMENTS
    what = (
        f"Grad-CAM heatmap of {finding.model_name} {finding.model_version} "
        f"({finding.stage} stage, {finding.label.meaning}) blended over"
        if heatmap
        else f"Heart and lung outlines and cardiothoracic ratio widths of "
        f"{finding.model_name} {finding.model_version} drawn on"
    )
    sc.DerivationDescription = (
        f"{what} the source radiograph{', spatially resampled' if resampled else ''}; "
        f"burned-in AI-generated marking{' and colour legend' if heatmap else ''}"
    )[:1024]
    if resampled:
        sc.DerivationCodeSequence = [SPATIAL_RESAMPLING]
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [SOURCE_FOR_PROCESSING]
    reference.SpatialLocationsPreserved = "NO" if resampled else "YES"
    sc.SourceImageSequence = [reference]


def _build(inputs: BuildInputs) -> Dataset:
    return heatmap_secondary_capture(
        inputs.source,
        inputs.result,
        equipment=inputs.equipment,
        content_datetime=inputs.content_datetime,
        source_variant=inputs.source_variant,
    )


SC = register(
    OutputType(
        name="sc",
        sop_class_uid=SecondaryCaptureImageStorage,
        build=_build,
        needs=frozenset({"overlay"}),
        description="Secondary Capture of the Grad-CAM heatmap over the radiograph",
    )
)
