"""Upgrading a node with live data, and backing its database up (both backends).

The upgrade test builds what an installation of the previous release holds when it is
stopped for the upgrade: a database at Alembic revision 0005 (results with their
``sr_*``/``sc_*`` columns, before 0006 folded them into ``outputs``) and its spool, with

* **pending sends**: images analysed (fake analyzer, real SR and SC written to the
  spool) whose results were never delivered;
* **dead letters**: the sends of one more analysed image, given up on;
* **queued jobs**: images received but not analysed yet.

The data is made at head through the storage API and the real receive path and pipeline,
then the schema is taken down to 0005 with Alembic (which moves the outputs back into
the old columns). Then, as an operator would: ``dicom-node db upgrade``, ``dicom-node
sends retry --dead``, ``dicom-node serve`` with the real analyzer. A recording DICOM
archive must receive every output object exactly once — the old results' SRs and SCs and
the new ones of the queued images — and the outbox must end with everything sent.

The backup tests copy a database with ``dicom-node db backup`` (SQLite's online backup
API; ``pg_dump`` for PostgreSQL), restore it as the README says and find the same rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from dicom_node.receive import StoreService
from storage.db import (
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    make_session_factory,
    session_scope,
    upgrade,
)
from storage.models import Send
from storage.outbox import dead_letter
from storage.spool import Spool
from tests.e2e.scale_support import chest_burst, rows, uid_of, wait_for
from tests.pipeline_support import (
    FakeAnalyzer,
    RecordingSCP,
    destination_toml,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)
from tests.support import NodeProcess, free_port, provision_database, run

PREVIOUS = "0005"
ANALYSED = 2  # results waiting to be delivered
DEAD = 1  # results whose sends were dead-lettered
QUEUED = 2  # received, not analysed
WAIT_S = 240.0


@dataclass
class Previous:
    """What the previous release left behind."""

    home: Path
    database_url: str
    config: Path
    pending: set[str]  # SOP Instance UIDs of pending sends
    dead: set[str]  # … of dead-lettered sends
    queued: set[str]  # SOP Instance UIDs of received, unanalysed images


@pytest.fixture
def archive() -> Iterator[RecordingSCP]:
    scp = RecordingSCP(free_port()).start()
    try:
        yield scp
    finally:
        scp.stop()


def node_toml(archive_port: int) -> str:
    return (
        destination_toml("pacs", archive_port)
        + "\n[worker]\nthreads = 1\npoll_interval = 0.5\n"
        + "\n[sender]\npoll_interval = 0.5\n"
        + "\n[inference]\nthreads = 1\n"
        + "\n[retention]\nenabled = false\n"
    )


def previous_release(
    home: Path, database_url: str, data_dir: Path, port: int, *, at: str | None = PREVIOUS
) -> Previous:
    """A stopped node with pending sends, dead letters and queued jobs, its schema taken
    down to revision ``at`` (None: left at head)."""
    home.mkdir(parents=True, exist_ok=True)
    settings = settings_for(home, database_url, node_toml(port), worker={"threads": 0})
    config = home / "node.toml"
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        spool = Spool(settings.storage.spool_root)
        spool.prepare()
        store = StoreService(spool, sessions, min_free_bytes=0)
        images = chest_burst(data_dir, home / "sources", ANALYSED + DEAD + QUEUED)
        for path in images[: ANALYSED + DEAD]:
            receive_file(store, path)
        run_queue(make_pipeline(settings, sessions, spool, FakeAnalyzer(probability=0.9)), sessions)
        with session_scope(sessions) as session:
            sends = list(session.scalars(select(Send).order_by(Send.id)))
            per_image = len(sends) // (ANALYSED + DEAD)
            for send in sends[-DEAD * per_image :]:
                dead_letter(session, send, "0xC000 refused (test)", actor="test")
            pending = {s.sop_instance_uid for s in sends[: -DEAD * per_image]}
            dead = {s.sop_instance_uid for s in sends[-DEAD * per_image :]}
        queued = set()
        for path in images[ANALYSED + DEAD :]:
            receive_file(store, path)
            queued.add(uid_of(path))
        if at is not None:
            _downgrade(database_url, at)
            assert current_revision(engine) == at
    finally:
        engine.dispose()
    return Previous(home, database_url, config, pending, dead, queued)


def _downgrade(database_url: str, revision: str) -> None:
    """Alembic down to ``revision`` on a plain connection: SQLite without the node's
    ``foreign_keys=ON`` (batch migrations copy and drop tables that sends refer to)."""
    plain = create_engine(database_url)
    try:
        with plain.begin() as connection:
            command.downgrade(alembic_config(connection), revision)
    finally:
        plain.dispose()


def cli(
    previous: Previous, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    base |= {
        "DICOM_NODE_HOME": str(previous.home),
        "DICOM_NODE_DATABASE_URL": previous.database_url,
        "DICOM_NODE_CONFIG": str(previous.config),
    }
    return run(
        [sys.executable, "-m", "dicom_node", *args], env=base | (env or {}), cwd=previous.home
    )


def test_upgrade_with_queued_jobs_pending_sends_and_dead_letters_delivers_everything_once(
    tmp_path: Path,
    database_url: str,
    data_dir: Path,
    archive: RecordingSCP,
) -> None:
    previous = previous_release(tmp_path, database_url, data_dir, archive.port)
    assert len(previous.pending) == 2 * ANALYSED and len(previous.dead) == 2 * DEAD
    legacy = rows(database_url, "SELECT sr_path, sc_path FROM results")
    assert len(legacy) == ANALYSED + DEAD and all(sr and sc for sr, sc in legacy)
    states = dict(rows(database_url, "SELECT state, count(*) FROM sends GROUP BY state"))
    assert states == {"pending": 2 * ANALYSED, "dead": 2 * DEAD}
    assert rows(database_url, "SELECT count(*) FROM jobs WHERE state = 'queued'")[0][0] == QUEUED

    upgraded = cli(previous, "db", "upgrade", "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"] == head_revision()
    outputs = [_json(row[0]) for row in rows(database_url, "SELECT outputs FROM results")]
    assert all({o["kind"] for o in listed} >= {"sr", "sc"} for listed in outputs)
    retried = cli(previous, "sends", "retry", "--dead", "--json")
    assert retried.returncode == 0, retried.stderr
    assert len(json.loads(retried.stdout)["requeued"]) == 2 * DEAD

    node = NodeProcess(
        home=previous.home,
        database_url=database_url,
        config_file=previous.config,
        workers=True,
        extra_env={"DICOM_NODE_SPOOL_DIR": str(previous.home / "spool")},
    ).start()
    try:

        def delivered() -> bool:
            jobs = dict(rows(database_url, "SELECT state, count(*) FROM jobs GROUP BY state"))
            open_sends = rows(database_url, "SELECT count(*) FROM sends WHERE state != 'sent'")
            return jobs.get("queued", 0) + jobs.get("running", 0) == 0 and open_sends[0][0] == 0

        wait_for(delivered, WAIT_S, "the queue to drain and every send to be delivered")
    finally:
        assert node.stop() == 0

    received = Counter(archive.uids())
    assert set(received.values()) == {1}, received  # nothing delivered twice
    assert previous.pending | previous.dead <= set(received)
    new_sends = _new_sends(database_url, previous.queued)
    assert {kind for _, kind in new_sends} >= {"sr"}  # the queued images were analysed
    assert {uid for uid, _ in new_sends} <= set(received)
    every_send = {uid for (uid,) in rows(database_url, "SELECT sop_instance_uid FROM sends")}
    assert set(received) == every_send
    sent_events = Counter(
        _json(details)["send_id"]
        for (details,) in rows(
            database_url, "SELECT details FROM audit_events WHERE kind = 'send.sent'"
        )
    )
    assert set(sent_events.values()) == {1}


def _json(value: Any) -> Any:
    """A JSON column read with plain SQL: parsed by psycopg2 (JSONB), text on SQLite."""
    return json.loads(value) if isinstance(value, str) else value


def _new_sends(database_url: str, sources: set[str]) -> list[tuple[str, str]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                text(
                    "SELECT s.sop_instance_uid, s.kind, i.sop_instance_uid FROM sends s "
                    "JOIN instances i ON s.instance_id = i.id"
                )
            ).all()
    finally:
        engine.dispose()
    return [(uid, kind) for uid, kind, source in found if source in sources]


# -- backups --------------------------------------------------------------------------------


def test_db_backup_copies_the_database_and_the_copy_restores(
    tmp_path: Path, database_url: str, data_dir: Path
) -> None:
    previous = previous_release(tmp_path / "node", database_url, data_dir, free_port(), at=None)
    counts = _counts(database_url)
    backup = tmp_path / "backup.db"
    made = cli(previous, "db", "backup", str(backup), "--json")
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["file"] == str(backup) and report["bytes"] == backup.stat().st_size > 0
    again = cli(previous, "db", "backup", str(backup))
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten

    if make_url(database_url).get_backend_name() == "sqlite":
        assert report["format"] == "sqlite" and report["revision"] == head_revision()
        restored_url = f"sqlite:///{tmp_path / 'restored.db'}"
        shutil.copyfile(backup, tmp_path / "restored.db")  # README: stop, copy back, start
        assert _counts(restored_url) == counts
        return
    assert report["format"] == "pg_dump custom"
    with provision_database("postgresql", tmp_path) as restored_url:
        target = make_url(restored_url).set(drivername="postgresql").render_as_string(False)
        restore = run(["pg_restore", "--no-owner", f"--dbname={target}", str(backup)])
        assert restore.returncode == 0, restore.stderr
        assert _counts(restored_url) == counts


def test_db_backup_without_pg_dump_prints_the_command_and_fails(tmp_path: Path) -> None:
    with provision_database("postgresql", tmp_path) as url:
        previous = Previous(tmp_path, url, tmp_path / "node.toml", set(), set(), set())
        previous.config.write_text("")
        bare = cli(previous, "db", "backup", str(tmp_path / "dump"), env={"PATH": "/nonexistent"})
    assert bare.returncode == 1
    assert "pg_dump --format=custom" in bare.stderr and "PGPASSWORD" in bare.stderr
    assert not (tmp_path / "dump").exists()


def _counts(url: str) -> dict[str, object]:
    """Rows per table and the schema revision of a database."""
    tables = ("studies", "instances", "jobs", "results", "sends", "audit_events")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            counts: dict[str, object] = {
                table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
                for table in tables
            }
        counts["revision"] = current_revision(engine)
        return counts
    finally:
        engine.dispose()
