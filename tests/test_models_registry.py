"""The model registry end to end, on both backends, with the real models.

Images processed → readers' feedback imported → ``models performance`` equal to an
independent scikit-learn computation on the same cases → ``calibrate`` → ``shadow``
(scores stored, nothing sent) → ``compare`` → ``activate`` → the next SRs name the new
version in their algorithm identification (TID 4019); ``rollback`` restores the
configured model. Then what must never happen: an interrupted activation changing what
is in force, a corrupt version replacing a working one, a bundle failing its checks
being installed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sklearn.metrics import recall_score, roc_auc_score
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import registry
from dicom_node.models.following import FollowingAnalyzer
from dicom_node.pipeline import Pipeline, PipelineContext
from dicom_node.receive import StoreService
from dicom_node.results.common import Equipment
from dicom_node.status import collect_status
from inference.manifest import CONFIRM_BUNDLE, WEIGHTS
from storage.db import session_scope
from storage.registry import ACTIVE, in_force
from storage.spool import Spool
from tests.kermany_dicom import KermanyCase, kermany_cases
from tests.pipeline_support import WORKER_ID, receive_file, run_queue, settings_for
from tests.support import run

CONFIRM = "cxr_pneumonia_confirm_resnet18"
PNEUMONIA = "233604007"
ALGORITHM_VERSION = "111003"  # DCM "Algorithm Version" (TID 4019)
TOML = "[inference]\nheatmaps = false\n"


class InProcessNode:
    """Receive path, pipeline and the registry-following analyzer of one node."""

    def __init__(self, home: Path, database_url: str, sessions: sessionmaker[Session]) -> None:
        self.home, self.database_url, self.sessions = home, database_url, sessions
        self.settings = settings_for(home, database_url, TOML)
        self.spool = Spool(home / "spool")
        self.store = StoreService(self.spool, sessions, min_free_bytes=0)
        self.analyzer = FollowingAnalyzer(self.settings, sessions)
        context = PipelineContext(
            sessions=sessions,
            spool=self.spool,
            rules=self.settings.rule_set,
            equipment=Equipment(),
            priority=self.settings.priority,
        )
        self.pipeline = Pipeline(context, self.analyzer, WORKER_ID)

    def analyse(self, cases: list[KermanyCase]) -> None:
        for case in cases:
            receive_file(self.store, case.path)
        run_queue(self.pipeline, self.sessions)

    def cli(self, *args: str) -> Any:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env.update(
            {
                "DICOM_NODE_HOME": str(self.home),
                "DICOM_NODE_DATABASE_URL": self.database_url,
                "DICOM_NODE_CONFIG": str(self.home / "node.toml"),
            }
        )
        done = run([sys.executable, "-m", "dicom_node", *args, "--json"], env=env, cwd=self.home)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def sql(self, query: str, **params: Any) -> list[Any]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(query), params))
        finally:
            engine.dispose()


@pytest.fixture
def node(tmp_path: Path, database_url: str, sessions: sessionmaker[Session]) -> InProcessNode:
    return InProcessNode(tmp_path, database_url, sessions)


def write_labels(path: Path, cases: list[KermanyCase]) -> None:
    """Half the labels per study, half per image; the second case first gets a wrong
    label of its study, then the right one (a later label supersedes)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["study_instance_uid", "sop_instance_uid", "finding_code", "present", "reader"]
        )
        first = cases[1]  # labelled per study below: a wrong study label first
        writer.writerow(
            [first.study_instance_uid, "", PNEUMONIA, int(first.label != "pneumonia"), "dr.a"]
        )
        for n, case in enumerate(cases):
            study, sop = (case.study_instance_uid, "") if n % 2 else ("", case.sop_instance_uid)
            writer.writerow([study, sop, PNEUMONIA, int(case.label == "pneumonia"), "dr.b"])


def sr_algorithm_versions(node: InProcessNode, sop_uids: list[str]) -> set[str]:
    """Algorithm Version values of the SRs written for these images."""
    rows = node.sql(
        "SELECT r.outputs FROM results r JOIN instances i ON i.id = r.instance_id "
        "WHERE i.sop_instance_uid IN :uids".replace(
            ":uids", "(" + ",".join(f"'{u}'" for u in sop_uids) + ")"
        )
    )
    versions: set[str] = set()
    for (outputs,) in rows:
        outputs = json.loads(outputs) if isinstance(outputs, str) else outputs
        for output in outputs:
            if output["kind"] == "sr":
                ds = pydicom.dcmread(node.spool.path_of(output["path"]))
                versions |= set(_text_values(ds, ALGORITHM_VERSION))
    return versions


def _text_values(ds: pydicom.Dataset, code: str) -> Iterator[str]:
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == code and "TextValue" in item:
            yield str(item.TextValue)
        yield from _text_values(item, code)


