"""The SQL store's tables (design section 5), as a SQLAlchemy 2.0 typed ORM.

jobs, phases, runs (dense | ingredient | search_trial), models, model_edges (typed lineage),
metrics (one row per run, epoch and metric name), events, and the API's bearer tokens. The same
models serve SQLite (the embedded default) and PostgreSQL. There are no relationship() attributes:
every query says what it loads, so nothing lazy-loads from a detached row. Timestamps are
timezone-aware UTC on both backends. The schema itself belongs to Alembic (service/migrations); a
test checks that the two agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.records import TASK_KINDS, RunInfo
from service.states import JOB_STATUSES, PHASE_STATUSES, RUN_STATUSES

NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}

RUN_KINDS = ("dense", "ingredient", "search_trial")
MODEL_KINDS = ("dense", "pruned", "ingredient", "soup")
EDGE_KINDS = ("pruned_from", "retrained_from", "averaged_from")
EVENT_LEVELS = ("info", "warning", "error")

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")   # SQLite autoincrements INTEGER keys only


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that always comes back aware and in UTC (SQLite keeps no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps timezone-aware UTC timestamps")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class PydanticJSON(sa.TypeDecorator[BaseModel]):
    """A JSON column typed by a pydantic model (as Prefect's server types its JSON columns): what is
    written is validated by `model` (a dict or the model), what is read comes back as the model. The
    database keeps plain JSON, so the schema (and its migrations) is the JSON column's."""

    impl = sa.JSON
    cache_ok = True

    def __init__(self, model: type[BaseModel]) -> None:
        super().__init__()
        self.model = model

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.model.model_validate(value).model_dump(mode="json")

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> BaseModel | None:
        return None if value is None else self.model.model_validate(value)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: sa.JSON, list[Any]: sa.JSON, datetime: UTCDateTime()}


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)          # uuid4 hex
    name: Mapped[str] = mapped_column(sa.String(200))
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    spec: Mapped[dict[str, Any]]                                             # JobSpec.model_dump(mode="json")
    # its outline (service.records.JobOutline), set when it is stored: what a list shows of its spec
    task: Mapped[str] = mapped_column(sa.String(16), default="classification", server_default="classification")
    phases_total: Mapped[int] = mapped_column(default=1, server_default="1")
    progress: Mapped[float] = mapped_column(default=0.0)                     # 0..1
    current_phase: Mapped[int | None]
    final_model_id: Mapped[str | None] = mapped_column(sa.String(32))        # no FK: models reference jobs
    error: Mapped[str | None] = mapped_column(sa.Text)
    owner: Mapped[str | None] = mapped_column(sa.String(200))
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200))
    ray_submission_id: Mapped[str | None] = mapped_column(sa.String(100))
    attempts: Mapped[int] = mapped_column(default=0)                         # drivers started
    driver_failures: Mapped[int] = mapped_column(default=0, server_default="0")  # drivers that ended unfinished
    sparsity: Mapped[float | None]            # reached by the last finished phase
    best_score: Mapped[float | None]          # the best test score (primary metric) among that phase's models
    total_epochs: Mapped[int] = mapped_column(default=0)
    done_epochs: Mapped[int] = mapped_column(default=0)
    cpu_seconds: Mapped[float | None]         # compute of the finished phases (runs + the driver's share)
    gpu_seconds: Mapped[float | None]
    epochs_trained: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        sa.CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        sa.CheckConstraint(_in("task", TASK_KINDS), name="task"),
        sa.UniqueConstraint("owner", "idempotency_key"),
        # lists page by (created_at, id), newest first: straight off these indexes, no sort
        sa.Index("ix_jobs_status_created_at_id", "status", "created_at", "id"),
        sa.Index("ix_jobs_created_at_id", "created_at", "id"),
        sa.Index("ix_jobs_owner_created_at_id", "owner", "created_at", "id"),
    )


