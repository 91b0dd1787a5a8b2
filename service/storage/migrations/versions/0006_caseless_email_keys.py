"""members' email keys in Unicode's compatibility caseless form (they were lower-cased)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 03:30:00.000000
"""

from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_MEMBERS = sa.table(
    "members", sa.column("id", sa.String), sa.column("email", sa.String), sa.column("email_key", sa.String)
)


def _caseless(address: str) -> str:
    # As service.domain.validation.email_key was when this revision was written.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", address).casefold())


def _rekey(caseless: bool) -> None:
    connection = op.get_bind()
    for member_id, email, email_key in connection.execute(
        sa.select(_MEMBERS.c.id, _MEMBERS.c.email, _MEMBERS.c.email_key)
    ).all():
        wanted = _caseless(email) if caseless else email.lower()
        if wanted != email_key:  # ASCII addresses keep their key
            connection.execute(sa.update(_MEMBERS).where(_MEMBERS.c.id == member_id).values(email_key=wanted))


def _email_key_length(before: int, after: int) -> None:
    # Case folding can lengthen an address (`ß` becomes `ss`): the key gets room for it.
    with op.batch_alter_table("members") as batch:
        batch.alter_column(
            "email_key",
            existing_type=sa.String(length=before),
            type_=sa.String(length=after),
            existing_nullable=False,
        )


def upgrade() -> None:
    _email_key_length(254, 1024)
    # Two members whose addresses differ only in non-ASCII case would now clash: the unique
    # constraint stops the upgrade, naming them, for an operator to settle.
    _rekey(caseless=True)


def downgrade() -> None:
    _rekey(caseless=False)
    _email_key_length(1024, 254)
