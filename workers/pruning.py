"""Magnitude (and random) pruning of conv/linear weights with explicit masks.

A *mask* is a dict ``{parameter name: bool tensor}`` over the prunable weights: True = kept.
Prunable are the weight tensors of every conv and linear layer, first and last included; biases
and normalisation parameters are never pruned.

Each phase removes the same fraction p of the *remaining* weights,

    p = 1 - (1 - S) ** (1 / T),        sparsity after phase t = 1 - (1 - p) ** t,

so that T phases reach the target sparsity S.

N:M patterns (``pattern="2:4"``, ``"4:8"``; `prune_nm`) are reached in one step instead: in every group
of M consecutive weights along a layer's input channels at most N stay (see `nm_keep_mask`).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from workers.config import PruningError, parse_pattern, per_phase_rate, sparsity_after  # noqa: F401  (torch-free: the driver and the API use them)
from workers.criteria import SCORES

Masks = dict[str, torch.Tensor]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


def check_masks(model: nn.Module, masks: Masks, names: list[str] | None = None) -> None:
    """Refuse masks that don't cover exactly the model's prunable weights (`names`; default
    `prunable_names(model)`) with matching shapes."""
    params = _params(model)
    names = prunable_names(model) if names is None else names
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
    notes: tuple[str, ...] = ()     # what a user should know about this step (e.g. N:M layers left denser)


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
    """The criterion's scores of `weight` (workers.criteria), flat on the CPU."""
    score = SCORES.get(criterion)
    if score is None:
        raise PruningError(f"unknown pruning criterion {criterion!r}; known: {', '.join(SCORES)}")
    return score(weight, generator)


