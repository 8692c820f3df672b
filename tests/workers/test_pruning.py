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
