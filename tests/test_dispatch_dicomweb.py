"""The dicomweb destination type against a scripted STOW-RS server on loopback.

The server (:class:`StowServer`) is a real HTTP/1.1 server: it parses every multipart
request back into PS3.10 files, counts TCP connections and answers as each test scripts
it, so these tests see what travels on the wire — batching, connection reuse, headers,
timeouts, dropped connections — and how every answer of PS3.18 10.5.3 is classified.
The end-to-end counterpart against Orthanc's DICOMweb plugin is
``tests/e2e/test_dicomweb_e2e.py``.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.config import describe_error
from dicom_node.dispatch import (
    DicomwebDestination,
    SendOutcome,
    get_sender,
    parse_destination,
    registered_types,
)
from dicom_node.dispatch.dicomweb import DicomwebTarget, check, send_objects
from tests.support import free_port
from tests.tls_support import make_pki

REPO_ROOT = Path(__file__).resolve().parents[1]
Reply = tuple[int, dict[str, str], bytes]


# --------------------------------------------------------------------------- server


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    files: list[bytes] = field(default_factory=list)

    @property
    def uids(self) -> list[str]:
        return [str(pydicom.dcmread(BytesIO(f)).SOPInstanceUID) for f in self.files]


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (RFC 2046), headers checked, bytes as sent."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    sections = body.split(b"--" + boundary)
    assert sections[0] == b"" and sections[-1] == b"--\r\n", "malformed multipart framing"
    files = []
    for section in sections[1:-1]:
        head, _, payload = section.partition(b"\r\n\r\n")
        assert head.strip() == b"Content-Type: application/dicom", head
        assert payload.endswith(b"\r\n")
        files.append(payload[:-2])
    return files


def stored(*uids: str, warnings: dict[str, int] | None = None) -> dict[str, Any]:
    """A Store Instances Response listing ``uids`` as stored."""
    items = []
    for uid in uids:
        item: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [ComprehensiveSRStorage]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }
        if warnings and uid in warnings:
            item["00081196"] = {"vr": "US", "Value": [warnings[uid]]}
        items.append(item)
    return {"00081199": {"vr": "SQ", "Value": items}} if items else {}


def failed(reasons: dict[str, int | None]) -> dict[str, Any]:
    items = []
    for uid, reason in reasons.items():
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {"00081198": {"vr": "SQ", "Value": items}}


def reply(status: int, answer: dict[str, Any] | None = None, **headers: str) -> Reply:
    body = json.dumps(answer).encode() if answer is not None else b""
    hdrs = {"Content-Type": "application/dicom+json", **headers}
    return status, {k.replace("_", "-"): v for k, v in hdrs.items()}, body


def store_all(request: Request) -> Reply:
    return reply(200, stored(*request.uids))


class StowServer:
    """A STOW-RS endpoint at ``/dicom-web/studies``, answering with ``self.respond``."""

    def __init__(self, respond: Callable[[Request], Reply] = store_all, tls: Any = None):
        self.respond = respond
        self.requests: list[Request] = []
        self.connections = 0
        self.drop = False  # close the connection instead of answering
        self.stall_s = 0.0  # wait this long before answering
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server.connections += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(self.command, self.path, dict(self.headers.items()), body)
                if body:
                    request.files = parse_multipart(self.headers["Content-Type"], body)
                server.requests.append(request)
                if server.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                time.sleep(server.stall_s)
                status, headers, payload = server.respond(request)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = _handle  # noqa: N815
            do_GET = _handle  # noqa: N815

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self.port}/dicom-web"

    def __enter__(self) -> StowServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[StowServer]:
    with StowServer() as running:
        yield running


def destination(url: str, **settings: Any) -> DicomwebDestination:
    table = {"name": "archive", "type": "dicomweb", "url": url, "timeout_s": 5, **settings}
    made = parse_destination(table)
    assert isinstance(made, DicomwebDestination)
    return made


def sr(number: int = 1) -> Dataset:
    """A small SR-class data set with its own UIDs (the server only needs them)."""
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.PatientID = "PHI-DW-77"
    ds.Modality = "SR"
    ds.InstanceNumber = number
    return ds


def uid(ds: Dataset) -> str:
    return str(ds.SOPInstanceUID)


def written(ds: Dataset, folder: Path) -> Path:
    path = folder / f"{uid(ds)}.dcm"
    copy = Dataset(ds)
    copy.file_meta = FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy.save_as(path, enforce_file_format=True)
    return path


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --------------------------------------------------------------------------- sending


def test_batches_share_one_connection_and_carry_ps310_files(
    server: StowServer, tmp_path: Path
) -> None:
    datasets = [sr(i) for i in range(7)]
    items: list[Any] = [written(d, tmp_path) for d in datasets[:4]] + datasets[4:]
    outcomes = send_objects(destination(server.url, batch_size=3), items)
    assert [o.success for o in outcomes] == [True] * 7
    assert [o.sop_instance_uid for o in outcomes] == [uid(d) for d in datasets]
    assert len(server.requests) == 3 and server.connections == 1
    assert [len(r.files) for r in server.requests] == [3, 3, 1]
    first = server.requests[0]
    assert (first.method, first.path) == ("POST", "/dicom-web/studies")
    content_type = first.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert first.headers["Accept"] == "application/dicom+json"
    assert "Transfer-Encoding" not in first.headers
    assert int(first.headers["Content-Length"]) == len(first.body)
    assert first.files[0] == items[0].read_bytes()  # the spool file, byte for byte
    assert first.files[0][128:132] == b"DICM"
    assert [u for r in server.requests for u in r.uids] == [uid(d) for d in datasets]


def test_the_caller_keeps_its_data_set_unchanged(server: StowServer) -> None:
    ds = sr()
    assert send_objects(destination(server.url), [ds])[0].success
    assert "file_meta" not in ds.__dict__ or not ds.file_meta.get("TransferSyntaxUID")


def test_unreadable_objects_fail_alone_and_permanently(server: StowServer, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    missing = tmp_path / "missing.dcm"
    good = sr()
    outcomes = send_objects(destination(server.url), [junk, good, missing])
    assert [o.success for o in outcomes] == [False, True, False]
    for bad in (outcomes[0], outcomes[2]):
        assert bad.category == "invalid_input" and not bad.retryable
    assert server.requests[0].uids == [uid(good)]


def test_202_each_object_as_the_response_says(server: StowServer) -> None:
    a, b, c, d, e = (sr(i) for i in range(5))
    server.respond = lambda request: reply(
        202,
        {
            **stored(uid(a), uid(b), warnings={uid(b): 0xB000}),
            **failed({uid(c): 0xA700, uid(d): 0x0122}),
        },
    )
    oa, ob, oc, od, oe = send_objects(destination(server.url), [a, b, c, d, e])
    assert oa.success and not oa.warning
    assert ob.success and ob.warning and ob.status == 0xB000
    assert not oc.success and oc.retryable and oc.status == 0xA700  # out of resources
    assert not od.success and not od.retryable and od.status == 0x0122  # SOP class refused
    assert "0x0122" in od.message
    assert not oe.success and oe.retryable  # not mentioned: try again


def test_409_decides_by_the_failure_reason(server: StowServer) -> None:
    a, b, c = sr(1), sr(2), sr(3)
    server.respond = lambda request: reply(409, failed({uid(a): 0xA900, uid(b): 0x0110}))
    oa, ob, oc = send_objects(destination(server.url), [a, b, c])
    assert (oa.retryable, ob.retryable, oc.retryable) == (False, True, False)
    assert not any(o.success for o in (oa, ob, oc))
    assert oa.status == 0xA900 and oc.status is None


def test_objects_stored_despite_an_error_status_are_successes(server: StowServer) -> None:
    """Orthanc answers 400 when one part is unreadable, listing the others as stored."""
    a, b = sr(1), sr(2)
    server.respond = lambda request: reply(400, stored(uid(a)))
    oa, ob = send_objects(destination(server.url), [a, b])
    assert oa.success
    assert not ob.success and not ob.retryable


@pytest.mark.parametrize(
    "status,retryable",
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (408, True),
        (429, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (415, False),
        (302, False),
    ],
)
def test_http_status_without_details(server: StowServer, status: int, retryable: bool) -> None:
    server.respond = lambda request: reply(status, None, Location="http://elsewhere/")
    (outcome,) = send_objects(destination(server.url), [sr()])
    assert not outcome.success
    assert outcome.retryable is retryable
    assert f"HTTP {status}" in outcome.message
    assert outcome.category == "status"


def test_a_short_retry_after_is_waited_for_and_the_request_repeated(server: StowServer) -> None:
    answers = iter([reply(429, None, Retry_After="2"), None])

    def respond(request: Request) -> Reply:
        scripted = next(answers)
        return scripted if scripted is not None else store_all(request)

    server.respond = respond
    sleeps = Sleeps()
    (outcome,) = send_objects(destination(server.url), [sr()], sleep=sleeps)
    assert outcome.success
    assert sleeps == [2.0] and len(server.requests) == 2


def test_a_long_retry_after_is_returned_to_the_outbox(server: StowServer) -> None:
    server.respond = lambda request: reply(503, None, Retry_After="120")
    sleeps = Sleeps()
    (outcome,) = send_objects(destination(server.url), [sr()], sleep=sleeps)
    assert not outcome.success and outcome.retryable
    assert outcome.retry_after_s == 120.0 and "retry after 120 s" in outcome.message
    assert sleeps == [] and len(server.requests) == 1


def test_retry_after_as_an_http_date(server: StowServer) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=300), usegmt=True)
    server.respond = lambda request: reply(429, None, Retry_After=later)
    (outcome,) = send_objects(destination(server.url), [sr()], sleep=Sleeps())
    assert outcome.retry_after_s is not None and 250 < outcome.retry_after_s <= 300


def test_too_large_batches_are_split_down_to_single_objects(server: StowServer) -> None:
    def respond(request: Request) -> Reply:
        if len(request.files) > 1:
            return reply(413, None)
        return store_all(request)

    server.respond = respond
    items = [sr(i) for i in range(4)]
    outcomes = send_objects(destination(server.url, batch_size=4), items)
    assert all(o.success for o in outcomes)
    assert [len(r.files) for r in server.requests] == [4, 2, 1, 1, 2, 1, 1]
    assert server.connections == 1


def test_a_single_object_too_large_is_permanent(server: StowServer) -> None:
    server.respond = lambda request: reply(413, None)
    (outcome,) = send_objects(destination(server.url), [sr()])
    assert not outcome.success and not outcome.retryable


def test_no_server_is_retryable_and_not_tried_again_for_the_rest() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    outcomes = send_objects(destination(url, batch_size=2), [sr(i) for i in range(5)])
    assert all(not o.success and o.retryable for o in outcomes)
    assert {o.category for o in outcomes} == {"connection"}
    assert outcomes[0].message.startswith("cannot connect to")
    assert all(o.message.startswith("not attempted") for o in outcomes[2:])


def test_a_dropped_connection_is_retried(server: StowServer) -> None:
    server.drop = True
    outcomes = send_objects(destination(server.url, batch_size=1), [sr(1), sr(2)])
    assert [o.category for o in outcomes] == ["aborted", "aborted"]
    assert all(o.retryable for o in outcomes)
    assert len(server.requests) == 1  # the second batch waits for the next round


def test_no_answer_in_time_is_retried(server: StowServer) -> None:
    server.stall_s = 2.0
    started = time.monotonic()
    (outcome,) = send_objects(destination(server.url, network_timeout_s=0.5), [sr()])
    assert outcome.category == "timeout" and outcome.retryable
    assert time.monotonic() - started < 1.9


# --------------------------------------------------------------------------- auth and TLS


def test_bearer_token_from_a_file_is_read_for_every_send(
    server: StowServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    target = destination(server.url, auth={"type": "bearer", "token_file": str(token)})
    assert send_objects(target, [sr()])[0].success
    token.write_text("rotated-token")
    outcome = send_objects(target, [sr()])[0]
    assert outcome.success
    assert [r.headers["Authorization"] for r in server.requests] == [
        "Bearer first-token",
        "Bearer rotated-token",
    ]
    assert "token" not in outcome.message


def test_basic_credentials_from_an_environment_variable(
    server: StowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_TEST_STOW_PASSWORD", "s3cr:et")
    auth = {"type": "basic", "username": "cxr-node", "password_env": "CXR_TEST_STOW_PASSWORD"}
    assert send_objects(destination(server.url, auth=auth), [sr()])[0].success
    expected = base64.b64encode(b"cxr-node:s3cr:et").decode()
    assert server.requests[0].headers["Authorization"] == f"Basic {expected}"


def test_a_secret_gone_since_loading_fails_the_send_without_leaking(
    server: StowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_TEST_STOW_TOKEN", "abc")
    target = destination(server.url, auth={"type": "bearer", "token_env": "CXR_TEST_STOW_TOKEN"})
    monkeypatch.delenv("CXR_TEST_STOW_TOKEN")
    (outcome,) = send_objects(target, [sr()])
    assert not outcome.success and outcome.retryable
    assert "CXR_TEST_STOW_TOKEN" in outcome.message and server.requests == []


def test_https_verified_against_the_configured_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    with StowServer(tls=tls) as running:
        trusted = destination(running.url, ca_file=str(pki.ca))
        assert send_objects(trusted, [sr()])[0].success
        untrusted = destination(running.url, ca_file=str(pki.other_ca))
        (outcome,) = send_objects(untrusted, [sr()])
        assert not outcome.success and outcome.category == "connection"
        assert len(running.requests) == 1


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize(
    "status,success,warning",
    [(200, True, False), (204, True, False), (404, True, True), (401, False, False)],
)
def test_check_asks_qido(server: StowServer, status: int, success: bool, warning: bool) -> None:
    server.respond = lambda request: reply(status, [] if status == 200 else None)  # type: ignore[arg-type]
    outcome = check(destination(server.url))
    assert (outcome.success, outcome.warning) == (success, warning)
    request = server.requests[0]
    assert (request.method, request.path) == ("GET", "/dicom-web/studies?limit=1")


def test_check_without_server() -> None:
    outcome = check(destination(f"http://127.0.0.1:{free_port()}/dicom-web"))
    assert not outcome.success and outcome.category == "connection" and outcome.retryable


# --------------------------------------------------------------------------- configuration


def test_registered_as_an_objects_destination(server: StowServer) -> None:
    assert "dicomweb" in registered_types()
    assert isinstance(get_sender("dicomweb"), DicomwebTarget)
    target = destination(server.url + "/")
    assert target.delivers == "objects"
    assert target.url == server.url and target.stow_url == server.url + "/studies"
    assert target.peer == server.url
    outcomes: list[SendOutcome] = get_sender("dicomweb").send(target, [sr()], "CXR_AI")
    assert outcomes[0].success


def test_timeouts_and_reachability_caps() -> None:
    target = destination("http://pacs:8042/dicom-web", timeout_s=30, connect_timeout_s=3)
    assert (target.timeout("connect"), target.timeout("network")) == (3, 30)
    capped = target.capped(2.0)
    assert (capped.timeout("connect"), capped.timeout("network")) == (2, 2)


@pytest.mark.parametrize(
    "settings,key,reason",
    [
        ({"url": "ftp://pacs/dicom-web"}, "url", "http:// or https://"),
        ({"url": "https://user:pw@pacs/dicom-web"}, "url", "credentials do not belong"),
        ({"url": "https://pacs/dicom-web?x=1"}, "url", "query"),
        ({"auth": {"type": "bearer"}}, "token_file", "required"),
        ({"auth": {"type": "bearer", "token": "inline"}}, "token", "not written"),
        ({"auth": {"type": "basic", "username": "u", "password": "inline"}}, "password", "_env"),
        ({"auth": {"type": "basic", "password_env": "X"}}, "username", "required"),
        ({"auth": {"type": "none", "token_env": "X"}}, "token_file", "not used"),
        (
            {"auth": {"type": "bearer", "token_env": "CXR_TEST_UNSET_VARIABLE"}},
            "token_env",
            "not set",
        ),
        ({"auth": {"type": "bearer", "token_file": "/nonexistent/t"}}, "token_file", "cannot"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "cannot load"),
        ({"batch_size": 0}, "batch_size", "greater than"),
        ({"ae_title": "PACS"}, "ae_title", "Extra inputs"),
    ],
)
def test_configuration_errors(settings: dict[str, Any], key: str, reason: str) -> None:
    table = {"name": "archive", "type": "dicomweb", "url": "https://pacs/dicom-web", **settings}
    with pytest.raises(ValidationError) as caught:
        parse_destination(table)
    text = str(caught.value)
    assert key in text and reason in text, text
    assert "inline" not in describe_error(caught.value, None)  # a secret is not echoed back


def test_both_file_and_variable_is_an_error(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("x")
    auth = {"type": "bearer", "token_file": str(token), "token_env": "HOME"}
    with pytest.raises(ValidationError, match="not both"):
        destination("https://pacs/dicom-web", auth=auth)


def test_validating_a_configuration_does_not_import_httpx() -> None:
    code = (
        "import sys, dicom_node.dispatch; "
        "dicom_node.dispatch.parse_destination("
        "{'name': 'w', 'type': 'dicomweb', 'url': 'https://pacs/dicom-web'}); "
        "print('httpx' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
