"""A live API server: uvicorn on a free loopback port, in a thread, with the embedded runtime
(a real store, the session's Ray cluster, the dispatcher)."""

import threading
import time

import httpx
import pytest
import uvicorn

from api.app import create_app
from service.cluster import free_ports
from service.runtime import Runtime
from service.settings import Settings


class LiveServer:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(runtime), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.runtime.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the API server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.runtime.stop()


def make_server(tmp_path, ray_head, database_url=None, dispatch=True) -> LiveServer:
    settings = Settings(home=tmp_path, database_url=database_url, ray_address=ray_head.dashboard_url,
                        artifacts=str(tmp_path / "artifacts"))
    return LiveServer(Runtime(settings, dispatch=dispatch))


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
