"""IMP vs IMP with m-times longer retraining vs Sparse Model Soups, to the same sparsity.

For each seed, one dense model is trained and then pruned in T phases by three methods:
  IMP        1 ingredient,  k retraining epochs per phase
  IMP-long   1 ingredient,  m*k epochs per phase (the same retraining compute as SMS)
  SMS        m ingredients, k epochs each, averaged (uniform soup)
Prints mean ± std test accuracy per phase and method over the seeds, and the soup's gain over the
mean and over the best of its ingredients.

    .venv/bin/python bench/soup_vs_imp.py                       # digits, mlp, 3 seeds
    .venv/bin/python bench/soup_vs_imp.py --data npz --path data.npz --arch lenet5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from service.artifacts import ArtifactStore
from service.pipeline import Pipeline, SequentialExecutor
from service.recorder import LocalRecorder
from service.spec import parse_spec


def run(spec: dict, out: Path):
    rec = LocalRecorder(progress=False, quiet=True)
    result = Pipeline(parse_spec(spec), SequentialExecutor(), rec, ArtifactStore(str(out))).run()
    return result, rec


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.fmean(xs):.2f} ± {100 * sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--path", default=None)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--phases", type=int, default=3)
    ap.add_argument("-m", "--ingredients", type=int, default=4)
    ap.add_argument("-k", "--epochs", type=int, default=3, help="retraining epochs per phase (per ingredient)")
    ap.add_argument("--dense-epochs", type=int, default=20)
    ap.add_argument("--schedule", default="llr")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    console = Console(width=140)

    base = {"model": {"arch": args.arch}, "data": {"name": args.data, "path": args.path, "batch_size": 64},
            "dense": {"epochs": args.dense_epochs, "lr": 0.1},
            "prune": {"target_sparsity": args.sparsity, "phases": args.phases},
            "retrain": {"epochs": args.epochs, "schedule": args.schedule}}
    methods = {
        "IMP": {"retrain": dict(base["retrain"]), "soup": {"ingredients": 1, "min_ingredients": 1}},
        f"IMP {args.ingredients}x epochs": {"retrain": dict(base["retrain"], epochs=args.ingredients * args.epochs),
                                            "soup": {"ingredients": 1, "min_ingredients": 1}},
        f"SMS m={args.ingredients}": {"retrain": dict(base["retrain"]),
                                      "soup": {"ingredients": args.ingredients, "min_ingredients": 1}},
    }
    acc: dict[str, dict[int, list[float]]] = {name: {} for name in methods}
    gains_mean: dict[int, list[float]] = {}
    gains_best: dict[int, list[float]] = {}
    seconds: dict[str, float] = {name: 0.0 for name in methods}
    sparsity: dict[int, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            # one dense model per seed, shared by all three methods
            dense_spec = dict(base, seed=seed, name=f"dense-{seed}", prune={"target_sparsity": 0.0, "phases": 1},
                              soup={"ingredients": 1, "min_ingredients": 1}, retrain={"epochs": 1})
            result, rec = run(dense_spec, Path(tmp) / f"dense{seed}")
            dense_uri = next(m["uri"] for m in rec.models if m["kind"] == "dense")
            for name, overrides in methods.items():
                spec = dict(base, seed=seed, name=name, model={"arch": args.arch, "checkpoint": dense_uri}, **overrides)
                t0 = time.perf_counter()
                result, _ = run(spec, Path(tmp) / f"{name}-{seed}".replace(" ", "_"))
                seconds[name] += time.perf_counter() - t0
                for p in result.phases:
                    acc[name].setdefault(p.phase, []).append(p.soup_accuracy)
                    sparsity[p.phase] = p.sparsity
                    if name.startswith("SMS") and p.phase > 0:
                        gains_mean.setdefault(p.phase, []).append(p.gain_over_mean)
                        gains_best.setdefault(p.phase, []).append(p.gain_over_best)
            console.print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)")

    table = Table(title=f"{args.arch} on {args.data}: test accuracy (%) mean ± std over {args.seeds} seeds, "
                        f"{args.phases} phases to sparsity {args.sparsity}, k={args.epochs}, {args.schedule}")
    table.add_column("phase", justify="right")
    table.add_column("sparsity", justify="right")
    for name in methods:
        table.add_column(name, justify="right")
    table.add_column("SMS gain vs mean ingr. (pp)", justify="right")
    table.add_column("SMS gain vs best ingr. (pp)", justify="right")
    for phase in sorted(sparsity):
        gm, gb = gains_mean.get(phase, []), gains_best.get(phase, [])
        table.add_row(str(phase), f"{sparsity[phase]:.3f}", *[mean_std(acc[n][phase]) for n in methods],
                      mean_std(gm) if gm else "—", mean_std(gb) if gb else "—")
    console.print(table)
    console.print("retraining wall time per method (all seeds, sequential): "
                  + ", ".join(f"{n}: {s:.1f} s" for n, s in seconds.items()))


if __name__ == "__main__":
    main()
