"""Shared fixtures: the shared data set, both database backends, node processes.

Every test that takes ``database_url`` runs twice, on SQLite and on PostgreSQL (a fresh
database per test on the server named by ``TEST_POSTGRES_URL``). Missing shared data or
an unreachable PostgreSQL is a *failure*, not a skip: a green run must mean the node
was tested against both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.receive import StoreService
from storage.db import make_engine, make_session_factory, upgrade
from storage.spool import Spool
from tests.support import (
    DCMTK_STORESCP,
    ECHOSCU,
    REPO_ROOT,
    STORESCU,
    NodeProcess,
    provision_database,
)

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def _no_ambient_node_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not pick up an operator's DICOM_NODE_* environment."""
    for name in list(os.environ):
        if name.startswith("DICOM_NODE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("CXR_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not (path / "dicom" / "manifest.csv").is_file():
        pytest.fail(f"shared data not found at {path} (set CXR_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def image_files(data_dir: Path) -> list[Path]:
    """Every image in the shared DICOM folder (the SR sample is not an image)."""
    files = sorted((data_dir / "dicom").glob("*.dcm"))
    images = [p for p in files if pydicom.dcmread(p, stop_before_pixels=True).Modality != "SR"]
    assert len(images) >= 10, f"expected the shared chest images, found {len(images)}"
    return images


@pytest.fixture(scope="session")
def sr_file(data_dir: Path) -> Path:
    return data_dir / "dicom" / "example-tid1500-sr.dcm"


@pytest.fixture(scope="session")
def rg1_uncr() -> Path:
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.fail("pydicom-data's RG1_UNCR.dcm is not installed")
    return Path(str(path))


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """dcmtk must be installed (by .ci/run); without it the e2e tests cannot run."""
    missing = [str(p) for p in (STORESCU, ECHOSCU, DCMTK_STORESCP) if not p.exists()]
    if missing:
        pytest.fail(f"dcmtk binaries missing: {', '.join(missing)}")


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend (function scope)."""
    with provision_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated database."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


@pytest.fixture
def data(data_dir: Path) -> Path:
    """The shared DICOM folder."""
    return data_dir / "dicom"


@pytest.fixture
def store(spool: Spool, sessions: sessionmaker[Session]) -> StoreService:
    """The real receive path into ``spool`` and ``sessions``."""
    return StoreService(spool, sessions, min_free_bytes=0)


@pytest.fixture(scope="module", params=BACKENDS)
def running_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, dcmtk: None
) -> Iterator[NodeProcess]:
    """One ``dicom-node serve`` per backend, shared by the tests of a module."""
    home = tmp_path_factory.mktemp(f"node-{request.param}")
    with provision_database(request.param, home) as url:
        node = NodeProcess(home=home, database_url=url).start()
        try:
            yield node
        finally:
            node.stop()
