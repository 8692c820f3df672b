"""One fixture per real resource: a temp SQLite per test, a PostgreSQL database per session, one
Ray cluster per session (started with `ray start`, on loopback, 2 CPUs)."""

import contextlib
import ctypes
import os
import signal
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

# Every Ray process stays on loopback on this machine; Ray 2.60 clients use token auth.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# One compute thread per process unless the code under test asks for more (an ingredient sets its
# cpus_per_ingredient with torch.set_num_threads): make test runs two test processes on two cores, and
# each also starts Ray workers, drivers and servers, so OpenMP's default (a thread per core in every
# process) oversubscribes the cores; measured here, the workers and pipeline tests took 86 s with it and
# 56 s without it. Set before torch is imported; inherited by every process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

def dies_with_the_tests() -> None:
    """`preexec_fn` of every long-lived process a test starts (ladle serve/run/demo, moto): the kernel
    sends it SIGTERM when the test process dies, even by SIGKILL, so a killed test run leaves no service
    behind (SIGTERM stops a service with its Ray head, as a user's would)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1          # prctl(2)
PG_ADMIN_URL = os.environ.get("LADLE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# The dashboard tests' screenshots (a folder that outlives the run; printed at its end)
SCREENSHOTS = Path(os.environ.get("LADLE_SCREENSHOTS", Path(__file__).resolve().parents[1] / ".ladle" / "screenshots"))
TABLES = ("metrics", "events", "model_edges", "models", "runs", "phases", "jobs", "tokens")


@contextlib.contextmanager
def fresh_pg_database():
    """A new, empty PostgreSQL database (its URL), dropped on leaving."""
    if os.environ.get("LADLE_SKIP_POSTGRES") == "1":
        pytest.skip("LADLE_SKIP_POSTGRES=1")
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"ladle_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({e}); set LADLE_SKIP_POSTGRES=1 to skip")
    try:
        yield sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for the test session, dropped at the end."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def pg_store(pg_url):
    from service.store import Store
    store = Store(pg_url)           # created and migrated with Alembic
    yield store
    store.engine.dispose()


def _truncate(store):
    with store.engine.begin() as c:
        c.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """A migrated, empty store on each real backend."""
    from service.store import Store
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'ladle.db'}")
        yield s
        s.engine.dispose()
    else:
        s = request.getfixturevalue("pg_store")
        _truncate(s)
        yield s


@pytest.fixture(scope="session")
def ray_head():
    """A local Ray head (dashboard + Jobs API) for the session, joined by this process as a client."""
    import ray

    from service.cluster import LocalRay
    head = LocalRay(num_cpus=2).start()
    ray.init(address=head.address, log_to_driver=False)
    yield head
    ray.shutdown()
    head.stop()


@pytest.fixture(scope="session", autouse=True)
def data_roots(tmp_path_factory):
    """The data roots of every test's settings (service.access): the session's pytest temp folder, where the
    tests make their datasets, checkpoints and hf: folders. Through LADLE_DATA_ROOTS, so that parse_spec
    without a context (get_settings()) and every Settings() see it; the API fixtures also pass it explicitly."""
    import json

    from service.settings import get_settings
    roots = [tmp_path_factory.getbasetemp()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADLE_DATA_ROOTS", json.dumps([str(r) for r in roots]))
        get_settings.cache_clear()
        yield roots
    get_settings.cache_clear()


def pytest_terminal_summary(terminalreporter):
    shots = sorted(SCREENSHOTS.glob("*.png")) if SCREENSHOTS.is_dir() else []
    if shots:
        terminalreporter.write_line(f"dashboard screenshots ({len(shots)}): {SCREENSHOTS}")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny LLaMA trained briefly on a small corpus, saved as an `hf:` folder with its tokenizer, and a
    text file of that corpus: (arch, text path)."""
    from tests.tiny_lm import CORPUS, pretrained_folder
    root = tmp_path_factory.mktemp("tiny_lm")
    text = root / "corpus.txt"
    text.write_text(CORPUS * 2)
    return pretrained_folder(root / "llama"), str(text)


@pytest.fixture
def marker_modules(tmp_path, monkeypatch):
    """Two importable modules, ladle_marker_allowed and ladle_marker_denied, that leave a marker file when
    imported (a test proves that validating a spec naming them imports neither): {module: marker path}."""
    import sys
    folder = tmp_path / "site-packages"
    folder.mkdir()
    markers = {}
    for name in ("ladle_marker_allowed", "ladle_marker_denied"):
        markers[name] = tmp_path / f"{name}.imported"
        (folder / f"{name}.py").write_text(
            f"import pathlib, torch\npathlib.Path({str(markers[name])!r}).write_text('imported')\n"
            "def build(num_classes):\n    return torch.nn.Linear(64, num_classes)\n")
    monkeypatch.syspath_prepend(str(folder))
    yield markers
    for name in markers:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is far faster than several fighting over busy cores (a module asks
    for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
