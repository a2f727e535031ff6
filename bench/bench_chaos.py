"""Chaos, long: 20 rounds of ``kill -9`` of a random node process during a stream of images.

Listener, two workers and a sender as separate processes on a fresh PostgreSQL database,
a real Orthanc as the archive, a modality streaming chest images throughout; each round
kills one process at a random moment and restarts it (see
:mod:`tests.e2e.chaos_support`). Reports rounds, images, lost (acknowledged images
without exactly one SR and one SC in Orthanc), duplicated (more than one SR or SC per
image in Orthanc, or a send recorded as sent twice) and resent (sends claimed again
after their sender died — delivered at least once, kept once by the archive).

    python bench/bench_chaos.py [--rounds 20] [--images-per-round 10] [--round-s 10]
                                [--seed N] [--out bench/results/chaos.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers start the node and Orthanc the same way

from tests.e2e.chaos_support import run_chaos  # noqa: E402
from tests.e2e.orthanc import run_orthanc  # noqa: E402
from tests.support import provision_database  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "chaos.json"


def data_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or REPO.parent / "shared" / "data")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--images-per-round", type=int, default=10)
    parser.add_argument("--round-s", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--seed", type=int, help="repeat a run [default: random]")
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument("--database-url", help="PostgreSQL server [default: TEST_POSTGRES_URL]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    args = parser.parse_args()
    if args.database_url:
        os.environ["TEST_POSTGRES_URL"] = args.database_url
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    try:
        with (
            provision_database("postgresql", work) as url,
            run_orthanc(work / "orthanc") as orthanc,
        ):
            report = run_chaos(
                work,
                data_dir(),
                url,
                orthanc,
                rounds=args.rounds,
                images_per_round=args.images_per_round,
                round_s=args.round_s,
                seed=seed,
                settle_timeout=args.settle_timeout,
                log=lambda message: print(message, file=sys.stderr, flush=True),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    document = {
        **report.summary(),
        "kills_per_role": {
            role: sum(1 for kill in report.kills if kill["role"] == role)
            for role in sorted({kill["role"] for kill in report.kills})
        },
        "jobs_rerun": report.details["jobs_rerun"],
        "sends_recovered": report.details["sends_recovered"],
        "kills": report.kills,
        "details": report.details,
        "cpu_count": os.cpu_count(),
        "generated_at": datetime.now(UTC).isoformat(),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({k: v for k, v in document.items() if k != "kills"}, indent=2))
    return 0 if report.lost == 0 and report.duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
