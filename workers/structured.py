"""Structured (channel) pruning of CNNs and MLPs: whole channels leave the model, not single weights.

A *channel group* is a set of coupled channels, as torch_pruning's dependency graph finds them: a conv's
output channel c, the BatchNorm channel c after it and input channel c of every layer reading it; in a
ResNet the residual stream couples the stem, every block's last conv and the downsample convs of a stage,
so one channel of the stream is one channel of all of them.

During training a structured mask is an ordinary mask (`workers.pruning`: ``{weight name: bool tensor}``,
True = kept, same shapes) whose zeros cover whole channels: removing channel c of a group zeroes

- the output slice (dim 0) of every producer weight of the group (conv/linear whose output is channel c),
- the input slice (dim 1) of every consumer weight, with torch_pruning's index mapping (after a flatten,
  one conv channel is H*W inputs of the next linear).

Biases and BatchNorm stay out of masks: a removed channel then carries a constant (its bias or BN beta)
that only zeroed consumer weights read, so the masked model computes exactly what the physically pruned
model (`shrink`) computes. Only the export removes channels physically; it stores the smaller state and the
removed channels per group root (`removed_to_json`), and `rebuild` shrinks a fresh model the same way.

Protected (never pruned, keep their width): the layers whose output is the model's output (the classifier),
and every group torch_pruning couples to something a mask cannot express (grouped/depthwise or transposed
convs, Layer/Group/InstanceNorm, attention, LSTM, embeddings, bare parameters).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from workers.config import TASK_OPTIONS, PruningError
from workers.pruning import PRUNABLE_TYPES, Masks, PruneResult, _drop, check_masks, full_masks, prunable_names

Removed = dict[str, list[int]]          # group root -> removed channel indices (JSON-able)

CRITERIA = TASK_OPTIONS["classification"].channel_criteria        # declared by the task, once


@dataclass(frozen=True)
class WeightSlice:
    """Where a group's channels sit in one weight: along `dim` (0: the layer produces the channel, 1: it
    reads it), channel i owns the indices `index[i]` (one for a conv, H*W for a linear after a flatten)."""
    name: str                                   # state-dict name of a conv/linear weight
    dim: int
    index: tuple[tuple[int, ...], ...]          # per channel of the group

    @functools.cached_property
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions along `dim`, the channel owning each): the index as two flat long tensors."""
        positions = [i for ix in self.index for i in ix]
        owners = [c for c, ix in enumerate(self.index) for _ in ix]
        return torch.tensor(positions, dtype=torch.long), torch.tensor(owners, dtype=torch.long)

    def per_channel(self, per_position: torch.Tensor) -> torch.Tensor:
        """Sums over each channel's positions of a vector along `dim` (float64, on the CPU)."""
        positions, owners = self.flat
        return torch.zeros(len(self.index), dtype=torch.float64).index_add_(
            0, owners, per_position.detach().double().cpu()[positions])


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels: `root` is the layer whose output channels index the group (channel i = its output
    channel i), `size` their number, `slices` every conv/linear weight slice a channel owns."""
    root: str
    size: int
    slices: tuple[WeightSlice, ...]

    @property
    def producers(self) -> tuple[str, ...]:
        """Weights whose output channels are the group's channels (dim-0 slices)."""
        return tuple(s.name for s in self.slices if s.dim == 0)


# ---------------------------------------------------------------- the dependency graph

def _module_name(weight_name: str) -> str:
    """The layer of a weight's state-dict name ("" for a model that is itself the layer)."""
    return "" if weight_name == "weight" else weight_name.removesuffix(".weight")


def _outputs(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers whose output tensor is (one of) the model's output(s): the classifier.
    A model whose output passes through another op after its last layer is covered by `channel_groups`,
    which protects every group reaching the output."""
    seen: dict[int, tuple[str, Any]] = {}       # id of a layer's output -> (layer, the output, kept alive)

    def record(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen.setdefault(id(output), (name, output))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, PRUNABLE_TYPES)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sorted({seen[id(t)][0] for t in _outputs(out) if id(t) in seen})


def _trace(model: nn.Module, example_input: torch.Tensor) -> Any:
    """torch_pruning's dependency graph of `model`, traced in eval mode (BatchNorm statistics untouched)."""
    import torch_pruning as tp
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as e:                       # noqa: BLE001  (tracing fails in many model-specific ways)
        raise PruningError(f"channel pruning cannot trace this model ({type(e).__name__}: {e})") from e
    finally:
        model.train(was_training)


def _unsupported(module: Any) -> str | None:
    """Why a module coupled to a channel group keeps the group from being masked (None: it can be).

    Maskable: conv (not grouped, not transposed) and linear layers (their weight slices are masked),
    BatchNorm and PReLU (per channel: a removed channel stays a constant nobody reads), and modules without
    parameters of their own (activations, pooling, adds, flatten, concat, split)."""
    if isinstance(module, nn.Parameter):
        return "a bare parameter"
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "a transposed convolution"
        if module.groups > 1:
            return "a grouped/depthwise convolution"
        return None
    if isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)):
        return None
    if isinstance(module, nn.Module) and not any(True for _ in module.parameters(recurse=False)):
        return None
    return f"a {type(module).__name__} layer"