def _drop_k(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k alive entries with the smallest score (exactly k, ties broken by order)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    masked = torch.where(alive, scores, torch.full_like(scores, math.inf))
    return torch.topk(masked, k, largest=False, sorted=False).indices


@torch.no_grad()
def prune(model: nn.Module, masks: Masks | None, target_sparsity: float, *, scope: str = "global",
          criterion: str = "magnitude", seed: int = 0, pattern: str = "unstructured") -> PruneResult:
    """Prune a copy of `model` to `target_sparsity` of its prunable weights (the input is not modified).

    global: rank all still-unpruned prunable weights together and drop the smallest until
    round(n * (1 - S)) weights remain; layerwise: the same within every tensor. Counting towards the
    absolute target (not a fraction of what remains) keeps every phase within one weight per
    tensor of 1 - (1 - p)^t.

    Also returns ALLR's norm drop d = ||theta - theta_pruned||_2 / ||theta||_2, where theta is every
    weight and bias of the model, BatchNorm's included (as the SMS reference code measures it):
    pruning changes only the removed weights, so the numerator is their L2 norm.

    pattern "N:M" (e.g. "2:4"): `prune_nm` instead, in one step; `target_sparsity` must be 1 - N/M and
    `scope` does not apply (every group of M input channels is ranked on its own).
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise PruningError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    nm = parse_pattern(pattern)
    if nm is not None:
        if not math.isclose(target_sparsity, 1.0 - nm[0] / nm[1], abs_tol=1e-9):
            raise PruningError(f"pattern {pattern} prunes {1.0 - nm[0] / nm[1]:g} of the weights; "
                               f"target sparsity {target_sparsity:g} does not match it")
        return prune_nm(model, masks, *nm, criterion=criterion, seed=seed)
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

    return _drop(model, masks, drops)


def _drop(model: nn.Module, masks: Masks, drops: dict[str, torch.Tensor], notes: tuple[str, ...] = ()) -> PruneResult:
    """Remove the `drops` (per prunable weight, a bool tensor of its size: True = remove) from `model` (a
    copy, modified in place) and `masks`; the norm drop is the removed weights' L2 norm over ||theta||."""
    params = _params(model)
    before_sq = weight_and_bias_norm_sq(model)
    removed_sq = 0.0
    removed = 0
    for n, drop in drops.items():
        drop = drop.reshape(masks[n].shape).to(params[n].device) & masks[n].to(params[n].device)
        removed_sq += float(params[n][drop].double().pow(2).sum())
        removed += int(drop.sum())
        masks[n] = masks[n].to(params[n].device) & ~drop
    apply_masks(model, masks)
    norm_drop = math.sqrt(removed_sq / before_sq) if before_sq > 0 else 0.0
    return PruneResult(model=model, masks=masks, removed=removed, norm_drop=norm_drop, notes=notes)


# ---------------------------------------------------------------- N:M

def nm_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a matrix whose rows run along the input channels: a linear weight [out, in] as it
    is, a conv weight [out, in, *kernel] as [out * prod(kernel), in] (one row per (out, kh, kw) position,
    dimension 1 moved last). `nm_unrows` undoes it."""
    if weight.dim() < 2:
        raise PruningError(f"N:M needs a weight with input channels in dimension 1, got shape {tuple(weight.shape)}")
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def nm_unrows(rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of `nm_rows` for a weight of `shape`."""
    shape = tuple(shape)
    if len(shape) == 2:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def nm_keep_mask(scores: torch.Tensor, alive: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """The N:M keep mask of a weight (a bool tensor of its shape) from per-weight `scores` of that shape.

    Rule: the input channels (dimension 1: `in` of a linear [out, in] or conv [out, in, kh, kw] weight)
    are cut into groups of m consecutive channels, separately for every output channel and kernel
    position; in each group the n highest-scored alive weights are kept and the others pruned (ties go
    to the earlier channel), so every group holds at most n nonzeros (exactly n when none was dead).
    When `in` is not a multiple of m, the last group of each row is shorter (r < m channels) and
    counts as zero-padded to m: it keeps at most n of its r weights (all of them when r <= n). Such a
    layer, zero-padded along `in` to a multiple of m, is exactly N:M; its sparsity is below 1 - n/m
    (a first conv with 1 or 3 input channels stays dense under 4:8), and the reported sparsity, read
    from the masks, says so. `alive` (same shape, None = all): weights already pruned stay pruned.
    """
    if not 0 < n < m:
        raise PruningError(f"N:M needs 0 < N < M, got {n}:{m}")
    if alive is not None and alive.shape != scores.shape:
        raise PruningError(f"alive mask has shape {tuple(alive.shape)}, scores have {tuple(scores.shape)}")
    rows = nm_rows(scores).float()
    live = torch.ones_like(rows, dtype=torch.bool) if alive is None else nm_rows(alive).bool()
    n_rows, cols = rows.shape
    pad = (-cols) % m
    rows = torch.where(live, rows, torch.full_like(rows, -math.inf))
    if pad:                                    # padding never wins a place: it scores below any dead weight
        rows = torch.cat([rows, torch.full((n_rows, pad), -math.inf, dtype=rows.dtype)], dim=1)
        live = torch.cat([live, torch.zeros((n_rows, pad), dtype=torch.bool)], dim=1)
    groups = rows.reshape(-1, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    keep = (keep & live.reshape(-1, m)).reshape(n_rows, cols + pad)[:, :cols]
    return nm_unrows(keep, scores.shape).contiguous()


def nm_group_counts(mask_or_weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per group of m consecutive input channels (the groups of `nm_keep_mask`, the last one
    zero-padded): a [rows, groups] integer tensor. A mask or weight is N:M when its max is <= N."""
    rows = nm_rows(mask_or_weight != 0)
    pad = (-rows.shape[1]) % m
    if pad:
        rows = torch.cat([rows, torch.zeros((rows.shape[0], pad), dtype=torch.bool, device=rows.device)], dim=1)
    return rows.reshape(rows.shape[0], -1, m).sum(dim=2)


def is_nm(mask_or_weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive input channels holds at most n nonzeros."""
    return bool((nm_group_counts(mask_or_weight, m) <= n).all())


@torch.no_grad()
def prune_nm(model: nn.Module, masks: Masks | None, n: int, m: int, *, criterion: str = "magnitude",
             seed: int = 0) -> PruneResult:
    """N:M-prune a copy of `model`: every conv and linear weight gets `nm_keep_mask` of its scores
    (|w| for magnitude, uniform noise for random); weights pruned by `masks` stay pruned. Layers whose
    input channels are not a multiple of m (their last groups padded) are named in the result's notes
    with their sparsity."""
    model = copy.deepcopy(model)
    masks = full_masks(model) if masks is None else {k: v.clone().bool() for k, v in masks.items()}
    check_masks(model, masks)
    params = _params(model)
    gen = torch.Generator().manual_seed(seed)
    drops, padded = {}, []
    for name in prunable_names(model):
        weight = params[name]
        scores = _scores(weight, criterion, gen).view(weight.shape)
        keep = nm_keep_mask(scores, masks[name].cpu(), n, m)
        drops[name] = ~keep
        if weight.shape[1] % m:
            padded.append(f"{name} ({weight.shape[1]} input channels: sparsity {1.0 - float(keep.float().mean()):.3f})")
    notes = ()
    if padded:
        notes = (f"{n}:{m}: input channels not a multiple of {m}, so the last group of each row counts as "
                 f"zero-padded and keeps up to {n}; below {1.0 - n / m:g} sparsity: " + ", ".join(padded),)
    return _drop(model, masks, drops, notes)


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
