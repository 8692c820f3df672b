"""Faults on a real Ray cluster: an ingredient whose worker process dies on every try (the soup is
made from the survivors, or the phase fails below min_ingredients), and workers that no node can
start."""

import os
import sys

import pytest
import ray

from service.artifacts import ArtifactStore
from service.executors import RETRIES, IngredientWorker, RayExecutor, Unschedulable
from service.pipeline import PhaseFailed, Pipeline
from service.recorders import LocalRecorder
from service.spec import parse_spec
from workers.data import DataConfig
from workers.tasks import TrainTask

pytestmark = pytest.mark.slow

# Ray pickles this module's classes by value, so its workers need not import the tests package
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

VICTIM = "phase1/ingredient1"
SPEC = {"name": "faults", "dense": {"epochs": 3}, "prune": {"target_sparsity": 0.5, "phases": 1},
        "retrain": {"epochs": 1}, "soup": {"ingredients": 3, "min_ingredients": 2}}


class DiesOnVictim(IngredientWorker):
    """The real worker, except that its process exits whenever it is given the victim ingredient."""

    def run(self, task, metrics):
        if task.name == VICTIM:
            os._exit(1)
        return super().run(task, metrics)


class FaultyExecutor(RayExecutor):
    worker = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(DiesOnVictim)


def run_with_victim(spec: dict, tmp_path):
    rec = LocalRecorder(progress=False)
    executor = FaultyExecutor(cpus=1)
    try:
        result = Pipeline(parse_spec(spec), executor, rec, ArtifactStore(str(tmp_path))).run()
    finally:
        executor.shutdown()
    return rec, result


def test_an_ingredient_whose_worker_always_dies_leaves_a_soup_of_the_survivors(ray_head, tmp_path):
    rec, result = run_with_victim(SPEC, tmp_path)
    phase = result.phases[1]
    assert phase.soup_ingredients == [0, 2]
    assert phase.metrics["ingredient_accuracies"][1] is None and all(a > 0.5 for a in phase.metrics["ingredient_accuracies"][::2])
    assert rec.runs[VICTIM]["status"] == "failed"
    assert f"WorkerLost('its worker process died {RETRIES + 1} times" in rec.runs[VICTIM]["error"]
    messages = [e["message"] for e in rec.events]
    assert any("ingredient1 failed: its worker process died 3 times" in m for m in messages), messages
    assert any("surviving ingredients [0, 2]" in m for m in messages), messages


def test_below_min_ingredients_the_phase_fails_with_the_reason(ray_head, tmp_path):
    spec = dict(SPEC, soup={"ingredients": 3, "min_ingredients": 3})
    with pytest.raises(PhaseFailed, match="only 2 of 3 ingredients"):
        run_with_victim(spec, tmp_path)


def test_workers_no_node_can_start_fail_with_the_resources_named(ray_head):
    executor = RayExecutor(cpus=64, unschedulable_timeout=3)
    task = TrainTask(name="big", arch="mlp", data=DataConfig(), data_seed=0, lrs=[0.1], epochs=1, seed=0)
    try:
        with pytest.raises(Unschedulable, match=r"64 CPUs .*resources.cpus_per_ingredient.* at most 2 CPUs"):
            executor.run([task], lambda *a: None)
    finally:
        executor.shutdown()
