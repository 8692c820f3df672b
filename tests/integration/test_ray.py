"""The Ray path with a real local Ray cluster (`ray start`, loopback, 2 CPUs) and real databases:
the executor's fan-out, the Jobs-API dispatcher and driver, resume after a killed driver, and a
retried ingredient after a killed worker."""

import os
import signal
import subprocess
import time

import pytest
import ray

from service.artifacts import ArtifactStore
from service.dispatcher import Dispatcher
from service.driver import resume_point
from service.executors import RayExecutor
from service.pipeline import Pipeline
from service.spec import parse_spec
from service.store import Store
from service.recorders import DBRecorder
from workers.data import DataConfig, load_splits, make_loader
from workers.schedules import dense_schedule
from workers.tasks import TrainTask

pytestmark = pytest.mark.slow

JOB = {"name": "ray", "dense": {"epochs": 4}, "prune": {"target_sparsity": 0.75, "phases": 2},
       "retrain": {"epochs": 2}, "soup": {"ingredients": 2}}


def check_lineage(store: Store, job_id: str, phases: int, ingredients: int):
    job = store.get_job(job_id)
    lin = store.lineage(job.final_model_id)
    nodes = {n.id: n for n in lin["nodes"]}
    assert len(nodes) == 1 + phases * (2 + ingredients)
    assert sorted(n.kind for n in nodes.values()).count("ingredient") == phases * ingredients
    for e in lin["edges"]:
        parent, child = nodes[e["parent"]].kind, nodes[e["child"]].kind
        assert (parent, child, e["kind"]) in {("dense", "pruned", "pruned_from"), ("soup", "pruned", "pruned_from"),
                                              ("pruned", "ingredient", "retrained_from"),
                                              ("ingredient", "soup", "averaged_from")}
    assert len(lin["edges"]) == phases * (1 + 2 * ingredients)
    return lin


def test_ray_executor_job_stores_full_lineage_and_every_epoch(ray_head, store, tmp_path):
    spec = parse_spec(JOB)
    job = store.create_job(spec)
    executor = RayExecutor(cpus=1)
    try:
        result = Pipeline(spec, executor, DBRecorder(store, job.id), ArtifactStore(str(tmp_path)),
                          prefix=f"jobs/{job.id}", epoch_checkpoints=True).run()
        placed = ray.get([a.where.remote() for a in executor._actors])
    finally:
        executor.shutdown()
    store.job_succeeded(job.id, result.final_model_id)
    check_lineage(store, job.id, phases=2, ingredients=2)
    assert len({p["pid"] for p in placed}) == 2                  # two warm workers, reused across phases
    for run in store.runs(job.id, kind="ingredient"):
        assert run.status == "succeeded"
        epochs = {r["epoch"] for r in store.metrics(job.id, run_name=run.name, name="train_loss")}
        assert epochs == {1, 2}
    assert not list(tmp_path.rglob("*.epoch.safetensors"))      # epoch checkpoints are cleaned up


def _slow_task(name, seed, epochs=4):
    cfg = DataConfig(batch_size=32)
    spe = len(make_loader(load_splits(cfg, 0).train, 32, shuffle=True))
    return TrainTask(name=name, arch="resnet20", data=cfg, data_seed=0, lrs=dense_schedule("linear", 0.05, epochs * spe),
                     epochs=epochs, seed=seed)


def test_killed_worker_is_retried_from_its_last_epoch_checkpoint(ray_head, tmp_path):
    executor = RayExecutor(cpus=1, slots=1)
    executor.warm_up()
    [pid] = [w["pid"] for w in ray.get([a.where.remote() for a in executor._actors])]
    task = _slow_task("victim", seed=0)
    task.resume_url = str(tmp_path / "victim.epoch.safetensors")
    killed = []

    def on_epoch(name, row):
        if not killed and row["epoch"] >= 1:
            os.kill(pid, signal.SIGKILL)           # the worker process dies mid-ingredient
            killed.append(row["epoch"])
    try:
        [out] = executor.run([task], on_epoch)
    finally:
        executor.shutdown()
    assert killed, "the worker finished before it could be killed"
    assert not isinstance(out, BaseException), out
    assert out.resumed_from_epoch >= 1                       # continued, not started over
    assert [r["epoch"] for r in out.history] == [1, 2, 3, 4]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_to_end(store, ray_head, url, artifacts, job_id, timeout=300):
    """Start a dispatcher (a service's), wait for the job to end, stop the dispatcher: the job's last row."""
    dispatcher = Dispatcher(store, ray_head.dashboard_url, database_url=url, artifacts=str(artifacts),
                            max_concurrent_jobs=1, interval=0.5).start()
    try:
        return wait_for(lambda: (j := store.get_job(job_id)).status in ("succeeded", "failed") and j, timeout,
                        "the job to finish")
    finally:
        dispatcher.stop()


