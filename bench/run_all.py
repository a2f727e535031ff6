"""The whole benchmark suite in one command: the figures the README and deploy/README.md
quote, measured on this machine, in ``bench/results/summary.json`` and one PNG.

    python bench/run_all.py [--quick] [--database-url URL] [--out-dir bench/results]

1. **inference** (``bench_inference``): the engine alone on one 2500×2048 DX with one CPU
   thread — images per minute per CPU core for sizing;
2. **receive** (``bench_receive``): ``dicom-node serve`` versus pynetdicom's bare
   ``storescp``, ratio of medians (target ≤ 1.15);
3. **end to end** (``bench_e2e``): C-STORE in until Orthanc acknowledged SR and heatmap,
   p50/p95 (targets ≤ 1.0 s / ≤ 2.0 s) and images/min of a burst (target ≥ 60), with the
   node's peak resident memory with both models loaded (target ≤ 1.5 GiB) and the spool's
   bytes per image;
4. **listener memory**: ``serve --no-workers`` after receiving a few images;
5. **workers** (``bench_workers``, when present): 1 versus 2 worker processes on
   PostgreSQL (``--database-url``, else ``TEST_POSTGRES_URL``);
6. **GPU** (``bench_inference`` on CUDA, batch 32) only where ``torch.cuda.is_available()``.

A part that fails is reported with its error and the others still run. ``--quick`` runs
every part with a handful of images: a smoke test of the suite, not figures to quote.
Exit status 0 only when every part ran and every measured target is met.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(BENCH), str(REPO)):  # the bench modules, and the tests' helpers
    if entry not in sys.path:
        sys.path.insert(0, entry)

import bench_e2e  # noqa: E402
import bench_inference  # noqa: E402
import bench_receive  # noqa: E402
import torch  # noqa: E402

from tests.support import NodeProcess, free_port  # noqa: E402

TARGET_RSS_MIB = 1536.0
GPU_BATCH = 32
WORKER_COUNTS = (1, 2)

Result = dict[str, Any]


def timed(name: str, part: Callable[[], Result]) -> Result:
    """Run one part; its figures, or its error, plus how long it took."""
    print(f"== {name}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = part()
    except Exception as exc:  # one broken part must not lose the others' figures
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def inference_part(quick: bool) -> Result:
    """The engine on one CPU thread: what one core analyses per minute, nothing else."""
    figures = bench_inference.run(threads=1, repeats=3 if quick else 10, device="cpu")
    figures["images_per_minute_per_core"] = round(60_000 / figures["analyze_ms"], 1)
    return figures


def receive_part(quick: bool) -> Result:
    return bench_receive.run(rounds=1 if quick else 5, count=5 if quick else 30)


def e2e_part(quick: bool) -> Result:
    if quick:
        return bench_e2e.run(images=5, burst=10, warmup=1)
    return bench_e2e.run()


def listener_memory_part(quick: bool) -> Result:
    """Resident memory of ``serve --no-workers`` (no models) after receiving images."""
    count = 3 if quick else 10
    work = Path(tempfile.mkdtemp(prefix="bench-listener-"))
    try:
        images = work / "images"
        images.mkdir()
        bench_receive.generate(images, count)
        node = NodeProcess(
            home=work / "node",
            database_url=f"sqlite:///{work / 'node.db'}",
            port=free_port(),
            extra_env={"DICOM_NODE_HTTP_PORT": "0"},
        )
        node.start()
        try:
            bench_receive.send(node.port, "CXR_AI", sorted(images.glob("*.dcm")))
            assert node.proc is not None
            memory = bench_e2e.peak_rss_mib(node.proc.pid)
        finally:
            node.stop()
        return {"images": count, **memory}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def workers_part(quick: bool, database_url: str | None) -> Result:
    """1 versus 2 worker processes through ``bench_workers.run`` where it exists."""
    if importlib.util.find_spec("bench_workers") is None:
        return {"available": False, "reason": "bench/bench_workers.py not present"}
    if not database_url:
        return {
            "available": False,
            "reason": "no PostgreSQL: pass --database-url or set TEST_POSTGRES_URL",
        }
    module = importlib.import_module("bench_workers")
    run = getattr(module, "run", None)
    if run is None:
        return {"available": False, "reason": "bench_workers has no run() function"}
    accepted = inspect.signature(run).parameters
    options: dict[str, Any] = {}
    for name in ("database_url", "postgres_url"):
        if name in accepted:
            options[name] = database_url
    if quick:
        for name in ("images", "count", "burst"):
            if name in accepted:
                options[name] = 10
        if "quick" in accepted:
            options["quick"] = True
    result: Result = {"available": True}
    for n in WORKER_COUNTS:
        print(f"   {n} worker(s) …", file=sys.stderr, flush=True)
        result[str(n)] = run(n, **options)
    per_min = [images_per_minute(result[str(n)]) for n in WORKER_COUNTS]
    if all(value is not None for value in per_min):
        result["speedup_2_over_1"] = round(per_min[1] / per_min[0], 2)  # type: ignore[operator]
    return result


def gpu_part(quick: bool) -> Result:
    if not torch.cuda.is_available():
        return {"available": False, "reason": "torch.cuda.is_available() is False"}
    figures = bench_inference.run(
        threads=1, repeats=3 if quick else 10, device="cuda", batch=GPU_BATCH
    )
    figures["available"] = True
    figures["gpu"] = torch.cuda.get_device_name(0)
    figures["images_per_minute"] = round(figures[f"batch{GPU_BATCH}_images_per_s"] * 60, 1)
    return figures


def images_per_minute(figures: Result) -> float | None:
    """Images per minute in a bench_workers result, whatever it calls the figure."""
    for key in ("images_per_minute", "images_per_min", "throughput_per_min"):
        value = figures.get(key)
        if isinstance(value, int | float):
            return float(value)
    burst = figures.get("burst")
    return images_per_minute(burst) if isinstance(burst, dict) else None


def targets(parts: dict[str, Result]) -> dict[str, Any]:
    """Each target with its measured value and whether it is met (None: not measured)."""
    receive, e2e = parts["receive"], parts["e2e"]
    latency = e2e.get("latency_s", {})
    memory = e2e.get("node_memory", {})
    rows = {
        "receive_ratio": (receive.get("ratio"), bench_receive.TARGET_RATIO, "max"),
        "latency_p50_s": (latency.get("p50"), bench_e2e.TARGET_P50_S, "max"),
        "latency_p95_s": (latency.get("p95"), bench_e2e.TARGET_P95_S, "max"),
        "images_per_minute": (
            e2e.get("burst", {}).get("images_per_minute"),
            bench_e2e.TARGET_PER_MIN,
            "min",
        ),
        "node_peak_rss_mib": (memory.get("peak_rss_mib"), TARGET_RSS_MIB, "max"),
    }
    result: dict[str, Any] = {}
    for name, (value, target, kind) in rows.items():
        met = None if value is None else (value <= target if kind == "max" else value >= target)
        result[name] = {"value": value, "target": target, "kind": kind, "met": met}
    return result


def sizing(parts: dict[str, Result], cpu_count: int) -> dict[str, Any]:
    """The Sizing figures of deploy/README.md; "TBD" where the part did not measure."""
    e2e, inference, gpu = parts["e2e"], parts["inference"], parts["gpu"]
    burst = e2e.get("burst", {}).get("images_per_minute")
    per_image = e2e.get("spool_bytes_per_image")
    return {
        "images_per_minute_per_cpu_core_engine": inference.get("images_per_minute_per_core", "TBD"),
        "images_per_minute_per_cpu_core_end_to_end": (
            round(burst / cpu_count, 1) if burst else "TBD"
        ),
        "images_per_minute_per_gpu": gpu.get("images_per_minute", "TBD"),
        "ram_mib_node_with_models": e2e.get("node_memory", {}).get("peak_rss_mib", "TBD"),
        "ram_mib_listener": parts["listener_memory"].get("peak_rss_mib", "TBD"),
        "disk_gb_per_1000_single_image_studies": (
            round(per_image * 1000 / 1e9, 2) if per_image else "TBD"
        ),
    }


def host() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    """One figure, four panels, each measured value against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts, goals = summary["parts"], summary["targets"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    title = "cxr-ai-node benchmarks" + (" (--quick: smoke run)" if summary["quick"] else "")
    machine = summary["host"]
    fig.suptitle(
        f"{title}\n{summary['created']}, {machine['cpu_count']} CPU cores, "
        f"load average at the end {machine['load_average'][0]:g}"
    )

    def bars(ax: Any, values: dict[str, float | None], unit: str, colour: str) -> None:
        shown = {k: v for k, v in values.items() if v is not None}
        if not shown:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            return
        drawn = ax.bar(list(shown), list(shown.values()), color=colour)
        ax.bar_label(drawn, fmt="%.2f" if max(shown.values()) < 10 else "%.0f")
        ax.set_ylabel(unit)

    def target_line(ax: Any, value: float, label: str) -> None:
        """The target, with head room above the tallest bar for the legend."""
        ax.axhline(value, color="crimson", linestyle="--", linewidth=1.2, label=label)
        ax.set_ylim(0, max(ax.get_ylim()[1], value) * 1.3)
        ax.legend(loc="upper left", fontsize=8)

    ax = axes[0][0]
    ax.set_title("End-to-end latency (C-STORE → PACS ack)")
    bars(
        ax,
        {"p50": goals["latency_p50_s"]["value"], "p95": goals["latency_p95_s"]["value"]},
        "seconds",
        "steelblue",
    )
    ax.axhline(
        bench_e2e.TARGET_P95_S,
        color="crimson",
        linestyle=":",
        linewidth=1.2,
        label=f"p95 target {bench_e2e.TARGET_P95_S:g} s",
    )
    target_line(ax, bench_e2e.TARGET_P50_S, f"p50 target {bench_e2e.TARGET_P50_S:g} s")

    ax = axes[0][1]
    ax.set_title("Throughput")
    throughput: dict[str, float | None] = {
        "burst\n(1 worker thread)": goals["images_per_minute"]["value"],
        "engine\n1 CPU core": parts["inference"].get("images_per_minute_per_core"),
    }
    workers = parts["workers"]
    for n in WORKER_COUNTS:
        if str(n) in workers:
            throughput[f"{n} worker\nprocess(es)"] = images_per_minute(workers[str(n)])
    if parts["gpu"].get("images_per_minute"):
        throughput[f"GPU\nbatch {GPU_BATCH}"] = parts["gpu"]["images_per_minute"]
    bars(ax, throughput, "images / minute", "seagreen")
    target_line(ax, bench_e2e.TARGET_PER_MIN, f"target ≥ {bench_e2e.TARGET_PER_MIN:g}/min")

    ax = axes[1][0]
    ax.set_title("Resident memory (peak)")
    bars(
        ax,
        {
            "node with\nboth models": goals["node_peak_rss_mib"]["value"],
            "listener only\n(--no-workers)": parts["listener_memory"].get("peak_rss_mib"),
        },
        "MiB",
        "darkorange",
    )
    target_line(ax, TARGET_RSS_MIB, f"target ≤ {TARGET_RSS_MIB:g} MiB")

    ax = axes[1][1]
    ax.set_title("Receive time, node / bare storescp")
    bars(ax, {"ratio of medians": goals["receive_ratio"]["value"]}, "ratio", "slateblue")
    target_line(ax, bench_receive.TARGET_RATIO, f"target ≤ {bench_receive.TARGET_RATIO:g}")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few images per part: smoke run")
    parser.add_argument("--database-url", help="PostgreSQL for the workers part")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    database_url = args.database_url or os.environ.get("TEST_POSTGRES_URL")

    parts: dict[str, Result] = {
        "inference": timed("inference (1 CPU thread)", lambda: inference_part(args.quick)),
        "receive": timed("receive vs storescp", lambda: receive_part(args.quick)),
        "e2e": timed("end to end with Orthanc", lambda: e2e_part(args.quick)),
        "listener_memory": timed("listener memory", lambda: listener_memory_part(args.quick)),
        "workers": timed(
            "1 vs 2 workers on PostgreSQL", lambda: workers_part(args.quick, database_url)
        ),
        "gpu": timed("GPU batched inference", lambda: gpu_part(args.quick)),
    }
    machine = host()
    summary: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "host": machine,
        "targets": targets(parts),
        "sizing": sizing(parts, machine["cpu_count"] or 1),
        "parts": parts,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out_dir / "summary.png")

    errors = {name: part["error"] for name, part in parts.items() if "error" in part}
    for name, goal in summary["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        bound = "≤" if goal["kind"] == "max" else "≥"
        print(f"{name:>20}: {goal['value']!s:>8}  (target {bound} {goal['target']:g})  {verdict}")
    for name, error in errors.items():
        print(f"{name:>20}: failed: {error}")
    for name in ("workers", "gpu"):
        if parts[name].get("available") is False:
            print(f"{name:>20}: not available: {parts[name]['reason']}")
    print(f"wrote {args.out_dir / 'summary.json'} and {args.out_dir / 'summary.png'}")
    all_met = all(goal["met"] for goal in summary["targets"].values())
    return 0 if all_met and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
