"""Soak: a steady stream for a long time; do memory, descriptors, threads or the database
grow without bound?

On a fresh PostgreSQL database: ``dicom-node serve --no-workers`` (listener, sender,
retention, HTTP API) and one ``dicom-node worker --threads 1`` process (real engine, one
torch thread, heatmaps on) deliver to an in-process DICOM archive that only counts. A
modality sends one chest radiograph (NIH sample at ``--side``² pixels, fresh UIDs each
time) every ``--interval`` seconds in its own association, and a dashboard reads the
worklist and the status every ``--api-poll`` seconds with the admin token (each worklist
read is an audit event). Retention is on, keeping nothing delivered (``keep_days = 0``,
a sweep a minute), so the spool stays a working set and only the database is history.

Every ``--sample`` seconds it records, for each node process, the resident memory
(``VmRSS``), open file descriptors (``/proc/PID/fd``) and threads, plus the database's
size (``pg_database_size``), the spool's bytes and the counts of images sent,
acknowledged, analysed and delivered. After ``--warmup`` minutes, a least-squares line
through the samples gives each slope: per hour for the processes, per image for the
database. A leak shows as a slope that does not vanish as the run gets longer; a
database that grows by a constant amount per image is history, not a leak.

    python bench/bench_soak.py [--minutes 30] [--interval 2] [--out bench/results/soak.json]

Run it in the background (it takes ``--minutes`` plus start-up and drain):

    nohup .venv/bin/python bench/bench_soak.py > /tmp/soak.log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers start the node the same way

from tests.e2e.scale_support import chest_burst, wait_ready  # noqa: E402
from tests.support import NODE_AE, NodeProcess, free_port, provision_database  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "soak.json"
ARCHIVE_AE = "SOAK_PACS"
DRAIN_S = 300.0
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def data_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or REPO.parent / "shared" / "data")


# -- the archive: counts what it receives ----------------------------------------------------


class CountingArchive:
    """A storage SCP that keeps only the SOP Instance UIDs it was sent (and how often)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stored: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: evt.Event) -> int:
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        with self._lock:
            self.stored[uid] = self.stored.get(uid, 0) + 1
        return 0x0000

    def start(self) -> CountingArchive:
        ae = AE(ae_title=ARCHIVE_AE)
        for sop_class in (COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
            ae.add_supported_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def figures(self) -> tuple[int, int]:
        """(objects received, objects received more than once)."""
        with self._lock:
            return len(self.stored), sum(1 for n in self.stored.values() if n > 1)


# -- the modality: one image per association, steadily -------------------------------------


@dataclass
class Modality:
    port: int
    images: list[pydicom.Dataset]
    interval: float
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        ae = AE(ae_title="SOAK_CR")
        ae.add_requested_context(DX_FOR_PRESENTATION, EXPLICIT_LE)
        next_at = time.monotonic()
        while not self.stop.is_set():
            dataset = copy.deepcopy(self.images[self.sent % len(self.images)])
            dataset.StudyInstanceUID = generate_uid()
            dataset.SeriesInstanceUID = generate_uid()
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            self.sent += 1
            try:
                assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
                if assoc.is_established:
                    status = assoc.send_c_store(dataset)
                    assoc.release()
                    if status and status.Status == 0x0000:
                        self.acknowledged += 1
                    else:
                        self.failed += 1
                else:
                    self.failed += 1
            except Exception:  # noqa: BLE001 - a soak keeps going and counts
                self.failed += 1
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))


# -- the dashboard: reads the API like an open browser tab ---------------------------------


@dataclass
class Dashboard:
    base_url: str
    token: str
    every: float
    reads: int = 0
    errors: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=30) as client:
            while not self.stop.wait(self.every):
                for path in ("/api/worklist", "/api/status"):
                    try:
                        ok = client.get(path).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    self.reads += ok
                    self.errors += not ok


# -- sampling ------------------------------------------------------------------------------


