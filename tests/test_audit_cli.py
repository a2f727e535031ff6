"""``dicom-node audit list``: the access audit of the HTTP API as an auditor reads it.

A node on each backend serves the API; a viewer reads a study, its heatmap and the
worklist, an admin retries a job. The command must list those accesses newest first with
role, token fingerprint and client address (never a token, never a patient name), and
filter them by kind (exact or prefix), time and number.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from dicom_node.api.auth import fingerprint
from dicom_node.cli import app
from tests.api_support import PATIENT_NAME, TOKEN, VIEWER_TOKEN, ApiNode, running_api
from tests.support import run


@pytest.fixture
def api(tmp_path: Path, database_url: str, data_dir: Path) -> Iterator[ApiNode]:
    with running_api(tmp_path, database_url, data_dir / "dicom") as node:
        yield node


def node_env(node: ApiNode) -> dict[str, str]:
    return {
        "DICOM_NODE_HOME": str(node.settings.storage.home),
        "DICOM_NODE_DATABASE_URL": node.settings.storage.effective_database_url,
        "COLUMNS": "300",  # a wide terminal: the table's cells are not cut
    }


def audit(node: ApiNode, *args: str) -> Result:
    """``dicom-node audit list ARGS`` in this process (quick; the real command is run
    once, in :func:`test_audit_list_shows_who_read_and_did_what`)."""
    return CliRunner().invoke(app, ["audit", "list", *args], env=node_env(node))


def listed(node: ApiNode, *args: str) -> list[dict[str, object]]:
    result = audit(node, "--json", *args)
    assert result.exit_code == 0, result.output
    events: list[dict[str, object]] = json.loads(result.stdout)
    return events


def test_audit_list_shows_who_read_and_did_what(api: ApiNode) -> None:
    uid = api.studies["ACC-S1"]
    with api.client(VIEWER_TOKEN) as viewer, api.client(TOKEN) as admin:
        study = viewer.get(f"/api/studies/{uid}").json()
        assert viewer.get(study["instances"][0]["results"][0]["heatmap_url"]).is_success
        assert viewer.get("/api/worklist").is_success
        hip = admin.get(f"/api/studies/{api.studies['ACC-HIP']}").json()
        job_id = hip["instances"][0]["jobs"][0]["id"]
        assert admin.post(f"/api/jobs/{job_id}/retry").is_success

    events = listed(api, "--kind", "api.")
    assert [e["kind"] for e in events] == [
        "api.retry_job",
        "api.get_study",
        "api.get_worklist",
        "api.get_heatmap",
        "api.get_study",
    ]  # newest first
    retry, admin_read, *viewer_reads = events
    assert retry["actor"] == "api:admin" and retry["job_id"] == job_id
    assert retry["details"] == {
        "role": "admin",
        "token": fingerprint(TOKEN),
        "method": "POST",
        "path": "/api/jobs/{job_id}/retry",
        "params": {"job_id": str(job_id)},
    }
    for event in viewer_reads:
        assert event["actor"] == "api:viewer" and event["peer_address"] == "127.0.0.1"
        details = event["details"]
        assert isinstance(details, dict)
        assert details["role"] == "viewer" and details["token"] == fingerprint(VIEWER_TOKEN)
    assert viewer_reads[-1]["details"]["params"] == {"study_uid": uid}  # type: ignore[index]

    everything = audit(api, "--json").stdout + audit(api).stdout
    for secret in (TOKEN, VIEWER_TOKEN, PATIENT_NAME):
        assert secret not in everything

    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    human = run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "audit",
            "list",
            "--kind",
            "api.get_study,api.retry_job",
        ],
        env=env | node_env(api),
        cwd=api.settings.storage.home,
    )
    assert human.returncode == 0, human.stderr
    assert "api.retry_job" in human.stdout and "api.get_heatmap" not in human.stdout
    assert f"role=viewer token={fingerprint(VIEWER_TOKEN)}" in human.stdout


def test_audit_list_filters_by_kind_time_and_number(api: ApiNode) -> None:
    with api.client(VIEWER_TOKEN) as viewer:
        for _ in range(3):
            assert viewer.get("/api/worklist").is_success
    worklist_reads = listed(api, "--kind", "api.get_worklist")
    assert len(worklist_reads) == 3
    assert [e["kind"] for e in listed(api, "--kind", "api.*", "--limit", "2")] == [
        "api.get_worklist"
    ] * 2
    jobs = listed(api, "--kind", "job.")
    assert jobs and all(str(e["kind"]).startswith("job.") for e in jobs)
    assert len(listed(api, "--since", "2h", "--kind", "api.")) == 3
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert listed(api, "--since", future) == []
    assert len(listed(api, "--limit", "5")) == 5

    bad = audit(api, "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "since" in bad.stderr
