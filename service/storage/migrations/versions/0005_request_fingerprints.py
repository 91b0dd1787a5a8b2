"""what a create request asked for, so that a request id reused for another request is refused

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("request_ids", sa.Column("fingerprint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_ids") as batch:
        batch.drop_column("fingerprint")
