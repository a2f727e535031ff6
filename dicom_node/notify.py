"""Study-level notifications: when a study is finished, one message per study-event destination.

A destination type declares whether it takes objects (the SR, SC … of every image) or
study events (:mod:`dicom_node.dispatch`); the pipeline hands the study-event
destinations of a finishing image's rule to :class:`StudyNotifier`, which builds each
destination type's message — today HL7 v2 ORU^R01 for ``type = "hl7"``, the only such
type (a new study-event type adds its message builder here, next to the ORU's).

Called by the pipeline in the transaction that finishes a job, after the study's priority
was updated (:mod:`dicom_node.priority`). A study is *finished* when no other job of it is
still received, queued or running; the study row is locked first (by the pipeline, for
the priority update), so of two workers
finishing the last two images of a study, the one that commits second sees the other's
job finished and sends — the study is never left without a message.

The message (:mod:`dicom_node.results.oru`) is built from the database and one spooled
file:

* study UID, accession number, priority level and score from ``studies``;
* findings from the latest scored result of each of the study's images: per finding code
  the image with the highest probability (the strongest evidence; per-image detail is in
  each image's SR), and the algorithm that made that call;
* patient ID, name, birth date and sex, and the study date and time, from the study's most
  recently received image still in the spool — the database holds no demographics.

It is written durably to ``spool/outputs/oru/<control id>.hl7`` and queued in the outbox
like the SR and SC (``kind = "oru"``, the control ID in place of a SOP Instance UID), one
send per hl7 destination the finishing image's rule names; the sender delivers it over
MLLP (:mod:`dicom_node.dispatch.hl7`).

Again and again: every later finishing of the study (a new image of it, a re-run) builds
the message anew. Unchanged content has the same control ID and is not queued again;
changed content (a raised priority, a new finding) is a new message with result status C,
correcting the earlier one. A report identical to one already queued for a destination is
not queued again, even after a different one in between.

A study that cannot be reported (its spooled files are gone or unreadable, a message
cannot be built) is logged and skipped: the job and its DICOM results are not held back
for the notification. A full disk is not skipped: the job is retried, as for its SR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydicom
from hl7apy.exceptions import HL7apyException
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DA, TM
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.dispatch import Destination
from dicom_node.dispatch.hl7_config import Hl7Destination
from dicom_node.logs import get_logger
from dicom_node.priority import is_assessed
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
from storage.models import (
    Instance,
    Job,
    JobState,
    Send,
    Series,
    Study,
    utcnow,
)
from storage.outbox import OutgoingObject, enqueue_send
from storage.spool import Spool

log = get_logger(__name__)

ORU_KIND = "oru"
ORU_SUFFIX = ".hl7"
NOT_DICOM = ""  # Send.sop_class_uid of a message: there is no SOP class
UNFINISHED = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)


class StudyNotifier:
    """Queues the message of each finished study for its study-event destinations."""

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title  # the sending application of every message

    @classmethod
    def from_settings(cls, settings: Settings) -> StudyNotifier:
        return cls(settings.node.ae_title)

    def study_finished(
        self,
        session: Session,
        spool: Spool,
        study: Study,
        findings: Sequence[Mapping[str, Any]],
        *,
        job_id: int,
        instance_id: int,
        result_id: int | None,
        destinations: Sequence[Destination],
        actor: str,
    ) -> int:
        """Queue the study's message if job ``job_id`` was its last; returns sends queued.

        ``study`` is locked by the caller (:func:`~dicom_node.priority.locked_study`),
        ``findings`` are its :func:`~dicom_node.priority.study_findings`, and
        ``destinations`` are the study-event destinations of the finishing image's rule.
        """
        targets = [d for d in destinations if isinstance(d, Hl7Destination)]
        if not targets:
            return 0
        if _other_unfinished_jobs(session, study.id, job_id):
            return 0
        try:
            report = study_report(session, spool, study, findings)
        except (OSError, ValueError, InvalidDicomError, HL7apyException) as exc:
            log.warning(
                "study notification skipped: study cannot be reported",
                study_instance_uid=study.study_instance_uid,
                error_type=type(exc).__name__,
            )
            return 0
        if report is None:
            return 0
        source = _Source(instance_id, result_id, actor)
        return sum(self._queue(session, spool, report, target, source) for target in targets)

    def _queue(
        self,
        session: Session,
        spool: Spool,
        report: StudyReport,
        destination: Hl7Destination,
        source: _Source,
    ) -> int:
        header = self._header(destination)
        earlier = _earlier_messages(session, destination.name, report.study_instance_uid)
        if earlier & {control_id(report, header, status) for status in (FINAL, CORRECTED)}:
            return 0  # this content is already on its way (or delivered)
        status = CORRECTED if earlier else FINAL
        written = _write_message(spool, report, header, status, destination.name)
        if written is None:
            return 0
        message_id, relpath = written
        item = OutgoingObject(
            destination=destination.name,
            kind=ORU_KIND,
            sop_class_uid=NOT_DICOM,
            sop_instance_uid=message_id,
            study_instance_uid=report.study_instance_uid,
            file_path=relpath,
            instance_id=source.instance_id,
            result_id=source.result_id,
        )
        if enqueue_send(session, item, actor=source.actor) is None:
            return 0
        log.info(
            "study notification queued",
            destination=destination.name,
            study_instance_uid=report.study_instance_uid,
            message_control_id=message_id,
            result_status=status,
            priority=report.priority,
            findings=len(report.findings),
        )
        return 1

    def _header(self, destination: Hl7Destination) -> MessageHeader:
        return MessageHeader(
            sending_application=self.ae_title,
            sending_facility=destination.sending_facility or "",
            receiving_application=destination.receiving_application or "",
            receiving_facility=destination.receiving_facility or "",
        )


def _write_message(
    spool: Spool, report: StudyReport, header: MessageHeader, status: str, destination: str
) -> tuple[str, str] | None:
    """Build and durably write the message: ``(control ID, spool path)``; None if it
    cannot be built. A full disk raises, as for the SR: the job is retried rather than
    the RIS skipped."""
    try:
        message = oru_r01(report, header, status=status, created=utcnow())
        data = encode(message)
    except (ValueError, HL7apyException) as exc:
        log.warning(
            "study notification skipped: message cannot be built",
            destination=destination,
            study_instance_uid=report.study_instance_uid,
            error_type=type(exc).__name__,
        )
        return None
    message_id = str(message.msh.msh_10.value)
    return message_id, spool.store_output(ORU_KIND, message_id, [data], suffix=ORU_SUFFIX)


@dataclass(frozen=True)
class _Source:
    """What the queued send is attributed to: the image and result that finished the study."""

    instance_id: int
    result_id: int | None
    actor: str


def _other_unfinished_jobs(session: Session, study_id: int, job_id: int) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .join(Instance, Instance.id == Job.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study_id, Job.state.in_(UNFINISHED), Job.id != job_id)
        )
        or 0
    )


def _earlier_messages(session: Session, destination: str, study_instance_uid: str) -> set[str]:
    """Control IDs of the study's messages already queued for ``destination``."""
    return set(
        session.scalars(
            select(Send.sop_instance_uid).where(
                Send.kind == ORU_KIND,
                Send.destination == destination,
                Send.study_instance_uid == study_instance_uid,
            )
        )
    )


