"""Drivers that ended without finishing, counted apart from drivers started: a job returned to the
queue because the service or its Ray head stopped starts a new driver without using up one of its
`max_attempts`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 21:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("driver_failures", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("driver_failures")
