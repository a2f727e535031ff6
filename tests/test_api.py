"""The HTTP API on both backends, through the real uvicorn server a node starts.

One populated node per backend serves the read-only tests of this module (see
:mod:`tests.api_support` for the studies: priorities arrive out of order); tests that
change state or need a fresh home start a node of their own.
"""

from __future__ import annotations

import hashlib
import io
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicom_node.api import create_app, resolve_token, resolve_tokens
from dicom_node.api.auth import TOKEN_ENV, VIEWER_TOKEN_ENV, Role, TokenError, fingerprint
from dicom_node.node import Node
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import AuditEvent, Job, JobState
from storage.spool import Spool
from tests.api_support import (
    EXPECTED_ORDER,
    PATIENT_ID_PREFIX,
    PRIORITY_OF,
    SCORED,
    TOKEN,
    VIEWER_TOKEN,
    ApiNode,
    node_settings,
    running_api,
)
from tests.conftest import BACKENDS
from tests.support import free_port, provision_database


@pytest.fixture(scope="module", params=BACKENDS)
def api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> Iterator[ApiNode]:
    home = tmp_path_factory.mktemp(f"api-{request.param}")
    with (
        provision_database(request.param, home) as url,
        running_api(home, url, data_dir / "dicom") as node,
    ):
        yield node


