"""Response models of the HTTP API: what ``/openapi.json`` promises, field by field.

No model carries patient names, IDs or birth dates; the accession number is the one
identifier shown, because that is what radiologists look studies up by. Job errors are
shown for failed jobs only: a skipped job's reason is a routing explanation, which quotes
the DICOM attribute values a rule tested.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Priority = Literal["STAT", "URGENT", "ROUTINE"]
StudyStatus = Literal["received", "running", "queued", "done", "partial", "failed", "skipped"]
JobStateName = Literal["received", "queued", "running", "done", "failed", "skipped"]


MAX_ID = 2**63 - 1
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
CODE_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,64}$"


class Problem(BaseModel):
    """An error (FastAPI's shape): 401, 404, 409."""

    detail: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: bool = Field(description="Whether the database answered.")


class _Study(BaseModel):
    """The fields a worklist entry and a study's detail share, in this order."""

    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    first_received_at: datetime
    last_received_at: datetime
    status: StudyStatus
    priority: Priority | None
    priority_score: float | None
    top_finding: str | None
    top_probability: float | None


class WorklistStudy(_Study):
    """One study of the worklist (:class:`storage.worklist.WorklistEntry`)."""

    priority_updated_at: datetime | None
    instances: int
    jobs: dict[str, int] = Field(description="Jobs of the study by state, zeros left out.")
    url: str = Field(description="The study's detail in this API.")


class Worklist(BaseModel):
    generated_at: datetime
    studies: list[WorklistStudy]


class FindingOut(BaseModel):
    """One finding of one result, as the SR reports it; ``not_assessed`` (outside the
    model's intended population) comes with the reason and no probability."""

    code: str | None = None
    scheme: str | None = None
    meaning: str | None = None
    status: str = "assessed"  # "assessed" | "not_assessed"
    reason: str | None = None
    probability: float | None = None
    present: bool | None = None
    stage: str | None = None
    threshold: float | None = None
    model: str | None = None
    cam_lung_share: float | None = Field(
        None, description="Share of the Grad-CAM inside the lung fields (explained finding)."
    )
    cam_heart_share: float | None = Field(
        None, description="Share of the Grad-CAM inside the heart (explained finding)."
    )


class MeasurementOut(BaseModel):
    """One anatomy measurement (cardiothoracic ratio, widths in mm, lung areas in cm²)."""

    name: str
    code: str
    scheme: str
    meaning: str
    value: float
    unit: str = Field(description="UCUM unit: 1, mm, cm2.")


class ResultOut(BaseModel):
    id: int
    status: Literal["scored", "not_scored", "error"]
    reason: str | None
    pipeline: str
    model_key: str
    findings: list[FindingOut]
    measurements: list[MeasurementOut] = Field(default_factory=list)
    in_domain: bool | None
    warnings: list[str]
    timings_ms: dict[str, float]
    sr_sop_instance_uid: str | None
    sc_sop_instance_uid: str | None
    heatmap_url: str | None = Field(description="PNG thumbnail of the heatmap SC, if kept.")
    updated_at: datetime


class JobOut(BaseModel):
    id: int
    kind: str
    state: JobStateName
    attempts: int
    error: str | None = Field(description="Why the job failed (failed jobs only).")
    created_at: datetime
    finished_at: datetime | None
    retry_url: str | None = Field(description="POST here to re-queue (failed/skipped jobs).")


class SendOut(BaseModel):
    id: int
    destination: str
    kind: str
    sop_instance_uid: str
    state: Literal["pending", "sending", "sent", "dead"]
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    updated_at: datetime


class InstanceOut(BaseModel):
    sop_instance_uid: str
    version: int
    series_instance_uid: str
    modality: str | None
    view_position: str | None
    received_at: datetime
    jobs: list[JobOut]
    results: list[ResultOut]
    sends: list[SendOut]


class StudyDetail(_Study):
    instances: list[InstanceOut]


class RetriedJob(BaseModel):
    id: int
    state: JobStateName
    previous_state: JobStateName


StatusReport = dict[str, Any]


class FeedbackIn(BaseModel):
    """One reader's label: a study or an image, a finding by its code, present or not."""

    study_instance_uid: str | None = Field(None, max_length=64, pattern=UID_PATTERN)
    sop_instance_uid: str | None = Field(None, max_length=64, pattern=UID_PATTERN)
    finding_code: str = Field(pattern=CODE_PATTERN, examples=["233604007"])
    present: bool
    reader: str = Field(pattern=NAME_PATTERN)
    source: str = Field("api", max_length=32, pattern=NAME_PATTERN)


class FeedbackStored(BaseModel):
    stored: int
    matched: int = Field(description="Labels naming an image or study scored here.")


ModelsReport = dict[str, Any]
