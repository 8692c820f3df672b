"""Initial tables: jobs, phases, runs, models, model_edges, metrics, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")   # SQLite autoincrements INTEGER keys only


def Timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def JobId() -> sa.Column:
    return sa.Column("job_id", sa.String(32), nullable=False)


def job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("current_phase", sa.Integer(), nullable=True),
        sa.Column("final_model_id", sa.String(32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("ray_submission_id", sa.String(100), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("total_epochs", sa.Integer(), nullable=False),
        sa.Column("done_epochs", sa.Integer(), nullable=False),
        Timestamp("created_at"),
        Timestamp("started_at", nullable=True),
        Timestamp("finished_at", nullable=True),
        Timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("owner", "idempotency_key", name=op.f("uq_jobs_owner_idempotency_key")),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                           name=op.f("ck_jobs_status")),
    )
    op.create_index(op.f("ix_jobs_status_created_at"), "jobs", ["status", "created_at"])
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])
    op.create_index(op.f("ix_jobs_owner_created_at"), "jobs", ["owner", "created_at"])

    op.create_table(
        "phases",
        sa.Column("id", sa.Integer(), nullable=False),
        JobId(),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target_sparsity", sa.Double(), nullable=False),
        sa.Column("sparsity", sa.Double(), nullable=True),
        sa.Column("pruned_model_id", sa.String(32), nullable=True),
        sa.Column("model_id", sa.String(32), nullable=True),
        *[sa.Column(c, sa.Double(), nullable=True)
          for c in ("pruned_accuracy", "soup_accuracy", "soup_val_accuracy", "gain_over_best", "gain_over_mean",
                    "norm_drop", "mean_pairwise_distance")],
        sa.Column("ingredient_accuracies", sa.JSON(), nullable=False),
        sa.Column("soup_ingredients", sa.JSON(), nullable=False),
        sa.Column("seconds", sa.JSON(), nullable=False),
        Timestamp("started_at"),
        Timestamp("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phases")),
        job_fk("phases"),
        sa.UniqueConstraint("job_id", "index", name=op.f("uq_phases_job_id_index")),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name=op.f("ck_phases_status")),
    )

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        JobId(),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("model_id", sa.String(32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        Timestamp("started_at"),
        Timestamp("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        job_fk("runs"),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_runs_job_id_name")),
        sa.CheckConstraint("kind IN ('dense', 'ingredient', 'search_trial')", name=op.f("ck_runs_kind")),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'stopped')", name=op.f("ck_runs_status")),
    )

    op.create_table(
        "models",
        sa.Column("id", sa.String(32), nullable=False),
        JobId(),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("sparsity", sa.Double(), nullable=False),
        sa.Column("nonzeros", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        Timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        job_fk("models"),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_models_job_id_name")),
        sa.CheckConstraint("kind IN ('dense', 'pruned', 'ingredient', 'soup')", name=op.f("ck_models_kind")),
    )

    op.create_table(
        "model_edges",
        sa.Column("parent_id", sa.String(32), nullable=False),
        sa.Column("child_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("parent_id", "child_id", name=op.f("pk_model_edges")),
        sa.ForeignKeyConstraint(["parent_id"], ["models.id"], name=op.f("fk_model_edges_parent_id_models"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["child_id"], ["models.id"], name=op.f("fk_model_edges_child_id_models"),
                                ondelete="CASCADE"),
        sa.CheckConstraint("kind IN ('pruned_from', 'retrained_from', 'averaged_from')",
                           name=op.f("ck_model_edges_kind")),
    )
    op.create_index(op.f("ix_model_edges_child_id"), "model_edges", ["child_id"])

    op.create_table(
        "metrics",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        JobId(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        Timestamp("time"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
        job_fk("metrics"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_metrics_run_id_runs"), ondelete="CASCADE"),
    )
    op.create_index(op.f("ix_metrics_run_id_name_step"), "metrics", ["run_id", "name", "step"])
    op.create_index(op.f("ix_metrics_job_id_name"), "metrics", ["job_id", "name"])

    op.create_table(
        "events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        JobId(),
        Timestamp("time"),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        job_fk("events"),
        sa.CheckConstraint("level IN ('info', 'warning', 'error')", name=op.f("ck_events_level")),
    )
    op.create_index(op.f("ix_events_job_id_id"), "events", ["job_id", "id"])


def downgrade() -> None:
    for table in ("events", "metrics", "model_edges", "models", "runs", "phases", "jobs"):
        op.drop_table(table)      # their indexes go with them
