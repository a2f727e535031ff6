"""Receive throughput: ``dicom-node serve`` versus pynetdicom's bare ``storescp``.

Sends the same 30 uncompressed 2500×2048 16-bit DX images with dcmtk ``storescu`` (one
association per batch) to

  (a) the node — durable writes on: fsync of file and directory, database commit and
      audit record before every Success;
  (b) ``python -m pynetdicom storescp`` writing every object to a directory;

alternating the order every round (ABBA…) so that a busy machine penalises both alike.
``storescu +II`` gives every image a fresh SOP Instance UID on every send, so the node
does the full work of a first arrival each round instead of acknowledging duplicates.
Both receivers are given the same maximum PDU size, so the comparison measures what
they do with the data, not how it is fragmented.

    python bench/bench_receive.py [--rounds 5] [--images 30] [--keep]

Target: median(node) ≤ 1.15 × median(storescp).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' helpers

from tests.support import free_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
ROWS, COLUMNS = 2500, 2048
MAX_PDU = 131072  # dcmtk's largest; the node's default (256 KiB) would be capped to it
TARGET_RATIO = 1.15


def wait_for_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port}")


def chest_like_pixels(rng: np.random.Generator) -> np.ndarray:
    """12-bit image with the broad structure of a chest film plus quantum noise."""
    y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    cy, cx = ROWS * 0.45, COLUMNS / 2
    body = np.exp(-(((x - cx) / (COLUMNS * 0.42)) ** 2 + ((y - cy) / (ROWS * 0.55)) ** 4))
    lungs = sum(
        np.exp(
            -(
                ((x - cx + s * COLUMNS * 0.2) / (COLUMNS * 0.13)) ** 2
                + ((y - cy) / (ROWS * 0.28)) ** 2
            )
        )
        for s in (-1, 1)
    )
    image = 300 + 2600 * body - 1500 * lungs
    image += rng.normal(0, 40, size=image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def dx_dataset(pixels: np.ndarray, index: int, study_uid: str, series_uid: str) -> Dataset:
    """A DX For Presentation image with the attributes a real detector sends."""
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID = "BENCH^RECEIVE", "BENCH0001"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID = f"BENCH{index:05d}", "1"
    ds.Modality, ds.Manufacturer = "DX", "Benchmark"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.DetectorType = "DIRECT"
    ds.KVP, ds.ExposureTime, ds.XRayTubeCurrent = 120, 10, 250
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.139, 0.139]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def generate(directory: Path, count: int) -> None:
    rng = np.random.default_rng(20250101)
    base = chest_like_pixels(rng)
    study_uid, series_uid = generate_uid(), generate_uid()
    for index in range(count):
        noise = rng.integers(-8, 9, size=base.shape, dtype=np.int16)
        pixels = np.clip(base.astype(np.int32) + noise, 0, 4095).astype(np.uint16)
        dx_dataset(pixels, index, study_uid, series_uid).save_as(
            directory / f"dx{index:03d}.dcm", enforce_file_format=True
        )


@contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str], port: int) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(port: int, called_ae: str, files: list[Path]) -> float:
    cmd = [
        STORESCU,
        "-R",
        "-xe",
        "+II",
        "-aec",
        called_ae,
        "-pdu",
        str(MAX_PDU),
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed:\n{result.stderr[-2000:]}")
    return elapsed


def run(rounds: int = 5, count: int = 30, keep: bool = False) -> dict[str, Any]:
    """Send ``count`` images to both receivers in ``rounds`` alternating rounds; the
    medians, their ratio and whether it meets the target (``bench/run_all.py`` calls it)."""
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    images, node_home, bare_out = work / "images", work / "node", work / "storescp"
    for path in (images, node_home, bare_out):
        path.mkdir()
    print(f"generating {count} DX images {COLUMNS}x{ROWS} 16-bit in {images} …")
    generate(images, count)
    files = sorted(images.glob("*.dcm"))
    megabytes = sum(p.stat().st_size for p in files) / 1e6

    node_port, bare_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    node_env = {
        **env,
        "DICOM_NODE_HOME": str(node_home),
        "DICOM_NODE_HOST": "127.0.0.1",
        "DICOM_NODE_PORT": str(node_port),
        "DICOM_NODE_HTTP_PORT": "0",
        "DICOM_NODE_NODE__MAX_PDU_SIZE": str(MAX_PDU),
        "DICOM_NODE_STORAGE__DURABLE_WRITES": "true",
    }
    node_cmd = [sys.executable, "-m", "dicom_node", "serve"]
    bare_cmd = [
        sys.executable,
        "-m",
        "pynetdicom",
        "storescp",
        str(bare_port),
        "-q",
        "-aet",
        "STORESCP",
        "-od",
        str(bare_out),
        "-pdu",
        str(MAX_PDU),
        "-ba",
        "127.0.0.1",
    ]
    times: dict[str, list[float]] = {"node": [], "storescp": []}
    targets = {"node": (node_port, "CXR_AI"), "storescp": (bare_port, "STORESCP")}
    with (
        process(node_cmd, work / "node.log", node_env, node_port),
        process(bare_cmd, work / "storescp.log", env, bare_port),
    ):
        send(node_port, "CXR_AI", files[:1])  # warm-up: imports, first DB rows
        send(bare_port, "STORESCP", files[:1])
        for round_no in range(rounds):
            order = ["node", "storescp"] if round_no % 2 == 0 else ["storescp", "node"]
            for name in order:
                times[name].append(send(*targets[name], files))
            print(
                f"round {round_no + 1}: node {times['node'][-1]:.2f} s, "
                f"storescp {times['storescp'][-1]:.2f} s"
            )
    node_median = statistics.median(times["node"])
    bare_median = statistics.median(times["storescp"])
    ratio = node_median / bare_median
    stored = len(list((node_home / "spool" / "objects").rglob("*.dcm")))
    print(f"\n{count} images, {megabytes:.0f} MB per batch, {rounds} rounds")
    print(f"node (durable)      median {node_median:.2f} s  ({megabytes / node_median:.0f} MB/s)")
    print(f"pynetdicom storescp median {bare_median:.2f} s  ({megabytes / bare_median:.0f} MB/s)")
    print(f"ratio node/storescp {ratio:.3f}  (target ≤ {TARGET_RATIO})")
    print(f"node stored {stored} objects")
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "images": count,
        "rounds": rounds,
        "megabytes_per_batch": round(megabytes, 1),
        "node_median_s": round(node_median, 3),
        "storescp_median_s": round(bare_median, 3),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "node_stored": stored,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    return 0 if run(args.rounds, args.images, args.keep)["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
