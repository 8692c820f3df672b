"""Evaluation: accuracy, loss, expected calibration error, and the sparsity figures of a model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from workers.pruning import Masks, masks_from_weights, prunable_names, sparsity


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device | None = None,
             bins: int = 15) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and ECE over `loader` (model in eval mode).

    ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over `bins` equal-width confidence bins.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(device)
    loss_sum, n = 0.0, 0
    confs, hits = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        conf, pred = logits.softmax(1).max(1)
        confs.append(conf.cpu())
        hits.append((pred == y).cpu())
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
    return {"accuracy": float(hit.mean()), "loss": loss_sum / n, "ece": ece, "n": n}


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
