"""docker-compose.yml, .env.example and deploy/Dockerfile, parsed: valid against the Compose
Specification's schema, wired together (services, images, ports, health checks, start order), and
every LADLE_* variable is one the settings read."""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from sqlalchemy.engine import make_url

from service.settings import Settings
from tests.deploy.conftest import CLUSTER_SETTINGS, DEPLOY, ROOT, env_file, ladle_env_names, pinned_ray_version

LADLE_SERVICES = {"bucket", "ray-head", "ray-worker", "api"}       # the services that run the Ladle image
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_PASSWORD": "minio-secret-123",
           "RAY_AUTH_TOKEN": "ray-token", "LADLE_ADMIN_TOKEN": "ladle-admin-token-0123456789"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""
    def value(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        v = env.get(name)
        if op in (":?", "?") and (v is None or (op == ":?" and v == "")):
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and (v is None or (op == ":-" and v == "")):
            return arg
        return v or ""
    return VARIABLE.sub(value, text)


def compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), env))


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    """.env.example with its required secrets filled in, as a user's .env."""
    env = env_file(ROOT / ".env.example")
    return {**env, **SECRETS}


@pytest.fixture(scope="module")
def services(example_env) -> dict[str, dict]:
    return compose(example_env)["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_file_is_valid_against_the_compose_specification(example_env):
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose(example_env))]
    assert not errors, errors


def test_the_stack_has_its_services_one_ladle_image_and_pinned_third_party_images(services):
    assert set(services) == {"postgres", "minio", "bucket", "ray-head", "ray-worker", "api"}
    images = {services[s]["image"] for s in LADLE_SERVICES}
    assert len(images) == 1                                          # API, head and workers run one image
    for s in LADLE_SERVICES:
        assert services[s]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert (ROOT / "deploy/Dockerfile").is_file()
    for s in ("postgres", "minio"):
        image = services[s]["image"]
        assert ":" in image and not image.endswith(":latest"), image


def test_secrets_are_required_and_never_committed():
    example = env_file(ROOT / ".env.example")
    for name in SECRETS:
        assert example[name] == "", f"{name} has a value in .env.example"
        with pytest.raises(KeyError, match=name):
            compose({**example, **SECRETS, name: ""})               # compose refuses to start without it
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored


def test_every_variable_the_compose_file_reads_is_documented_in_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group("name") for m in VARIABLE.finditer(text) if m.group("name")}
    documented = set(env_file(ROOT / ".env.example"))
    assert used == documented, (used - documented, documented - used)


