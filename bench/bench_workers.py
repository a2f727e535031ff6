"""Scale-out: images per minute with 1 and with 2 ``dicom-node worker`` processes.

On a fresh PostgreSQL database per run: ``dicom-node serve --no-workers`` receives ``n``
DX chest radiographs (NIH sample images at ``--side``² pixels, fresh UIDs) into a spool
that the workers share; their jobs are parked (``available_at`` in the future). Then 1 or
2 ``dicom-node worker --threads 1`` processes start with ``[inference] threads = 1``, and
once every worker has loaded its engine the jobs are released at once. The time runs
from the release to the last job finished (``finished_at`` in the database), so engine
loading is not counted. Runs alternate (1, 2, 1, 2 …) so that a machine getting busier
or quieter affects both sides alike; the median of each side is reported.

    python bench/bench_workers.py [--images 64] [--rounds 2] [--side 1024] [--out FILE]

``run(n, images=…)`` measures ``n`` worker processes once and returns a dict with
``images_per_minute`` (what ``bench/run_all.py`` calls); ``compare`` (the command line)
alternates 1 and 2 and writes ``bench/results/workers.json`` with the ratio. Expect at
most ~2× with 2 workers, and only with 2 free cores: each uses one inference thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers start the node the same way

from tests.e2e.scale_support import chest_burst, storescu_many, wait_ready  # noqa: E402
from tests.support import NodeProcess, provision_database  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "workers.json"
TIMEOUT_S = 1800.0
POLL_S = 0.2
PARKED = "UPDATE jobs SET available_at = :until WHERE state = 'queued'"


def data_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or REPO.parent / "shared" / "data")


def node_config(path: Path, heatmaps: bool) -> Path:
    path.write_text(
        "[worker]\nbatch_size = 8\npoll_interval = 0.2\n\n"
        f"[inference]\nthreads = 1\nheatmaps = {str(heatmaps).lower()}\n\n"
        "[retention]\nenabled = false\n"
    )
    return path


def _execute(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def _prefill(work: Path, url: str, files: list[Path], config: Path) -> None:
    """Receive every image with a listener alone, then park the jobs."""
    listener = NodeProcess(
        home=work / "listener",
        database_url=url,
        config_file=config,
        extra_env={"DICOM_NODE_SPOOL_DIR": str(work / "spool")},
    ).start()
    try:
        result = storescu_many(listener.port, files)
        if result.returncode != 0:
            raise RuntimeError(f"storescu failed:\n{(result.stdout + result.stderr)[-2000:]}")
        _execute(url, PARKED, until=datetime(2999, 1, 1, tzinfo=UTC))
    finally:
        listener.stop()


def _drain(url: str, count: int) -> float:
    """Release the parked jobs; seconds until the last one finished."""
    released = datetime.now(UTC)
    _execute(url, PARKED, until=released)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        states = dict(_execute(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
        if states.get("done", 0) == count:
            (last,) = _execute(url, "SELECT max(finished_at) FROM jobs")[0]
            return float((last - released).total_seconds())
        if set(states) - {"queued", "running", "done"}:
            raise RuntimeError(f"jobs ended badly: {states}")
        time.sleep(POLL_S)
    raise TimeoutError("the queue did not drain in time")


def one_run(work: Path, workers: int, files: list[Path], heatmaps: bool) -> float:
    """Images per minute of ``workers`` worker processes on a prefilled queue."""
    config = node_config(work / "node.toml", heatmaps)
    with provision_database("postgresql", work) as url:  # on TEST_POSTGRES_URL's server
        _prefill(work, url, files, config)
        processes = [
            NodeProcess(
                home=work / f"worker-{i}",
                database_url=url,
                config_file=config,
                workers=True,
                command=("worker", "--threads", "1"),
                extra_env={"DICOM_NODE_SPOOL_DIR": str(work / "spool")},
            )
            for i in range(workers)
        ]
        try:
            for process in processes:
                process.start()
            for process in processes:
                wait_ready(process)
            seconds = _drain(url, len(files))
        finally:
            for process in processes:
                process.stop()
    return len(files) / seconds * 60


def run(
    n: int,
    *,
    images: int = 64,
    side: int = 1024,
    heatmaps: bool = True,
    database_url: str | None = None,
) -> dict[str, Any]:
    """One measurement with ``n`` worker processes on a queue of ``images`` images."""
    if database_url:
        os.environ["TEST_POSTGRES_URL"] = database_url
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        files = chest_burst(data_dir(), root / "images", images, side=side)
        work = root / f"workers-{n}"
        work.mkdir()
        rate = one_run(work, n, files, heatmaps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "workers": n,
        "images": images,
        "image": f"{side}x{side} 8-bit DX",
        "heatmaps": heatmaps,
        "cpu_count": os.cpu_count(),
        "images_per_minute": round(rate, 1),
    }


def compare(
    images: int,
    *,
    rounds: int = 2,
    side: int = 1024,
    heatmaps: bool = True,
    database_url: str | None = None,
    out: Path | None = DEFAULT_OUT,
) -> dict[str, Any]:
    """Alternate 1- and 2-worker runs; the medians and their ratio (also written to
    ``out``)."""
    per_minute: dict[int, list[float]] = {1: [], 2: []}
    for index in range(rounds):
        for workers in (1, 2):
            print(f"round {index + 1}/{rounds}: {workers} worker(s) …", file=sys.stderr)
            figures = run(
                workers, images=images, side=side, heatmaps=heatmaps, database_url=database_url
            )
            per_minute[workers].append(figures["images_per_minute"])
    one, two = (statistics.median(per_minute[k]) for k in (1, 2))
    report = {
        "cpu_count": os.cpu_count(),
        "images": images,
        "image": f"{side}x{side} 8-bit DX",
        "heatmaps": heatmaps,
        "rounds": rounds,
        "images_per_minute": {"1_worker": per_minute[1], "2_workers": per_minute[2]},
        "median_images_per_minute": {"1_worker": one, "2_workers": two},
        "ratio_2_to_1": round(two / one, 2),
        "generated_at": datetime.now(UTC).isoformat(),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="queued images per run")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of 1- and 2-worker runs")
    parser.add_argument("--side", type=int, default=1024, help="image rows = columns")
    parser.add_argument("--no-heatmaps", action="store_true", help="SR only, no Grad-CAM")
    parser.add_argument("--database-url", help="PostgreSQL server [default: TEST_POSTGRES_URL]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    args = parser.parse_args()
    report = compare(
        args.images,
        rounds=args.rounds,
        side=args.side,
        heatmaps=not args.no_heatmaps,
        database_url=args.database_url,
        out=args.out,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