class Phase(Base):
    __tablename__ = "phases"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]                                                       # 0 = dense
    status: Mapped[str] = mapped_column(sa.String(16), default="running")
    target_sparsity: Mapped[float]
    sparsity: Mapped[float | None]
    pruned_model_id: Mapped[str | None] = mapped_column(sa.String(32))
    model_id: Mapped[str | None] = mapped_column(sa.String(32))              # the result: dense or soup
    soup_ingredients: Mapped[list[Any]] = mapped_column(default=list)
    seconds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)            # records.PHASE_COLUMNS
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    __table_args__ = (sa.UniqueConstraint("job_id", "index"),
                      sa.CheckConstraint(_in("status", PHASE_STATUSES), name="status"))


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    phase: Mapped[int]
    name: Mapped[str] = mapped_column(sa.String(200))                        # "dense", "phase1/ingredient0"
    kind: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16), default="running")
    config: Mapped[RunInfo] = mapped_column(PydanticJSON(RunInfo), default=RunInfo)   # what it was started with
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)            # final metrics
    model_id: Mapped[str | None] = mapped_column(sa.String(32))
    error: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(default=1)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    __table_args__ = (sa.UniqueConstraint("job_id", "name"),
                      sa.CheckConstraint(_in("kind", RUN_KINDS), name="kind"),
                      sa.CheckConstraint(_in("status", RUN_STATUSES), name="status"))


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    phase: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str] = mapped_column(sa.String(200))                        # "phase1/soup"
    uri: Mapped[str] = mapped_column(sa.Text)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    sparsity: Mapped[float]
    nonzeros: Mapped[int] = mapped_column(sa.BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (sa.UniqueConstraint("job_id", "name"),
                      sa.CheckConstraint(_in("kind", MODEL_KINDS), name="kind"))


class ModelEdge(Base):
    __tablename__ = "model_edges"
    parent_id: Mapped[str] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    child_id: Mapped[str] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True,
                                          index=True)
    kind: Mapped[str] = mapped_column(sa.String(16))

    __table_args__ = (sa.CheckConstraint(_in("kind", EDGE_KINDS), name="kind"),)


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int]
    epoch: Mapped[int]
    name: Mapped[str] = mapped_column(sa.String(100))
    value: Mapped[float]
    time: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (sa.Index("ix_metrics_run_id_name_step", "run_id", "name", "step"),
                      sa.Index("ix_metrics_job_id_name", "job_id", "name"))


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(sa.String(16), default="info")
    phase: Mapped[int | None]
    message: Mapped[str] = mapped_column(sa.Text)

    __table_args__ = (sa.Index("ix_events_job_id_id", "job_id", "id"),
                      sa.CheckConstraint(_in("level", EVENT_LEVELS), name="level"))


ACTIVE_TOKEN = sa.text("revoked_at IS NULL")


class Token(Base):
    """An API bearer token, stored as its SHA-256 (the secret itself is shown once, at creation; its last
    four characters are kept to tell tokens apart). Its name is the owner of the jobs it submits; at most
    one token that is not revoked has a given name, so that a user's token is replaced by revoking it and
    creating one of the same name. A revoked token stays, so that its secret is never taken again."""
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]                  # None: never
    revoked_at: Mapped[datetime | None]
    last4: Mapped[str | None] = mapped_column(sa.String(4))   # None for tokens made before 0007

    __table_args__ = (sa.Index("ix_tokens_active_name", "name", unique=True, sqlite_where=ACTIVE_TOKEN,
                               postgresql_where=ACTIVE_TOKEN),)


UPLOAD_KINDS = ("checkpoint", "dataset")


class Upload(Base):
    """A file a user sent through the API (POST /uploads), kept in the artifact store under
    uploads/<id>/ and named in specs as ``upload:<id>``: a checkpoint (model.checkpoint) or a dataset
    file (data.path of an npz or text dataset). Only its owner (and admins) may use it."""
    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(200), index=True)     # None: auth was off
    kind: Mapped[str] = mapped_column(sa.String(16))
    filename: Mapped[str] = mapped_column(sa.String(200))
    uri: Mapped[str] = mapped_column(sa.Text)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (sa.CheckConstraint(_in("kind", UPLOAD_KINDS), name="kind"),)
