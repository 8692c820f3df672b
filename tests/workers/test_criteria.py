"""Image pruning criteria (workers.criteria): each declared once, ranked by workers.pruning and offered by
the job spec for image models only."""

import pytest
import torch

from service.spec import SpecError, parse_spec
from workers.config import TASK_OPTIONS
from workers.criteria import SCORES, lamp, magnitude
from workers.pruning import full_masks, prune, sparsity


def test_every_criterion_is_offered_to_image_jobs_and_refused_for_language_models(tiny_lm):
    assert TASK_OPTIONS["classification"].criteria == tuple(SCORES)
    for name in SCORES:
        spec = parse_spec({"name": "x", "prune": {"criterion": name}})
        assert spec.prune.criterion == name
    arch, text = tiny_lm
    only_images = [c for c in SCORES if c not in TASK_OPTIONS["causal_lm"].criteria]
    for name in only_images:
        with pytest.raises(SpecError, match=f"prune.criterion {name} is for image models; language models"):
            parse_spec({"name": "x", "model": {"arch": arch}, "data": {"name": "text", "path": text},
                        "prune": {"criterion": name}})


def test_lamp_orders_a_tensor_as_magnitude_and_its_largest_weight_scores_one():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    w[0, :5] = 0.0                                        # pruned weights score 0
    s = lamp(w, None)
    assert torch.equal(torch.argsort(s[5:], stable=True), torch.argsort(magnitude(w, None)[5:], stable=True))
    assert torch.all(s[:5] == 0) and s.max().item() == pytest.approx(1.0)
    # the formula, at one weight: w_u^2 over the squares of every weight at least as large
    sq = w.flatten().double().pow(2)
    u = 123
    assert s[u].item() == pytest.approx((sq[u] / sq[sq >= sq[u]].sum()).item(), rel=1e-6)


def test_global_lamp_keeps_every_layer_where_global_magnitude_empties_a_small_scaled_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)                        # a layer whose weights are all small in scale
    by_magnitude = prune(model, full_masks(model), 0.9, scope="global", criterion="magnitude")
    by_lamp = prune(model, full_masks(model), 0.9, scope="global", criterion="lamp")
    assert by_magnitude.masks["2.weight"].sum() == 0          # layer collapse
    assert by_lamp.masks["2.weight"].sum() > 0 and by_lamp.masks["0.weight"].sum() > 0
    assert sparsity(by_lamp.masks)[0] == pytest.approx(0.9, abs=1e-3)
    for name, mask in by_lamp.masks.items():               # the pruned copy keeps its mask's zeros exactly
        assert torch.all(dict(by_lamp.model.named_parameters())[name][~mask] == 0)
