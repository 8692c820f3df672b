"""The store: the one place that reads and writes the database (design section 5).

Per resource, functions that take an open session and leave the transaction to their caller:
`jobs` (rows and status changes, all through `jobs.transition`), `runs` (phases, runs, metrics,
events), `models` (models and lineage), `tokens`; `convert` turns rows into records and back.
`Store` is the facade the service uses: it owns the engine and the transactions, one per method,
and `tx()` for an operation whose writes must commit together.

Rows come back as the ORM objects of service.orm (`Job`, `Phase`, `Run`, `Model`, `Event`,
`Token`), detached from their session: `expire_on_commit=False` keeps their columns loaded, and the
models have no relationships to lazy-load. Change them only through the store. The exceptions are
`metrics()` (plain dicts, since each row carries its run's name), `lineage()` / `descendants()`
(`{"nodes": [Model], "edges": [{"parent", "child", "kind"}]}`), and the API's hot reads of jobs,
`job_row()` and `list_jobs(spec=False)` (plain dicts of the columns the API shows: no ORM objects).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import db
from service.orm import Event, Job, Model, Phase, Run, Token, Upload
from service.spec import JobSpec
from service.states import StateError
from service.store import jobs, models, runs, tokens, uploads
from service.store.jobs import JobCancelled, JobNotFound, QuotaExceeded
from service.store.runs import COMPUTE_FIELDS
from service.store.tokens import TokenRefused

__all__ = ["COMPUTE_FIELDS", "JobCancelled", "JobNotFound", "QuotaExceeded", "StateError", "Store", "TokenRefused"]


class Store:
    """`Store(url)` opens (and by default migrates) the database at `url`."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = url
        self.engine = db.make_engine(url)
        if migrate:
            db.migrate(self.engine)
        self.sessions = db.make_sessionmaker(self.engine)
        # Reads of one statement (or two that need not agree to the row) need no transaction: on
        # PostgreSQL autocommit saves the BEGIN and ROLLBACK round trips (0.45 -> 0.30 ms for a job); on
        # SQLite no BEGIN is sent (service.db), and each statement reads a snapshot of its own
        self.read_engine = self.engine.execution_options(
            **({"isolation_level": "AUTOCOMMIT"} if self.engine.dialect.name == "postgresql" else {db.NO_BEGIN: True}))
        self.reads = db.make_sessionmaker(self.read_engine)
        self._tokens: dict[str, tuple[float, Token]] = {}          # hash -> (when checked, token)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One write transaction, committed at the end (on SQLite it holds the write lock from the start)."""
        with self.sessions.begin() as session:
            session.connection(execution_options={"sqlite_immediate": True})
            yield session

    # ---------------------------------------------------------------- jobs
    def create_job(self, spec: JobSpec, *, owner: str | None = None, idempotency_key: str | None = None,
                   max_open: int | None = None) -> Job:
        with self.tx() as s:
            return jobs.create(s, spec, owner=owner, idempotency_key=idempotency_key, max_open=max_open)

    def get_job(self, job_id: str) -> Job | None:
        with self.reads() as s:
            return s.get(Job, job_id)

    def job_row(self, job_id: str) -> dict[str, Any] | None:
        """The job as the API shows it, as a plain dict (its columns and spec; see jobs.row), or None."""
        with self.read_engine.connect() as c:
            return jobs.row(c, job_id)

    def list_jobs(self, *, status: str | None = None, owner: str | None = None, limit: int = 50,
                  offset: int = 0, spec: bool = True) -> tuple[list[Job] | list[dict[str, Any]], int]:
        """A page of jobs and the count; `spec=False`: plain rows with their outline, no spec (see jobs.outlines)."""
        if not spec:
            with self.read_engine.connect() as c:
                return jobs.outlines(c, status=status, owner=owner, limit=limit, offset=offset)
        with self.reads() as s:
            return jobs.page(s, status=status, owner=owner, limit=limit, offset=offset)

    def claim_queued(self, limit: int, *, per_owner: int | None = None) -> list[Job]:
        with self.tx() as s:
            return jobs.claim_queued(s, limit, per_owner=per_owner)

    def set_status(self, job_id: str, status: str, *, error: str | None = None) -> Job:
        with self.tx() as s:
            return jobs.set_status(s, job_id, status, error=error)

    def update_job(self, job_id: str, **fields: Any) -> Job:
        with self.tx() as s:
            return jobs.update(s, job_id, **fields)

    def record_submission(self, job_id: str, submission_id: str, attempt: int, message: str) -> Job | None:
        with self.tx() as s:
            return jobs.record_submission(s, job_id, submission_id, attempt, message)

    def driver_lost(self, job_id: str) -> Job:
        with self.tx() as s:
            return jobs.driver_lost(s, job_id)

    def requeue(self, job_id: str, reason: str) -> Job | None:
        with self.tx() as s:
            return jobs.requeue(s, job_id, reason)

    def job_succeeded(self, job_id: str, final_model_id: str) -> Job:
        with self.tx() as s:
            return jobs.succeeded(s, job_id, final_model_id)

    def job_failed(self, job_id: str, error: str, *, submission: str | None = None) -> Job | None:
        with self.tx() as s:
            return jobs.failed(s, job_id, error, submission=submission)

    def event(self, job_id: str, message: str, *, level: str = "info", phase: int | None = None) -> None:
        with self.tx() as s:
            jobs.event(s, job_id, message, level=level, phase=phase)

    # ---------------------------------------------------------------- phases, runs, metrics, events
    def phases(self, job_id: str) -> list[Phase]:
        with self.reads() as s:
            return runs.phases(s, job_id)

    def completed_phases(self, job_id: str) -> list[Phase]:
        with self.reads() as s:
            return runs.completed_phases(s, job_id)

    def runs(self, job_id: str, kind: str | None = None) -> list[Run]:
        with self.reads() as s:
            return runs.runs(s, job_id, kind)

    def finished_ingredients(self, job_id: str, phase: int) -> list[tuple[Run, Model]]:
        with self.sessions() as s:
            return runs.finished_ingredients(s, job_id, phase)

    def metrics(self, job_id: str, *, run_name: str | None = None, name: str | None = None,
                limit: int = 100_000) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return runs.metrics(s, job_id, run_name=run_name, name=name, limit=limit)

    def events(self, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[Event]:
        with self.sessions() as s:
            return runs.events(s, job_id, after_id=after_id, limit=limit)

    # ---------------------------------------------------------------- models
    def get_model(self, model_id: str) -> Model | None:
        with self.reads() as s:
            return models.get(s, model_id)

    def model_by_uri(self, uri: str, *, job_id: str | None = None) -> Model | None:
        """The model whose checkpoint is at `uri` (the artifact store's URL of it; of the job `job_id`), if any."""
        with self.reads() as s:
            return models.by_uri(s, uri, job_id)

    def get_model_by_name(self, job_id: str, name: str) -> Model | None:
        with self.sessions() as s:
            return models.by_name(s, job_id, name)

    def add_model_metrics(self, model_id: str, **values: Any) -> Model | None:
        """Merge measurements into a model's metrics (see models.add_metrics)."""
        with self.tx() as s:
            return models.add_metrics(s, model_id, values)

    def lineage(self, model_id: str) -> dict[str, Any]:
        """The DAG of the model's ancestors, the model included."""
        with self.sessions() as s:
            return models.graph(s, model_id, up=True)

    def descendants(self, model_id: str) -> dict[str, Any]:
        """The DAG of the models derived from this one, the model included."""
        with self.sessions() as s:
            return models.graph(s, model_id, up=False)

    # ---------------------------------------------------------------- uploads
    def add_upload(self, upload: Upload, *, max_owner_bytes: int | None = None) -> Upload:
        with self.tx() as s:
            return uploads.add(s, upload, max_owner_bytes=max_owner_bytes)

    def upload_bytes(self, owner: str) -> int:
        """The bytes the owner's uploads hold together."""
        with self.reads() as s:
            return uploads.used_bytes(s, owner)

    def get_upload(self, upload_id: str, *, owner: str | None = None, admin: bool = True) -> Upload | None:
        """The upload if the caller (`owner`, or an admin) may use it, else None (missing or not theirs)."""
        with self.reads() as s:
            return uploads.get(s, upload_id, owner=owner, admin=admin)

    def list_uploads(self, *, owner: str | None = None, admin: bool = True, limit: int = 100,
                     offset: int = 0) -> tuple[list[Upload], int]:
        with self.reads() as s:
            return uploads.page(s, owner=owner, admin=admin, limit=limit, offset=offset)

    def delete_upload(self, upload_id: str, *, owner: str | None = None, admin: bool = True,
                      first: Callable[[Upload], None] | None = None) -> Upload | None:
        """Forget the upload (the caller's own): the row, or None. `first(row)` runs inside the transaction
        before the row goes (it removes the file): if it raises, the row stays."""
        with self.tx() as s:
            row = uploads.get(s, upload_id, owner=owner, admin=admin)
            if row is not None:
                if first is not None:
                    first(row)
                uploads.delete(s, row)
            return row

    def upload_ids(self, ids: list[str]) -> set[str]:
        """Which of `ids` are recorded uploads."""
        with self.reads() as s:
            return set(s.scalars(sa.select(Upload.id).where(Upload.id.in_(ids)))) if ids else set()

    # ---------------------------------------------------------------- health and auth
    def ping(self) -> None:
        with self.engine.connect() as c:
            c.execute(sa.text("SELECT 1"))

    def create_token(self, name: str, *, admin: bool = False,
                     expires_at: datetime | None = None) -> tuple[Token, str]:
        """Mint a bearer token for `name`, valid until `expires_at` (None: until revoked); returns the row
        and the secret (stored only as its hash). ValueError if a token of that name is not revoked."""
        try:
            with self.tx() as s:
                return tokens.mint(s, name, admin=admin, expires_at=expires_at)
        except sa.exc.IntegrityError:
            raise ValueError(f"a token named {name!r} exists already (revoke it first to replace it)") from None

    def ensure_token(self, name: str, secret: str, *, admin: bool = False) -> Token:
        """Keep the token `name` equal to `secret` (created, or its secret and role replaced): for a
        token that comes from the deployment's configuration. Safe to run from several replicas.
        ValueError if that secret was revoked (it is not brought back)."""
        for _ in range(2):
            try:
                with self.tx() as s:
                    token = tokens.put(s, name, secret, admin=admin)
                break
            except sa.exc.IntegrityError:     # another replica created it meanwhile: update that one
                continue
        else:
            raise ValueError(f"cannot store the token {name!r}: another token has the same secret")
        self._tokens.clear()
        return token

    def list_tokens(self) -> list[Token]:
        """Every token, revoked and expired ones included, oldest first."""
        with self.reads() as s:
            return tokens.listing(s)

    def revoke_token(self, ref: str) -> Token | None:
        """Revoke a token by id (or by the name of a token not revoked); None if there is no such token.
        It stops working at once through this store, and within the readers' `max_age` elsewhere."""
        with self.tx() as s:
            token = tokens.revoke(s, ref)
        if token is not None:
            self._tokens.pop(token.token_hash, None)
        return token

    def has_admin_token(self) -> bool:
        """Whether an admin token that is neither revoked nor expired is stored."""
        with self.reads() as s:
            return tokens.admin_exists(s)

    def authenticate(self, secret: str, *, max_age: float = 0.0) -> Token:
        """The token whose secret this is, if it is good; else TokenRefused, saying why (unknown, revoked,
        expired). `max_age`: a good token seen at most that many seconds ago is not looked up again (the
        API asks on every request), so a token deleted or revoked by another process (or another API
        replica) still passes for at most `max_age` seconds; expiry is checked on every call, and a
        token revoked through this store fails at once."""
        key, now = tokens.digest(secret), time.monotonic()
        hit = self._tokens.get(key)
        fresh = hit is not None and now - hit[0] <= max_age
        if fresh:
            token = hit[1]
        else:
            with self.reads() as s:
                token = tokens.by_digest(s, key)
        refused = tokens.refusal(token)
        if refused is not None:
            self._tokens.pop(key, None)
            raise refused
        if not fresh:
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[key] = (now, token)
        return token

    def check_token(self, secret: str, *, max_age: float = 0.0) -> Token | None:
        """The good token whose secret this is, or None (see authenticate)."""
        try:
            return self.authenticate(secret, max_age=max_age)
        except tokens.TokenRefused:
            return None
