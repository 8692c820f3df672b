"""One-shot, calibrated pruning of Hugging Face causal language models: magnitude, Wanda, SparseGPT.

Pruned are the weights of the ``nn.Linear`` layers inside the transformer blocks (attention and MLP
projections); embeddings, norms, biases and ``lm_head`` are never pruned. Masks follow
`workers.pruning`: ``{parameter name: bool tensor}``, True = kept. A weight already pruned (mask
False) keeps its score at -inf, so it stays pruned; a sparsity is always the cumulative target.

Criteria, for a layer y = W x with W of shape (out, in), on calibration tokens X (in x N):

magnitude   S_ij = |W_ij|, the lowest round(S * out * in) of the layer are pruned.
Wanda       S_ij = |W_ij| * ||X_j||_2 (Sun et al. 2023), compared within each output row: every row
            loses exactly round(S * in) weights.
SparseGPT   (Frantar & Alistarh 2023) H = 2 X X^T / N + lambda I, lambda = percdamp * mean(diag H).
            U = upper Cholesky factor of H^-1. Columns are visited left to right in blocks of B; a
            weight's saliency is w_ij^2 / U_jj^2 (U_jj^2 = [H_F^-1]_jj over the not yet visited
            columns F); at column j the pruned weights are set to 0 and the error
            e_i = (w_ij - q_ij) / U_jj is propagated to the later columns, w_ik -= e_i U_jk, so the
            layer output on X changes least. Unstructured masks are chosen once per block of B columns
            over the whole block (as in the paper), each block pruning round(S * out * c) - (pruned so
            far) weights where c is the number of columns visited after it: the layer ends exactly at
            round(S * out * in) pruned weights unless earlier masks already removed more.
            Inputs that are zero on every calibration token (diag H = 0) get H_jj = 1 and saliency 0:
            their weights are pruned first and, as their column of H^-1 is e_j, never disturb others.
N:M         In every group of M consecutive inputs of a row the N highest-scored weights are kept
            (1 - N/M of the weights pruned, at most N nonzeros per group); SparseGPT chooses each
            group's mask when it reaches the group's first column.

`prune_causal_lm` works block by block (Wanda / SparseGPT's sequential recipe): the inputs of the first
block (hidden states and the keyword arguments the model passes to a decoder layer: attention mask,
position ids, position embeddings, ...) are captured by a forward pre-hook that stops the forward
pass; then, for every block, the calibration samples run through it once with hooks on its linear
layers that gather the statistics (sum of x_j^2 per input for Wanda, X X^T for SparseGPT), its layers
are pruned, and the samples run through the *pruned* block again to give the next block its inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.config import LM_CRITERIA
from workers.pruning import Masks, PruningError, check_masks, parse_pattern, sparsity as mask_sparsity

CRITERIA = LM_CRITERIA                 # declared in workers.config (TASK_OPTIONS)


# ---------------------------------------------------------------- patterns and masks

def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity must be in [0, 1), got {sparsity}")


def _alive(scores: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2:
        raise PruningError(f"scores must be a matrix (out_features x in_features), got shape {tuple(scores.shape)}")
    if alive is None:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if alive.shape != scores.shape:
        raise PruningError(f"alive mask has shape {tuple(alive.shape)}, scores have {tuple(scores.shape)}")
    return alive.to(device=scores.device, dtype=torch.bool)


def _keep_top(scores: torch.Tensor, alive: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep mask of a 2-D score matrix: each row prunes its max(n_prune, #dead) lowest entries, dead
    entries (alive False) scoring -inf; ties go to the earlier column (stable sort)."""
    masked = torch.where(alive, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    order = torch.argsort(masked, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    per_row = (~alive).sum(dim=1).clamp(min=n_prune)
    return ranks >= per_row[:, None]


def row_mask(scores: torch.Tensor, alive: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """Per output row, prune the k = round(sparsity * in_features) lowest scores (Wanda's comparison
    group); a row whose dead weights already exceed k prunes just those."""
    _check_sparsity(sparsity)
    alive = _alive(scores, alive)
    return _keep_top(scores, alive, round(sparsity * scores.shape[1]))


def layer_mask(scores: torch.Tensor, alive: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """Over the whole matrix, prune the k = round(sparsity * out * in) lowest scores (or just the dead
    weights if they are more)."""
    _check_sparsity(sparsity)
    alive = _alive(scores, alive)
    keep = _keep_top(scores.reshape(1, -1), alive.reshape(1, -1), round(sparsity * scores.numel()))
    return keep.view(scores.shape)


def nm_mask(scores: torch.Tensor, alive: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """N:M: in each group of m consecutive inputs of a row keep the n highest-scored alive weights
    (at most n nonzeros per group, exactly n when none of the group was dead)."""
    if not 0 < n < m:
        raise PruningError(f"N:M needs 0 < N < M, got {n}:{m}")
    alive = _alive(scores, alive)
    rows, cols = scores.shape
    if cols % m:
        raise PruningError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}")
    keep = _keep_top(scores.reshape(-1, m), alive.reshape(-1, m), m - n)
    return keep.view(rows, cols)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2 with input_sq_norm[j] = sum over calibration tokens of x_j^2."""
    if weight.dim() != 2 or input_sq_norm.shape != (weight.shape[1],):
        raise PruningError(f"wanda needs a weight matrix and one input norm per column; got weight "
                           f"{tuple(weight.shape)} and norms {tuple(input_sq_norm.shape)}")
    return weight.detach().float().abs() * input_sq_norm.float().clamp(min=0).sqrt()[None, :]


# ---------------------------------------------------------------- SparseGPT

def _upper_cholesky_of_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """U with U^T U = H^-1 (upper Cholesky factor of the inverse): float32, float64 if float32 fails."""
    for dtype in (torch.float32, torch.float64):
        h = hessian.to(dtype)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u.float()
    raise PruningError("SparseGPT: the damped Hessian is not positive definite; raise percdamp")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, *, alive: torch.Tensor | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer (module docstring): returns (pruned and updated weight in the weight's
    dtype, keep mask). `hessian` is H = 2 X X^T / N (in x in, undamped); weights with `alive` False end
    at 0. With `nm` = (N, M) the pattern fixes the sparsity at 1 - N/M and `sparsity` is ignored."""
    if weight.dim() != 2:
        raise PruningError(f"SparseGPT needs a weight matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise PruningError(f"Hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if blocksize < 1 or percdamp < 0:
        raise PruningError(f"blocksize must be >= 1 and percdamp >= 0, got {blocksize} and {percdamp}")
    _check_sparsity(sparsity)
    alive = _alive(weight, alive)
    if nm is not None:
        n, m = nm
        if not 0 < n < m or cols % m or blocksize % m:
            raise PruningError(f"N:M {n}:{m} needs 0 < N < M and in_features ({cols}) and blocksize "
                               f"({blocksize}) divisible by {m}")

    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead_input = torch.diag(H) == 0
    H[dead_input, dead_input] = 1.0
    H.diagonal().add_(percdamp * float(torch.diag(H).mean()))
    U = _upper_cholesky_of_inverse(H)
    keep = torch.zeros_like(alive)

    def saliency(w: torch.Tensor, d: torch.Tensor, dead_in: torch.Tensor) -> torch.Tensor:
        s = w.pow(2) / d.pow(2)[None, :]
        return s.masked_fill(dead_in[None, :], 0.0)

    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, alive1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], alive[:, i1:i2]
        d1, dead1 = torch.diag(U1), dead_input[i1:i2]
        err1 = torch.zeros_like(W1)
        if nm is None:
            want = round(sparsity * rows * i2) - pruned_so_far
            forced = int((~alive1).sum())
            n_prune = min(max(want, forced), alive1.numel())
            keep1 = _keep_top(saliency(W1, d1, dead1).reshape(1, -1), alive1.reshape(1, -1), n_prune)
            keep1 = keep1.view_as(W1)
        else:
            keep1 = torch.zeros_like(alive1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                keep1[:, g] = nm_mask(saliency(W1[:, g], d1[g], dead1[g]), alive1[:, g], *nm)
            w = W1[:, i]
            q = w * keep1[:, i]
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = keep1
        pruned_so_far += int((~keep1).sum())
    W[~keep] = 0.0
    return W.to(weight.dtype), keep


# ---------------------------------------------------------------- causal LMs

@dataclass(frozen=True)
class LLMPruneResult:
    masks: Masks                        # every pruned weight (prunable_lm_names), on the CPU
    sparsity: float                     # share of pruned weights over all of them
    per_layer: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the outermost nn.ModuleList of length config.num_hidden_layers."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not n_layers:
        raise PruningError("the model has no config.num_hidden_layers: not a Hugging Face transformer")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise PruningError(f"no nn.ModuleList of {n_layers} transformer blocks found in {type(model).__name__}")


def _block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_lm_names(model: nn.Module) -> list[str]:
    """State-dict names of the weights `prune_causal_lm` prunes: every nn.Linear inside the blocks."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{name}.weight" for i, block in enumerate(blocks) for name in _block_linears(block)]


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _move_outside_blocks(module: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every submodule except the blocks (embeddings, rotary embedding, norms, head) to `device`."""
    for child in module.children():
        if child is blocks:
            continue
        if any(sub is blocks for sub in child.modules()):
            _move_outside_blocks(child, blocks, device)
        else:
            child.to(device)


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor,
                          device: torch.device) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Run each calibration sample (batch of one) until block 0 and record (hidden states, other
    positional args, keyword args) as the model passes them to it."""
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(_module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append((hidden, rest, dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in calibration:
            try:
                model(input_ids=sample[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calibration):
        raise PruningError("the model did not call its first transformer block for every calibration sample")
    return captured


def _run_block(block: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def calibration_inputs(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, device: torch.device,
                       home: torch.device) -> list:
    """The first block's inputs for every calibration sample (`_capture_block_inputs`), computed on `device`
    with what lies outside the blocks moved there for it and back to `home` afterwards."""
    if device != home:
        _move_outside_blocks(model, blocks, device)
    try:
        return _capture_block_inputs(model, blocks, calibration, device)
    finally:
        if device != home:
            _move_outside_blocks(model, blocks, home)


def block_input_stats(block: nn.Module, linears: dict[str, nn.Linear], inputs: list, criterion: str,
                      device: torch.device) -> dict[str, _InputStats]:
    """Each linear layer's input statistics for `criterion` (`_InputStats`) over the calibration `inputs`
    run once through `block`."""
    stats = {n: _InputStats(lin.in_features, criterion, device) for n, lin in linears.items()}
    handles = [lin.register_forward_hook(stats[n]) for n, lin in linears.items()]
    try:
        for hidden, rest, kwargs in inputs:
            _run_block(block, hidden, rest, kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


class _InputStats:
    """Accumulates, from a linear layer's inputs x (one row per token), sum_t x_tj^2 (wanda) or
    sum_t x_t x_t^T (sparsegpt) and the number of tokens."""

    def __init__(self, in_features: int, criterion: str, device: torch.device):
        self.criterion, self.tokens = criterion, 0
        shape = (in_features,) if criterion == "wanda" else (in_features, in_features)
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)

    def __call__(self, module: nn.Module, inputs: tuple, _output) -> None:
        x = inputs[0].detach().reshape(-1, module.in_features).float()
        self.tokens += x.shape[0]
        if self.criterion == "wanda":
            self.total += x.pow(2).sum(dim=0)
        else:
            self.total.addmm_(x.T, x)

    def hessian(self) -> torch.Tensor:
        """H = 2 X X^T / N."""
        return self.total * (2.0 / max(self.tokens, 1))


def _prune_weight(weight: torch.Tensor, alive: torch.Tensor, criterion: str, sparsity: float,
                  nm: tuple[int, int] | None, stats: _InputStats | None,
                  blocksize: int, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of one linear layer."""
    if criterion == "sparsegpt":
        return sparsegpt_prune(weight, stats.hessian(), sparsity, nm, alive=alive,
                               blocksize=blocksize, percdamp=percdamp)
    if criterion == "wanda":
        scores = wanda_scores(weight, stats.total)
        keep = nm_mask(scores, alive, *nm) if nm else row_mask(scores, alive, sparsity)
    else:
        scores = weight.detach().float().abs()
        keep = nm_mask(scores, alive, *nm) if nm else layer_mask(scores, alive, sparsity)
    return weight * keep.to(weight.dtype), keep


@torch.no_grad()
def prune_causal_lm(model: nn.Module, calibration: torch.Tensor | None, sparsity: float, *,
                    criterion: str = "wanda", pattern: str = "unstructured", masks: Masks | None = None,
                    device: torch.device | str | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> LLMPruneResult:
    """Prune the blocks' linear layers of a causal LM in place to `sparsity` (module docstring).

    calibration: (n_samples x seq_len) input ids, one forward per sample (magnitude needs none).
    masks: an earlier phase's masks; applied first, their pruned weights stay pruned and `sparsity` is
    the new cumulative target. For an N:M pattern `sparsity` must be 1 - N/M.
    device: where each block is computed (one block at a time is moved there and back); default: the
    model's device.
    """
    if criterion not in CRITERIA:
        raise PruningError(f"unknown LLM pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    _check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    if nm is not None and not math.isclose(sparsity, 1.0 - nm[0] / nm[1], abs_tol=1e-6):
        raise PruningError(f"pattern {pattern} prunes {1.0 - nm[0] / nm[1]:g} of the weights; "
                           f"sparsity {sparsity:g} does not match it")
    calibrated = criterion != "magnitude"
    if calibrated:
        if calibration is None or calibration.dim() != 2 or calibration.shape[0] < 1 \
                or calibration.is_floating_point():
            raise PruningError(f"{criterion} needs calibration input ids of shape (n_samples, seq_len)")
    start = time.perf_counter()
    prefix, blocks = find_blocks(model)
    names = prunable_lm_names(model)
    params = dict(model.named_parameters())
    if masks is not None:
        check_masks(model, masks, names)
        for n in names:
            params[n].mul_(masks[n].to(device=params[n].device, dtype=params[n].dtype))
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    new_masks: Masks = {}
    try:
        inputs = calibration_inputs(model, blocks, calibration, device, home) if calibrated else []
        for i, block in enumerate(blocks):
            block.to(device)
            linears = _block_linears(block)
            stats = block_input_stats(block, linears, inputs, criterion, device) if calibrated else {}
            for n, lin in linears.items():
                full = f"{prefix}.{i}.{n}.weight"
                alive = masks[full].to(device=device, dtype=torch.bool) if masks is not None else None
                alive = _alive(lin.weight, alive)
                new_weight, keep = _prune_weight(lin.weight, alive, criterion, sparsity, nm, stats.get(n),
                                                 blocksize, percdamp)
                lin.weight.copy_(new_weight)
                new_masks[full] = keep.cpu()
            del stats
            if calibrated:
                inputs = [(_run_block(block, hidden, rest, kwargs), rest, kwargs) for hidden, rest, kwargs in inputs]
            block.to(home)
    finally:
        model.train(was_training)
    total, per_layer = mask_sparsity(new_masks)
    return LLMPruneResult(masks=new_masks, sparsity=total, per_layer=per_layer,
                          seconds=time.perf_counter() - start)
