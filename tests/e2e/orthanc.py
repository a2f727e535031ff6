"""A real Orthanc PACS for end-to-end tests, on free loopback ports.

:func:`run_orthanc` starts the Debian ``Orthanc`` binary (never the system service) with
a temporary JSON configuration: storage and index in a temporary folder, HTTP and DICOM
on free ports, REST API for localhost only and without authentication, no plugins, any
calling AE may C-ECHO and C-STORE. The DICOM modalities it knows are given by the caller,
so the node under test can be registered as a C-STORE destination. It waits until
``/system`` answers and always stops the process again — at the end of the ``with``
block, and also when the test process itself dies (parent-death signal via ``setpriv``).

Orthanc 1.10 has no option to bind its DICOM port to one interface; the port is free and
random, HTTP only answers loopback clients (``RemoteAccessAllowed: false``).

``run_orthanc(..., dicomweb=True)`` loads the Debian ``orthanc-dicomweb`` plugin
(:data:`DICOMWEB_PLUGIN`; DICOMweb at :attr:`Orthanc.dicomweb_url`), for STOW-RS tests.

Fixtures (import them into a test module; override ``orthanc_modalities`` there)::

    orthanc             one server per module (scope from ORTHANC_FIXTURE_SCOPE)
    orthanc_modalities  {name: Modality} written into the configuration; default none
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

ORTHANC_BINARY = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")
SCOPE_ENV = "ORTHANC_FIXTURE_SCOPE"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 90.0  # generous: the test machine may be busy training models
STOP_TIMEOUT = 20.0
DICOMWEB_PLUGIN = Path(
    os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
)
DICOMWEB_ROOT = "/dicom-web/"
START_ATTEMPTS = 3  # a free port can be taken between choosing it and Orthanc binding it


class OrthancError(RuntimeError):
    """Orthanc did not start, or its REST API answered with an error."""


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc may send to (an entry of ``DicomModalities``)."""

    aet: str
    host: str
    port: int

    def as_config(self) -> list[str | int]:
        return [self.aet, self.host, self.port]


