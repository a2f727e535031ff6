"""Fuzzing the listener: malformed data sets over real associations, malformed PDUs on
raw sockets, against one running listener (real store pipeline, SQLite, spool).

Properties checked after every generated input:

* **the listener lives**: a C-ECHO on a fresh association succeeds;
* **every association gets a well-formed answer**: for a data set, a C-STORE response
  with a status (Success only if the instance is then recorded); for raw bytes, within
  ``ANSWER_TIMEOUT_S`` after the client half-closes, the node sends nothing but complete
  PDUs of the types an acceptor may send (A-ASSOCIATE-AC/RJ, P-DATA-TF, A-RELEASE-RP,
  A-ABORT; the first one an AC, RJ or A-ABORT) and then closes the connection — or
  closes it without sending anything;
* **nothing half-written**: ``spool/tmp`` is empty, every file in ``spool/objects`` has
  an instance row and every row its file, every quarantined object has its note.

The suite runs ``FUZZ_EXAMPLES`` inputs per fuzz test (default 100). The 10,000-input run is
``FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz_listener.py``
(two fuzz tests, about half an hour on two cores).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeSettings
from dicom_node.listener import Listener
from dicom_node.receive import StoreService
from storage.db import make_engine, make_session_factory, session_scope, upgrade
from storage.models import Instance
from storage.spool import Spool
from tests.support import NODE_AE, free_port

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
ANSWER_TIMEOUT_S = 10.0
CR = "1.2.840.10008.5.1.4.1.1.1"
SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
]
ACCEPTOR_PDU_TYPES = {0x02, 0x03, 0x04, 0x06, 0x07}
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Target:
    listener: Listener
    spool: Spool
    sessions: sessionmaker[Session]
    files: Path

    @property
    def port(self) -> int:
        return self.listener.port


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One listener for all examples: timeouts short, so stalled peers end quickly."""
    home = tmp_path_factory.mktemp("fuzz")
    engine = make_engine(f"sqlite:///{home / 'node.db'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    spool = Spool(home / "spool", durable=False)
    spool.prepare()
    settings_ = NodeSettings(
        host="127.0.0.1",
        port=free_port(),
        ae_title=NODE_AE,
        acse_timeout=5,
        dimse_timeout=5,
        network_timeout=5,
        max_associations=64,
    )
    listener = Listener(settings_, StoreService(spool, sessions, min_free_bytes=0))
    listener.start()
    files = home / "inputs"
    files.mkdir()
    yield Target(listener, spool, sessions, files)
    listener.stop(grace_seconds=5)
    engine.dispose()


# -- invariants ------------------------------------------------------------------------------


def assert_alive(target: Target) -> None:
    ae = AE(ae_title="FUZZ_ECHO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", target.port, ae_title=NODE_AE)
    assert assoc.is_established, "the listener no longer accepts associations"
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def assert_spool_consistent(target: Target) -> None:
    spool = target.spool
    assert list(spool.tmp_dir.iterdir()) == [], "half-written file left in spool/tmp"
    objects = {str(p.relative_to(spool.root)) for p in spool.objects_dir.rglob("*.dcm")}
    with session_scope(target.sessions) as session:
        recorded = set(session.scalars(select(Instance.spool_path)))
    assert objects == recorded, "spool objects and instance rows disagree"
    for kept in spool.quarantine_dir.glob("*.dcm"):
        assert kept.with_suffix(".json").is_file(), f"quarantined {kept.name} has no note"


def instance_count(target: Target) -> int:
    with session_scope(target.sessions) as session:
        return len(list(session.scalars(select(Instance.id))))


# -- data sets over a real association ------------------------------------------------------

VRS = [b"AE", b"CS", b"DA", b"DS", b"IS", b"LO", b"OB", b"OW", b"PN", b"SH", b"SQ", b"UI",
       b"UL", b"US", b"UN", b"UT", b"ZZ", b"\x00\x01"]  # fmt: skip
LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


@st.composite
def elements(draw: st.DrawFn) -> bytes:
    """One element with a random tag, VR and a length that may lie about its value."""
    group = draw(st.sampled_from([0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0, 0xFFFE, 0x0002])
                 | st.integers(0, 0xFFFF))  # fmt: skip
    element = draw(st.integers(0, 0xFFFF))
    vr = draw(st.sampled_from(VRS))
    value = draw(st.binary(max_size=64))
    length = draw(st.sampled_from([len(value), 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF))
    implicit = draw(st.booleans())
    head = struct.pack("<HH", group, element)
    if implicit:
        return head + struct.pack("<I", length) + value
    if vr in LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<I", length) + value
    return head + vr + struct.pack("<H", length & 0xFFFF) + value


UID_ROOT = "1.2.826.0.1.3680043.8.498."


def valid_dataset(sop_instance_uid: str) -> bytes:
    """A small, complete CR in Explicit VR Little Endian, built element by element
    (fixed study and series: hypothesis needs the same input for the same draws)."""

    def element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0" if vr in (b"UI", b"OB") else b" "
        if vr in LONG_VRS:
            return struct.pack("<HH", *tag) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", *tag) + vr + struct.pack("<H", len(value)) + value

    return b"".join(
        [
            element((0x0008, 0x0016), b"UI", CR.encode()),
            element((0x0008, 0x0018), b"UI", sop_instance_uid.encode()),
            element((0x0008, 0x0060), b"CS", b"CR"),
            element((0x0020, 0x000D), b"UI", f"{UID_ROOT}1".encode()),
            element((0x0020, 0x000E), b"UI", f"{UID_ROOT}1.1".encode()),
            element((0x0028, 0x0002), b"US", struct.pack("<H", 1)),
            element((0x0028, 0x0010), b"US", struct.pack("<H", 8)),
            element((0x0028, 0x0011), b"US", struct.pack("<H", 8)),
            element((0x0028, 0x0100), b"US", struct.pack("<H", 8)),
            element((0x7FE0, 0x0010), b"OB", bytes(range(64))),
        ]
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid data set, then truncated, overwritten or with bytes inserted."""
    data = bytearray(valid_dataset(f"{UID_ROOT}2.{draw(st.integers(1, 10**9))}"))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if action == "truncate":
            del data[position:]
        elif action == "overwrite":
            data[position : position + len(chunk)] = chunk
        else:
            data[position:position] = chunk
    return bytes(data)


datasets = st.one_of(
    st.binary(max_size=512),
    st.lists(elements(), max_size=12).map(b"".join),
    mutated(),
)


def part10(target: Target, dataset: bytes, syntax: str) -> Path:
    meta = create_file_meta(
        sop_class_uid=CR, sop_instance_uid=generate_uid(), transfer_syntax=syntax
    )
    path = target.files / "input.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(meta) + dataset)
    return path


def store_raw(target: Target, path: Path) -> int | None:
    """C-STORE the bytes after the file meta as they are; the response's status."""
    ae = AE(ae_title="FUZZ_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for syntax in SYNTAXES:  # one context per syntax: the input's own is always accepted
        ae.add_requested_context(CR, [syntax])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", target.port, ae_title=NODE_AE)
        assert assoc.is_established, "association for the C-STORE refused"
        response = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return getattr(response, "Status", None)


@FUZZ_SETTINGS
@given(dataset=datasets, syntax=st.sampled_from(SYNTAXES))
def test_malformed_data_sets_get_a_status_and_leave_no_debris(
    target: Target, dataset: bytes, syntax: str
) -> None:
    if dataset[:2] == b"\x02\x00":  # would be read as File Meta by the sending side
        dataset = b"\x08\x00" + dataset[2:]
    before = instance_count(target)
    status = store_raw(target, part10(target, dataset, syntax))
    assert status is not None, "no C-STORE response"
    recorded = instance_count(target) - before
    # Success: recorded (or an identical re-send, already recorded); failure: nothing.
    assert recorded in ((0, 1) if status == 0x0000 else (0,)), f"status 0x{status:04X}"
    assert_spool_consistent(target)
    assert_alive(target)


def test_the_valid_seed_is_stored(target: Target) -> None:
    """The mutation seed itself is accepted: the fuzzer starts from the success path."""
    path = part10(target, valid_dataset(generate_uid()), ExplicitVRLittleEndian)
    assert store_raw(target, path) == 0x0000


# -- PDUs on raw sockets ----------------------------------------------------------------------


def associate_rq(calling: str = "FUZZ_RAW") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = NODE_AE
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


VALID_RQ = associate_rq()


@st.composite
def pdus(draw: st.DrawFn) -> bytes:
    """A PDU header with any type and a length that may not match the body."""
    pdu_type = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7]) | st.integers(0, 255))
    body = draw(st.binary(max_size=256))
    length = draw(st.sampled_from([len(body), 0xFFFFFFFF, 0]) | st.integers(0, 0xFFFFFFFF))
    return struct.pack(">BBL", pdu_type, draw(st.integers(0, 255)), length) + body


@st.composite
def broken_rqs(draw: st.DrawFn) -> bytes:
    """The valid A-ASSOCIATE-RQ, truncated, overwritten, or with its length changed."""
    data = bytearray(VALID_RQ)
    choice = draw(st.sampled_from(["truncate", "overwrite", "length"]))
    if choice == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if choice == "overwrite":
        for _ in range(draw(st.integers(1, 6))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
        return bytes(data)
    struct.pack_into(">L", data, 2, draw(st.integers(0, 0xFFFFFFFF)))
    return bytes(data)


@st.composite
def after_association(draw: st.DrawFn) -> bytes:
    """A valid A-ASSOCIATE-RQ followed by malformed P-DATA-TF or other PDUs."""
    follow = draw(st.lists(pdus(), min_size=1, max_size=3))
    pdv_body = draw(st.binary(max_size=128))
    pdv = struct.pack(">LBB", draw(st.integers(0, 300)), draw(st.integers(0, 255)),
                      draw(st.integers(0, 255))) + pdv_body  # fmt: skip
    p_data = struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv
    return VALID_RQ + b"".join([p_data, *follow])


raw_inputs = st.one_of(st.binary(max_size=512), pdus(), broken_rqs(), after_association())


def read_answer(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection (or the timeout)."""
    sock.settimeout(ANSWER_TIMEOUT_S)
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    received = bytearray()
    while True:
        assert time.monotonic() < deadline, "connection neither answered nor closed in time"
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        except TimeoutError:
            raise AssertionError("connection neither answered nor closed in time") from None
        if not chunk:
            return bytes(received)
        received.extend(chunk)


def assert_well_formed(answer: bytes) -> None:
    position, types = 0, []
    while position < len(answer):
        assert len(answer) - position >= 6, f"truncated PDU header in {answer[:64]!r}"
        pdu_type, _, length = struct.unpack_from(">BBL", answer, position)
        assert pdu_type in ACCEPTOR_PDU_TYPES, f"PDU type 0x{pdu_type:02X} from an acceptor"
        assert position + 6 + length <= len(answer), "PDU shorter than its length field"
        types.append(pdu_type)
        position += 6 + length
    if types:
        assert types[0] in (0x02, 0x03, 0x07), f"first PDU 0x{types[0]:02X}"


def send_raw_bytes(target: Target, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", target.port), timeout=ANSWER_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # "that is all": no waiting for more
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node closed first; what it sent before is still checked
        return read_answer(sock)


@FUZZ_SETTINGS
@given(data=raw_inputs)
def test_malformed_pdus_get_a_clean_answer(target: Target, data: bytes) -> None:
    assert_well_formed(send_raw_bytes(target, data))
    assert_spool_consistent(target)
    assert_alive(target)


def test_valid_request_on_a_raw_socket_is_accepted(target: Target) -> None:
    """The seed of the PDU mutations really is an acceptable A-ASSOCIATE-RQ."""
    with socket.create_connection(("127.0.0.1", target.port), timeout=ANSWER_TIMEOUT_S) as sock:
        sock.sendall(VALID_RQ)
        header = sock.recv(6, socket.MSG_WAITALL)
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = sock.recv(length, socket.MSG_WAITALL)
    assert pdu_type == 0x02 and len(body) == length  # A-ASSOCIATE-AC


def test_no_association_is_left_behind(target: Target) -> None:
    """After the fuzzing, every association thread ends (within the ACSE timeout)."""
    deadline = time.monotonic() + 3 * target.listener.settings.acse_timeout
    while target.listener.ae.active_associations:
        assert time.monotonic() < deadline, "association threads still running"
        time.sleep(0.2)
    assert_alive(target)
