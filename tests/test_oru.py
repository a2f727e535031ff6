"""The ORU^R01 the RIS receives, parsed back with hl7apy: every segment and field it relies on.

Messages are parsed with strict validation against the v2.5.1 structures, so a segment in
the wrong group or a field of the wrong type fails here and not at a hospital's interface
engine.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.parser import parse_message

from dicom_node.results.oru import (
    CORRECTED,
    FINAL,
    MessageHeader,
    Patient,
    ReportedFinding,
    StudyReport,
    control_id,
    encode,
    oru_r01,
)

CREATED = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
HEADER = MessageHeader("CXR_AI", "HOSPITAL", "RIS", "RADIOLOGY")
PNEUMONIA = ReportedFinding("233604007", "SCT", "Pneumonia", 0.873149, True, "confirm")
EFFUSION = ReportedFinding("60046008", "SCT", "Pleural effusion", 0.12, False, "screen")


def report(**changes: object) -> StudyReport:
    values: dict[str, object] = {
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "accession_number": "A2026-17",
        "patient": Patient("P-42", "HOSP", "Doe^Jane^Mary^Dr^Jr", "19700102", "F"),
        "priority": "URGENT",
        "priority_score": 0.873149,
        "findings": (PNEUMONIA, EFFUSION),
        "algorithm_name": "cxr_pneumonia_confirm_resnet18",
        "algorithm_version": "1.1.0",
        "observed": datetime(2026, 3, 4, 1, 2, 3),
    }
    values.update(changes)
    return StudyReport(**values)  # type: ignore[arg-type]


def roundtrip(study: StudyReport, status: str = FINAL, header: MessageHeader = HEADER) -> Message:
    data = encode(oru_r01(study, header, status=status, created=CREATED))
    assert data.endswith(b"\r") and b"\n" not in data
    parsed = parse_message(data.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.validate() is True
    return parsed


def order_of(message: Message) -> tuple[Segment, Segment, list[Segment]]:
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return order.orc, order.obr, [group.obx for group in order.oru_r01_observation]


def er7(element: object) -> str:
    return str(element.to_er7())  # type: ignore[attr-defined]


def test_header_identifies_sender_receiver_and_message() -> None:
    msh = roundtrip(report()).msh
    assert er7(msh.msh_3) == "CXR_AI" and er7(msh.msh_4) == "HOSPITAL"
    assert er7(msh.msh_5) == "RIS" and er7(msh.msh_6) == "RADIOLOGY"
    assert er7(msh.msh_7) == "20260304050607+0000"
    assert er7(msh.msh_9) == "ORU^R01^ORU_R01"
    assert er7(msh.msh_10) == control_id(report(), HEADER, FINAL)
    assert er7(msh.msh_11) == "P" and er7(msh.msh_12) == "2.5.1"
    assert er7(msh.msh_18) == "UNICODE UTF-8"


def test_patient_from_the_image_header() -> None:
    pid = roundtrip(report()).oru_r01_patient_result.oru_r01_patient.pid
    assert er7(pid.pid_3) == "P-42^^^HOSP"
    # DICOM family^given^middle^prefix^suffix → XPN family^given^middle^suffix^prefix
    assert er7(pid.pid_5) == "Doe^Jane^Mary^Jr^Dr"
    assert er7(pid.pid_7) == "19700102" and er7(pid.pid_8) == "F"


def test_order_carries_accession_procedure_dates_status_and_priority() -> None:
    message = roundtrip(report())
    orc, obr, _ = order_of(message)
    assert er7(orc.orc_1) == "RE" and er7(orc.orc_5) == "CM"
    assert er7(orc.orc_2) == er7(orc.orc_3) == "A2026-17"
    assert er7(orc.orc_7) == "^^^^^A"
    assert er7(obr.obr_2) == er7(obr.obr_3) == "A2026-17"
    assert er7(obr.obr_4) == "399208008^Plain chest X-ray^SCT"
    assert er7(obr.obr_5) == "A"
    assert er7(obr.obr_7) == "20260304010203"
    assert er7(obr.obr_22) == "20260304050607+0000"
    assert er7(obr.obr_25) == "F"
    tq1 = message.oru_r01_patient_result.oru_r01_order_observation.oru_r01_timing_qty.tq1
    assert er7(tq1.tq1_9) == "A^ASAP^HL70485"


def test_one_observation_per_finding_then_priority_score_and_algorithm() -> None:
    _, _, obx = order_of(roundtrip(report()))
    assert [er7(o.obx_1) for o in obx] == ["1", "2", "3", "4", "5", "6", "7"]
    assert [er7(o.obx_2) for o in obx] == ["ST", "NM", "NM", "CWE", "NM", "ST", "ST"]
    study, pneumonia, effusion, priority, score, name, version = obx
    assert er7(study.obx_3) == "110180^Study Instance UID^DCM"
    assert er7(study.obx_5) == "1.2.826.0.1.3680043.8.498.1"
    assert er7(pneumonia.obx_3) == "233604007^Pneumonia^SCT"
    assert er7(pneumonia.obx_5) == "0.8731" and er7(pneumonia.obx_6) == "1^no units^UCUM"
    assert er7(pneumonia.obx_8) == "A"  # present
    assert er7(pneumonia.obx_17) == "CONFIRM^Confirmation model^99CXRAI"
    assert er7(effusion.obx_3) == "60046008^Pleural effusion^SCT"
    assert er7(effusion.obx_5) == "0.1200" and er7(effusion.obx_8) == "N"  # absent
    assert er7(effusion.obx_17) == "SCREEN^Screening model^99CXRAI"
    assert er7(priority.obx_3) == "260870009^Priority^SCT"
    assert er7(priority.obx_5) == "103391001^Urgent^SCT"
    assert er7(score.obx_3) == "PRIORITYSCORE^Study priority score^99CXRAI"
    assert er7(score.obx_5) == "0.8731"
    assert er7(name.obx_3) == "111001^Algorithm Name^DCM"
    assert er7(name.obx_5) == "cxr_pneumonia_confirm_resnet18"
    assert er7(version.obx_3) == "111003^Algorithm Version^DCM" and er7(version.obx_5) == "1.1.0"
    assert {er7(o.obx_11) for o in obx} == {"F"}
    assert {er7(o.obx_14) for o in obx} == {"20260304010203"}


@pytest.mark.parametrize(
    ("level", "code", "concept"),
    [("STAT", "S", "49499008^Stat^SCT"), ("ROUTINE", "R", "50811001^Routine^SCT")],
)
def test_priority_levels_map_to_hl7_and_snomed_codes(level: str, code: str, concept: str) -> None:
    message = roundtrip(report(priority=level))
    orc, obr, obx = order_of(message)
    assert er7(obr.obr_5) == code and er7(orc.orc_7) == f"^^^^^{code}"
    assert er7(obx[3].obx_5) == concept


def test_correction_says_so_in_the_order_and_every_observation() -> None:
    _, obr, obx = order_of(roundtrip(report(), CORRECTED))
    assert er7(obr.obr_25) == "C"
    assert {er7(o.obx_11) for o in obx} == {"C"}


def test_control_id_follows_the_content_only() -> None:
    same = control_id(report(), HEADER, FINAL)
    assert len(same) <= 20
    first = oru_r01(report(), HEADER, status=FINAL, created=CREATED)
    later = oru_r01(report(), HEADER, status=FINAL, created=datetime.now(UTC))
    assert er7(first.msh.msh_10) == er7(later.msh.msh_10) == same
    changed = {
        control_id(report(priority="STAT"), HEADER, FINAL),
        control_id(report(priority_score=0.95), HEADER, FINAL),
        control_id(report(findings=(PNEUMONIA,)), HEADER, FINAL),
        control_id(report(), MessageHeader("CXR_AI", receiving_application="OTHER"), FINAL),
        control_id(report(), HEADER, CORRECTED),
        control_id(report(study_instance_uid="1.2.3"), HEADER, FINAL),
    }
    assert same not in changed and len(changed) == 6
    # digits beyond those the message carries are not a change
    assert control_id(report(priority_score=0.8731491), HEADER, FINAL) == same


def test_separators_in_values_are_escaped_not_interpreted() -> None:
    tricky = Patient("12|34", "A&B", "O'Brien|Smith^Ann~Marie\\X^^^", "1970", "X")
    message = roundtrip(report(patient=tricky, accession_number="ACC^7|8"))
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert er7(pid.pid_3) == "12\\F\\34^^^A\\T\\B"
    assert er7(pid.pid_5) == "O'Brien\\F\\Smith^Ann\\R\\Marie\\E\\X"
    assert er7(pid.pid_8) == "U"  # not a table 0001 sex
    assert not pid.pid_7.to_er7()  # "1970" is not a date
    orc, obr, obx = order_of(message)
    assert er7(obr.obr_2) == er7(orc.orc_2) == "ACC\\S\\7\\F\\8"
    assert len(obx) == 7  # no field or segment was split by a value


def test_unicode_names_travel_as_utf8() -> None:
    patient = Patient("P1", "", "Müller^Zoë", "", "F")
    data = encode(oru_r01(report(patient=patient), HEADER, status=FINAL, created=CREATED))
    assert "PID|1||P1||Müller^Zoë||" in data.decode("utf-8")


def test_a_study_without_priority_has_no_priority_fields() -> None:
    message = roundtrip(report(priority=None, priority_score=None))
    orc, obr, obx = order_of(message)
    assert not obr.obr_5.to_er7() and not orc.orc_7.to_er7()
    assert [er7(o.obx_3).split("^")[0] for o in obx] == [
        "110180",
        "233604007",
        "60046008",
        "111001",
        "111003",
    ]


def test_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="F or C"):
        oru_r01(report(), HEADER, status="P", created=CREATED)


def test_a_finding_not_assessed_is_a_text_observation_that_cannot_be_obtained() -> None:
    tuberculosis = ReportedFinding(
        "154283005",
        "SCT",
        "Pulmonary tuberculosis",
        0.0,
        False,
        "",
        assessed=False,
        reason="patient age 4 years is outside the validated ages 18–120 years",
    )
    _, _, obx = order_of(roundtrip(report(findings=(PNEUMONIA, tuberculosis))))
    row = obx[2]
    assert er7(row.obx_2) == "ST" and er7(row.obx_3) == "154283005^Pulmonary tuberculosis^SCT"
    assert er7(row.obx_5).startswith("not assessed: patient age 4 years")
    assert er7(row.obx_11) == "X" and er7(obx[1].obx_11) == "F"
    assert not er7(row.obx_8)  # neither abnormal nor normal: no call was made
