"""The HTTP API of a node: health, status, worklist, studies, retries, metrics, dashboard.

``create_app`` builds a FastAPI application over the node's database and spool; the node
serves it with uvicorn (:mod:`dicom_node.api.service`), tests may drive it directly.
Every route but ``/healthz`` and the dashboard's static shell needs a bearer token
(:mod:`dicom_node.api.auth`), ``/metrics`` included — Prometheus sends it with
``authorization: {credentials_file: …}``. Routes are plain ``def`` functions: FastAPI
runs them in its thread pool, so database work never blocks the event loop.

Each route's role is declared in one place, by the router it is on — the router carries
the role's dependency and the role as its OpenAPI tag:

* ``_viewer`` (tag ``viewer``): status and metrics;
* ``_viewer_audited`` (tags ``viewer``, ``audited``): reads that return
  patient-identifying data — worklist, study, heatmap — each an audit event
  (:mod:`dicom_node.api.audit`);
* ``_admin`` (tags ``admin``, ``audited``): every action, each an audit event. A new
  route that is not a read belongs here.

Every answer carries the security headers and obeys the body limit of
:mod:`dicom_node.api.hardening`.

The schema is at ``/openapi.json``; the interactive docs pages are off because they load
their scripts from a CDN, which a hospital network usually cannot (and should not) reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.api import heatmap
from dicom_node.api import models as models_api
from dicom_node.api.audit import audit_admin, audit_read
from dicom_node.api.auth import (
    ApiToken,
    Authenticator,
    FailureLimiter,
    Role,
    require_viewer,
)
from dicom_node.api.deps import ApiContext, Context, Db
from dicom_node.api.hardening import HardeningMiddleware
from dicom_node.api.metrics import ModelInfo, configured_models, make_registry
from dicom_node.api.schemas import (
    MAX_ID,
    UID_PATTERN,
    Health,
    Priority,
    Problem,
    RetriedJob,
    StatusReport,
    StudyDetail,
    Worklist,
    WorklistStudy,
)
from dicom_node.api.studies import study_detail, study_url
from dicom_node.config import Settings
from dicom_node.logs import get_logger
from dicom_node.status import collect_status
from storage import queue
from storage.db import ping
from storage.models import Job, Result
from storage.spool import Spool
from storage.worklist import DEFAULT_LIMIT, worklist

log = get_logger(__name__)

ACTOR = "api"
PNG = "image/png"
AUDITED = "audited"  # OpenAPI tag of the routes that write an access audit event
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid token."},
    403: {"model": Problem, "description": "The token's role does not allow this."},
    429: {"model": Problem, "description": "Too many failed authentications from here."},
}
_ACTION_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    413: {"model": Problem, "description": "Request body too large."},
}


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session],
    spool: Spool,
    tokens: ApiToken | Sequence[ApiToken],
    *,
    models: list[ModelInfo] | None = None,
) -> FastAPI:
    """The application; ``tokens`` are the tokens in force (:func:`~dicom_node.api.auth.
    resolve_tokens`), ``models`` defaults to the configured bundles' metadata."""
    http = settings.http
    app = FastAPI(
        title="cxr-ai-node",
        version=__version__,
        summary="Worklist, results and health of a chest radiograph screening node.",
        docs_url=None,
        redoc_url=None,
    )
    models = configured_models(settings) if models is None else models
    app.state.context = ApiContext(
        settings, sessions, spool, make_registry(sessions, models, settings)
    )
    app.state.authenticator = Authenticator(
        [tokens] if isinstance(tokens, ApiToken) else list(tokens),
        FailureLimiter(http.auth_failure_limit, http.auth_failure_window_s),
    )
    app.include_router(_public)
    app.include_router(_viewer, responses=_ERRORS)
    app.include_router(_viewer_audited, responses=_ERRORS)
    app.include_router(_admin, responses=_ACTION_ERRORS)
    app.include_router(models_api.viewer, responses=_ERRORS)
    app.include_router(models_api.admin, responses=_ACTION_ERRORS)
    static = resources.files("dicom_node.api") / "static"
    app.mount("/dashboard", StaticFiles(directory=str(static), html=True), name="dashboard")
    app.add_middleware(HardeningMiddleware, max_body_bytes=http.max_body_bytes)
    return app


