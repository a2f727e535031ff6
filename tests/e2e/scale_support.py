"""Helpers of the scale-out and fault tests: bursts of small chest images, dcmtk's view of
what it sent, worker processes, and a private PostgreSQL server that a test may restart.

Burst images are NIH sample chest radiographs downscaled to 256×256 (the smallest matrix
the engine's gate accepts), wrapped as DX with their real age, sex and view, and given
fresh UIDs each time, so a burst of 200 is quick to send and every image is *scored*:
each one must come back as exactly one SR (and one heatmap SC).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from tests.e2e.orthanc import LOOPBACK, Orthanc
from tests.nih_dicom import dx_dataset, pick, read_labels, write
from tests.support import NODE_AE, START_TIMEOUT_S, STORESCU, NodeProcess, as_child, free_port, run

BURST_SIDE = 256
SR_SERIES = "AI CXR findings"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
SENT_FILE = re.compile(r"Sending file: (.+)$")
RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, *, every: float = 0.5
) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_ready(process: NodeProcess, timeout: float = START_TIMEOUT_S) -> None:
    """Until a node process has its engine loaded (its first ``worker ready`` event)."""

    def ready() -> bool:
        if process.proc is not None and process.proc.poll() is not None:
            raise RuntimeError(f"process exited:\n{process.stderr()[-3000:]}")
        return any(e.get("event") == "worker ready" for e in process.log_events())

    wait_for(ready, timeout, "the engine to load", every=0.2)


def split_config(path: Path, orthanc: Orthanc, job_lease: float) -> Path:
    """The split deployment's configuration: Orthanc as ``pacs``; short leases and polls,
    one inference thread per worker; no retention."""
    path.write_text(
        f"""
[[destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "{LOOPBACK}"
port = {orthanc.dicom_port}
timeout_s = 20

[worker]
batch_size = 4
poll_interval = 0.5
job_lease = {job_lease:g}

[sender]
poll_interval = 0.5
backoff_base = 0.5
backoff_cap = 2
lease = 8

[inference]
threads = 1
heatmaps = true

[retention]
enabled = false
"""
    )
    return path


def chest_burst(data_dir: Path, folder: Path, count: int, side: int = BURST_SIDE) -> list[Path]:
    """``count`` DX chest images (``side``² pixels) with fresh study, series and instance
    UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    images = pick(read_labels(data_dir / "nih-sample"), {"PA": 4, "AP": 4})
    files = []
    for index in range(count):
        image = images[index % len(images)]
        grey = Image.open(image.path).convert("L").resize((side, side))
        ds = as_child(dx_dataset(image, np.asarray(grey, dtype=np.uint8)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        files.append(write(ds, folder / f"burst-{index:04d}.dcm"))
    return files


def storescu_many(
    port: int, files: Sequence[Path], *, called_ae: str = NODE_AE
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu: every file in one association (explicit VR little endian)."""
    return run([STORESCU, "-v", "-xe", "-aec", called_ae, "127.0.0.1", str(port), *files])


def acknowledged(output: str) -> dict[Path, str]:
    """File → the status dcmtk storescu reported for it, read from its verbose log.

    Only files with a response appear: one sent when the association broke has none.
    """
    statuses: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines():
        if sent := SENT_FILE.search(line):
            current = Path(sent.group(1).strip())
        elif (answer := RESPONSE.search(line)) and current is not None:
            statuses[current] = answer.group(1)
            current = None
    return statuses


def rows(database_url: str, sql: str) -> list[Any]:
    """Rows of a query, straight SQL (independent of the code under test)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def settled(database_url: str, instances: int) -> bool:
    """``instances`` received, every job finished, every send delivered."""
    (received,) = rows(database_url, "SELECT count(*) FROM instances")[0]
    unfinished = rows(
        database_url, "SELECT count(*) FROM jobs WHERE state NOT IN ('done', 'skipped', 'failed')"
    )[0][0]
    undelivered = rows(database_url, "SELECT count(*) FROM sends WHERE state != 'sent'")[0][0]
    return bool(received == instances and unfinished == 0 and undelivered == 0)


def srs_per_source(orthanc: Orthanc) -> Counter[str]:
    """How many SRs of the node Orthanc holds for each source image."""
    found: Counter[str] = Counter()
    for instance_id in orthanc.find("Instance", {"SeriesDescription": SR_SERIES}):
        tags = orthanc.request("GET", f"/instances/{instance_id}/tags?simplify")
        (study,) = tags["CurrentRequestedProcedureEvidenceSequence"]
        (series,) = study["ReferencedSeriesSequence"]
        (image,) = series["ReferencedSOPSequence"]
        found[image["ReferencedSOPInstanceUID"]] += 1
    return found


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- a private PostgreSQL server -------------------------------------------------------------


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free loopback port, owned by ``postgres``.

    Tests that stop or restart the database server use this one, so the shared server
    (and every other test on it) is never disturbed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str, timeout: float = 120) -> None:
        """Run a PostgreSQL program as ``postgres``; output to a file, never a pipe (a
        server started by ``pg_ctl`` would hold the pipe open for as long as it runs)."""
        log = self.root / "pg_ctl.log"
        with log.open("ab") as output:
            result = subprocess.run(
                ["runuser", "-u", PG_USER, "--", *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed:\n{log.read_text(errors='replace')[-2000:]}")

    def init(self) -> PrivatePostgres:
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", PG_USER)
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "server.log"),
            "start",
        )

    def restart(self) -> None:
        self._pg(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "-l",
            str(self.root / "server.log"),
            "restart",
        )

    def stop(self) -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private cluster for the block; stopped and deleted afterwards."""
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"a private PostgreSQL needs root and {PG_BIN}/initdb")
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    shutil.chown(root, PG_USER, PG_USER)
    server = PrivatePostgres(root).init()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
