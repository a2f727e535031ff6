"""DICOM dispatch against real peers: dcmtk storescp, plus in-process pynetdicom SCPs where
a test needs the peer to answer with a particular status or accept particular contexts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event

from dicom_node.dispatch import (
    DicomDestination,
    Hl7Destination,
    SendOutcome,
    destination_types,
    get_sender,
    parse_destination,
    register,
    registered_types,
)
from dicom_node.dispatch.base import (
    _REGISTRY,
    Delivers,
    DestinationBase,
    DestinationError,
    check_unique_names,
)
from dicom_node.dispatch.dicom import (
    MAX_CONTEXTS,
    DicomTarget,
    _describe,
    build_contexts,
    classify_status,
    echo,
    plan_batches,
    send_datasets,
)
from tests.support import free_port

STORESCP = "/usr/bin/storescp"
REPO = Path(__file__).resolve().parents[1]
OUR_AET = "CXR_AI"
PEER_AET = "STORESCP"


def dicom_dir() -> Path:
    """The shared real files (``CXR_DATA_DIR`` overrides); missing data fails, never skips."""
    root = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data"))
    assert (root / "dicom" / "manifest.csv").is_file(), f"shared DICOM data not found at {root}"
    return root / "dicom"


def destination(port: int, **extra: Any) -> DicomDestination:
    fields: dict[str, Any] = {
        "name": "peer",
        "ae_title": PEER_AET,
        "host": "127.0.0.1",
        "port": port,
        "timeout_s": 20,
    }
    return DicomDestination(**{**fields, **extra})


def listening(port: int) -> bool:
    """Is something listening on ``port``? Read from /proc, so that no probe connection
    reaches the single-process storescp (it would take it for a broken association)."""
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_listening(port: int, process: subprocess.Popen[bytes], limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "storescp exited early"
        if listening(port):
            return
        time.sleep(0.05)
    raise AssertionError(f"storescp not listening on port {port}")


StoreSCP = Callable[..., tuple[int, Path]]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """Start dcmtk storescp on a free loopback port with extra options; stop at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[int, Path]:
        assert Path(STORESCP).is_file(), "dcmtk storescp is not installed"
        port = free_port()
        out = tmp_path / f"scp-{port}"
        out.mkdir()
        command = [STORESCP, "-od", str(out), "-aet", PEER_AET, *options, str(port)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        wait_listening(port, process)
        return port, out

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def received(folder: Path) -> dict[str, pydicom.FileDataset]:
    """Files storescp wrote, by SOP Instance UID."""
    files = [pydicom.dcmread(path) for path in folder.iterdir() if path.is_file()]
    return {str(ds.SOPInstanceUID): ds for ds in files}


def make_sr(with_file_meta: bool = True) -> Dataset:
    """A small Basic Text SR built with pydicom, like the results writer produces."""
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "TEST-0001"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([concept])
    item.TextValue = "No finding above the operating threshold."
    ds.ContentSequence = DicomSequence([item])
    if with_file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def content(ds: Dataset) -> Dataset:
    """The data set without file meta, for content comparison across transfer syntaxes."""
    copy = Dataset()
    copy.update(ds)
    return copy


# ----------------------------------------------------------------- dcmtk storescp


def test_echo_succeeds(storescp: StoreSCP) -> None:
    port, _ = storescp()
    result = echo(destination(port), OUR_AET)
    assert result.success and result.status == 0x0000 and not result.warning


def test_real_files_and_sr_arrive_identical(storescp: StoreSCP) -> None:
    port, out = storescp("+xa")  # accept every transfer syntax
    folder = dicom_dir()
    paths = [
        folder / "dog-thorax-dx-lateral.dcm",
        folder / "siim-cr-jpegbaseline.dcm",
        folder / "nih-00000001_000-dx-sc.dcm",
    ]
    sr = make_sr()
    results = send_datasets(destination(port), [*paths, sr], OUR_AET)
    assert [r.success for r in results] == [True] * 4, results
    assert results[1].transfer_syntax == JPEGBaseline8Bit  # sent as is, not decompressed
    got = received(out)
    for path in paths:
        original = pydicom.dcmread(path)
        copy = got[str(original.SOPInstanceUID)]
        # PS3.5 §7.1.1: an odd-length value (the dog file's 8-bit Pixel Data) is padded
        padding = b"\0" if len(original.PixelData) % 2 else b""
        assert copy.PixelData == original.PixelData + padding
        assert (copy.pixel_array == original.pixel_array).all()
        del copy.PixelData, original.PixelData
        assert content(copy) == content(original)
    assert content(got[str(sr.SOPInstanceUID)]) == content(sr)
    assert [r.sop_instance_uid for r in results] == [
        *(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths),
        str(sr.SOPInstanceUID),
    ]


def test_jpeg_is_decompressed_for_an_uncompressed_only_peer(storescp: StoreSCP) -> None:
    port, out = storescp()  # default: uncompressed transfer syntaxes only
    path = dicom_dir() / "siim-cr-jpegbaseline.dcm"
    original = pydicom.dcmread(path)
    (result,) = send_datasets(destination(port), [original], OUR_AET)
    assert result.success, result
    assert UID(result.transfer_syntax or "") in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    copy = received(out)[str(original.SOPInstanceUID)]  # same instance UID kept
    assert not copy.file_meta.TransferSyntaxUID.is_compressed
    assert (copy.pixel_array == original.pixel_array).all()
    assert original.file_meta.TransferSyntaxUID == JPEGBaseline8Bit  # caller's copy untouched


def test_implicit_only_peer_gets_implicit_sr_and_sc(storescp: StoreSCP) -> None:
    port, out = storescp("+xi")  # accept Implicit VR Little Endian only
    sr = make_sr(with_file_meta=False)
    sc = dicom_dir() / "nih-00000001_000-dx-sc.dcm"
    results = send_datasets(destination(port), [sr, sc], OUR_AET)
    assert all(r.success for r in results), results
    assert {r.transfer_syntax for r in results} == {ImplicitVRLittleEndian}
    got = received(out)
    assert got[str(sr.SOPInstanceUID)].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert content(got[str(sr.SOPInstanceUID)]) == content(sr)
    assert "file_meta" not in sr.__dict__ or "TransferSyntaxUID" not in sr.file_meta


def test_closed_port_is_a_retryable_failure_not_an_exception() -> None:
    port = free_port()  # nothing listens there
    dest = destination(port, timeout_s=5)
    (result,) = send_datasets(dest, [make_sr()], OUR_AET)
    assert not result.success and result.retryable and result.category == "connection"
    checked = echo(dest, OUR_AET)
    assert not checked.success and checked.retryable and checked.category == "connection"


def test_unresolvable_host_is_a_retryable_failure() -> None:
    dest = destination(104, host="no-such-host.invalid", timeout_s=5)
    result = echo(dest, OUR_AET)
    assert not result.success and result.retryable and result.category == "connection"


def test_invalid_own_ae_title_is_a_result_not_an_exception() -> None:
    result = echo(destination(104), "AN_AE_TITLE_TOO_LONG")
    assert not result.success and result.category == "connection"


def test_rejected_association_is_retryable(storescp: StoreSCP) -> None:
    port, _ = storescp("--refuse")
    (result,) = send_datasets(destination(port), [make_sr()], OUR_AET)
    assert not result.success and result.retryable and result.category == "rejected"
    assert "rejected-permanent by service-user: no-reason-given" in result.message
    assert result.sop_instance_uid is not None


def test_silent_peer_times_out() -> None:
    with socket.socket() as server:  # accepts TCP (backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        dest = destination(server.getsockname()[1], timeout_s=1)
        result = echo(dest, OUR_AET)
    assert not result.success and result.retryable and result.category == "timeout"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's view of "not a uid"
def test_unreadable_input_fails_alone(storescp: StoreSCP, tmp_path: Path) -> None:
    port, _ = storescp()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    bad_uid = make_sr()
    bad_uid.SOPClassUID = "not a uid"
    inputs: list[Any] = [junk, Dataset(), bad_uid, make_sr()]
    results = send_datasets(destination(port), inputs, OUR_AET)
    assert [r.success for r in results] == [False, False, False, True]
    assert all(r.category == "invalid_input" and not r.retryable for r in results[:3])
    assert "is not a valid UID" in results[2].message


# ----------------------------------------------------------------- pynetdicom peers


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """An in-process SCP whose contexts and C-STORE handler each test chooses."""
    servers: list[Any] = []

    def start(
        handler: Callable[[Event], int], sop_classes: list[str], require_called_aet: bool = False
    ) -> int:
        ae = AE(ae_title=PEER_AET)
        ae.require_called_aet = require_called_aet
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        port = free_port()
        servers.append(
            ae.start_server(
                ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)]
            )
        )
        return port

    yield start
    for server in servers:
        server.shutdown()


