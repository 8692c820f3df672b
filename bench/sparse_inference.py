"""Inference speed of pruned models run with sparse weights, against their dense parents, in one run.

What it measures (CPU, float32, `torch.utils.benchmark.Timer`: the fastest block of each timer, the best of
--rounds interleaved rounds, so that a neighbour's burst of CPU use hits dense and sparse alike):

  models     the zoo's `mlp` (LeNet-300-100 on 1x28x28 input) and `resnet20` (3x32x32), and a small
             LLaMA-style transformer built with transformers (4 blocks, hidden 384, MLP 1024, vocab 2048,
             sequences of 64 tokens; the logits of every token are computed);
  sparsity   50, 70, 90, 95, 98 % unstructured (layerwise magnitude, workers.pruning; the transformer's
             blocks' linear layers with workers.lm.prune, embeddings and head dense) and the 2:4 pattern;
  layouts    dense (the parent: nn.Linear / nn.Conv2d, MKL / oneDNN), CSR and BSR (workers.sparse_inference:
             linear layers through torch.sparse.mm; convolutions, which torch cannot run sparse on the
             CPU, lowered to im2col (F.unfold) times the sparse weight matrix);
  batches    1 and 32 images, 1 and 8 sequences (--batch-sizes, --lm-batch-sizes);
  threads    1 by default (--threads): on a machine shared with other work, two threads of one model wait
             on each other and the figures scatter; --threads 2 uses both cores.

Every sparse model's output is checked against the dense one's before it is timed. Printed: the machine,
the command, the table (latency and size ratios, sparse / dense) and plain lines saying where sparse is
slower; written: sparse-inference.json and sparse-inference.md under --out (bench/figures). The weights
are untrained: the latency of a sparse kernel depends on where the zeros are, not on the values.

Layers (--layers, in the default run and in --quick; --no-layers skips it): single linear layers at the real
sizes of LLMs, where unstructured sparsity has its best chance on a CPU: SmolLM2-135M's MLP, 576 -> 1536
(gate/up) and 1536 -> 576 (down), and a 1B-shaped MLP (LLaMA-3.2-1B: 2048 -> 8192 and 8192 -> 2048), bias-free
as in LLaMA, random weights pruned layerwise by magnitude to 90, 95, 98 % (--layer-sparsities), on inputs of
1 token (batch-1 decoding: a (1, in) input) and 8 tokens (--layer-tokens). Dense is nn.Linear (F.linear: an
MKL sgemm/sgemv); CSR is workers.sparse_inference's SparseLinear, y = (W_csr @ x^T)^T with torch.sparse.mm,
which on the CPU dispatches to aten::addmm on the CSR tensor (addmm_out_sparse_csr_cpu: MKL's sparse BLAS,
mkl_sparse_s_mm, where torch is built with MKL; the JSON records torch.backends.mkl.is_available()).

GPU: when CUDA is available, the transformer pruned 2:4 runs in float16 with its blocks' weights as
`torch.sparse.to_sparse_semi_structured` tensors against the same model dense; otherwise the section
says it was skipped.

A stored model (`--model-id ID`, the store from --database-url or LADLE_DATABASE_URL / LADLE_HOME): it is
timed as CSR against its dense ancestor (the `dense` model its lineage starts from: pruned_from,
retrained_from, averaged_from edges), and the measurement at the largest batch size is recorded in the
model's metrics as `inference` (Store.add_model_metrics).

    .venv/bin/python bench/sparse_inference.py                  # the default run, a few minutes on 2 cores
    .venv/bin/python bench/sparse_inference.py --quick          # tiny sizes, seconds: checks it end to end
    .venv/bin/python bench/sparse_inference.py --models '' --patterns ''   # the layers section only
    .venv/bin/python bench/sparse_inference.py --model-id 3f2a... --database-url sqlite:///.ladle/ladle.db
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

from workers.lm.prune import prune_causal_lm
from workers.models import build_model
from workers.pruning import Masks, apply_masks, prune
from workers.sparse_inference import LAYOUTS, semi_structured, size_ratio, sparsify

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)
LAYER_SHAPES = ((576, 1536), (1536, 576), (2048, 8192), (8192, 2048))      # (in, out) of nn.Linear
LAYER_NAMES = {(576, 1536): "SmolLM2-135M gate/up", (1536, 576): "SmolLM2-135M down",
               (2048, 8192): "1B gate/up", (8192, 2048): "1B down"}
LAYER_SPARSITIES = (0.9, 0.95, 0.98)
LAYER_TOKENS = (1, 8)
PATTERNS = ("2:4",)
warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")


class BenchError(ValueError):
    """Bad input to the benchmark (an unknown model id, a model without a dense ancestor, ...)."""


# ---------------------------------------------------------------- models

class Logits(nn.Module):
    """A causal LM as a function of input ids -> logits (no cache), so it times like any module."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


