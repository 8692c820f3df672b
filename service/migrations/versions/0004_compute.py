"""What a study needs per phase and per job: the prediction ensemble's accuracy beside the soup's, and
compute accounting (CPU-seconds, GPU-seconds, epochs trained) per phase and, added up, per job.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 18:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

COMPUTE = (("cpu_seconds", sa.Double), ("gpu_seconds", sa.Double), ("epochs_trained", sa.Integer))


def upgrade() -> None:
    with op.batch_alter_table("phases") as batch:
        batch.add_column(sa.Column("ensemble_accuracy", sa.Double(), nullable=True))
        for name, kind in COMPUTE:
            batch.add_column(sa.Column(name, kind(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        for name, kind in COMPUTE:
            batch.add_column(sa.Column(name, kind(), nullable=True))


def downgrade() -> None:
    for table in ("jobs", "phases"):
        with op.batch_alter_table(table) as batch:
            for name, _ in reversed(COMPUTE):
                batch.drop_column(name)
    with op.batch_alter_table("phases") as batch:
        batch.drop_column("ensemble_accuracy")
