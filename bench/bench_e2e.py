"""End-to-end latency and throughput: C-STORE in, SR + heatmap SC acknowledged by the PACS.

Starts a real Orthanc (the archive) and ``dicom-node serve`` (workers on, Orthanc as the
destination ``pacs``), then sends uncompressed 2500×2048 16-bit DX chest radiographs
(NIH sample images upscaled, with their real age, sex and view; fresh UIDs for every
send) to the node with pynetdicom, the way a modality does:

1. **latency** — ``--images`` (50) images one at a time, one association each; an image's
   latency runs from just before its association is requested until Orthanc has
   acknowledged both its SR and its SC (the ``sent_at`` the node records right after the
   C-STORE response). Prints p50 and p95;
2. **throughput** — a burst of ``--burst`` (100) images in one association; images per
   minute from the first C-STORE to the last result acknowledged by Orthanc.

    python bench/bench_e2e.py [--images 50] [--burst 100] [--database-url URL] [--out FILE]

Targets on 2 CPU cores: p50 ≤ 1.0 s, p95 ≤ 2.0 s, ≥ 60 images/min. Run it on an idle
machine: the engine is CPU-bound, and anything else running shows up in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers start Orthanc and the node the same way

from tests.e2e.orthanc import LOOPBACK, Orthanc, run_orthanc  # noqa: E402
from tests.nih_dicom import NihImage, dx_dataset, pick, read_labels  # noqa: E402
from tests.support import NodeProcess, as_child, free_port  # noqa: E402

ROWS, COLUMNS = 2500, 2048
TARGET_P50_S, TARGET_P95_S, TARGET_PER_MIN = 1.0, 2.0, 60.0
POLL_S = 0.01
TIMEOUT_S = 600.0
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def data_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or REPO.parent / "shared" / "data")


def large_pixels(image: NihImage) -> np.ndarray:
    """The 8-bit PNG resampled to 2500×2048 and spread over 12 bits, stored in 16."""
    grey = Image.open(image.path).convert("F").resize((COLUMNS, ROWS), Image.Resampling.BILINEAR)
    values = np.asarray(grey, dtype=np.float32) * 16.0
    noise = np.random.default_rng(image.patient).normal(0, 4, values.shape)
    return np.clip(values + noise, 0, 4095).astype(np.uint16)


def templates(count: int = 4) -> list[Dataset]:
    images = pick(read_labels(data_dir() / "nih-sample"), {"PA": count // 2, "AP": count // 2})
    # Aged as children: inside the pneumonia model's population, so every image is scored.
    return [as_child(dx_dataset(image, large_pixels(image))) for image in images]


def fresh(template: Dataset) -> Dataset:
    """The template as a new acquisition: new study, series and instance UIDs."""
    ds = Dataset()
    ds.update(template)
    ds.file_meta = template.file_meta
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    return ds


def stream(count: int, bases: list[Dataset]) -> Iterator[Dataset]:
    for index in range(count):
        yield fresh(bases[index % len(bases)])


class Sender:
    """pynetdicom C-STORE SCU to the node."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE(ae_title="BENCH_DX")
        self.ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)

    def send(self, datasets: Iterator[Dataset]) -> list[tuple[str, float]]:
        """One association for all; returns (SOP Instance UID, start time) per image."""
        started = time.time()
        assoc = self.ae.associate(LOOPBACK, self.port, ae_title="CXR_AI")
        if not assoc.is_established:
            raise ConnectionError("the node refused the association")
        sent = []
        try:
            for index, ds in enumerate(datasets):
                status = assoc.send_c_store(ds)
                if int(getattr(status, "Status", -1)) != 0:
                    raise RuntimeError(f"C-STORE failed: {status}")
                sent.append((str(ds.SOPInstanceUID), started if index == 0 else time.time()))
        finally:
            assoc.release()
        return sent


class Outbox:
    """Reads, from the node's database, when the PACS acknowledged each image's results."""

    QUERY = text(
        "SELECT i.sop_instance_uid, COUNT(*), MAX(s.sent_at) FROM sends s "
        "JOIN instances i ON s.instance_id = i.id WHERE s.state = 'sent' "
        "GROUP BY i.sop_instance_uid"
    )

    JOBS = text(
        "SELECT i.sop_instance_uid, j.state, j.last_error FROM jobs j "
        "JOIN instances i ON j.instance_id = i.id WHERE j.state NOT IN ('done')"
    )

    def __init__(self, url: str, orthanc: Orthanc) -> None:
        self.engine = create_engine(url)
        self.orthanc = orthanc

    def acknowledged(self) -> dict[str, datetime]:
        """SOP Instance UID → moment both its SR and SC were acknowledged."""
        with self.engine.connect() as conn:
            rows = conn.execute(self.QUERY).all()
        return {uid: _utc(last) for uid, count, last in rows if count >= 2}

    def wait_for(self, uids: list[str]) -> dict[str, datetime]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            done = self.acknowledged()
            if all(uid in done for uid in uids):
                return {uid: done[uid] for uid in uids}
            self._check_jobs(set(uids) - set(done))
            self._check_orthanc()
            time.sleep(POLL_S)
        raise TimeoutError("results not acknowledged in time (see the node's log)")

    def _check_orthanc(self) -> None:
        process = self.orthanc.process
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {process.returncode}:\n{self.orthanc.log_tail()}"
            )

    def _check_jobs(self, waiting: set[str]) -> None:
        """Stop at once when a job went wrong instead of waiting for the timeout."""
        with self.engine.connect() as conn:
            rows = conn.execute(self.JOBS).all()
        for uid, state, error in rows:
            if uid in waiting and (state in ("failed", "skipped") or error):
                raise RuntimeError(f"job of {uid} is {state}: {error}")


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite hands back text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def latency_run(sender: Sender, outbox: Outbox, bases: list[Dataset], count: int) -> list[float]:
    latencies = []
    for ds in stream(count, bases):
        ((uid, started),) = sender.send(iter([ds]))
        acknowledged = outbox.wait_for([uid])[uid]
        latencies.append(acknowledged.timestamp() - started)
    return latencies


