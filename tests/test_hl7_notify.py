"""HL7 notification of finished studies, through the real pipeline, outbox and sender.

Real chest images go through the receive path and the pipeline (the fake engine of
``pipeline_support``), the ORU^R01 is written to the spool and queued in the outbox, and
the sender delivers it over MLLP to hl7apy's MLLP server standing in for the RIS, next to
a pynetdicom SCP standing in for the PACS. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hl7apy.core import Message
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.logs import JsonFormatter
from dicom_node.receive import StoreService
from dicom_node.sender import Sender
from dicom_node.wakeup import Wakeup
from storage.db import session_scope
from storage.models import Send, SendState
from storage.retention import purge
from storage.spool import Spool
from tests.hl7_support import MllpReceiver, chest_image, hl7_destination_toml
from tests.pipeline_support import (
    FakeEngine,
    RecordingSCP,
    destination_toml,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)
from tests.support import free_port, run

FAST_RETRY = "[sender]\nbackoff_base = 0.05\nbackoff_cap = 0.1\n"
RULE = '[[rules]]\nname = "chest"\npipeline = "cxr-cascade"\ndestinations = ["pacs", "ris"]\n'
PHI = ("Zzphi", "Patientname", "PHI77331")


class Node:
    """Receive → pipeline → sender for one configuration, in this process."""

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
        self.engine = FakeEngine()
        self.pipeline = make_pipeline(self.settings, sessions, spool, self.engine)
        self.sender = Sender(self.settings, sessions, spool, wakeup=Wakeup())

    def analyse(self, *paths: Path) -> None:
        for path in paths:
            receive_file(self.store, path)
        run_queue(self.pipeline, self.sessions)

    def sends(self, kind: str | None = None) -> list[Send]:
        with session_scope(self.sessions) as session:
            query = select(Send).order_by(Send.id)
            if kind is not None:
                query = query.where(Send.kind == kind)
            return list(session.scalars(query))

    def deliver(self, until: int, receiver: MllpReceiver) -> None:
        """Run the sender until the receiver has ``until`` messages (or 30 s passed)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(receiver.received) < until:
            self.sender.run_once()
            time.sleep(0.05)


@pytest.fixture
def ris() -> Iterator[MllpReceiver]:
    peer = MllpReceiver(free_port()).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def pacs() -> Iterator[RecordingSCP]:
    peer = RecordingSCP(free_port()).start()
    try:
        yield peer
    finally:
        peer.stop()


def config(pacs_port: int, ris_port: int, extra: str = "") -> str:
    ris = hl7_destination_toml(
        "ris", ris_port, receiving_application="RIS", receiving_facility="RADIOLOGY"
    )
    return destination_toml("pacs", pacs_port) + ris + RULE + extra


def observations(message: Message) -> dict[str, list[str]]:
    """OBX-3 code → [OBX-2, OBX-5, OBX-8, OBX-11] of every observation."""
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return {
        obx.obx_3.to_er7().split("^")[0]: [
            obx.obx_2.to_er7(),
            obx.obx_5.to_er7(),
            obx.obx_8.to_er7(),
            obx.obx_11.to_er7(),
        ]
        for obx in (group.obx for group in order.oru_r01_observation)
    }