@dataclass
class Case:
    """A dense model, how to make a batch of its input, and how to prune it to a sparsity or pattern."""
    name: str
    dense: nn.Module
    make_input: Callable[[int], torch.Tensor]
    prune: Callable[[str], tuple[nn.Module, Masks]]      # "0.9" or "2:4" -> (pruned model, masks)
    batch_sizes: tuple[int, ...]


def _image_case(arch: str, in_shape: tuple[int, int, int], batch_sizes: tuple[int, ...], **kwargs) -> Case:
    torch.manual_seed(0)
    dense = build_model(arch, num_classes=10, in_shape=in_shape, **kwargs).eval()

    def pruned(what: str) -> tuple[nn.Module, Masks]:
        if ":" in what:
            n, m = (int(v) for v in what.split(":"))
            r = prune(dense, None, 1 - n / m, pattern=what)
        else:
            r = prune(dense, None, float(what), scope="layerwise")
        return r.model.eval(), r.masks

    gen = torch.Generator().manual_seed(1)
    return Case(arch, dense, lambda b: torch.randn(b, *in_shape, generator=gen), pruned, batch_sizes)


def _transformer_case(batch_sizes: tuple[int, ...], *, hidden: int = 384, layers: int = 4, mlp: int = 1024,
                      vocab: int = 2048, seq_len: int = 64) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), intermediate_size=mlp, vocab_size=vocab,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    lm = LlamaForCausalLM(config).eval()

    def pruned(what: str) -> tuple[nn.Module, Masks]:
        copy_ = LlamaForCausalLM(config).eval()
        copy_.load_state_dict(lm.state_dict())
        if ":" in what:
            n, m = (int(v) for v in what.split(":"))
            r = prune_causal_lm(copy_, None, 1 - n / m, criterion="magnitude", pattern=what)
        else:
            r = prune_causal_lm(copy_, None, float(what), criterion="magnitude")
        return Logits(copy_), {f"lm.{k}": v for k, v in r.masks.items()}

    gen = torch.Generator().manual_seed(1)
    name = f"llama {layers}x{hidden}"
    return Case(name, Logits(lm), lambda b: torch.randint(0, vocab, (b, seq_len), generator=gen), pruned, batch_sizes)


