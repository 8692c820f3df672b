"""Jobs: their rows and their status changes. Functions take an open session; the caller owns the
transaction (service.store.Store.tx). Every change of a job's status goes through `transition`. The API's
hot reads (`row`, `outlines`) take a connection instead and return plain dicts: no ORM session."""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Event, Job, utcnow
from service.records import JobOutline
from service.spec import JobSpec
from service.states import TERMINAL, StateError, check_transition

SETTABLE = frozenset(Job.__table__.c.keys()) - {"id", "created_at", "updated_at", "status"}


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class JobCancelled(RuntimeError):
    """The job was cancelled before its driver started it."""


def get(s: Session, job_id: str, *, lock: bool = False) -> Job:
    q = sa.select(Job).where(Job.id == job_id)
    if lock:
        q = q.with_for_update()       # PostgreSQL; on SQLite the transaction holds the write lock already
    job = s.scalars(q).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def event(s: Session, job_id: str, message: str, *, level: str = "info", phase: int | None = None) -> None:
    s.add(Event(job_id=job_id, level=level, phase=phase, message=message))


def transition(s: Session, job: Job, status: str, *, error: str | None = None, message: str | None = None,
               level: str = "info") -> bool:
    """Move `job` (loaded in `s`, locked) to `status` with its timestamps, error and event; False if
    it has that status already; StateError if service.states.TRANSITIONS does not allow it."""
    if not check_transition(job.id, job.status, status):
        return False
    now = utcnow()
    job.status = status
    if status == "running":
        job.started_at = job.started_at or now
    elif status == "queued":
        job.ray_submission_id = None          # the next driver gets a submission of its own
    elif status in TERMINAL:
        job.finished_at = now
    if error is not None:
        job.error = error
    if message is not None:
        event(s, job.id, message, level=level)
    return True


def current(job: Job, submission: str | None) -> bool:
    """Whether a driver of that submission (None: not a dispatched driver) may still act for the job:
    the job is not back in the queue and has been given to no other submission."""
    return submission is None or (job.status == "running" and job.ray_submission_id in (None, submission))


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as its JSON column holds it, checked to be exactly what validated: strict JSON (no NaN or
    infinity, which would break the database's JSON functions for every listing) that reads back equal."""
    value = spec.model_dump(mode="json")
    text = json.dumps(value, allow_nan=False)          # ValueError: a non-finite number got past validation
    if json.loads(text) != value:
        raise ValueError("the job spec does not survive a round trip through JSON")
    return value


class QuotaExceeded(RuntimeError):
    """The owner has as many jobs queued or running as the service allows (Settings.max_open_jobs_per_user)."""

    def __init__(self, owner: str, limit: int):
        super().__init__(f"{owner} has {limit} jobs queued or running, this service's limit per user "
                         "(LADLE_MAX_OPEN_JOBS_PER_USER): wait for one to end, or cancel one")
        self.limit = limit


def create(s: Session, spec: JobSpec, *, owner: str | None = None, idempotency_key: str | None = None,
           max_open: int | None = None) -> Job:
    """A queued job. The same (owner, idempotency key) again returns the first job, also when the two
    requests race (and also without an owner, where the UNIQUE constraint does not help since NULLs
    are distinct). `max_open`: QuotaExceeded when `owner` already has that many jobs queued or running
    (counted under the same lock, so that racing submissions cannot pass it together)."""
    if s.bind.dialect.name == "postgresql" and (idempotency_key is not None or max_open is not None):
        s.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(json.dumps(["job", owner])))))
    if idempotency_key is not None:
        same_owner = Job.owner.is_(None) if owner is None else Job.owner == owner
        existing = s.scalars(sa.select(Job).where(same_owner, Job.idempotency_key == idempotency_key)).first()
        if existing is not None:
            return existing
    if max_open is not None and owner is not None:
        open_jobs = s.scalar(sa.select(sa.func.count()).select_from(Job).where(
            Job.owner == owner, Job.status.in_(("queued", "running"))))
        if open_jobs >= max_open:
            raise QuotaExceeded(owner, max_open)
    outline = JobOutline.of(spec)
    job = Job(id=uuid.uuid4().hex, name=spec.name, status="queued", spec=stored_spec(spec), task=outline.task,
              phases_total=outline.phases, owner=owner, idempotency_key=idempotency_key)
    s.add(job)
    return job


