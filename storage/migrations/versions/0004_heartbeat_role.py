"""Heartbeats say which role the process plays: listener or worker.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

With ``dicom-node worker`` several processes beat into ``node_heartbeats``: the listener
(``serve``) and any number of worker-only processes on other hosts. ``role`` tells them
apart, so ``status`` can report the listener as before and list the workers beside it.
Existing rows were all written by listeners.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("node_heartbeats") as batch:
        batch.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="listener")
        )


def downgrade() -> None:
    with op.batch_alter_table("node_heartbeats") as batch:
        batch.drop_column("role")
