"""registered resource ids ordered bytewise on PostgreSQL too (they followed the database's collation)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 05:10:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _collation(name: str) -> None:
    # SQLite compares text bytewise already. PostgreSQL rebuilds the primary key and the index
    # that hold the column with it.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f'ALTER TABLE resources ALTER COLUMN resource_id TYPE VARCHAR(128) COLLATE "{name}"')


def upgrade() -> None:
    _collation("C")


def downgrade() -> None:
    _collation("default")
