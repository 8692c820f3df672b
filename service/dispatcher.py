"""The dispatcher: submits queued jobs to Ray as Ray jobs and keeps the DB in step with Ray.

Every `interval` seconds: reconcile the running jobs with Ray's job states, then submit queued
jobs (oldest first) up to `max_concurrent_jobs`. A job's first Ray submission id is the job id;
a job whose driver died (Ray says FAILED/STOPPED while the DB still says running) or that Ray no
longer knows (Ray restarted) is submitted again as `<job id>-r<n>`, and its new driver resumes it
from the last completed phase, up to `max_attempts` drivers in all.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from ray.job_submission import JobStatus, JobSubmissionClient

from service.store import Store

log = logging.getLogger("ladle.dispatcher")

# The object store's endpoint and credentials in the standard variables botocore (s3fs) reads: the
# ones set where the dispatcher runs go to every driver, and through the Ray job's runtime_env to its
# actors on every node, so drivers and workers reach the same s3:// artifacts as the API. Unset ones
# are not sent: nodes with their own credentials (an instance or pod role) need none of these.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def driver_env(database_url: str, artifacts: str) -> dict[str, str]:
    """What a driver and its workers need to reach the store and the artifacts."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update({"LADLE_DATABASE_URL": database_url, "LADLE_ARTIFACTS": artifacts,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    return env


class Dispatcher:
    def __init__(self, store: Store, jobs_api_url: str, *, database_url: str, artifacts: str,
                 max_concurrent_jobs: int = 2, max_attempts: int = 3, interval: float = 1.0):
        self.store, self.url = store, jobs_api_url
        self.max_jobs, self.max_attempts, self.interval = max_concurrent_jobs, max_attempts, interval
        self.env = driver_env(database_url, artifacts)
        self._client: JobSubmissionClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            self._client = JobSubmissionClient(self.url)
        return self._client

    # -- one round
    def submit(self, job) -> str:
        attempt = (job.attempts or 0) + 1
        submission_id = job.id if attempt == 1 else f"{job.id}-r{attempt}"
        self.client.submit_job(entrypoint=f"{sys.executable} -m service.driver {job.id}",
                               submission_id=submission_id, runtime_env={"env_vars": self.env},
                               metadata={"ladle_job": job.id, "attempt": str(attempt)})
        self.store.update_job(job.id, ray_submission_id=submission_id, attempts=attempt)
        self.store.recorder(job.id).event(f"submitted to Ray as {submission_id} (driver {attempt} of "
                                          f"at most {self.max_attempts})")
        return submission_id

    def reconcile(self) -> None:
        """Running jobs whose Ray job ended without the driver recording an end: resubmit or fail."""
        running, _ = self.store.list_jobs(status="running", limit=10_000)
        for job in running:
            if not job.ray_submission_id:
                continue
            try:
                info = self.client.get_job_info(job.ray_submission_id)
                status, message = info.status, info.message or ""
            except RuntimeError:          # Ray does not know it (the cluster was restarted)
                status, message = None, "Ray no longer knows this job (cluster restarted?)"
            if status is not None and not JobStatus(status).is_terminal():
                continue
            fresh = self.store.get_job(job.id)
            if fresh is None or fresh.status != "running":
                continue                  # the driver recorded the end meanwhile
            if status == JobStatus.STOPPED and fresh.status == "cancelled":
                continue
            if (fresh.attempts or 0) < self.max_attempts:
                self.store.recorder(job.id).event(f"driver {fresh.attempts} ended without finishing "
                                                  f"({status or 'unknown'}: {message.strip()[:300]}); resuming",
                                                  level="warning")
                self.submit(fresh)
            else:
                self.store.job_failed(job.id, f"driver ended {self.max_attempts} times without finishing; "
                                              f"last: {status or 'unknown'}: {message.strip()[:500]}")

    def dispatch(self) -> list[str]:
        """Submit queued jobs up to the concurrency limit; return their ids."""
        _, n_running = self.store.list_jobs(status="running", limit=1)
        free = self.max_jobs - n_running
        if free <= 0:
            return []
        submitted = []
        for job in self.store.claim_queued(free):
            try:
                self.submit(job)
                submitted.append(job.id)
            except Exception as e:        # Ray refused: the job fails with the reason
                self.store.job_failed(job.id, f"could not submit to Ray: {e}")
        return submitted

    def step(self) -> None:
        with self._lock:
            self.reconcile()
            self.dispatch()

    def cancel(self, job_id: str) -> None:
        """Mark the job cancelled, then stop its Ray job (what finished stays)."""
        job = self.store.set_status(job_id, "cancelled")
        if job.ray_submission_id:
            try:
                self.client.stop_job(job.ray_submission_id)
            except RuntimeError as e:
                log.warning("stopping Ray job %s: %s", job.ray_submission_id, e)

    # -- the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("dispatcher round failed; trying again")
            self._stop.wait(self.interval)

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self._loop, name="ladle-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