def process_figures(pid: int) -> dict[str, int]:
    """Resident memory (bytes), open descriptors and threads of one process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"].strip()),
    }


def folder_bytes(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed by retention meanwhile
                total += (Path(folder) / name).stat().st_size
    return total


def database_figures(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
            counts = {
                name: conn.execute(text(sql)).scalar()
                for name, sql in (
                    ("instances", "SELECT count(*) FROM instances"),
                    ("jobs_done", "SELECT count(*) FROM jobs WHERE state = 'done'"),
                    ("jobs_unfinished", "SELECT count(*) FROM jobs WHERE finished_at IS NULL"),
                    ("sends_sent", "SELECT count(*) FROM sends WHERE state = 'sent'"),
                    ("sends_open", "SELECT count(*) FROM sends WHERE state != 'sent'"),
                    ("purged", "SELECT count(*) FROM instances WHERE purged_at IS NOT NULL"),
                    ("audit_events", "SELECT count(*) FROM audit_events"),
                )
            }
    finally:
        engine.dispose()
    return {"database_bytes": int(size or 0), **{k: int(v or 0) for k, v in counts.items()}}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than three points)."""
    if len(xs) < 3 or len(set(xs)) < 2:
        return None
    return float(np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)[0])


def analyse(samples: list[dict[str, Any]], warmup_s: float, roles: list[str]) -> dict[str, Any]:
    """Slopes after the warm-up: per hour for processes, per image for the database."""
    kept = [s for s in samples if s["t_s"] >= warmup_s]
    hours = [s["t_s"] / 3600 for s in kept]
    report: dict[str, Any] = {"samples_fitted": len(kept), "processes": {}}
    for role in roles:
        figures: dict[str, Any] = {}
        for key in ("rss_bytes", "fds", "threads"):
            values = [s["processes"][role][key] for s in kept]
            per_hour = slope(hours, values)
            figures[key] = {
                "first": values[0] if values else None,
                "last": values[-1] if values else None,
                "max": max(values) if values else None,
                "slope_per_hour": None if per_hour is None else round(per_hour, 3),
            }
        rss_slope = figures["rss_bytes"]["slope_per_hour"]
        figures["rss_mib_per_hour"] = None if rss_slope is None else round(rss_slope / 2**20, 3)
        report["processes"][role] = figures
    images = [float(s["instances"]) for s in kept]
    report["database_bytes_per_image"] = _rounded(
        slope(images, [float(s["database_bytes"]) for s in kept])
    )
    report["database_bytes_per_hour"] = _rounded(
        slope(hours, [float(s["database_bytes"]) for s in kept])
    )
    report["spool_bytes_per_hour"] = _rounded(slope(hours, [float(s["spool_bytes"]) for s in kept]))
    report["audit_events_per_image"] = _rounded(
        slope(images, [float(s["audit_events"]) for s in kept]), 2
    )
    return report


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# -- the run -------------------------------------------------------------------------------


def node_config(path: Path, archive_port: int) -> Path:
    path.write_text(
        f"""
[[destinations]]
name = "pacs"
ae_title = "{ARCHIVE_AE}"
host = "127.0.0.1"
port = {archive_port}
timeout_s = 20

[worker]
threads = 1
batch_size = 4
poll_interval = 0.5

[sender]
poll_interval = 0.5

[inference]
threads = 1
heatmaps = true

[retention]
enabled = true
keep_days = 0
interval = 60

[logging]
to_file = false
"""
    )
    return path


def http_port(process: NodeProcess) -> int:
    for event in process.log_events():
        if event.get("event") == "node started" and event.get("http_port"):
            return int(event["http_port"])
    raise RuntimeError("the listener reported no HTTP port")