def test_wrong_called_ae_title_is_rejected_and_explained(
    pynetdicom_scp: Callable[..., int],
) -> None:
    port = pynetdicom_scp(lambda event: 0x0000, [BasicTextSRStorage], require_called_aet=True)
    result = echo(destination(port, ae_title="NOT_THE_PEER"), OUR_AET)
    assert (result.success, result.retryable, result.category) == (False, True, "rejected")
    assert "called-AE-title-not-recognized" in result.message
    (stored,) = send_datasets(destination(port), [make_sr()], OUR_AET)
    assert stored.success, stored


def test_peer_statuses_are_classified(pynetdicom_scp: Callable[..., int]) -> None:
    answers = [0xA700, 0xB000, 0xC000, 0xA900, 0x0000]
    datasets = [make_sr() for _ in answers]
    by_uid = {str(ds.SOPInstanceUID): code for ds, code in zip(datasets, answers, strict=True)}
    port = pynetdicom_scp(
        lambda event: by_uid[str(event.request.AffectedSOPInstanceUID)], [BasicTextSRStorage]
    )
    results = send_datasets(destination(port), datasets, OUR_AET)
    summary = [(r.status, r.success, r.warning, r.retryable) for r in results]
    assert summary == [
        (0xA700, False, False, True),  # out of resources: try again later
        (0xB000, True, True, False),  # coercion of data elements: stored
        (0xC000, False, False, False),  # cannot understand: permanent
        (0xA900, False, False, False),  # does not match SOP class: permanent
        (0x0000, True, False, False),
    ]


