"""The schedule search on a real local Ray cluster: Ray Tune trials with ASHA, stored as runs of kind
search_trial, and the winner as the base of the phase's ingredients."""

import math
import time

import pytest

from service.artifacts import ArtifactStore
from service.executors import RayExecutor
from service.pipeline import Pipeline
from service.spec import parse_spec
from service.store import Store
from service.recorders import DBRecorder

pytestmark = pytest.mark.slow

SEARCH = {"space": {"schedule": {"choice": ["llr", "allr", "clr", "slr", "ft"]}, "lr": {"loguniform": [0.001, 0.5]}},
          "trials": 6, "grace_period": 1, "reduction_factor": 3}
JOB = {"name": "search", "dense": {"epochs": 3}, "prune": {"target_sparsity": 0.8, "phases": 1},
       "retrain": {"epochs": 3}, "soup": {"ingredients": 2}, "search": SEARCH}


def test_search_on_ray_stops_trials_early_and_feeds_the_best_config_to_the_soup(ray_head, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'ladle.db'}")
    spec = parse_spec(JOB)
    job = store.create_job(spec)
    executor = RayExecutor(cpus=1)
    try:
        result = Pipeline(spec, executor, DBRecorder(store, job.id), ArtifactStore(str(tmp_path / "artifacts")),
                          prefix=f"jobs/{job.id}").run()
    finally:
        executor.shutdown()
    assert result.final_model_id
    trials = store.runs(job.id, kind="search_trial")
    assert len(trials) == 6 and {t.phase for t in trials} == {1}
    assert all(t.status == "succeeded" for t in trials)
    assert trials[0].config.default and trials[0].config.config["schedule"] == "llr"     # trial 0: the spec's
    # every epoch a trial ran is stored; ASHA stopped some of them at its first rung
    for t in trials:
        epochs = sorted(r["epoch"] for r in store.metrics(job.id, run_name=t.name, name="val_accuracy"))
        assert epochs == list(range(1, t.metrics["epochs_run"] + 1))
        assert t.metrics["stopped_early"] == (t.metrics["epochs_run"] < 3)
    assert any(t.metrics["stopped_early"] for t in trials)
    assert any(not t.metrics["stopped_early"] for t in trials)
    # the chosen trial has the best val accuracy, and the ingredients use its config
    [chosen] = [t for t in trials if t.metrics["chosen"]]
    assert chosen.metrics["val_accuracy"] == max(t.metrics["val_accuracy"] for t in trials)
    for ing in store.runs(job.id, kind="ingredient"):
        assert ing.config.schedule == chosen.config.schedule
        assert math.isclose(ing.config.lr, chosen.config.lr)
    events = [e.message for e in store.events(job.id)]
    assert any(f"{chosen.config.schedule} lr=" in m and "chosen, val_accuracy" in m and "default" in m
               for m in events)


def test_cancelling_the_job_stops_its_search(ray_head, tmp_path):
    from ray.util.state import list_actors

    from service.dispatcher import Dispatcher
    from tests.integration.test_ray import wait_for

    url = f"sqlite:///{tmp_path / 'ladle.db'}"
    store = Store(url)
    spec = parse_spec(dict(JOB, name="cancel-search", model={"arch": "resnet20"}, dense={"epochs": 1},
                           search=dict(SEARCH, trials=4, scheduler="fifo"), retrain={"epochs": 30}))
    job = store.create_job(spec)
    dispatcher = Dispatcher(store, ray_head.dashboard_url, database_url=url, artifacts=str(tmp_path / "a"))
    dispatcher.dispatch()

    def trials_training():
        return [a for a in list_actors(address=ray_head.dashboard_url, filters=[("state", "=", "ALIVE")],
                                       raise_on_missing_output=False) if "ImplicitFunc" in a.class_name]

    wait_for(lambda: store.metrics(job.id, name="train_loss", run_name="phase1/search/trial0"), 240,
             "the search to train")
    assert trials_training()                          # Tune's trial actors, on the cluster's CPUs
    dispatcher.cancel(job.id)
    wait_for(lambda: dispatcher.client.get_job_status(job.id).is_terminal(), 60, "Ray to stop the job")
    wait_for(lambda: not trials_training(), 60, "the trial actors to go")
    assert store.get_job(job.id).status == "cancelled"
    rows = len(store.metrics(job.id, name="train_loss"))
    time.sleep(3)
    assert len(store.metrics(job.id, name="train_loss")) == rows   # nothing trains on
