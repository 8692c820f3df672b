"""The REST API, the SDK and the CLI against a live server with real Ray and real databases."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.client import Client, Conflict, InvalidSpec, NotFound, Unauthorized
from tests.api.conftest import make_server
from workers.checkpoint import load

pytestmark = pytest.mark.slow
LADLE = str(Path(sys.executable).with_name("ladle"))
JOB = {"name": "api", "dense": {"epochs": 3}, "prune": {"target_sparsity": 0.75, "phases": 2},
       "retrain": {"epochs": 1}, "soup": {"ingredients": 2}}


@pytest.fixture(scope="module")
def finished(live):
    """One job run to the end through the SDK."""
    with Client(live.url) as c:
        job = c.submit(JOB)
        assert job["status"] == "queued"
        return c.wait(job["id"], progress=False, poll=0.5, timeout=300)


def test_sdk_submit_wait_phases_lineage_metrics_download(live, finished, tmp_path):
    assert finished["status"] == "succeeded", finished["error"]
    with Client(live.url) as c:
        phases = c.phases(finished["id"])
        assert [p["index"] for p in phases] == [0, 1, 2]
        assert phases[2]["sparsity"] == pytest.approx(0.75, abs=1e-3)
        # what the job list shows: the last phase's sparsity and its best model (soup or ingredient)
        assert finished["sparsity"] == phases[2]["sparsity"]
        assert finished["best_accuracy"] == max(phases[2]["soup_accuracy"], *phases[2]["ingredient_accuracies"])
        lin = c.lineage(finished["final_model_id"])
        assert len(lin["nodes"]) == 1 + 2 * 4 and len(lin["edges"]) == 2 * 5
        assert {e["kind"] for e in lin["edges"]} == {"pruned_from", "retrained_from", "averaged_from"}
        rows = c.metrics(finished["id"], name="train_loss")
        assert {r["run"] for r in rows} == {"dense", "phase1/ingredient0", "phase1/ingredient1",
                                            "phase2/ingredient0", "phase2/ingredient1"}
        model = c.model(finished["final_model_id"])
        path = c.download(finished["final_model_id"], tmp_path / "soup.safetensors")
    ckpt = load(path)
    zeros = sum(int((ckpt.state[n] == 0).sum()) for n in ckpt.masks)
    total = sum(m.numel() for m in ckpt.masks.values())
    assert zeros / total == pytest.approx(model["sparsity"], abs=1e-9)
    assert path.stat().st_size == model["size_bytes"]


def ladle(*args, live):
    return subprocess.run([LADLE, *args, "--url", live.url], capture_output=True, text=True, timeout=600)


def test_cli_with_json(live, finished, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(dict(JOB, name="cli-json")))
    r = ladle("submit", str(spec), "--wait", "--json", live=live)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded"
    r = ladle("status", job["id"], "--json", live=live)
    assert [p["index"] for p in json.loads(r.stdout)["phases"]] == [0, 1, 2]
    r = ladle("lineage", job["final_model_id"], "--json", live=live)
    assert len(json.loads(r.stdout)["nodes"]) == 9
    out = tmp_path / "m.safetensors"
    r = subprocess.run([LADLE, "download", job["final_model_id"], "-o", str(out), "--url", live.url],
                       capture_output=True, text=True)
    assert r.returncode == 0 and load(out).meta["kind"] == "soup"
    r = ladle("lineage", job["final_model_id"], live=live)           # the human tree
    assert "averaged_from" in r.stdout and "pruned_from" in r.stdout
    r = ladle("status", "no-such-job", live=live)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_search_results_through_the_sdk_and_cli(live):
    spec = dict(JOB, name="searched", prune={"target_sparsity": 0.5, "phases": 1},
                search={"space": {"schedule": {"choice": ["llr", "clr"]}, "lr": {"loguniform": [0.01, 0.2]}},
                        "trials": 3, "scheduler": "fifo"})
    with Client(live.url) as c:
        job = c.wait(c.submit(spec)["id"], progress=False, poll=0.5, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        rows = c.search(job["id"])
    assert [r["trial"] for r in rows] == ["trial0", "trial1", "trial2"] and {r["phase"] for r in rows} == {1}
    assert rows[0]["schedule"] == "llr" and all(r["epochs_run"] == 1 and not r["stopped_early"] for r in rows)
    [chosen] = [r for r in rows if r["chosen"]]
    assert chosen["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    r = ladle("status", job["id"], live=live)
    assert r.returncode == 0 and "schedule search" in r.stdout and f"{chosen['trial']} *" in r.stdout
    r = ladle("status", job["id"], "--json", live=live)
    assert json.loads(r.stdout)["search"] == rows


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
])
def test_bad_input_is_422_naming_the_field_and_stores_nothing(live, body, field):
    before = httpx.get(f"{live.url}/api/v1/jobs").json()["count"]
    r = httpx.post(f"{live.url}/api/v1/jobs", json=body)
    assert r.status_code == 422
    assert any(e["loc"][:len(field)] == field for e in r.json()["detail"]), r.json()
    assert httpx.get(f"{live.url}/api/v1/jobs").json()["count"] == before
    with Client(live.url) as c, pytest.raises(InvalidSpec, match=".".join(field[1:])):
        c.submit(body)


def test_unknown_ids_404_and_cancel_finished_409(live, finished):
    with Client(live.url) as c:
        for call in (lambda: c.job("nope"), lambda: c.phases("nope"), lambda: c.model("nope"),
                     lambda: c.lineage("nope"), lambda: c.cancel("nope")):
            with pytest.raises(NotFound):
                call()
        with pytest.raises(Conflict, match="already succeeded"):
            c.cancel(finished["id"])


def test_idempotency_key_creates_one_job(live):
    with Client(live.url) as c:
        a = c.submit(dict(JOB, name="idem"), idempotency_key="same-key")
        b = c.submit(dict(JOB, name="idem"), idempotency_key="same-key")
        assert a["id"] == b["id"]
        c.cancel(a["id"])


def test_list_filters_and_paginates(live, finished):
    r = httpx.get(f"{live.url}/api/v1/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert r["count"] >= 1 and len(r["data"]) == 1 and r["data"][0]["status"] == "succeeded"
    assert httpx.get(f"{live.url}/api/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_health_and_cluster(live):
    assert httpx.get(f"{live.url}/api/v1/health").json() == {"status": "ok", "database": "ok"}
    cluster = httpx.get(f"{live.url}/api/v1/cluster").json()
    assert cluster["resources_total"]["CPU"] == 2 and cluster["nodes"][0]["ip"] == "127.0.0.1"


def test_event_stream_ends_with_the_job(live, finished):
    with httpx.stream("GET", f"{live.url}/api/v1/jobs/{finished['id']}/events/stream", timeout=30) as r:
        text = "".join(r.iter_text())
    assert "event: event" in text and "job succeeded" in text and "event: end" in text


def test_auth(ray_head, tmp_path):
    with make_server(tmp_path, ray_head, dispatch=False) as server:
        store = server.runtime.store
        _, alice = store.create_token("alice")
        _, bob = store.create_token("bob")
        _, admin = store.create_token("root", admin=True)
        with pytest.raises(Unauthorized):
            Client(server.url).jobs()
        with pytest.raises(Unauthorized):
            Client(server.url, "ladle_wrong").jobs()
        job = Client(server.url, alice).submit(JOB)
        assert job["owner"] == "alice"
        with pytest.raises(NotFound):
            Client(server.url, bob).job(job["id"])
        with pytest.raises(NotFound):
            Client(server.url, bob).cancel(job["id"])
        assert Client(server.url, bob).jobs()["count"] == 0
        assert Client(server.url, admin).jobs()["count"] == 1
        assert Client(server.url, admin).job(job["id"])["id"] == job["id"]
        assert httpx.get(f"{server.url}/api/v1/health").status_code == 200     # liveness needs no token


def test_a_missing_dataset_is_a_422_that_names_the_field_and_the_package(live, monkeypatch, tmp_path):
    import workers.data
    monkeypatch.setattr(workers.data, "DEBIAN_FASHION_MNIST", tmp_path / "no-fashion")
    monkeypatch.setenv("LADLE_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("HOME", str(tmp_path))
    workers.data.load_splits.cache_clear()
    before = httpx.get(f"{live.url}/api/v1/jobs").json()["count"]
    r = httpx.post(f"{live.url}/api/v1/jobs", json={"data": {"name": "fashion_mnist"}})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"][:2] == ["body", "data"]
    assert "data.name" in err["msg"] and "apt-get install dataset-fashion-mnist" in err["msg"], err["msg"]
    assert httpx.get(f"{live.url}/api/v1/jobs").json()["count"] == before
