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
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hl7apy.core import Message
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.logs import JsonFormatter
from storage.models import SendState
from storage.retention import purge
from storage.spool import Spool
from tests.hl7_support import MllpReceiver, hl7_destination_toml
from tests.pipeline_support import Image, Node, RecordingSCP, chest_image, destination_toml
from tests.support import free_port, run

FAST_RETRY = "[sender]\nbackoff_base = 0.05\nbackoff_cap = 0.1\n"
RULE = '[[rules]]\nname = "chest"\npipeline = "cxr-cascade"\ndestinations = ["pacs", "ris"]\n'
PHI = ("Zzphi", "Patientname", "PHI77331")
# The patient the RIS gets: name, ID with its issuer, and an accession with a field separator.
RIS_IMAGE: dict[str, str] = {
    "source": "rg1-chest-cr-mono1-j2k.dcm",
    "patient_name": "Zzphi^Patientname^Middle^Dr^Jr",
    "patient_id": "PHI77331",
    "issuer": "HOSP",
    "accession": "ACC|42",
}


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


MakeNode = Callable[..., Node]
NewImage = Callable[..., Image]


@pytest.fixture
def make_node(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    pacs: RecordingSCP,
) -> MakeNode:
    """A node sending to ``pacs`` and to a RIS on ``ris_port`` (``toml``: another config)."""

    def make(ris_port: int, extra: str = "", *, toml: str | None = None) -> Node:
        toml = config(pacs.port, ris_port, extra) if toml is None else toml
        return Node(tmp_path, database_url, sessions, spool, toml)

    return make


@pytest.fixture
def new_image(data: Path, tmp_path: Path) -> NewImage:
    """A new chest image (of a new study, or of ``study_instance_uid``) of the RIS patient."""

    def make(study_instance_uid: str | None = None) -> Image:
        return chest_image(data, tmp_path, study_instance_uid=study_instance_uid, **RIS_IMAGE)

    return make


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
    make_node: MakeNode,
    new_image: NewImage,
    ris: MllpReceiver,
    pacs: RecordingSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = make_node(ris.port)
    image = new_image()
    node.analyse(image.path)
    by_destination = {(s.destination, s.kind) for s in node.sends()}
    assert by_destination == {("pacs", "sr"), ("pacs", "sc"), ("ris", "oru")}
    node.deliver(1, ris.received)
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
    make_node: MakeNode, new_image: NewImage, ris: MllpReceiver
) -> None:
    node = make_node(ris.port)
    first = new_image()
    second = new_image(first.study_instance_uid)
    node.analyse(
        first.path, second.path
    )  # one batch: the first job to commit sees the other running
    (oru,) = node.sends("oru")
    assert len(node.sends()) == 5  # 2 × (SR + SC) to the PACS, one message to the RIS
    node.deliver(1, ris.received)
    assert oru.study_instance_uid == first.study_instance_uid and len(ris.received) == 1


def test_raised_priority_sends_a_correction_and_a_rerun_nothing(
    make_node: MakeNode, new_image: NewImage, ris: MllpReceiver
) -> None:
    node = make_node(ris.port)
    first = new_image()
    node.analyse(first.path)
    node.deliver(1, ris.received)
    node.engine.probability = 0.95  # the second image: a confirmed finding at 0.95 is STAT
    study_uid = first.study_instance_uid
    node.analyse(new_image(study_uid).path)
    node.deliver(2, ris.received)
    final, corrected = ris.messages()
    assert final.msh.msh_10.to_er7() != corrected.msh.msh_10.to_er7()
    obr = corrected.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_25.to_er7() == "C" and obr.obr_5.to_er7() == "S"
    assert observations(corrected)["233604007"] == ["NM", "0.9500", "A", "C"]
    assert observations(corrected)["260870009"][1] == "49499008^Stat^SCT"
    # a third image that changes nothing the message says: no third message
    node.analyse(new_image(study_uid).path)
    assert len(node.sends("oru")) == 2


def test_application_error_is_retried_and_delivered_once(
    make_node: MakeNode, new_image: NewImage
) -> None:
    ris = MllpReceiver(free_port(), ["AE"]).start()
    try:
        node = make_node(ris.port, FAST_RETRY)
        node.analyse(new_image().path)
        node.sender.run_once()
        (oru,) = node.sends("oru")
        assert oru.state is SendState.PENDING and "application error: AE" in (oru.last_error or "")
        assert not [word for word in PHI if word in (oru.last_error or "")]
        node.deliver(2, ris.received)
        time.sleep(0.2)
        node.sender.run_once()  # nothing left: delivered once
    finally:
        ris.stop()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.SENT and oru.attempts == 2
    first, second = ris.messages()
    assert first.msh.msh_10.to_er7() == second.msh.msh_10.to_er7() == oru.sop_instance_uid


def test_rejection_is_dead_lettered_and_listed(
    make_node: MakeNode, new_image: NewImage, tmp_path: Path, database_url: str
) -> None:
    ris = MllpReceiver(free_port(), ["AR"]).start()
    try:
        node = make_node(ris.port)
        node.analyse(new_image().path)
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
    make_node: MakeNode, new_image: NewImage
) -> None:
    port = free_port()
    node = make_node(port, FAST_RETRY)
    node.analyse(new_image().path)
    node.sender.run_once()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.PENDING and "cannot connect" in (oru.last_error or "")
    ris = MllpReceiver(port).start()
    try:
        node.deliver(1, ris.received)
    finally:
        ris.stop()
    (oru,) = node.sends("oru")
    assert oru.state is SendState.SENT and len(ris.received) == 1


def test_rule_without_the_ris_sends_no_message(
    make_node: MakeNode, new_image: NewImage, ris: MllpReceiver, pacs: RecordingSCP
) -> None:
    toml = config(pacs.port, ris.port).replace('["pacs", "ris"]', '["pacs"]')
    node = make_node(ris.port, toml=toml)
    node.analyse(new_image().path)
    assert {(s.destination, s.kind) for s in node.sends()} == {("pacs", "sr"), ("pacs", "sc")}


def test_delivered_message_leaves_the_spool_with_its_image(
    make_node: MakeNode,
    new_image: NewImage,
    ris: MllpReceiver,
    sessions: sessionmaker[Session],
    spool: Spool,
) -> None:
    node = make_node(ris.port)
    node.analyse(new_image().path)
    node.deliver(1, ris.received)
    time.sleep(0.2)
    node.sender.run_once()  # the SR and SC too, if the loop stopped before them
    (oru,) = node.sends("oru")
    message_file = spool.path_of(oru.file_path)
    assert message_file.is_file()  # names the patient: it must not stay forever
    assert purge(sessions, spool, keep_for=timedelta(0)).instances == 1
    assert not message_file.exists()
