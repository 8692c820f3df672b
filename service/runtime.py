"""The embedded service runtime: the store, a Ray cluster and the dispatcher, started and stopped
together. With no LADLE_RAY_ADDRESS a local Ray head is started on loopback (free ports) and
stopped on exit; with one, jobs go to that cluster's Jobs API.

The embedded head belongs to this service alone, and so do the drivers on it. Its identity is kept
in `$LADLE_HOME/ray-head.json` while it runs: a start that finds the head of a killed service there
stops it first. Whenever the head goes (the service stops, a killed service's head is found, the
head dies and is started again), the jobs that were running on it go back to the queue, with an
event, and resume after their last completed phase under the next driver; that costs none of
their `max_attempts`. Jobs on an external cluster are not touched: their drivers run on.

`ladle serve --workers N` (N > 1) runs this runtime in its control process, which serves no HTTP, and N
API processes with an `ApiRuntime` each: the store, and what the control process publishes in
`$LADLE_HOME/service.json` (`StatusFile`: whether it dispatches, Ray's last error, the Jobs API's
address, which changes when the embedded head is started again).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from service.cluster import HEAD_FILE, LocalRay, stop_orphan
from service.dispatcher import Dispatcher, artifacts_env
from service.exports import Builder, ClusterBuilder
from service import uploads
from service.settings import Settings, get_settings
from service.store import Store

log = logging.getLogger("ladle.runtime")

NODES_TTL = 30.0     # seconds a reading of the cluster's nodes is reused (the submission check)
STATUS_FILE = "service.json"      # under LADLE_HOME while `ladle serve --workers N` runs
STATUS_MAX_AGE = 1.0              # seconds an API process reuses its reading of the status file


def node_secrets(settings: Settings) -> dict[str, str]:
    """What the embedded Ray head's environment holds beyond the service's own: the database password
    (drivers get the URL without it; service.dispatcher.driver_env)."""
    password = sa.engine.make_url(settings.database_url).password
    return {"PGPASSWORD": str(password)} if password else {}


class _ClusterView:
    """What the API asks of a runtime, whichever process it runs in (both define `jobs_api_url`)."""
    settings: Settings
    store: Store | None
    jobs_api_url: str
    _nodes: tuple[float, list[dict[str, float]] | None]

    _exporter: Builder | None = None

    @property
    def exporter(self) -> Builder:
        """What builds the exports of stored models: Ray jobs with the model's resources on the cluster
        (service.exports.ClusterBuilder); an embedder or a test without Ray may set an InProcessBuilder."""
        if self._exporter is None:
            self._exporter = ClusterBuilder(lambda: self.jobs_api_url, artifacts_env(), nodes=self.nodes)
        return self._exporter

    @exporter.setter
    def exporter(self, builder: Builder) -> None:
        self._exporter = builder

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


class Runtime(_ClusterView):
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
        # what crashed processes left in the artifact store: swept beside the service, not before it starts
        threading.Thread(target=self._sweep, name="ladle-sweep", daemon=True).start()
        self.dispatcher = Dispatcher(self.store, self.jobs_api_url, database_url=s.database_url,
                                     artifacts=s.artifacts, max_concurrent_jobs=s.max_concurrent_jobs,
                                     per_user=s.max_jobs_per_user, revive=None if s.ray_address else self.revive)
        if self.dispatch:
            self.dispatcher.start()
        return self

    def _sweep(self) -> None:
        """What crashed uploads and writes left in the artifact store (see service.uploads.sweep); a store
        that cannot be swept is logged, never a reason not to start."""
        try:
            gone = uploads.sweep(self.store, self.settings.artifacts)
            temp = uploads.sweep_temp_files(self.settings.artifacts)
        except Exception as e:            # noqa: BLE001
            log.warning("could not sweep the artifact store %s: %s", self.settings.artifacts, e)
            return
        if gone or temp:
            log.info("removed %d uploads and %d temporary files that crashed processes left", len(gone), temp)

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

    def status(self) -> dict[str, Any]:
        """Whether jobs are dispatched, why Ray's Jobs API does not answer (None: it does), and its address."""
        d = self.dispatcher
        return {"dispatching": d is not None and d.is_running(), "ray_error": d.ray_error if d is not None else None,
                "jobs_api_url": self.jobs_api_url}

    def cancel(self, job_id: str) -> None:
        self.dispatcher.cancel(job_id)

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


class StatusFile:
    """`Runtime.status()` of a control process, kept in a file for its API processes: written (atomically)
    when it changes, read by the API processes at most every STATUS_MAX_AGE seconds."""

    def __init__(self, path: Path):
        self.path = path
        self._read: tuple[float, dict[str, Any]] = (-STATUS_MAX_AGE, {})

    def publish(self, runtime: Runtime, stop: threading.Event, every: float = 0.5) -> None:
        """Write the runtime's status now and whenever it changes, until `stop` is set; then remove the file."""
        last = None
        try:
            while True:
                now = dict(runtime.status(), pid=os.getpid())
                if now != last:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(now))
                    tmp.replace(self.path)
                    last = now
                if stop.wait(every):
                    return
        finally:
            self.path.unlink(missing_ok=True)

    def read(self) -> dict[str, Any]:
        """The last published status ({} while there is none)."""
        when, status = self._read
        if time.monotonic() - when >= STATUS_MAX_AGE:
            try:
                status = json.loads(self.path.read_text())
            except (OSError, ValueError):
                status = {}
            self._read = (time.monotonic(), status)
        return status


class ApiRuntime(_ClusterView):
    """The runtime of one API process of `ladle serve --workers N`: the store, no Ray head and no
    dispatching; the dispatcher's state and the Jobs API's address come from the control process's
    status file. A job is cancelled here as by the dispatcher (its status, then its Ray job stopped)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.store: Store | None = None
        self.status_file = StatusFile(self.settings.home / STATUS_FILE)
        self._nodes = (-NODES_TTL, None)

    def start(self) -> ApiRuntime:
        self.store = Store(self.settings.database_url, migrate=False)     # the control process migrated it
        return self

    def stop(self) -> None:
        if self.store is not None:
            self.store.engine.dispose()

    @property
    def jobs_api_url(self) -> str:
        return self.settings.ray_address or self.status_file.read().get("jobs_api_url") or ""

    def status(self) -> dict[str, Any]:
        published = self.status_file.read()
        return {"dispatching": bool(published.get("dispatching")), "ray_error": published.get("ray_error"),
                "jobs_api_url": self.jobs_api_url}

    def cancel(self, job_id: str) -> None:
        s = self.settings
        Dispatcher(self.store, self.jobs_api_url, database_url=s.database_url, artifacts=s.artifacts).cancel(job_id)
