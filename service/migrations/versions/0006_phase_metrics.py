"""Phase metrics in one JSON column (keys: service.records.PHASE_COLUMNS over the job's primary metric),
so that a new metric needs no migration; the job's best score is its primary metric's, not always an
accuracy.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 01:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# the metric columns of phases up to 0005, moved into phases.metrics under the same keys
FLOATS = ("pruned_accuracy", "soup_accuracy", "soup_val_accuracy", "gain_over_best", "gain_over_mean", "norm_drop",
          "mean_pairwise_distance", "ensemble_accuracy", "cpu_seconds", "gpu_seconds")
INTS = ("epochs_trained",)
LISTS = ("ingredient_accuracies",)
MOVED = FLOATS + INTS + LISTS


def _phases(*columns: str) -> sa.Table:
    types = {**{c: sa.Double() for c in FLOATS}, **{c: sa.Integer() for c in INTS}, **{c: sa.JSON() for c in LISTS},
             "metrics": sa.JSON()}
    return sa.table("phases", sa.column("id", sa.Integer()), *(sa.column(c, types[c]) for c in columns))


def upgrade() -> None:
    with op.batch_alter_table("phases") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=False, server_default="{}"))
    conn = op.get_bind()
    old = _phases(*MOVED)
    new = _phases("metrics")
    for row in conn.execute(sa.select(old)).mappings().all():
        metrics = {c: row[c] for c in MOVED if row[c] is not None}
        conn.execute(new.update().where(new.c.id == row["id"]).values(metrics=metrics))
    with op.batch_alter_table("phases") as batch:
        for c in MOVED:
            batch.drop_column(c)
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("best_accuracy", new_column_name="best_score", existing_type=sa.Double())


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("best_score", new_column_name="best_accuracy", existing_type=sa.Double())
    with op.batch_alter_table("phases") as batch:
        for c in FLOATS:
            batch.add_column(sa.Column(c, sa.Double(), nullable=True))
        for c in INTS:
            batch.add_column(sa.Column(c, sa.Integer(), nullable=True))
        batch.add_column(sa.Column("ingredient_accuracies", sa.JSON(), nullable=False, server_default="[]"))
    conn = op.get_bind()
    old = _phases("metrics")
    new = _phases(*MOVED)
    for row in conn.execute(sa.select(old)).mappings().all():
        m = row["metrics"] or {}
        conn.execute(new.update().where(new.c.id == row["id"])
                     .values({c: m.get(c, [] if c in LISTS else None) for c in MOVED}))
    with op.batch_alter_table("phases") as batch:
        batch.drop_column("metrics")
