"""GPU readiness: every GPU path of the workers in one script, for a machine that has PyTorch and a GPU
but no Ray, no service, no database and no network (transformers and safetensors where present).

It runs the workers' own units of work (workers.units, workers.steps) as a Ray worker would, on CUDA:

  cnn         dense training of ResNet-20, the prune step, two ingredients retrained from the pruned
              checkpoint (recalibrated, scored, saved with their test softmax), and the greedy soup step
              with BatchNorm recalibration and the prediction ensemble: Fashion-MNIST when
              --fashion-mnist names its folder, else the synthetic dataset
  lm          Wanda, SparseGPT (50 % unstructured) and 2:4 pruning, then PERP retraining (mask_lora,
              bf16 autocast) of a LLaMA-style model with random weights (speed and correctness, not
              perplexity) of SmolLM2-135M's shape and of a ~1B-parameter shape (TinyLlama's); needs
              transformers (the rows say so when it is missing)
  2:4         a 2:4 semi-structured float16 matmul (torch.sparse.to_sparse_semi_structured through
              workers.sparse_inference.semi_structured) against the dense one, side by side
  agreement   each step on tiny inputs on the CPU and on the GPU: training, magnitude pruning, the soup,
              BatchNorm recalibration, Wanda / SparseGPT masks and weights, a PERP step (float32)

It prints one table and writes JSON (--out, default bench/figures/gpu-check.json) with the device's name,
every row's seconds, figures and verdict. Budget: under 6 minutes on one H100.

    python bench/gpu_check.py                                  # on the GPU machine, from the repository root
    python bench/gpu_check.py --fashion-mnist /usr/share/datasets/fashion-mnist
    python bench/gpu_check.py --device cpu --small             # the same code paths on the CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROWS: list[dict] = []
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def row(section: str, name: str, fn: Callable[[], dict]) -> dict:
    """Run one check; record its seconds, its figures and ok (an exception fails the row, not the run)."""
    start = time.perf_counter()
    try:
        figures = fn() or {}
        ok = bool(figures.pop("ok", True))
        error = None
    except Exception as e:  # noqa: BLE001 - every failure is a row of the report
        figures, ok, error = {}, False, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    r = {"section": section, "name": name, "ok": ok, "seconds": round(time.perf_counter() - start, 3),
         "figures": figures, "error": error}
    ROWS.append(r)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"{'ok  ' if ok else 'FAIL'} {section:<10} {name:<34} {r['seconds']:>8.2f} s  {error or shown}", flush=True)
    return r


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


# ---------------------------------------------------------------- cnn: the units of an SMS phase

def cnn(device: torch.device, tmp: Path, args: argparse.Namespace) -> None:
    from workers.config import DataConfig
    from workers.data import load_splits, make_loader
    from workers.schedules import dense_schedule
    from workers.units import Finish, Prune, Soup, TaskSpec, TrainTask

    data = (DataConfig(name="fashion_mnist", path=args.fashion_mnist, batch_size=128) if args.fashion_mnist
            else DataConfig(name="synthetic", batch_size=128))
    arch = "mlp" if args.small else "resnet20"
    spec = TaskSpec(kind="classification", arch=arch, data=data, seed=0)
    steps = len(make_loader(load_splits(data, 0).train, data.batch_size, shuffle=True))
    epochs = 1 if args.small else args.cnn_epochs
    state: dict = {}

    def dense() -> dict:
        task = TrainTask(name="dense", arch=arch, data=data, data_seed=0, epochs=epochs,
                         lrs=dense_schedule("linear", 0.1, epochs * steps, 0.05), keep_state=False,
                         finish=Finish(url=str(tmp / "dense.safetensors"), meta={"arch": arch}))
        out = task.run()
        state["dense"] = out.saved.uri
        return {"device": str(device), "dataset": data.name, "test_accuracy": out.scores["test_accuracy"],
                "gpu_seconds": out.gpu_seconds, "ok": out.scores["test_accuracy"] > 0.2}

    def prune() -> dict:
        out = Prune(name="prune", task=spec, parent=state["dense"], url=str(tmp / "pruned.safetensors"),
                    target=0.5).run()
        state["pruned"] = out.saved.uri
        return {"sparsity": out.saved.sparsity, "test_accuracy": out.scores["test_accuracy"],
                "ok": abs(out.saved.sparsity - 0.5) < 0.01}

    def ingredients() -> dict:
        outs = []
        for i in range(2):
            name = f"ingredient{i}"
            outs.append(TrainTask(name=name, arch=arch, data=data, data_seed=0, epochs=1, seed=i,
                                  lrs=[0.01] * steps, init_url=state["pruned"], keep_state=False,
                                  finish=Finish(url=str(tmp / f"{name}.safetensors"), recal_fraction=0.2,
                                                probs_url=str(tmp / f"{name}.probs.safetensors"))).run())
        state["ingredients"] = [o.saved.uri for o in outs]
        state["probs"] = [o.probs_url for o in outs]
        state["val"] = [o.scores["val_accuracy"] for o in outs]
        return {"test_accuracy": [round(o.scores["test_accuracy"], 4) for o in outs],
                "mask_kept": all(abs(o.saved.sparsity - 0.5) < 0.01 for o in outs)}

    def soup() -> dict:
        out = Soup(name="soup", task=spec, pruned=state["pruned"], ingredients=state["ingredients"],
                   val_scores=state["val"], probs=state["probs"], method="greedy", recal_fraction=0.2,
                   url=str(tmp / "soup.safetensors")).run()
        return {"test_accuracy": out.scores["test_accuracy"], "ensemble": out.ensemble, "chosen": out.chosen,
                "sparsity": out.saved.sparsity, "ok": abs(out.saved.sparsity - 0.5) < 0.01}

    for name, fn in (("dense training", dense), ("prune step", prune), ("2 ingredients (recal, probs)", ingredients),
                     ("greedy soup step + BN recal", soup)):
        row("cnn", name, fn)


# ---------------------------------------------------------------- lm: pruning and PERP on LLaMA shapes

def llama(shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512))
    return model.to(device).eval()


def lm(device: torch.device, args: argparse.Namespace) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        row("lm", "transformers missing", lambda: {"ok": False, "note": "pip install transformers to run the LM rows"})
        return
    from workers.config import PerpConfig
    from workers.lm.prune import prune_causal_lm
    from workers.lm.perp import retrain_lm
    from workers.pruning import is_nm

    shapes = {"tiny": TINY} if args.small else {"smollm2-135m": SMOLLM2, "llama-1b": ONE_B}
    seq = 32 if args.small else 128
    for label, shape in shapes.items():
        base = llama(shape, device)
        params = sum(p.numel() for p in base.parameters())
        calib = torch.randint(0, shape["vocab_size"], (8, seq), generator=torch.Generator().manual_seed(0))
        pruned: dict = {}
        for criterion, pattern in (("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("wanda", "2:4")):
            def go(criterion=criterion, pattern=pattern) -> dict:
                model = copy.deepcopy(base)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                r = prune_causal_lm(model, calib, 0.5, criterion=criterion, pattern=pattern, device=device)
                sync(device)
                nm = all(is_nm(m, 2, 4) for m in r.masks.values()) if pattern == "2:4" else None
                kept = sum(int(m.sum()) for m in r.masks.values()) / sum(m.numel() for m in r.masks.values())
                pruned[(criterion, pattern)] = (model, r.masks)
                return {"parameters": params, "kept": kept, "is_2:4": nm, "peak_gpu_gb": peak_gb(device),
                        "ok": abs(kept - 0.5) < 0.01 and nm in (None, True)}
            row("lm", f"{label} {criterion} {pattern}", go)

        def perp() -> dict:
            model, masks = pruned.get(("wanda", "unstructured"), (None, None))
            if model is None:
                return {"ok": False, "note": "no pruned model"}
            batches = [torch.randint(0, shape["vocab_size"], (8, seq), generator=torch.Generator().manual_seed(i))
                       for i in range(2 if args.small else 8)]
            cfg = PerpConfig(mode="mask_lora", lr=1e-4, epochs=1,
                             autocast="bf16" if device.type == "cuda" else "off")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = retrain_lm(model, batches, cfg, masks, device=device)
            return {"tokens_per_second": r.tokens_per_second, "trainable_share": r.trainable_share,
                    "sparsity_lost": r.sparsity_lost, "autocast": cfg.autocast, "peak_gpu_gb": peak_gb(device),
                    "ok": r.sparsity_lost == 0}
        row("lm", f"{label} PERP mask_lora", perp)
        del base, pruned
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- 2:4 semi-structured matmul

def semi_structured(device: torch.device, args: argparse.Namespace) -> None:
    if device.type != "cuda":
        row("2:4", "semi-structured matmul", lambda: {"ok": True, "note": "CUDA only: skipped on the CPU"})
        return
    from workers.pruning import prune_nm
    from workers.sparse_inference import semi_structured as to_semi

    for n, batch in ((4096, 32), (4096, 2048), (8192, 2048)):
        def go(n=n, batch=batch) -> dict:
            layer = nn.Sequential(nn.Linear(n, n, bias=False)).half().to(device)
            r = prune_nm(layer, None, 2, 4)
            dense = r.model.half().to(device).eval()
            sparse, kept_dense = to_semi(dense)
            x = torch.randn(batch, n, dtype=torch.float16, device=device)
            with torch.no_grad():
                err = float((sparse(x) - dense(x)).abs().max() / dense(x).abs().max())
                times = {}
                for label, m in (("dense", dense), ("2:4", sparse)):
                    for _ in range(5):
                        m(x)
                    sync(device)
                    t = time.perf_counter()
                    for _ in range(50):
                        m(x)
                    sync(device)
                    times[label] = (time.perf_counter() - t) / 50
            return {"dense_ms": times["dense"] * 1e3, "sparse_ms": times["2:4"] * 1e3,
                    "speedup": times["dense"] / times["2:4"], "rel_error": err, "stayed_dense": len(kept_dense),
                    "ok": err < 1e-2 and not kept_dense}
        row("2:4", f"{n}x{n} @ batch {batch} fp16", go)


# ---------------------------------------------------------------- CPU <-> GPU agreement on tiny inputs

def agreement(device: torch.device) -> None:
    from workers.models import build_model
    from workers.pruning import prune
    from workers.soup import average, bn_recalibrate
    from workers.train import train

    cpu = torch.device("cpu")
    if device.type == "cpu":
        row("agreement", "CPU vs GPU", lambda: {"ok": True, "note": "no GPU: nothing to compare"})
        return
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]

    def tiny_cnn():
        torch.manual_seed(0)
        return build_model("resnet20", num_classes=4, in_shape=(1, 8, 8), width=4)

    def rel(a: dict, b: dict) -> float:
        num = sum(float((a[k].double().cpu() - b[k].double().cpu()).norm() ** 2) for k in a if a[k].is_floating_point())
        den = sum(float(a[k].double().cpu().norm() ** 2) for k in a if a[k].is_floating_point())
        return (num / max(den, 1e-30)) ** 0.5

    def training() -> dict:
        states = {}
        for d in (cpu, device):
            m = tiny_cnn()
            train(m, batches, [0.05] * 8, epochs=2, device=d, seed=0)
            states[d.type] = {k: v.cpu() for k, v in m.state_dict().items()}
        e = rel(states["cpu"], states[device.type])
        return {"relative_difference": e, "ok": e < 1e-3}

    def pruning() -> dict:
        masks = {}
        for d in (cpu, device):
            masks[d.type] = prune(tiny_cnn().to(d), None, 0.6).masks
        same = sum(int((masks["cpu"][k].cpu() == masks[device.type][k].cpu()).sum()) for k in masks["cpu"])
        total = sum(m.numel() for m in masks["cpu"].values())
        return {"masks_equal_share": same / total, "ok": same == total}

    def soup_and_bn() -> dict:
        a, b = tiny_cnn().state_dict(), {k: (v + 0.01 if v.is_floating_point() else v) for k, v in tiny_cnn().state_dict().items()}
        avg = {d.type: average([{k: v.to(d) for k, v in a.items()}, {k: v.to(d) for k, v in b.items()}]) for d in (cpu, device)}
        stats = {}
        for d in (cpu, device):
            m = tiny_cnn().to(d)
            m.load_state_dict(avg[d.type])
            bn_recalibrate(m, batches, 1.0, device=d)
            stats[d.type] = {k: v.cpu() for k, v in m.state_dict().items() if "running" in k}
        e1, e2 = rel(avg["cpu"], avg[device.type]), rel(stats["cpu"], stats[device.type])
        return {"average_difference": e1, "bn_stats_difference": e2, "ok": e1 < 1e-6 and e2 < 1e-4}

    row("agreement", "training (2 epochs, tiny ResNet)", training)
    row("agreement", "magnitude pruning masks", pruning)
    row("agreement", "soup average + BN recalibration", soup_and_bn)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from workers.config import PerpConfig
    from workers.lm.prune import prune_causal_lm
    from workers.lm.perp import retrain_lm

    calib = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(1))
    for criterion in ("wanda", "sparsegpt"):
        def go(criterion=criterion) -> dict:
            out = {}
            for d in (cpu, device):
                m = llama(TINY, d).float()
                r = prune_causal_lm(m, calib, 0.5, criterion=criterion, device=d)
                out[d.type] = ({k: v.cpu() for k, v in m.state_dict().items()}, r.masks)
            (sa, ma), (sb, mb) = out["cpu"], out[device.type]
            same = sum(int((ma[k].cpu() == mb[k].cpu()).sum()) for k in ma) / sum(v.numel() for v in ma.values())
            e = rel(sa, sb)
            return {"masks_equal_share": same, "weights_difference": e, "ok": same > 0.99 and e < 1e-2}
        row("agreement", f"{criterion} on a tiny LLaMA", go)

    def perp_step() -> dict:
        losses = {}
        batches_lm = [torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(2))]
        for d in (cpu, device):
            m = llama(TINY, d).float()
            masks = prune_causal_lm(m, calib, 0.5, criterion="magnitude", device=d).masks
            r = retrain_lm(m, batches_lm, PerpConfig(mode="mask_lora", lr=1e-3, epochs=2, autocast="off"), masks, device=d)
            losses[d.type] = r.history[-1]["train_loss"]
        diff = abs(losses["cpu"] - losses[device.type]) / abs(losses["cpu"])
        return {"loss_cpu": losses["cpu"], "loss_gpu": losses[device.type], "relative_difference": diff,
                "ok": diff < 1e-3}
    row("agreement", "PERP mask_lora, 2 steps, fp32", perp_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fashion-mnist", default=None, help="the folder of Fashion-MNIST's four IDX files")
    ap.add_argument("--cnn-epochs", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny sizes (a CPU run of the same code paths)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures" / "gpu-check.json"))
    ap.add_argument("--sections", default="cnn,lm,2:4,agreement")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"gpu_check on {name} ({device}), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start = time.perf_counter()
    wanted = set(args.sections.split(","))
    with tempfile.TemporaryDirectory(prefix="ladle-gpu-check-") as tmp:
        if "cnn" in wanted:
            cnn(device, Path(tmp), args)
    if "lm" in wanted:
        lm(device, args)
    if "2:4" in wanted:
        semi_structured(device, args)
    if "agreement" in wanted:
        agreement(device)
    total = time.perf_counter() - start
    failed = [r for r in ROWS if not r["ok"]]
    print(f"{len(ROWS) - len(failed)} of {len(ROWS)} rows ok in {total:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "seconds": total, "rows": ROWS}, indent=2, default=str))
    print(f"written: {out}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
