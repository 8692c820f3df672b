"""Magnitude (and random) pruning of conv/linear weights with explicit masks.

A *mask* is a dict ``{parameter name: bool tensor}`` over the prunable weights: True = kept.
Prunable are the weight tensors of every conv and linear layer, first and last included; biases
and normalisation parameters are never pruned.

Each phase removes the same fraction p of the *remaining* weights,

    p = 1 - (1 - S) ** (1 / T),        sparsity after phase t = 1 - (1 - p) ** t,

so that T phases reach the target sparsity S.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

Masks = dict[str, torch.Tensor]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruningError(ValueError):
    """Pruning was asked for something impossible (bad rate, masks that don't fit the model)."""


def per_phase_rate(target_sparsity: float, phases: int) -> float:
    """p = 1 - (1 - S)^(1/T): the fraction of remaining weights each of T phases removes."""
    if not 0.0 <= target_sparsity < 1.0:
        raise PruningError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if phases < 1:
        raise PruningError(f"phases must be at least 1, got {phases}")
    return 1.0 - (1.0 - target_sparsity) ** (1.0 / phases)


def sparsity_after(rate: float, phase: int) -> float:
    """Sparsity after `phase` phases of per-phase rate p: 1 - (1 - p)^t."""
    return 1.0 - (1.0 - rate) ** phase


def prunable_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.state_dict()``) of the weight tensors of every conv and linear layer."""
    return [f"{name}.weight" if name else "weight" for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_TYPES)]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def full_masks(model: nn.Module) -> Masks:
    """All-True masks for a dense model."""
    params = _params(model)
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model)}


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Refuse masks that don't cover exactly the model's prunable weights with matching shapes."""
    params = _params(model)
    names = prunable_names(model)
    if set(masks) != set(names):
        missing, extra = sorted(set(names) - set(masks)), sorted(set(masks) - set(names))
        raise PruningError(f"masks do not match the model's prunable weights (missing {missing}, extra {extra})")
    for n in names:
        if masks[n].shape != params[n].shape:
            raise PruningError(f"mask for {n} has shape {tuple(masks[n].shape)}, weight has {tuple(params[n].shape)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero every pruned weight in place (w <- w * m) and return the model."""
    params = _params(model)
    for n, m in masks.items():
        params[n].mul_(m.to(device=params[n].device, dtype=params[n].dtype))
    return model


@dataclass(frozen=True)
class PruneResult:
    model: nn.Module
    masks: Masks
    removed: int            # weights removed by this step
    norm_drop: float        # d = ||theta - theta_pruned||_2 / ||theta||_2 (see `weight_and_bias_norm_sq`)


def weight_and_bias_norm_sq(model: nn.Module) -> float:
    """||theta||^2 over the `weight` and `bias` parameters of every module, normalisation layers
    included (the SMS reference code's definition of the model norm for ALLR's norm drop)."""
    total = 0.0
    for module in model.modules():
        for name in ("weight", "bias"):
            p = module._parameters.get(name)
            if p is not None:
                total += float(p.detach().double().pow(2).sum())
    return total


def _scores(weight: torch.Tensor, criterion: str, generator: torch.Generator | None) -> torch.Tensor:
    if criterion == "magnitude":
        return weight.detach().abs().float().flatten().cpu()
    if criterion == "random":
        return torch.rand(weight.numel(), generator=generator)
    raise PruningError(f"unknown pruning criterion {criterion!r}; known: magnitude, random")


def _drop_k(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k alive entries with the smallest score (exactly k, ties broken by order)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    masked = torch.where(alive, scores, torch.full_like(scores, math.inf))
    return torch.topk(masked, k, largest=False, sorted=False).indices


@torch.no_grad()
def prune(model: nn.Module, masks: Masks | None, target_sparsity: float, *, scope: str = "global",
          criterion: str = "magnitude", seed: int = 0) -> PruneResult:
    """Prune a copy of `model` to `target_sparsity` of its prunable weights (the input is not modified).

    global: rank all still-unpruned prunable weights together and drop the smallest until
    round(n * (1 - S)) weights remain; layerwise: the same within every tensor. Counting towards the
    absolute target (not a fraction of what remains) keeps every phase within one weight per
    tensor of 1 - (1 - p)^t.

    Also returns ALLR's norm drop d = ||theta - theta_pruned||_2 / ||theta||_2, where theta is every
    weight and bias of the model, BatchNorm's included (as the SMS reference code measures it):
    pruning changes only the removed weights, so the numerator is their L2 norm.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise PruningError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if scope not in ("global", "layerwise"):
        raise PruningError(f"unknown pruning scope {scope!r}; known: global, layerwise")
    model = copy.deepcopy(model)
    masks = full_masks(model) if masks is None else {n: m.clone().bool() for n, m in masks.items()}
    check_masks(model, masks)
    params = _params(model)
    names = prunable_names(model)
    gen = torch.Generator().manual_seed(seed)
    scores = {n: _scores(params[n], criterion, gen) for n in names}
    alive = {n: masks[n].flatten().cpu() for n in names}

    def n_drop(alive_: torch.Tensor) -> int:
        return max(0, int(alive_.sum()) - round(alive_.numel() * (1.0 - target_sparsity)))

    if scope == "global":
        flat_scores = torch.cat([scores[n] for n in names])
        flat_alive = torch.cat([alive[n] for n in names])
        drop = torch.zeros_like(flat_alive)
        drop[_drop_k(flat_scores, flat_alive, n_drop(flat_alive))] = True
        drops = dict(zip(names, torch.split(drop, [alive[n].numel() for n in names])))
    else:
        drops = {}
        for n in names:
            d = torch.zeros_like(alive[n])
            d[_drop_k(scores[n], alive[n], n_drop(alive[n]))] = True
            drops[n] = d

    before_sq = weight_and_bias_norm_sq(model)
    removed_sq = 0.0
    removed = 0
    for n in names:
        drop = drops[n].view_as(masks[n]).to(params[n].device)
        removed_sq += float(params[n][drop].double().pow(2).sum())
        removed += int(drop.sum())
        masks[n] = masks[n].to(params[n].device) & ~drop
    apply_masks(model, masks)
    norm_drop = math.sqrt(removed_sq / before_sq) if before_sq > 0 else 0.0
    return PruneResult(model=model, masks=masks, removed=removed, norm_drop=norm_drop)


def sparsity(masks: Masks) -> tuple[float, dict[str, float]]:
    """(global sparsity, per-layer sparsity) of the masks: the share of pruned prunable weights."""
    per_layer = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return (1.0 - kept / total if total else 0.0), per_layer


def masks_from_weights(model_or_state: nn.Module | dict[str, torch.Tensor], names: list[str]) -> Masks:
    """The support (w != 0) of the named weights."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {n: state[n] != 0 for n in names}
