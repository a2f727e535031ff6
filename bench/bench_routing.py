"""A burst through the PACS: Orthanc routes chest radiographs to the node, results come back.

Starts a real Orthanc running the shipped Lua router (``deploy/pacs/orthanc/``, the node
registered as modality ``cxr-ai-node``) and ``dicom-node serve`` (real engine, Orthanc as
destination ``pacs``), then sends ``--images`` frontal chest radiographs (NIH sample and
pediatric Kermany images as DX: up to 24 distinct ones are checked with ``dicom-node
analyze``, and those it scores are repeated as new acquisitions, each its own study)
plus ``--decoys`` images the router must not forward (laterals and hips made of the same
pixels) into Orthanc with dcmtk ``storescu`` in **one association**, as a modality or a
migration would. It waits until
the node has analysed and delivered everything and Orthanc's studies — now holding the
results — have become stable again (the router sweeps each of them once more), then
counts:

* **forwarded**, **lost** (a frontal image the node never received), **duplicates**
  (received more than once), **misrouted** (a decoy that reached the node), **loops**
  (one of the node's own objects that reached the node);
* **SR per image**: for every frontal image, how many of the node's SRs for it Orthanc
  holds — the target is exactly one each (``missing_sr``, ``extra_sr``), and the number
  of SRs in Orthanc equals the number of images;
* time from the first C-STORE into Orthanc to the last result acknowledged by Orthanc,
  and images per minute.

    python bench/bench_routing.py [--images 10] [--decoys 4] [--router lua|python] [--out FILE]

Exit status 0 when nothing was lost, duplicated, misrouted or looped and every image has
exactly one SR in Orthanc. ``--images 100`` is the figure to quote; the small default is
a smoke run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers start Orthanc and the node the same way

from tests.e2e.test_pacs_routing import (  # noqa: E402
    SR_SERIES,
    RoutedSite,
    forward_log_lines,
    kermany_chests,
    nih_chests,
    routed_site,
)
from tests.support import STORESCU  # noqa: E402

TIMEOUT_S = 1800.0
POLL_S = 0.5
STABLE_WAIT_S = 4.0  # Orthanc's StableAge in the test configuration is 1 s
POOL_SIZE = 24  # distinct images checked with the engine before the burst


def data_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or REPO.parent / "shared" / "data")


def scorable_pool(folder: Path, candidates: int) -> list[Path]:
    """NIH images the engine scores (``dicom-node analyze``): its input gate refuses a few
    of the sample as too far from its training data, and an image without a result has
    no SR to count."""
    folder.mkdir(parents=True)
    paths = [
        *nih_chests(data_dir(), folder, candidates - candidates // 2, youngest_first=True),
        *kermany_chests(data_dir(), folder, candidates // 2),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "analyze", "--json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        cwd=folder,
    )
    if result.returncode != 0:
        raise RuntimeError(f"dicom-node analyze failed:\n{result.stderr[-2000:]}")
    status = {
        record["sop_instance_uid"]: record["status"]
        for record in map(json.loads, result.stdout.splitlines())
    }
    pool = [path for path in paths if status.get(sop_instance_uid(path)) == "scored"]
    if not pool:
        raise RuntimeError("the engine scores none of the NIH sample images")
    return pool


def fresh(template: Path, target: Path, **changes: Any) -> Path:
    """``template`` as a new acquisition (new study, series and instance UIDs)."""
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return target


def make_images(folder: Path, images: int, decoys: int) -> tuple[list[Path], list[Path]]:
    """``images`` frontal chests the engine scores (a pool of distinct ones, repeated as
    new acquisitions), and ``decoys`` the router must keep from the node: every other one
    a lateral view, the others a hip (the same pixels, headers changed)."""
    pool = scorable_pool(folder / "pool", min(images, POOL_SIZE)) if images else []
    (folder / "burst").mkdir(parents=True)
    frontal = [
        fresh(pool[i % len(pool)], folder / "burst" / f"frontal-{i:03d}.dcm") for i in range(images)
    ]
    decoy_paths = []
    templates = pool or nih_chests(data_dir(), folder / "pool", 1)
    for i in range(decoys):
        lateral = {"ViewPosition": "LL"}
        hip = {"BodyPartExamined": "HIP", "StudyDescription": "XR HIP"}
        target = folder / "burst" / f"decoy-{i:03d}.dcm"
        decoy_paths.append(
            fresh(templates[i % len(templates)], target, **(lateral if i % 2 == 0 else hip))
        )
    return frontal, decoy_paths


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def burst(site: RoutedSite, paths: list[Path]) -> float:
    """All files into Orthanc in one storescu association; returns its duration."""
    started = time.monotonic()
    result = subprocess.run(
        [
            STORESCU,
            "-xe",  # the files are Explicit VR Little Endian
            "-aet",
            "CR_ROOM_1",
            "-aec",
            site.orthanc.aet,
            site.orthanc.host,
            str(site.orthanc.dicom_port),
            *[str(path) for path in paths],
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.monotonic() - started


def wait(site: RoutedSite, expected: int, deadline: float) -> None:
    """Until the node received ``expected`` images, finished and delivered everything,
    and Orthanc's studies became stable again with no job left."""
    while len(site.received()) < expected or not site.settled():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"node received {len(site.received())} of {expected}, settled: {site.settled()}"
            )
        process = site.orthanc.process
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Orthanc exited:\n{site.orthanc.log_tail()}")
        time.sleep(POLL_S)
    time.sleep(STABLE_WAIT_S)
    while not site.orthanc_jobs_idle():
        if time.monotonic() > deadline:
            raise TimeoutError("Orthanc's jobs did not finish")
        time.sleep(POLL_S)


