"""The API in-process (FastAPI's TestClient on a temp SQLite store, no Ray: exports are built in-process),
and a live API server:
uvicorn on a free loopback port, in a thread, with the embedded runtime (a real store, the session's
Ray cluster, the dispatcher)."""

import gc

import pytest
from fastapi.testclient import TestClient

from api.app import API_PREFIX, create_app
from api.server import BackgroundServer
from service.dispatcher import Dispatcher
from service.exports import InProcessBuilder
from service.runtime import Runtime
from service.settings import Settings
from service.store import Store

NO_RAY = "http://127.0.0.1:9"        # nothing listens there: the cluster's nodes are unknown


def in_process(tmp_path, auth: str, data_roots, url: str | None = None):
    """The app in-process on a fresh SQLite store (or the database at `url`), without Ray, with
    LADLE_AUTH=`auth` (see `api`); specs may read under `data_roots` (the session's temp folder)."""
    url = url or f"sqlite:///{tmp_path / 'ladle.db'}"
    settings = Settings(home=tmp_path, database_url=url, ray_address=NO_RAY, artifacts=str(tmp_path / "artifacts"),
                        auth=auth, data_roots=data_roots)
    runtime = Runtime(settings, dispatch=False)
    runtime.store = Store(url)
    runtime.dispatcher = Dispatcher(runtime.store, NO_RAY, database_url=url, artifacts=settings.artifacts)
    runtime.exporter = InProcessBuilder()       # no cluster: exports are built in the test's process
    # Host localhost: with auth off the app serves loopback names only
    with TestClient(create_app(runtime), base_url=f"http://localhost{API_PREFIX}") as client:
        client.runtime, client.store = runtime, runtime.store
        yield client
    runtime.store.engine.dispose()
    gc.unfreeze()           # the app's start-up froze the test session's objects (see api.app)


@pytest.fixture
def api(tmp_path, data_roots):
    """The app in-process on a fresh SQLite store, without Ray, with auth off (as `ladle demo` on a laptop):
    jobs are stored and never run (its dispatcher is never started; cancelling a queued job needs no Ray).
    `api.runtime` and `api.store` are the app's own; paths are relative to /api/v1. `api_auth`: the same
    with auth on."""
    yield from in_process(tmp_path, "off", data_roots)


def make_server(tmp_path, ray_head, database_url=None, dispatch=True, auth="auto") -> BackgroundServer:
    """A live server on loopback (so LADLE_AUTH=auto is off; auth="on" turns it on). Specs may read under the
    session's pytest temp folder (LADLE_DATA_ROOTS, set by tests/conftest.py's autouse `data_roots`)."""
    settings = Settings(home=tmp_path, database_url=database_url, ray_address=ray_head.dashboard_url,
                        artifacts=str(tmp_path / "artifacts"), auth=auth)
    return BackgroundServer(Runtime(settings, dispatch=dispatch))


class StoredOnlyServer(BackgroundServer):
    """A live server on loopback over a temp SQLite store, without Ray (auth off): jobs are stored and never
    run (its dispatcher is never started); `.store` is its store once started."""

    @property
    def store(self) -> Store:
        return self.runtime.store


def stored_only_server(tmp_path, *, cluster_exports: bool = False) -> StoredOnlyServer:
    """Exports are built in the server's process, unless `cluster_exports` (as the service does: on the
    cluster, which is not there)."""
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'ladle.db'}", ray_address=NO_RAY,
                        artifacts=str(tmp_path / "artifacts"), auth="off")
    runtime = Runtime(settings, dispatch=False)
    if not cluster_exports:
        runtime.exporter = InProcessBuilder()
    return StoredOnlyServer(runtime)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request, ray_head, tmp_path_factory):
    """A server that runs jobs, on SQLite or on PostgreSQL."""
    tmp = tmp_path_factory.mktemp("api")
    url = None
    if request.param == "postgres":
        from tests.conftest import _truncate
        _truncate(request.getfixturevalue("pg_store"))
        url = request.getfixturevalue("pg_url")
    with make_server(tmp, ray_head, url) as server:
        yield server


@pytest.fixture
def api_auth(tmp_path, data_roots):
    """`api` with auth on (LADLE_AUTH=on): every route but /health and /me needs a bearer token."""
    yield from in_process(tmp_path, "on", data_roots)