# --------------------------------------------------------------------------- the report


def study_report(
    session: Session, spool: Spool, study: Study, study_findings: Sequence[Mapping[str, Any]]
) -> StudyReport | None:
    """The study's report from the database and its latest spooled image; None when no
    image of the study was scored (there is nothing to tell the RIS)."""
    findings = _strongest_findings(study_findings)
    assessed = [finding for finding in findings if is_assessed(finding)]
    if not assessed:
        return None
    dataset = _latest_header(session, spool, study.id)
    strongest = max(assessed, key=lambda item: float(item.get("probability") or 0.0))
    name, _, version = str(strongest.get("model") or "").rpartition(" ")
    return StudyReport(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number or str(dataset.get("AccessionNumber") or ""),
        patient=_patient(dataset),
        priority=study.priority,
        priority_score=study.priority_score,
        findings=tuple(_reported(finding) for finding in findings),
        algorithm_name=name or version,
        algorithm_version=version if name else "",
        observed=_study_datetime(dataset) or study.first_received_at,
    )


def _strongest_findings(findings: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Per coded finding, the assessed one with the highest probability (in first-seen
    order); a finding no image was assessed for is reported once, as not assessed."""
    best: dict[tuple[str, str], Mapping[str, Any]] = {}
    for finding in findings:
        key = (str(finding.get("scheme") or ""), str(finding.get("code") or ""))
        kept = best.get(key)
        if kept is None or _stronger(finding, kept):
            best[key] = finding
    return list(best.values())


def _stronger(finding: Mapping[str, Any], kept: Mapping[str, Any]) -> bool:
    if not is_assessed(finding):
        return False
    if not is_assessed(kept):
        return True
    return float(finding.get("probability") or 0.0) > float(kept.get("probability") or 0.0)


def _reported(finding: Mapping[str, Any]) -> ReportedFinding:
    return ReportedFinding(
        code=str(finding.get("code") or ""),
        scheme=str(finding.get("scheme") or ""),
        meaning=str(finding.get("meaning") or ""),
        probability=float(finding.get("probability") or 0.0),
        present=bool(finding.get("present")),
        stage=str(finding.get("stage") or ""),
        assessed=is_assessed(finding),
        reason=str(finding.get("reason") or ""),
    )


def _latest_header(session: Session, spool: Spool, study_id: int) -> Dataset:
    """The header of the study's most recently received image still in the spool."""
    relpath = session.scalar(
        select(Instance.spool_path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id, Instance.purged_at.is_(None))
        .order_by(Instance.received_at.desc(), Instance.id.desc())
        .limit(1)
    )
    if relpath is None:
        raise FileNotFoundError("no image of the study is left in the spool")
    return pydicom.dcmread(spool.path_of(relpath), stop_before_pixels=True)


def _patient(dataset: Dataset) -> Patient:
    return Patient(
        id=str(dataset.get("PatientID") or ""),
        issuer=str(dataset.get("IssuerOfPatientID") or ""),
        name=str(dataset.get("PatientName") or ""),
        birth_date=str(dataset.get("PatientBirthDate") or ""),
        sex=str(dataset.get("PatientSex") or "").strip().upper(),
    )


def _study_datetime(dataset: Dataset) -> datetime | None:
    """Study Date and Time as a (local, zone-less) moment; None when either is unusable."""
    try:
        date = DA(str(dataset.get("StudyDate") or ""))
        time = TM(str(dataset.get("StudyTime") or ""))
    except ValueError:
        return None
    if date is None or time is None:
        return None
    return datetime.combine(date, time.replace(microsecond=0))
