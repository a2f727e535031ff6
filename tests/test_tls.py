"""DICOM TLS (PS3.15 Annex B), in both directions, with dcmtk as the real peer.

Incoming: the listener's TLS port with client certificates required, driven by dcmtk
``storescu +tls``. Outgoing: a destination with ``[destinations.tls]`` sending to dcmtk
``storescp +tls``. Certificates are made per module by ``openssl`` (tests/tls_support.py).
TLS concerns the transport only, so these tests run on SQLite alone.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ConfigError, load_settings
from dicom_node.dispatch import DicomDestination
from dicom_node.dispatch.dicom import echo, send_datasets
from dicom_node.listener import Listener
from dicom_node.receive import StoreService
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import Instance
from storage.spool import Spool
from tests.support import NODE_AE, free_port, storescu
from tests.test_dispatch_dicom import STORESCP, received, wait_listening
from tests.test_listener import count
from tests.tls_support import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def tls_node(pki: Pki, **tls: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "port": free_port(),
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "ca_file": str(pki.ca),
        "verify_client": True,
        **tls,
    }


@pytest.fixture
def tls_listener(
    pki: Pki, spool: Spool, sqlite_sessions: sessionmaker[Session]
) -> Iterator[Listener]:
    settings = load_settings(
        node={
            "host": "127.0.0.1",
            "port": free_port(),
            "ae_title": NODE_AE,
            "acse_timeout": 10,
            "tls": tls_node(pki),
        }
    )
    listener = Listener(settings.node, StoreService(spool, sqlite_sessions, min_free_bytes=0))
    listener.start()
    yield listener
    listener.stop(grace_seconds=5)


def tls_client(pki: Pki, *, with_certificate: bool = True) -> list[str]:
    """dcmtk options: verify the node against our CA, present the client certificate."""
    if with_certificate:
        return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    return ["+tla", "+cf", str(pki.ca)]  # TLS without a certificate of our own


# -- incoming ----------------------------------------------------------------------------


def handshake_failures(caplog: pytest.LogCaptureFixture, wait_s: float = 5.0) -> str:
    """The reasons the listener logged for failed handshakes, one per line.

    The listener logs from its own thread, which may still be writing when the client
    has already given up: wait for the first line a little while.
    """
    deadline = time.monotonic() + wait_s
    while True:
        reasons = "\n".join(
            str(getattr(r, "fields", {}).get("reason"))
            for r in caplog.records
            if r.getMessage() == "TLS handshake failed"
        )
        if reasons or time.monotonic() > deadline:
            return reasons
        time.sleep(0.05)


def test_dcmtk_stores_over_tls_with_a_client_certificate(
    tls_listener: Listener, pki: Pki, rg1_uncr: Path, dcmtk: None
) -> None:
    port = tls_listener.tls_port
    assert port is not None
    result = storescu(port, rg1_uncr, extra=tls_client(pki))
    assert result.returncode == 0, result.stderr
    assert count(tls_listener.store.sessions, Instance) == 1
    plain = storescu(tls_listener.port, rg1_uncr)  # the plain port stays open by default
    assert plain.returncode == 0, plain.stderr


def test_client_without_certificate_is_refused_and_next_one_served(
    tls_listener: Listener, pki: Pki, rg1_uncr: Path, dcmtk: None, caplog: pytest.LogCaptureFixture
) -> None:
    port = tls_listener.tls_port
    assert port is not None
    refused = storescu(port, rg1_uncr, extra=tls_client(pki, with_certificate=False))
    assert refused.returncode != 0
    assert "peer did not return a certificate" in handshake_failures(caplog)
    assert count(tls_listener.store.sessions, Instance) == 0
    accepted = storescu(port, rg1_uncr, extra=tls_client(pki))
    assert accepted.returncode == 0, accepted.stderr
    assert count(tls_listener.store.sessions, Instance) == 1


def test_plaintext_client_on_tls_port_fails_cleanly(
    tls_listener: Listener, pki: Pki, rg1_uncr: Path, dcmtk: None, caplog: pytest.LogCaptureFixture
) -> None:
    port = tls_listener.tls_port
    assert port is not None
    plain = storescu(port, rg1_uncr)
    assert plain.returncode != 0
    assert "TLS error" in handshake_failures(caplog)
    assert "Association Request Failed" in plain.stderr or "Failed" in plain.stderr
    assert count(tls_listener.store.sessions, Instance) == 0
    again = storescu(port, rg1_uncr, extra=tls_client(pki))
    assert again.returncode == 0, again.stderr


def test_silent_client_does_not_block_other_tls_associations(
    tls_listener: Listener, pki: Pki, rg1_uncr: Path, dcmtk: None
) -> None:
    """A connection that never starts its handshake holds its own thread only."""
    port = tls_listener.tls_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port)):
        result = storescu(port, rg1_uncr, extra=tls_client(pki))
    assert result.returncode == 0, result.stderr


def test_tls_only_closes_the_plain_port(
    pki: Pki, spool: Spool, sqlite_sessions: sessionmaker[Session], rg1_uncr: Path, dcmtk: None
) -> None:
    plain_port = free_port()
    settings = load_settings(
        node={
            "host": "127.0.0.1",
            "port": plain_port,
            "ae_title": NODE_AE,
            "tls": tls_node(pki, tls_only=True, verify_client=False),
        }
    )
    listener = Listener(settings.node, StoreService(spool, sqlite_sessions, min_free_bytes=0))
    listener.start()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", plain_port), timeout=5).close()
        assert listener.tls_port is not None
        anonymous = storescu(
            listener.tls_port, rg1_uncr, extra=tls_client(pki, with_certificate=False)
        )
        assert anonymous.returncode == 0, anonymous.stderr  # no client certificate needed
    finally:
        listener.stop(grace_seconds=5)


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"cert_file": "/nonexistent/server.pem"},
            "node.tls.cert_file: file not found: /nonexistent/server.pem",
        ),
        ({"key_file": None}, "node.tls.key_file: required when TLS is enabled"),
        ({"ca_file": None}, "node.tls.ca_file: required when TLS is enabled"),
        ({"key_file": "CLIENT_KEY"}, "node.tls.key_file: cannot load certificate, key or CA"),
    ],
)
def test_tls_configuration_errors_name_the_key(
    pki: Pki, change: dict[str, Any], message: str
) -> None:
    tls = tls_node(pki, **change)
    if tls["key_file"] == "CLIENT_KEY":
        tls["key_file"] = str(pki.client_key)  # does not match the server certificate
    tls = {key: value for key, value in tls.items() if value is not None}
    with pytest.raises(ConfigError) as info:
        load_settings(node={"tls": tls})
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_disabled_tls_ignores_its_files() -> None:
    settings = load_settings(node={"tls": {"cert_file": "/nonexistent.pem"}})
    assert not settings.node.tls.enabled


# -- outgoing ------------------------------------------------------------------------------


@pytest.fixture
def tls_storescp(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with TLS, requiring a client certificate from our CA."""
    port, out = free_port(), tmp_path / "scp"
    out.mkdir()
    command = [
        STORESCP,
        "-od",
        str(out),
        "-aet",
        "TLSSCP",
        "+tls",
        str(pki.server_key),
        str(pki.server_cert),
        "+cf",
        str(pki.ca),
        "-rc",
        str(port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=10)


def tls_destination(port: int, **tls: Any) -> DicomDestination:
    return DicomDestination.model_validate(
        {
            "name": "secure-pacs",
            "ae_title": "TLSSCP",
            "host": "127.0.0.1",
            "port": port,
            "timeout_s": 20,
            "tls": {"enabled": True, **tls},
        }
    )


def test_results_are_delivered_over_tls(
    tls_storescp: tuple[int, Path], pki: Pki, rg1_uncr: Path
) -> None:
    port, out = tls_storescp
    destination = tls_destination(
        port,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
        server_name="localhost",
    )
    [result] = send_datasets(destination, [rg1_uncr], "CXR_AI")
    assert result.success, result.message
    uid = str(pydicom.dcmread(rg1_uncr, stop_before_pixels=True).SOPInstanceUID)
    assert uid in received(out)


def test_untrusted_peer_certificate_is_a_retryable_failure(
    tls_storescp: tuple[int, Path], pki: Pki
) -> None:
    port, _ = tls_storescp
    destination = tls_destination(
        port,
        ca_file=str(pki.other_ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    result = echo(destination, "CXR_AI")
    assert not result.success and result.retryable
    assert result.category == "connection"
    assert "TLS handshake with TLSSCP@127.0.0.1" in result.message
    assert "certificate verification failed" in result.message


def test_destination_tls_needs_both_certificate_and_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="key_file: required with cert_file"):
        tls_destination(104, cert_file=str(pki.client_cert))
    with pytest.raises(ValueError, match="cert_file: required with key_file"):
        tls_destination(104, key_file=str(pki.client_key))


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (
            {"ca_file": "/nonexistent/ca.pem"},
            "destinations.0.tls.ca_file: file not found: /nonexistent/ca.pem",
        ),
        ({"cert_file": "CLIENT_CERT"}, "destinations.0.tls.key_file: required with cert_file"),
        (
            {"cert_file": "CLIENT_CERT", "key_file": "SERVER_KEY"},
            "destinations.0.tls.key_file: cannot load certificate, key or CA",
        ),
    ],
)
def test_destination_tls_errors_name_the_key(pki: Pki, tls: dict[str, str], message: str) -> None:
    files = {"CLIENT_CERT": str(pki.client_cert), "SERVER_KEY": str(pki.server_key)}
    table = {
        "name": "secure-pacs",
        "ae_title": "TLSSCP",
        "host": "127.0.0.1",
        "port": 2762,
        "tls": {"enabled": True, **{key: files.get(v, v) for key, v in tls.items()}},
    }
    with pytest.raises(ConfigError) as info:
        load_settings(destinations=[table])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
