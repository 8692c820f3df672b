"""Units of work that executors run: one training run (the dense model or one soup ingredient).

A `TrainTask` is plain data (picklable, no DB or HTTP), so the same function runs in-process in the
sequential executor and on a Ray worker. With `finish`, the worker also does what used to be the
driver's serial share of a phase: BatchNorm recalibration, scoring on val and test (keeping the test
softmax for the prediction ensemble) and writing the checkpoint, so that m ingredients do it in
parallel and the driver only records the result.

Compute accounting: every epoch row carries `cpu_seconds`, the CPU time of the task's process so far
(all its threads; a worker runs one task at a time), and the outcome adds the time spent finishing.
GPU-seconds are wall seconds times the GPU share the task holds (`gpus`, or the whole device when
none was asked for) when it runs on CUDA, else 0.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable

import torch

from workers.checkpoint import Checkpoint, CheckpointError, SavedModel, cpu_state, load, save, save_model
from workers.units import Finish, LMTask, TrainOutcome, TrainTask  # noqa: F401  (defined without torch)
from workers.data import load_splits, make_loader
from workers.evaluate import chance_level, has_batchnorm, score_splits
from workers.models import build_model
from workers.pruning import Masks, full_masks
from workers.soup import State, bn_recalibrate
from workers.train import check_learned, default_device, train

# The batch-order seed of a run resumed at epoch e is seed + RESUME_SEED_STRIDE · e: a prime, so that it
# meets no other ingredient's seed (a phase's ingredients take consecutive seeds)
RESUME_SEED_STRIDE = 7919


def _save_epoch(url: str, epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                history: list[dict[str, float]]) -> None:
    sd = opt.state_dict()
    buffers = {str(i): s["momentum_buffer"] for i, s in sd["state"].items() if s.get("momentum_buffer") is not None}
    save(url, Checkpoint(state=model.state_dict(), extra=buffers,
                         meta={"epoch": epoch, "history": history, "param_groups": sd["param_groups"]}))


def _load_epoch(url: str) -> tuple[int, State, dict, list[dict[str, float]]] | None:
    try:
        ckpt = load(url)
    except CheckpointError:
        return None                        # none yet (or a damaged one): start from the beginning
    opt_state = {"state": {int(i): {"momentum_buffer": t} for i, t in ckpt.extra.items()},
                 "param_groups": ckpt.meta["param_groups"]}
    return ckpt.meta["epoch"], ckpt.state, opt_state, ckpt.meta["history"]


class RunClock:
    """A training run's compute accounting (the module's docstring), shared by every task's run: made at
    the run's start on `device` (default: the GPU if there is one) with the task's CPU threads set;
    `stamp(row)` adds the CPU-seconds so far (and GPU-seconds on CUDA) to an epoch row; `finish(out)`
    releases the run's memory and fills the outcome's seconds, CPU-seconds and GPU-seconds."""

    def __init__(self, task: TrainTask | LMTask, device: torch.device | None = None):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.device, self.gpus = device or default_device(), task.gpus or 1.0
        if task.threads:
            torch.set_num_threads(task.threads)

    def stamp(self, row: dict[str, float]) -> dict[str, float]:
        row["cpu_seconds"] = time.process_time() - self.cpu_start
        if self.device.type == "cuda":
            row["gpu_seconds"] = (time.perf_counter() - self.start) * self.gpus
        return row

    def finish(self, out: TrainOutcome) -> TrainOutcome:
        release_memory()
        out.seconds = time.perf_counter() - self.start
        out.cpu_seconds = time.process_time() - self.cpu_start
        out.gpu_seconds = out.seconds * self.gpus if self.device.type == "cuda" else 0.0
        return out


def run_train_task(task: TrainTask, on_epoch: Callable[[dict[str, float]], None] | None = None,
                   device: torch.device | None = None) -> TrainOutcome:
    """Build the model (fresh or from `init_state`), train it on the task's data, return its state.

    With `resume_url`, an epoch checkpoint is written there after every epoch, and a task that
    finds one (a retry after its worker died) continues from that epoch instead of starting over.
    """
    clock = RunClock(task, device)
    device = clock.device
    splits = load_splits(task.data, task.data_seed)
    torch.manual_seed(task.seed)
    model = build_model(task.arch, num_classes=splits.num_classes, in_shape=splits.in_shape, **task.model_kwargs)
    start_epoch, opt_state, history = 0, None, []
    resumed = _load_epoch(task.resume_url) if task.resume_url else None
    if resumed is not None:
        start_epoch, state, opt_state, history = resumed
        model.load_state_dict(state)
    elif task.init_state is not None:
        model.load_state_dict(task.init_state)
    masks = task.masks
    if task.init_url is not None:
        start_ckpt = load_cached(task.init_url)
        if resumed is None:
            model.load_state_dict(start_ckpt.state)
        masks = masks if masks is not None else start_ckpt.masks
    # a resumed run draws fresh batch orders for the epochs left (not the ones the lost run would have)
    loader = make_loader(splits.train, task.data.batch_size, shuffle=True,
                         seed=task.seed + RESUME_SEED_STRIDE * start_epoch, augment=task.augment)
    val_loader = make_loader(splits.val, task.data.batch_size, shuffle=False)

    result_rows: list[dict[str, float]] = []

    def report(row: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(row)

    def checkpoint(epoch: int, m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        _save_epoch(task.resume_url, epoch, m, opt, history + result_rows)
        report(result_rows[-1])        # an epoch is reported once it is durable: a retry never repeats it

    def record(row: dict[str, float]) -> None:
        result_rows.append(clock.stamp(row))
        if not task.resume_url:
            report(row)

    result = train(model, loader, task.lrs, epochs=task.epochs, optimizer=task.optimizer, masks=masks,
                   params=task.params, val_loader=val_loader, on_epoch=record,
                   device=device, seed=task.seed + start_epoch, start_epoch=start_epoch,
                   optimizer_state=opt_state, on_checkpoint=checkpoint if task.resume_url else None)
    full = history + result.history
    if full:
        check_learned(full[-1], chance_level(splits.train.y), peak_lr=max(task.lrs))
    out = TrainOutcome(name=task.name, state={}, history=full, steps=result.steps,
                       train_seconds=result.train_seconds, seconds=0.0, resumed_from_epoch=start_epoch,
                       epochs_trained=task.epochs - start_epoch)
    if task.finish is not None:
        out.scores, out.probs, out.saved = finish(model, masks, splits, task.data.batch_size, task.finish,
                                                  device)
        if task.finish.probs_url and out.probs is not None:
            out.probs_url, out.probs = save_probs(task.finish.probs_url, out.probs), None
    if task.keep_state:
        out.state = cpu_state(model)
    del model, loader, val_loader
    return clock.finish(out)


def save_probs(url: str, probs: torch.Tensor) -> str:
    """Save a test softmax (n, classes) beside its model's checkpoint (the soup step reads it for the
    prediction ensemble); returns `url`."""
    save(url, Checkpoint(state={"probs": probs.detach().cpu().float()}))
    return url


def load_probs(url: str) -> torch.Tensor:
    return load(url).state["probs"]


_CACHE: dict[str, Checkpoint] = {}
CACHED_CHECKPOINTS = 2          # a worker keeps the last checkpoints it read (the pruned model its ingredients share)
CACHE_MAX_BYTES = 256 << 20     # ... when they are small: a language model's is read again rather than kept


def load_cached(url: str) -> Checkpoint:
    """The checkpoint at `url`, from this process's cache of the last CACHED_CHECKPOINTS read (those of at
    most CACHE_MAX_BYTES). Artifacts are written once under a fresh name, so a cached copy never goes
    stale; callers must not change its tensors."""
    if url in _CACHE:
        return _CACHE[url]
    ckpt = load(url)
    if sum(t.numel() * t.element_size() for t in ckpt.state.values()) <= CACHE_MAX_BYTES:
        while len(_CACHE) >= CACHED_CHECKPOINTS:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[url] = ckpt
    return ckpt


def release_memory() -> None:
    """Collect garbage and give freed heap pages back to the system (glibc's malloc_trim): a worker that
    has freed a model's worth of tensors keeps them as its resident size otherwise, and Ray's memory
    monitor counts resident size."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# glibc's mallopt parameter, and the size from which an allocation gets pages of its own
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def tune_allocator() -> None:
    """For a process that trains a language model (run_lm_task): every allocation of MMAP_THRESHOLD_BYTES or
    more gets pages of its own, given back when it is freed. glibc otherwise raises that threshold as
    large blocks are freed and serves them from its heap, which then keeps a training step's transients
    (activations, the adapters' updates) as resident memory: a SmolLM2-135M PERP ingredient (1 epoch,
    gradient checkpointing) peaks at 2.4 GB instead of 2.9 GB, for ~15 % more CPU time (page faults)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def finish(model: torch.nn.Module, masks: Masks | None, splits, batch_size: int, fin: Finish,
           device: torch.device) -> tuple[dict[str, float], torch.Tensor | None, SavedModel]:
    """Recalibrate, score and save a trained model (see `Finish`); returns (scores, test softmax, saved)."""
    scores: dict[str, float] = {}
    if fin.recal_fraction > 0 and has_batchnorm(model):
        scores, _ = score_splits(model, splits, batch_size, device=device, suffix="_raw")
        bn_recalibrate(model, make_loader(splits.train, batch_size, shuffle=False), fin.recal_fraction, device=device)
    recal, probs = score_splits(model, splits, batch_size, device=device, probs=fin.probs or bool(fin.probs_url))
    scores.update(recal)
    saved = save_model(fin.url, model, masks or full_masks(model), fin.meta)
    return scores, probs, saved
