"""One-shot robustness curve of a dense model (design section 6b, SFW): how much accuracy survives
magnitude pruning to a grid of sparsities with no retraining at all.

For every sparsity s of the grid, on a *copy* of the dense model:

    1. global magnitude pruning (workers.pruning.prune, scope "global" by default): rank every
       conv/linear weight of the model together by |w| and zero the smallest until exactly
       round(n * (1 - s)) of the n prunable weights remain (biases and norm parameters are kept);
    2. BatchNorm recalibration (workers.soup.bn_recalibrate, as for soups): reset the running
       statistics and re-estimate them in train mode, without gradients, over the first
       ceil(fraction * len(loader)) batches of an unshuffled calibration loader. Weights are not
       changed; a model without BatchNorm skips this step;
    3. score it: accuracy over the evaluation loader (the caller says which split; the pipeline
       uses the test split, like every phase accuracy, so the curve and the soups compare).

A point is ``{"sparsity": s, "accuracy": a}`` with s the grid's value (the pruned copy keeps exactly
round(n * (1 - s)) weights, so its measured sparsity is s to within 1/n); a model with BatchNorm also
gets ``"accuracy_raw"``, the accuracy before recalibration. The input model is never modified. A model
that is sparse already (its zero weights count as pruned) gets points only at the grid's sparsities
that are at least its own: below it, no pruning could reach the sparsity asked.
Cost: len(sparsities) prunings, recalibrations and evaluations (no gradient step).

`one_shot_curve` is the entry point for benchmarks (a model and two loaders); `curve` is the same
procedure over any score function (the pipeline's tasks use it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from workers.evaluate import evaluate, has_batchnorm, model_stats
from workers.pruning import Masks, prune
from workers.soup import bn_recalibrate
from workers.config import SPARSITIES, MAX_POINTS, check_sparsities  # noqa: F401  (torch-free: the driver and the API use them)


Point = dict[str, float]


def one_shot(model: nn.Module, target: float, *, scope: str = "global") -> tuple[nn.Module, Masks]:
    """A magnitude-pruned copy of the dense `model` at `target` sparsity, and its masks (True = kept)."""
    r = prune(model, None, target, scope=scope, criterion="magnitude")
    return r.model, r.masks


def curve(model: nn.Module, score: Callable[[nn.Module], float], *,
          recalibrate: Callable[[nn.Module], nn.Module] | None = None,
          sparsities: Sequence[float] = SPARSITIES, scope: str = "global", key: str = "accuracy",
          prune_fn: Callable[[nn.Module, float], nn.Module] | None = None) -> list[Point]:
    """The procedure of the module docstring with any `score` (higher or lower is better: the curve
    does not care) and `recalibrate` (in place on the pruned copy; None: no recalibration). Points
    are `{"sparsity", key, f"{key}_raw" (only with `recalibrate`)}`, in increasing sparsity, for the
    grid's sparsities not below the model's own. `prune_fn(model, s)`: how a pruned copy at s is made
    (default: magnitude over single weights; channel pruning passes workers.structured's, where s is the
    share of channels removed)."""
    points = []
    stats = model_stats(model)
    own, tol = stats["sparsity"], 1.0 / max(stats["prunable"], 1)     # one weight's worth of rounding
    for s in check_sparsities(sparsities):
        if s < own - tol:
            continue
        pruned = prune_fn(model, s) if prune_fn is not None else one_shot(model, s, scope=scope)[0]
        point: Point = {"sparsity": s}
        if recalibrate is not None:
            point[f"{key}_raw"] = float(score(pruned))
            pruned = recalibrate(pruned)
        point[key] = float(score(pruned))
        points.append(point)
    return points


def one_shot_curve(model: nn.Module, eval_loader: Iterable, calibration_loader: Iterable | None = None, *,
                   sparsities: Sequence[float] = SPARSITIES, bn_fraction: float = 0.2, scope: str = "global",
                   device: torch.device | None = None,
                   prune_fn: Callable[[nn.Module, float], nn.Module] | None = None) -> list[Point]:
    """Accuracy of `model` after one-shot global magnitude pruning to each of `sparsities`, BatchNorm
    recalibrated on the first `bn_fraction` of `calibration_loader` (unshuffled train batches; None
    or a model without BatchNorm: no recalibration), scored on `eval_loader` (batches of (x, y)).

    Returns ``[{"sparsity": s, "accuracy": a, "accuracy_raw": a_before_recalibration}, ...]`` in
    increasing sparsity; "accuracy_raw" only when BatchNorm was recalibrated. `model` is not modified.
    """
    def score(m: nn.Module) -> float:
        return evaluate(m, eval_loader, device=device)["accuracy"]

    def recalibrate(m: nn.Module) -> nn.Module:
        return bn_recalibrate(m, calibration_loader, bn_fraction, device=device)

    recal = calibration_loader is not None and bn_fraction > 0 and has_batchnorm(model)
    return curve(model, score, recalibrate=recalibrate if recal else None, sparsities=sparsities, scope=scope,
                 prune_fn=prune_fn)

