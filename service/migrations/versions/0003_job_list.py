"""What job lists show and how fast: each job's sparsity reached and best accuracy so far (kept up to
date by the driver, so a page of jobs needs no join), and indexes that carry id too, since lists sort
by (created_at, id): a page is read straight off an index instead of sorting every matching row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

OLD = {"ix_jobs_status_created_at": ["status", "created_at"], "ix_jobs_created_at": ["created_at"],
       "ix_jobs_owner_created_at": ["owner", "created_at"]}


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sparsity", sa.Double(), nullable=True))
        batch.add_column(sa.Column("best_accuracy", sa.Double(), nullable=True))
    for name, columns in OLD.items():
        op.drop_index(op.f(name), table_name="jobs")
        op.create_index(op.f(f"{name}_id"), "jobs", [*columns, "id"])


def downgrade() -> None:
    for name, columns in OLD.items():
        op.drop_index(op.f(f"{name}_id"), table_name="jobs")
        op.create_index(op.f(name), "jobs", columns)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("best_accuracy")
        batch.drop_column("sparsity")
