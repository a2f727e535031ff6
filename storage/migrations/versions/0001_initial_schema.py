"""Initial schema: studies, series, instances, jobs, audit events, node heartbeats.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Migrations are self-contained (plain SQLAlchemy types, no imports from
``storage.models``) so that they keep describing the schema *as it was* when the models
move on. The audit table is made append-only with triggers on both backends: history
that can be edited is not an audit trail.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
UID = sa.String(length=64)
AE = sa.String(length=16)
JOB_STATES = ("received", "queued", "running", "done", "failed", "skipped")


def upgrade() -> None:
    _create_studies_series()
    _create_instances()
    _create_jobs()
    _create_audit_events()
    _create_node_heartbeats()
    _make_audit_append_only()


def _create_studies_series() -> None:
    op.create_table(
        "studies",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("first_received_at", TS, nullable=False),
        sa.Column("last_received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_instance_uid", name="uq_studies_study_instance_uid"),
    )
    op.create_table(
        "series",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("study_id", BIG_ID, nullable=False),
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part_examined", sa.String(length=64), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("first_received_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_series_study_id_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
    )
    op.create_index("ix_series_study_id", "series", ["study_id"])


def _create_instances() -> None:
    op.create_table(
        "instances",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("series_id", BIG_ID, nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("transfer_syntax_uid", UID, nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("view_position", sa.String(length=16), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("photometric_interpretation", sa.String(length=16), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("spool_path", sa.String(length=255), nullable=False),
        sa.Column("calling_ae", AE, nullable=False),
        sa.Column("called_ae", AE, nullable=False),
        sa.Column("peer_address", sa.String(length=64), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name="fk_instances_series_id_series"),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint(
            "sop_instance_uid", "sha256", name="uq_instances_sop_instance_uid_sha256"
        ),
        sa.UniqueConstraint(
            "sop_instance_uid", "version", name="uq_instances_sop_instance_uid_version"
        ),
    )
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_instances_series_id", "instances", ["series_id"])


def _create_jobs() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("instance_id", BIG_ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("available_at", TS, nullable=False),
        sa.Column("queued_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint(
            "state IN (" + ", ".join(f"'{s}'" for s in JOB_STATES) + ")",
            name="ck_jobs_job_state",
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_jobs_instance_id_instances"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_claim", "jobs", ["state", "available_at", "priority"])
    op.create_index("ix_jobs_instance_id", "jobs", ["instance_id"])


def _create_audit_events() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.BigInteger(), nullable=True),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("sop_instance_uid", UID, nullable=True),
        sa.Column("calling_ae", AE, nullable=True),
        sa.Column("peer_address", sa.String(length=64), nullable=True),
        sa.Column(
            "details", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_kind", "audit_events", ["kind"])
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])


def _create_node_heartbeats() -> None:
    op.create_table(
        "node_heartbeats",
        sa.Column("node_id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("ae_title", AE, nullable=False),
        sa.Column("host", sa.String(length=64), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("stopped_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("node_id", name="pk_node_heartbeats"),
    )


def _make_audit_append_only() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'audit_events is append-only';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{action.lower()} BEFORE {action} ON audit_events "
            "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
    for table in ("node_heartbeats", "audit_events", "jobs", "instances", "series", "studies"):
        op.drop_table(table)
