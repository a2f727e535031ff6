"""DICOM TLS (PS3.15 Annex B): the SSL contexts of the listener and of destinations.

Key material comes from PEM files only, read when a context is built; nothing of it
(and no password) is ever logged. TLS 1.2 is the minimum, as the BCP 195 profiles of
PS3.15 Annex B.9 require, and the cipher choice is Python's default, which follows them.

The listener's context defers the handshake: pynetdicom wraps an accepted socket in the
thread that accepts connections, and a handshake there would let one silent client stall
every other TLS association. The listener performs it on the connection's own thread
instead (:func:`handshake`), with a timeout, and says why when it fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def readable_file(path: Path) -> Path:
    """``path`` if it is a file this process can read; else ValueError saying which."""
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {path}")
    return path


class KeyMaterialError(ValueError):
    """A TLS setting that cannot be used; ``key`` names it (``cert_file``, ``key_file``…)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def check_key_material(
    files: Mapping[str, Path | None], load: Callable[[], object], blame: str
) -> None:
    """The one check of a TLS section's files, for the listener and destinations alike.

    Every given file must be readable (a :class:`KeyMaterialError` names the first one
    that is not); then ``load`` builds the context from them, and a certificate, key or
    CA it cannot load is reported against the setting ``blame``.
    """
    for key, path in files.items():
        if path is None:
            continue
        try:
            readable_file(path)
        except ValueError as exc:
            raise KeyMaterialError(key, str(exc)) from None
    try:
        load()
    except (ssl.SSLError, OSError) as exc:
        reason = f"cannot load certificate, key or CA: {describe_error(exc)}"
        raise KeyMaterialError(blame, reason) from None


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server-side sockets do their handshake on first use."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if kwargs.get("server_side"):
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(
    cert_file: Path, key_file: Path, ca_file: Path | None = None, verify_client: bool = False
) -> ssl.SSLContext:
    """The listener's context; with ``verify_client``, peers must present a certificate
    issued by ``ca_file``. Raises ``ssl.SSLError``/``OSError`` for unusable key material."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if verify_client else ssl.CERT_NONE
    return context


class _ReportingSocket(ssl.SSLSocket):
    """Keeps why a client handshake failed on its context: pynetdicom only logs it."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            if isinstance(self.context, ClientContext):
                self.context.failure = describe_error(exc)
            raise


class ClientContext(ssl.SSLContext):
    """A client context, one per association, that remembers a failed handshake."""

    sslsocket_class = _ReportingSocket
    failure: str | None = None


def client_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ClientContext:
    """A destination's context: the peer is verified against ``ca_file`` (else the
    system's trust store) and its host name checked; our certificate is sent if given."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
    context.minimum_version = MINIMUM_VERSION
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


def handshake(sock: socket.socket, timeout: float) -> str | None:
    """Complete a deferred server-side handshake; None on success, else the reason.

    Plain sockets pass through untouched. On failure the socket is closed, so the
    association that owns it ends at once instead of waiting for its timeouts.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:
        reason = describe_error(exc)
        _close_quietly(sock)
        return reason
    return None


def describe_error(exc: BaseException) -> str:
    """A short, single-line reason for a TLS failure (no key material is ever in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or type(exc).__name__)  # e.g. WRONG_VERSION_NUMBER
        return f"TLS error: {reason.lower().replace('_', ' ')}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    return f"{type(exc).__name__}: {exc}"[:200]


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
