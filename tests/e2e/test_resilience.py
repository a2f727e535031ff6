"""Crash safety and access control of ``dicom-node serve`` (own node per test)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import (
    NodeProcess,
    dataset_bytes,
    echoscu,
    instance_rows,
    send_raw,
    sop_instance_uid_of,
    split_part10,
    storescu,
)


def test_kill_9_right_after_success_loses_nothing(
    database_url: str, tmp_path: Path, rg1_uncr: Path, image_files: list[Path], dcmtk: None
) -> None:
    node = NodeProcess(home=tmp_path / "home", database_url=database_url).start()
    try:
        small = next(p for p in image_files if p.name.startswith("dog-"))
        assert storescu(node.port, small).returncode == 0
        assert send_raw(node.port, [rg1_uncr]) == [0x0000]
        node.kill9()  # no shutdown hook runs, nothing is flushed on the way out
        node.start()
        for path in (small, rg1_uncr):
            (row,) = instance_rows(database_url, sop_instance_uid_of(path))
            stored = (node.spool / str(row["spool_path"])).read_bytes()
            assert len(stored) == row["size_bytes"]
        (row,) = instance_rows(database_url, sop_instance_uid_of(rg1_uncr))
        stored = (node.spool / str(row["spool_path"])).read_bytes()
        assert split_part10(stored)[1] == dataset_bytes(rg1_uncr)
        report = json.loads(node.cli("status", "--json").stdout)
        assert report["instances"]["total"] == 2 and report["jobs"]["queued"] == 2
        assert report["listener"]["state"] == "up"
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()


def test_stopped_node_reports_down(tmp_path: Path, dcmtk: None) -> None:
    node = NodeProcess(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'node.db'}").start()
    assert node.stop() == 0
    status = node.cli("status", "--json")
    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert report["listener"]["state"] == "down" and report["healthy"] is False
    assert report["listener"]["accepting_connections"] is False


def test_allowlist_from_config_file(tmp_path: Path, image_files: list[Path], dcmtk: None) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nallowed_calling_aets = ["PACS", "CR_ROOM_1"]\n')
    node = NodeProcess(
        home=tmp_path, database_url=f"sqlite:///{tmp_path / 'node.db'}", config_file=config
    ).start()
    try:
        rejected = echoscu(node.port, calling_ae="INTRUDER")
        assert rejected.returncode != 0
        assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        refused = storescu(node.port, image_files[1], calling_ae="INTRUDER")
        assert refused.returncode != 0
        assert echoscu(node.port, calling_ae="PACS").returncode == 0
        assert storescu(node.port, image_files[1], calling_ae="CR_ROOM_1").returncode == 0
        assert len(instance_rows(node.database_url)) == 1
        events = [e for e in node.log_events() if e.get("event") == "association rejected"]
        assert {e["calling_ae"] for e in events} == {"INTRUDER"}
    finally:
        node.stop()


def test_port_in_use_is_a_clear_startup_error(tmp_path: Path, dcmtk: None) -> None:
    first = NodeProcess(home=tmp_path / "a", database_url=f"sqlite:///{tmp_path / 'a.db'}")
    first.start()
    try:
        second = NodeProcess(
            home=tmp_path / "b", database_url=f"sqlite:///{tmp_path / 'b.db'}", port=first.port
        )
        second.home.mkdir()
        result = second.cli("serve")
        assert result.returncode == 1
        assert "listener cannot start" in result.stderr
        assert echoscu(first.port).returncode == 0
    finally:
        first.stop()
