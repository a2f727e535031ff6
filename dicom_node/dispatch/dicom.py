"""DICOM destinations: C-STORE SCU and C-ECHO with pynetdicom (PS3.4 Annex A and B).

How a batch is sent:

* **Presentation contexts** (PS3.8 §7.1.1.13): per SOP class, one context for each
  compressed (or otherwise non-default) transfer syntax the objects are in, plus one
  context proposing the uncompressed little-endian syntaxes (the objects' own first, then
  Explicit VR LE and Implicit VR LE). Offering the compressed syntax *alone* in its own
  context means a peer that can store JPEG gets the original bytes, while a peer that
  cannot still has an uncompressed context to accept: offering all of them in one
  context would let a peer that prefers uncompressed force a decompression it did not need.
* **One association per batch**; a batch needing more than 128 contexts (the PS3.8
  §9.3.2.2 limit of odd context IDs 1-255) is split into several associations.
* **Per object**, the accepted context with the object's own transfer syntax is used
  as is. Otherwise an accepted uncompressed context is used: uncompressed data are
  re-encoded by pynetdicom (explicit <-> implicit VR), compressed data are decompressed
  with pydicom first, keeping the SOP Instance UID (a transfer syntax change does not
  create a new instance). Our own SR and SC outputs are uncompressed, so for them this
  simply means "whichever uncompressed syntax the peer accepted".
* **Failures are returned, never raised** (:class:`~dicom_node.dispatch.base.SendOutcome`),
  classified per PS3.7 Annex C and PS3.4 Annex B.2.3 into retryable or permanent.

Logs name destinations, AE titles and UIDs only, never patient attributes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.dispatch.base import Sendable, SendOutcome, register
from dicom_node.dispatch.base import failure as _failure
from dicom_node.dispatch.dicom_config import DicomDestination
from dicom_node.logs import get_logger
from dicom_node.tls import ClientContext

log = get_logger(__name__)

MAX_CONTEXTS = 128
UNCOMPRESSED_LE: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_MESSAGE_ID = 0xFFFF
_BINARY_VRS = frozenset({"OB", "OW", "UN", "OB or OW", "OW or OB"})


# --------------------------------------------------------------------------- statuses


@dataclass(frozen=True)
class StatusClass:
    """What a DIMSE status means for the sender."""

    success: bool
    warning: bool
    retryable: bool
    meaning: str


_SUCCESS = StatusClass(True, False, False, "success")

# Exact codes: PS3.7 Annex C (general), PS3.4 Annex B.2.3 (Storage).
_EXACT: dict[int, StatusClass] = {
    0x0000: _SUCCESS,
    0x0001: StatusClass(True, True, False, "warning: requested optional attributes not supported"),
    0x0107: StatusClass(True, True, False, "warning: attribute list error"),
    0x0116: StatusClass(True, True, False, "warning: attribute value out of range"),
    0xB000: StatusClass(True, True, False, "warning: coercion of data elements"),
    0xB006: StatusClass(True, True, False, "warning: elements discarded"),
    0xB007: StatusClass(True, True, False, "warning: data set does not match SOP class"),
    0x0110: StatusClass(False, False, True, "processing failure"),
    0x0210: StatusClass(False, False, True, "duplicate invocation"),
    0x0213: StatusClass(False, False, True, "resource limitation"),
    0xFE00: StatusClass(False, False, True, "cancelled"),
    0x0111: StatusClass(False, False, False, "duplicate SOP instance"),
    0x0117: StatusClass(False, False, False, "invalid SOP instance"),
    0x0122: StatusClass(False, False, False, "refused: SOP class not supported"),
    0x0124: StatusClass(False, False, False, "refused: not authorised"),
    0x0211: StatusClass(False, False, False, "unrecognised operation"),
    0x0212: StatusClass(False, False, False, "mistyped argument"),
}

# Ranges: (first, last, class) — PS3.4 Table B.2-1.
_RANGES: tuple[tuple[int, int, StatusClass], ...] = (
    (0xA700, 0xA7FF, StatusClass(False, False, True, "refused: out of resources")),
    (0xA900, 0xA9FF, StatusClass(False, False, False, "error: data set does not match SOP class")),
    (0xC000, 0xCFFF, StatusClass(False, False, False, "error: cannot understand")),
    (0xB000, 0xBFFF, StatusClass(True, True, False, "warning")),
)


def classify_status(code: int) -> StatusClass:
    """Classify a C-STORE/C-ECHO response status.

    Out-of-resources (0xA7xx), processing failures and resource limitations are retryable;
    "does not match SOP class" (0xA9xx), "cannot understand" (0xCxxx) and refusals are
    permanent: sending the same object again gets the same answer. Warnings (0xB000,
    0xB006, 0xB007, …) mean the object *was* stored. Unknown failure codes are treated as
    permanent so that an operator sees them instead of an endless retry loop.
    """
    if code in _EXACT:
        return _EXACT[code]
    for first, last, status_class in _RANGES:
        if first <= code <= last:
            return status_class
    return StatusClass(False, False, False, "unknown status")


def _status_result(
    status: Dataset, sop_instance_uid: str | None, transfer_syntax: str | None
) -> SendOutcome:
    code = int(status.Status)
    status_class = classify_status(code)
    message = f"0x{code:04X} {status_class.meaning}"
    comment = status.get("ErrorComment")
    if comment:
        message += f" ({str(comment).strip()})"
    return SendOutcome(
        success=status_class.success,
        status=code,
        retryable=status_class.retryable,
        message=message,
        category="success" if status_class.success else "status",
        warning=status_class.warning,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
    )


# --------------------------------------------------------------------------- items


@dataclass
class _Item:
    """One object to send, described from its header alone (pixels not loaded yet)."""

    source: Sendable
    sop_class: UID | None = None
    sop_instance: str | None = None
    transfer_syntax: UID | None = None
    error: SendOutcome | None = None

    @property
    def context_keys(self) -> list[tuple[UID, UID | None]]:
        """(SOP class, own syntax) contexts this item needs; ``None`` = the uncompressed one."""
        if self.sop_class is None:
            return []
        keys: list[tuple[UID, UID | None]] = [(self.sop_class, None)]
        if self.transfer_syntax not in UNCOMPRESSED_LE:
            keys.append((self.sop_class, self.transfer_syntax))
        return keys


def _describe(source: Sendable) -> _Item:
    """Read what context planning needs: SOP class, SOP instance and transfer syntax."""
    item = _Item(source)
    try:
        if isinstance(source, Dataset):
            item.sop_class = UID(source.SOPClassUID)
            item.sop_instance = str(source.SOPInstanceUID)
            item.transfer_syntax = _dataset_syntax(source)
        else:
            meta = read_file_meta_info(source)
            item.sop_class = UID(meta.MediaStorageSOPClassUID)
            item.sop_instance = str(meta.MediaStorageSOPInstanceUID)
            item.transfer_syntax = UID(meta.TransferSyntaxUID)
        for label, uid in (
            ("SOP Class UID", item.sop_class),
            ("Transfer Syntax UID", item.transfer_syntax),
        ):
            if uid is None or not uid.is_valid:
                raise ValueError(f"{label} {str(uid)[:64]!r} is not a valid UID")
    except Exception as exc:  # unreadable input is this item's permanent failure
        item.error = _failure(
            "invalid_input", f"cannot read object: {_brief(exc)}", False, item.sop_instance
        )
    return item


def _dataset_syntax(dataset: Dataset) -> UID:
    """The data set's transfer syntax; in-memory objects without one are Explicit VR LE."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(syntax) if syntax else ExplicitVRLittleEndian


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# --------------------------------------------------------------------------- contexts


