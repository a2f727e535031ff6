"""A RIS stand-in for the HL7 tests: hl7apy's MLLP server, answering with real ACKs.

:class:`MllpReceiver` records every message it receives and answers each with an ACK
built by hl7apy (MSH, MSA quoting the message's control ID, and for errors an ERR with an
HL7 error code). Its answers can be scripted (``codes``: e.g. ``["AE"]`` answers the
first message AE and every later one AA). Error ACKs carry a free-text MSA-3 that quotes
the patient, as some RIS do, so tests can check that the node never repeats it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from dicom_node.results.oru import MESSAGE_TYPE

ACK_VERSION = "2.5.1"
ERROR_TEXT = "cannot file report for patient {name}"


class MllpReceiver:
    """An MLLP listener on 127.0.0.1 in a thread of its own."""

    def __init__(self, port: int, codes: Iterable[str] = (), *, wrong_id: bool = False) -> None:
        self.port = port
        self.codes = list(codes)
        self.wrong_id = wrong_id
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._server: MLLPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MllpReceiver:
        handlers = {MESSAGE_TYPE: (_Handler, self)}
        self._server = MLLPServer("127.0.0.1", self.port, handlers, timeout=5)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def messages(self) -> list[Message]:
        with self._lock:
            return [parse_message(text) for text in self.received]

    def answer(self, text: str) -> str:
        """Record ``text`` and build the ACK for it (MLLP-framed, as the server sends it)."""
        incoming = parse_message(text, find_groups=False)
        with self._lock:
            self.received.append(text)
            code = self.codes.pop(0) if self.codes else "AA"
        control_id = str(incoming.msh.msh_10.value)
        return ack(code, "WRONG-ID" if self.wrong_id else control_id, incoming).to_mllp()


class _Handler(AbstractHandler):  # type: ignore[misc]
    def __init__(self, message: str, receiver: MllpReceiver) -> None:
        super().__init__(message)
        self.receiver = receiver

    def reply(self) -> str:
        return self.receiver.answer(self.incoming_message)


def ack(code: str, control_id: str, incoming: Message) -> Message:
    """An original-mode ACK (MSH, MSA, ERR for AE/AR) built by hl7apy."""
    message = Message("ACK", version=ACK_VERSION)
    message.msh.msh_3 = "RIS"
    message.msh.msh_5 = str(incoming.msh.msh_3.value or "")
    message.msh.msh_9 = "ACK^R01^ACK"
    message.msh.msh_10 = "ACK" + control_id[:17]
    message.msh.msh_11 = "P"
    msa = message.add_segment("MSA")
    msa.msa_1 = code
    msa.msa_2 = control_id
    if code != "AA":
        msa.msa_3 = ERROR_TEXT.format(name=incoming.pid.pid_5.to_er7())
        err = message.add_segment("ERR")
        err.err_3 = "207^Application internal error^HL70357"
        err.err_4 = "E"
    return message


def hl7_destination_toml(name: str, port: int, **fields: str) -> str:
    extra = "".join(f'{key} = "{value}"\n' for key, value in fields.items())
    return (
        f'[[destinations]]\nname = "{name}"\ntype = "hl7"\nhost = "127.0.0.1"\n'
        f"port = {port}\ntimeout_s = 5\n{extra}"
    )