def configuration(
    workdir: Path,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, Modality],
    dicomweb: bool = False,
) -> dict[str, Any]:
    """Orthanc's configuration for one isolated test server (``dicomweb``: with the
    DICOMweb plugin)."""
    storage = workdir / "storage"
    extra: dict[str, Any] = {}
    if dicomweb:
        extra["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False}
    return {
        **extra,
        "Name": f"test-orthanc-{http_port}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "HttpThreadsCount": 4,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomThreadsCount": 2,
        "DicomAssociationCloseDelay": 0,
        "DicomModalities": {name: m.as_config() for name, m in modalities.items()},
        "DicomModalitiesInDatabase": False,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "DeidentifyLogs": True,
        "StableAge": 1,
    }


def _command(config: Path) -> list[str]:
    """Orthanc, wrapped by util-linux ``setpriv`` where available so that it gets SIGTERM
    when the test process dies (parent-death signal): Orthanc never outlives the tests.
    ``setpriv`` rather than a ``preexec_fn``, which is unsafe in a threaded process."""
    setpriv = shutil.which("setpriv")
    wrapper = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
    return [*wrapper, ORTHANC_BINARY, str(config)]


class Orthanc:
    """A running Orthanc: its DICOM address, its REST API and a few helpers on top."""

    def __init__(self, aet: str, dicom_port: int, http_port: int, log: Path) -> None:
        self.aet = aet
        self.host = LOOPBACK
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.http_url = f"http://{LOOPBACK}:{http_port}"
        self.dicomweb_url = self.http_url + DICOMWEB_ROOT.rstrip("/")
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None  # set once started
        # Loopback traffic must not go through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- REST ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        """Call the REST API; JSON in and out (``raw`` returns the bytes)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=60) as response:
                payload: bytes = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/system")
        return result

    def instances(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        result: list[str] = self.request("GET", "/instances")
        return result

    def get_instance_tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's main tags by keyword (``/instances/{id}/simplified-tags``)."""
        result: dict[str, Any] = self.request("GET", f"/instances/{instance_id}/simplified-tags")
        return result

    def find(self, level: str, query: Mapping[str, str], *, expand: bool = False) -> list[Any]:
        """``/tools/find`` at ``level`` (Patient, Study, Series, Instance)."""
        body = {"Level": level, "Query": dict(query), "Expand": expand}
        result: list[Any] = self.request("POST", "/tools/find", body)
        return result

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc identifier of the instance with this SOP Instance UID, if stored."""
        found = self.find("Instance", {"SOPInstanceUID": sop_instance_uid})
        return str(found[0]) if found else None

    def download(self, instance_id: str) -> bytes:
        """The stored PS3.10 file."""
        result: bytes = self.request("GET", f"/instances/{instance_id}/file", raw=True)
        return result

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store a PS3.10 file through the REST API (``POST /instances``)."""
        req = urllib.request.Request(self.http_url + "/instances", data=data, method="POST")
        req.add_header("Content-Type", "application/dicom")
        with self._opener.open(req, timeout=60) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def store_to_modality(self, modality: str, resources: Sequence[str]) -> dict[str, Any]:
        """C-STORE ``resources`` (any level) to a configured modality, synchronously."""
        body = {"Resources": list(resources), "Synchronous": True}
        result: dict[str, Any] = self.request(
            "POST", f"/modalities/{urllib.parse.quote(modality)}/store", body
        )
        return result

    def add_modality(self, name: str, modality: Modality) -> None:
        """Register (or replace) a modality at run time."""
        body = {"AET": modality.aet, "Host": modality.host, "Port": modality.port}
        self.request("PUT", f"/modalities/{urllib.parse.quote(name)}", body)

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.request("GET", "/patients"):
            self.request("DELETE", f"/patients/{patient}")

    # -- lifecycle ---------------------------------------------------------------------------

    def wait_until_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {process.returncode}\n{self.log_tail()}")
            with contextlib.suppress(OSError, OrthancError):
                self.system()
                return
            time.sleep(0.2)
        raise OrthancError(f"Orthanc did not answer within {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _start(
    workdir: Path,
    aet: str,
    modalities: Mapping[str, Modality],
    dicom_port: int | None = None,
    http_port: int | None = None,
    dicomweb: bool = False,
) -> tuple[Orthanc, Any]:
    dicom_port, http_port = dicom_port or free_port(), http_port or free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = workdir / f"orthanc-{http_port}.json"
    settings = configuration(workdir, aet, dicom_port, http_port, modalities, dicomweb)
    config.write_text(json.dumps(settings))
    server = Orthanc(aet, dicom_port, http_port, workdir / f"orthanc-{http_port}.log")
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            _command(config),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server.process = process
    return server, process


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def run_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, Modality] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    dicom_port: int | None = None,
    http_port: int | None = None,
    dicomweb: bool = False,
) -> Iterator[Orthanc]:
    """A running Orthanc for the duration of the block, stopped afterwards whatever happens.

    ``dicom_port`` fixes the DICOM port (e.g. one a node was already told to send to), and
    ``http_port`` the HTTP port (e.g. to restart a server at the URL a destination has);
    by default free ones are chosen. ``dicomweb`` loads the DICOMweb plugin. The same
    ``workdir`` keeps the stored instances across restarts.
    """
    if not Path(ORTHANC_BINARY).is_file():
        pytest.fail(f"Orthanc not installed at {ORTHANC_BINARY} (Debian package orthanc)")
    if dicomweb and not DICOMWEB_PLUGIN.is_file():
        pytest.fail(f"DICOMweb plugin not installed at {DICOMWEB_PLUGIN} (orthanc-dicomweb)")
    workdir.mkdir(parents=True, exist_ok=True)
    failure: OrthancError | None = None
    for _ in range(START_ATTEMPTS):
        server, process = _start(workdir, aet, modalities or {}, dicom_port, http_port, dicomweb)
        try:
            server.wait_until_ready(process, startup_timeout)
        except OrthancError as exc:
            _stop(process)
            failure = exc
            continue
        try:
            yield server
        finally:
            _stop(process)
        return
    raise OrthancError(f"Orthanc failed to start {START_ATTEMPTS} times: {failure}")


def _scope(fixture_name: str, config: pytest.Config) -> str:
    """``module`` unless ORTHANC_FIXTURE_SCOPE says function, class, package or session."""
    return os.environ.get(SCOPE_ENV, "module")


@pytest.fixture(scope=_scope)  # type: ignore[arg-type]
def orthanc_modalities() -> dict[str, Modality]:
    """DICOM peers to configure; override in a test module to register the node."""
    return {}


@pytest.fixture(scope=_scope)  # type: ignore[arg-type]
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, orthanc_modalities: dict[str, Modality]
) -> Iterator[Orthanc]:
    """A fresh Orthanc with ``orthanc_modalities`` configured, stopped at teardown."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), modalities=orthanc_modalities) as server:
        yield server