def zoo_cases(models: list[str], batch_sizes: tuple[int, ...], lm_batch_sizes: tuple[int, ...],
              quick: bool = False) -> list[Case]:
    """The default run's models (module docstring); `quick`: tiny versions of them."""
    builders = {
        "mlp": lambda: _image_case("mlp", (1, 8, 8) if quick else (1, 28, 28), batch_sizes,
                                   **({"widths": (16, 8)} if quick else {})),
        "resnet20": lambda: _image_case("resnet20", (3, 8, 8) if quick else (3, 32, 32), batch_sizes,
                                        **({"width": 0.5} if quick else {})),
        "transformer": lambda: _transformer_case(lm_batch_sizes, **(dict(hidden=64, layers=1, mlp=128, vocab=64,
                                                                         seq_len=8) if quick else {})),
    }
    unknown = [m for m in models if m not in builders]
    if unknown:
        raise BenchError(f"unknown models {unknown}; known: {', '.join(builders)}")
    return [builders[m]() for m in models]


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def max_abs_diff(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |sparse(x) - dense(x)|, max |dense(x)|)."""
    ref = dense(x)
    return float((sparse(x) - ref).abs().max()), float(ref.abs().max())


def check_same_outputs(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, *, rtol: float = 1e-4) -> float:
    """Raise unless the sparse model's outputs equal the dense one's up to float32 summation order
    (max difference <= rtol * max |output| + 1e-5); returns the max difference."""
    diff, scale = max_abs_diff(dense, sparse, x)
    if not diff <= rtol * scale + 1e-5:
        raise AssertionError(f"sparse output differs from dense by {diff:g} (outputs up to {scale:g})")
    return diff


def time_ms(module: nn.Module, x: torch.Tensor, *, min_run_time: float, threads: int) -> float:
    """Milliseconds per forward (no autograd): torch.utils.benchmark's blocked_autorange, the fastest of its
    blocks (each block's mean per call). On a machine shared with other work the fastest block is the
    one least disturbed, so it is the fairest figure for both sides; the median drifts with the load."""
    timer = Timer(stmt="with torch.no_grad(): f(x)", globals={"f": module, "x": x, "torch": torch},
                  num_threads=threads)
    return min(timer.blocked_autorange(min_run_time=min_run_time).times) * 1e3


@dataclass
class Row:
    model: str
    sparsity: str                 # "50%", "2:4"
    actual_sparsity: float        # of the weights made sparse
    batch: int
    dense_ms: float
    sparse_ms: dict[str, float]   # layout -> ms
    size_ratio: dict[str, float]  # layout -> sparse bytes / dense bytes of those weights
    max_diff: float
    dense_layers: dict[str, str] = field(default_factory=dict)   # layers left dense, and why
    lowered_dense_ms: float | None = None    # convs as im2col with dense weights (what the lowering costs)

    def ratio(self, layout: str) -> float:
        return self.sparse_ms[layout] / self.dense_ms


def run_case(case: Case, what: str, *, layouts: tuple[str, ...] = LAYOUTS, min_run_time: float = 0.2,
             rounds: int = 2, threads: int | None = None, log: Callable[[str], None] = print,
             lowering: bool = False) -> list[Row]:
    """Prune `case` to `what` ("0.9", "2:4"), make its sparse versions and time them at each batch size.
    `lowering`: also time the pruned model with its convs lowered to im2col but dense weights (what the
    lowering alone costs; a model without convs skips it)."""
    pruned, masks = case.prune(what)
    kept = sum(int(m.sum()) for m in masks.values())
    actual = 1 - kept / sum(m.numel() for m in masks.values())
    sparse: dict[str, nn.Module] = {}
    dense_layers: dict[str, str] = {}
    for layout in layouts:
        sparse[layout], dense_layers = sparsify(pruned, layout, names=masks)
    label = what if ":" in what else f"{float(what) * 100:g}%"
    has_conv = any(isinstance(m, nn.Conv2d) for m in pruned.modules())
    if lowering and has_conv:
        sparse["im2col"] = sparsify(pruned, "dense", names=masks)[0]
    rows = []
    for batch in case.batch_sizes:
        x = case.make_input(batch)
        # the sparse models compute what the pruned one does (checked before anything is timed)
        diff = max((check_same_outputs(pruned, m, x) for m in sparse.values()), default=0.0)
        # timed against the dense parent (what one would deploy otherwise), not the pruned model run dense
        dense_ms, sparse_ms = timed(case.dense, sparse, x, min_run_time=min_run_time, rounds=rounds, threads=threads)
        lowered = sparse_ms.pop("im2col", None)
        row = Row(case.name, label, actual, batch, dense_ms, sparse_ms,
                  {k: size_ratio(m) for k, m in sparse.items() if k != "im2col"}, diff, dense_layers, lowered)
        log(f"  {case.name:14s} {label:>4s} batch {batch:3d}: dense {dense_ms:8.3f} ms  " +
            "  ".join(f"{k} {v:8.3f} ms ({v / dense_ms:5.2f}x)" for k, v in sparse_ms.items()) +
            (f"  (im2col, dense weights {lowered:8.3f} ms ({lowered / dense_ms:5.2f}x))" if lowered else ""))
        rows.append(row)
    return rows


def timed(dense: nn.Module, sparse: dict[str, nn.Module], x: torch.Tensor, *, min_run_time: float = 0.2,
          rounds: int = 2, threads: int | None = None) -> tuple[float, dict[str, float]]:
    """(dense ms, {layout: ms}): `rounds` interleaved rounds (dense, then each sparse model), the best of
    each, so that a neighbour's burst of CPU use does not land on one side only."""
    threads = threads or torch.get_num_threads()
    best: dict[str, float] = {}
    for _ in range(rounds):
        for key, model in [("dense", dense), *sparse.items()]:
            best[key] = min(best.get(key, float("inf")), time_ms(model, x, min_run_time=min_run_time, threads=threads))
    return best.pop("dense"), best


# ---------------------------------------------------------------- single LLM-sized layers

def layer_rows(shapes: tuple[tuple[int, int], ...] = LAYER_SHAPES, sparsities: tuple[float, ...] = LAYER_SPARSITIES,
               tokens: tuple[int, ...] = LAYER_TOKENS, *, min_run_time: float = 0.2, rounds: int = 2,
               threads: int | None = None, log: Callable[[str], None] = print) -> list[Row]:
    """One bias-free nn.Linear per (in, out) shape, dense against CSR at each sparsity (layerwise magnitude,
    workers.pruning) and number of tokens: a (tokens, in) input. Outputs checked equal before timing."""
    rows = []
    for n_in, n_out in shapes:
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(n_in, n_out, bias=False)).eval()
        name = f"linear {n_in}->{n_out}" + (f" ({LAYER_NAMES[(n_in, n_out)]})" if (n_in, n_out) in LAYER_NAMES else "")
        gen = torch.Generator().manual_seed(1)
        inputs = {t: torch.randn(t, n_in, generator=gen) for t in tokens}
        pruned: dict[str, tuple[nn.Module, nn.Module, float]] = {}
        for sparsity in sparsities:
            r = prune(dense, None, sparsity, scope="layerwise")
            actual = 1 - sum(int(m.sum()) for m in r.masks.values()) / sum(m.numel() for m in r.masks.values())
            pruned[f"{sparsity * 100:g}%"] = (r.model.eval(), sparsify(r.model, "csr", names=r.masks)[0], actual)
        for t, x in inputs.items():
            diffs = {k: check_same_outputs(p, csr, x) for k, (p, csr, _) in pruned.items()}
            # one dense baseline per input, timed in every round between the sparsities
            dense_ms, sparse_ms = timed(dense, {k: csr for k, (_, csr, _) in pruned.items()}, x,
                                        min_run_time=min_run_time, rounds=rounds, threads=threads)
            for k, (_, csr, actual) in pruned.items():
                row = Row(name, k, actual, t, dense_ms, {"csr": sparse_ms[k]}, {"csr": size_ratio(csr)}, diffs[k])
                rows.append(row)
                log(f"  {name:40s} {k:>4s} {t:2d} token(s): dense {dense_ms:8.4f} ms  CSR {sparse_ms[k]:8.4f} ms "
                    f"({row.ratio('csr'):5.2f}x)")
        del pruned
    return rows


