"""The embedded service runtime: the store, a Ray cluster and the dispatcher, started and stopped
together. With no LADLE_RAY_ADDRESS a local Ray head is started on loopback (free ports) and
stopped on exit; with one, jobs go to that cluster's Jobs API."""

from __future__ import annotations

import os

from service.cluster import LocalRay
from service.dispatcher import Dispatcher
from service.settings import Settings, get_settings
from service.store import Store


class Runtime:
    def __init__(self, settings: Settings | None = None, *, num_cpus: int | None = None, dispatch: bool | None = None):
        self.settings = settings or get_settings()
        self.dispatch = self.settings.dispatch if dispatch is None else dispatch   # False: store jobs, run none
        self.num_cpus = num_cpus or os.cpu_count() or 2
        self.store: Store | None = None
        self.head: LocalRay | None = None
        self.dispatcher: Dispatcher | None = None

    @property
    def jobs_api_url(self) -> str:
        return self.settings.ray_address or (self.head.dashboard_url if self.head else "")

    def start(self) -> Runtime:
        s = self.settings
        self.store = Store(s.database_url)
        if not s.ray_address:
            self.head = LocalRay(num_cpus=self.num_cpus).start()
        self.dispatcher = Dispatcher(self.store, self.jobs_api_url, database_url=s.database_url,
                                     artifacts=s.artifacts, max_concurrent_jobs=s.max_concurrent_jobs)
        if self.dispatch:
            self.dispatcher.start()
        return self

    def stop(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.head is not None:
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