# What a list shows of a job (api.schemas.JobPublic without its spec): these columns, its outline's columns
# (service.records.JobOutline) and nothing of its spec
LISTED = ("id", "name", "status", "progress", "current_phase", "final_model_id", "error", "owner", "attempts",
          "driver_failures", "sparsity", "best_score", "cpu_seconds", "gpu_seconds", "epochs_trained", "created_at",
          "started_at", "finished_at")
OUTLINE = ("task", "phases_total")
LIST_QUERY = sa.select(*(Job.__table__.c[k] for k in (*LISTED, *OUTLINE)))
NEWEST_FIRST = (Job.created_at.desc(), Job.id.desc())
# What GET /jobs/{id} shows: the listed columns and the whole spec
ROW_QUERY = sa.select(*(Job.__table__.c[k] for k in LISTED), Job.spec).where(Job.id == sa.bindparam("id"))


def _paging(q: sa.Select, status: bool, owner: bool) -> sa.Select:
    if status:
        q = q.where(Job.status == sa.bindparam("status"))
    if owner:
        q = q.where(Job.owner == sa.bindparam("owner"))
    return q


# The statements of `page` and `outlines`, built once per filter (status or not, owner or not) with the values as bound
# parameters: SQLAlchemy memoizes a statement's cache key, whereas building the statement per call (and
# hashing its 21 columns into a new cache key) cost more than running it (0.9 -> 0.35 ms for 50 rows)
PAGE_QUERIES = {(st, ow): (_paging(sa.select(sa.func.count()).select_from(Job), st, ow),
                           _paging(LIST_QUERY, st, ow).order_by(*NEWEST_FIRST)
                           .limit(sa.bindparam("limit")).offset(sa.bindparam("offset")),
                           _paging(sa.select(Job), st, ow).order_by(*NEWEST_FIRST)
                           .limit(sa.bindparam("limit")).offset(sa.bindparam("offset")))
                for st in (False, True) for ow in (False, True)}


def _params(status: str | None, owner: str | None, limit: int, offset: int) -> tuple[tuple, dict[str, Any]]:
    """The PAGE_QUERIES of that filter, and their parameters."""
    return PAGE_QUERIES[status is not None, owner is not None], {"status": status, "owner": owner, "limit": limit,
                                                                 "offset": offset}


def page(s: Session, *, status: str | None = None, owner: str | None = None, limit: int = 50,
         offset: int = 0) -> tuple[list[Job], int]:
    """A page of jobs, newest first, and the number of jobs that match."""
    (count_q, _, jobs_q), params = _params(status, owner, limit, offset)
    count = int(s.connection().execute(count_q, params).scalar() or 0)
    return list(s.scalars(jobs_q, params)), count


