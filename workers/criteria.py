"""Pruning criteria of image models: one score per weight of a tensor; the lowest scores are pruned first,
within the tensor (scope layerwise, and N:M groups) or across every prunable tensor (scope global).

Declared here once: workers.pruning ranks by these functions and the job spec offers their names
(workers.config.TASK_OPTIONS). Importable without torch (the API and the driver read the names): each
function gets a weight tensor and a seeded generator and returns flat float32 scores on the CPU, importing
torch only to build new tensors. Adding a criterion is a function here and its entry in SCORES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Score = Callable[[Any, Any], Any]        # (weight tensor, torch.Generator) -> flat float32 scores on the CPU


def magnitude(weight: Any, generator: Any) -> Any:
    """s(w) = |w|."""
    return weight.detach().abs().float().flatten().cpu()


def random(weight: Any, generator: Any) -> Any:
    """s(w) ~ U[0, 1), from the seeded generator: a baseline that ignores the weights."""
    import torch
    return torch.rand(weight.numel(), generator=generator)


def lamp(weight: Any, generator: Any) -> Any:
    """LAMP (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021). With the
    tensor's weights sorted by magnitude, |w_1| <= ... <= |w_n|:

        s(w_u) = w_u^2 / sum_{v >= u} w_v^2

    Within a tensor the order is the magnitude order; across tensors (scope global) the scores are
    comparable, so that each layer's sparsity adapts to its weights instead of their scale, and every
    layer keeps its largest weight (its score is 1). Pruned weights are zeros: they score 0 and do not
    enter any other weight's denominator."""
    import torch
    sq = weight.detach().flatten().cpu().double().pow(2)
    order = torch.argsort(sq, stable=True)
    ascending = sq[order]
    tail = ascending.flip(0).cumsum(0).flip(0)                       # sum_{v >= u} w_v^2 in sorted order
    scores = torch.empty_like(sq)
    scores[order] = ascending / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.float()


SCORES: dict[str, Score] = {"magnitude": magnitude, "random": random, "lamp": lamp}
