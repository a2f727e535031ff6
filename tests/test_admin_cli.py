"""``dicom-node models list|verify`` and ``dicom-node destinations echo`` as operators run them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.manifest import SCREEN_BUNDLE, WEIGHTS
from tests.echo_support import storescp
from tests.pipeline_support import destination_toml
from tests.support import free_port, run


def _cli(home: Path, toml: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = home / "node.toml"
    config.write_text(toml)
    env = {**os.environ, "DICOM_NODE_HOME": str(home), "DICOM_NODE_CONFIG": str(config)}
    return run([sys.executable, "-m", "dicom_node", *args], env=env, cwd=home)


def test_models_list_shows_the_bundles_with_their_digests(tmp_path: Path) -> None:
    listed = _cli(tmp_path, "[inference]\nscreen_threshold = 0.3\n", "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {model["role"]: model for model in json.loads(listed.stdout)}
    weights = (SCREEN_BUNDLE / WEIGHTS).read_bytes()
    assert models["screen"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert models["screen"]["thresholds"] == {"pneumonia": 0.3}
    assert models["screen"]["size_bytes"] >= len(weights)
    assert models["confirm"]["name"] and models["confirm"]["version"]


def test_models_verify_detects_a_corrupted_copy(tmp_path: Path) -> None:
    copy = tmp_path / "screen"
    shutil.copytree(SCREEN_BUNDLE, copy)
    toml = f'[inference]\nscreen_bundle = "{copy}"\n'
    intact = _cli(tmp_path, toml, "models", "verify", "--json")
    assert intact.returncode == 0, intact.stderr
    assert all(report["ok"] for report in json.loads(intact.stdout))

    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    broken = _cli(tmp_path, toml, "models", "verify", "--json")
    assert broken.returncode == 1
    reports = {report["role"]: report for report in json.loads(broken.stdout)}
    assert reports["confirm"]["ok"] is True and reports["screen"]["ok"] is False
    (bad,) = [file for file in reports["screen"]["files"] if not file["ok"]]
    assert bad["file"] == WEIGHTS and bad["actual_sha256"] == hashlib.sha256(data).hexdigest()
    human = _cli(tmp_path, toml, "models", "verify")
    assert human.returncode == 1 and "MISMATCH" in human.stdout and WEIGHTS in human.stdout


@pytest.fixture
def archive(tmp_path: Path, dcmtk: None) -> Iterator[int]:
    with storescp(tmp_path / "received") as port:
        yield port


def test_destinations_echo_exit_codes(tmp_path: Path, archive: int) -> None:
    toml = destination_toml("pacs", archive) + destination_toml("gone", free_port())
    both = _cli(tmp_path, toml, "destinations", "echo", "--json", "--timeout", "2")
    assert both.returncode == 1, both.stderr
    outcomes = {entry["name"]: entry for entry in json.loads(both.stdout)}
    assert outcomes["pacs"]["reachable"] is True and outcomes["pacs"]["latency_ms"] > 0
    assert outcomes["gone"]["reachable"] is False
    assert outcomes["gone"]["category"] == "connection"

    reachable = _cli(tmp_path, toml, "destinations", "echo", "pacs")
    assert reachable.returncode == 0, reachable.stderr
    assert "reachable" in reachable.stdout and "pacs" in reachable.stdout
    unknown = _cli(tmp_path, toml, "destinations", "echo", "archiv")
    assert unknown.returncode == 2 and "unknown destination(s) archiv" in unknown.stderr
