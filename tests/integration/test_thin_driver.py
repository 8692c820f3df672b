"""The thin driver (design section 9) on a real local Ray cluster: every tensor step of a job (phase 0's
scores and robustness curve, pruning, the soup and its greedy candidates, the prediction ensemble) runs
on the job's workers, so the driver, started by the real dispatcher through Ray's Jobs API, never loads
torch; a driver killed during the soup step resumes at that step; a worker killed during the prune step
is retried; the in-process executor gives the same phase metrics as Ray's."""

import os
import signal
import time
from pathlib import Path

import pytest
import ray
import sqlalchemy as sa

from service.artifacts import ArtifactStore
from service.dispatcher import Dispatcher
from service.executors import RETRIES, IngredientWorker, RayExecutor, SequentialExecutor
from service.pipeline import Pipeline
from service.recorders import LocalRecorder
from service.spec import parse_spec
from service.store import Store
from tests.integration.test_ray import driver_pids, run_to_end

pytestmark = pytest.mark.slow

# ResNet-20 (BatchNorm) on digits, 2 phases, a greedy soup of 3, the robustness curve (default grid) and
# the ensemble; small batches and recalibration over the whole train split make the soup step last a
# few seconds, long enough to kill the driver inside it
BN_JOB = {"name": "thin", "model": {"arch": "resnet20"}, "data": {"batch_size": 32}, "dense": {"epochs": 1},
          "prune": {"target_sparsity": 0.75, "phases": 2}, "retrain": {"epochs": 1},
          "soup": {"ingredients": 3, "method": "greedy", "bn_recalibration_fraction": 1.0}}


def driver_reports(store: Store, job_id: str) -> list[str]:
    return [e.message for e in store.events(job_id) if e.message.startswith("driver:")]


def test_the_driver_never_loads_torch_and_a_driver_killed_in_the_soup_step_resumes_there(ray_head, tmp_path):
    url = f"sqlite:///{tmp_path / 'ladle.db'}"
    store = Store(url)
    job = store.create_job(parse_spec(BN_JOB))
    artifacts = str(tmp_path / "artifacts")
    dispatcher = Dispatcher(store, ray_head.dashboard_url, database_url=url, artifacts=artifacts,
                            max_concurrent_jobs=1, interval=0.5)
    assert dispatcher.dispatch() == [job.id]
    # every ingredient of phase 1 recorded, phase 1 not yet: the driver is in the soup step
    deadline = time.monotonic() + 300
    while not (len(store.finished_ingredients(job.id, 1)) == 3 and len(store.completed_phases(job.id)) == 1):
        assert time.monotonic() < deadline, "phase 1's ingredients did not all finish"
        assert len(store.completed_phases(job.id)) < 2, "phase 1 completed before its soup step was seen"
        time.sleep(0.02)
    for pid in driver_pids(job.id):
        os.kill(pid, signal.SIGKILL)
    killed_in_soup = len(store.completed_phases(job.id)) == 1
    assert killed_in_soup, "phase 1 finished its soup before the driver was killed"
    final = run_to_end(store, ray_head, url, artifacts, job.id)
    assert final.status == "succeeded", final.error
    assert final.attempts == 2
    # resumed at the soup step: no ingredient trained twice, no duplicate row, full lineage
    runs = store.runs(job.id)
    assert len(runs) == len({r.name for r in runs}) == 1 + 2 * 3
    assert all(r.attempts == 1 for r in runs if r.name.startswith("phase1/"))
    assert [p.index for p in store.phases(job.id)] == [0, 1, 2]
    with store.engine.connect() as c:
        kinds = sorted(k for (k,) in c.execute(sa.text("SELECT kind FROM models WHERE job_id = :j"), {"j": job.id}))
    assert kinds == ["dense"] + ["ingredient"] * 6 + ["pruned"] * 2 + ["soup"] * 2
    events = [e.message for e in store.events(job.id)]
    assert any("reusing the finished ingredients ['phase1/ingredient0', 'phase1/ingredient1', 'phase1/ingredient2']"
               in m for m in events)
    assert any("one-shot robustness curve measured" in m for m in events)
    assert any("greedy soup of ingredients" in m for m in events)
    # the driver that finished the job never imported torch; it recorded its own CPU time per phase
    reports = driver_reports(store, job.id)
    assert reports and all(m.endswith("torch not loaded") for m in reports), reports
    for p in store.phases(job.id):
        assert p.seconds["driver_cpu"] >= 0.0
        assert p.metrics["cpu_seconds"] > p.seconds["driver_cpu"]
    assert all(p.metrics["ensemble_accuracy"] is not None for p in store.phases(job.id) if p.index > 0)


