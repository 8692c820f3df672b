import json

import pytest
import torch
from torch import nn

from workers.models import build_model
from workers.pruning import PruningError, apply_masks, full_masks, prunable_names
from workers.structured import (channel_groups, check_whole_groups, group_masks, group_scores, prune_channels,
                                rebuild, removed_channels, removed_from_json, removed_to_json, shrink,
                                structured_stats)

# arch, model kwargs, input shape, parameters that leave with each channel of each producer besides its
# weights (BatchNorm weight and bias after every conv; the bias of a linear layer)
ARCHS = {
    "resnet20": ({"width": 0.25}, (3, 16, 16), 2),
    "vgg16_bn": ({"width": 0.25}, (3, 32, 32), 2),
    "mlp": ({"widths": (24, 12)}, (1, 8, 8), 1),
    "lenet5": ({}, (1, 12, 12), 1),
}


def _randomize_bn(model: nn.Module) -> nn.Module:
    """BatchNorm away from its identity init, so a removed channel carries a nonzero constant (beta)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _model(arch: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    kwargs, shape, _ = ARCHS[arch]
    model = _randomize_bn(build_model(arch, num_classes=10, in_shape=shape, **kwargs)).eval()
    return model, torch.randn(4, *shape)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pruned(request):
    arch = request.param
    model, x = _model(arch)
    groups, protected = channel_groups(model, x[:1])
    result = prune_channels(model, None, 0.4, example_input=x[:1])
    return arch, model, x, groups, protected, result


def test_masked_model_equals_shrunk_model_with_exactly_the_removed_parameters(pruned):
    arch, dense, x, groups, _, result = pruned
    removed = check_whole_groups(result.masks, groups)
    small = shrink(result.model, x[:1], removed).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), result.model.eval()(x), atol=1e-5, rtol=1e-5)
    weights_gone = sum(int((~m).sum()) for m in result.masks.values())
    assert weights_gone == result.removed > 0
    extra = ARCHS[arch][2] * sum(len(removed.get(g.root, [])) * len(g.producers) for g in groups)
    n_dense = sum(p.numel() for p in dense.parameters())
    assert structured_stats(small, x[:1])["parameters"] == n_dense - weights_gone - extra
    stats_dense, stats_small = structured_stats(dense, x[:1]), structured_stats(small, x[:1])
    assert stats_small["macs"] < stats_dense["macs"]


def test_groups_cover_every_prunable_layer_except_the_classifier(pruned):
    arch, model, x, groups, protected, result = pruned
    classifier = prunable_names(model)[-1].removesuffix(".weight")
    assert protected == (classifier,)
    producers = {p for g in groups for p in g.producers}
    assert producers == set(prunable_names(model)) - {f"{classifier}.weight"}
    assert any(classifier in note for note in result.notes)
    # the classifier keeps every output row: no channel of its output is ever removed
    assert result.masks[f"{classifier}.weight"].any(dim=1).all()
    assert shrink(result.model, x[:1], removed_channels(result.masks, groups))(x).shape == (4, 10)
    assert model.training is False                         # tracing did not switch modes


@pytest.mark.parametrize("arch,n", [("resnet20", 3), ("resnet56", 9)])
def test_residual_stream_is_one_group_rooted_at_its_first_layer(arch, n):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_shape=(3, 8, 8), width=0.25)
    groups, protected = channel_groups(model, torch.randn(1, 3, 8, 8))
    assert protected == ("fc",)
    stage1 = next(g for g in groups if "stem.0.weight" in g.producers)
    assert set(stage1.producers) == {"stem.0.weight"} | {f"blocks.{b}.conv2.weight" for b in range(n)}
    readers = {s.name for s in stage1.slices if s.dim == 1}
    assert {"blocks.0.conv1.weight", f"blocks.{n}.conv1.weight", f"blocks.{n}.shortcut.0.weight"} <= readers
    assert len(groups) == 3 + 3 * n                           # three residual streams, one inner group per block
    streams = [g.root for g in groups if len(g.producers) > 1]
    assert streams == ["stem.0", f"blocks.{n}.conv2", f"blocks.{2 * n}.conv2"]


def test_flatten_maps_a_conv_channel_to_its_pixels_of_the_next_linear():
    model, x = _model("lenet5")
    groups, _ = channel_groups(model, x[:1])
    conv2 = next(g for g in groups if g.root == "3")
    (fc,) = [s for s in conv2.slices if s.dim == 1]
    pixels = model[8].in_features // 16
    assert fc.name == "8.weight" and fc.index[1] == tuple(range(pixels, 2 * pixels))


@pytest.mark.parametrize("arch", ["resnet20", "mlp"])
def test_group_masks_round_trip(arch):
    model, x = _model(arch)
    groups, _ = channel_groups(model, x[:1])
    g = torch.Generator().manual_seed(3)
    removed = {grp.root: sorted(torch.randperm(grp.size, generator=g)[:grp.size // 2].tolist()) for grp in groups}
    removed = {k: v for k, v in removed.items() if v}
    masks = group_masks(model, groups, removed)
    assert set(masks) == set(prunable_names(model))
    assert removed_channels(masks, groups) == removed
    assert check_whole_groups(masks, groups) == removed
    # AND-ed with existing masks: removing more keeps what was removed
    more = group_masks(model, groups, {groups[0].root: [removed.get(groups[0].root, [0])[0]]}, masks)
    assert all(torch.equal(more[n], masks[n]) for n in masks)
    with pytest.raises(PruningError):
        group_masks(model, groups, {groups[0].root: list(range(groups[0].size))})   # a group without channels
    with pytest.raises(PruningError):
        group_masks(model, groups, {"nope": [0]})


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_budgets_hit_the_target_share_and_removed_channels_stay_removed(scope):
    model, x = _model("resnet20")
    groups, _ = channel_groups(model, x[:1])
    total = sum(grp.size for grp in groups)
    masks, before = None, {}
    for target in (0.2, 0.45, 0.7):
        result = prune_channels(model, masks, target, scope=scope, example_input=x[:1])
        model, masks = result.model, result.masks
        removed = check_whole_groups(masks, groups)
        for grp in groups:
            gone = removed.get(grp.root, [])
            assert set(before.get(grp.root, [])) <= set(gone)
            assert len(gone) <= grp.size - 1                       # every group keeps a channel
            if scope == "layerwise":
                assert len(gone) == min(grp.size - 1, round(target * grp.size))
        n = sum(len(v) for v in removed.values())
        if scope == "global":
            assert n == round(target * total)
        else:
            assert abs(n - target * total) <= len(groups) / 2
        state = model.state_dict()
        assert all(torch.equal(state[k] != 0, masks[k]) for k in masks)
        before = removed


def test_global_magnitude_removes_the_lowest_scored_channels():
    model, x = _model("vgg16_bn")
    groups, _ = channel_groups(model, x[:1])
    scores = group_scores(model, groups)
    result = prune_channels(model, None, 0.3, example_input=x[:1])
    removed = removed_channels(result.masks, groups)
    gone = torch.cat([scores[r][c] for r, c in removed.items()])
    kept = torch.cat([scores[g.root][[c for c in range(g.size) if c not in removed.get(g.root, [])]] for g in groups])
    assert gone.max() <= kept.min()
    after = group_scores(result.model, groups, result.masks)
    assert all(after[r][c].eq(float("-inf")).all() for r, c in removed.items())


def test_random_criterion_follows_the_generator():
    model, x = _model("mlp")
    runs = [prune_channels(model, None, 0.5, criterion="random", example_input=x[:1],
                           generator=torch.Generator().manual_seed(s)).masks for s in (1, 1, 2)]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])
    with pytest.raises(PruningError):
        prune_channels(model, None, 0.5, criterion="lamp", example_input=x[:1])
    with pytest.raises(PruningError):
        prune_channels(model, None, 1.0, example_input=x[:1])


def test_partly_removed_channel_is_refused():
    model, x = _model("resnet20")
    groups, _ = channel_groups(model, x[:1])
    stream = next(g for g in groups if len(g.producers) > 1)
    masks = group_masks(model, groups, {stream.root: [1]})
    check_whole_groups(masks, groups)
    out = next(s for s in stream.slices if s.dim == 0)
    masks[out.name].index_fill_(0, torch.tensor(out.index[2]), False)     # channel 2 gone from one producer only
    with pytest.raises(PruningError, match="partly"):
        check_whole_groups(masks, groups)
    state = apply_masks(model, masks).state_dict()                        # the same read off weights
    with pytest.raises(PruningError, match="partly"):
        check_whole_groups(state, groups)


def test_soup_of_differently_trained_ingredients_keeps_removed_groups_exactly_zero():
    model, x = _model("resnet20")
    groups, _ = channel_groups(model, x[:1])
    result = prune_channels(model, None, 0.5, example_input=x[:1])
    removed = removed_channels(result.masks, groups)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        member = build_model("resnet20", num_classes=10, in_shape=ARCHS["resnet20"][1], width=0.25)
        member.load_state_dict(result.model.state_dict())
        opt = torch.optim.SGD(member.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        member.train()
        for _ in range(3):
            xb, yb = torch.randn(8, *ARCHS["resnet20"][1]), torch.randint(0, 10, (8,))
            opt.zero_grad()
            nn.functional.cross_entropy(member(xb), yb).backward()
            opt.step()
            apply_masks(member, result.masks)
        states.append(member.state_dict())
    assert not torch.equal(states[0]["stem.0.weight"], states[1]["stem.0.weight"])
    soup = {k: (states[0][k].double() + states[1][k].double()).div(2).to(states[0][k].dtype) for k in states[0]}
    assert check_whole_groups(soup, groups) == removed
    for name, mask in result.masks.items():
        assert (soup[name][~mask] == 0).all(), name


@pytest.mark.parametrize("arch", ["resnet20", "lenet5"])
def test_rebuild_from_recorded_channels_loads_the_exported_state(arch):
    model, x = _model(arch)
    result = prune_channels(model, None, 0.5, example_input=x[:1])
    groups, _ = channel_groups(model, x[:1])
    removed = removed_channels(result.masks, groups)
    small = shrink(result.model, x[:1], removed).eval()
    recorded = json.loads(json.dumps(removed_to_json(removed)))
    torch.manual_seed(5)
    kwargs, shape, _ = ARCHS[arch]
    fresh = rebuild(build_model(arch, num_classes=10, in_shape=shape, **kwargs), x[:1], recorded)
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), result.model.eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(PruningError):
        removed_from_json({"stem.0": ["1"]})


class _ScaledHead(nn.Module):
    """A conv net whose output is an op after the last layer, with a GroupNorm (not maskable)."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8)
        self.c2, self.c3 = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.c2(torch.relu(self.gn(self.c1(x))))
        x = self.c3(torch.relu(x)).mean((2, 3))
        return self.fc(x) * 2.0


def test_unsupported_couplings_and_outputs_behind_ops_are_protected():
    torch.manual_seed(0)
    model, x = _ScaledHead(), torch.randn(2, 1, 8, 8)
    groups, protected = channel_groups(model, x[:1])
    assert set(protected) == {"c1", "fc"}
    assert [g.root for g in groups] == ["c2", "c3"]
    result = prune_channels(model, None, 0.5, example_input=x[:1])
    small = shrink(result.model, x[:1], removed_channels(result.masks, groups))
    with torch.no_grad():
        torch.testing.assert_close(small(x), result.model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_resnet18_groups():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", num_classes=10, in_shape=(3, 32, 32))
    groups, protected = channel_groups(model, torch.randn(1, 3, 32, 32))
    assert protected == ("fc",)
    assert len(groups) == 4 + 8                                 # four residual streams, one inner group per block
    stream1 = next(g for g in groups if "conv1.weight" in g.producers)
    assert stream1.root == "conv1"
    assert set(stream1.producers) == {"conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"}
    assert full_masks(model).keys() >= {s.name for g in groups for s in g.slices}
