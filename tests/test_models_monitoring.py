"""Drift, live performance against the card, and feedback intake, on both backends.

The scores a model version "saw" are written straight into ``model_scores`` (see
tests/models_support.py) so each test states its distribution exactly; what is checked
is what an operator reads: ``status --json``'s ``drift`` and ``model_warnings``, the
Prometheus families, ``GET /api/models``, ``POST /api/feedback`` and the CSV import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.api import create_app, resolve_tokens
from dicom_node.api.metrics import make_registry
from dicom_node.config import Settings
from dicom_node.models.monitor import model_health
from dicom_node.status import collect_status
from inference.manifest import CONFIRM_BUNDLE, read_metadata
from inference.reference import read_reference
from storage.db import session_scope
from storage.registry import Label, add_feedback, feedback_count
from storage.spool import Spool
from tests.api_support import TOKEN, VIEWER_TOKEN, node_settings
from tests.models_support import instances, scores
from tests.support import run

META = read_metadata(CONFIRM_BUNDLE)
NAME, VERSION = META["name"], META["version"]
CODE = "233604007"
KEYS = {"model", "version", "finding_code", "signal", "level", "psi", "n"}


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return node_settings(tmp_path, database_url)


def reference_like(count: int, rng: np.random.Generator) -> list[float]:
    """Probabilities distributed like the confirm bundle's own reference."""
    stored = (read_reference(CONFIRM_BUNDLE) or {})["signals"][f"probability:{CODE}"]
    edges = [0.0, *stored["edges"], 1.0]
    shares = np.array(stored["counts"], dtype=float) / stored["n"]
    bins = rng.choice(len(shares), size=count, p=shares)
    return [float(rng.uniform(edges[b], edges[b + 1])) for b in bins]


def metric_lines(settings: Settings, sessions: sessionmaker[Session], family: str) -> list[str]:
    text = generate_latest(make_registry(sessions, [], settings)).decode()
    return [line for line in text.splitlines() if line.startswith(family + "{")]


