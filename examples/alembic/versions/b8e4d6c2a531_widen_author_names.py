"""widen author names

A batch operation: on SQLite it recreates the author table (copy, DROP TABLE, rename),
the step whose DROP TABLE would cascade to every book with foreign keys enforced.

Revision ID: b8e4d6c2a531
Revises: a3f1c2d7e9b1
Create Date: 2025-01-07 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b8e4d6c2a531"
down_revision: str | Sequence[str] | None = "a3f1c2d7e9b1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("author") as batch:
        batch.alter_column(
            "name",
            type_=sa.String(length=200),
            existing_type=sa.String(length=50),
            existing_nullable=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("author") as batch:
        batch.alter_column(
            "name",
            type_=sa.String(length=50),
            existing_type=sa.String(length=200),
            existing_nullable=False,
        )
