"""Ladle beyond one machine, on this machine: a Ray head and a second Ray node started as separate
`ray start` processes, PostgreSQL as the store and a real S3-compatible server (moto's, over HTTP
on loopback) for the artifacts, reached through s3fs as a cluster reaches S3 or MinIO.

Only the three cluster settings change against the laptop defaults (the Ray address, the artifact
URL and the database URL). The Ray nodes start with the object store's keys in their environment,
as compose and KubeRay give them from their secrets, and without its endpoint: the endpoint is set
only where the API and its dispatcher run, so a finished job shows that it reaches the driver and,
through the Ray job's runtime_env, its actors on both nodes (which write their epoch checkpoints to
S3: a failed write fails the ingredient, and the phase needs both), while the keys never travel
in a runtime_env (anyone who lists Ray jobs reads it).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from api.client import Client
from api.server import BackgroundServer
from service.cluster import LocalRay
from service.runtime import Runtime
from service.settings import Settings
from tests.conftest import _truncate
from tests.integration.test_ray import check_lineage
from tests.s3server import s3_server  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

JOB = {"name": "two-nodes", "model": {"arch": "mlp"}, "data": {"name": "digits"}, "dense": {"epochs": 2},
       "prune": {"target_sparsity": 0.75, "phases": 2}, "retrain": {"epochs": 2},
       "soup": {"ingredients": 2}, "resources": {"cpus_per_ingredient": 1}}
NODE_KEYS = {"AWS_ACCESS_KEY_ID": "ladle-test", "AWS_SECRET_ACCESS_KEY": "ladle-secret"}
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def listening_addresses(process_group: int) -> set[str]:
    """The local addresses that the processes of a process group listen on (TCP and UDP)."""
    def group(pid: str) -> int | None:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
        except OSError:
            return None
    out = subprocess.run(["ss", "-H", "-ltnup"], capture_output=True, text=True, check=True).stdout
    return {line.split()[4].rsplit(":", 1)[0] for line in out.splitlines()
            if any(group(pid) == process_group for pid in re.findall(r"pid=(\d+)", line))}


@pytest.fixture(scope="module")
def two_nodes():
    """A head (1 CPU) and a second node (1 CPU) joining it, each its own `ray start`, started with the
    object store's keys (NODE_KEYS) and no other AWS_* variable; yields (head, node)."""
    from ray.util.state import list_nodes
    with pytest.MonkeyPatch.context() as mp:
        for k in AWS_VARS:
            mp.delenv(k, raising=False)
        head = LocalRay(num_cpus=1, env=NODE_KEYS).start()
        try:
            node = LocalRay(num_cpus=1, head_address=head.address, resources='{"second_node": 1}', env=NODE_KEYS).start()
        except BaseException:
            head.stop()
            raise
    try:
        deadline = time.monotonic() + 60
        while len([n for n in list_nodes(address=head.dashboard_url) if n.state == "ALIVE"]) < 2:
            assert time.monotonic() < deadline, "the second node did not join the head"
            time.sleep(1)
        yield head, node
    finally:
        node.stop()
        head.stop()


def test_one_job_on_two_ray_nodes_with_s3_artifacts_and_postgres(two_nodes, s3_server,  # noqa: F811
                                                                  pg_url, pg_store,
                                                                 tmp_path, monkeypatch):
    import s3fs
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes, list_tasks

    head, node = two_nodes
    endpoint, access_log = s3_server
    _truncate(pg_store)
    assert "AWS_ENDPOINT_URL" not in Path(f"/proc/{node.process.pid}/environ").read_text()
    # the S3 endpoint only in this (the API's) process; the keys here too, and on the nodes
    for k, v in {"AWS_ENDPOINT_URL": endpoint, **NODE_KEYS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"ladle-{uuid.uuid4().hex[:8]}"
    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.mkdir(bucket)
    artifacts = f"s3://{bucket}/artifacts"
    settings = Settings(home=tmp_path, ray_address=head.dashboard_url, artifacts=artifacts, database_url=pg_url)

    with BackgroundServer(Runtime(settings)) as server, Client(server.url) as client:
        job = client.wait(client.submit(JOB)["id"], progress=False, timeout=240)
        assert job["status"] == "succeeded", job["error"]
        downloaded = client.download(job["final_model_id"], tmp_path / "soup.safetensors").read_bytes()

    # the driver ran on the head; the ingredients' warm actors and their training calls on both nodes
    nodes = {n.node_id: n for n in list_nodes(address=head.dashboard_url)}
    [head_id] = [i for i, n in nodes.items() if n.is_head_node]
    assert len(nodes) == 2
    info = JobSubmissionClient(head.dashboard_url).get_job_info(job["id"])
    assert info.driver_node_id == head_id
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == endpoint and "ladle-secret" not in repr(info)
    actors = list_actors(address=head.dashboard_url, filters=[("class_name", "=", "IngredientWorker")], detail=True)
    assert {a.node_id for a in actors} == set(nodes)
    runs = list_tasks(address=head.dashboard_url, filters=[("name", "=", "IngredientWorker.run")], detail=True)
    assert {t.node_id for t in runs} == set(nodes)

    # neither node (nor any worker process it started) listens beyond loopback
    for ray_node in (head, node):
        assert listening_addresses(ray_node.process.pid) <= {"127.0.0.1", "[::ffff:127.0.0.1]"}

    # every model of the lineage is a checkpoint in the bucket, byte for byte what the store records
    lineage = check_lineage(pg_store, job["id"], phases=2, ingredients=2)
    for m in lineage["nodes"]:
        assert m.uri.startswith(f"{artifacts}/jobs/{job['id']}/"), m.uri
        data = s3.cat_file(m.uri)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (m.size_bytes, m.sha256)
    final = pg_store.get_model(job["final_model_id"])
    assert hashlib.sha256(downloaded).hexdigest() == final.sha256     # the API streamed it from S3

    # each ingredient's worker wrote epoch checkpoints to S3 over HTTP; the driver removed them at the end
    log = access_log.read_text(errors="replace")
    written = set(re.findall(rf"PUT /{bucket}/artifacts/jobs/{job['id']}/(\S+)\.epoch\.safetensors", log))
    assert written == {f"phase{p}/ingredient{i}" for p in (1, 2) for i in (0, 1)}, written
    assert not [k for k in s3.find(bucket) if k.endswith(".epoch.safetensors")]
