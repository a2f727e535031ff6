"""A worker process on PostgreSQL follows an activation without a restart.

A listener and a separate ``dicom-node worker`` process share PostgreSQL and the spool.
An image is analysed by the shipped confirm model; a new version is installed and
activated from the CLI; the running worker must switch within 10 s (its ``models
switched`` log event), and the next image's result must carry the new version — the
first one's keeps the old one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.manifest import CONFIRM_BUNDLE
from tests.e2e.scale_support import rows, wait_for, wait_ready
from tests.kermany_dicom import kermany_cases
from tests.support import NodeProcess, provision_database, storescu

SWITCH_WITHIN_S = 10.0
pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with provision_database("postgresql", tmp_path) as url:
        yield url


def model_key(url: str, sop: str) -> str:
    found = rows(
        url,
        "SELECT r.model_key FROM results r JOIN instances i ON i.id = r.instance_id "
        f"WHERE i.sop_instance_uid = '{sop}'",
    )
    return str(found[0][0]) if found else ""


def test_a_running_worker_process_switches_to_an_activated_version(
    postgres_url: str, data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    spool = {"DICOM_NODE_SPOOL_DIR": str(tmp_path / "spool")}
    first, second = kermany_cases(data_dir, tmp_path / "images", 2, balanced=True, offset=1)
    listener = NodeProcess(home=tmp_path / "listener", database_url=postgres_url, extra_env=spool)
    worker = NodeProcess(
        home=tmp_path / "worker",
        database_url=postgres_url,
        workers=True,
        command=("worker", "--threads", "1"),
        extra_env=spool,
    )
    listener.start()
    try:
        worker.start()
        wait_ready(worker)
        assert storescu(listener.port, first.path).returncode == 0
        wait_for(lambda: bool(model_key(postgres_url, first.sop_instance_uid)), 120, "result 1")

        copy = tmp_path / "candidate"
        shutil.copytree(CONFIRM_BUNDLE, copy)
        meta_file = copy / "configs" / "metadata.json"
        meta = json.loads(meta_file.read_text())
        meta["version"] = "1.0.1"
        meta_file.write_text(json.dumps(meta))
        assert listener.cli("models", "install", str(copy)).returncode == 0
        activated = time.monotonic()
        done = listener.cli("models", "activate", f"{meta['name']}@1.0.1", "--reason", "test")
        assert done.returncode == 0, done.stderr

        def switched() -> bool:
            return any(e.get("event") == "models switched" for e in worker.log_events())

        wait_for(switched, 60, "the worker to switch", every=0.2)
        assert time.monotonic() - activated <= SWITCH_WITHIN_S
        assert worker.proc is not None and worker.proc.poll() is None  # no restart

        assert storescu(listener.port, second.path).returncode == 0
        wait_for(lambda: bool(model_key(postgres_url, second.sop_instance_uid)), 120, "result 2")
        assert "cxr_pneumonia_confirm_resnet18@1.0.1#" in model_key(
            postgres_url, second.sop_instance_uid
        )
        assert "cxr_pneumonia_confirm_resnet18@1.0.0#" in model_key(
            postgres_url, first.sop_instance_uid
        )
    finally:
        worker.stop()
        listener.stop()
