"""DICOMweb destinations: STOW-RS "Store Instances" (PS3.18 10.5) with httpx.

Its configuration (URL, authentication, CA file, batch size, timeouts) is
:class:`~dicom_node.dispatch.dicomweb_config.DicomwebDestination`.

How a batch is sent:

* **One HTTP connection per call** of :func:`send_objects`: a persistent ``httpx.Client``
  (keep-alive) carries every request of the call, so a batch costs one TCP (and TLS)
  setup, not one per object. Proxies and CA bundles from the environment are ignored
  (``trust_env=False``): where patient data goes is the configuration's business alone.
* **One request per** ``batch_size`` **objects**: ``POST {url}/studies`` with a
  ``multipart/related; type="application/dicom"`` body, one PS3.10 file per part,
  streamed from the spool with its Content-Length known in advance, answered in
  ``application/dicom+json``.
* **The answer decides, per object** (PS3.18 10.5.3). An object the Store Instances
  Response lists is taken as it says, whatever the HTTP status: in the Referenced SOP
  Sequence it was stored (with a warning when it has a Warning Reason); in the Failed
  SOP Sequence its Failure Reason is classified as a C-STORE status
  (:func:`~dicom_node.dispatch.dicom.classify_status`: 0xA7xx out of resources and
  0x0110 processing failure are retried; 0x0122 SOP class not supported, 0xA9xx and
  0xCxxx are permanent). An object it does not list gets the status's outcome:

  - 200: stored; 202 (some stored, some not): retried;
  - 409 (nothing stored) without a reason for the object: permanent;
  - 408, 429, 5xx, timeouts, refused or dropped connections: retried. A 429 or 503 with
    a Retry-After of at most ``retry_after_max_wait_s`` is waited for and the request
    repeated once; a longer one is returned in ``SendOutcome.retry_after_s``;
  - 413: the batch is split in halves and each half sent again, down to single objects;
  - any other 4xx (400, 401, 403, 404, 415…) and redirects: permanent — the same request
    will get the same answer until someone changes the configuration or the server.

  After a connection failure, a timeout or a dropped connection the remaining batches of
  the call get the same outcome without another attempt: the server is down for them too,
  and each try would cost a timeout.
* **Failures are returned, never raised.** Messages name HTTP statuses, failure reason
  codes and UIDs, never the server's free text (it may quote the patient) nor the
  credentials.
"""

from __future__ import annotations

import copy
import email.utils
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.dispatch.base import Category, Sendable, SendOutcome, register
from dicom_node.dispatch.base import failure as _failure
from dicom_node.dispatch.dicom import classify_status
from dicom_node.dispatch.dicomweb_config import DicomwebDestination, SecretError
from dicom_node.logs import get_logger

log = get_logger(__name__)

DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20
# Store Instances Response Module (PS3.18 Table 10.5.3-2), as DICOM JSON keys.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
STOP_CATEGORIES = frozenset({"connection", "timeout", "aborted"})


@dataclass
class _Part:
    """One object of a request, described before its bytes are read."""

    source: Sendable
    sop_instance_uid: str | None
    size: int
    data: bytes | None = None  # in-memory objects; files are streamed from disk
    error: SendOutcome | None = None

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert not isinstance(self.source, Dataset)
        with Path(self.source).open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk


def _describe(source: Sendable) -> _Part:
    """SOP Instance UID and size; a data set is encoded now, a file only opened later."""
    try:
        if isinstance(source, Dataset):
            data = _encode(source)
            return _Part(source, str(source.SOPInstanceUID), len(data), data)
        path = Path(source)
        with path.open("rb") as fh:
            fh.seek(128)
            if fh.read(4) != b"DICM":
                raise ValueError("not a PS3.10 file (no DICM prefix)")
        uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        return _Part(source, uid, path.stat().st_size)
    except Exception as exc:  # unreadable input is this item's permanent failure
        part = _Part(source, None, 0)
        part.error = _failure("invalid_input", f"cannot read object: {_brief(exc)}", False)
        return part


