import copy

import pytest
import torch

from tests.workers.tiny import MODELS
from workers.pruning import (PruningError, full_masks, per_phase_rate, prunable_names, prune, sparsity,
                             sparsity_after)


@pytest.mark.parametrize("S,T", [(0.9, 3), (0.5, 1), (0.98, 5), (0.0, 2)])
def test_per_phase_rate_reaches_target(S, T):
    p = per_phase_rate(S, T)
    assert sparsity_after(p, T) == pytest.approx(S)
    assert sparsity_after(p, 1) == pytest.approx(p)


@pytest.mark.parametrize("S,T", [(1.0, 3), (-0.1, 3), (0.5, 0)])
def test_per_phase_rate_refuses_bad_input(S, T):
    with pytest.raises(PruningError):
        per_phase_rate(S, T)


def test_prunable_weights_are_conv_and_linear_weights_first_and_last_included():
    model = MODELS["cnn"]()
    names = prunable_names(model)
    assert names == ["0.weight", "3.weight", "8.weight"]     # first conv, second conv, the last linear
    assert all(not n.endswith("bias") for n in names)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_sparsity_after_t_phases_within_one_weight_per_tensor(arch, scope, criterion):
    torch.manual_seed(0)
    model, masks = MODELS[arch](), None
    S, T = 0.9, 4
    p = per_phase_rate(S, T)
    for t in range(1, T + 1):
        target = sparsity_after(p, t)
        result = prune(model, masks, target, scope=scope, criterion=criterion, seed=t)
        model, masks = result.model, result.masks
        n_tensors = len(masks)
        total = sum(m.numel() for m in masks.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert abs(pruned - target * total) <= n_tensors
        if scope == "layerwise":
            for name, m in masks.items():
                assert abs(int((~m).sum()) - target * m.numel()) <= 1, name
        # the weights really are zero where the mask says so, and nowhere else among prunable weights
        state = model.state_dict()
        for name, m in masks.items():
            assert torch.equal(state[name] != 0, m)
    assert sparsity(masks)[0] == pytest.approx(S, abs=n_tensors / total)


def test_global_magnitude_removes_the_smallest_and_keeps_biases():
    torch.manual_seed(1)
    model = MODELS["mlp"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, None, 0.5, scope="global")
    removed = torch.cat([before[n][~m].abs() for n, m in result.masks.items()])
    kept = torch.cat([before[n][m].abs() for n, m in result.masks.items()])
    assert removed.max() <= kept.min()
    after = result.model.state_dict()
    for k in before:
        if k.endswith("bias"):
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    # the input model is untouched
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_norm_drop_follows_the_reference_definition_on_a_batchnorm_model():
    """d = sqrt(| ||theta||^2 - ||theta_pruned||^2 |) / ||theta|| over every weight and bias, BatchNorm's
    included, as the SMS reference code measures the model norm (get_model_norm_square)."""
    torch.manual_seed(2)
    model = MODELS["cnn"]()
    with torch.no_grad():                      # BatchNorm away from its identity init, so it counts
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)

    def norm_sq(net):
        return sum(float(p.detach().double().pow(2).sum()) for mod in net.modules() for n, p in mod.named_parameters(
            recurse=False) if n in ("weight", "bias"))

    result = prune(model, None, 0.3, scope="layerwise")
    before, after = norm_sq(model), norm_sq(result.model)
    assert result.norm_drop == pytest.approx(abs(before - after) ** 0.5 / before ** 0.5)
    prunable_only = sum(float(model.state_dict()[n].pow(2).sum()) for n in result.masks)
    assert before > prunable_only * 1.05       # the BatchNorm terms make a difference here
    assert result.removed == sum(int((~m).sum()) for m in result.masks.values())


def test_pruning_only_removes_more_weights_never_revives():
    torch.manual_seed(3)
    model = MODELS["cnn"]()
    first = prune(model, None, 0.5)
    second = prune(first.model, first.masks, 0.75)
    for n in first.masks:
        assert not (second.masks[n] & ~first.masks[n]).any()


