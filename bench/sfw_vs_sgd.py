"""Compression-aware dense training: SGD vs Stochastic Frank-Wolfe (SFW, arXiv 2205.11921) at equal epochs.

For each dataset and seed, two SMS jobs run in-process through the pipeline (sequential executor, no Ray):
one whose phase 0 trains the dense model with SGD (`dense.optimizer: sgd`), one with SFW over per-tensor
k-support norm balls (`dense.optimizer: sfw`); both then prune and retrain identically with SGD (same
retraining LR, schedule, ingredients). Reported per optimizer, mean ± std over the seeds:
  - the dense model's test accuracy,
  - its one-shot robustness curve: test accuracy after global magnitude pruning to each sparsity in
    SPARSITIES with only BatchNorm recalibration (no retraining),
  - the final test accuracy of the SMS job (the soup after the last phase).
Printed as tables; written to bench/figures/sfw_vs_sgd.{json,md,png}.

    .venv/bin/python bench/sfw_vs_sgd.py                      # digits (mlp) + Fashion-MNIST (lenet5, 10k subset)
    .venv/bin/python bench/sfw_vs_sgd.py --datasets digits --seeds 1      # a quick look

Kept small for a 2-core CPU machine: Fashion-MNIST trains on a stratified 10 000-image subset of its
training set (tested on the full 10 000-image test set), few epochs; see the printed settings.
The one-shot curve is the one the pipeline keeps per dense model (`prune.robustness`, measured with
`workers.robustness.one_shot_curve` on the test split right after phase 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from soup_vs_imp import mean_std, subset_npz    # the study's table cell and Fashion-MNIST subset

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,fashion_mnist")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fmnist-subset", type=int, default=10000)
    ap.add_argument("--dense-epochs", type=int, default=None, help="default: digits 20, fashion_mnist 8")
    ap.add_argument("--sfw-lr", type=float, default=None, help="SFW's peak step size (default per dataset)")
    ap.add_argument("--constraint", default="k_support")
    ap.add_argument("--k", type=float, default=0.05)
    ap.add_argument("--radius-factor", type=float, default=None, help="default per dataset")
    ap.add_argument("--rescale", default="gradient")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--ingredients", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "figures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ladle-sfw-"))
    os.environ.update(LADLE_HOME=str(work / "home"))
    os.environ.pop("LADLE_DATABASE_URL", None)
    os.environ.pop("LADLE_ARTIFACTS", None)
    (work / "home" / "data").mkdir(parents=True)     # the service reads data under LADLE_HOME/data

    from service.artifacts import ArtifactStore
    from service.executors import SequentialExecutor
    from service.pipeline import Pipeline
    from service.recorders import LocalRecorder
    from service.spec import parse_spec
    from workers.checkpoint import load
    from workers.models import suggested_lr

    # per dataset: arch, dense epochs, SGD's LR (the zoo's), SFW's step size and radius factor
    settings = {
        "digits": {"arch": "mlp", "data": {"name": "digits", "batch_size": 64}, "epochs": 20,
                   "sfw_lr": 0.1, "radius_factor": 10.0},
        "fashion_mnist": {"arch": "lenet5", "epochs": 8, "sfw_lr": 0.1, "radius_factor": 10.0,
                          "data": {"name": "npz", "batch_size": 128}},
    }
    datasets = [d for d in args.datasets.split(",") if d]
    results: dict = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, torch threads "
                                f"{args.threads}", "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in
                                                                                          vars(args).items()},
                     "sparsities": list(SPARSITIES), "runs": []}
    started = time.perf_counter()
    for ds in datasets:
        st = settings[ds]
        data = dict(st["data"])
        if ds == "fashion_mnist":
            data["path"] = subset_npz(args.fmnist_subset, 0, work / "home" / "data")
        epochs = args.dense_epochs or st["epochs"]
        sgd_lr = suggested_lr(st["arch"]) or 0.1
        sfw = {"constraint": args.constraint, "k": args.k, "rescale": args.rescale,
               "radius_factor": args.radius_factor or st["radius_factor"]}
        st_used = {"arch": st["arch"], "dense_epochs": epochs, "sgd_lr": sgd_lr, "sfw_lr": args.sfw_lr or st["sfw_lr"],
                   "sfw": sfw, "train_subset": args.fmnist_subset if ds == "fashion_mnist" else None}
        results.setdefault("settings", {})[ds] = st_used
        print(f"== {ds}: {st_used}", flush=True)
        for seed in range(args.seeds):
            for opt in ("sgd", "sfw"):
                dense = {"epochs": epochs, "lr": sgd_lr, "optimizer": "sgd"} if opt == "sgd" else \
                    {"epochs": epochs, "lr": st_used["sfw_lr"], "optimizer": "sfw", "sfw": sfw}
                spec = parse_spec({"name": f"{ds}-{opt}-{seed}", "seed": seed, "model": {"arch": st["arch"]},
                                   "data": data, "dense": dense,
                                   "prune": {"target_sparsity": args.target, "phases": args.phases,
                                             "robustness": list(SPARSITIES)},
                                   # the same SGD retraining from both dense models: peak LR = the zoo's
                                   "retrain": {"epochs": args.retrain_epochs, "schedule": "llr", "lr": sgd_lr},
                                   "soup": {"ingredients": args.ingredients, "min_ingredients": 1}})
                t0 = time.perf_counter()
                rec = LocalRecorder(progress=False)
                store = ArtifactStore(str(work / f"{ds}-{opt}-{seed}"))
                result = Pipeline(spec, SequentialExecutor(), rec, store).run()
                dense_rec = next(m for m in rec.models if m["kind"] == "dense")
                assert load(dense_rec["uri"]).meta["dense_optimizer"]["name"] == opt
                curve = {p["sparsity"]: p["accuracy"] for p in dense_rec["metrics"]["robustness"]}
                assert sorted(curve) == list(SPARSITIES)
                results["one_shot_source"] = "workers.robustness.one_shot_curve, kept by the pipeline per dense model"
                row = {"dataset": ds, "optimizer": opt, "seed": seed,
                       "dense_accuracy": result.phases[0].metrics["soup_accuracy"],
                       "one_shot": {str(s): a for s, a in curve.items()},
                       "sms_accuracy": result.phases[-1].metrics["soup_accuracy"],
                       "sms_phases": [p.metrics["soup_accuracy"] for p in result.phases],
                       "seconds": time.perf_counter() - t0}
                results["runs"].append(row)
                print(f"  {ds} seed {seed} {opt}: dense {100 * row['dense_accuracy']:.2f}%, one-shot "
                      + ", ".join(f"{s:g}:{100 * a:.1f}" for s, a in curve.items())
                      + f", SMS {100 * row['sms_accuracy']:.2f}% ({row['seconds']:.0f} s; total "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)
    results["total_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sfw_vs_sgd.json").write_text(json.dumps(results, indent=2))
    md = report(results, datasets, args)
    (args.out / "sfw_vs_sgd.md").write_text(md)
    print(md)
    plot(results, datasets, args.out / "sfw_vs_sgd.png")
    print(f"wrote {args.out / 'sfw_vs_sgd.md'}, .json and .png; {results['total_seconds']:.0f} s in all")
    shutil.rmtree(work, ignore_errors=True)          # the jobs' checkpoints and the data subset


def report(results: dict, datasets: list[str], args) -> str:
    lines = [f"Test accuracy (%), mean ± std over {args.seeds} seed(s); one-shot: global magnitude pruning, "
             f"BatchNorm recalibrated, no retraining ({results['one_shot_source']}); SMS: {args.target:g} in "
             f"{args.phases} phases, {args.ingredients} ingredients × {args.retrain_epochs} epochs, SGD "
             "retraining.", ""]
    for ds in datasets:
        st = results["settings"][ds]
        lines += [f"**{ds}** ({st['arch']}, {st['dense_epochs']} dense epochs"
                  + (f", {st['train_subset']}-image train subset" if st["train_subset"] else "")
                  + f"; SGD lr {st['sgd_lr']:g}; SFW {st['sfw']['constraint']} k={st['sfw']['k']:g}, radius factor "
                  f"{st['sfw']['radius_factor']:g}, {st['sfw']['rescale']} rescaling, lr {st['sfw_lr']:g})", ""]
        head = ["optimizer", "dense"] + [f"one-shot {s:g}" for s in SPARSITIES] + [f"SMS {args.target:g}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for opt in ("sgd", "sfw"):
            rows = [r for r in results["runs"] if r["dataset"] == ds and r["optimizer"] == opt]
            cells = [opt.upper(), mean_std([r["dense_accuracy"] for r in rows])]
            cells += [mean_std([r["one_shot"][str(s)] for r in rows]) for s in SPARSITIES]
            cells.append(mean_std([r["sms_accuracy"] for r in rows]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, datasets: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for opt, color in (("sgd", "tab:blue"), ("sfw", "tab:red")):
            rows = [r for r in results["runs"] if r["dataset"] == ds and r["optimizer"] == opt]
            xs = [100 * s for s in SPARSITIES]
            ys = [100 * statistics.fmean(r["one_shot"][str(s)] for r in rows) for s in SPARSITIES]
            sd = [100 * (statistics.stdev([r["one_shot"][str(s)] for r in rows]) if len(rows) > 1 else 0.0)
                  for s in SPARSITIES]
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, color=color, label=f"{opt.upper()} one-shot")
            dense = 100 * statistics.fmean(r["dense_accuracy"] for r in rows)
            sms = 100 * statistics.fmean(r["sms_accuracy"] for r in rows)
            ax.axhline(dense, color=color, linestyle=":", label=f"{opt.upper()} dense ({dense:.1f})")
            ax.scatter([100 * float(results["args"]["target"])], [sms], marker="*", s=150, color=color, zorder=5,
                       label=f"{opt.upper()} SMS job ({sms:.1f})")
        st = results["settings"][ds]
        ax.set_title(f"{ds}, {st['arch']}: one-shot robustness")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
