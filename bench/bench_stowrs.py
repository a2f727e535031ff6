"""Delivery throughput: STOW-RS (``dicomweb`` destination) versus C-STORE (``dicom``).

Builds 100 of the node's own output objects — SR, heatmap SC and Grad-CAM Parametric
Map, in turn, of the same radiograph under distinct source variants, so every object has
a SOP Instance UID of its own — writes them to a spool folder as the worker does, and
delivers the 100 files to one Orthanc (Debian ``orthanc`` with the ``orthanc-dicomweb``
plugin, started here on loopback) through each destination type's sender, exactly as
the outbox calls it:

  (a) ``dicomweb``: one HTTP connection, ``batch_size`` objects per STOW-RS request;
  (b) ``dicom``: one association, one C-STORE per object.

Each round stores the same objects with fresh UIDs into an emptied archive, the order of
(a) and (b) alternating (ABBA…) so that a busy machine penalises both alike. Reported:
objects/s and MB/s per round and the median.

    python bench/bench_stowrs.py [--rounds 5] [--objects 100] [--batch-size 100]
                                 [--kinds sr,sc,pm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' helpers

from dicom_node.dispatch import DicomDestination, get_sender, parse_destination  # noqa: E402
from dicom_node.outputs import encode  # noqa: E402
from dicom_node.results.heatmap_sc import heatmap_secondary_capture  # noqa: E402
from dicom_node.results.parametric_map import heatmap_parametric_map  # noqa: E402
from dicom_node.results.sr import measurement_report  # noqa: E402
from tests.e2e.orthanc import Orthanc, run_orthanc  # noqa: E402
from tests.results_data import RG1_UNCR, make_result, read_source  # noqa: E402

BUILDERS = {
    "sr": measurement_report,
    "sc": heatmap_secondary_capture,
    "pm": heatmap_parametric_map,
}


def make_objects(folder: Path, count: int, tag: str, kinds: list[str]) -> list[Path]:
    """``count`` output files of the RG1 chest radiograph (1955 × 1841), ``kinds`` in turn
    (SR about 6 kB, SC about 2 MB, PM about 7 MB)."""
    source = read_source(RG1_UNCR)
    result = make_result(source)
    y, x = np.mgrid[0:16, 0:16]
    result.cam = np.exp(-((y - 9.0) ** 2 + (x - 5.0) ** 2) / 12.0).astype(np.float32)
    result.image_shape = (int(source.Rows), int(source.Columns))
    paths = []
    for number in range(count):
        build = BUILDERS[kinds[number % len(kinds)]]
        dataset = build(source, result, source_variant=f"{tag}-{number}")  # type: ignore[operator]
        path = folder / f"{tag}-{number:03d}.dcm"
        path.write_bytes(encode(dataset))
        paths.append(path)
    return paths


def timed(label: str, send: Any, paths: list[Path]) -> dict[str, float]:
    started = time.perf_counter()
    outcomes = send(paths)
    elapsed = time.perf_counter() - started
    failed = [o for o in outcomes if not o.success]
    if failed:
        raise SystemExit(f"{label}: {len(failed)} objects failed, e.g. {failed[0].message}")
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    return {
        "seconds": round(elapsed, 3),
        "objects_per_s": round(len(paths) / elapsed, 1),
        "mb_per_s": round(megabytes / elapsed, 1),
    }


def run(rounds: int, count: int, batch_size: int, kinds: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-stowrs-") as tmp:
        workdir = Path(tmp)
        with run_orthanc(workdir / "orthanc", dicomweb=True) as orthanc:
            stow = parse_destination(
                {
                    "name": "web",
                    "type": "dicomweb",
                    "url": orthanc.dicomweb_url,
                    "batch_size": batch_size,
                    "timeout_s": 120,
                }
            )
            store = DicomDestination(
                name="pacs",
                ae_title=orthanc.aet,
                host=orthanc.host,
                port=orthanc.dicom_port,
                timeout_s=120,
            )
            senders = {
                "stow-rs": lambda paths: get_sender("dicomweb").send(stow, paths, "CXR_AI"),
                "c-store": lambda paths: get_sender("dicom").send(store, paths, "CXR_AI"),
            }
            results: dict[str, list[dict[str, float]]] = {name: [] for name in senders}
            sizes: list[int] = []
            for number in range(rounds):
                order = list(senders) if number % 2 == 0 else list(reversed(senders))
                for name in order:
                    folder = workdir / f"{name}-{number}"
                    folder.mkdir()
                    paths = make_objects(folder, count, f"{name}-{number}", kinds)
                    sizes = [p.stat().st_size for p in paths]
                    _empty(orthanc)
                    results[name].append(timed(name, senders[name], paths))
                    assert len(orthanc.instances()) == count
                    print(f"round {number + 1} {name}: {results[name][-1]}", flush=True)
            version = orthanc.system().get("Version")
    return {
        "objects": count,
        "kinds": kinds,
        "batch_size": batch_size,
        "rounds": rounds,
        "megabytes": round(sum(sizes) / 1e6, 1),
        "orthanc": version,
        "median_objects_per_s": {
            name: statistics.median(r["objects_per_s"] for r in rows)
            for name, rows in results.items()
        },
        "median_mb_per_s": {
            name: round(statistics.median(r["mb_per_s"] for r in rows), 1)
            for name, rows in results.items()
        },
        "rounds_detail": results,
    }


def _empty(orthanc: Orthanc) -> None:
    orthanc.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--kinds", default="sr,sc,pm", help="output types, in turn")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    summary = run(args.rounds, args.objects, args.batch_size, kinds)
    text = json.dumps({k: v for k, v in summary.items() if k != "rounds_detail"}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
