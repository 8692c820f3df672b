"""Sparse model soups: averaging ingredients that share one sparsity mask, and BatchNorm recalibration.

uniform soup  theta = (1/m) sum_i theta_i over every state tensor (BN running stats included);
greedy soup   sort ingredients by score (validation accuracy after BN recalibration), start from the
              best, add the next one when the uniform average of the chosen set plus it does not
              lower the score.
Every ingredient must carry the parent's mask exactly (no weight alive outside it), so the soup has
that mask too; this is checked, not assumed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.pruning import Masks

State = dict[str, torch.Tensor]


class MaskMismatchError(ValueError):
    """An ingredient does not carry the parent's sparsity mask."""


def check_shared_mask(states: Sequence[State], masks: Masks, ingredient_masks: Sequence[Masks] | None = None) -> None:
    """Refuse ingredients whose mask differs from `masks` or that have a weight alive outside it."""
    if not states:
        raise ValueError("a soup needs at least one ingredient")
    for i, state in enumerate(states):
        if ingredient_masks is not None:
            own = ingredient_masks[i]
            for name, m in masks.items():
                if name not in own or not torch.equal(own[name].cpu().bool(), m.cpu().bool()):
                    raise MaskMismatchError(f"ingredient {i} has a different mask for {name}: "
                                            "ingredients of one soup must share the parent's mask")
        for name, m in masks.items():
            if name not in state:
                raise MaskMismatchError(f"ingredient {i} has no tensor {name}")
            alive_outside = int(((state[name].cpu() != 0) & ~m.cpu().bool()).sum())
            if alive_outside:
                raise MaskMismatchError(f"ingredient {i} has {alive_outside} nonzero weights outside the "
                                        f"parent's mask in {name}: ingredients of one soup must share its mask")


def average(states: Sequence[State]) -> State:
    """The uniform average of every floating-point tensor; integer tensors (BN batch counters) from the first."""
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys):
            raise ValueError(f"ingredient {i} has different state keys from ingredient 0")
    out = {}
    for k in keys:
        t0 = states[0][k]
        if t0.is_floating_point():
            out[k] = torch.stack([s[k].to(t0.device, torch.float64) for s in states]).mean(0).to(t0.dtype)
        else:
            out[k] = t0.clone()
    return out


def uniform_soup(states: Sequence[State], masks: Masks, ingredient_masks: Sequence[Masks] | None = None) -> State:
    """Check that every ingredient shares `masks`, then average them uniformly."""
    check_shared_mask(states, masks, ingredient_masks)
    soup = average(states)
    check_shared_mask([soup], masks)
    return soup


@dataclass(frozen=True)
class GreedyResult:
    state: State
    chosen: list[int]               # indices of the ingredients in the soup, in the order added
    score: float                    # score of the soup
    ingredient_scores: list[float]  # score of each ingredient on its own


def greedy_soup(states: Sequence[State], masks: Masks, score: Callable[[State], float],
                ingredient_masks: Sequence[Masks] | None = None,
                scores: Sequence[float | None] | None = None) -> GreedyResult:
    """Greedy soup (module docstring); never scores below its best ingredient under `score`.
    `scores`: the ingredients' own scores where already known (None entries are computed)."""
    check_shared_mask(states, masks, ingredient_masks)
    given = list(scores) if scores is not None else [None] * len(states)
    scores = [score(s) if v is None else float(v) for s, v in zip(states, given)]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    soup = states[order[0]]
    for i in order[1:]:
        candidate = average([states[j] for j in chosen + [i]])
        s = score(candidate)
        if s >= best:
            chosen, best, soup = chosen + [i], s, candidate
    return GreedyResult(state=dict(soup), chosen=chosen, score=best, ingredient_scores=scores)


@torch.no_grad()
def bn_recalibrate(model: nn.Module, loader: Iterable, fraction: float, *,
                   device: torch.device | None = None) -> nn.Module:
    """Reset every BatchNorm's running stats and re-estimate them in train mode, without gradients,
    over the first ceil(fraction * len(loader)) batches of `loader` (give it an unshuffled loader).
    Weights are not changed; a model without BatchNorm is returned as it is."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or fraction <= 0:
        return model
    device = device or next(model.parameters()).device
    n_batches = max(1, math.ceil(fraction * len(loader)))
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None           # cumulative average over the recalibration batches
    model.train()
    for x, _ in itertools.islice(loader, n_batches):
        model(x.to(device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return model


def pairwise_distances(states: Sequence[State], names: Iterable[str]) -> list[float]:
    """L2 distance between every pair of ingredients over the named tensors (the prunable weights)."""
    names = list(names)
    flat = [torch.cat([s[n].flatten().double() for n in names]) for s in states]
    return [float(torch.linalg.vector_norm(a - b)) for a, b in itertools.combinations(flat, 2)]
