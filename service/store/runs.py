"""Phases, runs, their per-epoch metrics and a job's events: what a driver records as the pipeline
goes (service.recorders.DBRecorder) and what the API reads. Functions take an open session; the
caller owns the transaction. Writes are safe to repeat when a new driver resumes a job: a phase or
a run started again reuses its row, an epoch reported again replaces that epoch's metrics."""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Event, Job, Metric, Model, Phase, Run, utcnow
from service.records import PROGRESS_BEFORE_END, PhaseSummary, RunRecord, phase_best_score, primary_metric
from service.store import jobs
from service.store.convert import fill_phase, finite

COMPUTE_FIELDS = ("cpu_seconds", "gpu_seconds", "epochs_trained")


# ---------------------------------------------------------------- reads
def phases(s: Session, job_id: str) -> list[Phase]:
    return list(s.scalars(sa.select(Phase).where(Phase.job_id == job_id).order_by(Phase.index)))


def completed_phases(s: Session, job_id: str) -> list[Phase]:
    """The succeeded phases 0..k in order, up to the first one that is not (where a resume starts)."""
    done: list[Phase] = []
    for p in phases(s, job_id):
        if p.status != "succeeded" or p.index != len(done):
            break
        done.append(p)
    return done


def runs(s: Session, job_id: str, kind: str | None = None) -> list[Run]:
    q = sa.select(Run).where(Run.job_id == job_id)
    if kind is not None:
        q = q.where(Run.kind == kind)
    return list(s.scalars(q.order_by(Run.phase, Run.id)))


def finished_ingredients(s: Session, job_id: str, phase: int) -> list[tuple[Run, Model]]:
    """The succeeded ingredient runs of a phase with their models (reused by a resumed phase)."""
    rows = s.execute(sa.select(Run, Model).join(Model, Model.id == Run.model_id)
                     .where(Run.job_id == job_id, Run.phase == phase, Run.kind == "ingredient",
                            Run.status == "succeeded").order_by(Run.name))
    return [(r, m) for r, m in rows]


def metrics(s: Session, job_id: str, *, run_name: str | None = None, name: str | None = None,
            limit: int = 100_000) -> list[dict[str, Any]]:
    """Time series rows {run, step, epoch, name, value, time}, by run, step and name."""
    q = (sa.select(Run.name.label("run"), Metric.step, Metric.epoch, Metric.name, Metric.value, Metric.time)
         .join(Run, Run.id == Metric.run_id).where(Metric.job_id == job_id))
    if run_name is not None:
        q = q.where(Run.name == run_name)
    if name is not None:
        q = q.where(Metric.name == name)
    return [dict(r._mapping) for r in s.execute(q.order_by(Run.name, Metric.step, Metric.name).limit(limit))]


def events(s: Session, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[Event]:
    """Events with id > after_id, oldest first (pass the last id seen to follow the log)."""
    return list(s.scalars(sa.select(Event).where(Event.job_id == job_id, Event.id > after_id)
                          .order_by(Event.id).limit(limit)))


# ---------------------------------------------------------------- writes (a driver's)
def _run(s: Session, job_id: str, name: str) -> Run | None:
    return s.scalars(sa.select(Run).where(Run.job_id == job_id, Run.name == name)).one_or_none()


def phase_started(s: Session, job_id: str, phase: int, target_sparsity: float) -> None:
    row = s.scalars(sa.select(Phase).where(Phase.job_id == job_id, Phase.index == phase)).one_or_none()
    if row is None:
        s.add(Phase(job_id=job_id, index=phase, target_sparsity=target_sparsity, status="running"))
    else:                       # a resumed phase: the same row again
        row.status, row.target_sparsity, row.finished_at = "running", target_sparsity, None
    jobs.get(s, job_id).current_phase = phase


def run_started(s: Session, job_id: str, run: RunRecord) -> None:
    """A new run, or a run started again by a resumed driver: the same row, attempts + 1. Its metrics
    stay: a task resumed from an epoch checkpoint reports only the epochs after it, and one that
    starts over replaces each epoch's rows as it reports them again."""
    row = _run(s, job_id, run.name)
    if row is None:
        s.add(Run(job_id=job_id, phase=run.phase, name=run.name, kind=run.kind, config=run.config,
                  status="running"))
    else:
        row.status, row.attempts, row.config = "running", row.attempts + 1, run.config
        row.metrics, row.model_id, row.error = {}, None, None
        row.started_at, row.finished_at = utcnow(), None


def metric(s: Session, job_id: str, run_name: str, row: dict[str, float]) -> None:
    """One epoch's row: a metrics row per finite numeric value ("epoch" and "step" go to their
    columns). An epoch reported again replaces its rows and does not count twice for progress."""
    run = _run(s, job_id, run_name)
    if run is None:
        return
    step, epoch = int(row.get("step", 0)), int(row.get("epoch", 0))
    again = s.execute(sa.delete(Metric).where(Metric.run_id == run.id, Metric.epoch == epoch)).rowcount
    now = utcnow()
    s.add_all([Metric(job_id=job_id, run_id=run.id, step=step, epoch=epoch, name=k, value=float(v), time=now)
               for k, v in row.items()
               if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)])
    if not again:
        job = jobs.get(s, job_id)
        job.done_epochs += 1
        job.progress = min(PROGRESS_BEFORE_END, job.done_epochs / job.total_epochs) if job.total_epochs else 0.0


def run_finished(s: Session, job_id: str, run_name: str, status: str, *, model_id: str | None = None,
                 metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
    run = _run(s, job_id, run_name)
    if run is None:
        return
    run.status, run.model_id, run.error, run.finished_at = status, model_id, error, utcnow()
    run.metrics = finite(metrics or {})


def phase_finished(s: Session, job_id: str, summary: PhaseSummary) -> None:
    """The phase's summary on its row; the job's sparsity, best score (by its primary metric, among
    the phase's soup and ingredients) and compute (the sum over its finished phases) follow."""
    row = s.scalars(sa.select(Phase).where(Phase.job_id == job_id, Phase.index == summary.phase)).one()
    fill_phase(row, summary)
    row.status, row.finished_at = "succeeded", utcnow()
    job: Job = jobs.get(s, job_id)
    job.sparsity, job.best_score = row.sparsity, phase_best_score(primary_metric(job.spec), row.metrics)
    s.flush()
    done = s.scalars(sa.select(Phase.metrics).where(Phase.job_id == job_id, Phase.status == "succeeded")).all()
    for f in COMPUTE_FIELDS:
        values = [p[f] for p in done if p.get(f) is not None]
        setattr(job, f, sum(values) if values else None)