def layer_verdict(rows: list[Row]) -> list[str]:
    """Plain sentences per layer and token count: from which sparsity on CSR is faster than dense."""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        for t in dict.fromkeys(r.batch for r in rows if r.model == model):
            mine = [r for r in rows if r.model == model and r.batch == t]
            faster = [r.sparsity for r in mine if r.ratio("csr") < 1]
            slower = [r.sparsity for r in mine if r.ratio("csr") >= 1]
            what = "1 token (batch-1 decoding)" if t == 1 else f"{t} tokens"
            ratios = ", ".join(f"{r.sparsity} {r.ratio('csr'):.2f}x" for r in mine)
            if not faster:
                lines.append(f"{model}, {what}: CSR is SLOWER than dense at every sparsity measured ({ratios}; "
                             f"CSR time / dense time).")
            elif not slower:
                lines.append(f"{model}, {what}: CSR is faster than dense at every sparsity measured ({ratios}; "
                             f"CSR time / dense time).")
            else:
                lines.append(f"{model}, {what}: CSR is faster than dense only at {', '.join(faster)}, SLOWER at "
                             f"{', '.join(slower)} ({ratios}; CSR time / dense time).")
    return lines


# ---------------------------------------------------------------- the report

def table(rows: list[Row], layouts: tuple[str, ...]) -> list[list[str]]:
    """Header and rows of the results table (strings)."""
    head = ["model", "sparsity", "batch", "dense ms"]
    for layout in layouts:
        head += [f"{layout.upper()} ms", f"{layout.upper()}/dense"]
    head += [f"{layout.upper()} bytes/dense" for layout in layouts]
    out = [head]
    for r in rows:
        line = [r.model, r.sparsity, str(r.batch), f"{r.dense_ms:.3f}"]
        for layout in layouts:
            ratio = r.ratio(layout)
            line += [f"{r.sparse_ms[layout]:.3f}", f"{ratio:.2f}" + (" slower" if ratio > 1 else "")]
        line += [f"{r.size_ratio[layout]:.2f}" for layout in layouts]
        out.append(line)
    return out


