"""The models in the field over HTTP: the dashboard's models page and readers' feedback.

``GET /api/models`` (viewer) is the page's one request: every version with its state,
live performance against feedback with its confidence intervals, and drift with the
reference-vs-now bars. ``POST /api/feedback`` (admin: it changes the ground truth the
live figures and recalibration rest on; audited) takes one label.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from dicom_node.api.audit import audit_admin
from dicom_node.api.auth import Role, require_viewer
from dicom_node.api.deps import Context, Db
from dicom_node.api.schemas import FeedbackIn, FeedbackStored, ModelsReport, Problem
from dicom_node.models import registry
from dicom_node.models.feedback import FeedbackError, label_of
from dicom_node.models.monitor import model_health
from storage.registry import add_feedback, known_cases

ACTOR = "api"
viewer = APIRouter(tags=[Role.VIEWER.value], dependencies=[Depends(require_viewer)])
admin = APIRouter(tags=[Role.ADMIN.value, "audited"], dependencies=[Depends(audit_admin)])


@viewer.get(
    "/api/models",
    response_model=ModelsReport,
    summary="Model versions, live performance with 95 % CIs, and drift.",
)
def get_models(context: Context, session: Db) -> dict[str, Any]:
    health = model_health(context.settings, session)
    return {
        "models": registry.listing(context.settings, session),
        "performance": health.performance,
        "drift": health.drift,
    }


@admin.post(
    "/api/feedback",
    response_model=FeedbackStored,
    status_code=201,
    responses={400: {"model": Problem}},
    summary="A reader's label for a finding on a study or an image (admin; audited).",
)
def post_feedback(session: Db, body: FeedbackIn) -> FeedbackStored:
    try:
        label = label_of(body.model_dump(), "api")
    except FeedbackError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    stored = add_feedback(session, [label], actor=ACTOR)
    return FeedbackStored(stored=stored, matched=known_cases(session, [label]))