def plan_batches(items: Sequence[_Item]) -> list[list[_Item]]:
    """Group readable items so that no association needs more than 128 contexts."""
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    keys: set[tuple[UID, UID | None]] = set()
    for item in items:
        if item.error is not None:
            continue
        new = set(item.context_keys) - keys
        if current and len(keys) + len(new) > MAX_CONTEXTS:
            batches.append(current)
            current, keys = [], set()
            new = set(item.context_keys)
        current.append(item)
        keys |= new
    if current:
        batches.append(current)
    return batches


def build_contexts(items: Sequence[_Item]) -> list[PresentationContext]:
    """Presentation contexts for a batch, in first-seen order (see the module docstring)."""
    uncompressed: dict[UID, list[str | UID]] = {}
    exact: dict[tuple[UID, UID], None] = {}
    for item in items:
        for sop_class, syntax in item.context_keys:
            if syntax is None:
                own = [item.transfer_syntax] if item.transfer_syntax in UNCOMPRESSED_LE else []
                syntaxes = uncompressed.setdefault(sop_class, [])
                for candidate in [*own, *UNCOMPRESSED_LE]:
                    if candidate is not None and candidate not in syntaxes:
                        syntaxes.append(candidate)
            else:
                exact[(sop_class, syntax)] = None
    contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in uncompressed.items()]
    contexts += [build_context(sop_class, [syntax]) for sop_class, syntax in exact]
    return contexts


def _accepted(assoc: Association, sop_class: UID) -> list[PresentationContext]:
    return [
        cx
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu is not False
    ]