def count(site: RoutedSite, frontal: list[str], decoys: list[str]) -> dict[str, Any]:
    received = collections.Counter(site.received())
    own_objects = {row[0] for row in site.sql("SELECT sop_instance_uid FROM sends")}
    sr_of = collections.defaultdict(set)  # source SOP Instance UID → the node's SR UIDs
    for source, sr in site.sql(
        "SELECT i.sop_instance_uid, s.sop_instance_uid FROM sends s"
        " JOIN instances i ON s.instance_id = i.id WHERE s.kind = 'sr'"
    ):
        sr_of[source].add(sr)
    in_orthanc = {
        item["MainDicomTags"]["SOPInstanceUID"] for item in site.node_series_in_orthanc(SR_SERIES)
    }
    per_image = [len(sr_of[uid] & in_orthanc) for uid in frontal]
    scored = site.scored()
    return {
        "forwarded": sum(1 for uid in frontal if received[uid]),
        "lost": sum(1 for uid in frontal if not received[uid]),
        "duplicates": sum(n - 1 for n in received.values() if n > 1),
        "misrouted": sum(1 for uid in decoys if received[uid]),
        "loops": sum(1 for uid in received if uid in own_objects),
        "scored": sum(1 for uid in frontal if uid in scored),
        "images_with_one_sr": per_image.count(1),
        "missing_sr": per_image.count(0),
        "extra_sr": sum(n - 1 for n in per_image if n > 1),
        "srs_in_orthanc": len(in_orthanc),
    }


def last_result_s(site: RoutedSite, started_wall: float) -> float:
    """Seconds from the burst's start to the last result Orthanc acknowledged."""
    from datetime import UTC, datetime

    ((moment,),) = site.sql("SELECT MAX(sent_at) FROM sends WHERE state = 'sent'")
    if isinstance(moment, str):  # SQLite hands back text
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return float(moment.timestamp() - started_wall)


def run_burst(
    images: int = 10, decoys: int = 4, router: str = "lua", keep: bool = False
) -> dict[str, Any]:
    """The burst against a fresh Orthanc and node; the report as a dict."""
    work = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    try:
        frontal_paths, decoy_paths = make_images(work / "images", images, decoys)
        frontal = [sop_instance_uid(p) for p in frontal_paths]
        decoy_uids = [sop_instance_uid(p) for p in decoy_paths]
        with routed_site(work, router) as site:  # type: ignore[arg-type]
            deadline = time.monotonic() + TIMEOUT_S
            started_wall = time.time()
            send_s = burst(site, [*frontal_paths, *decoy_paths])
            wait(site, len(frontal), deadline)
            total_s = last_result_s(site, started_wall)
            report: dict[str, Any] = {
                "router": router,
                "images": images,
                "decoys": decoys,
                "cpu_count": os.cpu_count(),
                "burst_into_orthanc_s": round(send_s, 2),
                "total_s": round(total_s, 2),
                "images_per_minute": round(images / total_s * 60, 1) if total_s > 0 else None,
                **count(site, frontal, decoy_uids),
                "router_forward_log_lines": len(forward_log_lines(site.orthanc))
                if router == "lua"
                else None,
            }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["ok"] = (
        report["lost"] == report["duplicates"] == report["misrouted"] == report["loops"] == 0
        and report["images_with_one_sr"] == images
        and report["srs_in_orthanc"] == images
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="frontal chest images")
    parser.add_argument("--decoys", type=int, default=4, help="laterals and hips, not routed")
    parser.add_argument("--router", choices=["lua", "python"], default="lua")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    report = run_burst(args.images, args.decoys, args.router, args.keep)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