def test_feedback_performance_calibrate_shadow_compare_activate(
    node: InProcessNode, data_dir: Path, tmp_path: Path
) -> None:
    cases = kermany_cases(data_dir, tmp_path / "first", 60, balanced=True)
    node.analyse(cases)

    labels = tmp_path / "labels.csv"
    write_labels(labels, cases)
    imported = node.cli("feedback", "import", str(labels))
    assert imported["imported"] == 61 and imported["matched"] == 61

    # Live performance equals an independent computation on the same cases.
    (live,) = [
        e
        for e in node.cli("models", "performance", "--finding", PNEUMONIA)
        if e["model"] == CONFIRM and e["role"] == ACTIVE
    ]
    scored = node.sql(
        "SELECT sop_instance_uid, probability, present FROM model_scores "
        "WHERE model = :m AND role = 'active' AND assessed = :t AND finding_code = :c",
        m=CONFIRM,
        t=True,
        c=PNEUMONIA,
    )
    truth = {case.sop_instance_uid: case.label == "pneumonia" for case in cases}
    y = np.array([truth[sop] for sop, _p, _c in scored])
    p = np.array([prob for _s, prob, _c in scored])
    called = np.array([bool(c) for _s, _p, c in scored])
    assert live["n_labelled"] == len(scored) >= 55  # the gate may refuse one or two
    assert live["prevalence"] == pytest.approx(y.mean(), abs=1e-4)
    assert live["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert live["auroc_ci"][0] <= live["auroc"] <= live["auroc_ci"][1]
    assert live["sensitivity"] == pytest.approx(recall_score(y, called), abs=1e-4)
    assert live["specificity"] == pytest.approx(recall_score(~y, ~called), abs=1e-4)
    assert live["card"]["auroc"] == pytest.approx(0.99, abs=0.01)

    # A site version: temperature and threshold from the feedback, with intervals.
    fitted = node.cli("models", "calibrate", PNEUMONIA, "--target-sensitivity", "0.9")
    derived = fitted["name_version"]
    assert derived == f"{CONFIRM}@1.0.0+site.1"
    assert fitted["sensitivity"] >= 0.9 and fitted["n_cases"] == len(scored)
    low, high = fitted["temperature_ci"]
    assert low <= fitted["temperature"] <= high
    meta = json.loads(
        (tmp_path / "models" / CONFIRM / "1.0.0+site.1" / "configs" / "metadata.json").read_text()
    )
    assert meta["provenance"]["parent"] == f"{CONFIRM}@1.0.0"
    assert meta["provenance"]["parent_sha256"] == meta["sha256"][WEIGHTS]
    assert meta["thresholds"]["pneumonia"] == pytest.approx(fitted["threshold"], abs=1e-6)

    # Shadow: the candidate answers every image the active model scores; nothing sent.
    node.cli("models", "shadow", derived, "--reason", "trial at this site")
    assert node.analyzer.refresh(force=True)
    more = kermany_cases(data_dir, tmp_path / "more", 12, balanced=True, offset=60)
    node.analyse(more)
    shadow = node.sql(
        "SELECT sop_instance_uid, present FROM model_scores WHERE version = '1.0.0+site.1' "
        "AND role = 'shadow' AND assessed = :t",
        t=True,
    )
    answered = node.sql(
        "SELECT sop_instance_uid FROM model_scores WHERE version = '1.0.0' AND role = 'active' "
        "AND assessed = :t AND finding_code = :c AND sop_instance_uid IN ("
        + ",".join(f"'{c.sop_instance_uid}'" for c in more)
        + ")",
        t=True,
        c=PNEUMONIA,
    )
    assert {sop for sop, _ in shadow} == {sop for (sop,) in answered}
    assert len(answered) >= 10
    assert node.sql("SELECT count(*) FROM results WHERE model_key LIKE '%site.1%'")[0][0] == 0

    compared = node.cli("models", "compare", f"{CONFIRM}@1.0.0", derived)
    (finding,) = compared["findings"]
    active_calls = dict(
        node.sql(
            "SELECT sop_instance_uid, present FROM model_scores WHERE model = :m "
            "AND version = '1.0.0' AND role = 'active' AND assessed = :t",
            m=CONFIRM,
            t=True,
        )
    )
    flips_up = sum(1 for sop, call in shadow if call and not active_calls[sop])
    flips_down = sum(1 for sop, call in shadow if not call and active_calls[sop])
    assert finding["n_paired"] == len(answered)
    assert finding["flips"] == {"absent_to_present": flips_up, "present_to_absent": flips_down}
    assert finding["performance_a"] is None  # the new images have no labels yet

    # Activate: the next SRs name the site version.
    node.cli("models", "activate", derived, "--reason", "site recalibration")
    assert node.analyzer.refresh(force=True)
    last = kermany_cases(data_dir, tmp_path / "last", 4, balanced=True, offset=72)
    node.analyse(last)
    pneumonia = [c.sop_instance_uid for c in last if c.label == "pneumonia"]
    assert "1.0.0+site.1" in sr_algorithm_versions(node, pneumonia)
    assert "1.0.0+site.1" not in sr_algorithm_versions(node, [c.sop_instance_uid for c in cases])
    listed = {(m["name"], m["version"]): m["state"] for m in node.cli("models", "list")}
    assert listed[(CONFIRM, "1.0.0+site.1")] == "active"
    in_force = collect_status(node.settings, echo=False)["models"]
    assert {(m["name"], m["version"]) for m in in_force if m["role"] == "confirm"} == {
        (CONFIRM, "1.0.0+site.1")
    }

    rolled = node.cli("models", "rollback", "pneumonia", "--reason", "back")
    assert rolled["name_version"] == "configured"
    assert node.analyzer.refresh(force=True)
    assert "site.1" not in node.analyzer.identity


def test_interrupted_activation_changes_nothing(node: InProcessNode, tmp_path: Path) -> None:
    version = install_copy(node, tmp_path, "1.0.1")
    with pytest.raises(RuntimeError), session_scope(node.sessions) as session:
        registry.activate(session, version, actor="test", reason="crash before commit")
        raise RuntimeError("power cut")
    with session_scope(node.sessions) as session:
        assert in_force(session).get(("pneumonia", "confirm", ACTIVE)) is None
    assert not node.analyzer.refresh(force=True)
    assert "@1.0.1" not in node.analyzer.identity


def test_a_corrupt_version_never_replaces_the_running_one(
    node: InProcessNode, tmp_path: Path
) -> None:
    version = install_copy(node, tmp_path, "1.0.2")
    with session_scope(node.sessions) as session:
        path = Path(registry.version_of(session, version).path)
    weights = path / WEIGHTS
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    before = node.analyzer.identity
    with session_scope(node.sessions) as session:  # bypassing the CLI's own check
        row = registry.version_of(session, version)
        from storage.registry import assign

        assign(session, row.finding, row.role, ACTIVE, row, actor="test", reason="tampered")
    assert not node.analyzer.refresh(force=True)
    assert node.analyzer.identity == before


def install_copy(node: InProcessNode, tmp_path: Path, version: str) -> str:
    copy = tmp_path / f"confirm-{version}"
    shutil.copytree(CONFIRM_BUNDLE, copy, dirs_exist_ok=True)
    meta_file = copy / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = version
    meta_file.write_text(json.dumps(meta))
    installed = node.cli("models", "install", str(copy))
    return str(installed["name_version"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("weights", "fails its integrity check"),
        ("card", "no model card"),
        ("population", "declares no population"),
        ("role", "is not one of"),
        ("labels", "lacks"),
    ],
)
def test_install_refuses_a_bundle_that_fails_its_checks(
    node: InProcessNode, tmp_path: Path, damage: str, message: str
) -> None:
    copy = tmp_path / "bad"
    shutil.copytree(CONFIRM_BUNDLE, copy)
    meta_file = copy / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    if damage == "weights":
        data = bytearray((copy / WEIGHTS).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / WEIGHTS).write_bytes(bytes(data))
    elif damage == "card":
        (copy / "docs" / "README.md").write_text("  \n")
    elif damage == "population":
        del meta["population"]
    elif damage == "role":
        meta["role"] = "oracle"
    elif damage == "labels":
        meta["labels"][0]["code"] = ""
    meta_file.write_text(json.dumps(meta))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update({"DICOM_NODE_HOME": str(node.home), "DICOM_NODE_DATABASE_URL": node.database_url})
    done = run([sys.executable, "-m", "dicom_node", "models", "install", str(copy)], env=env)
    assert done.returncode == 1 and message in done.stderr
    assert not (node.home / "models" / CONFIRM).exists()


def test_same_version_with_other_weights_is_refused(node: InProcessNode, tmp_path: Path) -> None:
    assert install_copy(node, tmp_path, "1.0.0") == f"{CONFIRM}@1.0.0"
    assert install_copy(node, tmp_path, "1.0.0") == f"{CONFIRM}@1.0.0"  # idempotent
    installed = node.home / "models" / CONFIRM / "1.0.0" / WEIGHTS
    assert not os.access(installed, os.W_OK) or os.geteuid() == 0
    assert oct(installed.stat().st_mode & 0o777) == oct(0o444)
    other = tmp_path / "other"
    shutil.copytree(CONFIRM_BUNDLE, other)
    weights = other / WEIGHTS
    weights.write_bytes(weights.read_bytes() + b"\0")
    meta_file = other / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    from inference.manifest import sha256_file

    meta["sha256"][WEIGHTS] = sha256_file(weights)
    meta_file.write_text(json.dumps(meta))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update({"DICOM_NODE_HOME": str(node.home), "DICOM_NODE_DATABASE_URL": node.database_url})
    done = run([sys.executable, "-m", "dicom_node", "models", "install", str(other)], env=env)
    assert done.returncode == 1 and "already installed with other weights" in done.stderr
