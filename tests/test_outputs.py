"""Output types as configuration: a rule's ``outputs`` decide what is written and sent.

The pipeline fans out *outputs × object destinations* without naming an output type, so
a type registered by its own module (here one made in the test) is built, recorded on the
result and queued to every destination like the SR and SC.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.receive import StoreService
from dicom_node.results import registry
from dicom_node.results.registry import BuildInputs, OutputType, check_output_names
from dicom_node.results.sr import measurement_report
from storage.db import session_scope
from storage.models import Result, Send
from storage.spool import Spool
from tests.pipeline_support import (
    FakeAnalyzer,
    destination_toml,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)

CHEST = "siim-cr-jpegbaseline.dcm"
PACS = destination_toml("pacs", 11104)


def rule_toml(outputs: str) -> str:
    return f'[[rules]]\nname = "chest"\npipeline = "cxr-cascade"\noutputs = {outputs}\n'


def only_result(sessions: sessionmaker[Session]) -> Result:
    with session_scope(sessions) as session:
        return session.scalars(select(Result)).one()


def sent_kinds(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    with session_scope(sessions) as session:
        return sorted((s.destination, s.kind) for s in session.scalars(select(Send)))


def test_builtin_types_and_their_needs() -> None:
    assert {"sr", "sc"} <= set(registry.output_names())
    sr, sc = registry.output_types(["sr", "sc"])
    assert sr.needs_priority and not sc.needs_priority
    assert sr.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sc.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert check_output_names(["sc", " sr", "sc"]) == ("sc", "sr")
    with pytest.raises(ValueError, match="unknown output type 'pdf'"):
        check_output_names(["sr", "pdf"])


def test_a_rule_with_outputs_sr_gets_no_heatmap(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    store: StoreService,
    data: Path,
) -> None:
    settings = settings_for(tmp_path, database_url, PACS + rule_toml('["sr"]'))
    pipeline = make_pipeline(settings, sessions, spool, FakeAnalyzer())
    receive_file(store, data / CHEST)
    assert run_queue(pipeline, sessions) == 1
    result = only_result(sessions)
    assert [item["kind"] for item in result.outputs] == ["sr"]
    assert result.sc_path is None and result.sr_path is not None
    assert sent_kinds(sessions) == [("pacs", "sr")]


def _copy_of_the_report(inputs: BuildInputs) -> Dataset:
    """A second SR in a series of its own: stands in for any new output type."""
    report = measurement_report(
        inputs.source,
        inputs.result,
        equipment=inputs.equipment,
        series_number=9999,
        content_datetime=inputs.content_datetime,
    )
    report.SeriesInstanceUID = generate_uid(entropy_srcs=[str(report.SeriesInstanceUID), "copy"])
    report.SOPInstanceUID = generate_uid(entropy_srcs=[str(report.SOPInstanceUID), "copy"])
    return report


def test_a_new_output_type_is_one_registration(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    store: StoreService,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = OutputType("copy", "1.2.840.10008.5.1.4.1.1.88.34", _copy_of_the_report)
    monkeypatch.setitem(registry._REGISTRY, "copy", copy)
    settings = settings_for(tmp_path, database_url, PACS + rule_toml('["sr", "copy"]'))
    pipeline = make_pipeline(settings, sessions, spool, FakeAnalyzer())
    receive_file(store, data / CHEST)
    assert run_queue(pipeline, sessions) == 1

    result = only_result(sessions)
    assert sorted(item["kind"] for item in result.outputs) == ["copy", "sr"]
    written = result.output("copy")
    assert written is not None
    dataset = pydicom.dcmread(spool.path_of(written["path"]))
    assert dataset.SOPInstanceUID == written["sop_instance_uid"] != result.sr_sop_instance_uid
    assert sent_kinds(sessions) == [("pacs", "copy"), ("pacs", "sr")]
