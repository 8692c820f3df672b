"""A phase's schedule search as a Ray Tune experiment (RayExecutor.search).

One trial per task: the pipeline samples the configs, and a grid over the task list runs them. Each
trial asks for the ingredients' resources and reports every epoch, so ASHA stops weak trials at its
rungs. A Tune callback in the driver streams the trials' epochs to the pipeline as they arrive.
Imported only by jobs that search: Ray Tune takes half a second to import.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from service.records import EpochCallback
from workers.units import TrainTask

SEARCH_TIME = "training_iteration"        # Tune counts one per report, that is per epoch


def _row(result: dict) -> dict[str, float]:
    """The training row in a Tune result (Tune adds its own keys: time, ids, config...)."""
    return {k: v for k, v in result.items()
            if k in ("epoch", "step", "lr", "cpu_seconds", "gpu_seconds")
            or (k.startswith(("train_", "val_")) and isinstance(v, (int, float)))}


# Tune pickles its run config, callbacks included: the callback holds a key into this table, not the
# (unpicklable) listener itself
_LISTENERS: dict[str, tuple[list[str], EpochCallback]] = {}


class _Report(tune.Callback):
    """Runs in the driver: each trial's epoch rows go to the search's listener as they arrive."""

    def __init__(self, key: str):
        self.key = key

    def on_trial_result(self, iteration, trials, trial, result, **info):
        names, on_epoch = _LISTENERS[self.key]
        on_epoch(names[trial.config["trial"]], _row(result))


def _trial(config: dict, tasks: list[TrainTask]) -> None:
    """A Tune trial: train its task, reporting every epoch (ASHA may stop it after any report)."""
    tasks[config["trial"]].run(tune.report)


def tune_search(tasks: list[TrainTask], on_epoch: EpochCallback, *, cpus: float, gpus: float, slots: int,
                metric: str, mode: str, scheduler: str, grace_period: int, reduction_factor: int,
                retries: int) -> dict[str, str | BaseException]:
    """Run one Tune trial per task, `slots` at a time, each with `cpus`/`gpus`; ASHA (or FIFO) on
    `metric` per epoch. Returns per task name: "completed", "stopped" (early) or the error."""
    key = uuid.uuid4().hex
    _LISTENERS[key] = ([t.name for t in tasks], on_epoch)
    sched = (ASHAScheduler(time_attr=SEARCH_TIME, max_t=max(t.epochs for t in tasks), grace_period=grace_period,
                           reduction_factor=reduction_factor) if scheduler == "asha" else FIFOScheduler())
    storage = tempfile.mkdtemp(prefix="ladle-search-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, tasks=tasks), {"cpu": cpus, "gpu": gpus}),
            param_space={"trial": tune.grid_search(list(range(len(tasks))))},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=sched, max_concurrent_trials=slots),
            run_config=tune.RunConfig(storage_path=storage, name="search", callbacks=[_Report(key)], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=retries)))
        ends: dict[str, str | BaseException] = {}
        for result in tuner.fit():
            task = tasks[result.config["trial"]]
            if result.error is not None:
                ends[task.name] = result.error
            else:
                ran = int((result.metrics or {}).get(SEARCH_TIME, 0))
                ends[task.name] = "completed" if ran >= task.epochs else "stopped"
        return ends
    finally:
        _LISTENERS.pop(key, None)
        shutil.rmtree(storage, ignore_errors=True)
