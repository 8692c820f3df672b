"""What a deployment runs at start, run for real here: deploy/prestart.sh on SQLite and PostgreSQL,
deploy/create_bucket.py against an S3 server, LADLE_ADMIN_TOKEN through `ladle serve`, and the
object-store variables the dispatcher hands to Ray drivers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from service.cluster import LOOPBACK, free_ports
from service.dispatcher import FORWARDED_ENV, driver_env
from service.settings import Settings
from tests.conftest import dies_with_the_tests
from tests.deploy.conftest import DEPLOY, ROOT
from tests.s3server import s3_server  # noqa: F401  (a fixture: moto's S3 server)

BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any LADLE_* or AWS_* variable, plus `extra`; the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LADLE_", "AWS_"))}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request, tmp_path):
    """The URL of a database with no tables yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ladle.db'}"
        return
    if os.environ.get("LADLE_SKIP_POSTGRES") == "1":
        pytest.skip("LADLE_SKIP_POSTGRES=1")
    from tests.conftest import PG_ADMIN_URL
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"ladle_prestart_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_prestart_migrates_the_database_then_runs_the_server_command(empty_database, tmp_path):
    from alembic.script import ScriptDirectory

    from service.db import alembic_config
    cmd = ["bash", str(DEPLOY / "prestart.sh"), sys.executable, "-c", "print('serving')"]
    for _ in range(2):                                     # a restart finds the schema current
        out = subprocess.run(cmd, env=clean_env(LADLE_DATABASE_URL=empty_database), cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "serving"             # exec'd its arguments after migrating
    engine = sa.create_engine(empty_database)
    with engine.connect() as c:
        version = c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        tables = set(sa.inspect(c).get_table_names())
    engine.dispose()
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert {"jobs", "models", "model_edges", "runs", "metrics", "events", "tokens"} <= tables


def test_prestart_fails_without_running_the_server_when_the_database_is_unreachable(tmp_path):
    port = free_ports(1)[0]                                # nothing listens there
    url = f"postgresql+psycopg://ladle@{LOOPBACK}:{port}/ladle"
    script = (DEPLOY / "prestart.sh").read_text().replace("time.monotonic() + 60", "time.monotonic() + 2")
    (tmp_path / "prestart.sh").write_text(script)
    out = subprocess.run(["bash", str(tmp_path / "prestart.sh"), "echo", "serving"], capture_output=True,
                         text=True, env=clean_env(LADLE_DATABASE_URL=url), cwd=ROOT, timeout=60)
    assert out.returncode != 0 and "serving" not in out.stdout
    assert "the database does not answer" in out.stderr


def test_create_bucket_makes_the_artifacts_bucket_once(s3_server):  # noqa: F811
    import s3fs
    endpoint, _ = s3_server
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = f"ladle-{uuid.uuid4().hex[:8]}"
    for _ in range(2):                                     # idempotent: a restarted stack runs it again
        out = subprocess.run([sys.executable, str(DEPLOY / "create_bucket.py")], capture_output=True, text=True,
                             env=clean_env(LADLE_ARTIFACTS=f"s3://{bucket}/artifacts", **aws), timeout=60)
        assert out.returncode == 0, out.stderr
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint, key="k", secret="s")
    assert fs.exists(bucket)
    out = subprocess.run([sys.executable, str(DEPLOY / "create_bucket.py"), "/tmp/not-s3"], capture_output=True,
                         text=True, env=clean_env(), timeout=60)
    assert out.returncode != 0 and "not an s3:// URL" in out.stderr


def test_admin_token_setting_is_kept_as_the_admin_token(store):
    token = store.ensure_token("admin", "first-secret-0123456789", admin=True)
    assert store.ensure_token("admin", "first-secret-0123456789", admin=True).id == token.id   # restart: same row
    assert store.check_token("first-secret-0123456789").admin
    store.ensure_token("admin", "rotated-secret-0123456789", admin=True)                      # rotation
    assert store.check_token("first-secret-0123456789") is None
    assert store.check_token("rotated-secret-0123456789").name == "admin"
    assert store.has_admin_token()


def test_admin_token_must_be_long(monkeypatch):
    monkeypatch.setenv("LADLE_ADMIN_TOKEN", "short")
    with pytest.raises(ValidationError, match="admin_token"):
        Settings()


def test_ladle_serve_stores_the_admin_token_from_the_environment(tmp_path):
    port = free_ports(1)[0]
    secret = f"deploy-{uuid.uuid4().hex}"
    # no Ray: jobs are stored, not run (LADLE_DISPATCH=false), and no local head starts (an address is set)
    env = clean_env(LADLE_HOME=str(tmp_path), LADLE_ADMIN_TOKEN=secret, LADLE_DISPATCH="false",
                    LADLE_RAY_ADDRESS=f"http://{LOOPBACK}:1", LADLE_AUTH="on")
    server = subprocess.Popen([str(BIN / "ladle"), "serve", "--host", LOOPBACK, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=dies_with_the_tests)
    url = f"http://{LOOPBACK}:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "ladle serve did not come up"
            time.sleep(0.3)
        me = httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {secret}"}).json()
        assert me == {"auth": True, "authenticated": True, "name": "admin", "admin": True}
        assert httpx.get(f"{url}/jobs").status_code == 401                   # with its admin from the first start
    finally:
        server.terminate()
        server.wait(15)


def test_serve_beyond_127_0_0_1_is_refused_without_any_token(tmp_path):
    # 127.0.0.2 stands for any other address: still loopback here, should the refusal ever break
    out = subprocess.run([str(BIN / "ladle"), "serve", "--host", "127.0.0.2", "--port", str(free_ports(1)[0])],
                         env=clean_env(LADLE_HOME=str(tmp_path), LADLE_RAY_ADDRESS=f"http://{LOOPBACK}:1"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to serve" in out.stderr        # before binding anything


def test_dispatcher_hands_drivers_where_the_stores_are_but_never_a_secret(monkeypatch):
    """A Ray job's runtime_env is readable by anyone who can list Ray jobs: the object store's endpoint
    goes there, its keys and the database's password do not (the Ray nodes have them)."""
    for k in FORWARDED_ENV + ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "")                            # empty: not sent
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ladle")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minio-s3cret")
    env = driver_env("postgresql+psycopg://ladle:pg-s3cret@db/ladle", "s3://ladle/artifacts")
    assert env == {"AWS_ENDPOINT_URL": "http://minio:9000", "LADLE_DATABASE_URL": "postgresql+psycopg://ladle@db/ladle",
                   "LADLE_ARTIFACTS": "s3://ladle/artifacts", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
