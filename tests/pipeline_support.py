"""Helpers for the worker, sender and retention tests.

The engine is the one thing replaced here: :class:`FakeAnalyzer` applies the real
cascade's header gate (frontal chest CR/DX → scored, anything else → not scored with the
gate's reason) but runs no network; its results are built by the same helpers the result
writers' tests use, so the SRs and SCs the pipeline writes are real and go through
``dciodvfy``. Everything else — database, spool, receive path, rules, result builders,
pynetdicom peers — is real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings, load_settings
from dicom_node.notify import StudyNotifier
from dicom_node.pipeline import Pipeline, PipelineContext
from dicom_node.receive import IncomingInstance, StoreService
from dicom_node.results.common import Equipment
from dicom_node.sender import Sender
from dicom_node.wakeup import Wakeup
from dicom_node.worker import claim_jobs
from inference.cascade import ERROR, NOT_SCORED, ImageResult
from inference.gate import check_header
from storage.db import session_scope
from storage.models import Send
from storage.spool import Spool
from tests.results_data import make_finding, make_result
from tests.support import split_part10

WORKER_ID = "testhost:1:worker-1"
FAKE_IDENTITY = "fake-screen@1.0.0+fake-confirm@1.0.0"
CHEST = "siim-cr-jpegbaseline.dcm"


@dataclass
class FakeAnalyzer:
    """Scores chest images with a fixed probability; records every batch it is given."""

    identity: str = FAKE_IDENTITY
    probability: float = 0.8731
    errors: set[str] = field(default_factory=set)  # SOP Instance UIDs to fail to decode
    crash: BaseException | None = None  # raised by analyze(), to simulate a failing engine
    batches: list[int] = field(default_factory=list)

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        self.batches.append(len(datasets))
        if self.crash is not None:
            raise self.crash
        return [self._one(ds) for ds in datasets]

    def _one(self, ds: Dataset) -> ImageResult:
        uid = str(ds.SOPInstanceUID)
        if uid in self.errors:
            return ImageResult(uid, ERROR, "cannot decode pixel data: broken stream")
        gate = check_header(ds)  # the engine's own header rules
        if not gate.eligible:
            return ImageResult(uid, NOT_SCORED, gate.reason)
        present = self.probability >= 0.5
        finding = make_finding(present, "confirm", probability=self.probability)
        return make_result(ds, [finding])


def receive_file(
    store: StoreService, path: Path, *, calling_ae: str = "PACS", called_ae: str = "CXR_AI"
) -> int:
    """Push a Part 10 file through the real receive path; returns the instance id."""
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    incoming = IncomingInstance(
        dataset=split_part10(path.read_bytes())[1],
        transfer_syntax_uid=str(meta.file_meta.TransferSyntaxUID),
        sop_class_uid=str(meta.SOPClassUID),
        sop_instance_uid=str(meta.SOPInstanceUID),
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer_address="127.0.0.1",
        peer_port=40000,
    )
    result = store.store(incoming)
    assert result.ok, result
    assert result.instance_id is not None
    return result.instance_id


@dataclass(frozen=True)
class Image:
    path: Path
    study_instance_uid: str
    sop_instance_uid: str


def chest_image(
    folder: Path,
    out_dir: Path,
    *,
    accession: str,
    patient_name: str = "Test^Patient",
    patient_id: str = "PID-0",
    issuer: str | None = None,
    study_instance_uid: str | None = None,
    source: str = CHEST,
) -> Image:
    """A copy of the chest image ``folder / source`` as a new image of
    ``study_instance_uid`` (or of a new study), with its own series and SOP Instance UIDs
    and the accession number and patient (with ``issuer``, if given) a test asks for."""
    ds = pydicom.dcmread(folder / source)
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = accession
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Image(path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))


def settings_for(tmp_path: Path, database_url: str, toml: str = "", **overrides: Any) -> Settings:
    config = tmp_path / "node.toml"
    config.write_text(toml)
    storage = {"home": tmp_path, "database_url": database_url}
    return load_settings(config, storage=storage, **overrides)


def make_pipeline(
    settings: Settings, sessions: sessionmaker[Session], spool: Spool, engine: FakeAnalyzer
) -> Pipeline:
    context = PipelineContext(
        sessions=sessions,
        spool=spool,
        rules=settings.rule_set,
        equipment=Equipment(),
        destinations={d.name: d for d in settings.destinations},
        priority=settings.priority,
        notifier=StudyNotifier.from_settings(settings),
    )
    return Pipeline(context, engine, WORKER_ID)


def run_queue(pipeline: Pipeline, sessions: sessionmaker[Session], batch_size: int = 8) -> int:
    """Claim and run batches until the queue is empty; returns the number of jobs run."""
    from datetime import timedelta

    total = 0
    while True:
        jobs = claim_jobs(sessions, WORKER_ID, limit=batch_size, lease=timedelta(minutes=5))
        if not jobs:
            return total
        pipeline.run(jobs)
        total += len(jobs)


class Node:
    """Receive → pipeline (fake engine) → sender for one configuration, in this process."""

    def __init__(
        self,
        tmp_path: Path,
        database_url: str,
        sessions: sessionmaker[Session],
        spool: Spool,
        toml: str,
    ) -> None:
        self.settings = settings_for(tmp_path, database_url, toml)
        self.sessions = sessions
        self.spool = spool
        self.store = StoreService(spool, sessions, min_free_bytes=0)
        self.engine = FakeAnalyzer()
        self.pipeline = make_pipeline(self.settings, sessions, spool, self.engine)
        self.sender = Sender(self.settings, sessions, spool, wakeup=Wakeup())

    def analyse(self, *paths: Path) -> None:
        """Receive the files and run the queue until it is empty."""
        for path in paths:
            receive_file(self.store, path)
        run_queue(self.pipeline, self.sessions)

    def sends(self, kind: str | None = None) -> list[Send]:
        with session_scope(self.sessions) as session:
            query = select(Send).order_by(Send.id)
            if kind is not None:
                query = query.where(Send.kind == kind)
            return list(session.scalars(query))

    def deliver(self, until: int, received: Sized) -> None:
        """Run the sender until a peer's ``received`` holds ``until`` objects (or 30 s
        passed)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(received) < until:
            self.sender.run_once()
            time.sleep(0.05)


class RecordingSCP:
    """A pynetdicom storage SCP standing in for a PACS: keeps what it receives."""

    def __init__(self, port: int, aet: str = "PACS", status: Callable[[Event], int] | None = None):
        self.port = port
        self.aet = aet
        self.received: list[Dataset] = []
        self.associations = 0
        self._status = status or (lambda event: 0x0000)
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: Event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return self._status(event)

    def _on_accepted(self, event: Event) -> None:
        with self._lock:
            self.associations += 1

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.aet)
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]


def destination_toml(name: str, port: int, aet: str = "PACS") -> str:
    return (
        f'[[destinations]]\nname = "{name}"\nae_title = "{aet}"\nhost = "127.0.0.1"\n'
        f"port = {port}\ntimeout_s = 5\n"
    )


def recording_scp(port: int) -> Iterator[RecordingSCP]:
    scp = RecordingSCP(port).start()
    try:
        yield scp
    finally:
        scp.stop()