def _group_of(dg: Any, group: Any, names: dict[Any, str], outputs: set[str],
              order: Mapping[str, int]) -> tuple[ChannelGroup | None, str]:
    """Our ChannelGroup of a torch_pruning group (None and the reason when it must stay whole)."""
    import torch_pruning as tp
    root_module = group[0].dep.target.module
    size = dg.get_pruner_of_module(root_module).get_out_channels(root_module)
    slices: dict[tuple[str, int], list[list[int]]] = {}
    for item in group:
        target = item.dep.target
        if target.type == tp.ops.OPTYPE.OUTPUT:
            return None, "its channels are the model's output"
        why = _unsupported(target.module)
        if why is not None:
            return None, f"it is coupled to {why}"
        if not isinstance(target.module, PRUNABLE_TYPES):
            continue
        name = names[target.module]
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if out and name in outputs:
            return None, "it is the model's output layer"
        per_channel = slices.setdefault((f"{name}.weight" if name else "weight", 0 if out else 1),
                                        [[] for _ in range(size)])
        for idx, root_idx in zip(item.idxs, item.root_idxs):
            per_channel[int(root_idx)].append(int(idx))
    ours = tuple(WeightSlice(n, d, tuple(tuple(sorted(set(ix))) for ix in per_channel))
                 for (n, d), per_channel in slices.items())
    return ChannelGroup(root=_canonical_root(names[root_module], ours, order), size=size, slices=ours), ""


def _canonical_root(root: str, slices: Sequence[WeightSlice], order: Mapping[str, int]) -> str:
    """The group's first producer in module order whose output channel i is the group's channel i (all of a
    residual stream's producers are; the stem comes first), else torch_pruning's root: recorded channels
    then name the same layer whichever layer the graph walk happened to start from."""
    identity = tuple((i,) for i in range(len(slices[0].index)))
    same = [_module_name(s.name) for s in slices if s.dim == 0 and s.index == identity]
    return min(same, key=order.__getitem__) if root in same else root


def _groups(dg: Any, model: nn.Module, example_input: torch.Tensor) -> tuple[list[ChannelGroup], dict[str, str]]:
    """(prunable groups, {protected layer: why}) of a traced model."""
    names = {m: n for n, m in model.named_modules()}
    order = _order(model)
    outputs = set(output_layers(model, example_input))
    groups: list[ChannelGroup] = []
    protected: dict[str, str] = {}
    for group in dg.get_all_groups(root_module_types=list(PRUNABLE_TYPES)):
        ours, why = _group_of(dg, group, names, outputs, order)
        if ours is not None:
            groups.append(ours)
            continue
        for item in group:
            module = item.dep.target.module
            if isinstance(module, PRUNABLE_TYPES) and dg.is_out_channel_pruning_fn(item.dep.handler):
                protected.setdefault(names[module], why)
    return sorted(groups, key=lambda g: order[g.root]), protected


def _order(model: nn.Module) -> dict[str, int]:
    return {n: i for i, (n, _) in enumerate(model.named_modules())}


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> tuple[list[ChannelGroup], tuple[str, ...]]:
    """(groups, protected): every prunable channel group of `model` (in module order of their roots), and the
    names of the conv/linear layers that keep their width: the model's output layer(s) and every layer whose
    group torch_pruning couples to something a mask cannot express (see `_unsupported`).

    `example_input` is a batch as the model takes it (on the model's device); the model is not modified
    (it is traced in eval mode)."""
    model_copy = copy.deepcopy(model)
    groups, protected = _groups(_trace(model_copy, example_input), model_copy, example_input)
    return groups, tuple(sorted(protected, key=_order(model).get))