def accessions(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [study["accession_number"] for study in response.json()["studies"]]


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- authentication -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/worklist", "/api/status", "/metrics", "/api/studies/1.2.3"])
@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", TOKEN[:-1]])
def test_api_refuses_requests_without_the_right_token(
    api: ApiNode, path: str, token: str | None
) -> None:
    with api.client(token) as client:
        response = client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "studies" not in response.text


def test_api_answers_with_the_token_and_health_needs_none(api: ApiNode) -> None:
    with api.client() as client:
        assert client.get("/api/worklist").status_code == 200
    with api.client(None) as anonymous:
        health = anonymous.get("/healthz")
        dashboard = anonymous.get("/dashboard/")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": True}
    assert dashboard.status_code == 200
    assert "Chest radiograph worklist" in dashboard.text


def test_generated_token_file_is_private_and_reused_across_starts(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    settings = node_settings(tmp_path, database_url, token_file=False)
    token_path = settings.storage.home / "api-token"
    tokens = []
    for _start in range(2):
        node = Node(settings, workers=False)
        node.start()
        try:
            assert node.http is not None
            tokens.append(token_path.read_text().strip())
            base = f"http://127.0.0.1:{node.http.port}"
            bearer = {"Authorization": f"Bearer {tokens[-1]}"}
            assert httpx.get(f"{base}/api/worklist", headers=bearer).status_code == 200
            assert httpx.get(f"{base}/api/worklist").status_code == 401
        finally:
            node.stop()
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert len(tokens[0]) >= 40 and tokens[0] == tokens[1]
    logged = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    in_force = {"role": "admin", "source": "generated file", "path": str(token_path)}
    assert ("api token in force", in_force) in logged
    assert tokens[0] not in repr(logged)


def test_token_from_the_environment_wins_and_short_tokens_are_refused(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    from_env = resolve_token(settings, environ={TOKEN_ENV: "env-token-0123456789abc"})
    assert from_env.value == "env-token-0123456789abc"
    assert resolve_token(settings, environ={}).value == TOKEN  # the configured file
    with pytest.raises(TokenError, match="at least 16 characters"):
        resolve_token(settings, environ={TOKEN_ENV: "short"})
    assert not (tmp_path / "api-token").exists()  # nothing generated when one is configured


def test_health_is_503_and_metrics_say_so_when_the_database_is_unreachable(
    tmp_path: Path,
) -> None:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere"
    settings = node_settings(tmp_path, url)
    engine = make_engine(url, connect_args={"connect_timeout": 2})
    app = create_app(
        settings, make_session_factory(engine), Spool(tmp_path / "spool"), resolve_token(settings)
    )
    with TestClient(app) as client:
        health = client.get("/healthz")
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    engine.dispose()
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "database": False}
    assert metrics.status_code == 200
    assert metric_values(metrics.text)[("cxr_node_database_up", ())] == 0


# -- worklist -------------------------------------------------------------------------


def test_worklist_is_stat_then_urgent_then_routine_each_by_arrival(api: ApiNode) -> None:
    with api.client() as client:
        response = client.get("/api/worklist")
    assert accessions(response) == list(EXPECTED_ORDER)
    studies = {s["accession_number"]: s for s in response.json()["studies"]}
    for accession, priority in PRIORITY_OF.items():
        assert studies[accession]["priority"] == priority
        assert studies[accession]["study_instance_uid"] == api.studies[accession]
    assert studies["ACC-S1"]["top_finding"] == "Pneumonia"
    assert studies["ACC-S1"]["top_probability"] == pytest.approx(0.95)
    assert studies["ACC-S1"]["status"] == "done"
    assert studies["ACC-HIP"]["status"] == "skipped"
    assert studies["ACC-S1"]["url"] == f"/api/studies/{api.studies['ACC-S1']}"


def test_worklist_filters_by_priority_since_and_limit(api: ApiNode) -> None:
    with api.client() as client:
        everything = client.get("/api/worklist").json()["studies"]
        stat_only = client.get("/api/worklist", params={"priority": "STAT"})
        two_levels = client.get(
            "/api/worklist", params=[("priority", "URGENT"), ("priority", "ROUTINE")]
        )
        first_two = client.get("/api/worklist", params={"limit": 2})
        by_arrival = sorted(everything, key=lambda s: s["last_received_at"])
        since = by_arrival[4]["last_received_at"]  # the last three to arrive
        recent = client.get("/api/worklist", params={"since": since})
        future = client.get("/api/worklist", params={"since": "2999-01-01T00:00:00Z"})
        unknown = client.get("/api/worklist", params={"priority": "SOON"})
        too_many = client.get("/api/worklist", params={"limit": 0})
    assert accessions(stat_only) == ["ACC-S1", "ACC-S2"]
    assert accessions(two_levels) == ["ACC-U1", "ACC-U2", "ACC-R1", "ACC-R2"]
    assert accessions(first_two) == ["ACC-S1", "ACC-S2"]
    assert accessions(recent) == ["ACC-S2", "ACC-U2", "ACC-R2"]
    assert accessions(future) == []
    assert unknown.status_code == 422 and too_many.status_code == 422


def test_responses_carry_no_patient_identifiers(api: ApiNode) -> None:
    with api.client() as client:
        bodies = [client.get("/api/worklist").text, client.get("/api/status").text]
        bodies += [client.get(f"/api/studies/{uid}").text for uid in api.studies.values()]
        bodies.append(client.get("/metrics").text)
    for body in bodies:
        assert "Testpatient" not in body and PATIENT_ID_PREFIX not in body
    assert "ACC-S1" in bodies[0]  # the accession number is the one identifier shown


# -- study detail and heatmaps ----------------------------------------------------------


def test_study_detail_shows_findings_jobs_sends_and_a_heatmap_png(api: ApiNode) -> None:
    with api.client() as client:
        response = client.get(f"/api/studies/{api.studies['ACC-S1']}")
        assert response.status_code == 200, response.text
        study = response.json()
        (instance,) = study["instances"]
        (result,) = instance["results"]
        png = client.get(result["heatmap_url"])
        small = client.get(result["heatmap_url"], params={"size": 64})
    with api.client(None) as anonymous:
        anonymous_png = anonymous.get(result["heatmap_url"])
    assert study["accession_number"] == "ACC-S1"
    assert study["priority"] == "STAT" and study["status"] == "done"
    assert [job["state"] for job in instance["jobs"]] == ["done"]
    (finding,) = result["findings"]
    assert finding["meaning"] == "Pneumonia" and finding["present"] is True
    assert finding["probability"] == pytest.approx(0.95)
    assert result["status"] == "scored" and result["sr_sop_instance_uid"]
    assert sorted(send["kind"] for send in instance["sends"]) == ["sc", "sr"]
    assert {send["destination"] for send in instance["sends"]} == {"pacs"}
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    image.load()
    assert image.format == "PNG" and max(image.size) == 512 and image.mode == "RGB"
    assert len(image.getcolors(1 << 24) or []) > 100  # an overlay, not a blank square
    assert max(Image.open(io.BytesIO(small.content)).size) == 64
    assert anonymous_png.status_code == 401


def test_unknown_study_and_heatmap_are_404(api: ApiNode) -> None:
    with api.client() as client:
        study = client.get("/api/studies/1.2.3.4")
        heatmap = client.get("/api/results/999999/heatmap.png")
        skipped = client.get(f"/api/studies/{api.studies['ACC-HIP']}").json()
    assert study.status_code == 404 and study.json() == {"detail": "no such study"}
    assert heatmap.status_code == 404
    (instance,) = skipped["instances"]
    assert instance["results"] == [] and instance["jobs"][0]["state"] == "skipped"
    assert instance["jobs"][0]["error"] is None  # routing reasons quote DICOM values
    assert instance["jobs"][0]["retry_url"] == f"/api/jobs/{instance['jobs'][0]['id']}/retry"


# -- job retry ------------------------------------------------------------------------


def test_retry_requeues_a_skipped_job_audited_as_api_and_refuses_other_states(
    tmp_path: Path, database_url: str, data_dir: Path
) -> None:
    with running_api(tmp_path, database_url, data_dir / "dicom") as node, node.client() as client:
        study = client.get(f"/api/studies/{node.studies['ACC-HIP']}").json()
        job_id = study["instances"][0]["jobs"][0]["id"]
        done = client.get(f"/api/studies/{node.studies['ACC-S1']}").json()
        done_id = done["instances"][0]["jobs"][0]["id"]
        retried = client.post(f"/api/jobs/{job_id}/retry")
        again = client.post(f"/api/jobs/{job_id}/retry")
        finished = client.post(f"/api/jobs/{done_id}/retry")
        missing = client.post("/api/jobs/999999/retry")
        after = client.get(f"/api/studies/{node.studies['ACC-HIP']}").json()
        with session_scope(node.sessions) as session:
            job = session.get(Job, job_id)
            assert job is not None
            state = job.state
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.job_id == job_id, AuditEvent.actor == "api")
            ).all()
            audit = [(e.kind, e.details) for e in events]
    assert retried.status_code == 200
    assert retried.json() == {"id": job_id, "state": "queued", "previous_state": "skipped"}
    assert state is JobState.QUEUED
    assert after["instances"][0]["jobs"][0]["state"] == "queued"
    assert audit == [("job.queued", {"from": "skipped", "to": "queued"})]
    assert again.status_code == 409 and "queued" in again.json()["detail"]
    assert finished.status_code == 409
    assert missing.status_code == 404