def choose_context(
    accepted: Sequence[PresentationContext], syntax: UID
) -> tuple[PresentationContext | None, bool]:
    """The context to send an object in, and whether it must be decompressed first.

    The object's own syntax wins; otherwise an uncompressed little-endian context (which
    pynetdicom converts to for uncompressed data; compressed data we decompress).
    Big endian data (retired) are only sent where Explicit VR Big Endian was accepted.
    """
    for cx in accepted:
        if cx.transfer_syntax[0] == syntax:
            return cx, False
    fallback = next((cx for cx in accepted if cx.transfer_syntax[0] in UNCOMPRESSED_LE), None)
    if fallback is None or not syntax.is_transfer_syntax or not syntax.is_little_endian:
        return None, False  # unknown (private) syntaxes cannot be converted
    return fallback, syntax.is_compressed


# --------------------------------------------------------------------------- association


@dataclass
class _Watch:
    """What happened on the wire during negotiation, to explain a failed association."""

    connected: bool = False
    pdus_received: int = 0
    rejection: str | None = None
    tls: ClientContext | None = None  # holds why the TLS handshake failed, if it did
    handlers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handlers = [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_PDU_RECV, self._on_pdu)]

    def _on_open(self, event: evt.Event) -> None:
        self.connected = True

    def _on_pdu(self, event: evt.Event) -> None:
        """Keep an A-ASSOCIATE-RJ's reason from the PDU itself: when the peer closes the
        connection right after rejecting, pynetdicom may report an abort instead."""
        self.pdus_received += 1
        pdu = getattr(event, "pdu", None)
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.rejection = rejection_text(pdu.result, pdu.source, pdu.reason_diagnostic)


_REJECT_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_REJECT_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE)",
    3: "service-provider (presentation)",
}
_REJECT_REASONS = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def rejection_text(result: int | None, source: int | None, reason: int | None) -> str:
    """An A-ASSOCIATE-RJ in the words of PS3.8 Table 9-21 (e.g. a wrong called AE title)."""
    return (
        f"{_REJECT_RESULTS.get(result or 0, f'result {result}')} by "
        f"{_REJECT_SOURCES.get(source or 0, f'source {source}')}: "
        f"{_REJECT_REASONS.get((source or 0, reason or 0), f'reason {reason}')}"
    )


def _make_ae(destination: DicomDestination, our_ae_title: str) -> AE:
    ae = AE(ae_title=destination.calling_ae_title or our_ae_title)
    ae.acse_timeout = destination.timeout("acse")
    ae.dimse_timeout = destination.timeout("dimse")
    ae.network_timeout = destination.timeout("network")
    ae.connection_timeout = destination.timeout("connect")
    return ae


def _associate(
    destination: DicomDestination, our_ae_title: str, contexts: list[PresentationContext]
) -> tuple[Association | None, SendOutcome | None]:
    """Open an association; on failure, the reason as a result instead of an exception."""
    watch = _Watch()
    try:
        tls_args = _tls_args(destination)
        if tls_args is not None:
            watch.tls = tls_args[0]
        assoc = _make_ae(destination, our_ae_title).associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            evt_handlers=watch.handlers,
            tls_args=tls_args,
        )
    except Exception as exc:  # e.g. a host name that does not resolve, a bad AE title
        return None, _failure(
            "connection", f"cannot connect to {destination.peer}: {_brief(exc)}", True
        )
    if assoc.is_established:
        return assoc, None
    return None, _association_failure(assoc, watch, destination)


def _tls_args(destination: DicomDestination) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args``: a fresh context (certificates re-read) and the name
    the peer's certificate must carry. Unreadable files raise: a connection failure."""
    tls = destination.tls
    if not tls.enabled:
        return None
    return tls.context(), tls.server_name or destination.host


