"""Test helpers: real peers (dcmtk, pynetdicom), node processes, throw-away databases.

Nothing here is mocked: databases are real SQLite files or real PostgreSQL databases
created for the test and dropped afterwards, nodes are real ``dicom-node serve``
processes, senders are dcmtk's binaries (called by absolute path, because pynetdicom
installs console scripts with the same names into the virtualenv).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import create_engine, make_url, text

REPO_ROOT = Path(__file__).resolve().parents[1]
STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
DCMTK_STORESCP = Path("/usr/bin/storescp")
DEFAULT_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
NODE_AE = "CXR_AI"
START_TIMEOUT_S = 120.0  # generous: the CI machine may be busy training networks
STOP_TIMEOUT_S = 60.0
PEER_TIMEOUT_S = 120.0

# dcmtk storescu flag that proposes exactly a file's own transfer syntax (so that what
# travels on the wire is the file's encoding, not a conversion made by storescu).
STORESCU_TS_FLAGS: dict[str, str] = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}


# -- DICOM files ---------------------------------------------------------------------


def split_part10(raw: bytes) -> tuple[bytes, bytes]:
    """Split a Part 10 file into (preamble + prefix + file meta, data set)."""
    if raw[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    pos = 132
    while pos + 8 <= len(raw) and int.from_bytes(raw[pos : pos + 2], "little") == 0x0002:
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + int.from_bytes(raw[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(raw[pos + 6 : pos + 8], "little")
    return raw[:pos], raw[pos:]


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file (what travels in a C-STORE), without file meta."""
    return split_part10(path.read_bytes())[1]


def transfer_syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def sop_instance_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- network peers ------------------------------------------------------------------


CHILD_AGE = "004Y"
"""A Patient Age inside the shipped pneumonia models' population (1–5 years).

The chest images of the shared corpora are adult films (or of unknown age), which the
node now declines to assess. Tests of the plumbing — decoding, the gate, batching,
outputs, delivery — give their copies this age so that images are scored; the
population tests (tests/inference/test_population.py) check the refusal itself."""


def as_child(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """``dataset`` with :data:`CHILD_AGE` (in place; returned for chaining)."""
    dataset.PatientAge = CHILD_AGE
    return dataset


def child_copy(source: Path, target: Path) -> Path:
    """A copy of the file ``source`` at ``target`` with :data:`CHILD_AGE`, same UIDs."""
    dataset = pydicom.dcmread(source)
    as_child(dataset).save_as(target, enforce_file_format=True)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(cmd: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=PEER_TIMEOUT_S,
        check=False,
        **kwargs,
    )


def storescu(
    port: int,
    path: Path,
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = NODE_AE,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send one file with dcmtk storescu, proposing only the file's transfer syntax."""
    flag = STORESCU_TS_FLAGS[transfer_syntax_of(path)]
    return run(
        [
            STORESCU,
            "-v",
            "-R",
            flag,
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            *extra,
            "127.0.0.1",
            str(port),
            path,
        ]
    )


def echoscu(
    port: int, *, calling_ae: str = "ECHOSCU", called_ae: str = NODE_AE
) -> subprocess.CompletedProcess[str]:
    return run([ECHOSCU, "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)])


def send_raw(
    port: int, paths: Sequence[Path], *, calling_ae: str = "RAWSCU", called_ae: str = NODE_AE
) -> list[int | None]:
    """Send Part 10 files with pynetdicom *without decoding them*: the bytes after the
    file meta go on the wire exactly as they are in the file, even if corrupt.

    Returns the C-STORE status of each file (None if there was no response).
    """
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = PEER_TIMEOUT_S
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if not assoc.is_established:
            raise ConnectionError("association not established")
        statuses = [getattr(assoc.send_c_store(path), "Status", None) for path in paths]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


# -- file systems -------------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str = "3m") -> Iterator[Path]:
    """A real, small file system at ``mount_point``, so a disk really fills up.

    Needs root; where mounting is impossible the test is skipped (it is an environment
    limitation, not missing data). Grow it with :func:`resize_tmpfs`.
    """
    import pytest

    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def resize_tmpfs(mount_point: Path, size: str) -> None:
    """Give a :func:`mounted_tmpfs` more (or less) room, the files on it staying."""
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(mount_point)], check=True, timeout=30
    )


# -- databases ----------------------------------------------------------------------


def postgres_server_url() -> str:
    return os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@contextlib.contextmanager
def provision_database(backend: str, directory: Path) -> Iterator[str]:
    """A fresh, empty database of ``backend``; PostgreSQL ones are dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'node.db'}"
        return
    server = make_url(postgres_server_url())
    name = f"dicom_node_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- node processes -----------------------------------------------------------------


@dataclass
class NodeProcess:
    """A ``dicom-node serve`` subprocess on a private home and a free port."""

    home: Path
    database_url: str
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    config_file: Path | None = None
    # Receive tests inspect the queue, so by default nothing consumes it; the results
    # tests turn the workers on.
    workers: bool = False
    # ("worker", "--threads", "1") runs a worker-only process (give it workers=True).
    command: tuple[str, ...] = ("serve",)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env.update(
            {
                "DICOM_NODE_HOME": str(self.home),
                "DICOM_NODE_DATABASE_URL": self.database_url,
                "DICOM_NODE_HOST": "127.0.0.1",
                "DICOM_NODE_PORT": str(self.port),
                "DICOM_NODE_HTTP_PORT": "0",  # any free port: tests run side by side
                "DICOM_NODE_AE_TITLE": NODE_AE,
                "DICOM_NODE_NODE__HEARTBEAT_INTERVAL": "1",
            }
        )
        if not self.workers:
            env["DICOM_NODE_WORKER__THREADS"] = "0"
        if self.config_file is not None:
            env["DICOM_NODE_CONFIG"] = str(self.config_file)
        env.update(self.extra_env)
        return env

    @property
    def stderr_path(self) -> Path:
        return self.home / f"{self.command[0]}-{self.starts}.stderr"

    @property
    def spool(self) -> Path:
        return Path(self.extra_env.get("DICOM_NODE_SPOOL_DIR", self.home / "spool"))

    def start(self) -> NodeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", *self.command],
                env=self.env,
                cwd=self.home,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        self._wait_started()
        return self

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(e.get("event") == "node started" for e in self.log_events()):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.stderr()}")
            time.sleep(0.1)
        raise TimeoutError(f"node did not start in {START_TIMEOUT_S}s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another ``dicom-node`` command against this node's configuration."""
        return run([sys.executable, "-m", "dicom_node", *args], env=self.env, cwd=self.home)


def instance_rows(database_url: str, sop_instance_uid: str | None = None) -> list[dict[str, Any]]:
    """Instance rows as dicts (straight SQL, independent of the code under test)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            query = "SELECT * FROM instances"
            params: dict[str, Any] = {}
            if sop_instance_uid is not None:
                query += " WHERE sop_instance_uid = :uid"
                params["uid"] = sop_instance_uid
            return [
                dict(row._mapping) for row in conn.execute(text(query + " ORDER BY id"), params)
            ]
    finally:
        engine.dispose()


def scalar(database_url: str, sql: str, **params: Any) -> Any:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()
    finally:
        engine.dispose()
