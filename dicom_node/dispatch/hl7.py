"""The ``type = "hl7"`` destination: HL7 v2 messages over MLLP to a RIS or worklist.

Its configuration (host, port, MSH-4/5/6, timeouts) is
:class:`~dicom_node.dispatch.hl7_config.Hl7Destination`.

Each item is a file holding one ER7 message (written by :mod:`dicom_node.notify`). It is
sent in an MLLP block (HL7 v2 Implementation Guide, Appendix C: ``0x0B`` message
``0x1C 0x0D``) on a connection of its own — many MLLP listeners close the connection
after their acknowledgement, and a study produces one message, so a persistent
connection would save nothing — and the ACK is read within the network timeout.

MSA-1 decides (original and enhanced acknowledgement codes alike):

* ``AA`` / ``CA`` — accepted: sent;
* ``AE`` / ``CE`` — the receiver had an error processing it: retried later;
* ``AR`` / ``CR`` — rejected (unsupported message type, version, processing ID…), which
  the same message will be again: dead-lettered at once;
* no connection, a timeout, a dropped connection, an unreadable ACK or one that
  acknowledges another message (MSA-2 is not our MSH-10): retried.

Failure messages name the acknowledgement code and the HL7 error code (ERR-3), never the
receiver's free text (MSA-3, ERR-8): a RIS may quote the patient in it, and the message
ends up in the outbox and in the logs. The message content is never logged either.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from dicom_node.dispatch.base import Sendable, SendOutcome, register
from dicom_node.dispatch.base import failure as _failure
from dicom_node.dispatch.hl7_config import Hl7Destination
from dicom_node.logs import get_logger

log = get_logger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20  # an ACK is a few hundred bytes; stop reading a peer that babbles
ACCEPTED = frozenset({"AA", "CA"})
ERRORS = frozenset({"AE", "CE"})
REJECTED = frozenset({"AR", "CR"})


class AckError(Exception):
    """The peer's answer is not an acknowledgement we can read."""


class _Unreachable(Exception):
    """No TCP connection could be opened."""


def frame(message: bytes) -> bytes:
    """One MLLP block around an ER7 message."""
    return START_BLOCK + message + END_BLOCK


def send_messages(destination: Hl7Destination, items: Iterable[Sendable]) -> list[SendOutcome]:
    """Send every ER7 file; one result per item, in order. Never raises on I/O errors.

    After a connection failure the remaining items get the same result without another
    attempt: the receiver is down for all of them, and each try would cost a timeout.
    """
    results: list[SendOutcome] = []
    unreachable: SendOutcome | None = None
    for item in items:
        result = _send_one(destination, item, unreachable)
        if result.category == "connection":
            unreachable = result
        results.append(result)
        _log(destination, result)
    return results


def _send_one(
    destination: Hl7Destination, item: Sendable, unreachable: SendOutcome | None
) -> SendOutcome:
    try:
        data, control_id = _read(item)
    except (OSError, ValueError, HL7apyException) as exc:
        return _failure("invalid_input", f"cannot read HL7 message: {_brief(exc)}", False)
    if unreachable is not None:
        return _failure(unreachable.category, unreachable.message, True, control_id)
    try:
        with _connect(destination) as connection:
            connection.settimeout(destination.timeout("network"))
            connection.sendall(frame(data))
            reply = _read_block(connection)
    except ConnectionError as exc:
        return _failure(
            "aborted", f"connection to {_peer(destination)} lost: {_brief(exc)}", True, control_id
        )
    except TimeoutError:
        return _failure(
            "timeout",
            f"no acknowledgement from {_peer(destination)} within "
            f"{destination.timeout('network'):g} s",
            True,
            control_id,
        )
    except AckError as exc:
        return _failure("aborted", f"{_peer(destination)}: {exc}", True, control_id)
    except _Unreachable as exc:
        return _failure("connection", str(exc), True, control_id)
    except OSError as exc:
        return _failure(
            "aborted", f"send to {_peer(destination)} failed: {_brief(exc)}", True, control_id
        )
    return _acknowledgement(reply, control_id, destination)


def _connect(destination: Hl7Destination) -> socket.socket:
    address = (destination.host, destination.port)
    timeout = destination.timeout("connect")
    try:
        return socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise _Unreachable(
            f"cannot connect to {_peer(destination)} (refused, unreachable or no answer "
            f"within {timeout:g} s): {_brief(exc)}"
        ) from exc


