"""Exports built on the cluster (service.exports.ClusterBuilder): a live server on the session's Ray cluster,
its dispatcher off (the jobs are stored, never run; their models are stored by the test). Each export is a
Ray job of its own that names the model and the format; the API process only submits, waits and streams.
A build still running when the client's wait runs out is a 202 with its state; asking again joins it; a
checkpoint the worker finds damaged is a 500 saying so; an export no node can hold, or a cluster that does
not answer, is a 503 saying why."""

import hashlib
import threading
from types import SimpleNamespace

import httpx
import pytest

from api.client import Client
from service import exports
from tests.api.conftest import make_server, stored_only_server
from tests.api.test_export import IMAGE_JOB, stored_cnn
from workers.export import from_sparse_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_head, tmp_path_factory):
    with make_server(tmp_path_factory.mktemp("exports"), ray_head, dispatch=False) as s:
        yield s


def stored(server, **spec) -> object:
    """A new job of IMAGE_JOB stored through the API (`spec` then written over its stored spec, as for a job
    submitted to a larger cluster), and its LeNet-5 soup stored."""
    from service.orm import Job
    r = httpx.post(f"{server.url}/api/v1/jobs", json=IMAGE_JOB, timeout=30)
    assert r.status_code == 201, r.text
    if spec:
        with server.runtime.store.tx() as s:
            job = s.get(Job, r.json()["id"])
            job.spec = {**job.spec, **spec}
    return stored_cnn(SimpleNamespace(store=server.runtime.store, runtime=server.runtime), r.json()["id"])


def ray_jobs(ray_head, model) -> dict[str, str]:
    """The export jobs Ray holds for `model`: {submission id: status}."""
    from ray.job_submission import JobSubmissionClient
    return {j.submission_id: str(j.status) for j in JobSubmissionClient(ray_head.dashboard_url).list_jobs()
            if (j.metadata or {}).get("model_uri") == model.uri[-200:]}


def test_exports_are_ray_jobs_that_concurrent_requests_join(server, ray_head, tmp_path):
    model = stored(server)
    got: list[bytes] = []

    def fetch():
        with Client(server.url) as c:
            got.append(c.export(model.id, "sparse", tmp_path / f"s{threading.get_ident()}").read_bytes())
    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert len(got) == 3 and len(set(got)) == 1
    assert from_sparse_bytes(got[0]).meta["model_id"] == model.id
    jobs = ray_jobs(ray_head, model)
    assert list(jobs.values()) == ["SUCCEEDED"] and next(iter(jobs)).startswith("ladle-export-sparse-")
    metrics = server.runtime.store.get_model(model.id).metrics
    assert metrics["sizes"]["sparse"] == len(got[0])
    assert metrics["export_sha256"]["sparse"] == hashlib.sha256(got[0]).hexdigest()
    with Client(server.url) as c:                       # cached: no new Ray job
        assert c.export(model.id, "sparse", tmp_path / "again").read_bytes() == got[0]
    assert len(ray_jobs(ray_head, model)) == 1


def test_a_build_not_done_within_the_wait_is_202_and_asking_again_joins_it(server, ray_head, tmp_path):
    pytest.importorskip("onnx")
    model = stored(server)
    r = httpx.get(f"{server.url}/api/v1/models/{model.id}/download", params={"format": "onnx", "wait": 0}, timeout=30)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] in ("pending", "running") and body["seconds"] >= 0
    assert "being built on the cluster" in body["detail"] and r.headers["retry-after"] == "1"
    seen: list[dict] = []
    with Client(server.url) as c:
        path = c.export(model.id, "onnx", tmp_path / "m.onnx", on_progress=seen.append)
    assert path.stat().st_size == server.runtime.store.get_model(model.id).metrics["sizes"]["onnx"]
    assert list(ray_jobs(ray_head, model).values()) == ["SUCCEEDED"]      # the 202's build, joined
    r = httpx.get(f"{server.url}/api/v1/models/{model.id}/download", params={"format": "onnx", "wait": float("nan")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "wait"]


def test_a_checkpoint_the_worker_finds_damaged_is_500_and_nothing_is_recorded(server, ray_head):
    model = stored(server)
    data = bytearray(open(model.uri, "rb").read())
    data[-5] ^= 1
    open(model.uri, "wb").write(bytes(data))
    r = httpx.get(f"{server.url}/api/v1/models/{model.id}/download", params={"format": "sparse"}, timeout=120)
    assert r.status_code == 500 and "does not match the store's size and sha256" in r.json()["detail"]
    assert list(ray_jobs(ray_head, model).values()) == ["FAILED"]
    assert "sizes" not in server.runtime.store.get_model(model.id).metrics
    # the failure stays the answer for a while: no second Ray job
    r = httpx.get(f"{server.url}/api/v1/models/{model.id}/download", params={"format": "sparse"}, timeout=120)
    assert r.status_code == 500 and len(ray_jobs(ray_head, model)) == 1


def test_an_export_no_node_can_hold_is_503_naming_the_cpus(server, ray_head):
    model = stored(server, resources={"cpus_per_ingredient": 64})
    r = httpx.get(f"{server.url}/api/v1/models/{model.id}/download", params={"format": "sparse"}, timeout=60)
    assert r.status_code == 503 and "no node of the cluster can run" in r.json()["detail"]
    assert "64 CPUs" in r.json()["detail"] and ray_jobs(ray_head, model) == {}


def test_without_a_cluster_an_export_is_503_and_the_dense_file_still_downloads(tmp_path):
    with stored_only_server(tmp_path, cluster_exports=True) as s:
        model = stored(s)
        assert isinstance(s.runtime.exporter, exports.ClusterBuilder)
        r = httpx.get(f"{s.url}/api/v1/models/{model.id}/download", params={"format": "sparse"}, timeout=60)
        assert r.status_code == 503 and "does not answer" in r.json()["detail"]
        r = httpx.get(f"{s.url}/api/v1/models/{model.id}/download", timeout=60)
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == model.sha256