def test_finished_study_reaches_the_ris_and_its_dicom_results_the_pacs(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    ris: MllpReceiver,
    pacs: RecordingSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = Node(tmp_path, database_url, sessions, spool, config(pacs.port, ris.port))
    image = chest_image(data_dir, tmp_path)
    node.analyse(image.path)
    by_destination = {(s.destination, s.kind) for s in node.sends()}
    assert by_destination == {("pacs", "sr"), ("pacs", "sc"), ("ris", "oru")}
    node.deliver(1, ris)
    assert {s.state for s in node.sends()} == {SendState.SENT}
    assert len(pacs.uids()) == 2  # SR and SC; the PACS gets no HL7
    (message,) = ris.messages()
    (oru,) = node.sends("oru")
    assert message.msh.msh_10.to_er7() == oru.sop_instance_uid
    assert message.msh.msh_3.to_er7() == "CXR_AI" and message.msh.msh_5.to_er7() == "RIS"
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "PHI77331^^^HOSP"
    assert pid.pid_5.to_er7() == "Zzphi^Patientname^Middle^Jr^Dr"
    assert pid.pid_7.to_er7() == "19400305" and pid.pid_8.to_er7() == "F"  # from the image
    obr = message.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_3.to_er7() == "ACC\\F\\42"  # accession ACC|42, escaped
    assert obr.obr_5.to_er7() == "A" and obr.obr_25.to_er7() == "F"  # 0.8731: URGENT
    assert obr.obr_7.to_er7() == "20040826185059"  # the study's date and time
    obx = observations(message)
    assert obx["233604007"] == ["NM", "0.8731", "A", "F"]  # pneumonia, present
    assert obx["260870009"][1] == "103391001^Urgent^SCT"
    assert obx["110180"][1] == oru.study_instance_uid
    assert obx["111001"][1] == "cxr_pneumonia_confirm_resnet18"
    assert oru.file_path == f"outputs/oru/{oru.sop_instance_uid}.hl7"
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "study notification queued" in logged and "hl7 message sent" in logged
    assert not [word for word in PHI if word in logged]
    assert image.sop_instance_uid in logged and image.study_instance_uid in logged


def test_study_is_reported_once_its_last_image_is_finished(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    ris: MllpReceiver,
    pacs: RecordingSCP,
) -> None:
    node = Node(tmp_path, database_url, sessions, spool, config(pacs.port, ris.port))
    first = chest_image(data_dir, tmp_path)
    second = chest_image(data_dir, tmp_path, study_instance_uid=first.study_instance_uid)
    node.analyse(
        first.path, second.path
    )  # one batch: the first job to commit sees the other running
    (oru,) = node.sends("oru")
    assert len(node.sends()) == 5  # 2 × (SR + SC) to the PACS, one message to the RIS
    node.deliver(1, ris)
    assert oru.study_instance_uid == first.study_instance_uid and len(ris.received) == 1


def test_raised_priority_sends_a_correction_and_a_rerun_nothing(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    ris: MllpReceiver,
    pacs: RecordingSCP,
) -> None:
    node = Node(tmp_path, database_url, sessions, spool, config(pacs.port, ris.port))
    first = chest_image(data_dir, tmp_path)
    node.analyse(first.path)
    node.deliver(1, ris)
    node.engine.probability = 0.95  # the second image: a confirmed finding at 0.95 is STAT
    study_uid = first.study_instance_uid
    node.analyse(chest_image(data_dir, tmp_path, study_instance_uid=study_uid).path)
    node.deliver(2, ris)
    final, corrected = ris.messages()
    assert final.msh.msh_10.to_er7() != corrected.msh.msh_10.to_er7()
    obr = corrected.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_25.to_er7() == "C" and obr.obr_5.to_er7() == "S"
    assert observations(corrected)["233604007"] == ["NM", "0.9500", "A", "C"]
    assert observations(corrected)["260870009"][1] == "49499008^Stat^SCT"
    # a third image that changes nothing the message says: no third message
    node.analyse(chest_image(data_dir, tmp_path, study_instance_uid=study_uid).path)
    assert len(node.sends("oru")) == 2


def test_application_error_is_retried_and_delivered_once(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    pacs: RecordingSCP,
) -> None:
    ris = MllpReceiver(free_port(), ["AE"]).start()
    try:
        node = Node(
            tmp_path, database_url, sessions, spool, config(pacs.port, ris.port, FAST_RETRY)
        )
        node.analyse(chest_image(data_dir, tmp_path).path)
        node.sender.run_once()
        (oru,) = node.sends("oru")
        assert oru.state is SendState.PENDING and "application error: AE" in (oru.last_error or "")
        assert not [word for word in PHI if word in (oru.last_error or "")]
        node.deliver(2, ris)
        time.sleep(0.2)
        node.sender.run_once()  # nothing left: delivered once
    finally:
        ris.stop()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.SENT and oru.attempts == 2
    first, second = ris.messages()
    assert first.msh.msh_10.to_er7() == second.msh.msh_10.to_er7() == oru.sop_instance_uid


def test_rejection_is_dead_lettered_and_listed(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    pacs: RecordingSCP,
) -> None:
    ris = MllpReceiver(free_port(), ["AR"]).start()
    try:
        node = Node(tmp_path, database_url, sessions, spool, config(pacs.port, ris.port))
        node.analyse(chest_image(data_dir, tmp_path).path)
        node.sender.run_once()
    finally:
        ris.stop()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.DEAD and "message rejected: AR" in (oru.last_error or "")
    env = {
        "DICOM_NODE_CONFIG": str(tmp_path / "node.toml"),
        "DICOM_NODE_DATABASE_URL": database_url,
        "DICOM_NODE_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    listed = run(
        [sys.executable, "-m", "dicom_node", "sends", "list", "--destination", "ris", "--json"],
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["kind"] == "oru" and row["state"] == "dead"


def test_ris_down_at_first_gets_the_message_when_it_comes_up(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    pacs: RecordingSCP,
) -> None:
    port = free_port()
    node = Node(tmp_path, database_url, sessions, spool, config(pacs.port, port, FAST_RETRY))
    node.analyse(chest_image(data_dir, tmp_path).path)
    node.sender.run_once()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.PENDING and "cannot connect" in (oru.last_error or "")
    ris = MllpReceiver(port).start()
    try:
        node.deliver(1, ris)
    finally:
        ris.stop()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.SENT and len(ris.received) == 1


def test_rule_without_the_ris_sends_no_message(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    ris: MllpReceiver,
    pacs: RecordingSCP,
) -> None:
    toml = config(pacs.port, ris.port).replace('["pacs", "ris"]', '["pacs"]')
    node = Node(tmp_path, database_url, sessions, spool, toml)
    node.analyse(chest_image(data_dir, tmp_path).path)
    assert {(s.destination, s.kind) for s in node.sends()} == {("pacs", "sr"), ("pacs", "sc")}


def test_delivered_message_leaves_the_spool_with_its_image(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
    ris: MllpReceiver,
    pacs: RecordingSCP,
) -> None:
    node = Node(tmp_path, database_url, sessions, spool, config(pacs.port, ris.port))
    node.analyse(chest_image(data_dir, tmp_path).path)
    node.deliver(1, ris)
    time.sleep(0.2)
    node.sender.run_once()  # the SR and SC too, if the loop stopped before them
    (oru,) = node.sends("oru")
    message_file = spool.path_of(oru.file_path)
    assert message_file.is_file()  # names the patient: it must not stay forever
    assert purge(sessions, spool, keep_for=timedelta(0)).instances == 1
    assert not message_file.exists()
