"""``status`` on a busy database: 100k jobs in PostgreSQL, answered in ≤ 300 ms.

Creates a throw-away PostgreSQL database (``cxr_bench_status``, dropped afterwards),
migrates it, and fills it with server-side bulk inserts (``INSERT … SELECT`` over
``generate_series``, a few seconds) with a realistic history of two days:

* ``--jobs`` (100 000) instances, two per study, one job each: 93 % done, 5 % skipped,
  1 % failed, 0.9 % queued and 0.1 % running (the last two received in the last ten
  minutes); latencies of 0.4–1.6 s with a 5 % tail of up to 20 s;
* a result per finished job and, for every done one, an SR and an SC send to ``pacs``
  (sent, a few pending, 0.5 % dead letters); a fresh listener heartbeat;
* ``VACUUM ANALYZE`` at the end, as autovacuum would have done on a live node.

Then times

1. ``collect_status(settings, echo=False)`` in-process: median of ``--rounds`` (20) after
   three warm-up calls;
2. the ``dicom-node status --json --no-echo`` subprocess: median of ``--cli-rounds`` (5)
   wall-clock runs, and separately the import overhead of the CLI
   (``python -c "import dicom_node.cli"``) — what the process costs before its first query.

    python bench/bench_status.py [--jobs 100000] [--rounds 20] [--cli-rounds 5]
                                 [--server-url postgresql+psycopg2://postgres@127.0.0.1/postgres]

Writes ``bench/results/status.json``. Target: in-process median ≤ 300 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, make_url, text

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dicom_node.config import load_settings  # noqa: E402
from dicom_node.status import collect_status  # noqa: E402
from storage.db import make_engine, upgrade  # noqa: E402

DATABASE = "cxr_bench_status"
TARGET_MS = 300.0
WARMUP = 3

# One instance per job, two instances per study (one series each). ``plan`` decides each
# job's state, arrival and latency once, so every table below agrees with it.
POPULATE = [
    "SELECT setseed(0.42)",
    """CREATE TEMP TABLE plan AS
       SELECT n, r,
              CASE WHEN r < 0.93 THEN 'done' WHEN r < 0.98 THEN 'skipped'
                   WHEN r < 0.99 THEN 'failed' WHEN r < 0.999 THEN 'queued'
                   ELSE 'running' END AS state,
              CASE WHEN r < 0.99 THEN now() - random() * interval '2 days'
                   ELSE now() - random() * interval '10 minutes' END AS received_at,
              0.4 + random() * 1.2
                  + CASE WHEN random() < 0.05 THEN random() * 18 ELSE 0 END AS latency_s
       FROM (SELECT g AS n, random() AS r FROM generate_series(1, :jobs) g) AS draws""",
    """INSERT INTO studies (id, study_instance_uid, study_date, accession_number,
                            first_received_at, last_received_at, priority_rank)
       SELECT (n + 1) / 2, '1.2.826.0.1.3680043.10.1.' || ((n + 1) / 2),
              to_char(received_at, 'YYYYMMDD'), 'A' || ((n + 1) / 2), received_at,
              received_at, 0
       FROM plan WHERE n % 2 = 1""",
    """INSERT INTO series (id, study_id, series_instance_uid, modality, body_part_examined,
                           series_number, first_received_at)
       SELECT id, id, study_instance_uid || '.1', 'DX', 'CHEST', 1, first_received_at
       FROM studies""",
    """INSERT INTO instances (id, series_id, sop_instance_uid, version, sop_class_uid,
                              transfer_syntax_uid, instance_number, view_position, rows,
                              columns, photometric_interpretation, size_bytes, sha256,
                              spool_path, calling_ae, called_ae, peer_address, peer_port,
                              received_at)
       SELECT n, (n + 1) / 2, '1.2.826.0.1.3680043.10.2.' || n, 1,
              '1.2.840.10008.5.1.4.1.1.1.1', '1.2.840.10008.1.2.1', 1 + n % 2, 'PA', 2500,
              2048, 'MONOCHROME2', 10240000 + n % 1000, md5(n::text) || md5(n::text),
              'objects/' || left(md5(n::text), 2) || '/' || md5(n::text) || '.dcm',
              'PACS', 'CXR_AI', '10.0.0.5', 40000 + n % 1000, received_at
       FROM plan""",
    """INSERT INTO jobs (id, instance_id, kind, state, priority, attempts, max_attempts,
                         last_error, worker, created_at, updated_at, available_at, queued_at,
                         started_at, finished_at)
       SELECT n, n, 'analyze', state, 0,
              CASE WHEN state = 'queued' THEN 0 WHEN state = 'failed' THEN 3 ELSE 1 END, 3,
              CASE WHEN state = 'failed' THEN 'cannot decode pixel data' END,
              CASE WHEN state = 'running' THEN 'bench-host:4242:worker-1' END,
              received_at, received_at + latency_s * interval '1 second',
              CASE WHEN state = 'running' THEN now() + interval '10 minutes'
                   ELSE received_at END,
              received_at,
              CASE WHEN state NOT IN ('queued') THEN received_at + interval '0.1 second' END,
              CASE WHEN state IN ('done', 'skipped', 'failed')
                   THEN received_at + latency_s * interval '1 second' END
       FROM plan""",
    """INSERT INTO results (id, instance_id, job_id, pipeline, model_key, status, reason,
                            findings, in_domain, warnings, timings_ms, outputs,
                            created_at, updated_at)
       SELECT n, n, n, 'cxr-cascade', 'screen@1.0.0+confirm@1.0.0',
              CASE WHEN state = 'done' THEN 'scored' WHEN state = 'skipped' THEN 'not_scored'
                   ELSE 'error' END,
              CASE WHEN state <> 'done' THEN 'not a frontal chest radiograph' END,
              CASE WHEN state = 'done' THEN jsonb_build_array(jsonb_build_object(
                  'code', '233604007', 'scheme', 'SCT', 'meaning', 'Pneumonia',
                  'probability', round(r::numeric, 3), 'present', r < 0.2,
                  'stage', 'confirm')) ELSE '[]'::jsonb END,
              state = 'done', '[]'::jsonb, '{"total": 800}'::jsonb,
              CASE WHEN state = 'done' THEN jsonb_build_array(
                  jsonb_build_object('kind', 'sr', 'sop_class_uid', '1.2.840.10008.5.1.4.1.1.88.34',
                                     'sop_instance_uid', '2.25.1' || n,
                                     'path', 'outputs/sr/' || n || '.dcm'),
                  jsonb_build_object('kind', 'sc', 'sop_class_uid', '1.2.840.10008.5.1.4.1.1.7',
                                     'sop_instance_uid', '2.25.2' || n,
                                     'path', 'outputs/sc/' || n || '.dcm'))
                   ELSE '[]'::jsonb END,
              received_at + latency_s * interval '1 second',
              received_at + latency_s * interval '1 second'
       FROM plan WHERE state IN ('done', 'skipped', 'failed')""",
    """INSERT INTO sends (result_id, instance_id, destination, kind, sop_class_uid,
                          sop_instance_uid, study_instance_uid, file_path, state, attempts,
                          next_attempt_at, first_enqueued_at, last_attempt_at, last_error,
                          sender, sent_at, updated_at)
       SELECT p.n, p.n, 'pacs', k.kind, k.sop_class, '2.25.' || k.prefix || p.n,
              '1.2.826.0.1.3680043.10.1.' || ((p.n + 1) / 2),
              'outputs/' || k.kind || '/' || p.n || '.dcm', s.state,
              CASE WHEN s.state = 'dead' THEN 9 ELSE 1 END, p.done_at, p.done_at, p.done_at,
              CASE WHEN s.state = 'dead' THEN 'older than 86400 s: cannot connect' END,
              'bench-host:4242:sender',
              CASE WHEN s.state = 'sent' THEN p.done_at + interval '0.2 second' END,
              p.done_at
       FROM (SELECT n, r, received_at + latency_s * interval '1 second' AS done_at
             FROM plan WHERE state = 'done') AS p
       CROSS JOIN (VALUES ('sr', '1.2.840.10008.5.1.4.1.1.88.34', 1),
                          ('sc', '1.2.840.10008.5.1.4.1.1.7', 2))
             AS k (kind, sop_class, prefix)
       CROSS JOIN LATERAL (SELECT CASE WHEN p.n % 200 = 0 THEN 'dead'
                                       WHEN p.done_at > now() - interval '1 minute'
                                       THEN 'pending' ELSE 'sent' END AS state) AS s""",
    """INSERT INTO node_heartbeats (node_id, hostname, pid, ae_title, host, port, version,
                                    started_at, heartbeat_at)
       VALUES (:hostname || ':CXR_AI:11112', :hostname, :pid, 'CXR_AI', '0.0.0.0', 11112,
               '0.1.0', now() - interval '2 days', now())""",
]
SEQUENCES = ("studies", "series", "instances", "jobs", "results", "sends")


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server, dropped afterwards whatever happens."""
    server = make_url(server_url)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
        yield server.set(database=DATABASE).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
        admin.dispose()