def _encode(dataset: Dataset) -> bytes:
    """PS3.10 bytes; a data set without a transfer syntax is written Explicit VR LE."""
    meta = getattr(dataset, "file_meta", None)
    if meta is None or not meta.get("TransferSyntaxUID"):
        dataset = copy.copy(dataset)  # file_meta is the copy's own, not the caller's
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# --------------------------------------------------------------------------- request


class _Body:
    """A multipart/related body (RFC 2387) that can be streamed more than once."""

    def __init__(self, parts: Sequence[_Part]) -> None:
        self.parts = parts
        self.boundary = f"cxr-ai-node-{uuid.uuid4().hex}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    @property
    def length(self) -> int:
        framing = len(self._head) + 2  # part head, CRLF before the next delimiter
        return sum(part.size + framing for part in self.parts) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            yield self._head
            yield from part.chunks()
            yield b"\r\n"
        yield self._tail


def _client(destination: DicomwebDestination) -> httpx.Client:
    network = destination.timeout("network")
    return httpx.Client(
        timeout=httpx.Timeout(network, connect=destination.timeout("connect")),
        verify=destination.ssl_context(),
        trust_env=False,
        follow_redirects=False,
        headers={"Accept": DICOM_JSON, "User-Agent": "cxr-ai-node"},
    )


def _headers(destination: DicomwebDestination) -> dict[str, str]:
    auth = destination.auth.header()
    return {} if auth is None else {"Authorization": auth}


# --------------------------------------------------------------------------- STOW-RS


