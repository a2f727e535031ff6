"""What every output shares: the equipment that signs it, the private coding scheme, the
copy of the source's patient and study header (see the package docstring)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from dicom_node.logs import get_logger
from dicom_node.results.uids import algorithm_uid, derived_uid

if TYPE_CHECKING:
    from inference.cascade import Finding

log = get_logger(__name__)

PRIVATE_SCHEME = "99CXRAI"
"""Coding Scheme Designator of the node's own codes (PS3.16 8.2: private schemes start
with ``99``). Used only where no standard code exists; each use is documented where the
code is defined, and every object that carries one declares the scheme in its Coding
Scheme Identification Sequence (PS3.3 C.12.1.1.2)."""

# Patient and General Study module attributes of Type 2 (PS3.3 C.7.1.1, C.7.2.1): they
# must be present in every output, empty when the source does not know them.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Person names are copied into outputs, never passed through highdicom's constructors: its
# person-name check echoes a suspicious name (e.g. one without "^") in a UserWarning, and a
# patient's name must not reach stderr or the logs.
PERSON_NAMES = ("PatientName", "ReferringPhysicianName")
# Copied verbatim even when non-conformant: the PACS files and reconciles the output by
# them, and an output that disagrees with its source on who or which study it is about is
# worse than a validator's complaint.
IDENTIFYING = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "AccessionNumber",
        "StudyID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
    }
)
_TEXT_NUMBER_VRS = frozenset({"DS", "IS"})
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def _package_version() -> str:
    try:
        return metadata.version("cxr-ai-node")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class Equipment:
    """The node as the equipment that creates the outputs (General Equipment, SC Equipment
    and the TID 1004 Device Observer Identifying Attributes).

    ``device_uid`` is derived from the other identifying fields, so one installation
    always reports as the same device observer without storing a UID anywhere.
    """

    manufacturer: str = "CXR AI Node project"
    model_name: str = "cxr-ai-node"
    software_versions: str = field(default_factory=_package_version)
    device_serial_number: str | None = None
    station_name: str | None = None
    institution_name: str | None = None
    institutional_department_name: str | None = None

    @property
    def device_uid(self) -> UID:
        return derived_uid(
            "device",
            self.manufacturer,
            self.model_name,
            self.device_serial_number or "",
            self.station_name or "",
        )


PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment
"""Purpose of Reference of the algorithm's Contributing Equipment item: (109102, DCM,
"Processing Equipment"), CID 7005 — equipment that processed the data to create the
object, which is what IHE AI Results asks the AI model to be recorded as. Not (109103,
DCM, "Modifying Equipment"), which is for equipment that changed an existing instance,
nor (109101, DCM, "Acquisition Equipment"), which the source's modality is."""


@dataclass(frozen=True)
class Algorithm:
    """One model that contributed to an output, as TID 4019 names it in the SR.

    ``weights_sha256`` makes retrained weights under an unchanged version another device;
    it is part of the Device UID only when known.
    """

    name: str
    version: str
    weights_sha256: str | None = None

    @classmethod
    def of(cls, finding: Finding) -> Algorithm:
        return cls(finding.model_name, finding.model_version)

    @property
    def device_uid(self) -> UID:
        return algorithm_uid(self.name, self.version, self.weights_sha256)


def algorithms(findings: Iterable[Finding]) -> list[Algorithm]:
    """The distinct models behind ``findings``, in the order they first appear."""
    return list(dict.fromkeys(Algorithm.of(finding) for finding in findings))


def algorithm_equipment(
    used: Iterable[Algorithm],
    equipment: Equipment,
    moment: datetime.datetime,
    contribution: str,
) -> list[ContributingEquipment]:
    """One Contributing Equipment item (SOP Common, PS3.3 C.12.1) per algorithm.

    Manufacturer's Model Name and Software Versions are the TID 4019 Algorithm Name and
    Version of the SR, Device UID the algorithm's derived UID (:func:`algorithm_uid`), so
    that a consumer can tie any of the node's objects to the model that produced it
    without reading the SR. The Contribution DateTime is the job's moment (re-runs are
    byte-identical, see :func:`dicom_node.outputs.pin_timestamps`).
    """
    items = []
    for algorithm in used:
        item = ContributingEquipment(
            manufacturer=equipment.manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            contribution_datetime=moment,
            contribution_description=f"{contribution} ({algorithm.name} {algorithm.version})"[
                :1024
            ],
        )
        item.DeviceUID = algorithm.device_uid
        items.append(item)
    return items


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification item declaring :data:`PRIVATE_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="CXR AI node private codes",
        version="1",
        responsible_organization="CXR AI Node project",
    )


def _is_valid(elem: DataElement) -> bool:
    """Whether a value conforms to its VR (PS3.5 6.2); sequences are taken as they are."""
    if elem.VR == "SQ" or elem.value is None:
        return True
    values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
    try:
        for value in values:
            # DS and IS values arrive as DSfloat/IS numbers: check the text they stand for.
            text = str(value) if elem.VR in _TEXT_NUMBER_VRS else value
            validate_value(elem.VR, text, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def source_header(source: Dataset) -> Dataset:
    """The source's header, fit to be copied into a new object of the same study.

    * no pixel data, overlays or other bulk data, no private attributes;
    * attributes whose value violates its VR are dropped (e.g. a Patient's Age of ``58``
      instead of ``058Y``) — copying them would make our object non-conformant, and
      guessing a repair could change the patient's data — except the identifying ones
      (:data:`IDENTIFYING`), which are kept as they are;
    * the Type 2 patient and study attributes (:data:`PATIENT_STUDY_TYPE2`) are present,
      empty where the source lacks them (or had an invalid value), as the output IODs
      require.

    Only attribute keywords are logged, never values (they may identify the patient).
    """
    header = Dataset()
    for elem in source:
        if elem.tag.is_private or elem.tag.group >= 0x6000 or elem.VR in _BULK_VRS:
            continue
        if elem.keyword not in IDENTIFYING and not _is_valid(elem):
            log.debug("source attribute has an invalid value; not copied", keyword=elem.keyword)
            continue
        header.add(deepcopy(elem))
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def instance_number(header: Dataset) -> int:
    """The source's Instance Number, so results sort like their images; else 1."""
    number = header.get("InstanceNumber")
    return int(number) if number is not None and int(number) > 0 else 1


def without_person_names(header: Dataset) -> Dataset:
    """A copy of ``header`` with :data:`PERSON_NAMES` empty, to hand to highdicom.

    The builders copy the real names afterwards with highdicom's
    ``copy_patient_and_study_information``, which copies values without echoing them.
    """
    blanked = deepcopy(header)
    for keyword in PERSON_NAMES:
        setattr(blanked, keyword, None)
    return blanked


def pin_dimension_organization(ds: Dataset) -> None:
    """Dimension Organization UID derived from the object's own UID, not random.

    highdicom draws a new UID for every multi-frame object it builds; pinned, the same
    inputs give the same bytes (re-runs of a job write the object the archive holds).
    """
    organization = derived_uid("dimension-organization", str(ds.SOPInstanceUID))
    for item in ds.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = organization
    for item in ds.DimensionIndexSequence:
        item.DimensionOrganizationUID = organization
