"""A live API server: uvicorn on a free loopback port, in a thread, with the embedded runtime
(a real store, the session's Ray cluster, the dispatcher)."""

import pytest

from api.server import BackgroundServer
from service.runtime import Runtime
from service.settings import Settings


def make_server(tmp_path, ray_head, database_url=None, dispatch=True) -> BackgroundServer:
    settings = Settings(home=tmp_path, database_url=database_url, ray_address=ray_head.dashboard_url,
                        artifacts=str(tmp_path / "artifacts"))
    return BackgroundServer(Runtime(settings, dispatch=dispatch))


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
