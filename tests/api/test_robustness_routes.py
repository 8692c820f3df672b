"""GET /models/{id}/robustness in-process (TestClient on a temp SQLite store, no Ray): the curve a real
local pipeline run measured on its dense model, what a model without one gets, and who may see it."""

import pytest

from api.client import NotFound
from service.artifacts import ArtifactStore
from service.executors import SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder
from service.spec import parse_spec
from tests.api.test_routes import sdk
from workers.robustness import SPARSITIES

JOB = {"name": "robust", "data": {"batch_size": 64}, "dense": {"epochs": 3, "lr": 0.1},
       "prune": {"target_sparsity": 0.5, "phases": 1}, "retrain": {"epochs": 1},
       "soup": {"ingredients": 2, "min_ingredients": 2}}


def models_of(api, job_id):
    phases = api.store.completed_phases(job_id)
    return [api.store.get_model(p.model_id) for p in phases]


def test_the_dense_models_curve_is_served_to_its_owner_only(api_auth, tmp_path):
    api = api_auth
    _, alice = api.store.create_token("alice")
    _, bob = api.store.create_token("bob")
    _, root = api.store.create_token("root", admin=True)
    job = sdk(api, alice).submit(JOB)
    spec = parse_spec(JOB)
    Pipeline(spec, SequentialExecutor(), DBRecorder(api.store, job["id"]), ArtifactStore(str(tmp_path)),
             prefix=f"jobs/{job['id']}").run()
    dense, soup = models_of(api, job["id"])
    assert dense.kind == "dense" and soup.kind == "soup"

    with sdk(api, alice) as c:
        curve = c.robustness(dense.id)
        assert curve["model_id"] == dense.id and curve["metric"] == "accuracy" and curve["split"] == "test"
        assert [p["sparsity"] for p in curve["points"]] == list(SPARSITIES)
        assert curve["points"] == [dict(p, accuracy_raw=None) for p in dense.metrics["robustness"]]
        assert curve["dense_accuracy"] == dense.metrics["test_accuracy"] and curve["detail"] is None
        assert curve["points"][0]["accuracy"] > 0.5             # digits, 10 classes: well above chance
        # GET /models/{id} carries it in its metrics
        assert c.model(dense.id)["metrics"]["robustness"] == dense.metrics["robustness"]
        # a soup has none: 200, no points, and why
        other = c.robustness(soup.id)
        assert other["points"] == [] and "dense model" in other["detail"] and "soup" in other["detail"]
    with pytest.raises(NotFound):
        sdk(api, bob).robustness(dense.id)
    r = api.get(f"/models/{dense.id}/robustness", headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 404 and r.json() == {"detail": f"model {dense.id} not found"}
    assert sdk(api, root).robustness(dense.id)["points"] == curve["points"]
    r = api.get("/models/nosuchmodel/robustness", headers={"Authorization": f"Bearer {root}"})
    assert r.status_code == 404 and r.json() == {"detail": "model nosuchmodel not found"}


def test_a_dense_model_not_measured_says_why(api, tmp_path):
    spec = parse_spec(dict(JOB, dense={"epochs": 2, "lr": 0.1},
                           prune={"target_sparsity": 0.5, "phases": 1, "robustness": None}))
    job = api.store.create_job(spec)
    Pipeline(spec, SequentialExecutor(), DBRecorder(api.store, job.id), ArtifactStore(str(tmp_path)),
             prefix=f"jobs/{job.id}").run()
    dense, _ = models_of(api, job.id)
    r = api.get(f"/models/{dense.id}/robustness")
    assert r.status_code == 200
    body = r.json()
    assert body["points"] == [] and body["split"] is None and "prune.robustness: null" in body["detail"]
    assert "robustness" not in api.get(f"/models/{dense.id}").json()["metrics"]
