"""The study's result for the RIS or worklist: an HL7 v2.5.1 ORU^R01 message.

The SR and the heatmap go to the archive; the RIS learns of the result from this message,
built with hl7apy (which also escapes every value: ``|``, ``^``, ``~``, ``\\`` and ``&``
in a name or a meaning become ``\\F\\``, ``\\S\\``, ``\\R\\``, ``\\E\\``, ``\\T\\``)::

    MSH  sending application = the node's AE title, facilities and receiving application
         from the destination, MSH-10 control ID (see below), P, 2.5.1, UNICODE UTF-8
    PID  PID-3 patient ID (^^^issuer), PID-5 name, PID-7 birth date, PID-8 sex
    ORC  RE; ORC-2/ORC-3 accession number; CM; ORC-7.6 priority
    OBR  OBR-2/OBR-3 accession number, OBR-4 Plain chest X-ray (SCT 399208008: the
         ordered service), OBR-5 priority, OBR-7 study date/time, OBR-22 report time,
         OBR-24 RAD, OBR-25 result status F (final) or C (correction of an earlier one)
    TQ1  TQ1-9 priority: v2.5.1 moved the order priority here (ORC-7 and OBR-5 are kept
         only for backward compatibility, and are filled for receivers that still read them)
    OBX  ST  (110180, DCM, "Study Instance UID")
    OBX  NM  one per finding: OBX-3 the finding's code as in the SR (e.g. 233604007^
             Pneumonia^SCT), OBX-5 the calibrated probability, OBX-6 1^no units^UCUM,
             OBX-8 A (present) or N (absent), OBX-17 the cascade stage that made the call
    OBX  ST  one per finding in force that no image of the study could be assessed for
             (outside the model's intended population): OBX-3 its code, OBX-5 "not
             assessed: <reason>", OBX-11 X (table 0085: results cannot be obtained)
    OBX  CWE (260870009, SCT, "Priority") = Stat | Urgent | Routine (the SR's codes)
    OBX  NM  (PRIORITYSCORE, 99CXRAI, "Study priority score")
    OBX  ST  (111001, DCM, "Algorithm Name") and (111003, DCM, "Algorithm Version"),
             as TID 4019 identifies the algorithm in the SR

Present/absent as OBX-8: the one-OBX-per-finding form keeps the probability as the
observation's value (NM, so receivers can sort and threshold on it) and uses the field
v2.5.1 defines for "this value is abnormal" (table 0078: A abnormal, N normal) to say
whether the node calls the finding present at its threshold. A second coded OBX per
finding would say the same thing and need a sub-ID to pair the two.

Priority levels map to table 0027/0485: STAT → S (stat), URGENT → A (ASAP), ROUTINE →
R (routine).

Message control ID (MSH-10, at most 20 characters): the first 20 hex digits of the
SHA-256 of the study UID and everything the message says (:func:`control_id`). Sending
the same content again yields the same ID — a RIS that de-duplicates by control ID files
it once — and any change of content (priority, a finding, the receiver) yields a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.factories import datatype_factory
from pydicom.valuerep import PersonName

from dicom_node.results.common import PRIVATE_SCHEME
from dicom_node.results.sr import CHEST_RADIOGRAPH, PRIORITY, PRIORITY_VALUES, STAGE_VALUES

HL7_VERSION = "2.5.1"
MESSAGE_TYPE = "ORU^R01^ORU_R01"
CHARACTER_SET = "UNICODE UTF-8"
FINAL, CORRECTED = "F", "C"
NOT_OBTAINED = "X"  # OBX-11, table 0085: results cannot be obtained for this observation
CONTROL_ID_LENGTH = 20  # MSH-10 is an ST of at most 20 characters in v2.5.1

Code = tuple[str, str, str]  # (code value, meaning, coding system) — a CWE's first three
STUDY_UID: Code = ("110180", "Study Instance UID", "DCM")
ALGORITHM_NAME: Code = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION: Code = ("111003", "Algorithm Version", "DCM")
NO_UNITS: Code = ("1", "no units", "UCUM")
# Private (99CXRAI, as in the SR): no standard concept names the node's priority score.
PRIORITY_SCORE: Code = ("PRIORITYSCORE", "Study priority score", PRIVATE_SCHEME)
# HL7 table 0027 (OBR-5, ORC-7.6) and its v2.5 successor 0485 (TQ1-9) share these codes.
PRIORITY_CODES = {"STAT": ("S", "Stat"), "URGENT": ("A", "ASAP"), "ROUTINE": ("R", "Routine")}
SEXES = frozenset({"F", "M", "O", "U", "A", "N"})  # HL7 table 0001


@dataclass(frozen=True)
class ReportedFinding:
    """One finding of the study, as the SR codes it (the strongest image's call)."""

    code: str
    scheme: str
    meaning: str
    probability: float
    present: bool
    stage: str  # "screen" | "confirm": the network whose probability this is
    assessed: bool = True  # False: outside the model's population; no probability
    reason: str = ""  # why it was not assessed

    @property
    def confirmed(self) -> bool:
        """Present according to the confirm model (not a screen-only call)."""
        return self.present and self.stage == "confirm"


@dataclass(frozen=True)
class Patient:
    """Demographics from the spooled image (the database holds none)."""

    id: str = ""
    issuer: str = ""  # Issuer of Patient ID → PID-3.4
    name: str = ""  # DICOM PN text: Family^Given^Middle^Prefix^Suffix
    birth_date: str = ""  # DICOM DA: YYYYMMDD
    sex: str = ""  # DICOM: M, F or O


@dataclass(frozen=True)
class StudyReport:
    """What the node concluded about one study: the input of :func:`oru_r01`."""

    study_instance_uid: str
    accession_number: str
    patient: Patient
    priority: str | None  # "STAT" | "URGENT" | "ROUTINE" | None
    priority_score: float | None
    findings: tuple[ReportedFinding, ...]
    algorithm_name: str
    algorithm_version: str
    observed: datetime  # the study's date and time (OBR-7, OBX-14)


@dataclass(frozen=True)
class MessageHeader:
    """Who sends the message to whom (MSH-3 to MSH-6)."""

    sending_application: str
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


def control_id(report: StudyReport, header: MessageHeader, status: str) -> str:
    """MSH-10 from the study UID and a hash of everything the message says."""
    content = {
        "study": report.study_instance_uid,
        "report": _canonical(asdict(report)),
        "header": asdict(header),
        "status": status,
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:CONTROL_ID_LENGTH].upper()


def _canonical(value: Any) -> Any:
    """Floats as the message writes them, so digits beyond those are not news."""
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def oru_r01(
    report: StudyReport, header: MessageHeader, *, status: str, created: datetime
) -> Message:
    """The ORU^R01 of ``report``; ``status`` F (final) or C (replaces an earlier one)."""
    if status not in (FINAL, CORRECTED):
        raise ValueError(f"result status must be F or C, not {status!r}")
    message = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message.msh, header, control_id(report, header, status), created)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), report.patient)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _orc(order.add_segment("ORC"), report, created)
    _obr(order.add_segment("OBR"), report, status, created)
    if report.priority in PRIORITY_CODES:
        tq1 = order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1")
        tq1.tq1_1 = "1"
        tq1.tq1_9 = _cwe((*PRIORITY_CODES[report.priority], "HL70485"))
    _observations(order, report, status)
    return message