_public = APIRouter()
_viewer = APIRouter(tags=[Role.VIEWER.value], dependencies=[Depends(require_viewer)])
_viewer_audited = APIRouter(tags=[Role.VIEWER.value, AUDITED], dependencies=[Depends(audit_read)])
_admin = APIRouter(tags=[Role.ADMIN.value, AUDITED], dependencies=[Depends(audit_admin)])


@_public.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/")


@_public.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:
    """No icon: an empty answer instead of a 404 in every browser's console."""
    return Response(status_code=204)


@_public.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Liveness and database reachability (no token needed).",
)
def healthz(context: Context) -> Any:
    engine = context.sessions.kw["bind"]
    try:
        ping(engine)
    except SQLAlchemyError as exc:
        log.warning("health check: database unreachable", error=str(exc).splitlines()[0][:200])
        body = Health(status="unavailable", database=False)
        return JSONResponse(body.model_dump(), status_code=503)
    return Health(status="ok", database=True)


@_viewer.get("/api/status", response_model=StatusReport, summary="The `dicom-node status` report.")
def status(context: Context) -> dict[str, Any]:
    return collect_status(context.settings)


@_viewer_audited.get(
    "/api/worklist",
    response_model=Worklist,
    summary="Studies by priority (STAT first), then arrival (oldest first).",
)
def get_worklist(
    session: Db,
    since: Annotated[
        datetime | None, Query(description="Studies that received an image at or after this.")
    ] = None,
    priority: Annotated[
        list[Priority] | None, Query(description="Keep these levels (repeat the parameter).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = DEFAULT_LIMIT,
) -> Worklist:
    entries = worklist(session, since=_utc(since), priorities=priority, limit=limit)
    studies = [
        WorklistStudy.model_validate({**e.as_dict(), "url": study_url(e.study_instance_uid)})
        for e in entries
    ]
    return Worklist(generated_at=datetime.now(UTC), studies=studies)


def _utc(moment: datetime | None) -> datetime | None:
    """Naive times are taken as UTC; times that do not exist in UTC are a client error."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise HTTPException(422, detail="since is out of range") from None


@_viewer_audited.get(
    "/api/studies/{study_uid}",
    response_model=StudyDetail,
    responses={404: {"model": Problem}},
    summary="A study: findings per image, jobs, sends and heatmap links.",
)
def get_study(
    session: Db, study_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)]
) -> StudyDetail:
    detail = study_detail(session, study_uid)
    if detail is None:
        raise HTTPException(404, detail="no such study")
    return detail


@_viewer_audited.get(
    "/api/results/{result_id}/heatmap.png",
    response_class=Response,
    responses={200: {"content": {PNG: {}}}, 404: {"model": Problem}},
    summary="PNG thumbnail of a result's heatmap secondary capture.",
)
def get_heatmap(
    context: Context,
    session: Db,
    result_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    size: Annotated[int, Query(ge=32, le=2048)] = heatmap.DEFAULT_SIZE,
) -> Response:
    result = session.get(Result, result_id)
    if result is None or result.sc_path is None or result.purged_at is not None:
        raise HTTPException(404, detail="no heatmap for this result")
    path = context.spool.path_of(result.sc_path)
    if not path.is_file():
        raise HTTPException(404, detail="heatmap no longer in the spool")
    png = heatmap.render_png(path, size)
    return Response(png, media_type=PNG)


@_admin.post(
    "/api/jobs/{job_id}/retry",
    response_model=RetriedJob,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
    summary="Re-queue a failed or skipped job (admin; audited).",
)
def retry_job(session: Db, job_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> RetriedJob:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise HTTPException(404, detail="no such job")
    previous = job.state
    try:
        queue.requeue(session, job, actor=ACTOR)
    except queue.InvalidTransition as exc:
        raise HTTPException(409, detail=str(exc)) from None
    log.info("job re-queued", job_id=job.id, previous_state=previous.value, actor=ACTOR)
    return RetriedJob(id=job.id, state=job.state.value, previous_state=previous.value)


@_viewer.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics (text format).",
)
def metrics(context: Context) -> Response:
    return Response(generate_latest(context.registry), media_type=CONTENT_TYPE_LATEST)