def _read(item: Sendable) -> tuple[bytes, str]:
    """The message bytes and their MSH-10 (the ID the ACK must quote)."""
    if not isinstance(item, str | Path):
        raise ValueError(f"an HL7 destination sends message files, not {type(item).__name__}")
    data = Path(item).read_bytes()
    message = parse_message(data.decode("utf-8"), find_groups=False)
    control_id = str(message.msh.msh_10.value or "")
    if not control_id:
        raise ValueError("the message has no control ID (MSH-10)")
    return data, control_id


def _read_block(connection: socket.socket) -> str:
    """Everything up to the end of the first MLLP block, without its framing."""
    buffer = b""
    while END_BLOCK not in buffer:
        chunk = connection.recv(4096)
        if not chunk:
            raise AckError("connection closed before a complete acknowledgement")
        buffer += chunk
        if len(buffer) > MAX_ACK_BYTES:
            raise AckError(f"acknowledgement longer than {MAX_ACK_BYTES} bytes")
    block = buffer[: buffer.index(END_BLOCK)]
    start = block.find(START_BLOCK)
    if start < 0:
        raise AckError("reply is not an MLLP block")
    try:
        return block[start + 1 :].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AckError("acknowledgement is not UTF-8") from exc


def _acknowledgement(reply: str, control_id: str, destination: Hl7Destination) -> SendOutcome:
    """Map MSA-1 to the outbox's outcome (see the module docstring)."""
    peer = _peer(destination)
    try:
        ack = parse_message(reply.replace("\n", "\r"), find_groups=False)
        code = str(ack.msa.msa_1.value or "").upper()
        acknowledged = str(ack.msa.msa_2.value or "")
    except (HL7apyException, AttributeError, IndexError, KeyError) as exc:
        return _failure(
            "aborted", f"unreadable acknowledgement from {peer}: {_brief(exc)}", True, control_id
        )
    if acknowledged != control_id:
        return _failure(
            "status",
            f"{peer} acknowledged message {acknowledged or '(none)'!r}, not {control_id!r}",
            True,
            control_id,
        )
    if code in ACCEPTED:
        return SendOutcome(
            True, None, False, f"{code} from {peer}", "success", sop_instance_uid=control_id
        )
    detail = f"{code or 'no MSA-1'} from {peer}{_error_code(ack)}"
    if code in REJECTED:
        return _failure("status", f"message rejected: {detail}", False, control_id)
    if code in ERRORS:
        return _failure("status", f"application error: {detail}", True, control_id)
    return _failure("status", f"unknown acknowledgement code: {detail}", True, control_id)


def _error_code(ack: Message) -> str:
    """``; ERR-3 207`` (HL7 table 0357) when the ACK carries one; never its free text."""
    for segment in ack.children:
        if segment.name == "ERR":
            code = str(segment.err_3.err_3_1.value or "")
            if code:
                return f"; ERR-3 {code}"
    return ""


def _peer(destination: Hl7Destination) -> str:
    return f"{destination.name} ({destination.host}:{destination.port})"


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _log(destination: Hl7Destination, result: SendOutcome) -> None:
    emit = log.info if result.success else log.warning
    emit(
        "hl7 message sent" if result.success else "hl7 message failed",
        destination=destination.name,
        message_control_id=result.sop_instance_uid,
        category=result.category,
        retryable=result.retryable,
    )


def check(destination: Hl7Destination) -> SendOutcome:
    """Reachability: a TCP connection to the MLLP port (HL7 v2 has no echo message)."""
    try:
        with _connect(destination):
            pass
    except _Unreachable as exc:
        return _failure("connection", str(exc), True)
    return SendOutcome(True, None, False, f"{_peer(destination)} accepts connections", "success")


class Hl7Target:
    """The ``type = "hl7"`` destination: MLLP sender, TCP connect as its check."""

    def send(
        self, destination: Hl7Destination, items: Iterable[Sendable], our_ae_title: str
    ) -> list[SendOutcome]:
        return send_messages(destination, items)

    def check(self, destination: Hl7Destination, our_ae_title: str) -> SendOutcome:
        return check(destination)


register("hl7", Hl7Target())