def test_an_lm_job_prunes_with_sparsegpt_and_soups_greedily_on_workers(ray_head, tiny_lm, tmp_path):
    arch, text = tiny_lm
    url = f"sqlite:///{tmp_path / 'ladle.db'}"
    store = Store(url)
    spec = parse_spec({"name": "lm", "model": {"arch": arch},
                       "data": {"name": "text", "path": text, "seq_len": 16, "calibration_samples": 8, "batch_size": 8},
                       "prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "sparsegpt"},
                       "retrain": {"epochs": 1, "params": "mask_lora", "lr": 3e-3},
                       "soup": {"ingredients": 2, "method": "greedy"}})
    job = store.create_job(spec)
    final = run_to_end(store, ray_head, url, tmp_path / "artifacts", job.id)
    assert final.status == "succeeded", final.error
    events = [e.message for e in store.events(job.id)]
    assert any("greedy soup of ingredients" in m for m in events)
    assert any("pruned to sparsity 0.5" in m for m in events)
    reports = driver_reports(store, job.id)
    assert reports and all(m.endswith("torch not loaded") for m in reports), reports


class DiesOnceInThePruneStep(IngredientWorker):
    """The real worker, except that its process exits the first time it is given phase 1's prune step
    (a marker file remembers it across the restart)."""

    marker = ""

    def run(self, task, metrics):
        if task.name == "phase1/prune" and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().run(task, metrics)


def test_a_worker_killed_during_the_prune_step_is_retried(ray_head, tmp_path):
    marker = tmp_path / "died"

    class Worker(DiesOnceInThePruneStep):
        def __init__(self, threads):
            super().__init__(threads)
            self.marker = str(marker)

    class Executor(RayExecutor):
        worker = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(Worker)

    spec = parse_spec({"name": "prune-retry", "dense": {"epochs": 2}, "prune": {"target_sparsity": 0.5, "phases": 1},
                       "retrain": {"epochs": 1}, "soup": {"ingredients": 2}})
    rec, executor = LocalRecorder(progress=False), Executor(cpus=1)
    try:
        result = Pipeline(spec, executor, rec, ArtifactStore(str(tmp_path / "artifacts"))).run()
    finally:
        executor.shutdown()
    assert marker.exists()                                       # the worker did die in the prune step
    assert len(result.phases) == 2
    assert any("pruned to sparsity 0.5000" in e["message"] for e in rec.events)


def test_the_in_process_path_gives_the_ray_paths_phase_metrics(ray_head, tmp_path):
    spec = parse_spec({"name": "same", "seed": 3, "dense": {"epochs": 2}, "prune": {"target_sparsity": 0.6, "phases": 2},
                       "retrain": {"epochs": 1}, "soup": {"ingredients": 2, "method": "greedy"}})
    phases = {}
    for name, executor in (("local", SequentialExecutor()), ("ray", RayExecutor(cpus=1))):
        try:
            phases[name] = Pipeline(spec, executor, LocalRecorder(progress=False),
                                    ArtifactStore(str(tmp_path / name))).run().phases
        finally:
            if isinstance(executor, RayExecutor):
                executor.shutdown()
    keys = ("pruned_accuracy", "soup_accuracy", "soup_val_accuracy", "soup_loss", "ensemble_accuracy",
            "mean_pairwise_distance", "norm_drop")
    for local, remote in zip(phases["local"], phases["ray"]):
        assert local.sparsity == pytest.approx(remote.sparsity, abs=1e-9)
        assert local.soup_ingredients == remote.soup_ingredients
        for k in keys:
            if k in local.metrics:
                assert local.metrics[k] == pytest.approx(remote.metrics[k], rel=1e-5, abs=1e-6), k
        assert local.metrics["ingredient_accuracies" if local.phase else "soup_accuracy"] == pytest.approx(
            remote.metrics["ingredient_accuracies" if remote.phase else "soup_accuracy"], abs=1e-6)
