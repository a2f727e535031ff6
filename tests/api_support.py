"""Helpers for the HTTP API tests: a populated node with the real API on a free port.

Studies are copies of one shared chest image (new UIDs and accession numbers) and one hip
image, pushed through the real receive path and the real pipeline with
:class:`~tests.pipeline_support.FakeAnalyzer` set to a different probability per study, so
the priorities, results, SR/SC outputs and sends are what a node would have made. They
arrive out of priority order on purpose. The node is a real :class:`~dicom_node.node.Node`
(no workers), serving the API with uvicorn on port 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.receive import StoreService
from storage.db import make_engine, make_session_factory, upgrade
from storage.spool import Spool
from tests.pipeline_support import (
    FakeAnalyzer,
    destination_toml,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)
from tests.support import free_port

CHEST = "nih-00000001_000-dx-sc.dcm"
HIP = "rg2-hip-cr-jpegextended.dcm"  # stored, routed to no pipeline: skipped, no priority
TOKEN = "test-token-0123456789abcdef"  # the admin token
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
PATIENT_NAME = "Testpatient^Jane"  # must never appear in an API response
PATIENT_ID_PREFIX = "PID-7Q-"

# (accession, source file, probability of the fake engine) in arrival order.
ARRIVALS: tuple[tuple[str, str, float], ...] = (
    ("ACC-R1", CHEST, 0.20),
    ("ACC-U1", CHEST, 0.70),
    ("ACC-S1", CHEST, 0.95),
    ("ACC-HIP", HIP, 0.50),
    ("ACC-R2", CHEST, 0.30),
    ("ACC-U2", CHEST, 0.60),
    ("ACC-S2", CHEST, 0.97),
)
EXPECTED_ORDER = ("ACC-S1", "ACC-S2", "ACC-U1", "ACC-U2", "ACC-R1", "ACC-R2", "ACC-HIP")
PRIORITY_OF = {
    "ACC-S1": "STAT",
    "ACC-S2": "STAT",
    "ACC-U1": "URGENT",
    "ACC-U2": "URGENT",
    "ACC-R1": "ROUTINE",
    "ACC-R2": "ROUTINE",
    "ACC-HIP": None,
}
SCORED = [accession for accession, source, _ in ARRIVALS if source == CHEST]


def study_copy(source: Path, directory: Path, accession: str) -> Path:
    """The source image as a new study (fresh UIDs) with ``accession``."""
    dataset = pydicom.dcmread(source)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.AccessionNumber = accession
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = f"{PATIENT_ID_PREFIX}{accession}"
    path = directory / f"{accession}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def populate(
    settings: Settings, sessions: sessionmaker[Session], spool: Spool, data: Path, work: Path
) -> dict[str, str]:
    """Receive and analyse :data:`ARRIVALS` one by one; returns accession → study UID."""
    return {
        accession: arrive(settings, sessions, spool, data / source, work, accession, probability)
        for accession, source, probability in ARRIVALS
    }


def arrive(
    settings: Settings,
    sessions: sessionmaker[Session],
    spool: Spool,
    source: Path,
    work: Path,
    accession: str,
    probability: float,
) -> str:
    """One new study received and analysed with ``probability``; returns its UID."""
    path = study_copy(source, work, accession)
    receive_file(StoreService(spool, sessions, min_free_bytes=0), path)
    engine = FakeAnalyzer(probability=probability)
    run_queue(make_pipeline(settings, sessions, spool, engine), sessions)
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def node_settings(
    home: Path, database_url: str, *, token_file: bool = True, **http_settings: object
) -> Settings:
    """A node on free ports, without workers, with one (unreachable) PACS destination.

    The admin token comes from a file holding :data:`TOKEN` unless ``token_file`` is False
    (then the node generates one in its home); the viewer token from one holding
    :data:`VIEWER_TOKEN`. Failed authentications are not limited (tests of refusals share
    one node and one client address) unless ``http_settings`` say otherwise.
    """
    http: dict[str, object] = {"port": 0, "auth_failure_limit": 100_000, **http_settings}
    if token_file:
        http["token_file"] = _token_file(home / "token.txt", TOKEN)
    http["viewer_token_file"] = _token_file(home / "viewer-token.txt", VIEWER_TOKEN)
    return settings_for(
        home,
        database_url,
        destination_toml("pacs", free_port()),
        node={"host": "127.0.0.1", "port": free_port(), "heartbeat_interval": 1},
        http=http,
        worker={"threads": 0},
    )


def _token_file(path: Path, token: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@dataclass
class ApiNode:
    """A running node and what tests need to talk to its API."""

    node: Node
    settings: Settings
    sessions: sessionmaker[Session]
    spool: Spool
    studies: dict[str, str]

    @property
    def base_url(self) -> str:
        assert self.node.http is not None
        return f"http://127.0.0.1:{self.node.http.port}"

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)


@contextlib.contextmanager
def running_api(
    home: Path, database_url: str, data: Path, *, populated: bool = True, **http_settings: object
) -> Iterator[ApiNode]:
    """Populate the database (if asked), then run a node serving the API on a free port
    (``http_settings``: ``[http]`` keys for :func:`node_settings`)."""
    settings = node_settings(home, database_url, **http_settings)
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        spool = Spool(settings.storage.spool_root)
        spool.prepare()
        work = home / "sources"
        work.mkdir(exist_ok=True)
        studies = populate(settings, sessions, spool, data, work) if populated else {}
        node = Node(settings, workers=False)
        node.start()
        try:
            yield ApiNode(node, settings, sessions, spool, studies)
        finally:
            node.stop()
    finally:
        engine.dispose()
