"""The hl7 destination type against real MLLP peers: hl7apy's server, and raw sockets for
peers that misbehave (drop the connection, never answer, acknowledge another message)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.dispatch import Hl7Destination, SendOutcome, get_sender, parse_destination
from dicom_node.results.oru import (
    FINAL,
    MessageHeader,
    Patient,
    ReportedFinding,
    StudyReport,
    encode,
    oru_r01,
)
from tests.hl7_support import MllpReceiver
from tests.support import free_port

FINDING = ReportedFinding("233604007", "SCT", "Pneumonia", 0.91, True, "confirm")


def message_file(tmp_path: Path, study_uid: str = "1.2.3.4") -> tuple[Path, str]:
    study = StudyReport(
        study_uid,
        "ACC1",
        Patient("PHI77331", "", "Zzphi^Patientname", "19500101", "M"),
        "STAT",
        0.91,
        (FINDING,),
        "confirm-model",
        "1.0.0",
        datetime(2026, 1, 2, 3, 4, 5),
    )
    message = oru_r01(study, MessageHeader("CXR_AI"), status=FINAL, created=datetime.now(UTC))
    path = tmp_path / f"{study_uid}.hl7"
    path.write_bytes(encode(message))
    return path, str(message.msh.msh_10.value)


def destination(port: int, **changes: float) -> Hl7Destination:
    return Hl7Destination(name="ris", host="127.0.0.1", port=port, timeout_s=5, **changes)


def send(port: int, *paths: Path, **changes: float) -> list[SendOutcome]:
    return get_sender("hl7").send(destination(port, **changes), list(paths), "CXR_AI")


@pytest.fixture
def receiver() -> Iterator[MllpReceiver]:
    peer = MllpReceiver(free_port()).start()
    try:
        yield peer
    finally:
        peer.stop()


def test_accepted_message_arrives_intact_and_is_a_success(
    tmp_path: Path, receiver: MllpReceiver
) -> None:
    first, first_id = message_file(tmp_path, "1.2.3.4")
    second, second_id = message_file(tmp_path, "1.2.3.5")
    results = send(receiver.port, first, second)
    assert [r.success for r in results] == [True, True]
    assert [r.sop_instance_uid for r in results] == [first_id, second_id]
    assert receiver.received == [first.read_bytes().decode(), second.read_bytes().decode()]


@pytest.mark.parametrize(
    ("code", "retryable", "words"),
    [
        ("AE", True, "application error: AE"),
        ("AR", False, "message rejected: AR"),
        ("CE", True, "application error: CE"),
        ("CR", False, "message rejected: CR"),
    ],
)
def test_error_and_reject_acknowledgements(
    tmp_path: Path, code: str, retryable: bool, words: str
) -> None:
    peer = MllpReceiver(free_port(), [code]).start()
    try:
        (result,) = send(peer.port, message_file(tmp_path)[0])
    finally:
        peer.stop()
    assert not result.success and result.retryable is retryable
    assert words in result.message and "ERR-3 207" in result.message
    assert "Zzphi" not in result.message  # the ACK's free text quotes the patient


def test_acknowledgement_of_another_message_is_retried(tmp_path: Path) -> None:
    peer = MllpReceiver(free_port(), wrong_id=True).start()
    try:
        path, control_id = message_file(tmp_path)
        (result,) = send(peer.port, path)
    finally:
        peer.stop()
    assert not result.success and result.retryable
    assert f"acknowledged message 'WRONG-ID', not '{control_id}'" in result.message


def test_no_listener_is_retryable_and_not_tried_again_for_the_rest(tmp_path: Path) -> None:
    results = send(free_port(), message_file(tmp_path, "1.1")[0], message_file(tmp_path, "1.2")[0])
    assert [r.category for r in results] == ["connection", "connection"]
    assert all(r.retryable and "cannot connect" in r.message for r in results)


def raw_peer(behaviour: Callable[[socket.socket], object]) -> tuple[int, threading.Thread]:
    """A one-connection TCP peer that does ``behaviour`` with what it accepted."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                behaviour(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_peer_that_drops_the_connection_is_retried(tmp_path: Path) -> None:
    port, thread = raw_peer(lambda connection: connection.recv(65536))
    (result,) = send(port, message_file(tmp_path)[0])
    thread.join(5)
    assert result.category == "aborted" and result.retryable
    assert "closed before a complete acknowledgement" in result.message


def test_peer_that_never_answers_times_out_and_is_retried(tmp_path: Path) -> None:
    done = threading.Event()
    port, thread = raw_peer(lambda connection: done.wait(10))
    (result,) = send(port, message_file(tmp_path)[0], network_timeout_s=0.3)
    done.set()
    thread.join(5)
    assert result.category == "timeout" and result.retryable
    assert "no acknowledgement" in result.message


def test_peer_answering_garbage_is_retried(tmp_path: Path) -> None:
    def garbage(connection: socket.socket) -> None:
        connection.recv(65536)
        connection.sendall(b"\x0bHELLO\x1c\x0d")

    port, thread = raw_peer(garbage)
    (result,) = send(port, message_file(tmp_path)[0])
    thread.join(5)
    assert not result.success and result.retryable
    assert "unreadable acknowledgement" in result.message


def test_missing_message_file_is_permanent(tmp_path: Path, receiver: MllpReceiver) -> None:
    (result,) = send(receiver.port, tmp_path / "gone.hl7")
    assert result.category == "invalid_input" and not result.retryable
    assert receiver.received == []


def test_check_reports_reachability(receiver: MllpReceiver) -> None:
    target = get_sender("hl7")
    assert target.check(destination(receiver.port), "CXR_AI").success
    down = target.check(destination(free_port()), "CXR_AI")
    assert not down.success and down.category == "connection"


def test_hl7_destinations_need_host_and_port_not_an_ae_title() -> None:
    with pytest.raises(ValidationError) as info:
        parse_destination({"name": "ris", "type": "hl7"})
    missing = {e["loc"][-1] for e in info.value.errors() if e["type"] == "missing"}
    assert missing == {"host", "port"}
    with pytest.raises(ValidationError, match="ae_title"):
        parse_destination({"name": "ris", "type": "hl7", "host": "h", "port": 1, "ae_title": "A"})
    ris = parse_destination(
        {
            "name": "ris",
            "type": "hl7",
            "host": "ris.example",
            "port": 2575,
            "receiving_application": "RIS",
        }
    )
    assert isinstance(ris, Hl7Destination) and ris.receiving_application == "RIS"
    assert (ris.delivers, ris.peer) == ("study_events", "ris.example:2575")
