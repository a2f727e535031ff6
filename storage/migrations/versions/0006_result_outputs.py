"""Results list their output objects in one ``outputs`` column, whatever their type.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Output types are a registry (SR, heatmap SC, and more to come: SEG, Parametric Map), so
the result row can no longer have two columns per type: ``outputs`` is a JSON list of
``{"kind", "sop_class_uid", "sop_instance_uid", "path"}``, one per object written for
the analysis. The four ``sr_*`` / ``sc_*`` columns are folded into it and dropped.

Plain ``ALTER TABLE … ADD/DROP COLUMN`` on both backends (SQLite has both since 3.35):
batch mode would rebuild ``results`` on SQLite, and with foreign keys enforced dropping
the old table fails as soon as sends refer to its rows. ``outputs`` stays nullable at the
database level for the same reason (SQLite cannot add NOT NULL in place); the model
always writes a list.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOC = sa.JSON().with_variant(JSONB(), "postgresql")
SOP_CLASSES = {
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "sc": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
}
_LEGACY = sa.table(
    "results",
    sa.column("id", sa.BigInteger),
    sa.column("outputs", JSON_DOC),
    *(
        sa.column(f"{kind}_{what}", sa.String)
        for kind in SOP_CLASSES
        for what in ("sop_instance_uid", "path")
    ),  # noqa: E501
)


LEGACY_COLUMNS = ("sr_sop_instance_uid", "sr_path", "sc_sop_instance_uid", "sc_path")


def upgrade() -> None:
    op.add_column("results", sa.Column("outputs", JSON_DOC, nullable=True))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(
            _LEGACY.c.id,
            _LEGACY.c.sr_sop_instance_uid,
            _LEGACY.c.sr_path,
            _LEGACY.c.sc_sop_instance_uid,
            _LEGACY.c.sc_path,
        )
    ).all()
    for row in rows:
        outputs = [
            {
                "kind": kind,
                "sop_class_uid": SOP_CLASSES[kind],
                "sop_instance_uid": uid,
                "path": path,
            }
            for kind, uid, path in (
                ("sr", row.sr_sop_instance_uid, row.sr_path),
                ("sc", row.sc_sop_instance_uid, row.sc_path),
            )
            if uid and path
        ]
        connection.execute(sa.update(_LEGACY).where(_LEGACY.c.id == row.id).values(outputs=outputs))
    for column in LEGACY_COLUMNS:
        op.execute(f"ALTER TABLE results DROP COLUMN {column}")


def downgrade() -> None:
    for column, length in zip(LEGACY_COLUMNS, (64, 255, 64, 255), strict=True):
        op.add_column("results", sa.Column(column, sa.String(length)))
    connection = op.get_bind()
    for row in connection.execute(sa.select(_LEGACY.c.id, _LEGACY.c.outputs)).all():
        values: dict[str, str] = {}
        for output in row.outputs or []:
            if output.get("kind") in SOP_CLASSES:
                values[f"{output['kind']}_sop_instance_uid"] = output["sop_instance_uid"]
                values[f"{output['kind']}_path"] = output["path"]
        if values:
            connection.execute(sa.update(_LEGACY).where(_LEGACY.c.id == row.id).values(**values))
    op.execute("ALTER TABLE results DROP COLUMN outputs")