# -- metrics --------------------------------------------------------------------------


def test_metrics_count_instances_jobs_results_sends_and_stage_timings(api: ApiNode) -> None:
    with api.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = metric_values(response.text)
    scored = len(SCORED)
    assert values[("cxr_node_database_up", ())] == 1
    assert values[("cxr_node_instances_received_total", ())] == len(PRIORITY_OF)
    assert values[("cxr_node_jobs", (("state", "done"),))] == scored
    assert values[("cxr_node_jobs", (("state", "skipped"),))] == 1
    assert values[("cxr_node_jobs", (("state", "queued"),))] == 0
    assert values[("cxr_node_results", (("status", "scored"),))] == scored
    sends = sum(v for (name, labels), v in values.items() if name == "cxr_node_sends")
    assert sends == 2 * scored  # an SR and an SC per scored image, to the one destination
    assert {
        dict(labels)["destination"] for (name, labels) in values if name == "cxr_node_sends"
    } == {"pacs"}
    job = (("stage", "job"),)
    assert values[("cxr_node_stage_duration_seconds_count", job)] == scored
    assert values[("cxr_node_stage_duration_seconds_bucket", (("le", "+Inf"), *job))] == scored
    assert values[("cxr_node_stage_duration_seconds_sum", job)] > 0
    models = {
        dict(labels)["role"]: dict(labels)
        for (name, labels) in values
        if name == "cxr_node_model_info"
    }
    assert set(models) == {"screen", "confirm", "segment"}
    assert all(len(model["sha256"]) == 64 and model["version"] for model in models.values())


# -- roles: every operation of the OpenAPI document -------------------------------------

PUBLIC = {("get", "/healthz")}
ROLES = {role.value for role in Role}


def operations(api: ApiNode) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every operation the running app's schema lists."""
    assert api.node.http is not None and api.node.http.app is not None
    document = api.node.http.app.openapi()
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


def role_of(method: str, path: str, operation: dict[str, Any]) -> str | None:
    roles = ROLES & set(operation.get("tags", []))
    if (method, path) in PUBLIC:
        assert not roles, (method, path)
        return None
    assert len(roles) == 1, f"{method} {path} must declare one role, not {roles}"
    return roles.pop()


