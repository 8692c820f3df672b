"""The one-shot robustness curve on real data (scikit-learn's digits): properties, not numbers."""

import pytest
import torch
from torch import nn

from workers.classification import Classification
from workers.data import DataConfig
from workers.pruning import PruningError, prunable_names
from workers.robustness import SPARSITIES, check_sparsities, curve, one_shot, one_shot_curve
from workers.train import train

CPU = torch.device("cpu")
CHANCE = 0.1                    # digits: 10 balanced classes


def _trained(task: Classification, model: nn.Module, epochs: int = 8, lr: float = 0.05) -> nn.Module:
    loader = task.loader("train", shuffle=True)
    train(model, loader, [lr] * (epochs * len(loader)), epochs=epochs, device=CPU)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def digits():
    return Classification(arch="mlp", data=DataConfig(name="digits", batch_size=64), seed=0, device=CPU)


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    return _trained(digits, digits.build())


def bn_net() -> nn.Module:
    """A small conv net with BatchNorm for 1x8x8 digits."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def bn(digits):
    torch.manual_seed(0)
    return _trained(digits, bn_net(), epochs=6, lr=0.1)


@pytest.fixture(scope="module")
def mlp_curve(digits, mlp):
    before = _state(mlp)
    points = one_shot_curve(mlp, digits.loader("test"), digits.loader("train"), device=CPU)
    return points, before


def test_curve_shape_and_grid(mlp_curve):
    points, _ = mlp_curve
    assert [p["sparsity"] for p in points] == list(SPARSITIES)
    assert all(set(p) == {"sparsity", "accuracy"} for p in points)     # no BatchNorm: no raw accuracy
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in points)


def test_accuracy_holds_at_half_sparsity_and_falls_at_the_high_end(digits, mlp, mlp_curve):
    points, _ = mlp_curve
    acc = {p["sparsity"]: p["accuracy"] for p in points}
    dense = digits.scores(mlp)["test_accuracy"]
    assert dense > 0.85
    assert acc[0.5] > 5 * CHANCE and acc[0.5] >= dense - 0.05     # half the weights are redundant
    assert acc[0.99] < acc[0.5]
    # monotone-ish at the high end: from 0.9 on, each step loses accuracy or keeps it (within noise)
    high = [acc[s] for s in (0.9, 0.95, 0.98, 0.99)]
    assert all(b <= a + 0.03 for a, b in zip(high, high[1:]))
    assert high[-1] <= high[0]


def test_the_original_model_is_untouched(mlp, mlp_curve):
    _, before = mlp_curve
    after = mlp.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not mlp.training


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_a_pruned_copy_has_exactly_the_sparsity_asked(mlp, target):
    pruned, masks = one_shot(mlp, target)
    names = prunable_names(mlp)
    n = sum(masks[k].numel() for k in names)
    kept = sum(int(masks[k].sum()) for k in names)
    assert kept == round(n * (1 - target))
    assert sum(int((dict(pruned.named_parameters())[k] != 0).sum()) for k in names) <= kept
    # global magnitude: every kept weight is at least as large as every pruned one
    w = torch.cat([dict(mlp.named_parameters())[k].detach().abs().flatten() for k in names])
    m = torch.cat([masks[k].flatten() for k in names])
    assert w[m].min() >= w[~m].max()
    # biases are not pruned
    assert all(torch.equal(p, dict(mlp.named_parameters())[k]) for k, p in pruned.named_parameters()
               if k.endswith("bias"))


def test_batchnorm_models_are_recalibrated_and_report_the_raw_accuracy(digits, bn):
    before = _state(bn)
    points = one_shot_curve(bn, digits.loader("test"), digits.loader("train"), sparsities=(0.5, 0.9), device=CPU)
    assert [p["sparsity"] for p in points] == [0.5, 0.9]
    assert all({"accuracy", "accuracy_raw"} <= set(p) for p in points)
    assert any(p["accuracy"] != p["accuracy_raw"] for p in points)        # recalibration changed something
    # recalibration helps once pruning has shifted the activations' statistics
    assert points[-1]["accuracy"] >= points[-1]["accuracy_raw"] - 0.02
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())    # running stats too
    # without a calibration loader no recalibration, no raw accuracy
    plain = one_shot_curve(bn, digits.loader("test"), sparsities=(0.5,), device=CPU)
    assert plain == [{"sparsity": 0.5, "accuracy": points[0]["accuracy_raw"]}]


def test_the_classification_task_scores_the_test_split(digits, mlp, mlp_curve):
    out = digits.robustness(mlp, (0.5, 0.99), 0.2)
    assert out["split"] == "test"
    by = {p["sparsity"]: p["accuracy"] for p in mlp_curve[0]}
    assert [p["accuracy"] for p in out["points"]] == [by[0.5], by[0.99]]


def test_curve_takes_any_score():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 17.0).view(4, 4))
    pts = curve(model, lambda m: float((m[0].weight != 0).sum()), sparsities=(0.75, 0.25), key="alive")
    assert pts == [{"sparsity": 0.25, "alive": 12.0}, {"sparsity": 0.75, "alive": 4.0}]


def test_bad_grids_are_refused():
    assert check_sparsities([0.9, 0.5, 0.9]) == [0.5, 0.9]
    for bad in ([1.0], [-0.1], [0.5] + [i / 100 for i in range(40)]):
        with pytest.raises(PruningError):
            check_sparsities(bad)


def test_an_already_sparse_model_gets_points_only_from_its_own_sparsity_up(mlp):
    sparse, _ = one_shot(mlp, 0.7)
    pts = curve(sparse, lambda m: 1.0, sparsities=SPARSITIES)
    assert [p["sparsity"] for p in pts] == [0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
