"""The dispatcher: submits queued jobs to Ray as Ray jobs and keeps the DB in step with Ray.

Every `interval` seconds, when Ray's Jobs API answers: reconcile the running jobs with Ray's job
states, then submit queued jobs (oldest first) up to `max_concurrent_jobs` (and `per_user` running
jobs per owner). A job's n-th driver has the submission id `<job id>` (n = 1) or `<job id>-r<n>`, so
a submission repeated after a crash is refused by Ray as a duplicate instead of starting a second
driver.

What Ray's answers mean here:
- only Ray's explicit "no such job" (HTTP 404) means a job's driver is gone; a driver that ended
  (FAILED, STOPPED) without recording the job's end is gone too. Such a job gets a new driver, which
  resumes it after its last completed phase, up to `max_attempts` lost drivers in all; the old
  submission is stopped first.
- any other error (connection refused, a timeout, HTTP 5xx) is transient: nothing changes, the
  dispatcher backs off (up to `MAX_BACKOFF` seconds), logs the outage once and says so through
  `ray_error` (the health route shows it); queued jobs stay queued. With `revive`, a callback that
  restarts a dead embedded Ray head and returns its new Jobs API address, an outage ends there.
- a running job with no submission (the service died between claiming and submitting it) is looked
  up under the submission id it would have had: found, it is recorded; unknown, it is submitted.
- a job running longer than its spec's `timeout` fails with that reason and its driver is stopped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import sqlalchemy as sa
from ray.job_submission import JobStatus, JobSubmissionClient

from service.store import Store

log = logging.getLogger("ladle.dispatcher")

MAX_BACKOFF = 30.0     # seconds between rounds while Ray does not answer, at most

# Where the object store is, in the standard variables botocore (s3fs) reads: the ones set where the
# dispatcher runs go to every driver, and through the Ray job's runtime_env to its actors on every node.
# Credentials never travel that way (anyone who can list Ray jobs reads a runtime_env): the object
# store's keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and the database's password
# (PGPASSWORD, read by libpq) come from the Ray nodes' own environment — compose and KubeRay give it
# to them from their secrets, the embedded head inherits the service's (service.runtime).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
# Settings the driver reads itself
FORWARDED_SETTINGS = ("LADLE_UNSCHEDULABLE_TIMEOUT", "LADLE_MAX_CHECKPOINT_BYTES")


def without_password(database_url: str) -> str:
    """The database URL a driver is given: the password left out (the node's PGPASSWORD supplies it)."""
    url = sa.engine.make_url(database_url)
    return url._replace(password=None).render_as_string(hide_password=False) if url.password is not None else database_url


def artifacts_env() -> dict[str, str]:
    """What a Ray job's process needs to reach the artifact store (an export's), secrets excepted."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def driver_env(database_url: str, artifacts: str) -> dict[str, str]:
    """What a driver and its workers need to reach the store and the artifacts, secrets excepted."""
    env = artifacts_env()
    env.update({k: os.environ[k] for k in FORWARDED_SETTINGS if os.environ.get(k)})
    env.update({"LADLE_DATABASE_URL": without_password(database_url), "LADLE_ARTIFACTS": artifacts})
    return env


def submission_id(job_id: str, attempt: int) -> str:
    """The Ray submission id of a job's driver number `attempt` (1, 2, ...)."""
    return job_id if attempt <= 1 else f"{job_id}-r{attempt}"


class Missing(LookupError):
    """Ray's Jobs API answered that it has no such job (HTTP 404)."""


def _status_code(e: BaseException) -> int | None:
    """The HTTP status in the RuntimeError that Ray's SDK raises for any non-200 answer."""
    text = str(e)
    marker = "status code "
    if isinstance(e, RuntimeError) and marker in text:
        digits = text.split(marker, 1)[1][:3]
        return int(digits) if digits.isdigit() else None
    return None


def is_transient(e: BaseException) -> bool:
    """Ray did not answer, or answered that it cannot now (5xx, 408, 429): try again later."""
    code = _status_code(e)
    if code is not None:
        return code >= 500 or code in (408, 429)
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.startswith(("requests", "urllib3"))


class Dispatcher:
    def __init__(self, store: Store, jobs_api_url: str, *, database_url: str, artifacts: str,
                 max_concurrent_jobs: int = 2, max_attempts: int = 3, per_user: int | None = None,
                 interval: float = 1.0, revive: Callable[[], str | None] | None = None):
        self.store, self.url = store, jobs_api_url
        self.max_jobs, self.max_attempts, self.per_user, self.interval = (max_concurrent_jobs, max_attempts,
                                                                         per_user, interval)
        self.env = driver_env(database_url, artifacts)
        self.revive = revive
        self.ray_error: str | None = None        # why Ray's Jobs API does not answer (None: it does)
        self._down_since: float | None = None
        self._client: JobSubmissionClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            self._client = JobSubmissionClient(self.url)    # asks Ray for its version: fails when Ray is down
        return self._client

    # -- talking to Ray
    def _info(self, sid: str):
        """Ray's record of a submission; Missing if Ray has none; other errors propagate."""
        try:
            return self.client.get_job_info(sid)
        except RuntimeError as e:
            if _status_code(e) == 404:
                raise Missing(sid) from None
            raise

    def _stop_driver(self, sid: str) -> None:
        """Stop a submission's driver if Ray still runs it (best effort: a 404 means it is gone)."""
        try:
            self.client.stop_job(sid)
        except RuntimeError as e:
            if _status_code(e) != 404:
                raise

    def reachable(self, *, revived: bool = False) -> bool:
        """Whether Ray's Jobs API answers now; an outage is logged once, and its end."""
        try:
            self.client.get_version()
        except Exception as e:
            if not is_transient(e):
                raise
            self._client = None
            if self.revive is not None and not revived:
                url = self.revive()                  # a dead embedded head is started again
                if url:
                    self.url = url
                    return self.reachable(revived=True)
            if self.ray_error is None:
                log.warning("Ray's Jobs API at %s does not answer (%s); queued jobs wait", self.url, e)
                self._down_since = time.monotonic()
            self.ray_error = f"Ray's Jobs API at {self.url} does not answer: {type(e).__name__}"
            return False
        if self.ray_error is not None:
            log.warning("Ray's Jobs API at %s answers again after %.0f s", self.url,
                        time.monotonic() - (self._down_since or time.monotonic()))
            self.ray_error = self._down_since = None
        return True

    # -- one round
    def submit(self, job, attempt: int, why: str = "submitted") -> str:
        """Give a running job its driver number `attempt`; a duplicate of the same submission (an
        earlier try that Ray took before the service died) counts as done."""
        sid = submission_id(job.id, attempt)
        try:
            self.client.submit_job(entrypoint=f"{sys.executable} -m service.driver {job.id} {sid}", submission_id=sid,
                                   runtime_env={"env_vars": self.env},
                                   metadata={"ladle_job": job.id, "attempt": str(attempt)})
        except RuntimeError as e:
            if not (_status_code(e) == 400 and "already exists" in str(e)):
                raise
        self.store.record_submission(job.id, sid, attempt, f"{why} to Ray as {sid} (driver {attempt}; "
                                                           f"at most {self.max_attempts} may be lost)")
        return sid

    def _timed_out(self, job) -> bool:
        limit = (job.spec or {}).get("timeout")
        if not limit or job.started_at is None:
            return False
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - started).total_seconds() > limit

    def reconcile_job(self, job) -> None:
        """One running job against Ray; transient errors propagate (the round stops there)."""
        attempt = job.attempts or 0
        if not job.ray_submission_id:                 # claimed, and the service died before recording a submit
            try:
                self._info(submission_id(job.id, attempt + 1))
            except Missing:
                self.submit(job, attempt + 1, why="claimed but never submitted (the service stopped); submitted")
                return
            self.store.record_submission(job.id, submission_id(job.id, attempt + 1), attempt + 1,
                                         "found the driver Ray started before the service stopped")
            return
        if self._timed_out(job):
            limit = job.spec["timeout"]
            if self.store.job_failed(job.id, f"timeout: the job ran longer than its spec's timeout of {limit:g} s; "
                                             "what finished is kept") is not None:
                self._stop_driver(job.ray_submission_id)
            return
        try:
            info = self._info(job.ray_submission_id)
            status, message = JobStatus(info.status), (info.message or "").strip()
        except Missing:
            status, message = None, "Ray no longer knows this job (its cluster was restarted?)"
        if status is not None and not status.is_terminal():
            return
        fresh = self.store.get_job(job.id)
        if fresh is None or fresh.status != "running" or fresh.ray_submission_id != job.ray_submission_id:
            return                                    # the driver recorded the end meanwhile
        fresh = self.store.driver_lost(job.id)
        what = f"{status.value if status else 'unknown'}: {message[:300]}"
        if fresh.driver_failures < self.max_attempts:
            if status is not None:
                self._stop_driver(job.ray_submission_id)
            self.store.event(job.id, f"driver {attempt} ended without finishing ({what}); resuming", level="warning")
            self.submit(fresh, attempt + 1, why="resubmitted")
        else:
            self.store.job_failed(job.id, f"driver ended {fresh.driver_failures} times without finishing; "
                                          f"last: {what[:500]}")

    def reconcile(self) -> None:
        running, _ = self.store.list_jobs(status="running", limit=10_000)
        for job in running:
            self.reconcile_job(job)

    def dispatch(self) -> list[str]:
        """Submit queued jobs up to the concurrency limits; return their ids."""
        _, n_running = self.store.list_jobs(status="running", limit=1)
        submitted = []
        for job in self.store.claim_queued(self.max_jobs - n_running, per_owner=self.per_user):
            try:
                self.submit(job, (job.attempts or 0) + 1)
                submitted.append(job.id)
            except Exception as e:
                if is_transient(e):                   # Ray went away meanwhile: the job waits in the queue
                    self.store.requeue(job.id, f"Ray did not take the job ({type(e).__name__})")
                    raise
                self.store.job_failed(job.id, f"Ray refused the job: {e}")
        return submitted

    def step(self) -> bool:
        """One round; False if Ray did not answer (nothing changed)."""
        with self._lock:
            if not self.reachable():
                return False
            try:
                self.reconcile()
                self.dispatch()
            except Exception as e:
                if not is_transient(e):
                    raise
                self.ray_error = f"Ray's Jobs API at {self.url}: {type(e).__name__}"
                return False
            return True

    def cancel(self, job_id: str) -> None:
        """Mark the job cancelled, then stop its Ray job (what finished stays)."""
        job = self.store.set_status(job_id, "cancelled")
        if job.ray_submission_id:
            try:
                self._stop_driver(job.ray_submission_id)
            except Exception as e:
                log.warning("stopping Ray job %s: %s", job.ray_submission_id, e)

    # -- the loop
    def _loop(self) -> None:
        wait = self.interval
        while not self._stop.is_set():
            try:
                ok = self.step()
            except Exception:
                log.exception("dispatcher round failed; trying again")
                ok = False
            wait = self.interval if ok else min(MAX_BACKOFF, max(self.interval, wait * 2))
            self._stop.wait(wait)

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self._loop, name="ladle-dispatcher", daemon=True)
        self._thread.start()
        return self

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
