"""The executors (service.records.Executor): `SequentialExecutor` runs a phase's tasks one after
another in this process; `RayExecutor` runs a phase's ingredients in parallel on warm, long-lived Ray
actors, and a phase's schedule search as a Ray Tune experiment (service.search).

One pool of `IngredientWorker` actors per job, created on first use and kept across phases, so the
cost of starting a worker process and importing torch is paid once per job, not per ingredient.
Each actor asks Ray for `cpus_per_ingredient` CPUs and `gpus_per_ingredient` (possibly fractional)
GPUs. Per-epoch metrics stream back through a Ray queue while the ingredients train. If a worker
process dies, Ray restarts the actor and retries the call (`max_restarts`, `max_task_retries`); the
retried task resumes from its last epoch checkpoint (`TrainTask.resume_url`).

Workers that no node can start (more CPUs or GPUs per ingredient than any node has) fail the job
with `Unschedulable` after `unschedulable_timeout` seconds, time for an autoscaler to add such a
node; workers that wait for resources held by other jobs wait as long as it takes (`on_wait` hears
of it once).

A search releases the warm pool first, so that Tune's trials get its CPUs and GPUs; the next phase
starts a new one.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.util.queue import Empty, Queue

from service.cluster import unfit
from service.records import EpochCallback, ResultCallback
from workers.units import TrainOutcome, TrainTask

RETRIES = 2


class SequentialExecutor:
    """Runs units of work (trainings and phase steps, workers.units) one after another in this process:
    for `ladle run --local`, debugging and as the benchmarks' baseline. The same units run on Ray's
    workers under RayExecutor."""

    slots = 1
    in_process = True

    def run(self, tasks: list[TrainTask], on_epoch: EpochCallback,
            on_result: ResultCallback | None = None) -> list[TrainOutcome | BaseException]:
        results: list[TrainOutcome | BaseException] = []
        for task in tasks:
            try:
                out: TrainOutcome | BaseException = task.run(lambda row, n=task.name: on_epoch(n, row))
            except Exception as e:  # one failed ingredient must not end the others
                out = e
            results.append(out)
            if on_result is not None:
                on_result(task, out)
        return results

    def search(self, tasks: list[TrainTask], on_epoch: EpochCallback, **_: Any) -> dict[str, str | BaseException]:
        """Every trial to its end, one after another (early stopping needs Ray Tune: RayExecutor)."""
        outs = self.run(tasks, on_epoch)
        return {t.name: (o if isinstance(o, BaseException) else "completed") for t, o in zip(tasks, outs)}


class StepError(RuntimeError):
    """A unit of work failed with an error of a library the driver does not load (torch's)."""


# Modules whose exceptions a driver unpickles without importing torch
PORTABLE_ERRORS = frozenset({"builtins", "workers.config", "workers.units", "service.executors"})


class WorkerLost(RuntimeError):
    """An ingredient whose worker process died on every try (killed, out of memory, node lost)."""


class Unschedulable(RuntimeError):
    """No node of the cluster can start an ingredient worker with the resources the job asks for."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class IngredientWorker:
    """A warm worker: torch imported and datasets cached across the ingredients it trains. The
    executor runs it as a Ray actor (`RayExecutor.worker`)."""

    def __init__(self, threads: int):
        import torch
        torch.set_num_threads(max(1, threads))
        self.threads = threads

    def where(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def run(self, task: TrainTask, metrics: Queue | None) -> TrainOutcome:
        """Run one unit of work (a training or a phase step); an error that the driver could not read
        without importing torch (torch's own, say) comes back as a `StepError` with its text."""
        def on_epoch(row: dict[str, float]) -> None:
            if metrics is not None:
                metrics.put_nowait((task.name, row))
        task.threads = self.threads
        try:
            return task.run(on_epoch)
        except Exception as e:
            if type(e).__module__ in PORTABLE_ERRORS:
                raise
            raise StepError(f"{type(e).__name__}: {e}") from None



class RayExecutor:
    """Runs tasks on a pool of warm Ray actors; `slots` of them train at once."""

    # If a worker's process dies, Ray starts the actor again and retries its call, RETRIES times
    worker = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(IngredientWorker)

    def __init__(self, *, cpus: float = 1.0, gpus: float = 0.0, slots: int | None = None,
                 poll_seconds: float = 1.0, unschedulable_timeout: float = 600.0,
                 on_wait: Callable[[str], None] | None = None):
        self.cpus, self.gpus, self.poll = cpus, gpus, poll_seconds
        self.unschedulable_timeout, self.on_wait = unschedulable_timeout, on_wait
        self._placed: set[int] = set()          # id() of the actors known to have started
        if slots is None:
            resources = ray.cluster_resources()
            slots = int(resources.get("CPU", 1) // cpus)
            if gpus > 0:
                slots = min(slots, int(round(resources.get("GPU", 0) / gpus, 6)))
        self.slots = max(1, slots)
        self.in_process = False
        self.memory = 0                          # bytes each worker asks Ray for (reserve_memory)
        self._actors: list = []
        self._queue: Queue | None = None

    def _new_actor(self):
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            options["memory"] = self.memory
        return self.worker.options(**options).remote(max(1, int(self.cpus)))

    def reserve_memory(self, nbytes: int) -> None:
        """From now on each worker asks Ray for `nbytes` of memory (the job's estimate), so that Ray
        starts no more workers on a node than its memory holds: they queue instead of being killed.
        Workers started before without the request are replaced."""
        if nbytes <= self.memory:
            return
        self.memory = int(nbytes)
        for a in self._actors:
            ray.kill(a)
        self._actors = []
        self._placed.clear()

    def _pool(self, n: int) -> list:
        while len(self._actors) < n:
            self._actors.append(self._new_actor())
        return self._actors[:n]

    def _replace(self, actor):
        ray.kill(actor)
        fresh = self._new_actor()
        self._actors[self._actors.index(actor)] = fresh
        self._placed.discard(id(actor))
        return fresh

    def _await_placement(self, actors: list) -> None:
        """Return once one of `actors` has started (the others follow as resources free up). Raise
        Unschedulable if none has after `unschedulable_timeout` seconds and no node could hold one."""
        refs = {a.where.remote(): a for a in actors if id(a) not in self._placed}
        if not refs:
            return
        start, said = time.monotonic(), False
        while True:
            elapsed = time.monotonic() - start
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.1, min(10.0, self.unschedulable_timeout - elapsed)))
            if ready:
                self._placed.update(id(refs[r]) for r in ready)
                return
            nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
            why = unfit(self.cpus, self.gpus, nodes, self.memory)
            if why is None:                           # it fits a node: other jobs hold what it needs
                if not said and self.on_wait is not None:
                    what = (f"{self.cpus:g} CPUs, {self.gpus:g} GPUs and {self.memory / 2**30:.1f} GiB of memory"
                            if self.memory else f"{self.cpus:g} CPUs and {self.gpus:g} GPUs")
                    self.on_wait(f"waiting for {what} per ingredient, which other jobs hold")
                said = True
            elif time.monotonic() - start >= self.unschedulable_timeout:
                raise Unschedulable(f"{why}; no worker started within {self.unschedulable_timeout:g} s "
                                    "(LADLE_UNSCHEDULABLE_TIMEOUT)")

    def warm_up(self, n: int | None = None, *, wait: bool = True) -> None:
        """Start the actors now (they stay for the job); with wait, until they are up."""
        refs = [a.where.remote() for a in self._pool(n or self.slots)]
        if wait:
            ray.get(refs)

    def _drain(self, on_epoch: EpochCallback) -> None:
        if self._queue is None:
            return
        while True:
            try:
                items = self._queue.get_nowait_batch(max(1, self._queue.qsize()))
            except Empty:
                return
            if not items:
                return
            for name, row in items:
                on_epoch(name, row)

    def run(self, tasks: list[TrainTask], on_epoch: EpochCallback,
            on_result: ResultCallback | None = None) -> list[TrainOutcome | BaseException]:
        if self._queue is None:
            self._queue = Queue(actor_options={"num_cpus": 0})
        idle = deque(self._pool(min(self.slots, len(tasks))))
        self._await_placement(list(idle))
        pending = deque(enumerate(tasks))
        running: dict = {}
        results: list[TrainOutcome | BaseException | None] = [None] * len(tasks)
        while pending or running:
            while pending and idle:
                i, task = pending.popleft()
                actor = idle.popleft()
                running[actor.run.remote(task, self._queue)] = (i, actor)
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.poll)
            self._drain(on_epoch)
            for ref in done:
                i, actor = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError as e:   # its worker died beyond its retries: replace it
                    results[i] = WorkerLost(f"its worker process died {RETRIES + 1} times "
                                            f"({_first_line(e)})")
                    actor = self._replace(actor)
                except ray.exceptions.RayTaskError as e:  # the task itself raised: keep its own error
                    results[i] = e.cause if isinstance(e.cause, Exception) else e
                except Exception as e:
                    results[i] = e
                idle.append(actor)
                if on_result is not None:
                    self._drain(on_epoch)                # its last epochs before its end
                    on_result(tasks[i], results[i])
        self._drain(on_epoch)   # metrics are queued synchronously, so everything is in by now
        return results  # type: ignore[return-value]

    def search(self, tasks: list[TrainTask], on_epoch: EpochCallback, *, metric: str, mode: str,
               scheduler: str, grace_period: int, reduction_factor: int) -> dict[str, str | BaseException]:
        from service.search import tune_search      # Ray Tune is imported only by jobs that search
        self.shutdown()                              # the trials need the pool's resources
        return tune_search(tasks, on_epoch, cpus=self.cpus, gpus=self.gpus, slots=self.slots, metric=metric,
                           mode=mode, scheduler=scheduler, grace_period=grace_period,
                           reduction_factor=reduction_factor, retries=RETRIES)

    def shutdown(self) -> None:
        for a in self._actors:
            ray.kill(a)
        if self._queue is not None:
            self._queue.shutdown()
        self._actors, self._queue = [], None
        self._placed.clear()

