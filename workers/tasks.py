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


@dataclass
class TrainOutcome:
    name: str
    state: State
    history: list[dict[str, float]]
    steps: int
    train_seconds: float                   # inside training steps
    seconds: float                         # the whole task, set-up included


def steps_per_epoch(data: DataConfig, data_seed: int) -> int:
    splits = load_splits(data, data_seed)
    return len(make_loader(splits.train, data.batch_size, shuffle=True))


def run_train_task(task: TrainTask, on_epoch: Callable[[dict[str, float]], None] | None = None,
                   device: torch.device | None = None) -> TrainOutcome:
    """Build the model (fresh or from `init_state`), train it on the task's data, return its state."""
    start = time.perf_counter()
    if task.threads:
        torch.set_num_threads(task.threads)
    splits = load_splits(task.data, task.data_seed)
    torch.manual_seed(task.seed)
    model = build_model(task.arch, num_classes=splits.num_classes, in_shape=splits.in_shape, **task.model_kwargs)
    if task.init_state is not None:
        model.load_state_dict(task.init_state)
    loader = make_loader(splits.train, task.data.batch_size, shuffle=True, seed=task.seed, augment=task.augment)
    val_loader = make_loader(splits.val, task.data.batch_size, shuffle=False)
    result = train(model, loader, task.lrs, epochs=task.epochs, optimizer=task.optimizer, masks=task.masks,
                   params=task.params, val_loader=val_loader, on_epoch=on_epoch,
                   device=device or default_device(), seed=task.seed)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return TrainOutcome(name=task.name, state=state, history=result.history, steps=result.steps,
                        train_seconds=result.train_seconds, seconds=time.perf_counter() - start)