def verdict(rows: list[Row], layouts: tuple[str, ...]) -> list[str]:
    """Plain sentences: per model and layout, where sparse is slower than dense and where it is faster."""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        for layout in layouts:
            mine = [r for r in rows if r.model == model]
            slower = [f"{r.sparsity} at batch {r.batch} ({r.ratio(layout):.2f}x)" for r in mine if r.ratio(layout) > 1]
            faster = [f"{r.sparsity} at batch {r.batch} ({r.ratio(layout):.2f}x)" for r in mine if r.ratio(layout) <= 1]
            if not faster:
                lines.append(f"{model}, {layout.upper()}: slower than dense everywhere measured.")
            elif not slower:
                lines.append(f"{model}, {layout.upper()}: faster than dense everywhere measured "
                             f"({', '.join(faster)}).")
            else:
                lines.append(f"{model}, {layout.upper()}: SLOWER than dense at {', '.join(slower)}; "
                             f"faster only at {', '.join(faster)}.")
    for r in rows:
        if r.lowered_dense_ms:
            lines.append(f"{r.model} at batch {r.batch}: the convolutions as im2col with dense weights take "
                         f"{r.lowered_dense_ms / r.dense_ms:.2f}x the dense model's time: that much of the sparse "
                         f"slowdown is the lowering, not the sparse matmul.")
    sizes = [r for r in rows if r.size_ratio.get("csr", 0) > 1]
    if sizes:
        lines.append("CSR (int64 indices) is larger than dense at " + ", ".join(
            sorted({f"{r.model} {r.sparsity}" for r in sizes})) + ".")
    return lines


def markdown(rows: list[Row], layouts: tuple[str, ...]) -> str:
    t = table(rows, layouts)
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(r) + " |" for r in t[1:]]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    cpu = cpu_name()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), {cuda}, load average {load}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}")


def command() -> str:
    return "python bench/sparse_inference.py" + ("".join(f" {shlex.quote(a)}" for a in sys.argv[1:]))


