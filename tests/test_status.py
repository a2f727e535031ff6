"""``collect_status`` on both backends: throughput, latency percentiles, queue, outbox,
processes, destination reachability against a real C-ECHO peer, and the models in force.

The database is filled with jobs whose latencies are known exactly (instance
``received_at`` → job ``finished_at``), so the percentiles can be asserted as numbers.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.status import collect_status
from inference.manifest import CONFIRM_BUNDLE, SCREEN_BUNDLE, WEIGHTS
from storage.db import session_scope
from storage.models import (
    Instance,
    Job,
    JobState,
    NodeHeartbeat,
    Send,
    SendState,
    Series,
    Study,
    utcnow,
)
from tests.echo_support import storescp
from tests.pipeline_support import destination_toml, settings_for
from tests.support import free_port

RECENT_LATENCIES = [1.0, 2.0, 3.0, 4.0, 5.0]  # finished 2 minutes ago
OLDER_LATENCIES = [10.0, 20.0, 30.0, 40.0, 50.0]  # finished 30 minutes ago


class Filler:
    """Adds rows with chosen timestamps to one study."""

    def __init__(self, session: Session) -> None:
        self.session = session
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.9")
        series = Series(study=study, series_instance_uid="1.2.826.0.1.3680043.10.9.1")
        session.add_all([study, series])
        session.flush()
        self.series = series
        self.count = 0

    def job(
        self,
        state: JobState,
        *,
        received: datetime,
        finished: datetime | None = None,
        available: datetime | None = None,
    ) -> Job:
        self.count += 1
        instance = Instance(
            series_id=self.series.id,
            sop_instance_uid=f"1.2.826.0.1.3680043.10.9.1.{self.count}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            size_bytes=1000,
            sha256=f"{self.count:064x}",
            spool_path=f"objects/00/{self.count:064x}.dcm",
            calling_ae="PACS",
            called_ae="CXR_AI",
            peer_address="127.0.0.1",
            received_at=received,
        )
        self.session.add(instance)
        self.session.flush()
        job = Job(
            instance_id=instance.id,
            state=state,
            queued_at=received,
            available_at=available or received,
            finished_at=finished,
        )
        self.session.add(job)
        self.session.flush()
        return job

    def done(self, latency_s: float, finished: datetime) -> None:
        self.job(JobState.DONE, received=finished - timedelta(seconds=latency_s), finished=finished)

    def send(self, job: Job, state: SendState, destination: str = "pacs") -> None:
        self.session.add(
            Send(
                instance_id=job.instance_id,
                destination=destination,
                kind="sr",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                sop_instance_uid=f"2.25.{job.id}{len(state)}",
                study_instance_uid="1.2.826.0.1.3680043.10.9",
                file_path=f"outputs/sr/{job.id}.dcm",
                state=state,
            )
        )


def _populate(sessions: sessionmaker[Session], now: datetime) -> None:
    with session_scope(sessions) as session:
        fill = Filler(session)
        for latency in RECENT_LATENCIES:
            fill.done(latency, now - timedelta(minutes=2))
        for latency in OLDER_LATENCIES:
            fill.done(latency, now - timedelta(minutes=30))
        fill.done(7.0, now - timedelta(hours=2))  # outside both windows
        failed = fill.job(JobState.FAILED, received=now - timedelta(minutes=2), finished=now)
        fill.job(
            JobState.SKIPPED,
            received=now - timedelta(minutes=10),
            finished=now - timedelta(minutes=10),
        )
        fill.job(JobState.QUEUED, received=now - timedelta(minutes=3))  # due
        fill.job(JobState.QUEUED, received=now, available=now + timedelta(minutes=5))  # backoff
        fill.job(JobState.RUNNING, received=now, available=now + timedelta(minutes=10))
        fill.send(failed, SendState.DEAD)
        for state in (SendState.SENT, SendState.SENT, SendState.PENDING):
            fill.send(
                fill.job(
                    JobState.DONE,
                    received=now - timedelta(days=1),
                    finished=now - timedelta(days=1),
                ),
                state,
            )


def test_throughput_latency_queue_and_dead_letters(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    _populate(sessions, utcnow())
    report = collect_status(settings_for(tmp_path, database_url), echo=False)

    recent, hour = report["throughput"]["last_5_min"], report["throughput"]["last_60_min"]
    assert (recent["finished"], recent["done"], recent["failed"], recent["skipped"]) == (6, 5, 1, 0)
    assert (hour["finished"], hour["done"], hour["failed"], hour["skipped"]) == (12, 10, 1, 1)
    assert hour["per_minute"] == 0.2
    # percentile_cont: p50 of 1..5 is 3; p95 sits 80 % of the way from 4 to 5
    assert recent["latency_p50_s"] == pytest.approx(3.0, abs=0.01)
    assert recent["latency_p95_s"] == pytest.approx(4.8, abs=0.01)
    # 1..5 and 10..50: between 5 and 10 for p50, 55 % of the way from 40 to 50 for p95
    assert hour["latency_p50_s"] == pytest.approx(7.5, abs=0.01)
    assert hour["latency_p95_s"] == pytest.approx(45.5, abs=0.01)

    assert report["jobs"] == {
        "received": 0,
        "queued": 2,
        "running": 1,
        "done": 14,
        "failed": 1,
        "skipped": 1,
    }
    assert report["queue"]["waiting"] == 2 and report["queue"]["due"] == 1
    assert report["queue"]["oldest_wait_s"] == pytest.approx(180, abs=30)
    assert report["workers"]["busy"] == 0  # the running job names no worker
    assert report["sends"]["pacs"] == {"pending": 1, "sending": 0, "sent": 2, "dead": 1}
    assert report["dead_letters"] == 1
    assert report["instances"]["total"] == 19 and report["spool"]["images_bytes"] == 19_000


def test_empty_windows_have_no_percentiles(
    tmp_path: Path, database_url: str, engine: object
) -> None:
    report = collect_status(settings_for(tmp_path, database_url), echo=False)
    hour = report["throughput"]["last_60_min"]
    assert hour["finished"] == 0 and hour["latency_p50_s"] is None
    assert report["queue"] == {"waiting": 0, "due": 0, "oldest_wait_s": None}


def _heartbeat(
    node_id: str, role: str, *, beat: datetime, pid: int, stopped: bool = False
) -> NodeHeartbeat:
    row = NodeHeartbeat(
        node_id=node_id,
        hostname=socket.gethostname(),
        pid=pid,
        ae_title="CXR_AI",
        host="127.0.0.1",
        port=0 if role == "worker" else 11112,
        version="0.1.0",
        started_at=beat - timedelta(hours=1),
        heartbeat_at=beat,
        stopped_at=beat if stopped else None,
    )
    row.role = role
    return row


def test_listener_and_workers_from_heartbeats(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    with session_scope(sessions) as session:
        session.add_all(
            [
                _heartbeat("h:CXR_AI:11112", "listener", beat=now, pid=os.getpid(), stopped=True),
                _heartbeat("h:worker:1", "worker", beat=now, pid=os.getpid()),
                _heartbeat("h:worker:2", "worker", beat=now - timedelta(hours=1), pid=1),
            ]
        )
    report = collect_status(settings_for(tmp_path, database_url), echo=False)
    assert report["listener"]["state"] == "down" and report["listener"]["stopped_at"]
    assert report["healthy"] is False
    assert {node["node_id"]: (node["role"], node["state"]) for node in report["nodes"]} == {
        "h:CXR_AI:11112": ("listener", "stopped"),
        "h:worker:1": ("worker", "alive"),
        "h:worker:2": ("worker", "stale"),
    }
    assert (report["workers"]["alive"], report["workers"]["stale"]) == (1, 1)


@pytest.fixture
def echo_peer(tmp_path: Path, dcmtk: None) -> Iterator[int]:
    with storescp(tmp_path / "received") as port:
        yield port


def test_destinations_reachability_models_and_thresholds(
    tmp_path: Path, database_url: str, engine: object, echo_peer: int
) -> None:
    toml = (
        destination_toml("pacs", echo_peer)
        + destination_toml("gone", free_port())
        + "[inference]\nconfirm_threshold = 0.6\n"
    )
    report = collect_status(settings_for(tmp_path, database_url, toml))

    pacs, gone = report["destinations"]["pacs"], report["destinations"]["gone"]
    assert pacs["reachable"] is True and pacs["category"] == "success"
    assert pacs["latency_ms"] > 0 and pacs["peer"] == f"PACS@127.0.0.1:{echo_peer}"
    assert gone["reachable"] is False and gone["category"] == "connection"
    assert report["sends"]["gone"] == {"pending": 0, "sending": 0, "sent": 0, "dead": 0}

    models = {model["role"]: model for model in report["models"]}
    for role, path in (("screen", SCREEN_BUNDLE), ("confirm", CONFIRM_BUNDLE)):
        weights = (path / WEIGHTS).read_bytes()
        assert models[role]["sha256"] == hashlib.sha256(weights).hexdigest()
        assert models[role]["version"] and models[role]["error"] is None
    assert models["confirm"]["thresholds"] == {"pneumonia": 0.6}
    assert models["screen"]["thresholds"]["pneumonia"] < 0.6  # the bundle's own


def test_no_echo_leaves_destinations_unchecked(tmp_path: Path, database_url: str) -> None:
    settings = settings_for(tmp_path, database_url, destination_toml("pacs", free_port()))
    report = collect_status(settings, echo=False)
    assert report["destinations"]["pacs"] == {
        "type": "dicom",
        "reachable": None,
        "category": "not_checked",
    }
