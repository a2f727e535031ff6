"""The structured report of one scored radiograph: Comprehensive 3D SR, TID 1500.

Structure (PS3.16 TID 1500 Measurement Report, built with highdicom's templates)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")
      Language (TID 1204), Observation Context (TID 1001: the node as Device observer)
      Procedure reported: (363679005, SCT, "Imaging procedure")
      Image Library (TID 1600)                 only when the source can be described
      CONTAINER (126010, DCM, "Imaging Measurements")
        one Measurement Group (TID 1501) per finding:
          Tracking Identifier + Tracking UID (TID 4108), stable across re-runs
          Finding (121071, DCM) = the label's code, e.g. (233604007, SCT, "Pneumonia")
          Algorithm Identification (TID 4019): bundle name, version, threshold, stage
          NUM (122157, DCM, "Probability") = calibrated probability, UCUM "1"
          NUM (OODDIST, 99CXRAI) = input-gate distance              when measured
          NUM (CAMLUNG / CAMHEART, 99CXRAI) = Grad-CAM share inside the lungs / heart
                                                  for the explained finding, when known
          IMAGE Source (the radiograph)
        with measured anatomy (adults), one group per structure, the structure as finding
        site, each NUM's Source of Measurement also naming its SEG segments (when written):
          Heart: NUM (CTR, 99CXRAI) "Cardiothoracic ratio" (UCUM 1), NUM Width (SCT
                 103355008) in mm at finding site Heart, and at finding site Thorax
          Right lung, Left lung: NUM Area (SCT 42798000) in cm2
      CONTAINER (C0034375, UMLS, "Qualitative Evaluations"):
        CODE <each finding> = (52101004, SCT, "Present") | (272519000, SCT, "Absent")
        CODE (INDOMAIN, 99CXRAI) = (373066001, SCT, "Yes") | (373067005, SCT, "No")
                                                                    when the gate decided
        CODE (260870009, SCT, "Priority") = Routine | Urgent | Stat  when known
        TEXT (121106, DCM, "Comment") = each engine warning

Where each item sits is what PixelMed's ``DicomSRValidator`` (``-checktemplateid
-checkcontentitemorder``) accepts without an error or a warning (``tests/pixelmed.py``):

* Procedure reported is from CID 100 "Quantitative Diagnostic Imaging Procedures", which
  has no chest radiograph procedure; its one code for a projection radiograph, LOINC
  43468-8 "XR unspecified body region", was added after the CID 100 PixelMed checks
  against, so the generic (363679005, SCT, "Imaging procedure") that both versions list
  is used. What was imaged is in the referenced source and its header.
* The calls (Present/Absent per finding) and the in-domain decision are qualitative
  evaluations of TID 1500 row 13, in the document's Qualitative Evaluations container.
  The TID 1501 rows for qualitative evaluations inside a measurement group are missing
  from the templates of PixelMed's release, which flags every CODE there as "not in
  template"; the concept name of each call is the finding's code, the same as the
  Finding of its measurement group, so the two are paired without ambiguity.
* The cascade stage is an Algorithm Parameter of TID 4019 (``stage=screen|confirm``)
  beside the threshold it applied; a second, private coded item said the same thing.

Present/Absent use DICOM's own value set, CID 241 "Present-Absent Only", whose Absent is
SCT 272519000 (not the generic SNOMED qualifier 2667000): DICOM-aware consumers match on
the context group's codes. Private ``99CXRAI`` codes are used only for the in-domain
decision and the gate distance, which have no standard concept.

Every model that made a call is also recorded in the SOP Common module's Contributing
Equipment Sequence (Processing Equipment, Model Name and Software Versions = TID 4019
Algorithm Name and Version, Device UID derived from them), as IHE AI Results asks.

The document is COMPLETE (nothing is left to add), PRELIMINARY and UNVERIFIED: an
algorithm's output has not been read and signed by a physician.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from dicom_node.results.common import (
    PRIVATE_SCHEME,
    Equipment,
    algorithm_equipment,
    algorithms,
    instance_number,
    private_coding_scheme,
    source_header,
    without_person_names,
)
from dicom_node.results.registry import BuildInputs, OutputType, register
from dicom_node.results.uids import (
    OutputUIDs,
    derived_uid,
    model_identities,
    result_uids,
    segmentation_uids,
    tracking_uid,
)
from inference import anatomy
from inference.anatomy import HEART, LEFT_LUNG, RIGHT_LUNG, STRUCTURES, Anatomy
from inference.cascade import SCORED, Finding, ImageResult

SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI CXR findings"

PROCEDURE_REPORTED = CodedConcept("363679005", "SCT", "Imaging procedure")  # CID 100
# The procedure as the HL7 result names it (OBR-4 of dicom_node.results.oru); not in
# CID 100, so not the SR's Procedure reported (see the module docstring).
CHEST_RADIOGRAPH = CodedConcept("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
PRIORITY = CodedConcept("260870009", "SCT", "Priority")
COMMENT = CodedConcept("121106", "DCM", "Comment")

# SNOMED CT "Priorities" (272125009) children, for the study-level priority.
PRIORITY_VALUES = {
    "routine": CodedConcept("50811001", "SCT", "Routine"),
    "urgent": CodedConcept("103391001", "SCT", "Urgent"),
    "stat": CodedConcept("49499008", "SCT", "Stat"),
}

# The cascade stages, as the HL7 result codes them (OBX-17 of dicom_node.results.oru);
# the SR names the stage as a TID 4019 Algorithm Parameter.
STAGE_VALUES = {
    "screen": CodedConcept("SCREEN", PRIVATE_SCHEME, "Screening model"),
    "confirm": CodedConcept("CONFIRM", PRIVATE_SCHEME, "Confirmation model"),
    "measurement": CodedConcept("MEASURED", PRIVATE_SCHEME, "Derived from a measurement"),
}
# Private codes (99CXRAI): no standard concept names these properties of the cascade.
IN_DOMAIN = CodedConcept("INDOMAIN", PRIVATE_SCHEME, "Image within model input domain")
OOD_DISTANCE = CodedConcept(
    "OODDIST", PRIVATE_SCHEME, "Distance to training data (1 = refusal limit)"
)
CAM_LUNG_SHARE = CodedConcept("CAMLUNG", PRIVATE_SCHEME, "Heatmap share inside lung fields")
CAM_HEART_SHARE = CodedConcept("CAMHEART", PRIVATE_SCHEME, "Heatmap share inside heart")
UNITS = {
    "1": NO_UNITS,
    "mm": CodedConcept("mm", "UCUM", "millimeter"),
    "cm2": CodedConcept("cm2", "UCUM", "square centimeter"),
}
THORAX = CodedConcept("816094009", "SCT", "Thorax")
# The anatomy's measurement concepts (inference.anatomy: the ratio's private code, SNOMED
# CT Width and Area), as the SR writes them; keyed by code value.
MEASUREMENT_CONCEPTS = {
    code: CodedConcept(code, scheme, meaning)
    for _, code, scheme, meaning in (anatomy.CTR, anatomy.HEART_WIDTH, anatomy.AREA)
}


def measurement_report(
    source: Dataset,
    result: ImageResult,
    *,
    equipment: Equipment | None = None,
    priority: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = SR_SERIES_DESCRIPTION,
    content_datetime: datetime.datetime | None = None,
    source_variant: str | None = None,
    with_segmentation: bool = False,
) -> Comprehensive3DSR:
    """The TID 1500 Measurement Report of ``result`` for the radiograph ``source``.

    The SR joins the source's study (same Study Instance UID, patient and study attributes
    copied, Type 2 ones empty when unknown) in a series of its own whose UIDs are derived
    from the source and the models (:mod:`dicom_node.results.uids`), so building it again
    from the same inputs yields the same object identity.

    ``priority`` (``"routine"``, ``"urgent"`` or ``"stat"``) adds a study-level
    qualitative evaluation, and is part of the SOP Instance UID (a changed priority is a
    changed report). ``source_variant`` gives a changed source re-sent under its old
    SOP Instance UID outputs of its own (:func:`~dicom_node.results.uids.result_uids`).
    With assessed anatomy, the heart and lung measurements follow the findings; they
    reference the SEG's segments when ``with_segmentation`` (the SEG is written too).
    Raises ``ValueError`` for a result that was not scored, has no findings, or belongs
    to another image.
    """
    _check_result(source, result)
    equipment = equipment or Equipment()
    header = source_header(source)
    models = model_identities(result.findings)
    found = result.anatomy if result.anatomy is not None and result.anatomy.assessed else None
    if found is not None:  # the measurements depend on the segmentation model too
        models = sorted({*models, f"{found.model_name}|{found.model_version}|anatomy"})
    uids = result_uids(header, "sr", models, source_variant, priority=priority)
    seg = (
        segmentation_uids(header, found.model_name, found.model_version, source_variant)
        if found is not None and with_segmentation
        else None
    )
    groups = [_finding_group(header, result, f) for f in result.findings]
    if found is not None:
        groups += _anatomy_groups(header, found, seg)
    report = MeasurementReport(
        observation_context=_observation_context(equipment),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[header] if _describable(header) else None,
    )
    _add_qualitative_evaluations(report, _evaluations(result, priority))
    moment = content_datetime or datetime.datetime.now()
    sr = Comprehensive3DSR(
        evidence=[without_person_names(header), *_segmentation_evidence(header, seg)],
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=equipment.institution_name,
        institutional_department_name=equipment.institutional_department_name,
        series_description=series_description,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        content_date=moment.date(),
        content_time=moment.time(),
        coding_schemes=[private_coding_scheme()],
        contributing_equipment=algorithm_equipment(
            algorithms(result.findings), equipment, moment, "AI findings"
        ),
    )
    sr.copy_patient_and_study_information(header)
    if equipment.station_name:
        sr.StationName = equipment.station_name
    return sr


def _segmentation_evidence(header: Dataset, seg: OutputUIDs | None) -> list[Dataset]:
    """The SEG as evidence (Current Requested Procedure Evidence Sequence): a document that
    references an object must list it there (PS3.3 C.17.2.3)."""
    if seg is None:
        return []
    stub = Dataset()
    stub.SOPClassUID = SegmentationStorage
    stub.SOPInstanceUID = seg.sop_instance_uid
    stub.StudyInstanceUID = header.StudyInstanceUID
    stub.SeriesInstanceUID = seg.series_instance_uid
    return [stub]


def _check_result(source: Dataset, result: ImageResult) -> None:
    """Refuse results an SR cannot honestly report, and results of another image."""
    if result.status != SCORED or not result.findings:
        raise ValueError(
            f"no measurement report for a result with status {result.status!r} "
            f"and {len(result.findings)} findings"
        )
    if result.sop_instance_uid and result.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            f"result belongs to {result.sop_instance_uid}, not to {source.SOPInstanceUID}"
        )


def _observation_context(equipment: Equipment) -> ObservationContext:
    """TID 1001 with the node as Device observer (TID 1002/1004): who made the findings."""
    device = DeviceObserverIdentifyingAttributes(
        uid=equipment.device_uid,
        name=equipment.station_name or equipment.model_name,
        manufacturer_name=equipment.manufacturer,
        model_name=equipment.model_name,
        serial_number=equipment.device_serial_number,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _describable(header: Dataset) -> bool:
    """Whether highdicom can write the Image Library descriptors (TID 1602/1603).

    Projection radiographs need Patient Orientation (two values) and Imager Pixel Spacing,
    which CR and secondary-capture sources often lack. The library is optional (TID 1500
    row 5 is U); the source stays referenced as evidence and in every measurement group.
    """
    if header.get("Modality") not in ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"):
        return "Modality" in header
    orientation = header.get("PatientOrientation")
    return orientation is not None and len(orientation) == 2 and "ImagerPixelSpacing" in header


def _algorithm(finding: Finding) -> AlgorithmIdentification:
    """TID 4019: the bundle that made the call, with what decided present/absent."""
    if finding.stage not in STAGE_VALUES:
        raise ValueError(f"unknown cascade stage {finding.stage!r}")
    return AlgorithmIdentification(
        name=finding.model_name,
        version=finding.model_version,
        parameters=[f"threshold={finding.threshold:.6g}", f"stage={finding.stage}"],
    )


def _finding_group(
    header: Dataset, result: ImageResult, finding: Finding
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: one finding, its probability and how it was decided."""
    label = finding.label
    concept = CodedConcept(label.code, label.scheme, label.meaning)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(header, "sr", finding),
            identifier=f"{label.meaning} ({label.scheme} {label.code})",
        ),
        finding_type=concept,
        algorithm_id=_algorithm(finding),
        measurements=_measurements(header, result, finding),
        source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
    )


