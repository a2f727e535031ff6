"""Study priority: levels and scores from findings, recomputed as images arrive, audited,
reported in the SR.

The pipeline tests run real jobs on both backends (real receive path, database, spool and
SR writer; :class:`tests.priority_support.PlannedAnalyzer` instead of the networks), and
every SR they read back also goes through ``dciodvfy``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ConfigError, PrioritySettings
from dicom_node.pipeline import Pipeline
from dicom_node.priority import rate_finding, study_priority
from dicom_node.receive import StoreService
from dicom_node.results.sr import measurement_report
from storage import queue
from storage.db import session_scope
from storage.models import AuditEvent, Result, Study
from storage.spool import Spool
from tests.dciodvfy import dciodvfy
from tests.pipeline_support import (
    Image,
    chest_image,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)
from tests.priority_support import PlannedAnalyzer
from tests.results_data import make_finding, make_result, read_source

DEFAULTS = PrioritySettings()


def finding(
    probability: float, stage: str = "confirm", present: bool | None = None
) -> dict[str, Any]:
    present = (stage == "confirm" and probability >= 0.5) if present is None else present
    return make_finding(present, stage, probability=probability).as_dict()


# -- the formula ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "level", "score"),
    [
        (finding(0.95), "STAT", 0.95),  # confirmed, ≥ stat_at
        (finding(0.70), "URGENT", 0.70),  # confirmed, ≥ urgent_at
        (finding(0.95, "screen"), "URGENT", 0.475),  # screen-only: never STAT, score halved
        (finding(0.15, "screen"), "ROUTINE", 0.075),
        (finding(0.60, "confirm", present=False), "URGENT", 0.30),  # confirm said absent
        (finding(0.20, "confirm", present=False), "ROUTINE", 0.10),
    ],
)
def test_each_finding_gets_a_level_and_a_score(
    stored: dict[str, Any], level: str, score: float
) -> None:
    rated_level, rated_score = rate_finding(stored, DEFAULTS)
    assert rated_level == level
    assert rated_score == pytest.approx(score)


def test_a_confirmed_finding_outranks_a_more_probable_screen_only_one() -> None:
    stat = study_priority([finding(0.99, "screen"), finding(0.92)], DEFAULTS)
    assert (stat.level, stat.rank, stat.top_probability) == ("STAT", 3, pytest.approx(0.92))
    urgent = study_priority([finding(0.95, "screen"), finding(0.60)], DEFAULTS)
    assert (urgent.level, urgent.top_probability) == ("URGENT", pytest.approx(0.60))
    assert urgent.score == pytest.approx(0.60)  # > 0.95 × 0.5 of the screen-only finding
    assert study_priority([], DEFAULTS).level is None and study_priority([], DEFAULTS).rank == 0


def test_thresholds_weights_and_factor_come_from_the_config(
    tmp_path: Path, database_url: str
) -> None:
    toml = (
        "[priority]\nunconfirmed_factor = 0.25\n"
        "[priority.findings.pneumonia]\nweight = 2.0\nurgent_at = 0.3\nstat_at = 0.6\n"
    )
    settings = settings_for(tmp_path, database_url, toml).priority
    assert rate_finding(finding(0.65), settings) == ("STAT", pytest.approx(1.3))
    assert rate_finding(finding(0.40, "screen"), settings) == ("URGENT", pytest.approx(0.2))
    with pytest.raises(ConfigError, match=r"priority\.findings\.pneumonia\.stat_at"):
        settings_for(tmp_path, database_url, "[priority.findings.pneumonia]\nstat_at = 0.1\n")


def test_sr_uid_depends_on_the_priority_it_reports() -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")
    result = make_result(source)
    routine = measurement_report(source, result, priority="routine")
    stat = measurement_report(source, result, priority="stat")
    assert routine.SOPInstanceUID != stat.SOPInstanceUID
    assert routine.SeriesInstanceUID == stat.SeriesInstanceUID  # one result series
    assert measurement_report(source, result, priority="stat").SOPInstanceUID == stat.SOPInstanceUID


# -- in the pipeline ------------------------------------------------------------------------


@pytest.fixture
def planned() -> PlannedAnalyzer:
    return PlannedAnalyzer()


@pytest.fixture
def pipeline(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    planned: PlannedAnalyzer,
) -> Pipeline:
    return make_pipeline(settings_for(tmp_path, database_url), sessions, spool, planned)


Analyse = Callable[..., tuple[Image, int]]


@pytest.fixture
def analyse(
    pipeline: Pipeline,
    planned: PlannedAnalyzer,
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
    tmp_path: Path,
) -> Analyse:
    """Receive a new chest image of ``accession`` scored as planned, run the queue; returns
    the image and its instance id."""

    def run(
        accession: str, probability: float, stage: str, study_instance_uid: str | None = None
    ) -> tuple[Image, int]:
        image = chest_image(
            data, tmp_path, accession=accession, study_instance_uid=study_instance_uid
        )
        planned.plan[image.sop_instance_uid] = (probability, stage)
        instance_id = receive_file(store, image.path)
        run_queue(pipeline, sessions)
        return image, instance_id

    return run


def study_row(sessions: sessionmaker[Session], uid: str) -> Study:
    with session_scope(sessions) as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert study is not None
        return study


def priority_events(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    with session_scope(sessions) as s:
        query = select(AuditEvent).where(AuditEvent.kind == "study.priority")
        return [dict(event.details or {}) for event in s.scalars(query.order_by(AuditEvent.id))]


def sr_of(sessions: sessionmaker[Session], spool: Spool, instance_id: int) -> Path:
    with session_scope(sessions) as s:
        result = s.scalar(select(Result).where(Result.instance_id == instance_id))
        assert result is not None and result.sr_path is not None
        return spool.path_of(result.sr_path)


def reported_priority(path: Path) -> str | None:
    """The SR's study-level Priority (TID 1500 qualitative evaluation), by meaning."""
    sr = pydicom.dcmread(path)
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "C0034375":  # Qualitative Evaluations
            continue
        for child in item.ContentSequence:
            if child.ConceptNameCodeSequence[0].CodeValue == "260870009":  # Priority
                return str(child.ConceptCodeSequence[0].CodeMeaning)
    return None


