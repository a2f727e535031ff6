"""Model registry, shadow and active scores, radiologist feedback.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Four new tables, nothing changed in the existing ones: ``model_versions`` (installed
bundles), ``model_assignments`` (append-only history of what is active or shadowed per
finding and role), ``model_scores`` (one row per model version, finding and image, for
live performance and drift) and ``feedback`` (readers' labels, append-only).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
UID = sa.String(length=64)
JSON_DOC = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("finding_code", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("parent", sa.String(200), nullable=True),
        sa.Column("card", JSON_DOC, nullable=False),
        sa.Column("installed_at", TS, nullable=False),
        sa.Column("installed_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    )
    op.create_table(
        "model_assignments",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("slot", sa.String(8), nullable=False),
        sa.Column("model_version_id", BIG_ID, nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("assigned_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name="fk_model_assignments_model_version_id_model_versions",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_assignments"),
    )
    op.create_index(
        "ix_model_assignments_slot", "model_assignments", ["finding", "role", "slot", "id"]
    )
    op.create_table(
        "model_scores",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("instance_id", BIG_ID, nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("finding_code", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("assessed", sa.Boolean(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("present", sa.Boolean(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("stage", sa.String(16), nullable=True),
        sa.Column("refused", sa.Boolean(), nullable=False),
        sa.Column("ood_distance", sa.Float(), nullable=True),
        sa.Column("age", sa.Float(), nullable=True),
        sa.Column("sex", sa.String(16), nullable=True),
        sa.Column("view", sa.String(16), nullable=True),
        sa.Column("manufacturer", sa.String(64), nullable=True),
        sa.Column("pixel_spacing", sa.Float(), nullable=True),
        sa.Column("photometric", sa.String(16), nullable=True),
        sa.Column("bits", sa.String(8), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_model_scores_instance_id_instances"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_scores"),
        sa.UniqueConstraint(
            "instance_id",
            "finding_code",
            "model",
            "version",
            "role",
            name="uq_model_scores_instance_id_finding_code_model_version_role",
        ),
    )
    op.create_index(
        "ix_model_scores_window",
        "model_scores",
        ["model", "version", "role", "finding_code", "id"],
    )
    op.create_index("ix_model_scores_sop_instance_uid", "model_scores", ["sop_instance_uid"])
    op.create_index("ix_model_scores_study_instance_uid", "model_scores", ["study_instance_uid"])
    op.create_table(
        "feedback",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=True),
        sa.Column("sop_instance_uid", UID, nullable=True),
        sa.Column("finding_code", sa.String(64), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("reader", sa.String(64), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
    )
    op.create_index("ix_feedback_study_instance_uid", "feedback", ["study_instance_uid"])
    op.create_index("ix_feedback_sop_instance_uid", "feedback", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("model_scores")
    op.drop_table("model_assignments")
    op.drop_table("model_versions")
