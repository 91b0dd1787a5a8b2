"""environment memberships keep a version, so that they have an etag

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 08:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing grants start at version 1, as a new one does. The column keeps no default: every
    # insert names its version, like the other versioned tables.
    with op.batch_alter_table("environment_members") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("environment_members") as batch:
        batch.alter_column("version", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("environment_members") as batch:
        batch.drop_column("version")