def burst_run(sender: Sender, outbox: Outbox, bases: list[Dataset], count: int) -> dict[str, float]:
    started = time.time()
    sent = sender.send(stream(count, bases))
    received_s = time.time() - started
    done = outbox.wait_for([uid for uid, _ in sent])
    total_s = max(moment.timestamp() for moment in done.values()) - started
    return {
        "images": count,
        "receive_s": round(received_s, 2),
        "total_s": round(total_s, 2),
        "images_per_minute": round(count / total_s * 60, 1),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_node(
    work: Path, orthanc: Orthanc, database_url: str, inference: dict[str, Path]
) -> NodeProcess:
    config = work / "node.toml"
    bundles = "".join(f'{key} = "{path.resolve()}"\n' for key, path in inference.items())
    config.write_text(
        f'[[destinations]]\nname = "pacs"\nae_title = "{orthanc.aet}"\nhost = "{LOOPBACK}"\n'
        f"port = {orthanc.dicom_port}\n\n[retention]\nenabled = false\n\n"
        f"[inference]\n{bundles}"
    )
    node = NodeProcess(
        home=work / "node",
        database_url=database_url,
        port=free_port(),
        config_file=config,
        workers=True,
    ).start()
    deadline = time.monotonic() + TIMEOUT_S
    while not any(e.get("event") == "worker ready" for e in node.log_events()):
        if time.monotonic() > deadline:
            raise TimeoutError("worker not ready:\n" + node.stderr()[-3000:])
        time.sleep(0.2)
    return node


def peak_rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of a running process from /proc: now (VmRSS) and its peak since
    start (VmHWM), MiB — read just before the node stops, VmHWM covers the whole run."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = round(int(value.split()[0]) / 1024, 1)  # kB
    return {"rss_mib": figures["VmRSS"], "peak_rss_mib": figures["VmHWM"]}


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(
    images: int = 50,
    burst: int = 100,
    warmup: int = 3,
    database_url: str | None = None,
    screen_bundle: Path | None = None,
    confirm_bundle: Path | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Latency and burst runs against a fresh Orthanc and node; the report as a dict
    (``bench/run_all.py`` calls it). Besides the figures it reports the node's resident
    memory with both models loaded and the spool's bytes per image (disk sizing)."""
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    database_url = database_url or f"sqlite:///{work / 'node.db'}"
    print(f"preparing {ROWS}×{COLUMNS} 16-bit DX images …", file=sys.stderr)
    bases = templates()
    with run_orthanc(work / "orthanc") as orthanc:
        bundles = {
            key: path
            for key, path in (
                ("screen_bundle", screen_bundle),
                ("confirm_bundle", confirm_bundle),
            )
            if path is not None
        }
        node = start_node(work, orthanc, database_url, bundles)
        try:
            sender, outbox = Sender(node.port), Outbox(database_url, orthanc)
            latency_run(sender, outbox, bases, warmup)
            print(f"latency: {images} images, one at a time …", file=sys.stderr)
            latencies = latency_run(sender, outbox, bases, images)
            print(f"throughput: a burst of {burst} …", file=sys.stderr)
            burst_figures = burst_run(sender, outbox, bases, burst)
            assert node.proc is not None
            memory = peak_rss_mib(node.proc.pid)
        finally:
            node.stop()
        received = warmup + images + burst
        report: dict[str, Any] = {
            "cpu_count": os.cpu_count(),
            "image": f"{ROWS}x{COLUMNS} 16-bit DX, uncompressed",
            "latency_s": {
                "n": len(latencies),
                "p50": round(statistics.median(latencies), 3),
                "p95": round(percentile(latencies, 95), 3),
                "mean": round(statistics.fmean(latencies), 3),
                "max": round(max(latencies), 3),
            },
            "burst": burst_figures,
            "node_memory": memory,
            "spool_bytes_per_image": round(disk_bytes(node.spool) / received),
            "orthanc_instances": len(orthanc.instances()),
        }
    report["targets_met"] = {
        "p50": report["latency_s"]["p50"] <= TARGET_P50_S,
        "p95": report["latency_s"]["p95"] <= TARGET_P95_S,
        "images_per_minute": burst_figures["images_per_minute"] >= TARGET_PER_MIN,
    }
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="sequential images")
    parser.add_argument("--burst", type=int, default=100, help="images in the burst")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured images first")
    parser.add_argument("--database-url", help="default: SQLite in the work folder")
    parser.add_argument("--screen-bundle", type=Path, help="default: the shipped bundle")
    parser.add_argument("--confirm-bundle", type=Path, help="default: the shipped bundle")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    report = run(
        args.images,
        args.burst,
        args.warmup,
        args.database_url,
        args.screen_bundle,
        args.confirm_bundle,
        args.keep,
    )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(report["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
