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


SCORES: dict[str, Score] = {"magnitude": magnitude, "random": random}
