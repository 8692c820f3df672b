"""Accuracy of channel pruning against unstructured pruning at equal parameter count, both as SMS jobs.

For each seed, one job with `prune.structure: channels` (a share of the channels removed over T phases,
m ingredients per phase, uniform soups) trains the dense model in its phase 0; a second job starts from that
same dense checkpoint and prunes weight by weight (global magnitude) to the sparsity that leaves as many
parameters as the channel-pruned model has once its channels are taken out:

    s_unstructured = 1 - (P_channels - P_other) / P_prunable

where P_channels counts every parameter of the physically smaller model (workers.structured.shrink: what its
onnx / compact export holds), P_other the dense model's parameters outside conv/linear weights (biases,
BatchNorm) and P_prunable its conv/linear weights. Both jobs run in this process (SequentialExecutor, the
path of `ladle run --local`), one after the other. Printed and written (structured-soups.json / .md under
--out): per phase, mean ± std over the seeds of the soup's test accuracy, the parameters each model keeps
(channels: physically; unstructured: nonzero) and the MACs per example (an unstructured model keeps the dense
MACs on a dense engine; the channel-pruned one's are those of its smaller shapes).

    .venv/bin/python bench/structured_soups.py                       # lenet5, Fashion-MNIST subset, 3 seeds
    .venv/bin/python bench/structured_soups.py --data digits --arch mlp --seeds 1 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import service  # noqa: E402,F401  (before anything imports ray)


def mean_std(xs: list[float], scale: float = 100.0, fmt: str = ".2f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.fmean(xs):{fmt}} ± {scale * sd:{fmt}}"


def run_job(spec_dict: dict, root: Path):
    from service.access import Access
    from service.driver import run_in_process
    from service.recorders import LocalRecorder
    from service.spec import parse_spec
    spec = parse_spec(spec_dict, access=Access.trusting())     # this machine's own user, as `ladle run --local`
    rec = LocalRecorder(progress=False, quiet=True)
    t0 = time.perf_counter()
    result = run_in_process(spec, str(root), rec)
    return spec, rec, result, time.perf_counter() - t0


def dense_counts(arch: str, in_shape: tuple[int, ...], kwargs: dict) -> tuple[int, int]:
    """(all parameters, conv/linear weights) of the dense model."""
    from workers.models import build_model
    from workers.pruning import prunable_names
    m = build_model(arch, num_classes=10, in_shape=in_shape, **kwargs)
    params = dict(m.named_parameters())
    return sum(p.numel() for p in params.values()), sum(params[n].numel() for n in prunable_names(m))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--channels", type=float, default=0.5, help="share of the channels removed at the end")
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--ingredients", type=int, default=2)
    ap.add_argument("--dense-epochs", type=int, default=4)
    ap.add_argument("--retrain-epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=10000, help="Fashion-MNIST training images (0: all)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the script end to end")
    ap.add_argument("--out", default=str(ROOT / "bench" / "figures"))
    args = ap.parse_args()
    if args.quick:
        args.dense_epochs, args.retrain_epochs, args.phases, args.ingredients = 2, 1, 1, 2
    import torch
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    results: dict[str, list] = {"channels": [], "unstructured": []}
    with tempfile.TemporaryDirectory(prefix="ladle-structured-soups-") as tmp:
        data: dict = {"name": args.data, "val_fraction": 0.1, "batch_size": 128}
        if args.data == "fashion_mnist" and args.train_subset:
            sys.path.insert(0, str(ROOT / "bench"))
            from soup_vs_imp import subset_npz
            data = {"name": "npz", "path": subset_npz(args.train_subset, 0, Path(tmp)), "val_fraction": 0.1,
                    "batch_size": 128}
        base = {"model": {"arch": args.arch}, "data": data, "dense": {"epochs": args.dense_epochs, "lr": 0.1},
                "retrain": {"epochs": args.retrain_epochs, "schedule": "llr"},
                "soup": {"ingredients": args.ingredients, "min_ingredients": args.ingredients}}
        for seed in range(args.seeds):
            ch_spec = dict(base, name=f"channels-{seed}", seed=seed,
                           prune={"structure": "channels", "target_sparsity": args.channels, "phases": args.phases,
                                  "robustness": None})
            spec, rec, res, secs = run_job(ch_spec, Path(tmp) / f"ch{seed}")
            soup = next(m for m in rec.models if m["id"] == res.final_model_id)
            dense = next(m for m in rec.models if m["kind"] == "dense")
            s = soup["metrics"]["structure"]
            from workers.checkpoint import load
            in_shape = tuple(load(dense["uri"]).info.in_shape)
            total, prunable = dense_counts(args.arch, in_shape, {})
            target = 1 - (s["parameters"] - (total - prunable)) / prunable
            results["channels"].append({"seed": seed, "seconds": secs, "parameters": s["parameters"],
                                        "macs": s["macs"], "dense_macs": s["dense_macs"], "dense_parameters": total,
                                        "phases": [p.flat() for p in res.phases]})
            un_spec = dict(base, name=f"unstructured-{seed}", seed=seed,
                           model={"arch": args.arch, "checkpoint": dense["uri"]},
                           prune={"target_sparsity": round(target, 6), "phases": args.phases, "robustness": None})
            spec, rec, res, secs = run_job(un_spec, Path(tmp) / f"un{seed}")
            usoup = next(m for m in rec.models if m["id"] == res.final_model_id)
            results["unstructured"].append({"seed": seed, "seconds": secs, "parameters": usoup["nonzeros"],
                                            "macs": s["dense_macs"], "dense_macs": s["dense_macs"],
                                            "dense_parameters": total, "target_sparsity": target,
                                            "phases": [p.flat() for p in res.phases]})
            print(f"seed {seed}: channels soup {soup['metrics']['test_accuracy']:.4f} with {s['parameters']:,} "
                  f"parameters; unstructured soup {usoup['metrics']['test_accuracy']:.4f} with "
                  f"{usoup['nonzeros']:,} nonzero (sparsity {target:.4f})", flush=True)
    report(results, args, command, out)


def report(results: dict, args, command: str, out: Path) -> None:
    phases = range(1, args.phases + 1)
    lines = [f"Command: `{command}`  ", f"Machine: {platform.node()}, {os.cpu_count()} CPUs, "
             f"{platform.processor() or platform.machine()}; 1 thread; "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
             f"{args.arch} on {args.data}"
             f"{f' ({args.train_subset} training images)' if args.train_subset and args.data == 'fashion_mnist' else ''}, "
             f"{args.seeds} seeds, {args.phases} phases, {args.ingredients} ingredients x {args.retrain_epochs} epoch(s) "
             f"per phase, uniform soups; channels: {100 * args.channels:.0f}% of the channels removed at the end; "
             f"unstructured: global magnitude to the same parameter count.", "",
             "| method | phase | soup test accuracy (%) | parameters kept | MACs per example | "
             "share of dense MACs |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, runs in results.items():
        for t in phases:
            accs = [next(p for p in r["phases"] if p["index"] == t).get("soup_accuracy") for r in runs]
            last = t == args.phases
            params = mean_std([r["parameters"] for r in runs], 1, ",.0f") if last else "—"
            macs = mean_std([r["macs"] for r in runs], 1, ",.0f") if last else "—"
            share = f"{statistics.fmean(r['macs'] / r['dense_macs'] for r in runs):.2f}" if last else "—"
            lines.append(f"| {method} | {t} | {mean_std(accs)} | {params} | {macs} | {share} |")
    ch = [next(p for p in r["phases"] if p["index"] == args.phases)["soup_accuracy"] for r in results["channels"]]
    un = [next(p for p in r["phases"] if p["index"] == args.phases)["soup_accuracy"] for r in results["unstructured"]]
    diff = statistics.fmean(c - u for c, u in zip(ch, un))
    lines += ["", f"At equal parameter count, the channel-pruned soup is {100 * abs(diff):.2f} pp "
                  f"{'above' if diff > 0 else 'below'} the unstructured soup (mean over {len(ch)} seeds); it computes "
                  f"{statistics.fmean(r['macs'] / r['dense_macs'] for r in results['channels']):.2f} of the dense "
                  f"MACs, the unstructured one all of them on a dense engine."]
    text = "\n".join(lines)
    print(text)
    (out / "structured-soups.md").write_text(text + "\n")
    (out / "structured-soups.json").write_text(json.dumps({"command": command, "args": vars(args),
                                                           "results": results}, indent=1, default=str))
    print(f"written: {out / 'structured-soups.md'}, {out / 'structured-soups.json'}")


if __name__ == "__main__":
    main()