def _measurements(header: Dataset, result: ImageResult, finding: Finding) -> list[Measurement]:
    """TID 300: the calibrated probability and, when the gate ran, its distance."""
    source = [SourceImageForMeasurement.from_source_image(header)]
    found = [
        Measurement(
            name=PROBABILITY,
            value=round(float(finding.probability), 6),
            unit=NO_UNITS,
            referenced_images=source,
        )
    ]
    if result.ood_distance is not None:
        found.append(
            Measurement(
                name=OOD_DISTANCE,
                value=round(float(result.ood_distance), 4),
                unit=NO_UNITS,
                referenced_images=source,
            )
        )
    for name, share in (
        (CAM_LUNG_SHARE, finding.cam_lung_share),
        (CAM_HEART_SHARE, finding.cam_heart_share),
    ):
        if share is not None:
            found.append(
                Measurement(
                    name=name, value=round(share, 4), unit=NO_UNITS, referenced_images=source
                )
            )
    return found


def _anatomy_groups(
    header: Dataset, found: Anatomy, seg: OutputUIDs | None
) -> list[MeasurementsAndQualitativeEvaluations]:
    """The heart (ratio and widths) and each lung (area): one TID 1501 group per structure,
    the structure as finding site, the segmentation model as TID 4019.

    With the SEG written, each measurement's Source of Measurement (TID 300 row 7) lists,
    besides the radiograph, the SEG segments it was measured on (Referenced Segment
    Number in the Image SOP Instance Reference Macro): the heart for its width, both lungs
    for the thoracic width, all three for the ratio, each lung for its area. (TID 1410's
    referenced-segment row would carry one segment per group and is not what PixelMed's
    template tables accept inside TID 1500 with our other rows.)
    """
    algorithm = AlgorithmIdentification(name=found.model_name, version=found.model_version)
    by_name = {m.name: m for m in found.measurements}
    radiograph = SourceImageForMeasurement.from_source_image(header)

    def sources(segments: Sequence[int]) -> list[SourceImageForMeasurement]:
        if seg is None:
            return [radiograph]
        reference = SourceImageForMeasurement(SegmentationStorage, seg.sop_instance_uid)
        reference.ReferencedSOPSequence[0].ReferencedSegmentNumber = list(segments)
        return [radiograph, reference]

    def num(name: str, site: CodedConcept, segments: Sequence[int]) -> Measurement | None:
        m = by_name.get(name)
        if m is None:
            return None
        return Measurement(
            name=MEASUREMENT_CONCEPTS[m.code],
            value=round(m.value, 4),
            unit=UNITS[m.unit],
            finding_sites=[FindingSite(site)],
            referenced_images=sources(segments),
        )

    number = {s.name: n for n, s in enumerate(STRUCTURES, start=1)}  # the SEG's segments
    heart = CodedConcept(HEART.code, "SCT", HEART.meaning)
    lungs = [number[RIGHT_LUNG.name], number[LEFT_LUNG.name]]
    plan = [
        (
            HEART,
            heart,
            [
                num("cardiothoracic_ratio", heart, [number[HEART.name], *lungs]),
                num("heart_width", heart, [number[HEART.name]]),
                num("thoracic_width", THORAX, lungs),
            ],
        )
    ]
    for structure in (RIGHT_LUNG, LEFT_LUNG):
        site = CodedConcept(structure.code, "SCT", structure.meaning)
        plan.append(
            (structure, site, [num(f"{structure.name}_area", site, [number[structure.name]])])
        )
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for structure, site, measurements in plan:
        present = [m for m in measurements if m is not None]
        if present:
            tracking = TrackingIdentifier(
                uid=derived_uid("tracking", str(header.SOPInstanceUID), "anatomy", structure.code),
                identifier=f"{structure.meaning} ({found.model_name})",
            )
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=site,
                    algorithm_id=algorithm,
                    finding_sites=[FindingSite(site)],
                    measurements=present,
                    source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
                )
            )
    return groups


