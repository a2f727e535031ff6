"""Scale-out on PostgreSQL: one listener, two ``dicom-node worker`` processes, one archive.

``dicom-node serve --no-workers`` receives a queue of chest images into a spool shared
with two worker-only processes (``dicom-node worker --threads 1``, real engine); every
process runs a sender towards a real Orthanc. One worker is killed with ``kill -9`` while
it holds a batch. Whatever the interleaving, the archive and the audit trail must show:

* every image processed once: one result per instance, each job claimed once — except
  the jobs the dead worker held, which were claimed exactly once more, by the survivor;
* every SR and heatmap SC delivered once: one ``send.sent`` per send across three senders,
  and exactly one SR per source image in Orthanc;
* the processes say what they are: two ``worker`` heartbeats beside the ``listener``.

On one host the survivor takes the dead worker's jobs as soon as it sees the process
gone; on another host it would after ``job_lease`` (4 s here; see tests/test_worker.py).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.orthanc import run_orthanc
from tests.e2e.scale_support import (
    acknowledged,
    chest_burst,
    rows,
    split_config,
    srs_per_source,
    storescu_many,
    wait_for,
    wait_ready,
)
from tests.support import NodeProcess, provision_database

IMAGES = 40
WAIT_S = 480.0
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with provision_database("postgresql", tmp_path) as url:
        yield url


def start_worker(work: Path, name: str, url: str, config: Path, spool: Path) -> NodeProcess:
    worker = NodeProcess(
        home=work / name,
        database_url=url,
        config_file=config,
        workers=True,
        command=("worker", "--threads", "1"),
        extra_env={"DICOM_NODE_SPOOL_DIR": str(spool)},
    )
    return worker.start()


def pid_of(owner: str) -> int:
    """The pid in a ``host:pid:name`` claim owner."""
    match = re.fullmatch(r"[^:]*:(\d+):.*", owner)
    assert match, owner
    return int(match.group(1))


def test_two_workers_process_each_job_once_and_a_killed_one_leaves_its_jobs_to_the_other(
    postgres_url: str, data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    work = tmp_path
    spool = work / "spool"
    files = chest_burst(data_dir, work / "burst", IMAGES)
    with run_orthanc(work / "orthanc") as orthanc:
        config = split_config(work / "node.toml", orthanc, job_lease=4)
        listener = NodeProcess(
            home=work / "listener",
            database_url=postgres_url,
            config_file=config,
            extra_env={"DICOM_NODE_SPOOL_DIR": str(spool)},
        )
        listener.start()
        workers: list[NodeProcess] = []
        try:
            workers = [
                start_worker(work, f"worker-{i}", postgres_url, config, spool) for i in (1, 2)
            ]
            for worker in workers:
                wait_ready(worker)
            victim, survivor = workers
            sent = storescu_many(listener.port, files)
            assert set(acknowledged(sent.stdout + sent.stderr).values()) == {"Success"}, sent
            victim_pid = victim.proc.pid if victim.proc else -1

            def victim_holds_a_batch() -> bool:
                running = rows(postgres_url, "SELECT worker FROM jobs WHERE state = 'running'")
                return any(pid_of(owner) == victim_pid for (owner,) in running)

            wait_for(victim_holds_a_batch, WAIT_S, "the first worker to claim a batch", every=0.02)
            victim.kill9()

            def all_done() -> bool:
                states = rows(postgres_url, "SELECT state, count(*) FROM jobs GROUP BY state")
                pending = rows(postgres_url, "SELECT count(*) FROM sends WHERE state != 'sent'")
                return dict(states) == {"done": IMAGES} and pending[0][0] == 0

            wait_for(all_done, WAIT_S, "every job done and every SR sent")
            roles = rows(postgres_url, "SELECT role, count(*) FROM node_heartbeats GROUP BY role")
            assert dict(roles) == {"listener": 1, "worker": 2}
            survivor_pid = survivor.proc.pid if survivor.proc else -1
            assert survivor.stop() == 0
        finally:
            for process in [*workers, listener]:
                process.stop()

        claims = rows(
            postgres_url,
            "SELECT job_id, actor FROM audit_events WHERE kind = 'job.running' ORDER BY id",
        )
        finishers = dict(
            rows(postgres_url, "SELECT job_id, actor FROM audit_events WHERE kind = 'job.done'")
        )
        per_job: dict[int, list[int]] = {}
        for job_id, actor in claims:
            per_job.setdefault(job_id, []).append(pid_of(actor))
        assert len(per_job) == IMAGES and len(finishers) == IMAGES
        taken_over = {job for job, pids in per_job.items() if len(pids) > 1}
        assert taken_over, "the killed worker held no job"
        for job_id, pids in per_job.items():
            if job_id in taken_over:  # the dead worker's batch: once more, by the survivor
                assert pids == [victim_pid, survivor_pid], (job_id, pids)
            else:
                assert len(pids) == 1, (job_id, pids)
            assert pid_of(finishers[job_id]) in (victim_pid, survivor_pid)
        assert all(pid_of(finishers[job]) == survivor_pid for job in taken_over)

        results = rows(postgres_url, "SELECT instance_id, count(*) FROM results GROUP BY 1")
        assert len(results) == IMAGES and {count for _, count in results} == {1}
        sent_events = rows(
            postgres_url, "SELECT details FROM audit_events WHERE kind = 'send.sent'"
        )
        per_send = Counter(details["send_id"] for (details,) in sent_events)
        assert len(per_send) == 2 * IMAGES and set(per_send.values()) == {1}, per_send
        sources = {
            str(uid) for (uid,) in rows(postgres_url, "SELECT sop_instance_uid FROM instances")
        }
        in_archive = srs_per_source(orthanc)
        assert set(in_archive) == sources and set(in_archive.values()) == {1}


def test_worker_refuses_sqlite_with_one_clear_line(tmp_path: Path) -> None:
    node = NodeProcess(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'node.db'}")
    tmp_path.mkdir(exist_ok=True)
    result = node.cli("worker", "--threads", "2")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "SQLite" in line and "dicom-node serve" in line and "PostgreSQL" in line
    assert not (tmp_path / "node.db").exists(), "nothing may be created before refusing"
