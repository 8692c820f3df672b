"""The REST API's contract, in-process (FastAPI's TestClient on a temp SQLite store, no Ray): what a
client is told for bad input, unknown ids, finished jobs, repeated submissions, lists, tokens, the
health check and the event stream. Jobs are made to end through the store."""

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from api.client import Client, Conflict, InvalidSpec, NotFound, Unauthorized
from tests.api.conftest import NO_RAY

JOB = {"name": "api", "dense": {"epochs": 3}, "prune": {"target_sparsity": 0.75, "phases": 2},
       "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}


def sdk(api: TestClient, token: str | None = None, **kw) -> Client:
    """The Python SDK over a TestClient of the in-process app (`kw`: the TestClient's options)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(http=TestClient(api.app, base_url="http://localhost/api/v1", headers=headers, **kw))


def submit(api, name="job", token=None, **headers) -> str:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = api.post("/jobs", json=dict(JOB, name=name), headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def end(store, job_id, status) -> None:
    """Run the job (as the dispatcher claims it) and end it as its driver would."""
    assert [j.id for j in store.claim_queued(1)] == [job_id]
    if status == "succeeded":
        store.job_succeeded(job_id, uuid.uuid4().hex)
    else:
        store.job_failed(job_id, "x")


def count(api, **headers) -> int:
    return api.get("/jobs", headers=headers).json()["count"]


@pytest.mark.parametrize("body,field", [
    ({"prune": {"target_sparsity": 1.0}}, ["body", "prune", "target_sparsity"]),
    ({"prune": {"phases": 0}}, ["body", "prune", "phases"]),
    ({"model": {"arch": "resnet9000"}}, ["body", "model", "arch"]),
    ({"data": {"name": "imagenet"}}, ["body", "data", "name"]),
    ({"data": {"name": "npz", "path": "/no/such.npz"}}, ["body", "data"]),
    ({"soup": {"ingredients": 1000}}, ["body", "soup", "ingredients"]),
    ({"retrain": {"epochs": 0}}, ["body", "retrain", "epochs"]),
    ({"search": {"space": {"momentum": {"choice": [0.9]}}}}, ["body", "search", "space", "momentum"]),
    ({"search": {"space": {"lr": {"loguniform": [-1, 0.1]}}}}, ["body", "search", "space", "lr"]),
    ({"search": {"space": {"schedule": {"choice": []}}}}, ["body", "search", "space", "schedule"]),
    ({"timeout": 0}, ["body", "timeout"]),
    ({"dense": {"optimizer": "adam"}}, ["body", "dense", "optimizer"]),
    ({"dense": {"optimizer": "sfw", "sfw": {"k": 2}}}, ["body", "dense", "sfw", "k"]),
    ({"dense": {"optimizer": "sfw", "sfw": {"constraint": "l3"}}}, ["body", "dense", "sfw", "constraint"]),
    # more than any node of the cluster (2 CPUs, no GPU) has: it could never be scheduled
    ({"resources": {"cpus_per_ingredient": 64}}, ["body", "resources"]),
    ({"resources": {"gpus_per_ingredient": 1}}, ["body", "resources"]),
])
def test_bad_input_is_422_naming_the_field_and_stores_nothing(api, body, field):
    api.runtime._nodes = (time.monotonic(), [{"CPU": 2.0}])          # the cluster: one node, 2 CPUs
    r = api.post("/jobs", json=body)
    assert r.status_code == 422
    assert any(e["loc"][:len(field)] == field for e in r.json()["detail"]), r.json()
    with sdk(api) as c, pytest.raises(InvalidSpec, match=".".join(field[1:])):
        c.submit(body)
    assert count(api) == 0


def test_resources_are_checked_against_the_cluster_when_it_answers(api):
    """A job that fits a node is queued; without an answer from Ray nothing is refused."""
    api.runtime._nodes = (time.monotonic(), [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    ok = {"resources": {"cpus_per_ingredient": 8, "gpus_per_ingredient": 1}}
    assert api.post("/jobs", json=ok).status_code == 201
    r = api.post("/jobs", json={"resources": {"cpus_per_ingredient": 9}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "resources"], r.text
    api.runtime._nodes = (time.monotonic(), None)                        # Ray does not answer
    assert api.post("/jobs", json={"resources": {"cpus_per_ingredient": 64}}).status_code == 201
    assert count(api) == 2


def test_a_missing_dataset_is_a_422_that_names_the_field_and_the_package(api, monkeypatch, tmp_path):
    import workers.data
    monkeypatch.setattr(workers.data, "DEBIAN_FASHION_MNIST", tmp_path / "no-fashion")
    monkeypatch.setenv("LADLE_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("HOME", str(tmp_path))
    r = api.post("/jobs", json={"data": {"name": "fashion_mnist"}})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"][:2] == ["body", "data"]
    assert "data.name" in err["msg"] and "apt-get install dataset-fashion-mnist" in err["msg"], err["msg"]
    assert count(api) == 0


@pytest.mark.parametrize("method,path", [
    ("GET", "/jobs/nope"), ("GET", "/jobs/nope/phases"), ("GET", "/jobs/nope/runs"), ("GET", "/jobs/nope/search"),
    ("GET", "/jobs/nope/metrics"), ("GET", "/jobs/nope/events"), ("GET", "/jobs/nope/events/stream"),
    ("POST", "/jobs/nope/cancel"), ("GET", "/models/nope"), ("GET", "/models/nope/lineage"),
    ("GET", "/models/nope/download"),
])
def test_unknown_ids_are_404_naming_them(api, method, path):
    r = api.request(method, path)
    assert r.status_code == 404 and r.json() == {"detail": f"{path.split('/')[1][:-1]} nope not found"}


def test_the_sdk_raises_not_found_for_unknown_ids(api):
    with sdk(api) as c:
        for call in (c.job, c.phases, c.model, c.lineage, c.cancel):
            with pytest.raises(NotFound, match="nope not found"):
                call("nope")


def test_cancel_stops_a_queued_job_and_a_finished_job_is_409(api):
    ok, failed, queued = (submit(api, name) for name in ("ok", "failed", "queued"))
    end(api.store, ok, "succeeded")
    end(api.store, failed, "failed")
    with sdk(api) as c:
        with pytest.raises(Conflict, match="already succeeded"):
            c.cancel(ok)
        with pytest.raises(Conflict, match="already failed"):
            c.cancel(failed)
        assert [c.job(ok)["status"], c.job(failed)["status"]] == ["succeeded", "failed"]   # unchanged
        job = c.cancel(queued)
        assert job["status"] == "cancelled" and job["finished"]
        with pytest.raises(Conflict, match="already cancelled"):
            c.cancel(queued)


def test_idempotency_key_creates_one_job_per_owner(api_auth):
    api = api_auth
    _, alice = api.store.create_token("alice")
    _, bob = api.store.create_token("bob")
    a = submit(api, "idem", alice, **{"Idempotency-Key": "same-key"})
    assert submit(api, "idem", alice, **{"Idempotency-Key": "same-key"}) == a
    with sdk(api, alice) as c:
        assert c.submit(dict(JOB, name="idem"), idempotency_key="same-key")["id"] == a
        assert c.submit(dict(JOB, name="idem"), idempotency_key="other-key")["id"] != a
    assert submit(api, "idem", bob, **{"Idempotency-Key": "same-key"}) != a     # keys are per owner
    assert count(api, Authorization=f"Bearer {alice}") == 2


def test_list_filters_by_status_and_owner_and_pages_newest_first(api_auth):
    api = api_auth
    store = api.store
    _, alice = store.create_token("alice")
    _, bob = store.create_token("bob")
    _, root = store.create_token("root", admin=True)
    owners = [alice, bob, alice, alice, bob, alice]
    ids = [submit(api, f"job{i}", token) for i, token in enumerate(owners)]
    assert [j.id for j in store.claim_queued(3)] == ids[:3]              # jobs 0-2 run
    store.job_succeeded(ids[0], uuid.uuid4().hex)
    store.job_failed(ids[1], "x")
    assert sdk(api, bob).cancel(ids[4])["status"] == "cancelled"
    status = ["succeeded", "failed", "running", "queued", "cancelled", "queued"]
    newest_first = ids[::-1]

    def page(token, **params):
        r = api.get("/jobs", params=params, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert all(j["status"] == params.get("status", j["status"]) for j in body["data"]), body
        return [j["id"] for j in body["data"]], body["count"]

    assert page(root) == (newest_first, 6)                             # an admin sees every job
    assert [page(root, limit=2, offset=o) for o in (0, 2, 4, 6)] == [
        (newest_first[0:2], 6), (newest_first[2:4], 6), (newest_first[4:6], 6), ([], 6)]
    assert page(root, limit=4, offset=3) == (newest_first[3:], 6)
    for s in set(status):
        expected = [i for i in newest_first if status[ids.index(i)] == s]
        assert page(root, status=s) == (expected, len(expected)), s
    assert page(root, status="queued", limit=1, offset=1) == ([ids[3]], 2)
    # a user sees their own jobs only, filtered and paged the same way
    mine = [i for i in newest_first if owners[ids.index(i)] == alice]
    assert page(alice) == (mine, 4)
    assert page(alice, limit=2, offset=2) == (mine[2:], 4)
    assert page(alice, status="queued") == ([ids[5], ids[3]], 2)
    assert page(bob) == ([ids[4], ids[1]], 2) and page(bob, status="running") == ([], 0)
    with sdk(api, alice) as c:
        assert [j["id"] for j in c.jobs(status="succeeded")["data"]] == [ids[0]]
    for bad, field in (({"status": "bogus"}, "status"), ({"limit": 0}, "limit"), ({"limit": 501}, "limit"),
                       ({"offset": -1}, "offset")):
        r = api.get("/jobs", params=bad, headers={"Authorization": f"Bearer {root}"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", field], r.text


def test_auth_tokens_owners_and_admins(api_auth):
    api = api_auth
    assert api.get("/me").json() == {"auth": True, "authenticated": False, "name": None, "admin": False}
    _, alice = api.store.create_token("alice")
    _, bob = api.store.create_token("bob")
    _, admin = api.store.create_token("root", admin=True)
    r = api.get("/jobs")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["detail"] == "a bearer token is required"
    with pytest.raises(Unauthorized, match="a bearer token is required"):
        sdk(api).jobs()
    with pytest.raises(Unauthorized, match="unknown or revoked token"):
        sdk(api, "ladle_wrong").jobs()
    assert api.get("/me", headers={"Authorization": "Bearer ladle_wrong"}).json() == {
        "auth": True, "authenticated": False, "name": None, "admin": False}
    assert api.get("/me", headers={"Authorization": f"Bearer {alice}"}).json() == {
        "auth": True, "authenticated": True, "name": "alice", "admin": False}
    job = sdk(api, alice).submit(JOB)
    assert job["owner"] == "alice"
    with pytest.raises(NotFound):
        sdk(api, bob).job(job["id"])
    with pytest.raises(NotFound):
        sdk(api, bob).phases(job["id"])
    with pytest.raises(NotFound):
        sdk(api, bob).cancel(job["id"])
    assert sdk(api, bob).jobs()["count"] == 0
    assert sdk(api, admin).jobs()["count"] == 1
    assert sdk(api, admin).job(job["id"])["id"] == job["id"]
    assert sdk(api, alice).job(job["id"])["status"] == "queued"          # bob's cancel changed nothing
    assert api.get("/health").status_code == 200                         # liveness needs no token
    assert api.get("/cluster").status_code == 401


def test_health_without_a_dispatcher(api):
    assert api.get("/health").json() == {"status": "ok", "database": "ok", "ray": "not dispatching"}


def test_health_is_503_when_the_database_does_not_answer(api, monkeypatch):
    def down():
        raise ConnectionRefusedError
    monkeypatch.setattr(api.store, "ping", down)
    r = api.get("/health")
    assert r.status_code == 503 and r.json() == {"detail": "database: ConnectionRefusedError"}


def test_cluster_is_503_naming_ray_when_it_does_not_answer(api):
    r = api.get("/cluster")
    assert r.status_code == 503 and r.json()["detail"].startswith(f"Ray at {NO_RAY}: "), r.text


@pytest.mark.parametrize("url", ["/jobs/a%00b", "/models/%00", "/jobs?status=%00", "/jobs/x/events?after=1%00"])
def test_a_nul_character_in_the_url_is_422(api, url):
    r = api.get(url)
    where = "query" if "?" in url and "%00" in url.split("?")[1] else "path"
    assert r.status_code == 422 and r.json() == {
        "detail": [{"loc": [where], "msg": "the URL contains a NUL character", "type": "value_error"}]}


@pytest.mark.timeout(60)                       # a stream that does not end fails here
def test_event_stream_of_a_finished_job_ends(api):
    job_id = submit(api)
    end(api.store, job_id, "succeeded")
    with api.stream("GET", f"/jobs/{job_id}/events/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    blocks = [b for b in text.split("\n\n") if b]
    kinds = [b.split("\n")[1 if b.startswith("id:") else 0] for b in blocks]
    assert kinds == ["event: event"] * (len(kinds) - 2) + ["event: job", "event: end"], kinds
    assert "job succeeded" in text and blocks[-1] == 'event: end\ndata: {"status": "succeeded"}'
    # from an event id on: only what came after it
    last = int(blocks[-3].split("\n")[0].removeprefix("id: "))
    with api.stream("GET", f"/jobs/{job_id}/events/stream", params={"after": last}) as r:
        assert [b.split("\n")[0] for b in r.read().decode().split("\n\n") if b] == ["event: job", "event: end"]


@pytest.mark.parametrize("spec,metric", [({}, "accuracy"), ({"model": {"arch": "hf:/nowhere"}}, "perplexity")])
def test_phases_serve_their_metrics_flat_with_the_columns_named_after_the_jobs_metric(api, spec, metric):
    """What a phase recorded in its metrics comes back flat beside its fields, whatever its key (a new
    metric needs no schema change), and `columns` lists the table's metrics for the job's primary metric."""
    from service.recorders import DBRecorder
    from service.records import PhaseSummary
    from service.spec import parse_spec
    job = api.store.create_job(parse_spec(dict(JOB, model={"arch": "mlp"})))
    if spec:     # an LLM job's spec as stored (hf: folders are checked at submission, not here)
        from service.orm import Job
        with api.store.tx() as s:
            s.get(Job, job.id).spec = dict(job.spec, **spec)
    rec = DBRecorder(api.store, job.id)
    rec.phase_started(0, 0.0)
    rec.phase_finished(PhaseSummary(phase=0, target_sparsity=0.0, sparsity=0.0, seconds={"total": 1.0},
                                    metrics={f"soup_{metric}": 0.5, "brand_new_metric": 7}))
    page = api.get(f"/jobs/{job.id}/phases").json()
    [phase] = page["data"]
    assert phase["index"] == 0 and phase[f"soup_{metric}"] == 0.5 and phase["brand_new_metric"] == 7
    assert "metrics" not in phase
    assert page["metric"]["name"] == metric and page["metric"]["mode"] == ("max" if metric == "accuracy" else "min")
    keys = [c["key"] for c in page["columns"]]
    assert {f"pruned_{metric}", f"soup_{metric}", f"ensemble_{metric}", "gain_over_best"} <= set(keys)
    other = "perplexit" if metric == "accuracy" else "accura"
    assert not any(other in k for k in keys)
    assert api.get(f"/jobs/{job.id}").json()["best_score"] == 0.5