def populate(engine: Engine, jobs: int) -> dict[str, int]:
    """Bulk-fill every table; returns the row counts."""
    params = {"jobs": jobs, "hostname": socket.gethostname(), "pid": os.getpid()}
    with engine.begin() as conn:
        for statement in POPULATE:
            conn.execute(text(statement), params)
        for table in SEQUENCES:
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
        return {
            table: int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in SEQUENCES
        }


def time_in_process(settings_home: Path, url: str, rounds: int) -> tuple[list[float], dict]:
    settings = load_settings(None, storage={"home": settings_home, "database_url": url})
    for _ in range(WARMUP):
        collect_status(settings, echo=False)
    times, report = [], {}
    for _ in range(rounds):
        started = time.perf_counter()
        report = collect_status(settings, echo=False)
        times.append((time.perf_counter() - started) * 1000.0)
    return times, report


def time_subprocess(command: list[str], env: dict[str, str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        times.append((time.perf_counter() - started) * 1000.0)
        if done.returncode not in (0, 1):  # 1 = unhealthy (no listener): still a report
            raise RuntimeError(f"{command} failed:\n{done.stderr[-2000:]}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20, help="in-process calls timed")
    parser.add_argument("--cli-rounds", type=int, default=5, help="CLI subprocesses timed")
    parser.add_argument(
        "--server-url",
        default=os.environ.get(
            "TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/status.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-status-"))
    with bench_database(args.server_url) as url:
        engine = make_engine(url)
        upgrade(engine)
        started = time.perf_counter()
        rows = populate(engine, args.jobs)
        populate_s = time.perf_counter() - started
        with engine.connect() as conn:  # for sizing: bytes of database per study
            size = conn.execute(text("SELECT pg_database_size(current_database())"))
            database_bytes = int(size.scalar_one())
        engine.dispose()
        print(f"populated in {populate_s:.1f} s: {rows}", file=sys.stderr)
        in_process, report = time_in_process(home, url, args.rounds)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")},
            "DICOM_NODE_HOME": str(home),
            "DICOM_NODE_DATABASE_URL": url,
        }
        cli = time_subprocess(
            [sys.executable, "-m", "dicom_node", "status", "--json", "--no-echo"],
            env,
            args.cli_rounds,
        )
        imports = time_subprocess(
            [sys.executable, "-c", "import dicom_node.cli, dicom_node.status"],
            env,
            args.cli_rounds,
        )
        interpreter = time_subprocess([sys.executable, "-c", "pass"], env, args.cli_rounds)

    results = {
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "populate_s": round(populate_s, 1),
        "database_mb": round(database_bytes / 1e6, 1),
        "database_mb_per_1000_studies": round(database_bytes / 1e6 / rows["studies"] * 1000, 2),
        "in_process_ms": {
            "n": len(in_process),
            "median": round(statistics.median(in_process), 1),
            "min": round(min(in_process), 1),
            "max": round(max(in_process), 1),
        },
        "cli_ms": {
            "n": len(cli),
            "median": round(statistics.median(cli), 1),
            "imports_median": round(statistics.median(imports), 1),
            "interpreter_median": round(statistics.median(interpreter), 1),
        },
        "report_sample": {
            "jobs": report["jobs"],
            "queue": report["queue"],
            "throughput": report["throughput"],
            "dead_letters": report["dead_letters"],
        },
    }
    results["cli_ms"]["after_imports_median"] = round(
        results["cli_ms"]["median"] - results["cli_ms"]["imports_median"], 1
    )
    results["target_met"] = results["in_process_ms"]["median"] <= TARGET_MS
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