def test_second_image_raises_the_study_priority_audited_and_reported_in_its_sr(
    analyse: Analyse, sessions: sessionmaker[Session], spool: Spool
) -> None:
    first, first_id = analyse("ACC1", 0.15, "screen")
    study = study_row(sessions, first.study_instance_uid)
    assert (study.priority, study.priority_rank) == ("ROUTINE", 1)
    assert study.priority_score == pytest.approx(0.075)
    assert (study.top_finding, study.top_probability) == ("Pneumonia", pytest.approx(0.15))
    assert reported_priority(sr_of(sessions, spool, first_id)) == "Routine"

    _, second_id = analyse("ACC1", 0.93, "confirm", first.study_instance_uid)
    study = study_row(sessions, first.study_instance_uid)
    assert (study.priority, study.priority_rank) == ("STAT", 3)
    assert study.priority_score == pytest.approx(0.93)
    assert reported_priority(sr_of(sessions, spool, second_id)) == "Stat"

    events = priority_events(sessions)
    assert [(e["old"], e["new"]) for e in events] == [(None, "ROUTINE"), ("ROUTINE", "STAT")]
    assert events[1]["old_score"] == pytest.approx(0.075)
    assert events[1]["new_score"] == pytest.approx(0.93)
    assert "Test^Patient" not in repr(events) and "PID-0" not in repr(events)

    report = dciodvfy(sr_of(sessions, spool, second_id))
    assert report.errors == [], report.output
    assert report.unexpected_warnings == [], report.output


def test_rerun_after_the_priority_changed_gets_a_new_sr_and_an_unchanged_one_keeps_its_uid(
    analyse: Analyse, pipeline: Pipeline, sessions: sessionmaker[Session], spool: Spool
) -> None:
    first, first_id = analyse("ACC2", 0.70, "confirm")
    urgent_sr = sr_of(sessions, spool, first_id)

    with session_scope(sessions) as s:  # re-run with the same outcome: nothing changes
        queue.enqueue(s, first_id, actor="test")
    run_queue(pipeline, sessions)
    assert sr_of(sessions, spool, first_id) == urgent_sr
    assert len(priority_events(sessions)) == 1

    analyse("ACC2", 0.97, "confirm", first.study_instance_uid)
    with session_scope(sessions) as s:  # the first image again: its report now says Stat
        queue.enqueue(s, first_id, actor="test")
    run_queue(pipeline, sessions)
    stat_sr = sr_of(sessions, spool, first_id)
    assert stat_sr != urgent_sr  # a new SOP Instance UID for a different report
    assert (reported_priority(urgent_sr), reported_priority(stat_sr)) == ("Urgent", "Stat")
    assert [e["new"] for e in priority_events(sessions)] == ["URGENT", "STAT"]


def test_not_scored_image_leaves_the_study_without_priority(
    pipeline: Pipeline, store: StoreService, sessions: sessionmaker[Session], data: Path
) -> None:
    hip = data / "rg2-hip-cr-jpegextended.dcm"  # the header gate refuses it: not a chest
    receive_file(store, hip)
    run_queue(pipeline, sessions)
    study = study_row(sessions, str(pydicom.dcmread(hip, stop_before_pixels=True).StudyInstanceUID))
    assert (study.priority, study.priority_rank, study.priority_score) == (None, 0, None)
    assert priority_events(sessions) == []


def test_a_finding_not_assessed_never_feeds_the_priority() -> None:
    settings = PrioritySettings()
    not_assessed = {
        "code": "233604007",
        "meaning": "Pneumonia",
        "status": "not_assessed",
        "reason": "patient age 62 years is outside the validated ages 1–5 years",
        "present": False,
    }
    assert study_priority([not_assessed], settings).level is None
    assessed = {"code": "233604007", "meaning": "Pneumonia", "probability": 0.3, "stage": "screen"}
    assert study_priority([not_assessed, assessed], settings).level == "ROUTINE"


def test_confirmed_tuberculosis_is_urgent_at_most_by_default() -> None:
    settings = PrioritySettings()
    tb = {
        "code": "154283005",
        "meaning": "Pulmonary tuberculosis",
        "probability": 0.99,
        "present": True,
        "stage": "confirm",
    }
    assert rate_finding(tb, settings)[0] == "URGENT"
    pneumonia = {**tb, "code": "233604007", "meaning": "Pneumonia"}
    assert rate_finding(pneumonia, settings)[0] == "STAT"
