"""Tokens expire and are revoked: tokens.expires_at and tokens.revoked_at, tokens.last4 (the secret's
last four characters, to tell tokens apart in a list); a name is unique among the tokens not revoked
only (a partial unique index), so that a user's token is replaced by revoking it and creating another.

Downgrading deletes the revoked and the expired tokens first: before 0007 every stored token is valid,
so keeping them would bring them back to life.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

ACTIVE = sa.text("revoked_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last4", sa.String(length=4), nullable=True))
        batch.drop_constraint("uq_tokens_name", type_="unique")
    op.create_index("ix_tokens_active_name", "tokens", ["name"], unique=True, sqlite_where=ACTIVE,
                    postgresql_where=ACTIVE)


def downgrade() -> None:
    tokens = sa.table("tokens", sa.column("revoked_at", sa.DateTime(timezone=True)),
                      sa.column("expires_at", sa.DateTime(timezone=True)))
    # CURRENT_TIMESTAMP: both backends compare it with the stored UTC timestamps (SQLite: as text, in
    # the same 'YYYY-MM-DD HH:MM:SS' form that SQLAlchemy writes)
    op.get_bind().execute(tokens.delete().where(tokens.c.revoked_at.is_not(None)
                                                | (tokens.c.expires_at <= sa.func.current_timestamp())))
    op.drop_index("ix_tokens_active_name", table_name="tokens")
    with op.batch_alter_table("tokens") as batch:
        batch.create_unique_constraint("uq_tokens_name", ["name"])
        batch.drop_column("last4")
        batch.drop_column("revoked_at")
        batch.drop_column("expires_at")