def send_objects(
    destination: DicomwebDestination,
    items: Iterable[Sendable],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[SendOutcome]:
    """STOW-RS every object to the destination; one outcome per item, in order.

    Never raises on network or server errors (see the module docstring).
    """
    parts = [_describe(item) for item in items]
    outcomes: dict[int, SendOutcome] = {id(p): p.error for p in parts if p.error is not None}
    readable = [p for p in parts if p.error is None]
    batches = [
        readable[i : i + destination.batch_size]
        for i in range(0, len(readable), destination.batch_size)
    ]
    stopped: SendOutcome | None = None
    if batches:
        try:
            headers = _headers(destination)
        except SecretError as exc:  # a secret file removed or a variable unset since loading
            stopped = _failure("rejected", f"credentials unavailable: {exc}", True)
            headers = {}
        with _client(destination) as client:
            for batch in batches:
                if stopped is None:
                    batch_outcomes = _store(client, destination, batch, headers, sleep)
                    outcomes.update(batch_outcomes)
                    stopped = _stop_reason(batch_outcomes.values())
                else:
                    outcomes.update({id(p): _for_part(stopped, p) for p in batch})
    ordered = [outcomes[id(p)] for p in parts]
    _log_summary(destination, ordered)
    return ordered


def _stop_reason(outcomes: Iterable[SendOutcome]) -> SendOutcome | None:
    for outcome in outcomes:
        if not outcome.success and outcome.category in STOP_CATEGORIES:
            return SendOutcome(
                success=False,
                status=None,
                retryable=True,
                message=f"not attempted: {outcome.message}",
                category=outcome.category,
                retry_after_s=outcome.retry_after_s,
            )
    return None


def _store(
    client: httpx.Client,
    destination: DicomwebDestination,
    batch: Sequence[_Part],
    headers: dict[str, str],
    sleep: Callable[[float], None],
) -> dict[int, SendOutcome]:
    """One STOW-RS request for ``batch`` (repeated once after a short Retry-After, split
    after a 413); the outcome of each part by ``id``."""
    waited = False
    while True:
        body = _Body(batch)
        try:
            response = client.post(
                destination.stow_url,
                content=iter(body),
                headers={
                    **headers,
                    "Content-Type": body.content_type,
                    "Content-Length": str(body.length),
                },
            )
        except httpx.HTTPError as exc:
            return _all(batch, _transport_failure(destination, exc))
        except OSError as exc:  # a spool file vanished between describing and sending
            return _all(
                batch, _failure("invalid_input", f"cannot read object: {_brief(exc)}", True)
            )
        status = response.status_code
        if status == 413 and len(batch) > 1:
            half = len(batch) // 2
            first = _store(client, destination, batch[:half], headers, sleep)
            return first | _store(client, destination, batch[half:], headers, sleep)
        retry_after = _retry_after(response)
        if (
            status in (429, 503)
            and not waited
            and retry_after is not None
            and retry_after <= destination.retry_after_max_wait_s
        ):
            waited = True
            sleep(retry_after)
            continue
        return _decide(destination, batch, response, retry_after)


def _decide(
    destination: DicomwebDestination,
    batch: Sequence[_Part],
    response: httpx.Response,
    retry_after: float | None,
) -> dict[int, SendOutcome]:
    """Each part as the Store Instances Response lists it, else as the status says.

    The response is read whatever the status: a server may list the objects it did store
    beside an error status (Orthanc's plugin answers 400 with the stored ones in the
    Referenced SOP Sequence when another part of the request was unreadable), and those
    must not be retried or dead-lettered.
    """
    answer = _parse_answer(response)
    default = _status_outcome(destination, response, retry_after)
    return {id(p): _for_part(answer.get(p.sop_instance_uid or "", default), p) for p in batch}


def _status_outcome(
    destination: DicomwebDestination, response: httpx.Response, retry_after: float | None
) -> SendOutcome:
    """The outcome of an object the response does not mention, from the HTTP status."""
    status = response.status_code
    where = f"HTTP {status} from {destination.peer}"
    if status in (200, 204):
        return SendOutcome(True, None, False, f"stored ({where})", "success")
    if status == 202:
        return _failure("status", f"{where}: object not acknowledged", True)
    if status == 409:
        return _failure("status", f"{where}: conflict, no failure reason given", False)
    if status in RETRY_STATUSES or 500 <= status <= 599:
        outcome = _failure("status", where + _after(retry_after), True)
        return _with_retry_after(outcome, retry_after)
    if 300 <= status <= 399:
        location = response.headers.get("Location", "?")[:200]
        return _failure("status", f"{where}: redirected to {location}", False)
    return _failure("status", f"{where}: request refused", False)


def _parse_answer(response: httpx.Response) -> dict[str, SendOutcome]:
    """The Store Instances Response (DICOM JSON) as an outcome per SOP Instance UID."""
    try:
        answer: Any = json.loads(response.content) if response.content else {}
    except ValueError:
        return {}
    if isinstance(answer, list):  # some servers wrap the one data set in an array
        answer = answer[0] if answer else {}
    if not isinstance(answer, dict):
        return {}
    where = f"HTTP {response.status_code}"
    outcomes: dict[str, SendOutcome] = {}
    for item in _items(answer, REFERENCED_SOP_SEQUENCE):
        uid = _value(item, REFERENCED_SOP_INSTANCE_UID)
        warning = _value(item, WARNING_REASON)
        if uid is None:
            continue
        if isinstance(warning, int):
            message = f"stored with warning 0x{warning:04X} ({where})"
            outcomes[uid] = SendOutcome(True, warning, False, message, "success", warning=True)
        else:
            outcomes[uid] = SendOutcome(True, None, False, f"stored ({where})", "success")
    for item in _items(answer, FAILED_SOP_SEQUENCE):
        uid = _value(item, REFERENCED_SOP_INSTANCE_UID)
        reason = _value(item, FAILURE_REASON)
        if uid is None:
            continue
        if isinstance(reason, int):
            status_class = classify_status(reason)
            message = f"{where}: failure reason 0x{reason:04X} {status_class.meaning}"
            outcomes[uid] = SendOutcome(
                False,
                reason,
                status_class.retryable and not status_class.success,
                message,
                "status",
            )
        else:
            outcomes[uid] = _failure("status", f"{where}: failed, no failure reason", False)
    return outcomes


def _items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = answer.get(tag)
    values = element.get("Value", []) if isinstance(element, dict) else []
    return [v for v in values if isinstance(v, dict)]


def _value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After (RFC 9110 10.2.3) in seconds: a number, or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _after(retry_after: float | None) -> str:
    return "" if retry_after is None else f", retry after {retry_after:g} s"


def _with_retry_after(outcome: SendOutcome, retry_after: float | None) -> SendOutcome:
    if retry_after is None:
        return outcome
    return SendOutcome(
        success=outcome.success,
        status=outcome.status,
        retryable=outcome.retryable,
        message=outcome.message,
        category=outcome.category,
        retry_after_s=retry_after,
    )


def _transport_failure(destination: DicomwebDestination, exc: httpx.HTTPError) -> SendOutcome:
    category: Category
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        category, what = "connection", "cannot connect to"
    elif isinstance(exc, httpx.TimeoutException):
        category, what = "timeout", "no answer in time from"
    else:  # the connection dropped mid-request, or the peer spoke no HTTP
        category, what = "aborted", "connection lost with"
    return _failure(category, f"{what} {destination.peer}: {type(exc).__name__}", True)


def _all(batch: Sequence[_Part], outcome: SendOutcome) -> dict[int, SendOutcome]:
    return {id(part): _for_part(outcome, part) for part in batch}


def _for_part(outcome: SendOutcome, part: _Part) -> SendOutcome:
    return SendOutcome(
        success=outcome.success,
        status=outcome.status,
        retryable=outcome.retryable,
        message=outcome.message,
        category=outcome.category,
        warning=outcome.warning,
        sop_instance_uid=part.sop_instance_uid,
        retry_after_s=outcome.retry_after_s,
    )


def _log_summary(destination: DicomwebDestination, outcomes: list[SendOutcome]) -> None:
    for outcome in outcomes:
        emit = log.info if outcome.success else log.warning
        emit(
            "stow-rs sent" if outcome.success else "stow-rs failed",
            destination=destination.name,
            sop_instance_uid=outcome.sop_instance_uid,
            status=outcome.status_hex,
            category=outcome.category,
            retryable=outcome.retryable,
        )


# --------------------------------------------------------------------------- check


def check(destination: DicomwebDestination) -> SendOutcome:
    """Reachable and willing? A QIDO-RS ``GET {url}/studies?limit=1`` (PS3.18 10.6).

    A 2xx answer is success; 401/403 are a refusal; any other answer still shows an HTTP
    service at the URL (one that only stores need not search), so it counts as reachable,
    with a warning naming the status.
    """
    try:
        headers = _headers(destination)
    except SecretError as exc:
        return _failure("rejected", f"credentials unavailable: {exc}", False)
    try:
        with _client(destination) as client:
            response = client.get(destination.stow_url, params={"limit": "1"}, headers=headers)
    except httpx.HTTPError as exc:
        return _transport_failure(destination, exc)
    status = response.status_code
    where = f"HTTP {status} from {destination.peer}"
    if 200 <= status <= 299:
        return SendOutcome(True, None, False, f"reachable ({where})", "success")
    if status in (401, 403, 407):
        return _failure("rejected", f"{where}: credentials refused", False)
    if status in RETRY_STATUSES or status >= 500:
        return _failure("status", where + _after(_retry_after(response)), True)
    return SendOutcome(
        True, None, False, f"reachable, search not offered ({where})", "success", True
    )


class DicomwebTarget:
    """The ``type = "dicomweb"`` destination: STOW-RS, with a QIDO-RS request as check."""

    def send(
        self, destination: DicomwebDestination, items: Iterable[Sendable], our_ae_title: str
    ) -> list[SendOutcome]:
        return send_objects(destination, items)

    def check(self, destination: DicomwebDestination, our_ae_title: str) -> SendOutcome:
        return check(destination)


register("dicomweb", DicomwebTarget())