def test_masks_that_do_not_fit_are_refused():
    model = MODELS["mlp"]()
    masks = full_masks(model)
    masks.pop("1.weight")
    with pytest.raises(PruningError, match="missing"):
        prune(model, masks, 0.5)


# ---------------------------------------------------------------- N:M (2:4, 4:8, ...) for conv and linear layers

from workers.pruning import (is_nm, nm_group_counts, nm_keep_mask, nm_rows, nm_unrows,  # noqa: E402
                             parse_pattern, prune_nm)

NM = [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)]


def _random_weight(g: torch.Generator) -> torch.Tensor:
    """A linear [out, in] or conv [out, in, kh, kw] / [out, in, k] weight of random small sizes, with
    input channels both multiples of 8 and not (1, 3, 6, ...)."""
    out, cin = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
    kernel = [[], [3], [3, 3], [1, 1], [2, 3]][int(torch.randint(0, 5, (1,), generator=g))]
    return torch.randn(out, cin, *kernel, generator=g)


@pytest.mark.parametrize("seed", range(40))
def test_nm_keep_mask_property_at_most_n_per_group_and_the_largest_kept(seed):
    """For random weights, N:M and dead weights: every group of M input channels keeps at most N (exactly
    min(N, alive in the group)), never a dead weight, and every kept weight is at least as large as every
    pruned alive one of its group; a short last group keeps min(N, its alive)."""
    g = torch.Generator().manual_seed(seed)
    n, m = NM[seed % len(NM)]
    w = _random_weight(g)
    alive = torch.rand(w.shape, generator=g) > 0.2 if seed % 3 == 0 else None
    keep = nm_keep_mask(w.abs(), alive, n, m)
    assert keep.shape == w.shape and keep.dtype == torch.bool
    if alive is not None:
        assert not (keep & ~alive).any()
    live = torch.ones_like(keep) if alive is None else alive
    rows_keep, rows_live, rows_w = nm_rows(keep), nm_rows(live), nm_rows(w.abs())
    cols = rows_keep.shape[1]
    for start in range(0, cols, m):
        k, a, s = rows_keep[:, start:start + m], rows_live[:, start:start + m], rows_w[:, start:start + m]
        assert (k.sum(1) == torch.clamp(a.sum(1), max=n)).all()
        for r in range(k.shape[0]):
            pruned_alive = s[r][a[r] & ~k[r]]
            if k[r].any() and len(pruned_alive):
                assert s[r][k[r]].min() >= pruned_alive.max()
    assert is_nm(keep, n, m)
    assert int(nm_group_counts(keep, m).max()) <= n


def test_nm_groups_run_along_input_channels_of_a_conv_weight():
    """A conv weight [out, in, kh, kw]: the groups are `in` for each (out, kh, kw) position."""
    w = torch.zeros(2, 8, 3, 3)
    # at position (out 0, kh 1, kw 2), input channels 0..3 have magnitudes 1, 4, 3, 2 and 4..7 have 5, 0, 7, 6
    w[0, :, 1, 2] = torch.tensor([1., 4., 3., 2., 5., 0.5, 7., 6.])
    keep = nm_keep_mask(w.abs(), None, 2, 4)
    assert keep[0, :, 1, 2].tolist() == [False, True, True, False, False, False, True, True]
    # every other (out, kh, kw) position is its own set of groups: 2 of each 4 kept there too
    assert (keep.sum(dim=1) == 4).all()
    # a linear weight [out, in]: groups along `in`
    lin = torch.tensor([[1., 2., 3., 4., 8., 7., 6., 5.]])
    assert nm_keep_mask(lin, None, 2, 4).tolist() == [[False, False, True, True, True, True, False, False]]