def print_table(rows: list[Row], layouts: tuple[str, ...], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:                         # plain text without rich
        for r in table(rows, layouts):
            print("  ".join(f"{c:>12s}" for c in r))
        return
    t = Table(title=title)
    head, *body = table(rows, layouts)
    for h in head:
        t.add_column(h, justify="left" if h in ("model", "sparsity") else "right")
    for r in body:
        t.add_row(*[f"[red]{c}[/red]" if c.endswith("slower") else c for c in r])
    Console(width=200).print(t)


# ---------------------------------------------------------------- GPU (2:4 semi-structured)

def gpu_section(lm_batch_sizes: tuple[int, ...], *, min_run_time: float, quick: bool) -> list[dict] | None:
    """The transformer pruned 2:4 in float16 on CUDA, dense vs to_sparse_semi_structured; None without CUDA."""
    if not torch.cuda.is_available():
        print("GPU section skipped: CUDA is not available on this machine (2:4 semi-structured sparsity needs "
              "an NVIDIA GPU with sparse tensor cores).")
        return None
    case = zoo_cases(["transformer"], (1,), lm_batch_sizes, quick=quick)[0]
    pruned, masks = case.prune("2:4")
    dense = case.dense.half().cuda().eval()
    pruned = pruned.half().cuda().eval()
    semi, left = semi_structured(pruned, names=masks)
    out = []
    for batch in lm_batch_sizes:
        x = case.make_input(batch).cuda()
        check_same_outputs(pruned, semi, x, rtol=1e-2)
        d = time_ms(dense, x, min_run_time=min_run_time, threads=1)
        s = time_ms(semi, x, min_run_time=min_run_time, threads=1)
        out.append({"model": case.name, "batch": batch, "dense_ms": d, "semi_structured_ms": s, "ratio": s / d,
                    "left_dense": left})
        print(f"  GPU {case.name} 2:4 batch {batch}: dense {d:.3f} ms, semi-structured {s:.3f} ms ({s / d:.2f}x)"
              + (f"; left dense: {len(left)} layers" if left else ""))
    return out


# ---------------------------------------------------------------- a stored model

def _load(uri: str) -> tuple[nn.Module, Masks, dict, Callable[[int], torch.Tensor]]:
    """A stored checkpoint as (model in eval mode, masks, meta, input maker)."""
    from workers.checkpoint import load
    ckpt = load(uri)
    meta = ckpt.meta
    gen = torch.Generator().manual_seed(1)
    if meta.get("task") == "causal_lm":
        from workers.lm.model import load_causal_lm
        lm, _ = load_causal_lm(meta["arch"], **meta.get("model_kwargs", {}))
        lm.load_state_dict(ckpt.state)
        vocab, seq_len = lm.config.vocab_size, int(meta.get("seq_len", 64))
        return (Logits(lm.float().eval()), {f"lm.{k}": v for k, v in ckpt.masks.items()}, meta,
                lambda b: torch.randint(0, vocab, (b, seq_len), generator=gen))
    if "in_shape" not in meta or "num_classes" not in meta:
        raise BenchError(f"checkpoint {uri} does not say how to rebuild its model (arch, num_classes, in_shape)")
    model = build_model(meta["arch"], num_classes=meta["num_classes"], in_shape=tuple(meta["in_shape"]),
                        **meta.get("model_kwargs", {}))
    model.load_state_dict(ckpt.state)
    shape = tuple(meta["in_shape"])
    return model.eval(), ckpt.masks, meta, lambda b: torch.randn(b, *shape, generator=gen)


def dense_ancestor(lineage: dict, model_id: str) -> str:
    """The id of the dense model a stored model descends from (its lineage's `dense` node)."""
    kinds = {n.id: n.kind for n in lineage["nodes"]}
    if model_id not in kinds:
        raise BenchError(f"model {model_id} not found")
    if kinds[model_id] == "dense":
        raise BenchError(f"model {model_id} is the dense model itself: give a pruned model, an ingredient or a soup")
    dense = [i for i, k in kinds.items() if k == "dense"]
    if not dense:
        raise BenchError(f"model {model_id} has no dense ancestor in its lineage")
    return dense[0]


def bench_stored(store, model_id: str, *, batch_sizes: tuple[int, ...] | None = None, min_run_time: float = 0.2,
                 rounds: int = 2, threads: int | None = None, record: bool = True) -> tuple[list[Row], dict]:
    """Time a stored model (CSR) against its dense ancestor at each batch size; record the largest batch's
    measurement as the model's `inference` metrics. Returns (rows, the recorded dict)."""
    row = store.get_model(model_id)
    if row is None:
        raise BenchError(f"model {model_id} not found in the store")
    parent_id = dense_ancestor(store.lineage(model_id), model_id)
    parent_row = store.get_model(parent_id)
    model, masks, meta, make_input = _load(row.uri)
    dense, _, _, _ = _load(parent_row.uri)
    if meta.get("task") != "causal_lm":
        apply_masks(model, masks)
    batch_sizes = batch_sizes or ((1, 8) if meta.get("task") == "causal_lm" else (1, 32))
    sparse, left = sparsify(model, "csr", names=masks)
    kept = sum(int(m.sum()) for m in masks.values())
    actual = 1 - kept / max(1, sum(m.numel() for m in masks.values()))
    rows = []
    for batch in batch_sizes:
        x = make_input(batch)
        check_same_outputs(model, sparse, x)
        dense_ms, sparse_ms = timed(dense, {"csr": sparse}, x, min_run_time=min_run_time, rounds=rounds,
                                    threads=threads)
        rows.append(Row(f"{meta.get('arch')} {model_id[:8]}", f"{actual * 100:.1f}%", actual, batch, dense_ms,
                        sparse_ms, {"csr": size_ratio(sparse)}, max_abs_diff(model, sparse, x)[0], left))
    last = rows[-1]
    inference = {"device": "cpu", "layout": "csr", "dense_ms": round(last.dense_ms, 4),
                 "sparse_ms": round(last.sparse_ms["csr"], 4), "latency_ratio": round(last.ratio("csr"), 4),
                 "batch_size": last.batch, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": command()}
    if record:
        store.add_model_metrics(model_id, inference=inference)
    return rows, inference


# ---------------------------------------------------------------- main

def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _sparsities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1) separated by commas, got {text!r}") from None
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1), got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,resnet20,transformer", help="of mlp, resnet20, transformer")
    p.add_argument("--sparsities", type=_sparsities, default=SPARSITIES, help="unstructured, e.g. 0.5,0.9")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="N:M patterns, e.g. 2:4,4:8 ('' for none)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help="images per batch (default 1,32; with --model-id of a language model: sequences, 1,8)")
    p.add_argument("--lm-batch-sizes", type=_ints, default=(1, 8), help="sequences per batch (transformer)")
    p.add_argument("--layouts", default="csr,bsr", help="of csr, bsr")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timer")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the fastest is kept")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every model (default 1: on a shared machine 2 threads wait on each other)")
    p.add_argument("--no-layers", action="store_true", help="skip the section of single LLM-sized linear layers")
    p.add_argument("--layer-sparsities", type=_sparsities, default=LAYER_SPARSITIES,
                   help="unstructured sparsities of the layers section")
    p.add_argument("--layer-tokens", type=_ints, default=LAYER_TOKENS, help="tokens per input, layers section")
    p.add_argument("--quick", action="store_true", help="tiny models, short timers: end to end in seconds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "figures", help="where the .json and .md go")
    p.add_argument("--model-id", help="time this stored model against its dense ancestor and record it")
    p.add_argument("--database-url", help="the store (default: LADLE_DATABASE_URL, else $LADLE_HOME/ladle.db)")
    p.add_argument("--no-record", action="store_true", help="with --model-id: print only, record nothing")
    args = p.parse_args(argv)
    from workers.pruning import parse_pattern
    try:
        args.patterns = tuple(f"{n}:{m}" for n, m in filter(None, (parse_pattern(v) for v in args.patterns.split(",")
                                                                   if v.strip())))
    except ValueError as e:
        p.error(f"--patterns: {e}")
    args.layouts = tuple(v.strip() for v in args.layouts.split(",") if v.strip())
    if not args.layouts or any(v not in LAYOUTS for v in args.layouts):
        p.error(f"--layouts: choose among {', '.join(LAYOUTS)}")
    if args.rounds < 1 or args.min_run_time <= 0:
        p.error("--rounds must be >= 1 and --min-run-time > 0")
    if args.quick:
        args.min_run_time, args.rounds = min(args.min_run_time, 0.005), 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    print(f"{started:%Y-%m-%d %H:%M} UTC  {machine()}\n{command()}")
    if args.model_id:
        from service.settings import Settings
        from service.store import Store
        url = args.database_url or Settings().database_url
        store = Store(url, migrate=False)
        try:
            rows, inference = bench_stored(store, args.model_id, batch_sizes=args.batch_sizes, min_run_time=args.min_run_time, rounds=args.rounds, threads=args.threads,
                                           record=not args.no_record)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            store.engine.dispose()
        print_table(rows, ("csr",), f"model {args.model_id} (CSR) vs its dense ancestor, CPU")
        print("\n".join(verdict(rows, ("csr",))))
        print(("recorded" if not args.no_record else "not recorded") + f" as metrics.inference: {json.dumps(inference)}")
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        cases = zoo_cases(models, args.batch_sizes or (1, 32), args.lm_batch_sizes, quick=args.quick)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows: list[Row] = []
    for case in cases:
        for i, what in enumerate([str(s) for s in args.sparsities] + list(args.patterns)):
            rows += run_case(case, what, layouts=args.layouts, min_run_time=args.min_run_time, rounds=args.rounds,
                             threads=args.threads, lowering=i == 0)
    title = "CPU inference, sparse / dense (ratios < 1: sparse is faster or smaller)"
    lines: list[str] = []
    if rows:
        print_table(rows, args.layouts, title)
        lines = verdict(rows, args.layouts)
        print("\n".join(lines))
    left = {f"{r.model}: {k}" for r in rows for k in r.dense_layers}
    if left:
        print("Left dense (no sparse lowering): " + ", ".join(sorted(left)))
    layers: list[Row] = []
    layer_lines: list[str] = []
    if not args.no_layers:
        shapes = ((48, 128), (128, 48)) if args.quick else LAYER_SHAPES
        layers = layer_rows(shapes, args.layer_sparsities, args.layer_tokens, min_run_time=args.min_run_time,
                            rounds=args.rounds, threads=args.threads)
        print_table(layers, ("csr",), "Single LLM-sized linear layers, CSR (torch.sparse.mm) / dense nn.Linear, "
                    "batch = tokens")
        layer_lines = layer_verdict(layers)
        print("\n".join(layer_lines))
    gpu = gpu_section(args.lm_batch_sizes, min_run_time=args.min_run_time, quick=args.quick)
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    print(f"done in {seconds:.0f} s")
    if not args.quick or args.out != ROOT / "bench" / "figures":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sparse-inference.json").write_text(json.dumps(
            {"date": started.isoformat(timespec="seconds"), "machine": machine(), "command": command(),
             "seconds": seconds, "rows": [asdict(r) for r in rows], "gpu": gpu, "verdict": lines,
             "layers": {"rows": [asdict(r) for r in layers], "verdict": layer_lines,
                        "op": "torch.sparse.mm(W_csr, x^T) -> aten::addmm on CSR (MKL sparse BLAS where built in)",
                        "mkl": torch.backends.mkl.is_available()}}, indent=1))
        layer_md = ("" if not layers else
                    "## Single LLM-sized linear layers\n\nDense `nn.Linear` (bias-free) against CSR (`torch.sparse.mm`"
                    " -> `aten::addmm` on a CSR weight: MKL sparse BLAS, "
                    f"`torch.backends.mkl.is_available()` = {torch.backends.mkl.is_available()}); batch = tokens "
                    "of one input, 1 = batch-1 decoding. Ratios: CSR / dense (< 1: CSR faster or smaller).\n\n"
                    + markdown(layers, ("csr",)) + "\n\n" + "\n".join(f"- {line}" for line in layer_lines) + "\n\n")
        (args.out / "sparse-inference.md").write_text(
            f"`{command()}` ({started:%Y-%m-%d}, {machine()}, {seconds:.0f} s)\n\n"
            + (markdown(rows, args.layouts) + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n"
               if rows else "")
            + layer_md
            + ("GPU: " + json.dumps(gpu) if gpu else "GPU section skipped: no CUDA.") + "\n")
        print(f"wrote {args.out / 'sparse-inference.json'} and {args.out / 'sparse-inference.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
