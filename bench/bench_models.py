"""``models performance`` and ``status`` (with drift) on a large database: ≤ 1 s each.

Builds on ``bench_status.py``'s throw-away PostgreSQL database (100k jobs and results,
two days of history) and adds what the model monitoring reads:

* two ``model_scores`` rows per finished result — the shipped pneumonia confirm model
  and the segmentation model answering cardiomegaly — 90 % assessed, probabilities from
  a beta distribution, realistic header descriptors (three manufacturers, two views);
* ``--labels`` (5 000) readers' labels: half per image, half per study, 2 % of them
  superseded by a later label;
* ``VACUUM ANALYZE``.

Then times, in process, medians of ``--rounds`` (10) after two warm-up calls:

1. ``performance(session, cards(...))`` — what ``dicom-node models performance`` runs;
2. ``collect_status(settings, echo=False)`` — now including drift of every version in
   force and the below-card check.

    python bench/bench_models.py [--jobs 100000] [--labels 5000] [--rounds 10]

Writes ``bench/results/models.json``. Target: each median ≤ 1000 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, text

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from bench_status import bench_database, populate  # noqa: E402

from dicom_node.config import load_settings  # noqa: E402
from dicom_node.models import registry  # noqa: E402
from dicom_node.models.performance import performance  # noqa: E402
from dicom_node.status import collect_status  # noqa: E402
from storage.db import make_engine, make_session_factory, session_scope, upgrade  # noqa: E402

TARGET_MS = 1000.0
WARMUP = 2
SCORES = """
INSERT INTO model_scores (instance_id, sop_instance_uid, study_instance_uid, finding_code,
    model, version, role, assessed, probability, present, threshold, stage, refused,
    ood_distance, age, sex, view, manufacturer, pixel_spacing, photometric, bits, created_at)
SELECT r.instance_id, i.sop_instance_uid, st.study_instance_uid, f.code, f.model, '1.0.0',
       'active', a.assessed, CASE WHEN a.assessed THEN p.prob END,
       CASE WHEN a.assessed THEN p.prob >= f.threshold END,
       CASE WHEN a.assessed THEN f.threshold END,
       CASE WHEN a.assessed THEN f.stage END, NOT a.assessed, 0.3 + random() * 0.3,
       CASE WHEN random() < 0.1 THEN NULL ELSE 1 + floor(random() * 90) END,
       CASE WHEN random() < 0.5 THEN 'F' ELSE 'M' END,
       CASE WHEN random() < 0.7 THEN 'PA' ELSE 'AP' END,
       (ARRAY['Acme', 'Bravo', 'Carestream'])[1 + floor(random() * 3)::int],
       0.1 + random() * 0.1, 'MONOCHROME2', '12', r.created_at
FROM results r
JOIN instances i ON i.id = r.instance_id
JOIN series se ON se.id = i.series_id
JOIN studies st ON st.id = se.study_id
CROSS JOIN (VALUES ('233604007', 'cxr_pneumonia_confirm_resnet18', 0.73, 'confirm'),
                   ('8186001', 'cxr_anatomy_segment_unet', 0.5, 'measurement'))
     AS f (code, model, threshold, stage)
CROSS JOIN LATERAL (SELECT random() < 0.9 AS assessed) AS a
CROSS JOIN LATERAL (SELECT power(random(), 2) AS prob) AS p
WHERE r.status = 'scored'
"""
LABELS = """
INSERT INTO feedback (study_instance_uid, sop_instance_uid, finding_code, present, reader,
                      source, received_at, actor)
SELECT CASE WHEN n % 2 = 0 THEN s.study_instance_uid END,
       CASE WHEN n % 2 = 1 THEN s.sop_instance_uid END,
       s.finding_code, (s.probability > 0.5) <> (random() < 0.15), 'dr.bench', 'csv', now(),
       'bench'
FROM (SELECT row_number() OVER () AS n, sop_instance_uid, study_instance_uid, finding_code,
             probability
      FROM model_scores WHERE assessed ORDER BY random() LIMIT :labels) AS s
"""
SUPERSEDE = """
INSERT INTO feedback (study_instance_uid, sop_instance_uid, finding_code, present, reader,
                      source, received_at, actor)
SELECT study_instance_uid, sop_instance_uid, finding_code, NOT present, 'dr.second', 'csv',
       now(), 'bench'
FROM feedback ORDER BY id LIMIT :superseded
"""


def add_monitoring(engine: Engine, labels: int) -> dict[str, int]:
    with engine.begin() as conn:
        conn.execute(text("SELECT setseed(0.17)"))
        conn.execute(text(SCORES))
        conn.execute(text(LABELS), {"labels": labels})
        conn.execute(text(SUPERSEDE), {"superseded": labels // 50})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
        return {
            table: int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("results", "model_scores", "feedback")
        }


def timed(call: object, rounds: int) -> tuple[list[float], object]:
    result = None
    for _ in range(WARMUP):
        result = call()  # type: ignore[operator]
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = call()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000.0)
    return times, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--server-url",
        default=os.environ.get(
            "TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/models.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-models-"))
    with bench_database(args.server_url) as url:
        engine = make_engine(url)
        upgrade(engine)
        started = time.perf_counter()
        populate(engine, args.jobs)
        rows = add_monitoring(engine, args.labels)
        populate_s = time.perf_counter() - started
        settings = load_settings(None, storage={"home": home, "database_url": url})
        sessions = make_session_factory(engine)

        def perf() -> list[dict[str, object]]:
            with session_scope(sessions) as session:
                return performance(session, registry.cards(settings, session))

        perf_ms, report = timed(perf, args.rounds)
        status_ms, status = timed(lambda: collect_status(settings, echo=False), args.rounds)
        engine.dispose()
    summary = {
        "rows": rows,
        "populate_s": round(populate_s, 1),
        "performance_median_ms": round(statistics.median(perf_ms), 1),
        "status_median_ms": round(statistics.median(status_ms), 1),
        "target_ms": TARGET_MS,
        "performance": report,
        "drift": status["drift"],  # type: ignore[index]
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("performance", "drift")}))
    ok = max(summary["performance_median_ms"], summary["status_median_ms"]) <= TARGET_MS  # type: ignore[type-var]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
