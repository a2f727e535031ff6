"""Patient identifiers for a list of studies: read from the spool on request, audited.

The database holds no patient names or IDs (migration 0003), so a list that must show
them reads them from each study's most recent image still in the spool — the header
only, two attributes. Every lookup is recorded in the audit trail (which studies, who
asked, never the identifiers themselves), and nothing here logs a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.spool import Spool
from storage.worklist import latest_spooled_files

PURGED = "(purged)"  # retention removed every file of the study
UNREADABLE = "(unreadable)"  # the file is missing or not DICOM
PHI_SHOWN_EVENT = "worklist.phi_shown"
PHI_NOTICE = (
    "dicom-node: showing patient names and IDs (PHI) read from the spool; "
    "this access is recorded in the audit trail"
)


@dataclass(frozen=True)
class PatientLabel:
    """What an operator sees of the patient: name and ID, or why they are not known."""

    name: str
    patient_id: str


def read_patient(path: Path) -> PatientLabel:
    """Patient's Name and Patient ID from a DICOM file's header (no pixel data read)."""
    try:
        header = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"]
        )
    except (OSError, InvalidDicomError):
        return PatientLabel(UNREADABLE, UNREADABLE)
    return PatientLabel(str(header.get("PatientName") or ""), str(header.get("PatientID") or ""))


def patient_labels(
    session: Session,
    spool: Spool,
    study_instance_uids: Sequence[str],
    *,
    actor: str,
    purpose: str = "worklist",
) -> dict[str, PatientLabel]:
    """The patient of each study, and an audit event saying who looked at which studies."""
    files = latest_spooled_files(session, study_instance_uids)
    labels = {
        uid: read_patient(spool.path_of(relpath)) if relpath else PatientLabel(PURGED, PURGED)
        for uid, relpath in files.items()
    }
    record_event(
        session,
        PHI_SHOWN_EVENT,
        actor=actor,
        details={
            "purpose": purpose,
            "studies": len(labels),
            "study_instance_uids": list(labels),
        },
    )
    return labels
