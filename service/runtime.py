"""The embedded service runtime: the store, a Ray cluster and the dispatcher, started and stopped
together. With no LADLE_RAY_ADDRESS a local Ray head is started on loopback (free ports) and
stopped on exit; with one, jobs go to that cluster's Jobs API.

The embedded head belongs to this service alone, and so do the drivers on it. Its identity is kept
in `$LADLE_HOME/ray-head.json` while it runs: a start that finds the head of a killed service there
stops it first. Whenever the head goes (the service stops, a killed service's head is found, the
head dies and is started again), the jobs that were running on it go back to the queue, with an
event, and resume after their last completed phase under the next driver; that costs none of
their `max_attempts`. Jobs on an external cluster are not touched: their drivers run on.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import sqlalchemy as sa

from service.cluster import HEAD_FILE, LocalRay, stop_orphan
from service.dispatcher import Dispatcher
from service.settings import Settings, get_settings
from service.store import Store

log = logging.getLogger("ladle.runtime")

NODES_TTL = 30.0     # seconds a reading of the cluster's nodes is reused (the submission check)


def node_secrets(settings: Settings) -> dict[str, str]:
    """What the embedded Ray head's environment holds beyond the service's own: the database password
    (drivers get the URL without it; service.dispatcher.driver_env)."""
    password = sa.engine.make_url(settings.database_url).password
    return {"PGPASSWORD": str(password)} if password else {}


class Runtime:
    def __init__(self, settings: Settings | None = None, *, num_cpus: int | None = None, dispatch: bool | None = None):
        self.settings = settings or get_settings()
        self.dispatch = self.settings.dispatch if dispatch is None else dispatch   # False: store jobs, run none
        self.num_cpus = num_cpus or os.cpu_count() or 2
        self.store: Store | None = None
        self.head: LocalRay | None = None
        self.dispatcher: Dispatcher | None = None
        self._nodes: tuple[float, list[dict[str, float]] | None] = (-NODES_TTL, None)
        self._head_lock = threading.Lock()

    @property
    def jobs_api_url(self) -> str:
        return self.settings.ray_address or (self.head.dashboard_url if self.head else "")

    @property
    def head_file(self):
        return self.settings.home / HEAD_FILE

    def _requeue_running(self, reason: str) -> list[str]:
        jobs, _ = self.store.list_jobs(status="running", limit=10_000)
        return [j.id for j in jobs if self.store.requeue(j.id, reason) is not None]

    def _start_head(self) -> None:
        self.head = LocalRay(num_cpus=self.num_cpus, state_file=self.head_file, env=node_secrets(self.settings)).start()

    def start(self) -> Runtime:
        s = self.settings
        self.store = Store(s.database_url)
        if not s.ray_address:
            orphan = stop_orphan(self.head_file)
            if orphan is not None:
                log.warning("stopped the Ray head (pid %s) that a killed service left running", orphan["pid"])
            # Whatever ran on the embedded head of an earlier start has no driver any more
            self._requeue_running("the service was stopped while the job ran")
            self._start_head()
        self.dispatcher = Dispatcher(self.store, self.jobs_api_url, database_url=s.database_url,
                                     artifacts=s.artifacts, max_concurrent_jobs=s.max_concurrent_jobs,
                                     per_user=s.max_jobs_per_user, revive=None if s.ray_address else self.revive)
        if self.dispatch:
            self.dispatcher.start()
        return self

    def revive(self) -> str | None:
        """Start the embedded head again if it died; its running jobs go back to the queue. Returns
        the new Jobs API address, or None if the head was alive (or there is none)."""
        with self._head_lock:
            if self.head is None or self.head.alive():
                return None
            log.warning("the embedded Ray head died (exit code %s); starting a new one", self.head.process.returncode)
            self.head.stop()
            self._start_head()
            self._nodes = (-NODES_TTL, None)
            self._requeue_running("the embedded Ray head died and was started again")
            return self.head.dashboard_url

    def cached_nodes(self) -> list[dict[str, float]] | None:
        """The last reading of `nodes()` if it is fresh; Ellipsis if it is not (call `nodes()`)."""
        when, nodes = self._nodes
        return nodes if time.monotonic() - when < NODES_TTL else ...

    def nodes(self) -> list[dict[str, float]] | None:
        """The resources of each alive node (read at most every NODES_TTL seconds), or None if Ray
        does not answer."""
        cached = self.cached_nodes()
        if cached is not ...:
            return cached
        from ray.util.state import list_nodes
        try:
            found = [dict(n.resources_total or {}) for n in list_nodes(address=self.jobs_api_url, timeout=5)
                     if n.state == "ALIVE"]
        except Exception:
            found = None
        self._nodes = (time.monotonic(), found)
        return found

    def stop(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.head is not None:
            # Back to the queue before the head goes: a driver that sees its workers die then can no
            # longer fail the job (the store fences a driver whose job was requeued)
            if self.store is not None:
                self._requeue_running("the service stopped while the job ran")
            self.head.stop()
        if self.store is not None:
            self.store.engine.dispose()

    def __enter__(self) -> Runtime:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
