"""Study priority for the worklist, and the index behind throughput and latency figures.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

``studies`` gains the study-level priority computed from its findings (level, numeric
score, the finding that set it) and ``ix_studies_worklist`` to list studies by priority
then arrival. ``ix_jobs_finished`` serves "jobs finished in the last N minutes" (status,
metrics) without scanning every job. Patient demographics stay out of the database: the
worklist reads them from the spooled file only when an admin asks for them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("priority", sa.String(length=8), nullable=True))
        batch.add_column(
            sa.Column("priority_rank", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("priority_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("top_finding", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("top_probability", sa.Float(), nullable=True))
        batch.add_column(sa.Column("priority_updated_at", TS, nullable=True))
    op.create_index("ix_studies_worklist", "studies", ["priority_rank", "first_received_at"])
    op.create_index("ix_jobs_finished", "jobs", ["state", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.drop_index("ix_studies_worklist", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        for column in (
            "priority_updated_at",
            "top_probability",
            "top_finding",
            "priority_score",
            "priority_rank",
            "priority",
        ):
            batch.drop_column(column)
