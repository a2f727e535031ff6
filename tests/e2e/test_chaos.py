"""Chaos across processes, short: three rounds of ``kill -9`` during a stream of images.

Listener, two workers and a sender run as separate processes on PostgreSQL with a real
Orthanc as the archive (:mod:`tests.e2e.chaos_support`). Each round kills one of them
(a different one each round) at a random moment and restarts it. Whatever was killed
when, every image the modality got a Success for must end up in Orthanc as exactly one SR
and one heatmap SC, and no send may be recorded as sent twice. The seed is random per
run (``CHAOS_SEED`` repeats one) and printed with any failure. ``bench/bench_chaos.py``
runs the long version (20 rounds).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.e2e.chaos_support import run_chaos
from tests.e2e.orthanc import run_orthanc
from tests.support import provision_database

ROUNDS = 3
IMAGES_PER_ROUND = 6
ROUND_S = 8.0
SETTLE_S = 240.0
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_kill_9_of_any_process_during_a_stream_loses_and_duplicates_nothing(
    tmp_path: Path, data_dir: Path
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    with (
        provision_database("postgresql", tmp_path) as url,
        run_orthanc(tmp_path / "orthanc") as orthanc,
    ):
        report = run_chaos(
            tmp_path,
            data_dir,
            url,
            orthanc,
            rounds=ROUNDS,
            images_per_round=IMAGES_PER_ROUND,
            round_s=ROUND_S,
            seed=seed,
            settle_timeout=SETTLE_S,
        )
    context = f"CHAOS_SEED={seed}: {report.summary()} kills={report.kills} {report.details}"
    assert [kill["round"] for kill in report.kills] == [1, 2, 3], context
    assert len({kill["role"] for kill in report.kills}) == ROUNDS, context
    assert report.acknowledged == report.images == ROUNDS * IMAGES_PER_ROUND, context
    assert report.lost == 0, context
    assert report.duplicated == 0, context
    assert report.details["results_per_instance_max"] == 1, context
    assert report.details["archive_sr"] == report.details["archive_sc"] == report.images, context
