"""A job's outline in columns of its own (service.records.JobOutline): its task and its phase count, set
when it is stored, so that a list of jobs reads no spec (and a spec the database's JSON functions cannot
read breaks no list). Existing jobs are filled in from their specs.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 14:00:00
"""
import json

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def _outline(spec) -> tuple[str, int]:
    """(task, phases) of a stored spec (service.records.task_kind and spec.prune.phases; what cannot be read:
    an image job of 1 phase). Written out here: a migration keeps working whatever the code becomes."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            spec = {}
    spec = spec if isinstance(spec, dict) else {}
    model, data, prune = (spec.get(k) if isinstance(spec.get(k), dict) else {} for k in ("model", "data", "prune"))
    lm = str(model.get("arch", "")).startswith("hf:") or data.get("name") == "text"
    phases = prune.get("phases")
    return ("causal_lm" if lm else "classification", phases if type(phases) is int and phases >= 1 else 1)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("task", sa.String(length=16), nullable=False, server_default="classification"))
        batch.add_column(sa.Column("phases_total", sa.Integer(), nullable=False, server_default="1"))
        batch.create_check_constraint(op.f("ck_jobs_task"), "task IN ('classification', 'causal_lm')")
    conn = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.Text), sa.column("task", sa.String),
                    sa.column("phases_total", sa.Integer))
    rows = conn.execute(sa.select(jobs.c.id, sa.cast(jobs.c.spec, sa.Text))).all()
    for job_id, text in rows:
        task, phases = _outline(text)
        if (task, phases) != ("classification", 1):
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(task=task, phases_total=phases))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_task"), type_="check")
        batch.drop_column("phases_total")
        batch.drop_column("task")