def _association_failure(
    assoc: Association, watch: _Watch, destination: DicomDestination
) -> SendOutcome:
    """Why no association: no connection, rejected, no usable context, aborted, timeout.

    All but "no usable context" are retryable: they concern the destination, not the
    objects. A permanent rejection (e.g. called AE title not recognised, PS3.8 §9.3.4)
    usually means a configuration mismatch an operator fixes; until then the outbox keeps
    the objects and backs off.
    """
    peer = destination.peer
    response = assoc.acceptor.primitive
    if watch.tls is not None and watch.tls.failure is not None:
        return _failure(
            "connection", f"TLS handshake with {peer} failed: {watch.tls.failure}", True
        )
    if not watch.connected:
        return _failure(
            "connection",
            f"cannot connect to {peer} (refused, unreachable or "
            f"no answer within {destination.timeout('connect'):g} s)",
            True,
        )
    if assoc.is_rejected and response is not None:
        watch.rejection = rejection_text(
            response.result, response.result_source, response.diagnostic
        )
    if watch.rejection is not None:
        return _failure("rejected", f"association rejected by {peer}: {watch.rejection}", True)
    if response is not None and response.result == 0x00:
        rejected = "; ".join(
            f"{UID(cx.abstract_syntax or '').name}: {cx.status}" for cx in assoc.rejected_contexts
        )
        return _failure(
            "no_context", f"{peer} accepted no proposed presentation context ({rejected})", False
        )
    if watch.pdus_received:
        return _failure("aborted", f"association aborted by {peer} during negotiation", True)
    return _failure(
        "timeout",
        f"no association response from {peer} within {destination.timeout('acse'):g} s",
        True,
    )


def _release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception as exc:  # the peer may already be gone; nothing left to do
        log.debug("association release failed", error=_brief(exc))


# --------------------------------------------------------------------------- C-STORE


def send_datasets(
    destination: DicomDestination, datasets_or_paths: Iterable[Sendable], our_ae_title: str
) -> list[SendOutcome]:
    """C-STORE every object to a DICOM destination; one result per input, in order.

    Objects may be pydicom data sets or paths to DICOM files (read only when sent).
    Never raises on network or peer errors; see the module docstring for how contexts
    are negotiated and objects converted.
    """
    items = [_describe(source) for source in datasets_or_paths]
    results: dict[int, SendOutcome] = {
        id(item): item.error for item in items if item.error is not None
    }
    for batch in plan_batches(items):
        try:
            results.update(_send_batch(destination, our_ae_title, batch))
        except Exception as exc:  # a bug must not look like a crash to the outbox
            log.error(
                "c-store batch failed unexpectedly",
                destination=destination.name,
                error_type=type(exc).__name__,
            )
            failure = _failure("aborted", f"unexpected error: {type(exc).__name__}", True)
            results.update(
                {id(item): _for_item(failure, item) for item in batch if id(item) not in results}
            )
    ordered = [results[id(item)] for item in items]
    _log_summary(destination, ordered)
    return ordered


def _send_batch(
    destination: DicomDestination, our_ae_title: str, batch: list[_Item]
) -> dict[int, SendOutcome]:
    assoc, failure = _associate(destination, our_ae_title, build_contexts(batch))
    if assoc is None:
        assert failure is not None
        return {id(item): _for_item(failure, item) for item in batch}
    results: dict[int, SendOutcome] = {}
    try:
        for number, item in enumerate(batch):
            if not assoc.is_established:
                lost = _failure(
                    "aborted",
                    f"association with {destination.peer} lost before this object was sent",
                    True,
                    item.sop_instance,
                )
                results[id(item)] = lost
                continue
            results[id(item)] = _store_one(assoc, item, number % MAX_MESSAGE_ID + 1)
    finally:
        _release(assoc)
    return results


def _for_item(result: SendOutcome, item: _Item) -> SendOutcome:
    return SendOutcome(
        success=result.success,
        status=result.status,
        retryable=result.retryable,
        message=result.message,
        category=result.category,
        warning=result.warning,
        sop_instance_uid=item.sop_instance,
    )


def _store_one(assoc: Association, item: _Item, message_id: int) -> SendOutcome:
    assert item.sop_class is not None and item.transfer_syntax is not None
    context, decompress = choose_context(_accepted(assoc, item.sop_class), item.transfer_syntax)
    if context is None:
        return _no_context(assoc, item)
    try:
        dataset = _prepare(item, decompress)
    except Exception as exc:  # unreadable file, no decoder for the pixel data, …
        return _failure(
            "invalid_input",
            f"cannot prepare object for {context.transfer_syntax[0].name}: {_brief(exc)}",
            False,
            item.sop_instance,
        )
    started = time.monotonic()
    try:
        status = assoc.send_c_store(dataset, msg_id=message_id)
    except (ValueError, AttributeError) as exc:  # pynetdicom could not encode it
        return _failure(
            "invalid_input", f"cannot encode object: {_brief(exc)}", False, item.sop_instance
        )
    except Exception as exc:  # socket errors and the like: the peer, not the object
        return _failure("aborted", f"send failed: {_brief(exc)}", True, item.sop_instance)
    if "Status" not in status:
        return _no_response(assoc, item, time.monotonic() - started)
    return _status_result(status, item.sop_instance, str(context.transfer_syntax[0]))