def outlines(c: sa.Connection, *, status: str | None = None, owner: str | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """`page` as GET /jobs shows it: plain rows (dicts of the LISTED columns) with their `outline`
    (service.records.JobOutline, from its own columns) instead of the spec: decoding 50 whole specs and
    building 50 ORM objects cost more than the rest of the request, and no spec is read at all."""
    (count_q, rows_q, _), params = _params(status, owner, limit, offset)
    count = int(c.execute(count_q, params).scalar() or 0)
    rows = []
    for row in c.execute(rows_q, params):
        job = dict(zip(LISTED, row))
        job["outline"] = JobOutline(*row[len(LISTED):])
        rows.append(job)
    return rows, count


def row(c: sa.Connection, job_id: str) -> dict[str, Any] | None:
    """A job as GET /jobs/{id} shows it: a plain dict of the LISTED columns and its spec (no ORM object:
    one prebuilt Core statement on a connection costs a third of `Session.get`), or None."""
    found = c.execute(ROW_QUERY, {"id": job_id}).one_or_none()
    return None if found is None else dict(zip((*LISTED, "spec"), found))


def claim_queued(s: Session, limit: int, *, per_owner: int | None = None) -> list[Job]:
    """Mark up to `limit` queued jobs (oldest first) running and return them (for the dispatcher).
    `per_owner`: an owner with that many running jobs gets none more (jobs without an owner count as
    one owner); their queued jobs wait and later ones of other owners go first."""
    if limit <= 0:
        return []
    running: dict[str | None, int] = {}
    if per_owner is not None:
        running = dict(s.execute(sa.select(Job.owner, sa.func.count()).where(Job.status == "running")
                                 .group_by(Job.owner)).all())
    q = sa.select(Job).where(Job.status == "queued").order_by(Job.created_at, Job.id).with_for_update(skip_locked=True)
    if per_owner is None:
        q = q.limit(limit)
    claimed: list[Job] = []
    for job in s.scalars(q):
        if len(claimed) == limit:
            break
        if per_owner is not None and running.get(job.owner, 0) >= per_owner:
            continue
        transition(s, job, "running")
        running[job.owner] = running.get(job.owner, 0) + 1
        claimed.append(job)
    return claimed


def update(s: Session, job_id: str, **fields: Any) -> Job:
    """Set plain columns, e.g. `update(s, id, progress=0.5)` (not the status: see transition)."""
    unknown = set(fields) - SETTABLE
    if unknown:
        raise TypeError(f"update_job: not a settable job column: {', '.join(sorted(unknown))}")
    job = get(s, job_id, lock=True)
    for k, v in fields.items():
        setattr(job, k, v)
    return job


def record_submission(s: Session, job_id: str, submission_id: str, attempt: int, message: str) -> Job | None:
    """The dispatcher handed a running job to Ray as `submission_id` (its driver number `attempt`);
    None (and no change) if the job is no longer running (cancelled meanwhile)."""
    job = get(s, job_id, lock=True)
    if job.status != "running":
        return None
    job.ray_submission_id, job.attempts = submission_id, attempt
    event(s, job_id, message)
    return job


def driver_lost(s: Session, job_id: str) -> Job:
    """One more driver of this job ended without finishing; returns the job with the count."""
    job = get(s, job_id, lock=True)
    job.driver_failures = (job.driver_failures or 0) + 1
    return job


def requeue(s: Session, job_id: str, reason: str) -> Job | None:
    """A running job goes back to the queue (its driver is gone through no fault of its own: the
    service or its Ray head stopped, or Ray refused the submission for now); the next driver resumes
    it after its last completed phase. None if the job is not running."""
    job = get(s, job_id, lock=True)
    if job.status != "running":
        return None
    transition(s, job, "queued", message=f"{reason}; the job waits in the queue and resumes where it stopped",
               level="warning")
    return job


def started(s: Session, job_id: str, total_epochs: int, *, submission: str | None = None) -> Job:
    """A driver starts (or resumes) the job: refused if it was cancelled (JobCancelled), has finished,
    went back to the queue or was given to another submission (StateError). A job nobody dispatched
    (run by its caller) becomes running here."""
    job = get(s, job_id, lock=True)
    if job.status == "cancelled":
        raise JobCancelled(f"job {job_id} was cancelled")
    if job.status == "queued" and not job.attempts:
        transition(s, job, "running")
    elif job.status != "running" or not current(job, submission):
        raise StateError(job_id, job.status if job.status != "running" else "running elsewhere", "running")
    job.total_epochs = total_epochs
    return job


def succeeded(s: Session, job_id: str, final_model_id: str) -> Job:
    job = get(s, job_id, lock=True)
    if job.status in TERMINAL:
        raise StateError(job_id, job.status, "succeeded")
    job.progress, job.final_model_id = 1.0, final_model_id
    transition(s, job, "succeeded", message=f"job succeeded; final model {final_model_id}")
    return job


def failed(s: Session, job_id: str, error: str, *, submission: str | None = None) -> Job | None:
    """Fail a job that has not finished yet; None (and no change) if it has (a cancelled job stays
    cancelled), or if `submission` (a driver's) is no longer the job's submission."""
    job = get(s, job_id, lock=True)
    if job.status in TERMINAL or not current(job, submission):
        return None
    transition(s, job, "failed", error=error, message=f"job failed: {error}", level="error")
    return job


def set_status(s: Session, job_id: str, status: str, *, error: str | None = None) -> Job:
    """Change a job's status (cancel it, say); setting the status it has returns it unchanged."""
    job = get(s, job_id, lock=True)
    transition(s, job, status, error=error,
               message="job cancelled; what finished is kept" if status == "cancelled" else None)
    return job