def test_nm_rows_round_trip():
    for shape in [(5, 7), (4, 6, 3), (3, 5, 2, 4), (2, 3, 1, 2, 2)]:
        w = torch.randn(shape)
        rows = nm_rows(w)
        assert rows.shape == (w.numel() // shape[1], shape[1])
        assert torch.equal(nm_unrows(rows, w.shape), w)


def test_a_short_last_group_counts_as_zero_padded():
    # 3 input channels under 2:4: one group of 3, keeps 2; under 4:8 it keeps all 3 (the layer stays dense)
    w = torch.tensor([[3., 1., 2.]])
    assert nm_keep_mask(w, None, 2, 4).tolist() == [[True, False, True]]
    assert nm_keep_mask(w, None, 4, 8).all()
    # 6 channels under 2:4: a full group and a group of 2 (both kept)
    w = torch.tensor([[1., 2., 3., 4., 0.1, 0.2]])
    assert nm_keep_mask(w, None, 2, 4).tolist() == [[False, False, True, True, True, True]]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_prune_with_a_pattern_gives_nm_masks_on_conv_and_linear_layers(pattern, criterion):
    torch.manual_seed(4)
    n, m = parse_pattern(pattern)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 24), torch.nn.Linear(24, 10))
    result = prune(model, None, 1 - n / m, pattern=pattern, criterion=criterion, seed=1)
    state = result.model.state_dict()
    for name, mask in result.masks.items():
        assert is_nm(mask, n, m) and is_nm(state[name], n, m), name
        assert torch.equal(state[name] != 0, mask), name
    # the layers whose input channels are multiples of M are exactly at 1 - N/M
    layers = sparsity(result.masks)[1]
    for name in ("2.weight", "4.weight"):
        assert layers[name] == pytest.approx(1 - n / m)
    # the first conv (3 input channels) is denser, and said to be; the linear layers (128, 24 inputs) are exact
    assert layers["0.weight"] == pytest.approx(1 - min(n, 3) / 3)
    total, _ = sparsity(result.masks)
    assert total < 1 - n / m
    assert result.removed == sum(int((~mk).sum()) for mk in result.masks.values())
    assert len(result.notes) == 1 and "0.weight (3 input channels" in result.notes[0]
    assert "5.weight" not in result.notes[0] and layers["5.weight"] == pytest.approx(1 - n / m)


def test_nm_keeps_weights_already_pruned_pruned_and_checks_the_target():
    torch.manual_seed(5)
    model = MODELS["mlp"]()
    first = prune(model, None, 0.6)
    second = prune(first.model, first.masks, 0.5, pattern="2:4")
    for name in first.masks:
        assert not (second.masks[name] & ~first.masks[name]).any()
        assert is_nm(second.masks[name], 2, 4)
    with pytest.raises(PruningError, match="0.5 of the weights"):
        prune(model, None, 0.6, pattern="2:4")
    with pytest.raises(PruningError, match="unknown sparsity pattern"):
        prune(model, None, 0.5, pattern="4:2")


def test_nm_masks_survive_masked_retraining_and_a_uniform_soup():
    from tests.workers.tiny import batches
    from workers.soup import uniform_soup
    from workers.train import train
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 16, 4))
    pruned = prune_nm(model, None, 2, 4)
    states = []
    for seed in range(2):
        m = copy.deepcopy(pruned.model)
        data = batches(seed=seed)
        train(m, data, [0.05] * (2 * len(data)), epochs=2, masks=pruned.masks, seed=seed, device=torch.device("cpu"))
        state = {k: v.detach().clone() for k, v in m.state_dict().items()}
        for name, mask in pruned.masks.items():
            assert torch.equal(state[name] != 0, mask) and is_nm(state[name], 2, 4), name
        states.append(state)
    soup = uniform_soup(states, pruned.masks)
    for name, mask in pruned.masks.items():
        assert torch.equal(soup[name] != 0, mask) and is_nm(soup[name], 2, 4), name
