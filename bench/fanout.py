"""Fan-out efficiency: one phase's ingredients run sequentially in-process vs on warm Ray actors.

The same tasks (resnet20 retraining on digits from one pruned parent, m = 2 and 4 ingredients,
~5 s and ~20 s each) are run, in one process and one run:
  sequential   the local executor, one ingredient after another (torch on 1 thread)
  ray (cold)   the Ray executor's first phase of a job: actors start, torch imports, data loads
  ray (warm)   the following phases of the same job: the same actors, already warm
and this prints phase wall times, the speed-up, the parallel efficiency
m * t_single / (slots * t_phase), and the orchestration overhead per phase: the phase wall time
minus the time the slots spent inside training steps (sum of train seconds / slots).

    .venv/bin/python bench/fanout.py [--short 5] [--long 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import service  # noqa: F401,I001  first: Ray's environment (loopback only, token auth) before ray is imported
import ray
import torch
from rich.console import Console
from rich.table import Table

from service.cluster import LocalRay
from service.executors import RayExecutor
from service.pipeline import SequentialExecutor
from workers.data import DataConfig, load_splits, make_loader
from workers.models import build_model
from workers.pruning import prune
from workers.schedules import retrain_schedule, dense_schedule
from workers.tasks import TrainTask, run_train_task

DATA = DataConfig(batch_size=64)


def tasks_for(parent, masks, m: int, epochs: int) -> list[TrainTask]:
    spe = len(make_loader(load_splits(DATA, 0).train, DATA.batch_size, shuffle=True))
    dense = dense_schedule("linear", 0.1, 10 * spe)
    lrs = retrain_schedule("llr", epochs * spe, dense)
    return [TrainTask(name=f"ingredient{i}", arch="resnet20", data=DATA, data_seed=0, lrs=lrs, epochs=epochs,
                      seed=i, init_state=parent, masks=masks, threads=1) for i in range(m)]


def phase(executor, tasks) -> tuple[float, float]:
    """(wall seconds of the phase, sum of the ingredients' seconds inside training steps)."""
    t0 = time.perf_counter()
    outs = executor.run(tasks, lambda name, row: None)
    wall = time.perf_counter() - t0
    for o in outs:
        if isinstance(o, BaseException):
            raise o
    return wall, sum(o.train_seconds for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=float, default=5.0, help="target seconds per short ingredient")
    ap.add_argument("--long", type=float, default=20.0, help="target seconds per long ingredient")
    ap.add_argument("--rounds", type=int, default=2, help="warm Ray phases to average per case")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    console = Console(width=150)
    torch.set_num_threads(1)

    splits = load_splits(DATA, 0)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=splits.num_classes, in_shape=splits.in_shape)
    pruned = prune(model, None, 0.5)
    parent = {k: v.detach().clone() for k, v in pruned.model.state_dict().items()}
    # calibrate: seconds per epoch of one ingredient on one thread (after a first, set-up call)
    run_train_task(tasks_for(parent, pruned.masks, 1, 1)[0])
    t0 = time.perf_counter()
    run_train_task(tasks_for(parent, pruned.masks, 1, 2)[0])
    per_epoch = (time.perf_counter() - t0) / 2
    console.print(f"one resnet20 epoch on digits, 1 thread: {per_epoch:.2f} s")

    head = LocalRay(num_cpus=args.cpus).start()       # the same embedded head the service starts
    ray.init(address=head.address, log_to_driver=False)
    table = Table(title=f"Fan-out of one phase on {args.cpus} CPUs: sequential vs Ray actors "
                        f"(efficiency = m·t_single / (slots·t_phase))")
    for col in ("ingredient", "m", "executor", "phase s", "t_single s", "speed-up", "efficiency",
                "overhead s", "overhead %"):
        table.add_column(col, justify="right")
    for label, target in (("~short", args.short), ("~long", args.long)):
        epochs = max(1, round(target / per_epoch))
        for m in (2, 4):
            tasks = tasks_for(parent, pruned.masks, m, epochs)
            seq_wall, seq_train = phase(SequentialExecutor(), tasks)
            t_single = seq_wall / m
            rows = [("sequential", seq_wall, seq_train, 1)]
            executor = RayExecutor(cpus=1)
            cold_wall, cold_train = phase(executor, tasks)
            rows.append(("ray (cold)", cold_wall, cold_train, executor.slots))
            warm = [phase(executor, tasks) for _ in range(args.rounds)]
            rows.append((f"ray (warm, mean of {args.rounds})", sum(w for w, _ in warm) / len(warm),
                         sum(t for _, t in warm) / len(warm), executor.slots))
            executor.shutdown()
            for name, wall, train_s, slots in rows:
                overhead = wall - train_s / slots
                table.add_row(f"{label} {epochs} ep ({t_single:.1f} s)", str(m), name, f"{wall:.2f}",
                              f"{t_single:.2f}", f"{seq_wall / wall:.2f}", f"{m * t_single / (slots * wall):.2f}",
                              f"{overhead:.2f}", f"{100 * overhead / wall:.1f}")
            console.print(f"done: {label}, m={m}")
    console.print(table)
    ray.shutdown()
    head.stop()


if __name__ == "__main__":
    main()
