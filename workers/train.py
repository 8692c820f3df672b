"""Training with SGD (or SFW) on a per-step LR schedule that keeps pruned weights (and their momentum) at zero.

Masked training: before every optimizer step the gradient of each pruned weight is zeroed, so with
w = 0 the weight-decay term, the momentum buffer and the (Nesterov) update of that weight are all
exactly zero; after the step the weights are multiplied by their mask once more as a guard.

With `OptimizerConfig(name="sfw")` the dense run uses Stochastic Frank-Wolfe instead (workers.sfw:
every parameter tensor stays inside its constraint set; the schedule's LR is SFW's step size before
rescaling; no weight decay).

Divergence is an error, not a result: a loss that turns NaN or infinite stops training at once, and
a run whose last epoch is no better than always guessing the most frequent class (`check_learned`)
fails too; both raise `TrainingDiverged` naming the learning rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.evaluate import evaluate
from workers.pruning import Masks, prunable_names
from workers.sfw import SFWConfig, make_sfw
from workers.config import IMAGE_PARAMS, TrainingDiverged, OptimizerConfig  # noqa: F401  (torch-free: the driver and the API use them)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
PARAM_MODES = IMAGE_PARAMS             # declared in workers.config (TASK_OPTIONS)


CHANCE_MARGIN = 0.01          # an accuracy within this of chance counts as "learned nothing"


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)   # one row per epoch
    steps: int = 0
    train_seconds: float = 0.0    # time inside training steps (forward, backward, update)
    optimizer: torch.optim.Optimizer | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trainable_parameters(model: nn.Module, params: str = "all") -> list[nn.Parameter]:
    """all: every parameter; bias_norm: only biases and normalisation-layer parameters."""
    if params == "all":
        return list(model.parameters())
    if params != "bias_norm":
        raise ValueError(f"unknown retrain params {params!r}; known: {', '.join(PARAM_MODES)}")
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or name == "bias":
                chosen[id(p)] = p
    return list(chosen.values())


def make_optimizer(trainable: list[nn.Parameter], cfg: OptimizerConfig,
                   model: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD, or SFW (needs the `model` the parameters belong to: the constraint radii come from its layers)."""
    if cfg.name == "sfw":
        if model is None:
            raise ValueError("the sfw optimizer needs the model (its layers set the constraint radii)")
        return make_sfw(model, trainable, cfg.sfw or SFWConfig())
    if cfg.name != "sgd":
        raise ValueError(f"unknown optimizer {cfg.name!r}; known: sgd, sfw")
    return torch.optim.SGD(trainable, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def train(model: nn.Module, loader: Iterable, lrs: list[float], *, epochs: int,
          optimizer: OptimizerConfig = OptimizerConfig(), masks: Masks | None = None, params: str = "all",
          val_loader: Iterable | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None,
          device: torch.device | None = None, seed: int = 0, start_epoch: int = 0,
          optimizer_state: dict | None = None,
          on_checkpoint: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None) -> TrainResult:
    """Train `model` in place for `epochs` epochs; step i uses lr = lrs[i] (len(lrs) = epochs * len(loader)).

    `masks` (name -> bool tensor) pins pruned weights to zero; `params="bias_norm"` freezes every
    other parameter. `on_epoch` receives each epoch's row: epoch, step, lr, train_loss,
    train_accuracy, and val_loss / val_accuracy when `val_loader` is given. To resume, pass the
    epochs already done as `start_epoch` with the optimizer's `optimizer_state`; `on_checkpoint`
    is called after every epoch with (epoch, model, optimizer) so that the caller can save both.
    """
    device = device or default_device()
    steps_per_epoch = len(loader)
    if len(lrs) != epochs * steps_per_epoch:
        raise ValueError(f"schedule has {len(lrs)} steps, training needs {epochs} x {steps_per_epoch}")
    torch.manual_seed(seed)
    model.to(device)
    trainable = trainable_parameters(model, params)
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = make_optimizer(trainable, optimizer, model)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    named = dict(model.named_parameters())
    pinned = [(named[n], m.to(device=device, dtype=named[n].dtype))
              for n, m in (masks or {}).items() if n in prunable_names(model)] if masks else []

    result = TrainResult()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            if not math.isfinite(loss_value := loss.item()):
                raise TrainingDiverged(f"the training loss became {loss_value} at epoch {epoch}, step {step + 1} "
                                       f"with learning rate {lrs[step]:.4g} (peak {max(lrs):.4g}): lower the "
                                       "learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for w, m in pinned:
                    if w.grad is not None:
                        w.grad.mul_(m)
                opt.step()
                for w, m in pinned:
                    w.mul_(m)
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            step += 1
        result.train_seconds += time.perf_counter() - start
        row = {"epoch": epoch, "step": step, "lr": lrs[step - 1],
               "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        if val_loader is not None and len(val_loader):
            val = evaluate(model, val_loader, device=device)
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if on_checkpoint is not None:
            on_checkpoint(epoch, model, opt)
    for p in model.parameters():
        p.requires_grad_(True)
    result.steps = step - start_epoch * steps_per_epoch
    result.optimizer = opt
    return result


def check_learned(row: dict[str, float], chance: float, *, peak_lr: float, margin: float = CHANCE_MARGIN) -> None:
    """Raise TrainingDiverged when an epoch's row shows chance-level accuracy: train accuracy and, where
    measured, val accuracy both at most `chance` + `margin` (chance: the most frequent class's share)."""
    accs = [row[k] for k in ("train_accuracy", "val_accuracy") if k in row]
    if accs and all(a <= chance + margin for a in accs):
        seen = ", ".join(f"{k.replace('_', ' ')} {row[k]:.3f}" for k in ("train_accuracy", "val_accuracy")
                         if k in row)
        raise TrainingDiverged(f"training ended at chance level ({seen}; chance {chance:.3f}) with peak "
                               f"learning rate {peak_lr:.4g}: the run diverged or learned nothing; lower the "
                               "learning rate")