def _no_context(assoc: Association, item: _Item) -> SendOutcome:
    """The peer accepted nothing this object can be sent in: permanent for this object."""
    syntax = item.transfer_syntax.name if item.transfer_syntax is not None else "unknown"
    sop = item.sop_class.name if item.sop_class is not None else "unknown"
    reasons = "; ".join(
        str(cx.status) for cx in assoc.rejected_contexts if cx.abstract_syntax == item.sop_class
    )
    return _failure(
        "no_context",
        f"no accepted presentation context for {sop} in {syntax} "
        f"or uncompressed ({reasons or 'not accepted'})",
        False,
        item.sop_instance,
    )


def _no_response(assoc: Association, item: _Item, waited_s: float) -> SendOutcome:
    """No response: the peer aborted (often a sign it could not parse the object) or the
    DIMSE timeout expired. pynetdicom may not have flagged the abort yet when it returns,
    so an early return counts as an abort too."""
    timeout = assoc.dimse_timeout or 0.0
    if assoc.is_aborted or not assoc.is_established or waited_s < timeout * 0.9:
        return _failure(
            "aborted",
            "association aborted by the peer before the C-STORE response",
            True,
            item.sop_instance,
        )
    return _failure("timeout", f"no C-STORE response within {timeout:g} s", True, item.sop_instance)


def _prepare(item: _Item, decompress: bool) -> Dataset:
    """The data set to hand to pynetdicom: read from disk, given a syntax, decompressed,
    odd lengths padded. Caller-owned data sets are copied before any change.
    """
    odd: list[BaseTag] = []
    if isinstance(item.source, Dataset):
        dataset = item.source
        odd = _odd_length_binary(dataset)
        if not _has_syntax(dataset):
            # file_meta is an instance attribute: the shallow copy's own, not the caller's
            dataset = copy.copy(dataset)
            dataset.file_meta = FileMetaDataset()
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if decompress or odd:
            dataset = copy.deepcopy(dataset)
    else:
        dataset = pydicom.dcmread(item.source)
        odd = _odd_length_binary(dataset)
    if decompress:
        dataset.decompress(generate_instance_uid=False)
    else:
        _pad(dataset, odd)
    return dataset


def _odd_length_binary(dataset: Dataset) -> list[BaseTag]:
    """Top-level binary elements of odd length (e.g. 8-bit Pixel Data, odd pixel count).

    PS3.5 §7.1.1 requires even value lengths; files in the wild break that, pydicom
    writes them back as read, and strict peers (dcmtk) abort the association on them.
    """
    return [
        element.tag
        for element in dataset
        if element.VR in _BINARY_VRS and isinstance(element.value, bytes) and len(element.value) % 2
    ]


def _pad(dataset: Dataset, tags: list[BaseTag]) -> None:
    """Pad with one trailing NULL byte, as PS3.5 §8.1.1 prescribes for Pixel Data."""
    for tag in tags:
        element = dataset[tag]
        element.value = bytes(element.value) + b"\x00"


def _has_syntax(dataset: Dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    return bool(meta is not None and meta.get("TransferSyntaxUID"))


def _log_summary(destination: DicomDestination, results: list[SendOutcome]) -> None:
    for result in results:
        emit = log.info if result.success else log.warning
        emit(
            "c-store sent" if result.success else "c-store failed",
            destination=destination.name,
            sop_instance_uid=result.sop_instance_uid,
            status=result.status_hex,
            category=result.category,
            retryable=result.retryable,
            transfer_syntax=result.transfer_syntax,
        )


# --------------------------------------------------------------------------- C-ECHO


def echo(destination: DicomDestination, our_ae_title: str) -> SendOutcome:
    """C-ECHO (PS3.7 §9.1.5): is the destination reachable and does it accept us?"""
    assoc, failure = _associate(destination, our_ae_title, [build_context(Verification)])
    if assoc is None:
        assert failure is not None
        return failure
    try:
        status = assoc.send_c_echo()
    except Exception as exc:
        return _failure("aborted", f"C-ECHO failed: {_brief(exc)}", True)
    finally:
        _release(assoc)
    if "Status" not in status:
        return _failure("timeout", "no C-ECHO response within the DIMSE timeout", True)
    return _status_result(status, None, None)


class DicomTarget:
    """The ``type = "dicom"`` destination: C-STORE SCU, with C-ECHO as its check."""

    def send(
        self, destination: DicomDestination, items: Iterable[Sendable], our_ae_title: str
    ) -> list[SendOutcome]:
        return send_datasets(destination, items, our_ae_title)

    def check(self, destination: DicomDestination, our_ae_title: str) -> SendOutcome:
        return echo(destination, our_ae_title)


register("dicom", DicomTarget())