def test_drift_is_ok_in_distribution_and_alerts_on_a_shift(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    rng = np.random.default_rng(0)
    with session_scope(sessions) as session:
        scores(
            session,
            instances(session, 300),
            reference_like(300, rng),
            model=NAME,
            version=VERSION,
            finding_code=CODE,
        )
    with session_scope(sessions) as session:
        health = model_health(settings, session)
    (probability,) = [d for d in health.drift if d["signal"] == "probability"]
    assert probability["level"] == "ok" and probability["psi"] < 0.1
    assert probability["reference"] == "bundle" and probability["n"] == 300
    assert sum(probability["plot"]["reference"]) == pytest.approx(1.0, abs=1e-3)

    # The population changes: every new image scores around 0.5 (rare in the reference).
    with session_scope(sessions) as session:
        scores(
            session,
            instances(session, 300),
            list(rng.uniform(0.3, 0.7, 300)),
            model=NAME,
            version=VERSION,
            finding_code=CODE,
        )
    report = collect_status(settings, echo=False)
    (entry,) = [d for d in report["drift"] if d["signal"] == "probability"]
    assert KEYS <= set(entry) and entry["model"] == NAME and entry["finding_code"] == CODE
    assert entry["level"] == "alert" and entry["psi"] >= 0.25 and entry["n"] == 600
    assert any("probability drift alert" in w for w in report["model_warnings"])
    levels = metric_lines(settings, sessions, "cxr_node_model_drift_level")
    assert any('signal="probability"' in line and line.endswith(" 2.0") for line in levels)


def test_a_descriptor_without_a_bundle_reference_drifts_against_the_site_baseline(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    rng = np.random.default_rng(1)
    with session_scope(sessions) as session:
        for maker, count in (("Acme", 200), ("Other", 100)):
            scores(
                session,
                instances(session, count),
                reference_like(count, rng),
                model=NAME,
                version=VERSION,
                finding_code=CODE,
                manufacturer=maker,
            )
        drift = model_health(settings, session).drift
    (maker_drift,) = [d for d in drift if d["signal"] == "manufacturer"]
    assert maker_drift["reference"] == "site_baseline" and maker_drift["level"] == "alert"
    assert maker_drift["n"] == 100 and maker_drift["reference_n"] == 200
    (sex,) = [d for d in drift if d["signal"] == "sex"]
    assert sex["level"] == "ok"  # the same F throughout


def test_a_version_below_its_card_is_a_warning_in_status_and_metrics(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    rng = np.random.default_rng(2)
    with session_scope(sessions) as session:
        cases = instances(session, 80)
        truth = [n % 2 == 0 for n in range(80)]
        scores(  # no better than chance: far below the card's AUROC of 0.99
            session,
            cases,
            list(rng.uniform(0, 1, 80)),
            model=NAME,
            version=VERSION,
            finding_code=CODE,
        )
        add_feedback(
            session,
            [
                Label(CODE, present, "dr.x", "test", sop_instance_uid=case.sop_instance_uid)
                for case, present in zip(cases, truth, strict=True)
            ],
            actor="test",
        )
    report = collect_status(settings, echo=False)
    assert any("below its card" in w and NAME in w for w in report["model_warnings"])
    below = metric_lines(settings, sessions, "cxr_node_model_below_card")
    assert any(NAME in line and line.endswith(" 1.0") for line in below)


def test_feedback_over_http(settings: Settings, sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        (case,) = instances(session, 1)
        scores(session, [case], [0.9], model=NAME, version=VERSION, finding_code=CODE)
    app = create_app(
        settings, sessions, Spool(settings.storage.spool_root), resolve_tokens(settings)
    )
    label = {"sop_instance_uid": case.sop_instance_uid, "finding_code": CODE, "present": True}
    with TestClient(app) as client:
        admin = {"Authorization": f"Bearer {TOKEN}"}
        viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
        stored = client.post("/api/feedback", json={**label, "reader": "dr.y"}, headers=admin)
        refused = client.post("/api/feedback", json={**label, "reader": "dr.y"}, headers=viewer)
        bad_uid = client.post(
            "/api/feedback",
            json={**label, "sop_instance_uid": "1.2.abc", "reader": "dr.y"},
            headers=admin,
        )
        nothing = client.post(
            "/api/feedback",
            json={"finding_code": CODE, "present": False, "reader": "dr.y"},
            headers=admin,
        )
        models = client.get("/api/models", headers=viewer)
    assert stored.status_code == 201 and stored.json() == {"stored": 1, "matched": 1}
    assert refused.status_code == 403
    assert bad_uid.status_code == 422  # the schema's pattern
    assert nothing.status_code == 400 and "sop_instance_uid is required" in nothing.text
    assert models.status_code == 200
    body: dict[str, Any] = models.json()
    assert {"models", "performance", "drift"} <= set(body)
    assert any(m["name"] == NAME and m["state"] == "active" for m in body["models"])
    with session_scope(sessions) as session:
        assert feedback_count(session) == 1


def test_a_csv_with_a_bad_row_is_refused_whole(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path, database_url: str
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "study_instance_uid,finding_code,present,reader\n"
        "1.2.3.4,233604007,1,dr.a\n"
        "1.2.3.x,233604007,1,dr.a\n"
        "1.2.3.5,233604007,maybe,dr.a\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update({"DICOM_NODE_HOME": str(tmp_path), "DICOM_NODE_DATABASE_URL": database_url})
    done = run(
        [sys.executable, "-m", "dicom_node", "feedback", "import", str(labels), "--json"], env=env
    )
    assert done.returncode == 1
    assert "line 3: study_instance_uid '1.2.3.x' is not a valid UID" in done.stderr
    assert "line 4: present must be 1 or 0" in done.stderr
    with session_scope(sessions) as session:
        assert feedback_count(session) == 0
