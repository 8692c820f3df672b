import pytest
import torch

from tests.workers.tiny import MODELS, batches
from workers.evaluate import evaluate
from workers.pruning import prune
from workers.soup import (MaskMismatchError, average, bn_recalibrate, greedy_soup, pairwise_distances,
                          uniform_soup)
from workers.train import train

CPU = torch.device("cpu")


def ingredients(arch: str, m: int = 3, sparsity: float = 0.7, epochs: int = 2):
    """m retrained copies of one pruned parent, different seeds (batch order)."""
    torch.manual_seed(0)
    pruned = prune(MODELS[arch](), None, sparsity)
    out = []
    for seed in range(m):
        model = MODELS[arch]()
        model.load_state_dict(pruned.model.state_dict())
        data = batches(seed=seed)
        train(model, data, [0.1] * (epochs * len(data)), epochs=epochs, masks=pruned.masks, seed=seed, device=CPU)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return pruned, out


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_uniform_soup_of_shared_mask_has_exactly_that_mask(arch):
    pruned, states = ingredients(arch)
    soup = uniform_soup(states, pruned.masks)
    for name, m in pruned.masks.items():
        assert torch.equal(soup[name] != 0, m), name
    for k in soup:
        if soup[k].is_floating_point():
            torch.testing.assert_close(soup[k], sum(s[k] for s in states) / len(states))


def test_ingredient_with_another_mask_is_refused():
    pruned, states = ingredients("mlp", m=2)
    other = prune(MODELS["mlp"](), None, 0.7, criterion="random", seed=9)
    wrong = dict(states[1])
    name = next(iter(other.masks))
    wrong[name] = torch.randn_like(wrong[name]) * other.masks[name]
    with pytest.raises(MaskMismatchError, match="outside the parent's mask"):
        uniform_soup([states[0], wrong], pruned.masks)
    with pytest.raises(MaskMismatchError, match="different mask"):
        uniform_soup(states, pruned.masks, ingredient_masks=[pruned.masks, other.masks])


def test_average_keeps_integer_buffers_and_refuses_different_keys():
    _, states = ingredients("cnn", m=2)
    avg = average(states)
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(avg["1.running_mean"], (states[0]["1.running_mean"] + states[1]["1.running_mean"]) / 2)
    with pytest.raises(ValueError, match="different state keys"):
        average([states[0], {k: v for k, v in states[1].items() if k != "1.running_mean"}])


def test_bn_recalibration_changes_running_stats_not_weights():
    _, states = ingredients("cnn", m=2)
    model = MODELS["cnn"]()
    model.load_state_dict(average(states))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_recalibrate(model, batches(seed=5), fraction=0.5, device=CPU)
    after = model.state_dict()
    assert not torch.allclose(after["1.running_mean"], before["1.running_mean"])
    assert not torch.allclose(after["4.running_var"], before["4.running_var"])
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    # the new stats are the batch statistics of the first ceil(0.5 * 4) = 2 batches
    x = torch.cat([b[0] for b in batches(seed=5)[:2]])
    torch.testing.assert_close(after["1.running_mean"], model[0](x).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_greedy_soup_never_below_its_best_ingredient():
    pruned, states = ingredients("cnn", m=4, epochs=1)
    val = batches(n=128, seed=42)
    recal = batches(seed=0)

    def score(state):
        model = MODELS["cnn"]()
        model.load_state_dict(state)
        bn_recalibrate(model, recal, 0.5, device=CPU)
        return evaluate(model, val, device=CPU)["accuracy"]

    g = greedy_soup(states, pruned.masks, score)
    assert g.score >= max(g.ingredient_scores)
    assert g.chosen[0] == max(range(4), key=lambda i: g.ingredient_scores[i])
    assert score(g.state) == pytest.approx(g.score)
    for name, m in pruned.masks.items():
        assert not (g.state[name][~m]).any()


def test_pairwise_distances():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.tensor([3.0, 4.0, 0.0])}
    assert pairwise_distances([a, b, a], ["w"]) == pytest.approx([5.0, 0.0, 5.0])
