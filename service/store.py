"""The store: the one place that writes to the database. Every write is one transaction.

Rows come back as the ORM objects of service.orm (`Job`, `Phase`, `Run`, `Model`, `Event`,
`Token`), detached from their session: `expire_on_commit=False` keeps their columns loaded, and the
models have no relationships to lazy-load. Change them only through the Store. The exceptions are
`metrics()` (plain dicts, since each row carries its run's name) and `lineage()` / `descendants()`
(`{"nodes": [Model], "edges": [{"parent", "child", "kind"}]}`).

`DBRecorder` is the pipeline's recorder (service.pipeline.Recorder) for one job: each call is one
short transaction, so a driver that dies leaves everything up to its last call and nothing
half-written. Its calls are safe to repeat when a new driver resumes the job: a phase or a run
started again reuses its row, an epoch reported again replaces that epoch's metrics, and a model
saved again under the name of a model that nothing refers to yet (its driver died right after
saving it) replaces that row.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import db
from service.orm import TERMINAL, Event, Job, Metric, Model, ModelEdge, Phase, Run, Token, utcnow
from service.pipeline import ModelRecord, PhaseSummary, RunRecord
from service.spec import JobSpec

COMPUTE_FIELDS = ("cpu_seconds", "gpu_seconds", "epochs_trained")
PHASE_FIELDS = ("target_sparsity", "sparsity", "model_id", "pruned_accuracy", "soup_accuracy", "soup_val_accuracy",
                "gain_over_best", "gain_over_mean", "norm_drop", "mean_pairwise_distance", "ingredient_accuracies",
                "soup_ingredients", "seconds", "ensemble_accuracy", *COMPUTE_FIELDS)
JOB_FIELDS = frozenset(Job.__table__.c.keys()) - {"id", "created_at", "updated_at"}


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class StateError(ValueError):
    """A status change that the job's current status does not allow (a finished job stays finished)."""

    def __init__(self, job_id: str, current: str, requested: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {requested}")
        self.job_id, self.current, self.requested = job_id, current, requested


class JobCancelled(RuntimeError):
    """The job was cancelled before its driver started it."""


def _finite(x: Any) -> Any:
    """JSON has no NaN/Infinity (PostgreSQL refuses them): store None instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    """`Store(url)` opens (and by default migrates) the database at `url`."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = url
        self.engine = db.make_engine(url)
        if migrate:
            db.migrate(self.engine)
        self.sessions = db.make_sessionmaker(self.engine)
        # Reads of one statement (or two that need not agree to the row) need no transaction: on
        # PostgreSQL autocommit saves the BEGIN and ROLLBACK round trips (0.45 -> 0.30 ms for a job)
        self.reads = (db.make_sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"))
                      if self.engine.dialect.name == "postgresql" else self.sessions)
        self._auth_on: tuple[float, bool] = (-math.inf, False)     # (when checked, answer)
        self._tokens: dict[str, tuple[float, Token]] = {}          # hash -> (when checked, token)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One write transaction, committed at the end (on SQLite it holds the write lock from the start)."""
        with self.sessions.begin() as session:
            session.connection(execution_options={"sqlite_immediate": True})
            yield session

    def _job(self, s: Session, job_id: str, *, lock: bool = False) -> Job:
        q = sa.select(Job).where(Job.id == job_id)
        if lock:
            q = q.with_for_update()       # PostgreSQL; on SQLite the transaction holds the write lock already
        job = s.scalars(q).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        return job

    # ---------------------------------------------------------------- jobs
    def create_job(self, spec: JobSpec, *, owner: str | None = None, idempotency_key: str | None = None) -> Job:
        """Store a queued job. The same (owner, idempotency key) again returns the first job, also
        when the two requests race (and also without an owner, where the UNIQUE constraint does
        not help since NULLs are distinct)."""
        with self.tx() as s:
            if idempotency_key is not None:
                if s.bind.dialect.name == "postgresql":
                    s.execute(sa.select(sa.func.pg_advisory_xact_lock(
                        sa.func.hashtext(json.dumps(["job", owner, idempotency_key])))))
                same_owner = Job.owner.is_(None) if owner is None else Job.owner == owner
                existing = s.scalars(sa.select(Job).where(same_owner, Job.idempotency_key == idempotency_key)).first()
                if existing is not None:
                    return existing
            job = Job(id=uuid.uuid4().hex, name=spec.name, status="queued", spec=spec.model_dump(mode="json"),
                      owner=owner, idempotency_key=idempotency_key)
            s.add(job)
        return job

    def get_job(self, job_id: str) -> Job | None:
        with self.reads() as s:
            return s.get(Job, job_id)

    def list_jobs(self, *, status: str | None = None, owner: str | None = None, limit: int = 50,
                  offset: int = 0) -> tuple[list[Job], int]:
        """A page of jobs, newest first, and the number of jobs that match."""
        where = []
        if status is not None:
            where.append(Job.status == status)
        if owner is not None:
            where.append(Job.owner == owner)
        with self.reads() as s:
            count = s.scalar(sa.select(sa.func.count()).select_from(Job).where(*where))
            rows = s.scalars(sa.select(Job).where(*where).order_by(Job.created_at.desc(), Job.id.desc())
                             .limit(limit).offset(offset)).all()
        return list(rows), int(count or 0)

    def claim_queued(self, limit: int) -> list[Job]:
        """Mark up to `limit` queued jobs (oldest first) running and return them (for the dispatcher)."""
        if limit <= 0:
            return []
        with self.tx() as s:
            jobs = list(s.scalars(sa.select(Job).where(Job.status == "queued").order_by(Job.created_at, Job.id)
                                  .limit(limit).with_for_update(skip_locked=True)))
            now = utcnow()
            for job in jobs:
                job.status, job.started_at = "running", job.started_at or now
        return jobs

    def set_status(self, job_id: str, status: str, *, error: str | None = None) -> Job:
        """Change a job's status and its timestamps. A finished job (succeeded, failed, cancelled)
        refuses to change (StateError); setting the status it already has returns it unchanged."""
        with self.tx() as s:
            job = self._job(s, job_id, lock=True)
            if job.status in TERMINAL:
                if job.status != status:
                    raise StateError(job_id, job.status, status)
                return job
            now = utcnow()
            job.status = status
            if status == "running":
                job.started_at = job.started_at or now
            if status in TERMINAL:
                job.finished_at = now
            if status == "cancelled":
                s.add(Event(job_id=job_id, level="info", message="job cancelled; what finished is kept"))
            if error is not None:
                job.error = error
        return job

    def update_job(self, job_id: str, **fields: Any) -> Job:
        """Set plain columns, e.g. `update_job(id, ray_submission_id=..., attempts=2)`."""
        unknown = set(fields) - JOB_FIELDS
        if unknown:
            raise TypeError(f"update_job: not a settable job column: {', '.join(sorted(unknown))}")
        with self.tx() as s:
            job = self._job(s, job_id, lock=True)
            for k, v in fields.items():
                setattr(job, k, v)
        return job

    def job_succeeded(self, job_id: str, final_model_id: str) -> Job:
        with self.tx() as s:
            job = self._job(s, job_id, lock=True)
            if job.status in TERMINAL:
                raise StateError(job_id, job.status, "succeeded")
            job.status, job.progress, job.final_model_id, job.finished_at = "succeeded", 1.0, final_model_id, utcnow()
            s.add(Event(job_id=job_id, level="info", message=f"job succeeded; final model {final_model_id}"))
        return job

    def job_failed(self, job_id: str, error: str) -> Job | None:
        """Fail a job that has not finished yet; None (and no change) if it has (a cancelled job
        stays cancelled)."""
        with self.tx() as s:
            job = self._job(s, job_id, lock=True)
            if job.status in TERMINAL:
                return None
            job.status, job.error, job.finished_at = "failed", error, utcnow()
            s.add(Event(job_id=job_id, level="error", message=f"job failed: {error}"))
        return job

    # ---------------------------------------------------------------- reads
    def phases(self, job_id: str) -> list[Phase]:
        with self.reads() as s:
            return list(s.scalars(sa.select(Phase).where(Phase.job_id == job_id).order_by(Phase.index)))

    def completed_phases(self, job_id: str) -> list[Phase]:
        """The succeeded phases 0..k in order, up to the first one that is not (where a resume starts)."""
        done: list[Phase] = []
        for p in self.phases(job_id):
            if p.status != "succeeded" or p.index != len(done):
                break
            done.append(p)
        return done

    def runs(self, job_id: str, kind: str | None = None) -> list[Run]:
        q = sa.select(Run).where(Run.job_id == job_id)
        if kind is not None:
            q = q.where(Run.kind == kind)
        with self.reads() as s:
            return list(s.scalars(q.order_by(Run.phase, Run.id)))

    def finished_ingredients(self, job_id: str, phase: int) -> list[tuple[Run, Model]]:
        """The succeeded ingredient runs of a phase with their models (reused by a resumed phase)."""
        with self.sessions() as s:
            rows = s.execute(sa.select(Run, Model).join(Model, Model.id == Run.model_id)
                             .where(Run.job_id == job_id, Run.phase == phase, Run.kind == "ingredient",
                                    Run.status == "succeeded").order_by(Run.name))
            return [(r, m) for r, m in rows]

    def metrics(self, job_id: str, *, run_name: str | None = None, name: str | None = None,
                limit: int = 100_000) -> list[dict[str, Any]]:
        """Time series rows {run, step, epoch, name, value, time}, by run, step and name."""
        q = (sa.select(Run.name.label("run"), Metric.step, Metric.epoch, Metric.name, Metric.value, Metric.time)
             .join(Run, Run.id == Metric.run_id).where(Metric.job_id == job_id))
        if run_name is not None:
            q = q.where(Run.name == run_name)
        if name is not None:
            q = q.where(Metric.name == name)
        with self.sessions() as s:
            return [dict(r._mapping) for r in s.execute(q.order_by(Run.name, Metric.step, Metric.name).limit(limit))]

    def events(self, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[Event]:
        """Events with id > after_id, oldest first (pass the last id seen to follow the log)."""
        with self.sessions() as s:
            return list(s.scalars(sa.select(Event).where(Event.job_id == job_id, Event.id > after_id)
                                  .order_by(Event.id).limit(limit)))

    def get_model(self, model_id: str) -> Model | None:
        with self.reads() as s:
            return s.get(Model, model_id)

    def get_model_by_name(self, job_id: str, name: str) -> Model | None:
        with self.sessions() as s:
            return s.scalars(sa.select(Model).where(Model.job_id == job_id, Model.name == name)).one_or_none()

    def _graph(self, model_id: str, *, up: bool) -> dict[str, Any]:
        """The model and all its ancestors (up) or descendants, with the edges among them, found by
        one recursive CTE. An unknown id gives no nodes."""
        near, far = (ModelEdge.child_id, ModelEdge.parent_id) if up else (ModelEdge.parent_id, ModelEdge.child_id)
        reach = sa.select(Model.id.label("id")).where(Model.id == model_id).cte("reach", recursive=True)
        reach = reach.union(sa.select(far).join(reach, near == reach.c.id))
        ids = sa.select(reach.c.id)
        with self.sessions() as s:
            nodes = list(s.scalars(sa.select(Model).where(Model.id.in_(ids)).order_by(Model.phase, Model.created_at)))
            edges = s.scalars(sa.select(ModelEdge).where(near.in_(ids), far.in_(ids))
                              .order_by(ModelEdge.child_id, ModelEdge.parent_id)).all()
        return {"nodes": nodes, "edges": [{"parent": e.parent_id, "child": e.child_id, "kind": e.kind}
                                          for e in edges]}

    def lineage(self, model_id: str) -> dict[str, Any]:
        """The DAG of the model's ancestors, the model included."""
        return self._graph(model_id, up=True)

    def descendants(self, model_id: str) -> dict[str, Any]:
        """The DAG of the models derived from this one, the model included."""
        return self._graph(model_id, up=False)

    def recorder(self, job_id: str) -> DBRecorder:
        return DBRecorder(self, job_id)

    # ---------------------------------------------------------------- health and auth
    def ping(self) -> None:
        with self.engine.connect() as c:
            c.execute(sa.text("SELECT 1"))

    def create_token(self, name: str, *, admin: bool = False) -> tuple[Token, str]:
        """Mint a bearer token for `name`; returns the row and the secret (stored only as its hash)."""
        secret = f"ladle_{secrets.token_urlsafe(32)}"
        token = Token(id=uuid.uuid4().hex, name=name, admin=admin, token_hash=_hash(secret))
        try:
            with self.tx() as s:
                s.add(token)
        except sa.exc.IntegrityError:
            raise ValueError(f"a token named {name!r} exists already") from None
        self._auth_on = (time.monotonic(), True)
        return token, secret

    def ensure_token(self, name: str, secret: str, *, admin: bool = False) -> Token:
        """Keep the token `name` equal to `secret` (created, or its secret and role replaced): for a
        token that comes from the deployment's configuration. Safe to run from several replicas."""
        for _ in range(2):
            try:
                with self.tx() as s:
                    token = s.scalars(sa.select(Token).where(Token.name == name)).one_or_none()
                    if token is None:
                        token = Token(id=uuid.uuid4().hex, name=name)
                        s.add(token)
                    token.token_hash, token.admin = _hash(secret), admin
                break
            except sa.exc.IntegrityError:     # another replica created it meanwhile: update that one
                continue
        else:
            raise ValueError(f"cannot store the token {name!r}: another token has the same secret")
        self._tokens.clear()
        self._auth_on = (time.monotonic(), True)
        return token

    def check_token(self, secret: str, *, max_age: float = 0.0) -> Token | None:
        """The token whose secret this is, or None. `max_age`: a valid token seen at most that many
        seconds ago is not looked up again (the API asks on every request)."""
        key, now = _hash(secret), time.monotonic()
        hit = self._tokens.get(key)
        if hit is not None and now - hit[0] <= max_age:
            return hit[1]
        with self.reads() as s:
            token = s.scalars(sa.select(Token).where(Token.token_hash == key)).one_or_none()
        if token is not None:
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[key] = (now, token)
        return token

    def auth_enabled(self, *, max_age: float = 0.0) -> bool:
        """Auth is on as soon as one token exists. `max_age`: an answer at most that many seconds old
        will do; a token minted through this store turns auth on at once."""
        now = time.monotonic()
        if now - self._auth_on[0] > max_age:
            with self.reads() as s:
                self._auth_on = (now, s.scalar(sa.select(sa.func.count()).select_from(Token)) > 0)
        return self._auth_on[1]


class DBRecorder:
    """The pipeline's recorder for one job (service.pipeline.Recorder); every call one transaction."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id

    def job_started(self, spec: JobSpec, total_epochs: int) -> None:
        """Running (again, for a resumed driver); refuses a job that is already finished."""
        with self.store.tx() as s:
            job = self.store._job(s, self.job_id, lock=True)
            if job.status == "cancelled":
                raise JobCancelled(f"job {self.job_id} was cancelled")
            if job.status in TERMINAL:
                raise StateError(self.job_id, job.status, "running")
            job.status, job.total_epochs = "running", total_epochs
            job.started_at = job.started_at or utcnow()

    def event(self, message: str, *, level: str = "info", phase: int | None = None) -> None:
        with self.store.tx() as s:
            s.add(Event(job_id=self.job_id, level=level, phase=phase, message=message))

    def phase_started(self, phase: int, target_sparsity: float) -> None:
        with self.store.tx() as s:
            row = s.scalars(sa.select(Phase).where(Phase.job_id == self.job_id, Phase.index == phase)).one_or_none()
            if row is None:
                s.add(Phase(job_id=self.job_id, index=phase, target_sparsity=target_sparsity, status="running"))
            else:                       # a resumed phase: the same row again
                row.status, row.target_sparsity, row.finished_at = "running", target_sparsity, None
            self.store._job(s, self.job_id).current_phase = phase

    def _run(self, s: Session, name: str) -> Run | None:
        return s.scalars(sa.select(Run).where(Run.job_id == self.job_id, Run.name == name)).one_or_none()

    def run_started(self, run: RunRecord) -> None:
        """A new run, or a run started again by a resumed driver: the same row, attempts + 1. Its
        metrics stay: a task resumed from an epoch checkpoint reports only the epochs after it, and
        one that starts over replaces each epoch's rows as it reports them again."""
        with self.store.tx() as s:
            row = self._run(s, run.name)
            if row is None:
                s.add(Run(job_id=self.job_id, phase=run.phase, name=run.name, kind=run.kind,
                          config=_finite(run.config), status="running"))
            else:
                row.status, row.attempts, row.config = "running", row.attempts + 1, _finite(run.config)
                row.metrics, row.model_id, row.error = {}, None, None
                row.started_at, row.finished_at = utcnow(), None

    def metric(self, run_name: str, row: dict[str, float]) -> None:
        """One epoch's row: a metrics row per finite numeric value ("epoch" and "step" go to their
        columns). An epoch reported again replaces its rows and does not count twice for progress."""
        with self.store.tx() as s:
            run = self._run(s, run_name)
            if run is None:
                return
            step, epoch = int(row.get("step", 0)), int(row.get("epoch", 0))
            again = s.execute(sa.delete(Metric).where(Metric.run_id == run.id, Metric.epoch == epoch)).rowcount
            now = utcnow()
            s.add_all([Metric(job_id=self.job_id, run_id=run.id, step=step, epoch=epoch, name=k, value=float(v),
                              time=now) for k, v in row.items()
                       if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v)])
            if not again:
                job = self.store._job(s, self.job_id)
                job.done_epochs += 1
                job.progress = min(0.99, job.done_epochs / job.total_epochs) if job.total_epochs else 0.0

    def run_finished(self, run_name: str, status: str, *, model_id: str | None = None,
                     metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self.store.tx() as s:
            run = self._run(s, run_name)
            if run is None:
                return
            run.status, run.model_id, run.error, run.finished_at = status, model_id, error, utcnow()
            run.metrics = _finite(metrics or {})

    def model_saved(self, model: ModelRecord) -> None:
        """The model and its lineage edges, together. A model of the same name that nothing refers
        to yet (no child, no run or phase result: its driver died right after saving it) is
        replaced; a name in use raises IntegrityError and writes nothing."""
        with self.store.tx() as s:
            old = s.scalars(sa.select(Model.id).where(Model.job_id == self.job_id, Model.name == model.name)).first()
            if old is not None and not s.scalar(sa.select(sa.or_(
                    sa.exists().where(ModelEdge.parent_id == old),
                    sa.exists().where(Run.job_id == self.job_id, Run.model_id == old),
                    sa.exists().where(Phase.job_id == self.job_id, Phase.model_id == old)))):
                s.execute(sa.delete(ModelEdge).where(ModelEdge.child_id == old))
                s.execute(sa.delete(Model).where(Model.id == old))
            s.add(Model(id=model.id, job_id=self.job_id, phase=model.phase, kind=model.kind, name=model.name,
                        uri=model.uri, size_bytes=model.size_bytes, sha256=model.sha256, sparsity=model.sparsity,
                        nonzeros=model.nonzeros, metrics=_finite(model.metrics)))
            s.flush()
            s.add_all([ModelEdge(parent_id=p, child_id=model.id, kind=k) for p, k in model.parents])

    def phase_finished(self, summary: PhaseSummary) -> None:
        with self.store.tx() as s:
            row = s.scalars(sa.select(Phase).where(Phase.job_id == self.job_id,
                                                   Phase.index == summary.phase)).one()
            data = _finite(asdict(summary))
            for key in PHASE_FIELDS:
                setattr(row, key, data[key])
            if summary.phase > 0:
                row.pruned_model_id = s.scalars(sa.select(Model.id).where(
                    Model.job_id == self.job_id, Model.name == f"phase{summary.phase}/pruned")).first()
            row.status, row.finished_at = "succeeded", utcnow()
            job = self.store._job(s, self.job_id)
            accs = [a for a in (summary.soup_accuracy, *summary.ingredient_accuracies)
                    if a is not None and math.isfinite(a)]
            job.sparsity, job.best_accuracy = row.sparsity, max(accs, default=None)
            s.flush()
            # the job's compute: the sum over its finished phases (a resumed phase replaced its row)
            totals = s.execute(sa.select(*(sa.func.sum(getattr(Phase, f)) for f in COMPUTE_FIELDS))
                               .where(Phase.job_id == self.job_id, Phase.status == "succeeded")).one()
            for f, v in zip(COMPUTE_FIELDS, totals):
                setattr(job, f, v)
