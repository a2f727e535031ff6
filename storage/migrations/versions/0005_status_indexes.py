"""Indexes that keep ``status`` and ``dicom-node jobs show`` fast on a busy database.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

``status`` counts jobs per state, results per status and sends per destination and
state on every call; with these narrow indexes PostgreSQL answers each with an
index-only scan and a sorted group instead of reading and hashing every row (measured
with 100k jobs in ``bench/bench_status.py``). ``ix_jobs_claim`` and ``ix_jobs_finished``
also start with ``state`` but are too wide for the planner to prefer them over a
sequential scan. ``dicom-node jobs show`` reads one job's audit trail: without an index
on ``job_id`` and ``instance_id`` that is a scan of the whole, ever-growing trail.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_jobs_state", "jobs", ["state"]),
    ("ix_results_status", "results", ["status"]),
    ("ix_sends_destination_state", "sends", ["destination", "state"]),
    ("ix_audit_events_job_id", "audit_events", ["job_id"]),
    ("ix_audit_events_instance_id", "audit_events", ["instance_id"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
