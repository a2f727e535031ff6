"""Results and the outbox: what the engine concluded, what is still to be delivered.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

``results`` holds one row per instance version, pipeline and model identity (a re-run
updates it); ``sends`` is the persistent outbox, one row per destination and SOP Instance
UID, claimed by senders with ``FOR UPDATE SKIP LOCKED`` through ``ix_sends_claim``.
``instances.purged_at`` records when retention removed the spooled file. Self-contained,
like 0001: no imports from ``storage.models``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
UID = sa.String(length=64)
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
RESULT_STATES = ("scored", "not_scored", "error")
SEND_STATES = ("pending", "sending", "sent", "dead")


def _check(column: str, values: Sequence[str], name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(
        f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")", name=name
    )


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("purged_at", TS, nullable=True))
    _create_results()
    _create_sends()


def _create_results() -> None:
    op.create_table(
        "results",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("instance_id", BIG_ID, nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("pipeline", sa.String(length=32), nullable=False),
        sa.Column("model_key", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("findings", JSON_DOC, nullable=False),
        sa.Column("in_domain", sa.Boolean(), nullable=True),
        sa.Column("ood_distance", sa.Float(), nullable=True),
        sa.Column("warnings", JSON_DOC, nullable=False),
        sa.Column("timings_ms", JSON_DOC, nullable=False),
        sa.Column("sr_sop_instance_uid", UID, nullable=True),
        sa.Column("sr_path", sa.String(length=255), nullable=True),
        sa.Column("sc_sop_instance_uid", UID, nullable=True),
        sa.Column("sc_path", sa.String(length=255), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("purged_at", TS, nullable=True),
        _check("status", RESULT_STATES, "ck_results_result_status"),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_results_instance_id_instances"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.UniqueConstraint(
            "instance_id",
            "pipeline",
            "model_key",
            name="uq_results_instance_id_pipeline_model_key",
        ),
    )
    op.create_index("ix_results_instance_id", "results", ["instance_id"])


def _create_sends() -> None:
    op.create_table(
        "sends",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("result_id", BIG_ID, nullable=True),
        sa.Column("instance_id", BIG_ID, nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("file_path", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("first_enqueued_at", TS, nullable=False),
        sa.Column("last_attempt_at", TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sender", sa.String(length=128), nullable=True),
        sa.Column("sent_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        _check("state", SEND_STATES, "ck_sends_send_state"),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_sends_instance_id_instances"
        ),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name="fk_sends_result_id_results"),
        sa.PrimaryKeyConstraint("id", name="pk_sends"),
        sa.UniqueConstraint(
            "destination", "sop_instance_uid", name="uq_sends_destination_sop_instance_uid"
        ),
    )
    op.create_index("ix_sends_claim", "sends", ["state", "next_attempt_at"])
    op.create_index("ix_sends_instance_id", "sends", ["instance_id"])
    op.create_index("ix_sends_result_id", "sends", ["result_id"])


def downgrade() -> None:
    op.drop_table("sends")
    op.drop_table("results")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("purged_at")
