"""Units of work that executors run: one training run (the dense model or one soup ingredient).

A `TrainTask` is plain data (picklable, no DB or HTTP), so the same function runs in-process in the
sequential executor and on a Ray worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.checkpoint import Checkpoint, CheckpointError, load, save
from workers.data import DataConfig, load_splits, make_loader
from workers.models import build_model
from workers.pruning import Masks
from workers.soup import State
from workers.train import OptimizerConfig, default_device, train


@dataclass
class TrainTask:
    name: str                              # "dense", "phase2/ingredient1", ...
    arch: str
    data: DataConfig
    data_seed: int                         # the job's seed: fixes the train/val/test split
    lrs: list[float]                       # per-step learning rates, len = epochs * batches per epoch
    epochs: int
    seed: int = 0                          # batch order, augmentation, dropout, (dense) initialisation
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_state: State | None = None        # None: a freshly initialised model (dense run)
    masks: Masks | None = None             # pruned weights stay exactly zero
    optimizer: OptimizerConfig = OptimizerConfig()
    params: str = "all"
    augment: bool = False
    threads: int | None = None             # torch intra-op threads on a worker
    info: dict[str, Any] = field(default_factory=dict)   # what varies, for the record
    resume_url: str | None = None          # epoch checkpoint: written after every epoch, resumed from if present


@dataclass
class TrainOutcome:
    name: str
    state: State
    history: list[dict[str, float]]
    steps: int
    train_seconds: float                   # inside training steps
    seconds: float                         # the whole task, set-up included
    resumed_from_epoch: int = 0            # > 0: continued from an epoch checkpoint (a retried task)


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


def run_train_task(task: TrainTask, on_epoch: Callable[[dict[str, float]], None] | None = None,
                   device: torch.device | None = None) -> TrainOutcome:
    """Build the model (fresh or from `init_state`), train it on the task's data, return its state.

    With `resume_url`, an epoch checkpoint is written there after every epoch, and a task that
    finds one (a retry after its worker died) continues from that epoch instead of starting over.
    """
    start = time.perf_counter()
    if task.threads:
        torch.set_num_threads(task.threads)
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
    # a resumed run draws fresh batch orders for the epochs left (not the ones the lost run would have)
    loader = make_loader(splits.train, task.data.batch_size, shuffle=True, seed=task.seed + 7919 * start_epoch,
                         augment=task.augment)
    val_loader = make_loader(splits.val, task.data.batch_size, shuffle=False)

    def checkpoint(epoch: int, m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        _save_epoch(task.resume_url, epoch, m, opt, history + result_rows)

    result_rows: list[dict[str, float]] = []

    def record(row: dict[str, float]) -> None:
        result_rows.append(row)
        if on_epoch is not None:
            on_epoch(row)

    result = train(model, loader, task.lrs, epochs=task.epochs, optimizer=task.optimizer, masks=task.masks,
                   params=task.params, val_loader=val_loader, on_epoch=record,
                   device=device or default_device(), seed=task.seed + start_epoch, start_epoch=start_epoch,
                   optimizer_state=opt_state, on_checkpoint=checkpoint if task.resume_url else None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return TrainOutcome(name=task.name, state=state, history=history + result.history, steps=result.steps,
                        train_seconds=result.train_seconds, seconds=time.perf_counter() - start,
                        resumed_from_epoch=start_epoch)
