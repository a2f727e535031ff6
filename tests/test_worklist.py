"""The worklist on both backends: order (priority, then arrival), filters, study status,
and ``dicom-node worklist`` as an operator runs it, patient identifiers included only on
request.

The database is filled by real pipeline jobs on received images (the planned engine
decides each image's finding), so priorities, statuses and counts are the node's own.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.patient_lookup import PHI_NOTICE
from dicom_node.receive import StoreService
from storage.db import session_scope
from storage.models import AuditEvent, Instance, Series, Study
from storage.spool import Spool
from storage.worklist import parse_since, rollup_status, worklist
from tests.pipeline_support import (
    chest_image,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)
from tests.priority_support import PlannedAnalyzer
from tests.support import run

HIP = "rg2-hip-cr-jpegextended.dcm"  # not a chest: not scored, so no priority
# Received in this order; accession → (probability, stage) of its image(s).
PLAN: list[tuple[str, list[tuple[float, str] | None]]] = [
    ("A-ROUTINE", [(0.15, "screen")]),
    ("D-URGENT", [(0.60, "confirm")]),
    ("C-URGENT", [(0.80, "confirm")]),
    ("B-STAT", [(0.95, "confirm")]),
    ("F-PARTIAL", [(0.10, "screen"), None]),  # None: the engine cannot decode it
]
EXPECTED_ORDER = ["B-STAT", "D-URGENT", "C-URGENT", "A-ROUTINE", "F-PARTIAL", "HIP"]


@dataclass
class Populated:
    studies: dict[str, str]  # accession (HIP for the hip) → Study Instance UID
    patients: dict[str, tuple[str, str]]  # accession → (name, ID) in the spooled files
    config: Path


@pytest.fixture
def populated(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    data_dir: Path,
) -> Populated:
    data = data_dir / "dicom"
    engine = PlannedAnalyzer()
    store = StoreService(spool, sessions, min_free_bytes=0)
    studies, patients = {}, {}
    images = tmp_path / "images"
    images.mkdir()
    for index, (accession, plans) in enumerate(PLAN):
        name, patient_id = f"Patient{index}^{accession}", f"PID-{accession}"
        study_uid = None
        for plan in plans:
            image = chest_image(
                data,
                images,
                accession=accession,
                patient_name=name,
                patient_id=patient_id,
                study_instance_uid=study_uid,
            )
            study_uid = image.study_instance_uid
            if plan is None:
                engine.errors.add(image.sop_instance_uid)
            else:
                engine.plan[image.sop_instance_uid] = plan
            receive_file(store, image.path)
        assert study_uid is not None
        studies[accession], patients[accession] = study_uid, (name, patient_id)
    receive_file(store, data / HIP)
    hip = pydicom.dcmread(data / HIP, stop_before_pixels=True)
    studies["HIP"] = str(hip.StudyInstanceUID)
    patients["HIP"] = (str(hip.PatientName), str(hip.PatientID))
    run_queue(
        make_pipeline(settings_for(tmp_path, database_url), sessions, spool, engine), sessions
    )
    config = tmp_path / "cli.toml"
    config.write_text(f'[storage]\nhome = "{tmp_path}"\ndatabase_url = "{database_url}"\n')
    return Populated(studies, patients, config)


def accessions(populated: Populated, uids: list[str]) -> list[str]:
    by_uid = {uid: accession for accession, uid in populated.studies.items()}
    return [by_uid[uid] for uid in uids]


def cli(populated: Populated, *args: str) -> Any:
    env = {**os.environ, "COLUMNS": "250"}  # a wide table, no wrapped cells
    command = [sys.executable, "-m", "dicom_node", "worklist", "--config", str(populated.config)]
    return run([*command, *args], env=env, cwd=populated.config.parent)


def move_back(sessions: sessionmaker[Session], study_uid: str, hours: float) -> None:
    moment = datetime.now(UTC) - timedelta(hours=hours)
    with session_scope(sessions) as s:
        s.execute(
            update(Study)
            .where(Study.study_instance_uid == study_uid)
            .values(first_received_at=moment, last_received_at=moment)
        )


# -- the query ------------------------------------------------------------------------------


def test_worklist_orders_by_priority_then_arrival_with_status_and_counts(
    populated: Populated, sessions: sessionmaker[Session]
) -> None:
    with session_scope(sessions) as s:
        entries = worklist(s)
    assert accessions(populated, [e.study_instance_uid for e in entries]) == EXPECTED_ORDER
    by_accession = {e.accession_number: e for e in entries}
    stat, urgent = by_accession["B-STAT"], by_accession["D-URGENT"]
    assert (stat.priority, stat.status, stat.instances) == ("STAT", "done", 1)
    assert (stat.top_finding, stat.top_probability) == ("Pneumonia", pytest.approx(0.95))
    # D arrived before C: it comes first although C's score is higher.
    assert urgent.priority_score == pytest.approx(0.60)
    assert by_accession["C-URGENT"].priority_score == pytest.approx(0.80)
    partial = by_accession["F-PARTIAL"]
    assert (partial.priority, partial.status, partial.instances) == ("ROUTINE", "partial", 2)
    hip = entries[-1]
    assert (hip.priority, hip.priority_score, hip.status) == (None, None, "skipped")
    document = stat.as_dict()
    assert document["first_received_at"].endswith("+00:00")
    assert json.loads(json.dumps(document)) == document


def test_worklist_filters_by_level_arrival_and_limit(
    populated: Populated, sessions: sessionmaker[Session]
) -> None:
    move_back(sessions, populated.studies["A-ROUTINE"], hours=3)
    with session_scope(sessions) as s:
        urgent_up = worklist(s, priorities=["stat", "URGENT"])
        recent = worklist(s, since=datetime.now(UTC) - timedelta(hours=2))
        first_two = worklist(s, limit=2)
        first_four = worklist(s, limit=4)  # the page crosses from URGENT into ROUTINE
        assert worklist(s, priorities=[]) == []
        with pytest.raises(ValueError, match="unknown priority"):
            worklist(s, priorities=["SOON"])
    assert accessions(populated, [e.study_instance_uid for e in urgent_up]) == [
        "B-STAT",
        "D-URGENT",
        "C-URGENT",
    ]
    recent_accessions = accessions(populated, [e.study_instance_uid for e in recent])
    assert recent_accessions == [a for a in EXPECTED_ORDER if a != "A-ROUTINE"]
    assert [e.accession_number for e in first_two] == ["B-STAT", "D-URGENT"]
    assert [e.accession_number for e in first_four] == EXPECTED_ORDER[:4]


@pytest.mark.parametrize(
    ("jobs", "status"),
    [
        ({}, "received"),
        ({"running": 1, "done": 2}, "running"),
        ({"queued": 1, "done": 1}, "queued"),
        ({"done": 1, "skipped": 1}, "done"),
        ({"done": 1, "failed": 1}, "partial"),
        ({"failed": 1, "skipped": 1}, "failed"),
        ({"skipped": 2}, "skipped"),
    ],
)
def test_study_status_rolls_up_its_jobs(jobs: dict[str, int], status: str) -> None:
    assert rollup_status(jobs) == status


def test_since_takes_durations_and_iso_times() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-22T10:00:00+00:00") == now - timedelta(hours=2)
    with pytest.raises(ValueError, match="give a duration"):
        parse_since("yesterday")


# -- the command ----------------------------------------------------------------------------


def test_cli_json_and_table_list_studies_in_order_without_patient_identifiers(
    populated: Populated,
) -> None:
    listed = cli(populated, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert accessions(populated, [r["study_instance_uid"] for r in rows]) == EXPECTED_ORDER
    assert rows[0]["priority"] == "STAT" and rows[0]["status"] == "done"
    assert "patient_name" not in rows[0]

    table = cli(populated)
    assert table.returncode == 0, table.stderr
    positions = [table.stdout.index(a) for a in EXPECTED_ORDER if a != "HIP"]
    assert positions == sorted(positions)
    assert "STAT" in table.stdout and "partial" in table.stdout
    for result in (listed, table):
        assert PHI_NOTICE not in result.stderr
        for name, patient_id in populated.patients.values():
            assert name not in result.stdout + result.stderr
            assert patient_id not in result.stdout + result.stderr


def test_cli_shows_patient_identifiers_only_on_request_with_a_notice_and_an_audit_event(
    populated: Populated, sessions: sessionmaker[Session], spool: Spool
) -> None:
    with session_scope(sessions) as s:  # retention removed the routine study's image
        instance = s.scalars(
            select(Instance)
            .join(Series)
            .join(Study)
            .where(Study.study_instance_uid == populated.studies["A-ROUTINE"])
        ).one()
        spool.remove(instance.spool_path)
        instance.purged_at = datetime.now(UTC)

    shown = cli(populated, "--json", "--show-phi")
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.count(PHI_NOTICE) == 1
    patients = {
        r["accession_number"]: (r["patient_name"], r["patient_id"])
        for r in json.loads(shown.stdout)
    }
    assert patients["B-STAT"] == populated.patients["B-STAT"]
    assert patients["F-PARTIAL"] == populated.patients["F-PARTIAL"]
    assert patients["A-ROUTINE"] == ("(purged)", "(purged)")

    table = cli(populated, "--show-phi", "--priority", "STAT,urgent", "--limit", "2")
    assert populated.patients["B-STAT"][0] in table.stdout
    assert populated.patients["D-URGENT"][1] in table.stdout
    assert populated.patients["C-URGENT"][0] not in table.stdout  # not listed, not read

    with session_scope(sessions) as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.kind == "worklist.phi_shown")))
    assert [e.details["studies"] for e in events if e.details] == [6, 2]
    assert all(e.actor.startswith("cli:") for e in events)
    for name, patient_id in populated.patients.values():
        assert all(
            name not in repr(e.details) and patient_id not in repr(e.details) for e in events
        )


def test_cli_rejects_an_unknown_level_or_time_with_exit_2(tmp_path: Path) -> None:
    """Checked before the database is opened: one line on stderr, nothing on stdout."""
    config = tmp_path / "cli.toml"
    config.write_text(f'[storage]\nhome = "{tmp_path}"\n')
    populated = Populated({}, {}, config)
    for args in (["--priority", "SOON"], ["--since", "yesterday"]):
        result = cli(populated, *args)
        assert result.returncode == 2
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "node.db").exists()
