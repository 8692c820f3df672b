"""Evaluation: accuracy, loss, expected calibration error, the prediction ensemble, and the sparsity
figures of a model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from workers.data import Splits, make_loader
from workers.pruning import Masks, masks_from_weights, prunable_names, sparsity


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device | None = None,
             bins: int = 15, probs: bool = False) -> dict:
    """Accuracy, mean cross-entropy loss and ECE over `loader` (model in eval mode).

    ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over `bins` equal-width confidence bins.
    probs=True adds "probs": the softmax of every example (n, classes), float32 on the CPU, in the
    loader's order (for the prediction ensemble).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(device)
    loss_sum, n = 0.0, 0
    confs, hits, softmax = [], [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        p = logits.softmax(1)
        conf, pred = p.max(1)
        confs.append(conf.cpu())
        hits.append((pred == y).cpu())
        if probs:
            softmax.append(p.cpu())
        n += len(y)
    model.train(was_training)
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "ece": float("nan"), "n": 0}
    conf, hit = torch.cat(confs), torch.cat(hits).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += float(sel.float().mean()) * abs(float(hit[sel].mean()) - float(conf[sel].mean()))
    out = {"accuracy": float(hit.mean()), "loss": loss_sum / n, "ece": ece, "n": n}
    if probs:
        out["probs"] = torch.cat(softmax)
    return out


def ensemble_accuracy(probs: Sequence[torch.Tensor], y: torch.Tensor) -> float:
    """Accuracy of the prediction ensemble: argmax_c (1/m) sum_i softmax_i(x)_c compared with y.

    `probs` holds one (n, classes) softmax per member, rows in the same order as `y`."""
    if not probs:
        raise ValueError("an ensemble needs at least one member")
    mean = torch.stack([p.float() for p in probs]).mean(0)
    return float((mean.argmax(1) == y.to(mean.device)).float().mean())


def chance_level(y: torch.Tensor) -> float:
    """The accuracy of always predicting the most frequent class of `y`."""
    return float(torch.bincount(y).max()) / len(y) if len(y) else 0.0


def model_stats(model: nn.Module, masks: Masks | None = None) -> dict:
    """Sparsity (global and per layer) of the prunable weights, nonzero and total parameter counts.

    Without `masks` the sparsity is read off the weights (w == 0 counts as pruned).
    """
    names = prunable_names(model)
    masks = masks if masks is not None else masks_from_weights(model, names)
    global_sparsity, per_layer = sparsity(masks)
    params = list(model.parameters())
    return {
        "sparsity": global_sparsity,
        "layer_sparsity": per_layer,
        "nonzeros": int(sum(int((p != 0).sum()) for p in params)),
        "parameters": int(sum(p.numel() for p in params)),
        "prunable": int(sum(m.numel() for m in masks.values())),
    }


def score_splits(model: nn.Module, splits: Splits, batch_size: int, *, device: torch.device | None = None,
                 probs: bool = False, suffix: str = "") -> tuple[dict[str, float], torch.Tensor | None]:
    """{val,test}_{accuracy,loss,ece}{suffix} over the splits that have examples, and (probs=True) the
    test split's softmax for the prediction ensemble."""
    out: dict[str, float] = {}
    test_probs = None
    for name in ("val", "test"):
        split = getattr(splits, name)
        if len(split):
            r = evaluate(model, make_loader(split, batch_size, shuffle=False), device=device,
                         probs=probs and name == "test")
            out.update({f"{name}_accuracy{suffix}": r["accuracy"], f"{name}_loss{suffix}": r["loss"],
                        f"{name}_ece{suffix}": r["ece"]})
            test_probs = r.get("probs", test_probs)
    return out, test_probs


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