def concrete(path: str, operation: dict[str, Any]) -> str:
    """The path with its parameters filled in with values that name nothing stored, so that
    calling an action changes nothing."""
    for parameter in operation.get("parameters", []):
        if parameter["in"] != "path":
            continue
        kind = parameter["schema"].get("type")
        value = "999999" if kind == "integer" else "1.2.999"
        path = path.replace("{" + parameter["name"] + "}", value)
    assert "{" not in path, path
    return path


def test_every_operation_declares_a_role_and_every_action_is_admin(api: ApiNode) -> None:
    found = {(m, p): role_of(m, p, op) for m, p, op in operations(api)}
    assert found[("post", "/api/jobs/{job_id}/retry")] == "admin"
    assert found[("get", "/api/worklist")] == "viewer"
    assert found[("get", "/metrics")] == "viewer"
    for (method, path), role in found.items():
        if method != "get":
            assert role == "admin", f"{method} {path} changes state: it must be admin"


def test_viewer_is_refused_every_admin_operation_and_admin_is_allowed(api: ApiNode) -> None:
    admin_operations = [
        (method, concrete(path, op))
        for method, path, op in operations(api)
        if role_of(method, path, op) == "admin"
    ]
    assert admin_operations
    with api.client(VIEWER_TOKEN) as viewer, api.client(TOKEN) as admin:
        for method, url in admin_operations:
            refused = viewer.request(method, url)
            assert refused.status_code == 403, (method, url, refused.text)
            assert refused.json() == {"detail": "this needs the admin role"}
            allowed = admin.request(method, url)
            assert allowed.status_code not in (401, 403, 429), (method, url, allowed.text)


def test_viewer_and_admin_may_read_every_viewer_operation(api: ApiNode) -> None:
    viewer_operations = [
        (method, concrete(path, op))
        for method, path, op in operations(api)
        if role_of(method, path, op) == "viewer"
    ]
    assert len(viewer_operations) >= 5
    with api.client(VIEWER_TOKEN) as viewer, api.client(TOKEN) as admin, api.client(None) as anon:
        for method, url in viewer_operations:
            for client in (viewer, admin):
                answer = client.request(method, url)
                assert answer.status_code not in (401, 403, 429), (method, url, answer.text)
            assert anon.request(method, url).status_code == 401


def test_viewer_token_from_the_environment_wins_and_must_differ_from_the_admin_one(
    tmp_path: Path,
) -> None:
    settings = node_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    admin, viewer = resolve_tokens(settings, environ={})
    assert (admin.role, admin.value) == (Role.ADMIN, TOKEN)
    assert (viewer.role, viewer.value) == (Role.VIEWER, VIEWER_TOKEN)
    (_, from_env) = resolve_tokens(settings, environ={VIEWER_TOKEN_ENV: "viewer-env-0123456789"})
    assert from_env.value == "viewer-env-0123456789" and from_env.path is None
    with pytest.raises(TokenError, match="must differ"):
        resolve_tokens(settings, environ={VIEWER_TOKEN_ENV: TOKEN})
    with pytest.raises(TokenError, match="at least 16 characters"):
        resolve_tokens(settings, environ={VIEWER_TOKEN_ENV: "short"})
    assert TOKEN not in repr(admin) and VIEWER_TOKEN not in repr(viewer)
    assert fingerprint(VIEWER_TOKEN) == hashlib.sha256(VIEWER_TOKEN.encode()).hexdigest()[:12]


# -- access audit -----------------------------------------------------------------------


def audit_after(api: ApiNode, last_id: int) -> list[AuditEvent]:
    """API access events after ``last_id`` (the node's sender audits its retries meanwhile)."""
    with session_scope(api.sessions) as session:
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.id > last_id, AuditEvent.kind.startswith("api."))
            .order_by(AuditEvent.id)
        ).all()
        session.expunge_all()
        return list(events)


def last_audit_id(api: ApiNode) -> int:
    with session_scope(api.sessions) as session:
        return max(session.scalars(select(AuditEvent.id)).all(), default=0)


