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
TOKEN = "test-token-0123456789abcdef"
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


def node_settings(home: Path, database_url: str, *, token_file: bool = True) -> Settings:
    """A node on free ports, without workers, with one (unreachable) PACS destination.

    The token comes from a file holding :data:`TOKEN` unless ``token_file`` is False (then
    the node generates one in its home).
    """
    http: dict[str, object] = {"port": 0}
    if token_file:
        path = home / "token.txt"
        path.write_text(TOKEN + "\n")
        path.chmod(0o600)
        http["token_file"] = path
    return settings_for(
        home,
        database_url,
        destination_toml("pacs", free_port()),
        node={"host": "127.0.0.1", "port": free_port(), "heartbeat_interval": 1},
        http=http,
        worker={"threads": 0},
    )


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
    home: Path, database_url: str, data: Path, *, populated: bool = True
) -> Iterator[ApiNode]:
    """Populate the database (if asked), then run a node serving the API on a free port."""
    settings = node_settings(home, database_url)
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
