"""Crash safety and access control of ``dicom-node serve`` (own node per test).

The fault tests at the end run the whole node (real engine, SR only so a burst is quick)
through the failures an installation meets: ``kill -9`` in the middle of a burst of 200
images, the archive going away while results are being delivered, the PostgreSQL server
restarting under a running node, and the spool's disk filling up. Each checks what a
user would see: what dcmtk storescu was told, and what ends up in the archive.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.orthanc import LOOPBACK, run_orthanc
from tests.e2e.scale_support import (
    acknowledged,
    chest_burst,
    private_postgres,
    rows,
    settled,
    srs_per_source,
    storescu_many,
    uid_of,
    wait_for,
    wait_ready,
)
from tests.support import (
    PEER_TIMEOUT_S,
    STORESCU,
    NodeProcess,
    dataset_bytes,
    echoscu,
    free_port,
    instance_rows,
    mounted_tmpfs,
    provision_database,
    resize_tmpfs,
    send_raw,
    sop_instance_uid_of,
    split_part10,
    storescu,
)

BURST = 200
WAIT_S = 480.0


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


# -- faults during a full run: node, archive, database, disk ---------------------------------


def faults_config(path: Path, orthanc_port: int | None, extra: str = "") -> Path:
    """Fast polls and retries, SR only (the burst stays quick), no retention."""
    destination = (
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "{LOOPBACK}"\n'
        f"port = {orthanc_port}\ntimeout_s = 20\n\n"
        if orthanc_port
        else ""
    )
    path.write_text(
        destination
        + "[worker]\npoll_interval = 0.5\njob_lease = 10\n\n"
        + "[sender]\npoll_interval = 0.5\nbackoff_base = 0.5\nbackoff_cap = 2\nlease = 10\n\n"
        + "[inference]\nheatmaps = false\n\n[retention]\nenabled = false\n"
        + extra
    )
    return path


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with provision_database("postgresql", tmp_path) as url:
        yield url


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_during_a_burst_every_acknowledged_image_gets_exactly_one_sr(
    postgres_url: str, data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    files = chest_burst(data_dir, tmp_path / "burst", BURST)
    with run_orthanc(tmp_path / "orthanc") as orthanc:
        config = faults_config(tmp_path / "node.toml", orthanc.dicom_port)
        node = NodeProcess(
            home=tmp_path / "node", database_url=postgres_url, config_file=config, workers=True
        ).start()
        try:
            wait_ready(node)
            sender = subprocess.Popen(
                [
                    str(STORESCU),
                    "-v",
                    "-xe",
                    "-aec",
                    "CXR_AI",
                    "127.0.0.1",
                    str(node.port),
                    *map(str, files),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                wait_for(
                    lambda: len(instance_rows(postgres_url)) >= BURST // 3,
                    WAIT_S,
                    "a third of the burst to arrive",
                    every=0.05,
                )
                node.kill9()  # mid-association, with jobs and sends in flight
                output, _ = sender.communicate(timeout=PEER_TIMEOUT_S)
            finally:
                if sender.poll() is None:
                    sender.kill()
            statuses = acknowledged(output)
            done = [path for path, status in statuses.items() if status == "Success"]
            assert 0 < len(done) < BURST, output[-2000:]
            assert sender.returncode != 0, "storescu did not notice the node dying"
            node.start()
            stored = {str(row["sop_instance_uid"]) for row in instance_rows(postgres_url)}
            assert {uid_of(path) for path in done} <= stored, "acknowledged but not stored"
            wait_for(lambda: settled(postgres_url, len(stored)), WAIT_S, "the node to settle")
            archived = srs_per_source(orthanc)
            missing = {uid_of(path) for path in done} - set(archived)
            assert not missing, f"{len(missing)} acknowledged images have no SR in the archive"
            assert set(archived.values()) == {1}

            rest = [path for path in files if path not in done]  # the PACS sends them again
            again = acknowledged(_both(storescu_many(node.port, rest)))
            assert set(again.values()) == {"Success"} and len(again) == len(rest)
            wait_for(lambda: settled(postgres_url, BURST), WAIT_S, "the resent images")
        finally:
            node.stop()
        in_archive = srs_per_source(orthanc)
    assert set(in_archive) == {uid_of(path) for path in files}
    assert set(in_archive.values()) == {1}, "an image got more than one SR in the archive"
    jobs = rows(postgres_url, "SELECT state, count(*) FROM jobs GROUP BY state")
    assert dict(jobs) == {"done": BURST}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_archive_down_mid_run_everything_delivered_once_when_it_returns(
    data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    """Unlike the results test (archive down from the start), the archive fails while
    the node is delivering, and comes back with what it already stored."""
    files = chest_burst(data_dir, tmp_path / "burst", 24)
    first, second = files[:12], files[12:]
    orthanc_port, database_url = free_port(), f"sqlite:///{tmp_path / 'node.db'}"
    config = faults_config(tmp_path / "node.toml", orthanc_port)
    node = NodeProcess(
        home=tmp_path / "node", database_url=database_url, config_file=config, workers=True
    ).start()
    try:
        with run_orthanc(tmp_path / "orthanc", dicom_port=orthanc_port) as orthanc:
            assert set(acknowledged(_both(storescu_many(node.port, first))).values()) == {"Success"}
            wait_for(
                lambda: sum(srs_per_source(orthanc).values()) >= 3,
                WAIT_S,
                "the first SRs in the archive",
            )
        # The archive is gone now: the rest waits in the outbox and is retried.
        assert set(acknowledged(_both(storescu_many(node.port, second))).values()) == {"Success"}

        def retrying() -> bool:
            failed = rows(
                database_url,
                "SELECT count(*) FROM audit_events WHERE kind = 'send.retry_scheduled'",
            )
            return bool(failed[0][0] >= 3)

        wait_for(retrying, WAIT_S, "deliveries to fail while the archive is down")
        assert not settled(database_url, len(files))
        with run_orthanc(tmp_path / "orthanc", dicom_port=orthanc_port) as orthanc:
            wait_for(lambda: settled(database_url, len(files)), WAIT_S, "delivery after return")
            in_archive = srs_per_source(orthanc)
    finally:
        node.stop()
    assert set(in_archive) == {uid_of(path) for path in files}
    assert set(in_archive.values()) == {1}
    dead = rows(database_url, "SELECT count(*) FROM sends WHERE state = 'dead'")
    assert dead[0][0] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_database_restart_mid_run_node_recovers_without_restart(
    data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    files = chest_burst(data_dir, tmp_path / "burst", 24)
    busy, while_down, after = files[:12], files[12:16], files[16:]
    with private_postgres() as server:
        config = faults_config(tmp_path / "node.toml", None)
        node = NodeProcess(
            home=tmp_path / "node", database_url=server.url, config_file=config, workers=True
        ).start()
        try:
            wait_ready(node)
            assert set(acknowledged(_both(storescu_many(node.port, busy))).values()) == {"Success"}
            server.restart()  # fast shutdown: every connection of the node is cut mid-run
            server.stop()
            result = storescu_many(node.port, while_down)  # dcmtk stops at the first failure
            (answer,) = acknowledged(_both(result)).values()
            assert answer != "Success" and result.returncode != 0, answer
            assert echoscu(node.port).returncode == 0, "listener must answer without a database"
            server.start()
            for batch in (while_down, after):  # the PACS retries; new images keep coming
                statuses = acknowledged(_both(storescu_many(node.port, batch)))
                assert set(statuses.values()) == {"Success"}, statuses
            wait_for(lambda: settled(server.url, len(files)), WAIT_S, "every image processed")
            jobs = rows(server.url, "SELECT state, count(*) FROM jobs GROUP BY state")
            assert dict(jobs) == {"done": len(files)}
            report = json.loads(node.cli("status", "--json").stdout)
            assert report["listener"]["state"] == "up" and report["database"]["reachable"]
            assert node.proc is not None and node.proc.poll() is None, "the node restarted"
        finally:
            node.stop()


@pytest.mark.slow
def test_spool_disk_full_refuses_a700_leaves_nothing_half_written_and_recovers(
    data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    files = chest_burst(data_dir, tmp_path / "burst", 60)  # ~4 MB on a 2 MiB spool
    database_url = f"sqlite:///{tmp_path / 'node.db'}"
    with mounted_tmpfs(tmp_path / "tmpfs", "2m") as mount:
        spool = mount / "spool"
        node = NodeProcess(
            home=tmp_path / "node",
            database_url=database_url,
            extra_env={"DICOM_NODE_SPOOL_DIR": str(spool), "DICOM_NODE_STORAGE__MIN_FREE_MB": "0"},
        ).start()
        try:
            result = storescu_many(node.port, files)
            statuses = acknowledged(_both(result))
            refused = [path for path, status in statuses.items() if status != "Success"]
            assert len(refused) == 1, "the spool never filled up"  # storescu stops there
            assert "OutOfResources" in statuses[refused[0]] and result.returncode != 0
            assert list((spool / "tmp").iterdir()) == [], "a partial file was left behind"
            instances = instance_rows(database_url)
            assert len(instances) == len(statuses) - 1
            for row in instances:  # every recorded instance has its complete file
                stored = spool / str(row["spool_path"])
                assert stored.stat().st_size == row["size_bytes"]
            assert uid_of(refused[0]) not in {r["sop_instance_uid"] for r in instances}

            resize_tmpfs(mount, "64m")  # the operator frees space
            rest = [path for path in files if statuses.get(path) != "Success"]
            again = acknowledged(_both(storescu_many(node.port, rest)))
            assert set(again.values()) == {"Success"} and len(again) == len(rest)
            assert len(instance_rows(database_url)) == len(files)
            assert echoscu(node.port).returncode == 0
        finally:
            node.stop()


def _both(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr
