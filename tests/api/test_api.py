"""The REST API, the SDK and the CLI against a live server with real Ray and real databases: jobs that
really run, and the cluster. The API's contract without Ray is in test_routes.py."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.client import Client
from service.spec import parse_spec
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
    assert [r["index"] for r in rows] == [0, 1, 2] and {r["phase"] for r in rows} == {1}
    assert rows[0]["searched"]["schedule"] == "llr" == rows[0]["config"]["schedule"] and rows[0]["default"]
    assert all(r["epochs_run"] == 1 and not r["stopped_early"] for r in rows)
    assert all(set(r["searched"]) == {"schedule", "lr"} and r["config"]["lr"] == r["searched"]["lr"] for r in rows)
    [chosen] = [r for r in rows if r["chosen"]]
    assert chosen["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    r = ladle("status", job["id"], live=live)
    assert r.returncode == 0 and "schedule search" in r.stdout and f"trial{chosen['index']} *" in r.stdout
    r = ladle("status", job["id"], "--json", live=live)
    assert json.loads(r.stdout)["search"] == rows


def test_health_says_ray_answers(live):
    assert httpx.get(f"{live.url}/api/v1/health").json() == {"status": "ok", "database": "ok", "ray": "ok"}


def test_cluster_shows_the_ray_head_and_the_jobs_waiting_and_running(ray_head, tmp_path):
    """The session's Ray cluster is one head on loopback with 2 CPUs; the job counts are the store's."""
    with make_server(tmp_path, ray_head, dispatch=False) as server:      # jobs stay where they are put
        store = server.runtime.store
        ids = [store.create_job(parse_spec({"name": f"job{i}"})).id for i in range(3)]
        assert [j.id for j in store.claim_queued(1)] == ids[:1]
        with Client(server.url) as c:
            cluster, health = c.cluster(), c.health()
    assert health == {"status": "ok", "database": "ok", "ray": "not dispatching"}
    assert cluster["address"] == ray_head.dashboard_url
    assert cluster["jobs"] == {"queued": 2, "running": 1}
    [node] = cluster["nodes"]
    assert (node["ip"], node["state"], node["head"], node["resources"]["CPU"]) == ("127.0.0.1", "ALIVE", True, 2)
    assert cluster["resources_total"]["CPU"] == 2 and not any(k.startswith("node:") for k in cluster["resources_total"])
    assert set(cluster["resources_available"]) == set(cluster["resources_total"])
    assert 0 <= cluster["resources_available"]["CPU"] <= 2


def test_a_language_model_job_runs_through_the_api_on_ray_and_reports_perplexity(live, tiny_lm):
    """A tiny LLaMA (an hf: folder) on a text file: Wanda to 2:4, two mask_lora ingredients on Ray, a
    greedy soup on validation perplexity; phases, the job and the CLI speak perplexity."""
    if live.runtime.store.engine.dialect.name != "sqlite":
        pytest.skip("one backend is enough here: tests/service/test_lm_pipeline.py runs LM jobs on both stores")
    arch, text = tiny_lm
    spec = {"name": "lm", "model": {"arch": arch}, "soup": {"ingredients": 2, "method": "greedy"},
            "data": {"name": "text", "path": text, "seq_len": 16, "calibration_samples": 8},
            "prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "wanda", "pattern": "2:4"},
            "retrain": {"epochs": 2, "params": "mask_lora", "lr": 3e-3}}
    with Client(live.url) as c:
        job = c.wait(c.submit(spec)["id"], progress=False, poll=0.5, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        phases = c.phases(job["id"])
        model = c.model(job["final_model_id"])
    assert job["metric"] == {"name": "perplexity", "mode": "min", "percent": False}
    dense, phase = phases
    assert phase["pruned_perplexity"] > dense["soup_perplexity"] > 1
    assert phase["soup_perplexity"] < phase["pruned_perplexity"] and len(phase["ingredient_perplexities"]) == 2
    assert job["best_score"] == min(phase["soup_perplexity"], *phase["ingredient_perplexities"])
    assert job["best_accuracy"] is None and model["sparsity"] == pytest.approx(0.5, abs=0.01)
    r = ladle("status", job["id"], live=live)
    assert r.returncode == 0 and "lower is better" in r.stdout and "perplexities" in r.stdout