def driver_pids(job_id):
    out = subprocess.run(["pgrep", "-f", f"service.driver {job_id}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture
def file_store(request, tmp_path):
    """A store the drivers (other processes) can reach: a SQLite file, or the session's Postgres DB."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ladle.db'}"
        return Store(url), url
    from tests.conftest import _truncate
    store = request.getfixturevalue("pg_store")
    _truncate(store)
    return store, request.getfixturevalue("pg_url")


@pytest.mark.parametrize("file_store", BACKENDS, indirect=True)
def test_dispatcher_runs_jobs_and_resumes_after_a_killed_driver(ray_head, file_store, tmp_path):
    store, url = file_store
    # ingredient 0 retrains 1 epoch, ingredient 1 six: the driver is killed while ingredient 1 of
    # phase 2 still trains and ingredient 0 has finished (it must be reused, not retrained)
    spec = parse_spec({"name": "resume", "model": {"arch": "resnet20"}, "data": {"batch_size": 64},
                       "dense": {"epochs": 2}, "prune": {"target_sparsity": 0.75, "phases": 2},
                       "retrain": {"epochs": 1},
                       "soup": {"ingredients": 2, "vary": "retrain_epochs", "values": [1, 6]}})
    job = store.create_job(spec)
    dispatcher = Dispatcher(store, ray_head.dashboard_url, database_url=url, artifacts=str(tmp_path / "artifacts"),
                            max_concurrent_jobs=1, interval=0.5)
    assert dispatcher.dispatch() == [job.id]
    assert store.get_job(job.id).ray_submission_id == job.id
    # wait until phase 2 has started and one of its ingredients finished, then kill the driver
    wait_for(lambda: len(store.completed_phases(job.id)) >= 2 and store.finished_ingredients(job.id, 2),
             300, "phase 2 to have a finished ingredient")
    pids = driver_pids(job.id)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    reused = {r.name for r, _ in store.finished_ingredients(job.id, 2)}
    # "restart the service": a new dispatcher reconciles with Ray and resubmits the job
    final = run_to_end(store, ray_head, url, tmp_path / "artifacts", job.id)
    assert final.status == "succeeded", final.error
    assert final.attempts == 2 and final.ray_submission_id == f"{job.id}-r2"
    check_lineage(store, job.id, phases=2, ingredients=2)
    # no duplicate rows, and the reused ingredient was not trained again
    assert [p.index for p in store.phases(job.id)] == [0, 1, 2]
    runs = store.runs(job.id)
    assert len(runs) == len({r.name for r in runs}) == 1 + 2 * 2
    assert reused == {"phase2/ingredient0"}
    for r in runs:
        if r.name in reused:
            assert r.attempts == 1
    events = [e.message for e in store.events(job.id)]
    assert any("resuming" in m for m in events)
    assert resume_point(store, job.id).phases[-1].phase == 2
    assert next(r for r in runs if r.name == "phase2/ingredient1").attempts == 2


@pytest.mark.parametrize("file_store", BACKENDS, indirect=True)
def test_cancel_stops_the_ray_job_and_keeps_what_finished(ray_head, file_store, tmp_path):
    store, url = file_store
    spec = parse_spec({"name": "cancel", "model": {"arch": "resnet20"}, "dense": {"epochs": 1},
                       "prune": {"target_sparsity": 0.5, "phases": 2}, "retrain": {"epochs": 20},
                       "soup": {"ingredients": 2}})
    job = store.create_job(spec)
    dispatcher = Dispatcher(store, ray_head.dashboard_url, database_url=url, artifacts=str(tmp_path / "a"))
    dispatcher.dispatch()
    wait_for(lambda: store.completed_phases(job.id), 240, "phase 0 to finish")
    dispatcher.cancel(job.id)
    wait_for(lambda: dispatcher.client.get_job_status(job.id).is_terminal(), 60, "Ray to stop the job")
    assert str(dispatcher.client.get_job_status(job.id)) == "STOPPED"
    time.sleep(2)
    dispatcher.reconcile()                          # a cancelled job is not resubmitted
    final = store.get_job(job.id)
    assert final.status == "cancelled" and final.attempts == 1
    assert store.get_model_by_name(job.id, "phase0/dense") is not None      # what finished stays
    assert not driver_pids(job.id)


@pytest.mark.parametrize("file_store", BACKENDS, indirect=True)
def test_dispatcher_respects_max_concurrent_jobs(ray_head, file_store, tmp_path):
    store, url = file_store
    spec = parse_spec({"name": "limit", "model": {"arch": "resnet20"}, "dense": {"epochs": 20},
                       "prune": {"phases": 1}, "soup": {"ingredients": 2}})
    jobs = [store.create_job(spec) for _ in range(3)]
    dispatcher = Dispatcher(store, ray_head.dashboard_url, database_url=url, artifacts=str(tmp_path / "a"),
                            max_concurrent_jobs=1)
    try:
        assert dispatcher.dispatch() == [jobs[0].id]              # oldest first, one at a time
        assert dispatcher.dispatch() == []
        assert [store.get_job(j.id).status for j in jobs] == ["running", "queued", "queued"]
    finally:
        for j in jobs:
            if store.get_job(j.id).status not in ("cancelled", "succeeded", "failed"):
                dispatcher.cancel(j.id)
    wait_for(lambda: dispatcher.client.get_job_status(jobs[0].id).is_terminal(), 60, "Ray to stop the job")
