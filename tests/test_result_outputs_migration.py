"""Migration 0006 folds the SR and SC columns of existing results into ``outputs``.

A node upgraded with results on disk must keep knowing which files are its outputs:
retention removes them by that list, and the API serves the heatmap from it.
"""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from storage.db import alembic_config, current_revision, head_revision, upgrade
from storage.models import Result
from storage.records import record_received
from tests.test_storage import received

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _at(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)


def _legacy_result(engine: Engine, *, with_sc: bool) -> None:
    """One scored result as revision 0005 stored it (its instance made at head first)."""
    instance = record_received(sessionmaker(engine), received(), actor="test")
    _at(engine, "0005")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO results (id, instance_id, pipeline, model_key, status, findings,"
                " warnings, timings_ms, sr_sop_instance_uid, sr_path, sc_sop_instance_uid,"
                " sc_path, created_at, updated_at) VALUES (1, :instance, 'cxr-cascade', 'm',"
                " 'scored', '[]', '[]', '{}', '2.25.1', 'outputs/sr/2.25.1.dcm', :sc_uid,"
                " :sc_path, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {
                "instance": instance.instance_id,
                "sc_uid": "2.25.2" if with_sc else None,
                "sc_path": "outputs/sc/2.25.2.dcm" if with_sc else None,
            },
        )


def test_upgrade_lists_the_sr_and_sc_of_existing_results(engine: Engine) -> None:
    _legacy_result(engine, with_sc=True)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with Session(engine) as session:
        result = session.scalars(select(Result)).one()
        assert result.outputs == [
            {
                "kind": "sr",
                "sop_class_uid": SR_CLASS,
                "sop_instance_uid": "2.25.1",
                "path": "outputs/sr/2.25.1.dcm",
            },
            {
                "kind": "sc",
                "sop_class_uid": SC_CLASS,
                "sop_instance_uid": "2.25.2",
                "path": "outputs/sc/2.25.2.dcm",
            },
        ]
        assert (result.sr_path, result.sc_sop_instance_uid) == ("outputs/sr/2.25.1.dcm", "2.25.2")


def test_downgrade_restores_the_columns(engine: Engine) -> None:
    _legacy_result(engine, with_sc=False)
    upgrade(engine)
    _at(engine, "0005")
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT sr_sop_instance_uid, sr_path, sc_path FROM results")
        ).one()
    assert tuple(row) == ("2.25.1", "outputs/sr/2.25.1.dcm", None)
