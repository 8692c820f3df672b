"""Structured pruning of Hugging Face causal LMs: whole MLP neurons and whole attention KV groups.

Groups, per decoder layer of a LLaMA-style model (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``model.layers[i].mlp.{gate,up,down}_proj``; model types in SUPPORTED), with hidden size d, head_dim
h_d, KV heads G and r = num_attention_heads / G query heads per KV head:

MLP neuron j     row j of gate_proj and up_proj, column j of down_proj (3 d entries);
KV group g       rows [g h_d, (g+1) h_d) of k_proj and v_proj, rows [g r h_d, (g+1) r h_d) of q_proj
                 (the r query heads that read KV head g: transformers' repeat_kv gives query head i
                 the KV head i // r) and the same columns of o_proj (2 h_d d + 2 r h_d d entries).
                 Removing whole KV groups keeps GQA consistent and head_dim unchanged.

Every weight entry belongs to exactly one group. During retraining a structured mask is an ordinary
mask (`workers.pruning`, True = kept, over `workers.lm.prune.prunable_lm_names`) whose zeros cover
whole groups; `shrink_lm` removes them physically into a smaller dense model of the same class.
Biases (attention_bias / mlp_bias) are not masked: a removed group's bias only feeds the removed
o_proj / down_proj columns, so the masked and the shrunk model compute the same function.

Scores of a group (the lowest-scored groups of a layer go):

magnitude   s = sqrt(sum over the group's entries of W_ij^2)
wanda       s = sum over the group's entries of |W_ij| * ||X_j||_2, X_j the calibration inputs (all
            tokens) of the layer the entry belongs to: for neuron j,
            sum_i |gate_ji| ||x_i|| + sum_i |up_ji| ||x_i|| + sum_r |down_rj| ||h_j||, h = down_proj's input.
            Inputs are captured block by block as `workers.lm.prune` does (each block sees the
            outputs of the already pruned blocks before it).

Budget: a Hugging Face config holds one intermediate_size and one head count for every layer, so
every layer loses the same number of groups. For a cumulative target share s:
    neurons removed per layer   k_n = round(s * intermediate_size), at most intermediate_size - 1;
    KV groups removed per layer k_g = floor(s * num_key_value_heads), at most num_key_value_heads - 1,
                                lowered further while the shrunk config would not validate (LLaMA's
                                config wants hidden_size divisible by num_attention_heads).
Groups already removed stay removed (and if a layer already lost more, every layer is brought to that
count). Embeddings, norms, lm_head and the residual width hidden_size never change: they are tied
through the residual stream.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.config import TASK_OPTIONS, PruningError
from workers.lm.prune import (_InputStats, _run_block, block_input_stats, calibration_inputs, find_blocks,
                              prunable_lm_names, wanda_scores)
from workers.pruning import Masks, PruneResult, check_masks, weight_and_bias_norm_sq

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")       # config.model_type values with the layout above
STRUCTURED_CRITERIA = TASK_OPTIONS["causal_lm"].channel_criteria    # declared by the task, once
ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

Removed = dict     # {"layers": [{"neurons": [int, ...], "kv_groups": [int, ...]}, ...]}, JSON-able


@dataclass(frozen=True)
class LayerGroups:
    """The groups of one decoder layer and the state-dict names of the weights they cut."""
    neurons: int                # intermediate_size
    kv_groups: int              # num_key_value_heads
    heads_per_group: int        # num_attention_heads / num_key_value_heads
    head_dim: int
    weights: dict[str, str]     # role (q, k, v, o, gate, up, down) -> state-dict weight name
    biases: dict[str, str]      # role -> state-dict bias name, for the layers that have one


@dataclass(frozen=True)
class LMGroups:
    model_type: str
    hidden_size: int
    layers: tuple[LayerGroups, ...]
    names: tuple[str, ...]      # prunable_lm_names(model): exactly what the masks cover


# ---------------------------------------------------------------- groups

def lm_groups(model: nn.Module) -> LMGroups:
    """The structured groups of a LLaMA-style causal LM (module docstring); PruningError naming the
    architecture when it is not one of SUPPORTED or its layers do not have the expected shapes."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise PruningError(f"structured LM pruning supports the LLaMA-style model types {', '.join(SUPPORTED)}; "
                           f"{type(model).__name__} (model_type {model_type!r}) is not supported")
    prefix, blocks = find_blocks(model)
    d = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    if n_heads % n_kv:
        raise PruningError(f"{model_type}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")
    params = dict(model.named_parameters())
    layers = []
    for i, block in enumerate(blocks):
        paths = {r: f"self_attn.{r}_proj" for r in ATTN} | {r: f"mlp.{r}_proj" for r in MLP}
        weights, biases = {}, {}
        for role, path in paths.items():
            module = block.get_submodule(path) if _has(block, path) else None
            if not isinstance(module, nn.Linear):
                raise PruningError(f"{model_type} layer {i} has no nn.Linear {path}: not the LLaMA layout structured "
                                   f"pruning expects")
            weights[role] = f"{prefix}.{i}.{path}.weight"
            if module.bias is not None:
                biases[role] = f"{prefix}.{i}.{path}.bias"
        inter = params[weights["gate"]].shape[0]
        want = {"q": (n_heads * head_dim, d), "k": (n_kv * head_dim, d), "v": (n_kv * head_dim, d),
                "o": (d, n_heads * head_dim), "gate": (inter, d), "up": (inter, d), "down": (d, inter)}
        for role, shape in want.items():
            if tuple(params[weights[role]].shape) != shape:
                raise PruningError(f"{weights[role]} has shape {tuple(params[weights[role]].shape)}, expected {shape} "
                                   f"from the config ({model_type})")
        layers.append(LayerGroups(neurons=inter, kv_groups=n_kv, heads_per_group=n_heads // n_kv, head_dim=head_dim,
                                  weights=weights, biases=biases))
    return LMGroups(model_type=model_type, hidden_size=d, layers=tuple(layers), names=tuple(prunable_lm_names(model)))


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def group_sums(per_entry: dict[str, torch.Tensor], layer: LayerGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """(per neuron, per KV group) sums of a per-entry quantity given for each role's weight matrix:
    neuron j: sum gate[j, :] + sum up[j, :] + sum down[:, j]; KV group g: the sums over its q, k, v
    rows and o columns."""
    g = layer.kv_groups
    t = {r: per_entry[r].float() for r in ATTN + MLP}
    neurons = t["gate"].sum(1) + t["up"].sum(1) + t["down"].sum(0)
    kv = (t["q"].reshape(g, -1).sum(1) + t["k"].reshape(g, -1).sum(1) + t["v"].reshape(g, -1).sum(1)
          + t["o"].reshape(t["o"].shape[0], g, -1).sum((0, 2)))
    return neurons, kv


def group_sizes(layer: LayerGroups, hidden_size: int) -> tuple[int, int]:
    """Weight entries of one neuron (3 d) and of one KV group (2 h_d d + 2 r h_d d)."""
    hd, r, d = layer.head_dim, layer.heads_per_group, hidden_size
    return 3 * d, 2 * hd * d + 2 * r * hd * d


# ---------------------------------------------------------------- removed groups <-> masks

def no_removed(groups: LMGroups) -> Removed:
    return {"layers": [{"neurons": [], "kv_groups": []} for _ in groups.layers]}


def check_removed(removed: Removed, groups: LMGroups) -> Removed:
    """`removed` normalised (sorted int lists); PruningError when it does not fit the model: one entry per
    layer, indices in range and unique, at least one neuron and one KV group kept per layer."""
    layers = removed.get("layers") if isinstance(removed, dict) else None
    if not isinstance(layers, list) or len(layers) != len(groups.layers):
        raise PruningError(f"removed groups must be {{'layers': [...]}} with one entry per layer "
                           f"({len(groups.layers)})")
    out = []
    for i, (entry, layer) in enumerate(zip(layers, groups.layers)):
        clean = {}
        for key, size in (("neurons", layer.neurons), ("kv_groups", layer.kv_groups)):
            idx = entry.get(key, []) if isinstance(entry, dict) else None
            if not isinstance(idx, (list, tuple)) or not all(isinstance(j, int) and not isinstance(j, bool)
                                                             for j in idx):
                raise PruningError(f"layer {i}: removed {key} must be a list of integers, got {idx!r}")
            if any(not 0 <= j < size for j in idx) or len(set(idx)) != len(idx):
                raise PruningError(f"layer {i}: removed {key} {list(idx)} must be distinct indices in [0, {size})")
            if len(idx) >= size:
                raise PruningError(f"layer {i}: removing all {size} {key} leaves nothing; keep at least one")
            clean[key] = sorted(idx)
        out.append(clean)
    return {"layers": out}


def lm_group_masks(model: nn.Module, removed: Removed) -> Masks:
    """Masks over prunable_lm_names(model) (True = kept, on the CPU) that are False exactly on the weight
    entries of the removed groups."""
    groups = lm_groups(model)
    removed = check_removed(removed, groups)
    params = dict(model.named_parameters())
    masks = {n: torch.ones(params[n].shape, dtype=torch.bool) for n in groups.names}
    for layer, entry in zip(groups.layers, removed["layers"]):
        _cut(masks, layer, entry["neurons"], entry["kv_groups"])
    return masks


def _cut(masks: Masks, layer: LayerGroups, neurons: list[int], kv_groups: list[int]) -> None:
    """Set the entries of the given groups of one layer to False, in place."""
    w, hd, r = layer.weights, layer.head_dim, layer.heads_per_group
    idx = torch.as_tensor(neurons, dtype=torch.long)
    masks[w["gate"]][idx, :] = False
    masks[w["up"]][idx, :] = False
    masks[w["down"]][:, idx] = False
    for g in kv_groups:
        kv, q = slice(g * hd, (g + 1) * hd), slice(g * r * hd, (g + 1) * r * hd)
        masks[w["k"]][kv, :] = False
        masks[w["v"]][kv, :] = False
        masks[w["q"]][q, :] = False
        masks[w["o"]][:, q] = False


def _dead_counts(masks: Masks, layer: LayerGroups) -> tuple[torch.Tensor, torch.Tensor]:
    return group_sums({r: ~masks[layer.weights[r]].bool().cpu() for r in ATTN + MLP}, layer)


def lm_removed(masks: Masks, groups: LMGroups) -> Removed:
    """The groups the masks remove: those all of whose entries are False (a partly False group is not
    removed; `check_whole_lm_groups` refuses such masks)."""
    layers = []
    for layer in groups.layers:
        dead_n, dead_g = _dead_counts(masks, layer)
        size_n, size_g = group_sizes(layer, groups.hidden_size)
        layers.append({"neurons": [int(j) for j in torch.nonzero(dead_n == size_n).flatten()],
                       "kv_groups": [int(g) for g in torch.nonzero(dead_g == size_g).flatten()]})
    return {"layers": layers}


def check_whole_lm_groups(masks: Masks, groups: LMGroups) -> None:
    """PruningError when the masks do not cover exactly groups.names or some group is only partly False
    (a structured mask's zeros must be whole groups)."""
    if set(masks) != set(groups.names):
        missing, extra = sorted(set(groups.names) - set(masks)), sorted(set(masks) - set(groups.names))
        raise PruningError(f"masks do not match the model's prunable weights (missing {missing}, extra {extra})")
    for i, layer in enumerate(groups.layers):
        dead_n, dead_g = _dead_counts(masks, layer)
        size_n, size_g = group_sizes(layer, groups.hidden_size)
        for what, dead, size in (("MLP neurons", dead_n, size_n), ("KV groups", dead_g, size_g)):
            partial = torch.nonzero((dead > 0) & (dead < size)).flatten().tolist()
            if partial:
                raise PruningError(f"layer {i}: {what} {partial[:8]}{'...' if len(partial) > 8 else ''} are only "
                                   f"partly pruned; a structured mask removes whole groups")


# ---------------------------------------------------------------- budget

def _shrunk_config(config, groups: LMGroups, neurons_removed: int, kv_removed: int):
    """A new config of the same class for a model that lost `neurons_removed` neurons and `kv_removed` KV
    groups per layer; head_dim written explicitly. PruningError when the config class refuses it."""
    layer = groups.layers[0]
    values = config.to_dict()
    values.update(intermediate_size=layer.neurons - neurons_removed,
                  num_key_value_heads=layer.kv_groups - kv_removed,
                  num_attention_heads=(layer.kv_groups - kv_removed) * layer.heads_per_group,
                  head_dim=layer.head_dim)
    try:
        new = type(config).from_dict(values)
    except Exception as e:      # transformers' strict config validation raises several types
        raise PruningError(f"{groups.model_type}: a config with {values['num_attention_heads']} attention heads and "
                           f"intermediate_size {values['intermediate_size']} is refused: {e}") from e
    new.head_dim = layer.head_dim
    return new


def kv_budget(config, groups: LMGroups, target: float) -> int:
    """KV groups removed per layer: floor(target * G), at most G - 1, lowered while the shrunk config
    does not validate."""
    n_kv = groups.layers[0].kv_groups
    k = min(math.floor(target * n_kv + 1e-9), n_kv - 1)
    while k > 0:
        try:
            _shrunk_config(config, groups, 0, k)
            return k
        except PruningError:
            k -= 1
    return 0


def neuron_budget(groups: LMGroups, target: float) -> int:
    """MLP neurons removed per layer: round(target * intermediate_size), at most intermediate_size - 1."""
    n = groups.layers[0].neurons
    return min(round(target * n), n - 1)


def _lowest(scores: torch.Tensor, dead: torch.Tensor, k: int) -> list[int]:
    """The k lowest-scored indices, the dead ones (already removed) first; ties to the lower index."""
    s = torch.where(dead, torch.full_like(scores, -math.inf), scores.float())
    order = torch.argsort(s, stable=True)
    return sorted(int(j) for j in order[:k])


# ---------------------------------------------------------------- pruning

def _group_scores(linears: dict[str, nn.Linear], layer: LayerGroups, criterion: str,
                  stats: dict[str, _InputStats] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(neuron scores, KV group scores) of one layer (module docstring)."""
    if criterion == "magnitude":
        sq = {r: linears[r].weight.detach().float().pow(2) for r in ATTN + MLP}
        neurons, kv = group_sums(sq, layer)
        return neurons.sqrt(), kv.sqrt()
    per_entry = {r: wanda_scores(linears[r].weight, stats[r].total) for r in ATTN + MLP}
    return group_sums(per_entry, layer)


def _role_modules(block: nn.Module) -> dict[str, nn.Linear]:
    return {r: block.get_submodule(f"self_attn.{r}_proj") for r in ATTN} | \
           {r: block.get_submodule(f"mlp.{r}_proj") for r in MLP}


@torch.no_grad()
def prune_lm_structured(model: nn.Module, masks: Masks | None, target: float, *, criterion: str = "magnitude",
                        calibration: torch.Tensor | None = None, heads: bool = True,
                        device: torch.device | str | None = None) -> PruneResult:
    """Remove whole MLP neurons and KV groups of a LLaMA-style causal LM *in place* (the result's model is
    `model`) to the cumulative `target` share of each layer's neurons and KV groups (module docstring:
    budget, scores). The removed weights are zeroed; the masks (over prunable_lm_names, on the CPU) are
    `lm_group_masks` of the removed groups.

    masks: an earlier structured phase's masks (whole groups only, else PruningError); their groups stay
    removed. calibration: (n_samples x seq_len) token ids, needed by wanda. heads: False removes MLP neurons
    only (attention keeps every KV group an earlier phase left; prune.structure neurons). device: where each
    block is computed for wanda (default: the model's device).
    """
    if criterion not in STRUCTURED_CRITERIA:
        raise PruningError(f"unknown structured LM criterion {criterion!r}; known: {', '.join(STRUCTURED_CRITERIA)}")
    if not 0.0 <= target < 1.0:
        raise PruningError(f"target must be in [0, 1), got {target}")
    calibrated = criterion == "wanda"
    if calibrated and (calibration is None or calibration.dim() != 2 or calibration.shape[0] < 1
                       or calibration.is_floating_point()):
        raise PruningError("wanda needs calibration input ids of shape (n_samples, seq_len)")
    start = time.perf_counter()
    groups = lm_groups(model)
    params = dict(model.named_parameters())
    if masks is not None:
        check_masks(model, masks, list(groups.names))
        check_whole_lm_groups(masks, groups)
        before = lm_removed(masks, groups)
        for n in groups.names:
            params[n].mul_(masks[n].to(device=params[n].device, dtype=params[n].dtype))
    else:
        before = no_removed(groups)
    before_sq = weight_and_bias_norm_sq(model)
    k_n = max([neuron_budget(groups, target)] + [len(e["neurons"]) for e in before["layers"]])
    k_g = max([kv_budget(model.config, groups, target) if heads else 0] + [len(e["kv_groups"]) for e in before["layers"]])

    _, blocks = find_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    chosen, removed_sq = [], 0.0
    try:
        inputs = calibration_inputs(model, blocks, calibration, device, home) if calibrated else []
        for block, layer, prior in zip(blocks, groups.layers, before["layers"]):
            if calibrated:
                block.to(device)
            linears = _role_modules(block)
            stats = block_input_stats(block, linears, inputs, "wanda", device) if calibrated else None
            neuron_scores, kv_scores = _group_scores(linears, layer, criterion, stats)
            dead_n = torch.zeros(layer.neurons, dtype=torch.bool)
            dead_n[prior["neurons"]] = True
            dead_g = torch.zeros(layer.kv_groups, dtype=torch.bool)
            dead_g[prior["kv_groups"]] = True
            entry = {"neurons": _lowest(neuron_scores.cpu(), dead_n, k_n),
                     "kv_groups": _lowest(kv_scores.cpu(), dead_g, k_g)}
            chosen.append(entry)
            layer_masks = {layer.weights[r]: torch.ones(linears[r].weight.shape, dtype=torch.bool) for r in linears}
            _cut(layer_masks, layer, entry["neurons"], entry["kv_groups"])
            for r, lin in linears.items():
                gone = ~layer_masks[layer.weights[r]].to(lin.weight.device)
                removed_sq += float(lin.weight[gone].double().pow(2).sum())
                lin.weight.mul_(layer_masks[layer.weights[r]].to(device=lin.weight.device, dtype=lin.weight.dtype))
            del stats
            if calibrated:
                inputs = [(_run_block(block, hidden, rest, kwargs), rest, kwargs) for hidden, rest, kwargs in inputs]
                block.to(home)
    finally:
        model.train(was_training)

    removed = {"layers": chosen}
    new_masks = lm_group_masks(model, removed)
    old = masks if masks is not None else {n: torch.ones_like(m) for n, m in new_masks.items()}
    n_removed = sum(int((old[n].cpu() & ~new_masks[n]).sum()) for n in groups.names)
    norm_drop = math.sqrt(removed_sq / before_sq) if before_sq > 0 else 0.0
    notes = _notes(groups, target if heads else 0.0, k_n, k_g, time.perf_counter() - start)
    return PruneResult(model=model, masks=new_masks, removed=n_removed, norm_drop=norm_drop, notes=notes)


def _notes(groups: LMGroups, target: float, k_n: int, k_g: int, seconds: float) -> tuple[str, ...]:
    layer = groups.layers[0]
    n_kv, r = layer.kv_groups, layer.heads_per_group
    notes = [f"structured: every layer removes {k_n} of {layer.neurons} MLP neurons and {k_g} of {n_kv} KV groups "
             f"({k_g * r} of {n_kv * r} attention heads): a Hugging Face config holds one intermediate_size and "
             f"one head count for all layers ({seconds:.1f} s)",
             f"embeddings, norms, lm_head and hidden_size ({groups.hidden_size}) are unchanged: they are tied "
             f"through the residual stream"]
    wanted = math.floor(target * n_kv + 1e-9)
    if k_g < wanted:
        notes.append(f"KV groups: a share of {target:g} of {n_kv} asks for {wanted} per layer; {k_g} are removed "
                     f"(at least one must stay and the {groups.model_type} config must accept the head count)")
    elif wanted == 0 and target > 0 and k_g == 0:
        notes.append(f"KV groups: floor({target:g} * {n_kv}) = 0, so attention keeps all {n_kv} KV groups "
                     f"({n_kv * r} heads); only MLP neurons are removed")
    return tuple(notes)


# ---------------------------------------------------------------- physical removal

def _kept(size: int, removed: list[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([j for j in range(size) if j not in gone], dtype=torch.long)


def _kv_rows(kept_groups: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the kept groups when each group owns `width` consecutive rows."""
    return (kept_groups[:, None] * width + torch.arange(width)[None, :]).flatten()


@torch.no_grad()
def shrink_lm(model: nn.Module, removed: Removed) -> nn.Module:
    """A new, physically smaller model of the same class without the removed groups: config
    intermediate_size -= k_n, num_key_value_heads -= k_g, num_attention_heads -= k_g r, head_dim written
    explicitly; weights (and biases) copied from the kept rows / columns, everything else as it is. Every
    layer must remove the same numbers of neurons and KV groups (one config for all layers)."""
    groups = lm_groups(model)
    removed = check_removed(removed, groups)
    counts = {(len(e["neurons"]), len(e["kv_groups"])) for e in removed["layers"]}
    if len(counts) != 1:
        raise PruningError(f"every layer must remove the same numbers of (neurons, KV groups) to fit one config; "
                           f"got {sorted(counts)}")
    (k_n, k_g), = counts
    config = _shrunk_config(model.config, groups, k_n, k_g)
    dtype = next(model.parameters()).dtype
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for layer, entry in zip(groups.layers, removed["layers"]):
        w, b = layer.weights, layer.biases
        neurons = _kept(layer.neurons, entry["neurons"])
        kept_g = _kept(layer.kv_groups, entry["kv_groups"])
        kv_rows = _kv_rows(kept_g, layer.head_dim)
        q_rows = _kv_rows(kept_g, layer.head_dim * layer.heads_per_group)
        rows = {"gate": neurons, "up": neurons, "q": q_rows, "k": kv_rows, "v": kv_rows}
        for role, idx in rows.items():
            state[w[role]] = state[w[role]].index_select(0, idx.to(state[w[role]].device))
            if role in b:
                state[b[role]] = state[b[role]].index_select(0, idx.to(state[b[role]].device))
        state[w["down"]] = state[w["down"]].index_select(1, neurons.to(state[w["down"]].device))
        state[w["o"]] = state[w["o"]].index_select(1, q_rows.to(state[w["o"]].device))
    small = type(model)(config).to(dtype=dtype)
    small.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    if getattr(model, "generation_config", None) is not None:
        small.generation_config = copy.deepcopy(model.generation_config)
    small.train(model.training)
    return small.to(next(model.parameters()).device)


# ---------------------------------------------------------------- size

def lm_stats(model: nn.Module, seq_len: int) -> dict[str, int | float]:
    """Parameters and multiply-accumulates per token of a causal LM as it is (shrink first to measure a
    structured model; zeros are counted).

    parameters      every distinct parameter (tied embeddings once);
    linear_macs     sum of in_features * out_features over every nn.Linear (the blocks' projections and
                    lm_head): the MACs of one token;
    attention_macs  per layer 2 * num_attention_heads * head_dim * (seq_len + 1) / 2: Q K^T and the
                    weighted sum of V over the causal context, averaged over the seq_len positions;
    macs_per_token  linear_macs + attention_macs. Not counted: embedding lookups, norms, activations,
                    rotary embeddings, softmax, biases.
    """
    if seq_len < 1:
        raise PruningError(f"seq_len must be >= 1, got {seq_len}")
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    attention = config.num_hidden_layers * 2 * n_heads * head_dim * (seq_len + 1) / 2
    return {"parameters": parameters, "linear_macs_per_token": linear, "attention_macs_per_token": attention,
            "macs_per_token": linear + attention, "seq_len": seq_len}


def lm_structure_report(model: nn.Module, masks: Masks, seq_len: int) -> dict[str, Any]:
    """What taking the masked neurons and KV groups out of `model` gives (as workers.structured's
    `structure_report` for image models): `channels_removed` = removed groups / all groups (MLP neurons and
    KV groups of every layer, counted alike), `neurons_removed` and `kv_groups_removed` per layer, the
    `parameters` and `macs` (per token, `lm_stats` at `seq_len`) of the smaller model (`shrink_lm`) and
    `dense_parameters` / `dense_macs` of `model` as it is. PruningError when a mask removes part of a group or
    a removed group's weights are not all exactly zero in `model`."""
    groups = lm_groups(model)
    check_whole_lm_groups(masks, groups)
    removed = lm_removed(masks, groups)
    zero = lm_removed({n: p.detach() for n, p in model.named_parameters() if n in groups.names}, groups)
    for i, (want, got) in enumerate(zip(removed["layers"], zero["layers"])):
        for kind in ("neurons", "kv_groups"):
            if not set(want[kind]) <= set(got[kind]):
                raise PruningError(f"layer {i}: removed {kind} whose weights are not all zero: "
                                   f"{sorted(set(want[kind]) - set(got[kind]))}")
    total = sum(layer.neurons + layer.kv_groups for layer in groups.layers)
    gone = sum(len(r["neurons"]) + len(r["kv_groups"]) for r in removed["layers"])
    dense = lm_stats(model, seq_len)
    small = lm_stats(shrink_lm(model, removed), seq_len) if gone else dense
    first = removed["layers"][0] if removed["layers"] else {"neurons": [], "kv_groups": []}
    return {"channels_removed": gone / total if total else 0.0, "neurons_removed": len(first["neurons"]),
            "kv_groups_removed": len(first["kv_groups"]), "parameters": int(small["parameters"]),
            "macs": int(small["macs_per_token"]), "dense_parameters": int(dense["parameters"]),
            "dense_macs": int(dense["macs_per_token"])}
