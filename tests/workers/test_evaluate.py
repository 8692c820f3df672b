"""Evaluation figures checked against direct computations."""

import pytest
import torch

from tests.workers.tiny import MODELS, batches
from workers.evaluate import chance_level, ensemble_accuracy, evaluate

CPU = torch.device("cpu")


def test_evaluate_returns_the_softmax_in_loader_order():
    torch.manual_seed(0)
    model, data = MODELS["cnn"](), batches(n=40, batch=16)
    r = evaluate(model, data, device=CPU, probs=True)
    model.eval()
    with torch.no_grad():
        direct = torch.cat([model(x).softmax(1) for x, _ in data])
    assert torch.allclose(r["probs"], direct, atol=1e-6)
    assert r["accuracy"] == float((direct.argmax(1) == torch.cat([y for _, y in data])).float().mean())


def test_ensemble_accuracy_is_the_argmax_of_the_mean_softmax():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (300,), generator=g)
    probs = [torch.randn(300, 5, generator=g).softmax(1) for _ in range(3)]
    expected = sum(int(torch.stack([p[i] for p in probs]).mean(0).argmax() == y[i]) for i in range(300)) / 300
    assert ensemble_accuracy(probs, y) == pytest.approx(expected)
    # not the majority vote: one confident member can outvote two lukewarm ones
    y1 = torch.tensor([0])
    members = [torch.tensor([[0.98, 0.01, 0.01]]), torch.tensor([[0.30, 0.40, 0.30]]),
               torch.tensor([[0.30, 0.40, 0.30]])]
    assert ensemble_accuracy(members, y1) == 1.0


def test_chance_level_is_the_most_frequent_class_share():
    assert chance_level(torch.tensor([0, 1, 1, 2])) == 0.5
