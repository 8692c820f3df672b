"""Parameter-efficient retraining of a pruned causal language model that keeps its mask (PERP).

PERP (Zimmer, Andoni, Spiegel, Pokutta: "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs", arXiv 2312.15230) finds that after pruning, retraining a tiny share of the parameters
recovers most of what pruning lost. With M the mask (1 = kept), W the pruned weight (W = W ⊙ M),
s = alpha / r, B (out x r) starting at zero and A (r x in) at random, the modes are

    bias_norm       every bias and every normalisation parameter is trained
    bias_norm_head  the same plus the LM head
    lora            W' = W + s B A                                 (the merge fills pruned weights)
    mask_lora       W' = (W + s B A) ⊙ M = W + (s B A) ⊙ M         (W' = 0 wherever M = 0)
    scale_lora      W' = W ⊙ (1 + s B A) = W + W ⊙ (s B A)         (W' = 0 wherever W = 0)
    all             every parameter is trained; pruned weights stay zero

Adapters go on every nn.Linear whose weight has a mask; B = 0 makes the adapted model start exactly
as the pruned model. Everything that the mode does not train is frozen: the LoRA modes train A and B
only (biases and norms stay as they are). Plain LoRA could be done with `peft`; one small module
(`LowRankAdapter`) does all three variants alike, which peft's masked/multiplicative forms are not.

Normalisation parameters are the parameters owned directly (not through a child module) by a
module that is a torch normalisation layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm)
or whose class name contains "Norm" -- transformers' LlamaRMSNorm, T5LayerNorm and the like, whose
only parameter is a 1-D weight. Biases are the parameters named `bias`, in any module.

The LM head is `model.get_output_embeddings()`. When its weight is tied to the input embedding
(OPT, GPT-2, ...), the one shared tensor is trained: the input embedding changes with the head, it
is counted once, and `Prepared.head_tied` says so. (Untying would change the model's structure.)

`merge` folds the adapters back into the plain weights: the model gets its original modules and
state-dict names back. mask_lora and scale_lora keep the mask by construction (a masked-out entry
of W' is 0 + (±0)); `merge` re-multiplies by the mask anyway as a guard against anything that is
not a finite number. Plain lora deliberately is not re-masked: `sparsity_after_merge` measures what
it lost.

Training (`retrain_lm`): AdamW over the trainable parameters, linear warm-up then linear decay to
zero (`linear_warmup_lrs`), causal LM loss with labels = input ids, gradient accumulation, optional
gradient (activation) checkpointing and bf16 autocast (CUDA only). A NaN or infinite loss raises
`workers.train.TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from workers.process import peak_rss_bytes
from workers.pruning import Masks, apply_masks
from workers.train import TrainingDiverged, default_device
from workers.config import PERP_MODES, ADAPTER_MODES, AUTOCAST_MODES, PerpError, _check_adapter_args, PerpConfig  # noqa: F401  (torch-free: the driver and the API use them)


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm,
              nn.modules.instancenorm._InstanceNorm)

__all__ = ["PERP_MODES", "PerpError", "LowRankAdapter", "Prepared", "prepare", "merge", "PerpConfig",
           "PerpResult", "retrain_lm", "linear_warmup_lrs", "causal_lm_loss", "evaluate_lm",
           "sparsity_after_merge", "pruned_nonzero", "is_norm_module", "TrainingDiverged"]


# --------------------------------------------------------------------------------------- adapters

class LowRankAdapter(nn.Module):
    """A frozen nn.Linear `base` (weight W, mask M) with a rank-r update, s = alpha / r:

        lora        y = x W^T + s (x A^T) B^T + b           (W' = W + s B A)
        mask_lora   y = x W^T + x ((s B A) ⊙ M)^T + b       (W' = W + (s B A) ⊙ M)
        scale_lora  y = x W^T + x (W ⊙ (s B A))^T + b       (W' = W ⊙ (1 + s B A))

    Dropout (if any) acts on the adapter path's input only. A is initialised like nn.Linear's
    weight and B at zero, so the update starts at exactly 0. A and B have the base weight's dtype.
    """

    def __init__(self, base: nn.Linear, kind: str, mask: torch.Tensor, *, rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        if kind not in ADAPTER_MODES:
            raise PerpError(f"unknown adapter kind {kind!r}; known: {', '.join(ADAPTER_MODES)}")
        self.base = base
        self.kind = kind
        self.rank = rank
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("mask", mask.to(device=w.device, dtype=torch.bool), persistent=False)

    # Code that reads a linear layer's attributes keeps working while the adapter is in place.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """W' - W: s B A (lora), (s B A) ⊙ M (mask_lora), W ⊙ (s B A) (scale_lora)."""
        low_rank = (self.lora_B @ self.lora_A) * self.scaling
        if self.kind == "mask_lora":
            return low_rank * self.mask
        if self.kind == "scale_lora":
            return self.base.weight * low_rank
        return low_rank

    def merged_weight(self) -> torch.Tensor:
        """W' = W + delta_weight(), the same sum the forward pass computes."""
        return self.base.weight + self.delta_weight()

    def _delta_out(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x)
        if self.kind == "lora":
            return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        if torch.is_grad_enabled() and self.lora_A.requires_grad:
            # the weight-sized update is made again in the backward pass instead of kept for it: training
            # then holds one layer's update at a time, not one per layer (the size of the model)
            return out + checkpoint(self._delta_out, h, use_reentrant=False)
        return out + self._delta_out(h)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, scaling={self.scaling:g}"


# ---------------------------------------------------------------------------------------- prepare

@dataclass
class Prepared:
    """What `prepare` did to a model, for the training loop and for `merge`."""
    mode: str
    masks: Masks
    trainable: dict[str, nn.Parameter]          # names as in the prepared model (adapters included)
    trainable_count: int                         # sum of their sizes (a tied tensor counted once)
    total_count: int                             # parameters of the original model (tied counted once)
    adapters: dict[str, LowRankAdapter] = field(default_factory=dict)   # module name -> adapter
    pinned: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # trained masked weights
    head_tied: bool = False                      # bias_norm_head: the head shares the input embedding
    requires_grad: dict[str, bool] = field(default_factory=dict)       # the original flags
    merged: bool = False

    @property
    def share(self) -> float:
        """trainable_count / total_count."""
        return self.trainable_count / self.total_count if self.total_count else 0.0


def is_norm_module(module: nn.Module) -> bool:
    """A torch normalisation layer, or any module whose class name contains "Norm" (LlamaRMSNorm, ...)."""
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def bias_norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter named `bias` and every parameter owned directly by a normalisation module."""
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        norm = is_norm_module(module)
        for p_name, p in module.named_parameters(recurse=False):
            if (norm or p_name == "bias") and id(p) not in seen:
                seen.add(id(p))
                chosen[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return chosen


def _linear_modules(model: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """weight name -> (module name, module) for every nn.Linear."""
    return {f"{name}.weight" if name else "weight": (name, module)
            for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, nn.Linear)}


def _check_masks(model: nn.Module, masks: Masks, mode: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    linears = _linear_modules(model)
    for name, m in masks.items():
        if name not in params:
            raise PerpError(f"the mask {name!r} names no parameter of the model")
        w = params[name]
        if tuple(m.shape) != tuple(w.shape):
            raise PerpError(f"the mask for {name} has shape {tuple(m.shape)}, the weight {tuple(w.shape)}")
        if mode in ADAPTER_MODES and name not in linears:
            raise PerpError(f"the mask {name!r} is not the weight of an nn.Linear: {mode} puts adapters "
                            "on masked linear layers only")
        outside = int(torch.count_nonzero(w.detach()[~m.to(device=w.device, dtype=torch.bool)]))
        if outside:
            raise PerpError(f"{name} has {outside} nonzero weights where its mask is False: the model is "
                            "not pruned to its masks (apply workers.pruning.apply_masks first)")
    if mode in ADAPTER_MODES and not masks:
        raise PerpError(f"{mode} needs masks: adapters go on the masked linear layers and there are none")


def prepare(model: nn.Module, masks: Masks, mode: str, *, rank: int = 8, alpha: float = 16,
            dropout: float = 0.0) -> Prepared:
    """Freeze `model` in place and make trainable what `mode` retrains (see the module docstring).

    Adapter modes replace every masked nn.Linear by a `LowRankAdapter` around it (undone by
    `merge`). Masked weights that stay trainable as they are (mode `all`, or a masked head in
    `bias_norm_head`) are `pinned`: the training loop zeroes their pruned gradients and re-masks
    them after each step. The share is trainable / total parameters of the original model.
    """
    if mode not in PERP_MODES:
        raise PerpError(f"unknown PERP mode {mode!r}; known: {', '.join(PERP_MODES)}")
    _check_adapter_args(rank, alpha, dropout)
    _check_masks(model, masks, mode)
    masks = {n: m.bool() for n, m in masks.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)

    head_tied = False
    adapters: dict[str, LowRankAdapter] = {}
    if mode in ADAPTER_MODES:
        linears = _linear_modules(model)
        for name in masks:
            mod_name, linear = linears[name]
            adapter = LowRankAdapter(linear, mode, masks[name], rank=rank, alpha=alpha, dropout=dropout)
            _set_submodule(model, mod_name, adapter)
            adapters[mod_name] = adapter
        trainable = {f"{n}.{p}": getattr(a, p) for n, a in adapters.items() for p in ("lora_A", "lora_B")}
    elif mode == "all":
        trainable = dict(model.named_parameters())
    else:
        trainable = bias_norm_parameters(model)
        if mode == "bias_norm_head":
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise PerpError("bias_norm_head needs an LM head: the model has no output embeddings")
            inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            head_tied = inputs is not None and getattr(inputs, "weight", None) is head.weight
            head_names = {id(p): n for n, p in model.named_parameters()}   # a tied head: the embedding's name
            for p in head.parameters():
                trainable.setdefault(head_names[id(p)], p)

    unique = {id(p): p for p in trainable.values()}
    for p in unique.values():
        p.requires_grad_(True)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    pinned = [(by_name[n], m.to(by_name[n].device)) for n, m in masks.items()
              if n in by_name and id(by_name[n]) in unique]
    return Prepared(mode=mode, masks=masks, trainable=trainable,
                    trainable_count=sum(p.numel() for p in unique.values()), total_count=total,
                    adapters=adapters, pinned=pinned, head_tied=head_tied, requires_grad=flags)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _unwrap(model: nn.Module, prepared: Prepared, *, fold: bool) -> None:
    """Put every adapter's base layer back (with W <- W' when `fold`) and restore requires_grad."""
    if prepared.merged:
        raise PerpError("this preparation was already merged (or undone)")
    with torch.no_grad():
        for name, adapter in prepared.adapters.items():
            if fold:
                adapter.base.weight.copy_(adapter.merged_weight())
            _set_submodule(model, name, adapter.base)
    for n, p in model.named_parameters():
        p.requires_grad_(prepared.requires_grad.get(n, True))
    prepared.merged = True


def merge(model: nn.Module, prepared: Prepared, *, remask: bool | None = None) -> nn.Module:
    """Fold the adapters into the plain weights (W <- W + delta) in place and return the model, with
    its original modules, state-dict names and requires_grad flags.

    remask (default: every mode but lora) multiplies the masked weights by their masks afterwards
    (w <- w ⊙ m), a guard only: for mask_lora, scale_lora, bias_norm* and all the mask holds before
    it. Plain lora is left dense where B A filled pruned weights (see `sparsity_after_merge`).
    """
    _unwrap(model, prepared, fold=True)
    if remask if remask is not None else prepared.mode != "lora":
        apply_masks(model, prepared.masks)
    return model


# ------------------------------------------------------------------------------- sparsity figures

def pruned_nonzero(model: nn.Module, masks: Masks) -> int:
    """The number of nonzero weights where the mask is False (0 when the model keeps its masks)."""
    state = model.state_dict()
    return sum(int(torch.count_nonzero(state[n][~m.to(device=state[n].device, dtype=torch.bool)]))
               for n, m in masks.items())


def sparsity_after_merge(model: nn.Module, masks: Masks) -> float:
    """The share of zero entries among the masked weights, measured from the weights themselves.

    The sparsity lost by a merge is sparsity(masks) - sparsity_after_merge(model, masks)."""
    state = model.state_dict()
    total = sum(state[n].numel() for n in masks)
    nonzero = sum(int(torch.count_nonzero(state[n])) for n in masks)
    return 1.0 - nonzero / total if total else 0.0


def _mask_sparsity(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


# -------------------------------------------------------------------------------------- training


@dataclass
class PerpResult:
    model: nn.Module                   # the merged plain model (the one passed in, changed in place)
    state: dict[str, torch.Tensor]     # its state dict (the model's own tensors, not copies)
    mode: str
    history: list[dict[str, float]]    # one row per epoch
    steps: int                         # optimizer steps
    trainable: int
    total: int
    trainable_share: float
    train_seconds: float               # forward, backward and update; validation excluded
    tokens: int                        # input tokens trained on
    tokens_per_second: float
    peak_memory_bytes: int | None
    peak_memory_source: str | None     # "cuda_max_memory_allocated", "process_max_rss" or None
    sparsity: float                    # of the masks
    sparsity_after_merge: float        # measured from the merged weights
    sparsity_lost: float               # sparsity - sparsity_after_merge (> 0 only for lora)
    pruned_nonzero_before_remask: int  # nonzero pruned weights right after folding, before the guard


def linear_warmup_lrs(lr: float, total_steps: int, warmup_steps: int) -> list[float]:
    """Per-step learning rates, t = 0..T-1 (transformers' get_linear_schedule_with_warmup):

        lr_t = lr * t / w                 for t < w
        lr_t = lr * (T - t) / (T - w)     for t >= w        (reaching 0 at t = T)

    With a warm-up the first step has lr 0, as in transformers."""
    if total_steps < 1:
        raise PerpError(f"a schedule needs at least one step, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise PerpError(f"warm-up steps must be in [0, {total_steps}), got {warmup_steps}")
    T, w = total_steps, warmup_steps
    return [lr * t / w if t < w else lr * (T - t) / (T - w) for t in range(T)]


IGNORE = -100                  # cross_entropy's ignore_index: a position without a next token


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy with labels = input ids (B x L):

        loss = -1 / (B (L - 1)) * sum_{b, t < L-1} log p(x_{b,t+1} | x_{b,<=t})

    The targets are shifted rather than the logits (the last position's target is ignored), so the
    (B x L x vocab) logits are never copied: at a vocabulary of 50k that copy is the size of the model's
    activations."""
    vocab = logits.shape[-1]
    target = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.reshape(-1, vocab).float(), target.reshape(-1), ignore_index=IGNORE)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x, use_cache=False) if hasattr(model, "config") else model(x)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_block(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise PerpError(f"a batch must be a (batch x seq_len) tensor of token ids with seq_len >= 2, got {shape}")


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off":
        return None
    cuda = device.type == "cuda"
    if setting == "bf16":
        if not cuda:
            raise PerpError(f"bf16 autocast runs on CUDA only, the device is {device}")
        return torch.bfloat16
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None


def _autocast(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: Iterable[torch.Tensor], *, device: torch.device | None = None,
                autocast: str = "auto") -> dict[str, float]:
    """Token-weighted mean causal LM loss over `blocks` (model in eval mode) and perplexity = exp(loss)."""
    device = device or next(model.parameters()).device
    dtype = _autocast_dtype(autocast, device)
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for x in blocks:
        _check_block(x)
        x = x.to(device)
        with _autocast(dtype, device):
            logits = _logits(model, x)
        k = x.shape[0] * (x.shape[1] - 1)
        loss_sum += float(causal_lm_loss(logits, x)) * k
        n += k
    model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    loss = loss_sum / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": n}


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' activation checkpointing (the new name of gradient_checkpointing_enable), non-reentrant."""
    if on:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise PerpError(f"{type(model).__name__} does not support gradient checkpointing")
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()


def _is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _peak_memory(device: torch.device) -> tuple[int | None, str | None]:
    """CUDA: max_memory_allocated since the run began. CPU: the process's peak RSS over its whole life
    (workers.process.peak_rss_bytes: it includes whatever ran before this run), None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = peak_rss_bytes()
    return (rss, "process_max_rss") if rss is not None else (None, None)


def retrain_lm(model: nn.Module, batches: Iterable[torch.Tensor], cfg: PerpConfig, masks: Masks, *,
               device: torch.device | None = None,
               on_step: Callable[[dict[str, float]], None] | None = None,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               val_blocks: Iterable[torch.Tensor] | None = None) -> PerpResult:
    """Retrain the pruned causal LM `model` (in place) the PERP way and return it merged.

    `batches` is a sized, re-iterable collection (a list, a DataLoader) of (batch x seq_len) token
    ids, iterated once per epoch. Each optimizer step takes k = grad_accumulation micro-batches
    (fewer at an epoch's end) and weighs micro-batch i's mean loss by its share of the step's
    predicted tokens n_i / sum_j n_j (n_i = batch_i (seq_len_i - 1)), so that k micro-batches give
    exactly the gradient of one big batch. T = epochs * ceil(len(batches) / k) steps follow
    `linear_warmup_lrs` with w = min(round(warmup_fraction * T), T - 1); gradients are clipped to
    `max_grad_norm`. `on_step` gets (epoch, step, lr, loss, grad_norm (before clipping), tokens)
    after every step, `on_epoch` each epoch's row (epoch, step, lr, train_loss, tokens, and
    val_loss / val_perplexity with `val_blocks`). A NaN/infinite loss or gradient norm raises
    TrainingDiverged; on any error the adapters are dropped (not merged) and the model gets its
    modules back (the bias_norm* and all modes may have changed weights by then).
    """
    if not hasattr(batches, "__len__"):
        raise PerpError("batches must be a sized, re-iterable collection (a list or a DataLoader), "
                        f"got {type(batches).__name__}")
    n_batches = len(batches)
    if n_batches == 0:
        raise PerpError("there are no batches to train on")
    device = torch.device(device) if device is not None else default_device()
    dtype = _autocast_dtype(cfg.autocast, device)
    k = cfg.grad_accumulation
    steps_per_epoch = math.ceil(n_batches / k)
    total_steps = cfg.epochs * steps_per_epoch
    lrs = linear_warmup_lrs(cfg.lr, total_steps, min(round(cfg.warmup_fraction * total_steps), total_steps - 1))

    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    prepared = prepare(model, masks, cfg.mode, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
    params = list({id(p): p for p in prepared.trainable.values()}.values())
    opt = torch.optim.AdamW(params, lr=lrs[0], weight_decay=cfg.weight_decay)
    wanted = (cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None
              else device.type == "cpu" and getattr(model, "supports_gradient_checkpointing", False))
    checkpointing = wanted and not _is_checkpointing(model)   # leave it as we found it
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf

    history: list[dict[str, float]] = []
    step, tokens, train_seconds = 0, 0, 0.0

    def optimizer_step(group: list[torch.Tensor], epoch: int) -> tuple[float, int, int]:
        """One update from `group`; returns (token-weighted loss sum, predicted tokens, input tokens)."""
        nonlocal step
        lr = lrs[step]
        counts = [x.shape[0] * (x.shape[1] - 1) for x in group]
        predicted = sum(counts)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for x, n in zip(group, counts):
            x = x.to(device, non_blocking=True)
            with _autocast(dtype, device):
                logits = _logits(model, x)
            loss = causal_lm_loss(logits, x)
            if not math.isfinite(value := loss.item()):
                raise TrainingDiverged(f"the training loss became {value} at epoch {epoch}, step {step + 1} "
                                       f"with learning rate {lr:.4g} (peak {cfg.lr:.4g}): lower the learning rate")
            (loss * (n / predicted)).backward()
            loss_sum += value * n
        with torch.no_grad():
            for w, m in prepared.pinned:
                if w.grad is not None:
                    w.grad.mul_(m)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"the gradient norm became {grad_norm} at epoch {epoch}, step {step + 1} "
                                       f"with learning rate {lr:.4g}: lower the learning rate")
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            for w, m in prepared.pinned:
                w.mul_(m)
        step += 1
        group_tokens = sum(x.numel() for x in group)
        if on_step is not None:
            on_step({"epoch": epoch, "step": step, "lr": lr, "loss": loss_sum / predicted,
                     "grad_norm": grad_norm, "tokens": group_tokens})
        return loss_sum, predicted, group_tokens

    try:
        if checkpointing:
            _set_checkpointing(model, True)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            start = time.perf_counter()
            sums = [0.0, 0, 0]                  # loss sum, predicted tokens, input tokens
            group: list[torch.Tensor] = []
            for i, x in enumerate(batches, 1):
                if i > n_batches:
                    raise PerpError(f"batches yielded more than its len() = {n_batches} items in one epoch")
                _check_block(x)
                group.append(x)
                if len(group) == k or i == n_batches:
                    sums = [a + b for a, b in zip(sums, optimizer_step(group, epoch))]
                    group = []
            if group:
                sums = [a + b for a, b in zip(sums, optimizer_step(group, epoch))]
            loss_sum, predicted, epoch_tokens = sums
            train_seconds += time.perf_counter() - start
            tokens += epoch_tokens
            row = {"epoch": epoch, "step": step, "lr": lrs[step - 1],
                   "train_loss": loss_sum / max(predicted, 1), "tokens": epoch_tokens}
            if val_blocks is not None:
                val = evaluate_lm(model, val_blocks, device=device, autocast=cfg.autocast)
                row.update(val_loss=val["loss"], val_perplexity=val["perplexity"])
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    except BaseException:
        if not prepared.merged:
            _unwrap(model, prepared, fold=False)
        raise
    finally:
        if checkpointing:
            _set_checkpointing(model, False)

    merge(model, prepared, remask=False)
    before_remask = pruned_nonzero(model, prepared.masks)
    if cfg.mode != "lora":
        apply_masks(model, prepared.masks)
    peak, source = _peak_memory(device)
    mask_sparsity = _mask_sparsity(prepared.masks)
    after = sparsity_after_merge(model, prepared.masks)
    return PerpResult(model=model, state=model.state_dict(), mode=cfg.mode, history=history, steps=step,
                      trainable=prepared.trainable_count, total=prepared.total_count,
                      trainable_share=prepared.share, train_seconds=train_seconds, tokens=tokens,
                      tokens_per_second=tokens / train_seconds if train_seconds > 0 else 0.0,
                      peak_memory_bytes=peak, peak_memory_source=source, sparsity=mask_sparsity,
                      sparsity_after_merge=after, sparsity_lost=mask_sparsity - after,
                      pruned_nonzero_before_remask=before_remask)
