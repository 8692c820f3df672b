"""Job lists sort by (created_at, id): the indexes carry id too, so a page is read straight off an index
instead of sorting every matching row for the id tiebreak.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:10:00
"""
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

OLD = {"ix_jobs_status_created_at": ["status", "created_at"], "ix_jobs_created_at": ["created_at"],
       "ix_jobs_owner_created_at": ["owner", "created_at"]}


def upgrade() -> None:
    for name, columns in OLD.items():
        op.drop_index(op.f(name), table_name="jobs")
        op.create_index(op.f(f"{name}_id"), "jobs", [*columns, "id"])


def downgrade() -> None:
    for name, columns in OLD.items():
        op.drop_index(op.f(f"{name}_id"), table_name="jobs")
        op.create_index(op.f(name), "jobs", columns)