def soak(
    minutes: float,
    *,
    interval: float,
    sample_every: float,
    warmup_minutes: float,
    api_poll: float,
    side: int,
    out: Path | None,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    archive = CountingArchive(free_port()).start()
    samples: list[dict[str, Any]] = []
    try:
        files = chest_burst(data_dir(), root / "images", 8, side=side)
        images: list[pydicom.Dataset] = [pydicom.dcmread(f) for f in files]
        config = node_config(root / "node.toml", archive.port)
        env = {
            "DICOM_NODE_SPOOL_DIR": str(root / "spool"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        with provision_database("postgresql", root) as url:
            listener = NodeProcess(
                home=root / "listener",
                database_url=url,
                config_file=config,
                extra_env=env,
            )
            worker = NodeProcess(
                home=root / "worker",
                database_url=url,
                config_file=config,
                workers=True,
                command=("worker", "--threads", "1"),
                extra_env=env,
            )
            processes = {"listener": listener, "worker": worker}
            try:
                listener.start()
                worker.start()
                wait_ready(worker)
                token = (root / "listener" / "api-token").read_text().strip()
                modality = Modality(listener.port, images, interval)
                dashboard = Dashboard(f"http://127.0.0.1:{http_port(listener)}", token, api_poll)
                threads = [threading.Thread(target=modality.run, name="modality", daemon=True)]
                if api_poll > 0:
                    threads.append(threading.Thread(target=dashboard.run, daemon=True))
                started = time.monotonic()
                for thread in threads:
                    thread.start()

                def sample() -> dict[str, Any]:
                    received, duplicated = archive.figures()
                    entry: dict[str, Any] = {
                        "t_s": round(time.monotonic() - started, 1),
                        "sent": modality.sent,
                        "acknowledged": modality.acknowledged,
                        "failed": modality.failed,
                        "archive_objects": received,
                        "archive_duplicates": duplicated,
                        "api_reads": dashboard.reads,
                        "spool_bytes": folder_bytes(root / "spool"),
                        "processes": {
                            role: process_figures(p.proc.pid)
                            for role, p in processes.items()
                            if p.proc is not None
                        },
                        **database_figures(url),
                    }
                    print(json.dumps(entry), file=sys.stderr, flush=True)
                    return entry

                deadline = started + minutes * 60
                next_sample = started
                while time.monotonic() < deadline:
                    samples.append(sample())
                    for role, process in processes.items():
                        if process.proc is None or process.proc.poll() is not None:
                            raise RuntimeError(f"{role} exited:\n{process.stderr()[-3000:]}")
                    next_sample += sample_every
                    time.sleep(max(0.0, min(next_sample, deadline) - time.monotonic()))
                samples.append(sample())
                modality.stop.set()
                dashboard.stop.set()
                for thread in threads:
                    thread.join(timeout=60)
                drained_in = _drain(url, archive, modality.acknowledged)
                final = sample()
            finally:
                for process in processes.values():
                    process.stop()
        report = {
            "minutes": minutes,
            "interval_s": interval,
            "sample_every_s": sample_every,
            "warmup_minutes": warmup_minutes,
            "api_poll_s": api_poll,
            "image": f"{side}x{side} 8-bit DX",
            "cpu_count": os.cpu_count(),
            "sent": modality.sent,
            "acknowledged": modality.acknowledged,
            "failed": modality.failed,
            "jobs_done": final["jobs_done"],
            "delivered_objects": final["archive_objects"],
            "duplicate_deliveries": final["archive_duplicates"],
            "purged_instances": final["purged"],
            "drained_in_s": drained_in,
            "api_reads": dashboard.reads,
            "api_errors": dashboard.errors,
            "slopes": analyse(samples, warmup_minutes * 60, list(processes)),
            "offered_images_per_minute": round(60 / interval, 1),
            "samples": samples,
            "generated_at": datetime.now(UTC).isoformat(),
        }
        report["median_rss_mib"] = {
            role: round(
                statistics.median(s["processes"][role]["rss_bytes"] for s in samples) / 2**20
            )
            for role in processes
        }
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        archive.stop()
        shutil.rmtree(root, ignore_errors=True)


def _drain(url: str, archive: CountingArchive, acknowledged: int) -> float | None:
    """Seconds until every acknowledged image is analysed and its results delivered."""
    start = time.monotonic()
    while time.monotonic() - start < DRAIN_S:
        figures = database_figures(url)
        if (
            figures["instances"] >= acknowledged
            and figures["jobs_unfinished"] == 0
            and figures["sends_open"] == 0
        ):
            return round(time.monotonic() - start, 1)
        time.sleep(1.0)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the stream")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between images")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes left out of fits")
    parser.add_argument("--api-poll", type=float, default=5.0, help="dashboard reads (0: none)")
    parser.add_argument("--side", type=int, default=256, help="image rows = columns")
    parser.add_argument("--database-url", help="PostgreSQL server [default: TEST_POSTGRES_URL]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    args = parser.parse_args()
    if args.database_url:
        os.environ["TEST_POSTGRES_URL"] = args.database_url
    report = soak(
        args.minutes,
        interval=args.interval,
        sample_every=args.sample,
        warmup_minutes=min(args.warmup, args.minutes / 2),
        api_poll=args.api_poll,
        side=args.side,
        out=args.out,
    )
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