def test_patient_data_reads_are_audited_with_role_token_fingerprint_and_client(
    api: ApiNode,
) -> None:
    start = last_audit_id(api)
    uid = api.studies["ACC-S1"]
    with api.client(VIEWER_TOKEN) as client:
        study = client.get(f"/api/studies/{uid}").json()
        heatmap_url = study["instances"][0]["results"][0]["heatmap_url"]
        assert client.get(heatmap_url, params={"size": 64}).status_code == 200
        assert client.get("/api/worklist", params={"priority": "STAT", "limit": 5}).is_success
        assert client.get("/api/status").is_success  # no patient data: not audited
        assert client.get("/metrics").is_success
    events = audit_after(api, start)
    assert [e.kind for e in events] == ["api.get_study", "api.get_heatmap", "api.get_worklist"]
    for event in events:
        assert event.actor == "api:viewer" and event.peer_address == "127.0.0.1"
        assert event.details is not None
        assert event.details["role"] == "viewer"
        assert event.details["token"] == fingerprint(VIEWER_TOKEN)
        assert VIEWER_TOKEN not in repr(event.details) and TOKEN not in repr(event.details)
    study_event, heatmap_event, worklist_event = (e.details or {} for e in events)
    assert study_event["params"] == {"study_uid": uid}
    assert study_event["path"] == "/api/studies/{study_uid}"
    result_id = heatmap_url.split("/")[3]
    assert heatmap_event["params"] == {"result_id": result_id}
    assert heatmap_event["query"] == {"size": "64"}
    assert worklist_event["query"] == {"priority": "STAT", "limit": "5"}


def test_every_admin_operation_is_audited_even_when_refused(api: ApiNode) -> None:
    admin_operations = [
        (method, path, concrete(path, op))
        for method, path, op in operations(api)
        if role_of(method, path, op) == "admin"
    ]
    for method, path, url in admin_operations:
        start = last_audit_id(api)
        with api.client(TOKEN) as client:
            answer = client.request(method, url)
        # Nothing of that id (404), or no body (422): nothing changed, and it is audited.
        assert answer.status_code == (404 if "{" in path else 422), answer.text
        (event,) = audit_after(api, start)
        assert event.kind.startswith("api.") and event.actor == "api:admin"
        assert event.peer_address == "127.0.0.1"
        assert event.details is not None
        assert event.details["token"] == fingerprint(TOKEN)
        assert (event.details["method"], event.details["path"]) == (method.upper(), path)
    start = last_audit_id(api)
    with api.client(VIEWER_TOKEN) as viewer:
        for method, _path, url in admin_operations:
            assert viewer.request(method, url).status_code == 403
    assert audit_after(api, start) == []  # refused before anything ran


def test_retry_is_audited_with_the_job_and_its_outcome(
    tmp_path: Path, database_url: str, data_dir: Path
) -> None:
    with running_api(tmp_path, database_url, data_dir / "dicom") as node, node.client() as client:
        study = client.get(f"/api/studies/{node.studies['ACC-HIP']}").json()
        job_id = study["instances"][0]["jobs"][0]["id"]
        assert client.post(f"/api/jobs/{job_id}/retry").status_code == 200
        with session_scope(node.sessions) as session:
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.id)
            ).all()
            trail = [(e.kind, e.actor, (e.details or {}).get("role")) for e in events]
    assert trail[-2:] == [("api.retry_job", "api:admin", "admin"), ("job.queued", "api", None)]


def test_an_admin_request_with_an_out_of_range_id_is_audited_and_refused(api: ApiNode) -> None:
    start = last_audit_id(api)
    with api.client(TOKEN) as client:
        answer = client.post(f"/api/jobs/{2**63}/retry")  # one past the largest id
    assert answer.status_code == 422, answer.text
    (event,) = audit_after(api, start)
    assert event.kind == "api.retry_job" and event.job_id is None
    assert event.details is not None and event.details["params"] == {"job_id": str(2**63)}


def test_a_query_with_a_nul_byte_is_answered_and_audited(api: ApiNode) -> None:
    """Found by the schema fuzzing on PostgreSQL: JSONB refuses NUL, which made the
    access audit (and so the request) fail with 500."""
    start = last_audit_id(api)
    with api.client(TOKEN) as client:
        answer = client.get("/api/worklist", params={"x\x00y": "a\x00b", "limit": 3})
    assert answer.status_code == 200, answer.text
    (event,) = audit_after(api, start)
    assert event.details is not None and event.details["query"]["x\ufffdy"] == "a\ufffdb"
