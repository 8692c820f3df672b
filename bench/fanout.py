"""Fan-out efficiency: one phase's ingredients run sequentially in-process vs on warm Ray actors, and
a whole phase of the pipeline with 1 vs 2 ingredients.

Part 1, the executor. The same tasks (resnet20 retraining on digits from one pruned parent, m = 2 and
4 ingredients, ~5 s and ~20 s each, each finished in its worker: BatchNorm recalibration, scoring on
val and test, checkpoint written) are run, in one process and one run:
  sequential   the local executor, one ingredient after another (torch on 1 thread)
  ray (cold)   the Ray executor's first phase of a job: actors start, torch imports, data loads
  ray (warm)   the following phases of the same job: the same actors, already warm
and this prints phase wall times, the speed-up, the parallel efficiency
m * t_single / (slots * t_phase), and the orchestration overhead per phase: the phase wall time
minus the time the slots spent inside training steps (sum of train seconds / slots).

Part 2, the pipeline. One prune-retrain phase of an MLP on Fashion-MNIST (ingredients of about
`--phase-seconds` each) run by the driver's own code (Pipeline + RayExecutor + the SQLite store's
recorder, as a Ray job's driver runs it), with m = 1 and m = 2 ingredients on 2 CPUs, alternated
`--rounds` times: the phase's wall time with 2 ingredients over that with 1, split into the time the
ingredients spent inside training steps (in their workers), the result latency (the phase's retrain
time after its slowest ingredient's task ended), the time outside the retraining (prune, soup, eval: steps
on the workers since the thin driver) and the driver's own CPU-seconds, also as a share of the phase's
CPU-seconds. Beside it, the machine's own ceiling: the same training in 2 plain processes at once
against 1.

Part 3, phase 0. ResNet-20 from a checkpoint with its one-shot robustness curve: phase 0 run in the
driver's own process (the sequential executor, where every step ran before the thin driver) and as a
step on a warm Ray worker.

    .venv/bin/python bench/fanout.py [--short 5] [--long 20] [--rounds 2] [--phase-seconds 12]
    .venv/bin/python bench/fanout.py --only pipeline --data npz --path fashion.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import service  # noqa: F401,I001  first: Ray's environment (loopback only, token auth) before ray is imported
import ray
import torch
from rich.console import Console
from rich.table import Table

from service.cluster import LocalRay
from service.executors import RayExecutor, SequentialExecutor
from service.recorders import DBRecorder
from workers.data import DataConfig, load_splits, make_loader
from workers.models import build_model
from workers.pruning import prune
from workers.schedules import retrain_schedule, dense_schedule
from workers.tasks import Finish, TrainTask, run_train_task

DATA = DataConfig(batch_size=64)
OUT = tempfile.mkdtemp(prefix="ladle-fanout-")


def tasks_for(parent, masks, m: int, epochs: int) -> list[TrainTask]:
    spe = len(make_loader(load_splits(DATA, 0).train, DATA.batch_size, shuffle=True))
    dense = dense_schedule("linear", 0.1, 10 * spe)
    lrs = retrain_schedule("llr", epochs * spe, dense)
    return [TrainTask(name=f"ingredient{i}", arch="resnet20", data=DATA, data_seed=0, lrs=lrs, epochs=epochs,
                      seed=i, init_state=parent, masks=masks, threads=1,
                      finish=Finish(url=f"{OUT}/ingredient{i}.safetensors", recal_fraction=0.2, probs=True))
            for i in range(m)]


def phase(executor, tasks) -> tuple[float, float]:
    """(wall seconds of the phase, sum of the ingredients' seconds inside training steps)."""
    t0 = time.perf_counter()
    outs = executor.run(tasks, lambda name, row: None)
    wall = time.perf_counter() - t0
    for o in outs:
        if isinstance(o, BaseException):
            raise o
    return wall, sum(o.train_seconds for o in outs)


def _train_in_process(task: TrainTask) -> float:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_train_task(task)
    return time.perf_counter() - t0


def plain_processes(task: TrainTask, n: int) -> float:
    """Wall seconds for `n` fresh processes (no Ray) that each train `task` at once, after their set-up:
    what this machine gives n independent single-thread trainings."""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(n) as pool:
        pool.map(_train_in_process, [dataclasses.replace(task, epochs=1, lrs=task.lrs[:len(task.lrs) // task.epochs])] * n)
        t0 = time.perf_counter()             # the processes are up and their data loaded: time the training only
        pool.map(_train_in_process, [task] * n)
        return time.perf_counter() - t0


def pipeline_phases(args, console: Console) -> Table:
    """Part 2: the wall time of one pipeline phase with 1 and with 2 ingredients, through the driver's code."""
    from service.artifacts import ArtifactStore
    from service.pipeline import Pipeline
    from service.access import Access
    from service.spec import parse_spec
    from service.store import Store
    from workers.checkpoint import Checkpoint, save

    data = {"name": args.data, "path": args.path, "batch_size": 128}
    splits = load_splits(DataConfig(name=args.data, path=args.path, batch_size=128), 0)
    torch.manual_seed(0)
    dense = build_model("mlp", num_classes=splits.num_classes, in_shape=splits.in_shape)
    spe = len(make_loader(splits.train, 128, shuffle=True))
    ckpt = str(Path(OUT) / "dense.safetensors")
    save(ckpt, Checkpoint(state=dense.state_dict(), meta={"arch": "mlp", "dense_schedule": {
        "kind": "linear", "lr": 0.1, "epochs": 10, "steps_per_epoch": spe}}))
    # calibrate the ingredient length: seconds per MLP epoch on one thread (after a first, set-up call)
    probe = TrainTask(name="probe", arch="mlp", data=DataConfig(name=args.data, path=args.path, batch_size=128),
                      data_seed=0, lrs=[0.01] * spe, epochs=1, threads=1)
    run_train_task(probe)
    t0 = time.perf_counter()
    run_train_task(probe)
    epochs = max(1, round(args.phase_seconds / (time.perf_counter() - t0)))
    console.print(f"pipeline: MLP on {args.data}, {epochs} retraining epochs per ingredient")
    ceiling_task = TrainTask(name="ceiling", arch="mlp", data=probe.data, data_seed=0, lrs=[0.01] * (epochs * spe),
                             epochs=epochs, threads=1)
    store = Store(f"sqlite:///{OUT}/ladle.db")
    times: dict[int, list[dict]] = {1: [], 2: []}
    ceiling: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for m in (1, 2):
            ceiling[m].append(plain_processes(ceiling_task, m))
            spec = parse_spec({"name": f"fanout m={m}", "model": {"arch": "mlp", "checkpoint": ckpt}, "data": data,
                               "prune": {"target_sparsity": 0.5, "phases": 1}, "retrain": {"epochs": epochs},
                               "soup": {"ingredients": m, "min_ingredients": 1}},
                              access=Access.trusting())          # the bench's own files, not a user's
            job = store.create_job(spec)
            executor = RayExecutor(cpus=1)
            executor.warm_up(m)                     # the driver warms its pool while phase 0 runs
            result = Pipeline(spec, executor, DBRecorder(store, job.id), ArtifactStore(OUT), prefix=f"jobs/{job.id}",
                              epoch_checkpoints=True).run()
            executor.shutdown()
            runs = [r.metrics for r in store.runs(job.id, kind="ingredient")]
            p1 = result.phases[1]
            times[m].append(dict(p1.seconds, train=statistics.fmean(r["train_seconds"] for r in runs),
                                 latency=p1.seconds["retrain"] - max(r["seconds"] for r in runs),
                                 driver_share=100 * p1.seconds["driver_cpu"] / p1.metrics["cpu_seconds"]))
    table = Table(title=f"One pipeline phase on {args.cpus} CPUs (MLP, {args.data}, {epochs} epochs per ingredient, "
                        f"mean of {args.rounds}): driver share = phase − retrain")
    for col in ("ingredients", "phase s", "retrain s", "in-worker training s", "result latency s", "prune s", "soup s",
                "eval s", "driver share s", "driver CPU s", "driver CPU %", "vs m=1"):
        table.add_column(col, justify="right")
    base = statistics.fmean(t["total"] for t in times[1])
    limit = statistics.fmean(ceiling[2]) / statistics.fmean(ceiling[1])
    table.caption = (f"the machine's own ceiling: {epochs} epochs in 2 plain processes at once take {limit:.3f}x as long "
                     f"as in 1 ({statistics.fmean(ceiling[1]):.2f} s vs {statistics.fmean(ceiling[2]):.2f} s, no Ray, no "
                     f"driver); the phase ratio over that ceiling is Ladle's own cost")
    for m, rows in times.items():
        mean = {k: statistics.fmean(t.get(k, 0.0) for t in rows)
                for k in ("total", "retrain", "train", "latency", "prune", "soup", "eval", "driver_cpu", "driver_share")}
        table.add_row(str(m), f"{mean['total']:.2f}", f"{mean['retrain']:.2f}", f"{mean['train']:.2f}",
                      f"{mean['latency']:.2f}", f"{mean['prune']:.2f}",
                      f"{mean['soup']:.2f}", f"{mean['eval']:.2f}", f"{mean['total'] - mean['retrain']:.2f}",
                      f"{mean['driver_cpu']:.2f}", f"{mean['driver_share']:.1f}", f"{mean['total'] / base:.3f}x")
    return table


def phase0_robustness(args, console: Console) -> Table:
    """Part 3: phase 0 of a ResNet-20 job given a dense checkpoint (scores and the one-shot robustness
    curve over the default grid, BatchNorm recalibrated) run in the driver's process (the sequential
    executor: where it ran before the thin driver) and as a step on a warm Ray worker, alternated."""
    from service.access import Access
    from service.artifacts import ArtifactStore
    from service.executors import SequentialExecutor
    from service.pipeline import Pipeline
    from service.recorders import LocalRecorder
    from service.spec import parse_spec
    from workers.checkpoint import Checkpoint, save

    splits = load_splits(DataConfig(name=args.data, path=args.path, batch_size=128), 0)
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=splits.num_classes, in_shape=splits.in_shape)
    ckpt = str(Path(OUT) / "resnet20.safetensors")
    save(ckpt, Checkpoint(state=dense.state_dict(), meta={"arch": "resnet20"}))
    spec = parse_spec({"name": "phase0", "model": {"arch": "resnet20", "checkpoint": ckpt},
                       "data": {"name": args.data, "path": args.path, "batch_size": 128},
                       "prune": {"target_sparsity": 0.5, "phases": 1}}, access=Access.trusting())
    walls: dict[str, list[tuple[float, float, float]]] = {"driver": [], "worker": []}
    for r in range(args.rounds):
        for where in ("driver", "worker"):
            executor = SequentialExecutor() if where == "driver" else RayExecutor(cpus=1)
            if where == "worker":
                executor.warm_up(1)
            pipe = Pipeline(spec, executor, LocalRecorder(progress=False, quiet=True), ArtifactStore(OUT),
                            prefix=f"p0-{where}-{r}")
            ctx = pipe.context()
            cpu0 = time.process_time()
            _, summary = pipe._dense(ctx)
            walls[where].append((summary.seconds["total"], summary.seconds.get("robustness", 0.0),
                                 time.process_time() - cpu0))
            if where == "worker":
                executor.shutdown()
    table = Table(title=f"Phase 0 of ResNet-20 on {args.data} from a checkpoint, robustness curve at "
                        f"{len(spec.prune.robustness)} sparsities (mean of {args.rounds})")
    for col in ("runs in", "phase 0 s", "robustness s", "driver CPU s"):
        table.add_column(col, justify="right")
    for where, rows in walls.items():
        table.add_row("the driver's process" if where == "driver" else "a Ray worker",
                      *(f"{statistics.fmean(x[i] for x in rows):.2f}" for i in range(3)))
    table.caption = "driver CPU: the driver process's own CPU-seconds over phase 0 (in-process: the work itself)"
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=float, default=5.0, help="target seconds per short ingredient")
    ap.add_argument("--long", type=float, default=20.0, help="target seconds per long ingredient")
    ap.add_argument("--rounds", type=int, default=2, help="warm Ray phases to average per case")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--phase-seconds", type=float, default=12.0, help="target seconds per pipeline ingredient")
    ap.add_argument("--data", default="fashion_mnist", help="dataset of the pipeline part")
    ap.add_argument("--path", default=None, help="its data.path (e.g. an npz file)")
    ap.add_argument("--only", choices=("executor", "pipeline", "phase0"), default=None)
    args = ap.parse_args()
    console = Console(width=150)
    torch.set_num_threads(1)
    head = LocalRay(num_cpus=args.cpus).start()       # the same embedded head the service starts
    try:
        ray.init(address=head.address, log_to_driver=False)
        tables = []
        if args.only in (None, "executor"):
            tables.append(executor_phases(args, console))
        if args.only in (None, "pipeline"):
            tables.append(pipeline_phases(args, console))
        if args.only in (None, "phase0"):
            tables.append(phase0_robustness(args, console))
        for table in tables:
            console.print(table)
    finally:
        ray.shutdown()
        head.stop()
        shutil.rmtree(OUT, ignore_errors=True)


def executor_phases(args, console: Console) -> Table:
    """Part 1: sequential vs Ray (cold, warm) for resnet20 ingredients of about --short and --long seconds."""
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
    return table


if __name__ == "__main__":
    main()