def test_unsupported_sop_class_is_permanent_for_that_object_only(
    pynetdicom_scp: Callable[..., int],
) -> None:
    port = pynetdicom_scp(lambda event: 0x0000, [ComputedRadiographyImageStorage])
    cr = dicom_dir() / "rg2-hip-cr-jpegextended.dcm"
    results = send_datasets(destination(port), [make_sr(), cr], OUR_AET)
    assert (results[0].success, results[0].retryable, results[0].category) == (
        False,
        False,
        "no_context",
    )
    assert results[1].success, results[1]


def test_peer_accepting_nothing_is_permanent(pynetdicom_scp: Callable[..., int]) -> None:
    port = pynetdicom_scp(lambda event: 0x0000, [ComputedRadiographyImageStorage])
    (result,) = send_datasets(destination(port), [make_sr()], OUR_AET)
    assert (result.success, result.retryable, result.category) == (False, False, "no_context")


# ----------------------------------------------------------------- contexts, statuses


def test_contexts_offer_own_syntax_apart_from_uncompressed() -> None:
    jpeg = pydicom.dcmread(dicom_dir() / "siim-cr-jpegbaseline.dcm", stop_before_pixels=True)
    items = [_describe(jpeg), _describe(make_sr())]
    contexts = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in build_contexts(items)}
    sc = str(jpeg.SOPClassUID)
    assert contexts == {
        (sc, (JPEGBaseline8Bit,)),
        (sc, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        (BasicTextSRStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    }


def test_implicit_data_propose_their_own_syntax_first() -> None:
    sc = pydicom.dcmread(dicom_dir() / "nih-00000001_000-dx-sc.dcm", stop_before_pixels=True)
    (context,) = build_contexts([_describe(sc)])
    assert context.transfer_syntax == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]


def test_never_more_than_128_contexts_per_association() -> None:
    datasets = []
    for index in range(MAX_CONTEXTS + 30):
        ds = make_sr()
        ds.SOPClassUID = f"1.2.826.0.1.3680043.10.1234.{index}"
        datasets.append(ds)
    batches = plan_batches([_describe(ds) for ds in datasets])
    assert len(batches) == 2
    assert sum(len(batch) for batch in batches) == len(datasets)
    assert all(len(build_contexts(batch)) <= MAX_CONTEXTS for batch in batches)


@pytest.mark.parametrize(
    ("code", "success", "warning", "retryable"),
    [
        (0x0000, True, False, False),
        (0xB000, True, True, False),
        (0xB006, True, True, False),
        (0xB007, True, True, False),
        (0xA700, False, False, True),
        (0xA7FF, False, False, True),
        (0xA900, False, False, False),
        (0xA9FF, False, False, False),
        (0xC000, False, False, False),
        (0xCFFF, False, False, False),
        (0x0110, False, False, True),
        (0x0213, False, False, True),
        (0x0122, False, False, False),
        (0x0124, False, False, False),
        (0x1234, False, False, False),
    ],
)
def test_classify_status(code: int, success: bool, warning: bool, retryable: bool) -> None:
    status = classify_status(code)
    assert (status.success, status.warning, status.retryable) == (success, warning, retryable)


# ----------------------------------------------------------------- destinations, registry


def test_destination_from_toml_table() -> None:
    dest = parse_destination(
        {
            "name": "pacs",
            "ae_title": " PACS ",
            "host": "pacs.local",
            "port": 104,
            "dimse_timeout_s": 300,
        }
    )
    assert isinstance(dest, DicomDestination) and dest.delivers == "objects"
    assert (dest.type, dest.ae_title, dest.calling_ae_title) == ("dicom", "PACS", None)
    assert (dest.timeout("dimse"), dest.timeout("acse")) == (300, 30)
    assert dest.peer == "PACS@pacs.local:104"
    assert isinstance(get_sender(dest.type), DicomTarget)


def test_each_type_has_its_model_and_says_what_it_delivers() -> None:
    ris = parse_destination({"name": "ris", "type": "hl7", "host": "ris", "port": 2575})
    assert isinstance(ris, Hl7Destination) and ris.delivers == "study_events"
    assert destination_types() == ("dicom", "hl7", "dicomweb")
    assert (DicomDestination.delivers, Hl7Destination.delivers) == ("objects", "study_events")
    assert "delivers" not in ris.model_dump()


def test_capped_lowers_every_timeout_of_the_type() -> None:
    dest = destination(104, timeout_s=30, dimse_timeout_s=1)
    short = dest.capped(2)
    assert [short.timeout(w) for w in ("acse", "dimse", "network", "connect")] == [2, 1, 2, 2]
    assert dest.timeout("acse") == 30  # a copy
    ris = Hl7Destination(name="ris", host="ris", port=2575).capped(2)
    assert (ris.timeout("network"), ris.timeout("connect")) == (2, 2)


def _where(loc: tuple[int | str, ...]) -> str:
    """The key as in the file: without the union member pydantic adds (``dicom.port``)."""
    parts = [str(part) for part in loc]
    return ".".join(parts[1:] if parts[:1] and parts[0] in destination_types() else parts)


@pytest.mark.parametrize(
    ("table", "where", "message"),
    [
        ({"name": "p", "host": "h", "port": 104}, "ae_title", "Field required"),
        ({"name": "p", "ae_title": "A", "port": 104}, "host", "Field required"),
        (
            {"name": "p", "type": "s3", "ae_title": "A", "host": "h", "port": 1},
            "",
            "type: unknown destination type 's3' (known: dicom, hl7, dicomweb)",
        ),
        ({"name": "p", "ae_title": "X" * 17, "host": "h", "port": 1}, "ae_title", "1 to 16"),
        ({"name": "p", "ae_title": "A", "host": "h", "port": 0}, "port", "greater than"),
        ({"name": "*", "ae_title": "A", "host": "h", "port": 1}, "name", "blank or '*'"),
        (
            {
                "name": "p",
                "ae_title": "A",
                "host": "h",
                "port": 1,
                "tls": {"enabled": True, "ca_file": "/nonexistent/ca.pem"},
            },
            "tls",
            "ca_file: file not found: /nonexistent/ca.pem",
        ),
        (
            {"name": "p", "ae_title": "A", "host": "h", "port": 1, "aetitle": "B"},
            "aetitle",
            "Extra inputs",
        ),
        (
            {"name": "p", "type": "dicom", "ae_title": "A", "host": "h", "port": 1, "x": 1},
            "x",
            "Extra inputs",
        ),
        # keys of another type are not keys of this one
        (
            {"name": "r", "type": "hl7", "host": "h", "port": 1, "ae_title": "A"},
            "ae_title",
            "Extra inputs",
        ),
        (
            {"name": "r", "type": "hl7", "host": "h", "port": 1, "tls": {"enabled": True}},
            "tls",
            "Extra inputs",
        ),
        (
            {"name": "r", "type": "hl7", "host": "h", "port": 1, "dimse_timeout_s": 5},
            "dimse_timeout_s",
            "Extra inputs",
        ),
        (
            {"name": "p", "ae_title": "A", "host": "h", "port": 1, "sending_facility": "H"},
            "sending_facility",
            "Extra inputs",
        ),
    ],
)
def test_invalid_destination_names_the_key(table: dict[str, Any], where: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_destination(table)
    errors = [(_where(e["loc"]), e["msg"]) for e in info.value.errors()]
    assert any(loc == where and message in msg for loc, msg in errors), errors


def test_destination_names_are_unique() -> None:
    first = destination(104)
    check_unique_names([first, destination(104, name="other")])
    with pytest.raises(DestinationError, match=r"destinations.1.name: destination 'peer' is used"):
        check_unique_names([first, first])


def test_registry_adds_a_target_type() -> None:
    class NullDestination(DestinationBase):
        delivers: ClassVar[Delivers] = "objects"
        type: Literal["null"] = "null"

    class NullTarget:
        def send(
            self, destination: NullDestination, items: Any, our_ae_title: str
        ) -> list[SendOutcome]:
            return [SendOutcome(True, None, False, "dropped", "success") for _ in items]

        def check(self, destination: NullDestination, our_ae_title: str) -> SendOutcome:
            return SendOutcome(True, None, False, "ok", "success")

    register("null", NullTarget())
    try:
        dest = NullDestination(name="bin")
        assert "null" in registered_types()
        assert get_sender(dest.type).send(dest, [make_sr()], OUR_AET)[0].success
    finally:
        _REGISTRY.pop("null")
    with pytest.raises(KeyError, match="unknown destination type 'null'"):
        get_sender("null")
