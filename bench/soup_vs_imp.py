"""The study: IMP(k), IMP(m·k) and SMS(m, k) as real jobs through the service, from one dense model per seed.

For each seed one dense model is trained to convergence (a job of its own), then pruned to each target
sparsity in T phases by three methods, each a job submitted through the REST API and run by the Ray
executor:
  IMP(k)       1 ingredient, k retraining epochs per phase, all the machine's CPUs for it
  IMP(m·k)     1 ingredient, m·k epochs per phase (the retraining compute of SMS), all the CPUs
  SMS(m, k)    m ingredients of k epochs each in parallel (1 CPU each), averaged into a uniform soup
The jobs run one at a time, so each one's wall time is its own. Printed: mean ± std test accuracy per
phase and method over the seeds; the soup against its best and mean ingredient and against the
ingredients' prediction ensemble; wall time, CPU-seconds and epochs per method. Written under a
folder it prints: results.json, table.md and accuracy_vs_sparsity.png (matplotlib).

    .venv/bin/python bench/soup_vs_imp.py                                    # lenet5, Fashion-MNIST, 3 seeds
    .venv/bin/python bench/soup_vs_imp.py --arch resnet20 --train-subset 10000 --dense-epochs 12
    .venv/bin/python bench/soup_vs_imp.py --data digits --arch mlp --seeds 1   # a quick look

Fashion-MNIST comes from Debian's package dataset-fashion-mnist (`make bench` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def mean_std(xs: list[float], scale: float = 100.0, signed: bool = False) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.fmean(xs):{'+' if signed else ''}.2f} ± {scale * sd:.2f}"


def subset_npz(n: int, seed: int, out: Path) -> str:
    """A class-stratified subset of n Fashion-MNIST training images (the full test set) as an npz file."""
    import numpy as np

    from workers.data import _load_source
    src = _load_source("fashion_mnist", None, 0)
    rng = np.random.default_rng(seed)
    per_class = n // 10
    keep = np.concatenate([rng.permutation(np.flatnonzero(src.y_train == c))[:per_class] for c in range(10)])
    path = out / f"fashion_mnist_{n}.npz"
    np.savez(path, x_train=src.x_train[keep], y_train=src.y_train[keep], x_test=src.x_test, y_test=src.y_test)
    return str(path)


def methods(args) -> dict[str, dict]:
    k, m, cpus = args.epochs, args.ingredients, args.cpus
    one = {"ingredients": 1, "min_ingredients": 1}
    return {
        f"IMP(k={k})": {"retrain": {"epochs": k}, "soup": one, "resources": {"cpus_per_ingredient": cpus}},
        f"IMP({m}k={m * k})": {"retrain": {"epochs": m * k}, "soup": one, "resources": {"cpus_per_ingredient": cpus}},
        f"SMS(m={m}, k={k})": {"retrain": {"epochs": k}, "soup": {"ingredients": m, "min_ingredients": 1},
                               "resources": {"cpus_per_ingredient": 1}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--path", default=None, help="data.path (npz, imagefolder, ...)")
    ap.add_argument("--train-subset", type=int, default=0, help="Fashion-MNIST: train on a stratified subset")
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--sparsities", default="0.9:3,0.98:4", help="target:phases, comma-separated")
    ap.add_argument("-m", "--ingredients", type=int, default=3)
    ap.add_argument("-k", "--epochs", type=int, default=2, help="retraining epochs per phase (per ingredient)")
    ap.add_argument("--dense-epochs", type=int, default=15)
    ap.add_argument("--dense-lr", type=float, default=None, help="default: the zoo's suggested LR for --arch")
    ap.add_argument("--schedule", default="llr")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray head")
    ap.add_argument("--out", type=Path, default=None, help="where to write the results (default: a new folder)")
    args = ap.parse_args()
    console = Console(width=160)
    out = args.out or Path(tempfile.mkdtemp(prefix="ladle-study-", dir=ROOT / ".ladle" if (ROOT / ".ladle").is_dir()
                                            else None))
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"
    os.environ.update(LADLE_HOME=str(home), LADLE_MAX_CONCURRENT_JOBS="1")
    os.environ.pop("LADLE_DATABASE_URL", None)
    os.environ.pop("LADLE_ARTIFACTS", None)
    os.environ.pop("LADLE_RAY_ADDRESS", None)

    from api.client import Client
    from api.server import BackgroundServer
    from service.runtime import Runtime
    from workers.models import suggested_lr

    data = {"name": args.data, "path": args.path, "batch_size": args.batch_size}
    if args.train_subset:
        data = {"name": "npz", "path": subset_npz(args.train_subset, 0, out), "batch_size": args.batch_size}
    dense_lr = args.dense_lr or suggested_lr(args.arch) or 0.1
    targets = [(float(a), int(b)) for a, b in (t.split(":") for t in args.sparsities.split(","))]
    plan = methods(args)
    base = {"model": {"arch": args.arch}, "data": data,
            "dense": {"epochs": args.dense_epochs, "lr": dense_lr},
            "retrain": {"schedule": args.schedule}}
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": f"{platform.node()}, "
                     f"{os.cpu_count()} CPUs, {platform.platform()}", "date": time.strftime("%Y-%m-%d"),
                     "dense": [], "runs": []}
    started = time.perf_counter()

    def wait(c: Client, job: dict) -> dict:
        job = c.wait(job["id"], progress=False)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['name']} {job['status']}: {job['error']}")
        return job

    with BackgroundServer(Runtime(num_cpus=args.cpus)) as server, Client(server.url) as c:
        console.print(f"service at {server.url} (dashboard {server.url}/); results go to {out}")
        for seed in range(args.seeds):
            dense_spec = dict(base, seed=seed, name=f"dense seed {seed}",
                              prune={"target_sparsity": 0.0, "phases": 1},
                              retrain={"epochs": 1, "schedule": args.schedule},
                              soup={"ingredients": 1, "min_ingredients": 1},
                              resources={"cpus_per_ingredient": args.cpus})
            job = wait(c, c.submit(dense_spec))
            dense_phase = c.phases(job["id"])[0]
            dense_uri = server.runtime.store.get_model(dense_phase["model_id"]).uri   # in-process server: its store
            results["dense"].append({"seed": seed, "accuracy": dense_phase["soup_accuracy"],
                                     "epochs": args.dense_epochs, "lr": dense_lr,
                                     "wall_seconds": dense_phase["seconds"]["total"]})
            console.print(f"seed {seed}: dense {args.arch} {args.dense_epochs} epochs at lr {dense_lr:g}: test accuracy "
                          f"{100 * dense_phase['soup_accuracy']:.2f}% ({time.perf_counter() - started:.0f} s)")
            for target, phases in targets:
                for name, overrides in plan.items():
                    spec = dict(base, seed=seed, name=f"{name} S={target} seed {seed}",
                                model={"arch": args.arch, "checkpoint": dense_uri},
                                prune={"target_sparsity": target, "phases": phases},
                                retrain=dict(base["retrain"], **overrides["retrain"]),
                                soup=overrides["soup"], resources=overrides["resources"])
                    job = wait(c, c.submit(spec))
                    ph = c.phases(job["id"])
                    results["runs"].append({"seed": seed, "target": target, "method": name, "job": job["id"],
                                            "wall_seconds": sum(p["seconds"]["total"] for p in ph[1:]),
                                            "cpu_seconds": sum(p["cpu_seconds"] or 0 for p in ph[1:]),
                                            "epochs": sum(p["epochs_trained"] or 0 for p in ph[1:]),
                                            "phases": [{k: p[k] for k in ("index", "sparsity", "soup_accuracy",
                                                                          "ingredient_accuracies", "gain_over_best",
                                                                          "gain_over_mean", "ensemble_accuracy")}
                                                       for p in ph]})
                    console.print(f"  {name} S={target}: {100 * ph[-1]['soup_accuracy']:.2f}% "
                                  f"({time.perf_counter() - started:.0f} s)")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report(results, plan, targets, out, console)


def report(results: dict, plan: dict, targets: list, out: Path, console: Console) -> None:
    runs = results["runs"]
    dense = results["dense"]
    args = results["args"]
    md = [f"# {args['arch']} on {args['data']}{' (subset ' + args['train_subset'] + ')' if args['train_subset'] != '0' else ''}"
          f": IMP vs SMS through the service", "",
          f"{results['date']}, {results['machine']}; {len(dense)} seeds; dense {dense[0]['epochs']} epochs at lr "
          f"{dense[0]['lr']:g}: test accuracy {mean_std([d['accuracy'] for d in dense])} %", ""]
    for target, phases in targets:
        table = Table(title=f"{args['arch']}, sparsity {target} in {phases} phases: test accuracy (%) mean ± std "
                            f"over {len(dense)} seeds")
        cols = ["phase", "sparsity", *plan, "SMS − best ingr. (pp)", "SMS − mean ingr. (pp)", "ensemble (%)"]
        for col in cols:
            table.add_column(col, justify="right")
        sms = [r for r in runs if r["target"] == target and r["method"].startswith("SMS")]
        md += [f"## sparsity {target} in {phases} phases", "", "| " + " | ".join(cols) + " |",
               "|" + "---|" * len(cols)]
        for t in range(1, phases + 1):
            row = [str(t), f"{sms[0]['phases'][t]['sparsity']:.3f}"]
            for name in plan:
                row.append(mean_std([r["phases"][t]["soup_accuracy"] for r in runs
                                     if r["target"] == target and r["method"] == name]))
            row += [mean_std([r["phases"][t]["gain_over_best"] for r in sms], signed=True),
                    mean_std([r["phases"][t]["gain_over_mean"] for r in sms], signed=True),
                    mean_std([r["phases"][t]["ensemble_accuracy"] for r in sms])]
            table.add_row(*row)
            md.append("| " + " | ".join(row) + " |")
        console.print(table)
        cost = Table(title=f"cost per method at sparsity {target} (phases 1..{phases}, mean over seeds)")
        for col in ("method", "wall s", "CPU s", "epochs"):
            cost.add_column(col, justify="right")
        md += ["", "| method | wall s | CPU s | epochs |", "|---|---|---|---|"]
        for name in plan:
            mine = [r for r in runs if r["target"] == target and r["method"] == name]
            cells = [name, mean_std([r["wall_seconds"] for r in mine], 1.0), mean_std([r["cpu_seconds"] for r in mine], 1.0),
                     f"{statistics.fmean(r['epochs'] for r in mine):.0f}"]
            cost.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
        console.print(cost)
    (out / "table.md").write_text("\n".join(md) + "\n")
    plot(results, plan, targets, out / "accuracy_vs_sparsity.png")
    console.print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'accuracy_vs_sparsity.png'}")


def plot(results: dict, plan: dict, targets: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
    dense_acc = statistics.fmean(d["accuracy"] for d in results["dense"])
    for ax, (target, phases) in zip(axes[0], targets):
        for name in plan:
            mine = [r for r in runs if r["target"] == target and r["method"] == name]
            xs = [100 * mine[0]["phases"][t]["sparsity"] for t in range(phases + 1)]
            ys = [100 * statistics.fmean(r["phases"][t]["soup_accuracy"] for r in mine) for t in range(phases + 1)]
            sd = [100 * (statistics.stdev([r["phases"][t]["soup_accuracy"] for r in mine]) if len(mine) > 1 else 0)
                  for t in range(phases + 1)]
            wall = statistics.fmean(r["wall_seconds"] for r in mine)
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=f"{name} ({wall:.0f} s)")
        ax.axhline(100 * dense_acc, color="grey", linestyle=":", label="dense")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{results['args']['arch']}, {target:.0%} in {phases} phases")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
