"""the audit log's filters and the environment a reassigned resource left

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_events_environment": ["organization_id", "environment_id", "revision"],
    "ix_events_resource": ["organization_id", "resource_id", "revision"],
    "ix_events_actor": ["organization_id", "actor_api_key_id", "revision"],
}


def upgrade() -> None:
    op.add_column("events", sa.Column("previous_environment_id", sa.String(length=40), nullable=True))
    for name, columns in _INDEXES.items():
        op.create_index(name, "events", columns, unique=False)


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("previous_environment_id")
