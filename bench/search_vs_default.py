"""Does a searched retraining schedule pay for its search? On digits (an MLP, 3 phases to 90% sparsity by
default, 4 ingredients per phase, 5 retraining epochs), the same job three ways, 3 seeds each, one run:
  default LLR   the spec's linear schedule at the dense run's peak LR
  searched      a Ray Tune search before every phase over the schedule (llr, allr, clr, slr, ft) and the
                initial LR (log-uniform 0.005..0.5): 8 trials with ASHA, the winner feeds the soup
  ALLR          the adaptive linear schedule, no search
and prints the SMS soup's final test accuracy (mean ± std over seeds), the total compute in epochs
(dense + search trials as far as they ran + ingredients) and the wall time, on a local Ray cluster.

    .venv/bin/python bench/search_vs_default.py [--seeds 0 1 2] [--trials 8] [--sparsity 0.9] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import service  # noqa: F401,I001  first: Ray's environment (loopback only, token auth) before ray is imported
import ray
from rich.console import Console
from rich.table import Table

from service.artifacts import ArtifactStore
from service.cluster import LocalRay
from service.executors import RayExecutor
from service.pipeline import Pipeline
from service.recorders import DBRecorder
from service.spec import parse_spec
from service.store import Store

BASE = {"model": {"arch": "mlp"}, "data": {"name": "digits"}, "dense": {"epochs": 10, "lr": 0.1},
        "prune": {"target_sparsity": 0.9, "phases": 3}, "retrain": {"epochs": 5, "schedule": "llr"},
        "soup": {"ingredients": 4}}


def arms(trials: int, sparsity: float, epochs: int) -> dict[str, dict]:
    space = {"schedule": {"choice": ["llr", "allr", "clr", "slr", "ft"]}, "lr": {"loguniform": [0.005, 0.5]}}
    base = dict(BASE, prune={"target_sparsity": sparsity, "phases": 3}, retrain={"epochs": epochs, "schedule": "llr"})
    return {"default LLR": base,
            "searched": dict(base, search={"space": space, "trials": trials, "phases": "all"}),
            "ALLR": dict(base, retrain={"epochs": epochs, "schedule": "allr"})}


def epochs_run(store: Store, job_id: str) -> dict[str, int]:
    """Epochs trained per run kind, counted from the stored per-epoch metrics."""
    kinds = {r.name: r.kind for r in store.runs(job_id)}
    out: dict[str, int] = {}
    for row in store.metrics(job_id, name="train_loss"):
        out[kinds[row["run"]]] = out.get(kinds[row["run"]], 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=5, help="retraining epochs per phase")
    args = ap.parse_args()
    console = Console(width=120)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, LocalRay(num_cpus=2) as head:
        ray.init(address=head.address, log_to_driver=False)
        store = Store(f"sqlite:///{tmp}/ladle.db")
        for seed in args.seeds:
            for arm, spec_dict in arms(args.trials, args.sparsity, args.epochs).items():
                spec = parse_spec(dict(spec_dict, name=f"{arm}-{seed}", seed=seed))
                job = store.create_job(spec)
                executor = RayExecutor(cpus=1)
                t0 = time.perf_counter()
                try:
                    result = Pipeline(spec, executor, DBRecorder(store, job.id), ArtifactStore(f"{tmp}/artifacts"),
                                      prefix=f"jobs/{job.id}").run()
                finally:
                    executor.shutdown()
                wall = time.perf_counter() - t0
                last = result.phases[-1]
                epochs = epochs_run(store, job.id)
                chosen = [r.config.config for r in store.runs(job.id, kind="search_trial") if r.metrics.get("chosen")]
                results.setdefault(arm, []).append({"acc": last.metrics["soup_accuracy"], "sparsity": last.sparsity,
                                                    "epochs": sum(epochs.values()), "search": epochs.get("search_trial", 0),
                                                    "wall": wall, "chosen": chosen})
                console.print(f"seed {seed} {arm}: soup {100 * last.metrics["soup_accuracy"]:.2f}% at sparsity "
                              f"{last.sparsity:.3f}, {sum(epochs.values())} epochs, {wall:.0f} s"
                              + ("; chosen: " + ", ".join(f"{c['schedule']} lr={c['lr']:.3g}" for c in chosen)
                                 if chosen else ""))
        ray.shutdown()
    table = Table(title=f"SMS on digits, MLP, 3 phases to {100 * args.sparsity:g}% sparsity, m=4, {args.epochs} "
                        f"retraining epochs; seeds {args.seeds}; 2 CPUs")
    for col in ("retraining", "soup test acc (%)", "sparsity", "epochs (all)", "of which search", "wall (s)"):
        table.add_column(col, justify="right")

    def ms(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
        xs = [scale * x for x in xs]
        return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else f"{xs[0]:.{digits}f}"

    for arm, rows in results.items():
        table.add_row(arm, ms([r["acc"] for r in rows], 100), f"{statistics.fmean(r['sparsity'] for r in rows):.3f}",
                      ms([r["epochs"] for r in rows], digits=0), ms([r["search"] for r in rows], digits=0),
                      ms([r["wall"] for r in rows], digits=0))
    console.print(table)


if __name__ == "__main__":
    main()
