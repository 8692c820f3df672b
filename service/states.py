"""The statuses of jobs, phases and runs, and which status of a job may follow which: the one place
that says so (the ORM's CHECK constraints, the store, the driver, the API schemas, the SDK and the
CLI import it; the dashboard reads a job's `finished` flag)."""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})      # a finished job stays finished
PHASE_STATUSES = ("running", "succeeded", "failed")
RUN_STATUSES = ("running", "succeeded", "failed", "stopped")

# Which status of a job may follow which
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),    # claimed; cancelled; refused by Ray
    "running": frozenset({"queued", "succeeded", "failed", "cancelled"}),   # queued: its driver went with its head
    **{t: frozenset() for t in TERMINAL},
}


class StateError(ValueError):
    """A status change that the job's current status does not allow (a finished job stays finished)."""

    def __init__(self, job_id: str, current: str, requested: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {requested}")
        self.job_id, self.current, self.requested = job_id, current, requested


def check_transition(job_id: str, current: str, requested: str) -> bool:
    """False if the job has that status already, True if it may change to it; StateError otherwise."""
    if current == requested:
        return False
    if requested not in TRANSITIONS[current]:
        raise StateError(job_id, current, requested)
    return True