def encode(message: Message) -> bytes:
    """ER7 with a carriage return after every segment, in UTF-8 (MSH-18)."""
    return (message.to_er7() + "\r").encode("utf-8")


# --------------------------------------------------------------------------- segments


def _msh(msh: Segment, header: MessageHeader, message_id: str, created: datetime) -> None:
    msh.msh_3 = _text(header.sending_application)
    msh.msh_4 = _text(header.sending_facility)
    msh.msh_5 = _text(header.receiving_application)
    msh.msh_6 = _text(header.receiving_facility)
    msh.msh_7 = _dtm(created)
    msh.msh_9 = MESSAGE_TYPE
    msh.msh_10 = message_id
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = CHARACTER_SET


def _pid(pid: Segment, patient: Patient) -> None:
    pid.pid_1 = "1"
    pid.pid_3 = _text(patient.id) + (f"^^^{_text(patient.issuer)}" if patient.issuer else "")
    pid.pid_5 = _xpn(patient.name)
    if len(patient.birth_date) == 8 and patient.birth_date.isdigit():
        pid.pid_7 = patient.birth_date
    pid.pid_8 = patient.sex if patient.sex in SEXES else "U"


def _xpn(name: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) → XPN (family^given^middle^suffix^prefix)."""
    person = PersonName(name)
    parts = [
        person.family_name,
        person.given_name,
        person.middle_name,
        person.name_suffix,
        person.name_prefix,
    ]
    return "^".join(_text(part) for part in parts).rstrip("^")


def _orc(orc: Segment, report: StudyReport, created: datetime) -> None:
    orc.orc_1 = "RE"  # observations to follow
    orc.orc_2 = _text(report.accession_number)
    orc.orc_3 = _text(report.accession_number)
    orc.orc_5 = "CM"  # order completed
    if report.priority in PRIORITY_CODES:
        orc.orc_7 = "^^^^^" + PRIORITY_CODES[report.priority][0]
    orc.orc_9 = _dtm(created)


def _obr(obr: Segment, report: StudyReport, status: str, created: datetime) -> None:
    obr.obr_1 = "1"
    obr.obr_2 = _text(report.accession_number)
    obr.obr_3 = _text(report.accession_number)
    obr.obr_4 = _cwe(
        (CHEST_RADIOGRAPH.value, CHEST_RADIOGRAPH.meaning, CHEST_RADIOGRAPH.scheme_designator)
    )
    if report.priority in PRIORITY_CODES:
        obr.obr_5 = PRIORITY_CODES[report.priority][0]
    obr.obr_7 = _dtm(report.observed)
    obr.obr_22 = _dtm(created)
    obr.obr_24 = "RAD"
    obr.obr_25 = status


def _observations(order: Group, report: StudyReport, status: str) -> None:
    rows: list[dict[str, str]] = [
        {"type": "ST", "code": _cwe(STUDY_UID), "value": _text(report.study_instance_uid)}
    ]
    rows += [_finding_row(finding) for finding in report.findings]
    level = (report.priority or "").lower()
    if level in PRIORITY_VALUES:
        concept = PRIORITY_VALUES[level]
        value = (concept.value, concept.meaning, concept.scheme_designator)
        code = (PRIORITY.value, PRIORITY.meaning, PRIORITY.scheme_designator)
        rows.append({"type": "CWE", "code": _cwe(code), "value": _cwe(value)})
    if report.priority_score is not None:
        rows.append(
            {"type": "NM", "code": _cwe(PRIORITY_SCORE), "value": _number(report.priority_score)}
        )
    rows.append({"type": "ST", "code": _cwe(ALGORITHM_NAME), "value": _text(report.algorithm_name)})
    rows.append(
        {"type": "ST", "code": _cwe(ALGORITHM_VERSION), "value": _text(report.algorithm_version)}
    )
    for number, row in enumerate(rows, start=1):
        _obx(order.add_group("ORU_R01_OBSERVATION").add_segment("OBX"), number, row, report, status)


def _finding_row(finding: ReportedFinding) -> dict[str, str]:
    if not finding.assessed:
        return {
            "type": "ST",
            "code": _cwe((finding.code, finding.meaning, finding.scheme)),
            "value": _text(f"not assessed: {finding.reason}"[:200]),
            "result_status": NOT_OBTAINED,
        }
    stage = STAGE_VALUES.get(finding.stage)
    return {
        "type": "NM",
        "code": _cwe((finding.code, finding.meaning, finding.scheme)),
        "value": _number(finding.probability),
        "units": _cwe(NO_UNITS),
        "flag": "A" if finding.present else "N",
        "method": _cwe((stage.value, stage.meaning, stage.scheme_designator)) if stage else "",
    }


def _obx(obx: Segment, number: int, row: dict[str, str], report: StudyReport, status: str) -> None:
    obx.obx_1 = str(number)
    obx.obx_2 = row["type"]
    obx.obx_3 = row["code"]
    obx.obx_5 = row["value"]
    if row.get("units"):
        obx.obx_6 = row["units"]
    if row.get("flag"):
        obx.obx_8 = row["flag"]
    obx.obx_11 = row.get("result_status", status)
    obx.obx_14 = _dtm(report.observed)
    if row.get("method"):
        obx.obx_17 = row["method"]


# --------------------------------------------------------------------------- values


def _text(value: str) -> str:
    """``value`` as ER7 text, escaped by hl7apy's ST data type."""
    if not value:
        return ""
    return str(datatype_factory("ST", value, version=HL7_VERSION).to_er7())


def _cwe(code: Code) -> str:
    return "^".join(_text(part) for part in code)


def _number(value: float) -> str:
    """NM with four decimals: a probability's meaningful precision, stable across re-runs."""
    return f"{value:.4f}"


def _dtm(moment: datetime) -> str:
    """DTM to the second; with the UTC offset when the moment knows its zone."""
    text = moment.strftime("%Y%m%d%H%M%S")
    return text + moment.strftime("%z") if moment.tzinfo is not None else text
