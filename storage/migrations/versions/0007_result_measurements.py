"""Results keep the anatomy measurements (cardiothoracic ratio, widths, lung areas).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

``measurements`` is a JSON list of ``{"name", "code", "scheme", "meaning", "value",
"unit"}`` — like the findings, its shape follows the models, not the schema. Plain
``ALTER TABLE … ADD COLUMN``, nullable, for the reasons given in revision 0006; rows
written before it read as "no measurements".
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOC = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("results", sa.Column("measurements", JSON_DOC, nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE results DROP COLUMN measurements")