def test_postgres_has_a_volume_and_a_health_check(services, example_env):
    pg = services["postgres"]
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert pg["volumes"][0].split(":")[0] in compose(example_env)["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_the_object_store_is_healthy_before_its_bucket_is_made(services):
    minio = services["minio"]
    assert minio["command"][:2] == ["server", "/data"]
    assert minio["healthcheck"]["test"]
    bucket = services["bucket"]
    assert bucket["command"] == ["python", "/app/deploy/create_bucket.py"]
    assert bucket["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert bucket["restart"] == "no"
    assert environment(bucket)["LADLE_ARTIFACTS"] == environment(services["api"])["LADLE_ARTIFACTS"]
    # the bucket and the API (which forwards it to the jobs) reach MinIO's S3 API, not its console
    s3_port = minio_port(minio["command"], "--address", 9000)
    assert s3_port != minio_port(minio["command"], "--console-address", None)
    for name in ("bucket", "api"):
        endpoint = urlsplit(environment(services[name])["AWS_ENDPOINT_URL"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", s3_port), name


def minio_port(command: list[str], option: str, default: int | None) -> int | None:
    """The port of `minio server`'s `--address` (its S3 API, :9000 unless given) or `--console-address`
    ([host]:port, as `--option value` or `--option=value`)."""
    for i, arg in enumerate(command):
        if arg == option or arg.startswith(f"{option}="):
            value = command[i + 1] if arg == option else arg.split("=", 1)[1]
            return int(value.rsplit(":", 1)[1])
    return default


def test_ray_head_serves_the_jobs_api_and_workers_join_it_and_scale(services):
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    assert "--dashboard-host=0.0.0.0" in head["command"] and "--dashboard-port=8265" in head["command"]
    assert any(p.endswith(":8265:8265") for p in head["ports"])
    assert "gcs_healthz" in " ".join(head["healthcheck"]["test"])
    gcs_port = next(a.split("=")[1] for a in head["command"] if a.startswith("--port="))
    assert f"--address=ray-head:{gcs_port}" in worker["command"] and "--block" in worker["command"]
    assert worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    # `--scale ray-worker=N` needs no fixed name and no host port
    assert "container_name" not in worker and "ports" not in worker
    for s in (head, worker):
        assert s["shm_size"]                                          # Ray's object store in /dev/shm


def test_api_migrates_then_serves_with_auth_after_its_dependencies(services):
    api = services["api"]
    assert api["command"][0] == "/app/deploy/prestart.sh"
    assert api["command"][1:5] == ["ladle", "serve", "--host", "0.0.0.0"]
    assert api["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                 "bucket": {"condition": "service_completed_successfully"},
                                 "ray-head": {"condition": "service_healthy"}}
    assert "/api/v1/health" in " ".join(api["healthcheck"]["test"])
    assert any(p.endswith(":8000") for p in api["ports"])
    assert environment(api)["LADLE_ADMIN_TOKEN"] == SECRETS["LADLE_ADMIN_TOKEN"]


def test_ladle_variables_are_settings_and_the_api_is_wired_to_the_stack(services, monkeypatch):
    known = ladle_env_names()
    for name, s in services.items():
        unknown = {k for k in environment(s) if k.startswith("LADLE_")} - known
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
    api = environment(services["api"])
    assert CLUSTER_SETTINGS <= set(api)
    # the three cluster settings point at the services of this file
    db = make_url(api["LADLE_DATABASE_URL"])
    pg = environment(services["postgres"])
    assert (db.host, db.username, db.password, db.database) == ("postgres", pg["POSTGRES_USER"],
                                                               pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert api["LADLE_RAY_ADDRESS"] == "http://ray-head:8265"
    assert api["LADLE_ARTIFACTS"].startswith("s3://")
    assert urlsplit(api["AWS_ENDPOINT_URL"]).hostname == "minio"
    assert (api["AWS_ACCESS_KEY_ID"], api["AWS_SECRET_ACCESS_KEY"]) == (
        environment(services["minio"])["MINIO_ROOT_USER"], environment(services["minio"])["MINIO_ROOT_PASSWORD"])
    # the settings accept the API's environment as it is
    for k in list(os.environ):
        if k.startswith("LADLE_"):
            monkeypatch.delenv(k)
    for k, v in api.items():
        monkeypatch.setenv(k, str(v))
    s = Settings()
    assert (s.database_url, s.artifacts, s.ray_address) == (api["LADLE_DATABASE_URL"], api["LADLE_ARTIFACTS"],
                                                            api["LADLE_RAY_ADDRESS"])
    assert s.admin_token.get_secret_value() == SECRETS["LADLE_ADMIN_TOKEN"]


def test_every_ray_process_and_the_api_share_the_ray_token(services):
    for name in ("ray-head", "ray-worker", "api"):
        env = environment(services[name])
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", SECRETS["RAY_AUTH_TOKEN"]), name


def test_dockerfile_installs_the_runtime_lock_then_the_project_and_the_deploy_scripts():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11", text, re.M)           # requires-python >= 3.11
    # every package from the runtime lock with its hashes checked, then Ladle alone (nothing resolved anew)
    lock = re.search(r"^COPY requirements/runtime\.txt \./requirements/$", text, re.M)
    install = re.search(r"^RUN pip install --require-hashes -r requirements/runtime\.txt$", text, re.M)
    ladle = re.search(r"^RUN pip install --no-deps --no-build-isolation \.$", text, re.M)
    assert lock and install and ladle and lock.start() < install.start() < ladle.start()
    assert len(re.findall(r"^RUN pip install", text, re.M)) == 2
    assert (ROOT / "requirements/runtime.txt").is_file()
    assert pinned_ray_version() == "2.60.0"
    copied = re.search(r"^COPY (deploy/\S+ )+\./deploy/$", text, re.M).group(0)
    for script in ("deploy/prestart.sh", "deploy/create_bucket.py"):
        assert script in copied and (ROOT / script).is_file()
    assert os.access(DEPLOY / "prestart.sh", os.X_OK)
    assert "wget" in text                                             # KubeRay's default probes call it
    assert re.search(r"^USER ladle$", text, re.M)                     # not root


def test_ray_nodes_hold_the_credentials_that_drivers_are_not_sent(services):
    """Drivers get the database URL without its password and no object-store keys (service.dispatcher):
    every Ray node has the password (PGPASSWORD, read by libpq) and the keys the API uses."""
    api = environment(services["api"])
    for name in ("ray-head", "ray-worker"):
        env = environment(services[name])
        assert env["PGPASSWORD"] == make_url(api["LADLE_DATABASE_URL"]).password, name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (api["AWS_ACCESS_KEY_ID"],
                                                                            api["AWS_SECRET_ACCESS_KEY"]), name
