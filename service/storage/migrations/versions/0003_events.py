"""the event log

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("organization_id", sa.String(length=40), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_api_key_id", sa.String(length=40), nullable=True),
        sa.Column("actor_member_id", sa.String(length=40), nullable=True),
        sa.Column("actor_operator", sa.Boolean(), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("resource_type", sa.String(length=30), nullable=False),
        sa.Column("resource_id", sa.String(length=300), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=True),
        sa.Column("changed_fields", sa.Text(), nullable=False),
        sa.Column("resource", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_events_organization_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint(
            "organization_id",
            "revision",
            "sequence",
            name=op.f("uq_events_organization_id_revision_sequence"),
        ),
    )
    op.create_index("ix_events_create_time", "events", ["create_time"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_events_create_time", table_name="events")
    op.drop_table("events")