def protected_reasons(model: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """{protected layer: why it keeps its width} (for an event or an error message)."""
    model_copy = copy.deepcopy(model)
    return _groups(_trace(model_copy, example_input), model_copy, example_input)[1]


# ---------------------------------------------------------------- masks of channels

def _index(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(indices), dtype=torch.long, device=device)


def _slice_alive(tensor: torch.Tensor, s: WeightSlice) -> torch.Tensor:
    """Per channel of the group: whether its slice of `tensor` holds any nonzero (True) entry."""
    rows = (tensor != 0).movedim(s.dim, 0).reshape(tensor.shape[s.dim], -1).any(dim=1)
    return s.per_channel(rows) > 0


def _slice_states(masks_or_state: Mapping[str, torch.Tensor], group: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead, present), both [slices, size] bool: channel c owns entries in the slice (present) and they are
    all zero / False (dead). A channel may own nothing in a consumer's slice (e.g. after a split)."""
    present = torch.tensor([[bool(ix) for ix in s.index] for s in group.slices], dtype=torch.bool)
    alive = torch.stack([_slice_alive(masks_or_state[s.name], s) for s in group.slices])
    return present & ~alive, present


def _removed_and_partial(masks_or_state: Mapping[str, torch.Tensor],
                         group: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(removed, partial, dead) per channel: every slice it owns is zero / some are and some are not."""
    dead, present = _slice_states(masks_or_state, group)
    live = present & ~dead
    return ~live.any(dim=0) & dead.any(dim=0), dead.any(dim=0) & live.any(dim=0), dead


def removed_channels(masks: Mapping[str, torch.Tensor], groups: Sequence[ChannelGroup]) -> Removed:
    """{root: removed channels} read off a mask (or a state's zeros): a channel is removed when every one of
    its weight slices is entirely False. Groups with nothing removed are left out."""
    out: Removed = {}
    for g in groups:
        dead = _removed_and_partial(masks, g)[0]
        if dead.any():
            out[g.root] = [int(i) for i in torch.nonzero(dead).flatten()]
    return out


def check_whole_groups(masks_or_state: Mapping[str, torch.Tensor], groups: Sequence[ChannelGroup]) -> Removed:
    """Refuse (PruningError) masks or weights where some channel is only partly removed: some of its slices
    entirely zero, others not. Rule: per channel, all slices are zero or none is. Returns the removed
    channels (`removed_channels`). For soups: every ingredient and the average keep each removed channel
    exactly zero."""
    partial = []
    for g in groups:
        _, mixed, dead = _removed_and_partial(masks_or_state, g)
        for c in torch.nonzero(mixed).flatten().tolist():
            zero = [s.name for s, d in zip(g.slices, dead[:, c]) if d]
            partial.append(f"{g.root}[{c}] (zero only in {', '.join(zero)})")
    if partial:
        raise PruningError(f"channels only partly removed: {'; '.join(partial[:10])}"
                           + (f" and {len(partial) - 10} more" if len(partial) > 10 else ""))
    return removed_channels(masks_or_state, groups)


def _check_removed(removed: Mapping[str, Sequence[int]], groups: Sequence[ChannelGroup]) -> None:
    """Refuse unknown roots, channels out of range and groups left without a channel."""
    sizes = {g.root: g.size for g in groups}
    for root, channels in removed.items():
        if root not in sizes:
            raise PruningError(f"{root!r} is not the root of a prunable channel group; roots: {', '.join(sizes)}")
        bad = [c for c in channels if not 0 <= int(c) < sizes[root]]
        if bad:
            raise PruningError(f"channels {bad} out of range for {root} ({sizes[root]} channels)")
        if len(set(int(c) for c in channels)) >= sizes[root]:
            raise PruningError(f"removing all {sizes[root]} channels of {root} would cut the model")


def group_masks(model: nn.Module, groups: Sequence[ChannelGroup], removed: Mapping[str, Sequence[int]],
                masks: Masks | None = None) -> Masks:
    """Masks over every prunable weight of `model` in which each removed channel's slices are False,
    AND-ed with `masks` (default all True). The input masks are not modified."""
    _check_removed(removed, groups)
    out = full_masks(model) if masks is None else {n: m.clone().bool() for n, m in masks.items()}
    check_masks(model, out)
    for g in groups:
        channels = sorted(set(int(c) for c in removed.get(g.root, ())))
        if not channels:
            continue
        for sl in g.slices:
            idx = [i for c in channels for i in sl.index[c]]
            if idx:
                out[sl.name].index_fill_(sl.dim, _index(idx, out[sl.name].device), False)
    return out


# ---------------------------------------------------------------- scores and pruning

def group_scores(model: nn.Module, groups: Sequence[ChannelGroup], masks: Masks | None = None,
                 criterion: str = "magnitude", generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{root: float64 scores of its channels}; the lowest are removed first, already removed channels score -inf.

    magnitude: the RMS of the channel's kept weights over all its slices (producers' output slices and
    consumers' input slices),

        s(c) = sqrt( sum_{w in slices(c), m(w)} w^2 / #{w in slices(c) : m(w)} ),

    i.e. its L2 norm divided by sqrt(number of kept entries), so that channels of wide and narrow layers,
    and of groups with many or few coupled layers, compare in a global ranking.
    random: U[0, 1) from `generator` (default: seeded with 0)."""
    if criterion not in CRITERIA:
        raise PruningError(f"unknown channel pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    params = dict(model.named_parameters())
    masks = full_masks(model) if masks is None else masks
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    dead = removed_channels(masks, groups)
    scores: dict[str, torch.Tensor] = {}
    for g in groups:
        if criterion == "random":
            s = torch.rand(g.size, generator=gen, dtype=torch.float64)
        else:
            sq = torch.zeros(g.size, dtype=torch.float64)
            count = torch.zeros(g.size, dtype=torch.float64)
            for sl in g.slices:
                w = params[sl.name].detach()
                m = masks[sl.name].to(w.device)
                sq += sl.per_channel((w.double() * m).pow(2).movedim(sl.dim, 0).reshape(w.shape[sl.dim], -1).sum(1))
                count += sl.per_channel(m.movedim(sl.dim, 0).reshape(w.shape[sl.dim], -1).sum(1))
            s = (sq / count.clamp_min(1.0)).sqrt()
        s[dead.get(g.root, [])] = -math.inf
        scores[g.root] = s
    return scores


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Positions of the k lowest scores (ties to the earlier position)."""
    if k <= 0:
        return []
    order = torch.argsort(scores, stable=True)
    return [int(i) for i in order[:k]]


def _plan_global(scores: dict[str, torch.Tensor], dead: Removed, n_drop: int) -> Removed:
    """The n_drop lowest-scored alive channels over all groups, each group's best alive channel excepted."""
    roots, flat = [], []
    for root, s in scores.items():
        s, gone = s.clone(), set(dead.get(root, []))
        alive = [c for c in range(len(s)) if c not in gone]
        if alive:
            s[max(alive, key=lambda c: (float(s[c]), -c))] = math.inf       # the last channel stays
        s[dead.get(root, [])] = math.inf                                    # already gone: not a candidate
        roots += [(root, c) for c in range(len(s))]
        flat.append(s)
    if not flat:
        return {}
    candidates = torch.cat(flat)
    n_drop = min(n_drop, int(torch.isfinite(candidates).sum()))
    out: Removed = {}
    for i in _lowest(candidates, n_drop):
        root, c = roots[i]
        out.setdefault(root, []).append(c)
    return out


def _plan_layerwise(scores: dict[str, torch.Tensor], dead: Removed, target: float) -> Removed:
    """Per group, its lowest-scored alive channels until round(target * size) are removed (at most size - 1)."""
    out: Removed = {}
    for root, s in scores.items():
        gone = len(dead.get(root, []))
        want = min(len(s) - 1, round(target * len(s)))
        s = s.clone()
        s[dead.get(root, [])] = math.inf
        picks = _lowest(s, want - gone)
        if picks:
            out[root] = picks
    return out


@torch.no_grad()
def prune_channels(model: nn.Module, masks: Masks | None, target: float, *, example_input: torch.Tensor,
                   scope: str = "global", criterion: str = "magnitude",
                   generator: torch.Generator | None = None) -> PruneResult:
    """Channel-prune a copy of `model` (the input is not modified) until `target` of its prunable channels
    (summed over all channel groups; protected layers do not count) are removed.

    global: the lowest-scored channels (`group_scores`) across all groups go until round(target * N) of the N
    channels are removed; layerwise: every group loses round(target * size) of its channels. Every group
    keeps at least one channel, already removed channels stay removed (a target below the current share
    removes nothing). The model's weights are zeroed by the new mask; `removed` counts the weights newly
    masked, `norm_drop` is as in `workers.pruning.prune`, `notes` name the protected layers (and a target
    the keep-one rule made unreachable)."""
    if not 0.0 <= target < 1.0:
        raise PruningError(f"target share of channels must be in [0, 1), got {target}")
    if scope not in ("global", "layerwise"):
        raise PruningError(f"unknown pruning scope {scope!r}; known: global, layerwise")
    if criterion not in CRITERIA:
        raise PruningError(f"unknown channel pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    model = copy.deepcopy(model)
    masks = full_masks(model) if masks is None else {n: m.clone().bool() for n, m in masks.items()}
    check_masks(model, masks)
    groups, protected = channel_groups(model, example_input)
    dead = check_whole_groups(masks, groups)
    scores = group_scores(model, groups, masks, criterion, generator)
    total = sum(g.size for g in groups)
    n_dead = sum(len(v) for v in dead.values())
    notes: list[str] = []
    if scope == "global":
        want = round(target * total)
        new = _plan_global(scores, dead, want - n_dead)
        reached = n_dead + sum(len(v) for v in new.values())
        if reached < want:
            notes.append(f"only {reached} of {total} channels can go (every group keeps one); target was {want}")
    else:
        new = _plan_layerwise(scores, dead, target)
    removed = {root: sorted(set(dead.get(root, [])) | set(new.get(root, []))) for root in set(dead) | set(new)}
    new_masks = group_masks(model, groups, removed, masks)
    drops = {n: ~new_masks[n] for n in prunable_names(model)}
    if protected:
        notes.insert(0, f"layers kept at full width (protected): {', '.join(protected)}")
    return _drop(model, masks, drops, tuple(notes))


# ---------------------------------------------------------------- physical pruning and export

def shrink(model: nn.Module, example_input: torch.Tensor, removed: Mapping[str, Sequence[int]]) -> nn.Module:
    """A deep copy of `model` with the `removed` channels ({root: channels}) physically gone (torch_pruning
    prunes every coupled layer: conv/linear weights and biases, BatchNorm parameters and statistics); its
    outputs equal those of `model` under `group_masks` of the same channels."""
    model = copy.deepcopy(model)
    dg = _trace(model, example_input)
    groups, _ = _groups(dg, model, example_input)
    _check_removed(removed, groups)
    modules = dict(model.named_modules())
    for g in groups:
        channels = sorted(set(int(c) for c in removed.get(g.root, ())))
        if channels:
            root = modules[g.root]
            group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, channels)
            group.prune()
    return model


def structured_stats(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """{"parameters": every parameter of the model, "macs": multiply-accumulates of one example's forward
    pass (torch_pruning's counter, averaged over the batch of `example_input`)}."""
    import torch_pruning as tp
    was_training = model.training
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example_input)
    finally:
        model.train(was_training)
    return {"parameters": int(sum(p.numel() for p in model.parameters())), "macs": int(macs)}


def removed_to_json(removed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The removed channels as JSON-able data: {root: sorted channel ints}, groups without removals dropped."""
    return {str(root): sorted(set(int(c) for c in chs)) for root, chs in removed.items() if len(chs)}


def removed_from_json(data: Any) -> Removed:
    """The inverse of `removed_to_json`; PruningError unless it is {str: [non-negative ints]}."""
    if not isinstance(data, Mapping):
        raise PruningError("removed channels must be a mapping of layer names to channel lists, "
                           f"got {type(data).__name__}")
    out: Removed = {}
    for root, chs in data.items():
        if not isinstance(root, str) or not isinstance(chs, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chs):
            raise PruningError(f"removed channels of {root!r} must be a list of non-negative ints, got {chs!r}")
        out[root] = sorted(set(chs))
    return out


def rebuild(model: nn.Module, example_input: torch.Tensor, removed: Any) -> nn.Module:
    """The exported (shrunk) architecture from a freshly built `model` and the recorded removed channels
    (`removed_to_json` data): `shrink` of it, so that ``load_state_dict`` of the exported state fits."""
    return shrink(model, example_input, removed_from_json(removed))


def structure_report(model: nn.Module, masks: Masks, example_input: torch.Tensor) -> dict[str, Any]:
    """What taking the masked channels out of `model` gives, for a phase's metrics and a model's page:

        channels_removed = removed channels / prunable channels (over every group, protected layers aside),
        parameters, macs  = those of the physically smaller model (`shrink`), per example,
        dense_parameters, dense_macs = those of `model` as it is (every channel in).

    PruningError when a mask removes part of a channel, or when a removed channel's weights are not all
    exactly zero in `model` (a soup that lost its structure)."""
    groups, _ = channel_groups(model, example_input)
    removed = check_whole_groups(masks, groups)
    zero = removed_channels(model.state_dict(), groups)
    lost = {root: sorted(set(chs) - set(zero.get(root, ()))) for root, chs in removed.items()}
    lost = {root: chs for root, chs in lost.items() if chs}
    if lost:
        raise PruningError(f"removed channels whose weights are not all zero: {lost}")
    total, gone = sum(g.size for g in groups), sum(len(v) for v in removed.values())
    dense = structured_stats(model, example_input)
    small = structured_stats(shrink(model, example_input, removed), example_input) if gone else dense
    return {"channels_removed": gone / total if total else 0.0, "parameters": small["parameters"],
            "macs": small["macs"], "dense_parameters": dense["parameters"], "dense_macs": dense["macs"]}