def _evaluations(
    result: ImageResult, priority: str | None
) -> list[CodeContentItem | TextContentItem]:
    """TID 1500 rows 13-14: each call, the in-domain decision, the study-level priority
    and the engine's warnings."""
    items: list[CodeContentItem | TextContentItem] = [
        _coded(CodedConcept(f.label.code, f.label.scheme, f.label.meaning), _call(f))
        for f in result.findings
    ]
    if result.in_domain is not None:
        items.append(_coded(IN_DOMAIN, YES if result.in_domain else NO))
    if priority is not None:
        if priority.lower() not in PRIORITY_VALUES:
            raise ValueError(f"priority must be one of {sorted(PRIORITY_VALUES)}, not {priority!r}")
        items.append(_coded(PRIORITY, PRIORITY_VALUES[priority.lower()]))
    items.extend(
        TextContentItem(name=COMMENT, value=w, relationship_type=RelationshipTypeValues.CONTAINS)
        for w in result.warnings
    )
    return items


def _call(finding: Finding) -> CodedConcept:
    return PRESENT if finding.present else ABSENT


def _coded(name: CodedConcept, value: CodedConcept) -> CodeContentItem:
    return CodeContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )


def _add_qualitative_evaluations(
    report: MeasurementReport, items: Sequence[CodeContentItem | TextContentItem]
) -> None:
    """Append the TID 1500 row 12 container, which highdicom's template does not build."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(list(items))
    report[0].ContentSequence.append(container)


def _build(inputs: BuildInputs) -> Dataset:
    return measurement_report(
        inputs.source,
        inputs.result,
        equipment=inputs.equipment,
        priority=inputs.priority,
        content_datetime=inputs.content_datetime,
        source_variant=inputs.source_variant,
        with_segmentation="seg" in inputs.companions,
    )


SR = register(
    OutputType(
        name="sr",
        sop_class_uid=Comprehensive3DSRStorage,
        build=_build,
        # The study's level is a row of the report, so the SR is built under the lock.
        needs=frozenset({"priority"}),
        description="Comprehensive 3D SR, TID 1500 measurement report of the findings",
    )
)
