"""Stochastic Frank-Wolfe (workers/sfw.py): each oracle minimises ⟨g, v⟩ over its set (checked against
the set's vertices, or its closed form), the k-support norm matches its special cases, and SFW training
keeps every iterate inside its constraint set while it learns."""

import itertools
import math

import pytest
import torch
from torch import nn

from tests.workers.tiny import batches, sfw_steps_in_the_set, tiny_cnn, tiny_mlp
from workers.schedules import dense_schedule
from workers.sfw import (SFW, Constraint, SFWConfig, expected_init_norm, k_sparse_norm, k_support_norm, layer_k,
                         lmo_k_sparse, lmo_k_support, lmo_l1, lmo_l2, lmo_linf, make_constraints, make_sfw, radius_for,
                         step_size)
from workers.train import OptimizerConfig, train

TAU = 1.7


def gradients(d: int, count: int = 20, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(count)]
    if d >= 2:
        out.append(torch.tensor([3.0, -3.0] + [0.5] * (d - 2), dtype=torch.float64))   # ties
    return out


def l1_vertices(d, tau):
    for i in range(d):
        for s in (-1.0, 1.0):
            v = torch.zeros(d, dtype=torch.float64)
            v[i] = s * tau
            yield v


def linf_vertices(d, tau):
    for signs in itertools.product((-1.0, 1.0), repeat=d):
        yield tau * torch.tensor(signs, dtype=torch.float64)


def k_sparse_vertices(d, k, tau):
    """{0, ±τ}^d with exactly k nonzeros: the vertices of B_1(kτ) ∩ B_∞(τ)."""
    for support in itertools.combinations(range(d), k):
        for signs in itertools.product((-1.0, 1.0), repeat=k):
            v = torch.zeros(d, dtype=torch.float64)
            v[list(support)] = tau * torch.tensor(signs, dtype=torch.float64)
            yield v


@pytest.mark.parametrize("d", [1, 3, 5, 6])
def test_l1_lmo_is_the_best_vertex_of_the_l1_ball(d):
    for g in gradients(d):
        v = lmo_l1(g, TAU)
        best = min(float(g @ u) for u in l1_vertices(d, TAU))
        assert float(g @ v) == pytest.approx(best, abs=1e-12)
        assert float(v.abs().sum()) <= TAU + 1e-12


@pytest.mark.parametrize("d", [1, 3, 5, 6])
def test_linf_lmo_is_the_best_vertex_of_the_linf_ball(d):
    for g in gradients(d):
        v = lmo_linf(g, TAU)
        best = min(float(g @ u) for u in linf_vertices(d, TAU))
        assert float(g @ v) == pytest.approx(best, abs=1e-12)
        assert float(v.abs().max()) <= TAU + 1e-12


@pytest.mark.parametrize("d", [2, 4, 6])
def test_l2_lmo_meets_cauchy_schwarz(d):
    for g in gradients(d):
        v = lmo_l2(g, TAU)
        assert float(g @ v) == pytest.approx(-TAU * float(g.norm()), rel=1e-12)     # min over the ball
        assert float(v.norm()) == pytest.approx(TAU)
    assert torch.equal(lmo_l2(torch.zeros(3), TAU), torch.zeros(3))


@pytest.mark.parametrize("d,k", [(4, 1), (4, 2), (5, 3), (6, 2), (6, 4), (6, 6)])
def test_k_sparse_lmo_is_the_best_vertex_of_the_k_sparse_polytope(d, k):
    for g in gradients(d):
        v = lmo_k_sparse(g, k, TAU)
        best = min(float(g @ u) for u in k_sparse_vertices(d, k, TAU))
        assert float(g @ v) == pytest.approx(best, abs=1e-12)
        # feasible: in B_1(kτ) ∩ B_∞(τ), i.e. its gauge max(‖v‖∞, ‖v‖₁/k) ≤ τ
        assert float(v.abs().max()) <= TAU + 1e-12 and float(v.abs().sum()) <= k * TAU + 1e-12
        assert k_sparse_norm(v, k) <= TAU + 1e-12


def best_over_k_sparse_unit_vectors(g, k):
    """min over k-sparse v with ‖v‖₂ ≤ 1 of ⟨g, v⟩, by enumerating the supports: −max_S ‖g_S‖₂."""
    return -max(float(g[list(s)].norm()) for s in itertools.combinations(range(len(g)), k))


@pytest.mark.parametrize("d,k", [(4, 1), (4, 2), (5, 3), (6, 2), (6, 5), (6, 6)])
def test_k_support_lmo_minimises_over_the_hull_of_k_sparse_vectors(d, k):
    for g in gradients(d):
        v = lmo_k_support(g, k, TAU)
        # a linear function's minimum over a convex hull is its minimum over the generating points
        assert float(g @ v) == pytest.approx(TAU * best_over_k_sparse_unit_vectors(g, k), rel=1e-12)
        # feasible: itself k-sparse with L2 norm τ, and its k-support norm is τ
        assert int((v != 0).sum()) <= k
        assert float(v.norm()) == pytest.approx(TAU)
        assert k_support_norm(v, k) == pytest.approx(TAU, rel=1e-9)
    assert torch.equal(lmo_k_support(torch.zeros(4), 2, TAU), torch.zeros(4))


def test_k_support_norm_closed_form():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(7, generator=g, dtype=torch.float64)
        assert k_support_norm(x, 1) == pytest.approx(float(x.abs().sum()))        # k = 1: L1
        assert k_support_norm(x, 7) == pytest.approx(float(x.norm()))             # k = n: L2
        norms = [k_support_norm(x, k) for k in range(1, 8)]
        assert all(a >= b - 1e-12 for a, b in zip(norms, norms[1:]))               # shrinks as k grows
        for k in range(1, 8):
            # the dual norm is ‖top_k(u)‖₂: ⟨x, u⟩ ≤ ‖x‖_(k) ‖top_k(u)‖₂ for every u ...
            for _ in range(5):
                u = torch.randn(7, generator=g, dtype=torch.float64)
                top = u.abs().sort(descending=True).values[:k].norm()
                assert float(x @ u) <= norms[k - 1] * float(top) + 1e-9
            # ... and ‖x‖_(k) ≥ ‖x‖₂, with equality for a k-sparse x
            assert norms[k - 1] >= float(x.norm()) - 1e-12
            xs = x.clone()
            xs[xs.abs().argsort()[:7 - k]] = 0
            assert k_support_norm(xs, k) == pytest.approx(float(xs.norm()))
    # the closed form by hand for x = (3, 1, 1), k = 2: r = 0 (3 > (1 + 1) / 1 ≥ 1), sqrt(3² + (1 + 1)² / 1)
    assert k_support_norm(torch.tensor([3.0, 1.0, 1.0]), 2) == pytest.approx(math.sqrt(3 ** 2 + 2 ** 2 / 1))


def test_radius_rule_gives_every_set_the_same_l2_diameter():
    n, k, diameter = 50, 5, 4.0
    for kind in ("l1", "l2", "linf", "k_sparse", "k_support"):
        c = Constraint(kind=kind, n=n, radius=radius_for(kind, diameter, n, k), k=k)
        assert c.diameter == pytest.approx(diameter)
        # the L2 distance between the LMO's answers for g and −g is the diameter for these symmetric sets
        g = torch.randn(n, dtype=torch.float64)
        if kind in ("l1", "l2", "k_support"):
            assert float((c.lmo(g) - c.lmo(-g)).norm()) == pytest.approx(diameter)
    assert layer_k(0.05, 10) == 1 and layer_k(0.05, 1000) == 50 and layer_k(1.0, 7) == 7


def test_expected_init_norm_matches_the_layers_init_and_leaves_the_model_alone():
    torch.manual_seed(0)
    layer = nn.Linear(200, 100)
    before = layer.weight.detach().clone()
    norm = expected_init_norm(layer, "weight", layer.weight, repetitions=20)
    assert torch.equal(layer.weight, before)
    # kaiming_uniform(a=√5): U(−1/√fan_in, 1/√fan_in), E‖W‖² = n / (3 fan_in)
    assert norm == pytest.approx(math.sqrt(200 * 100 / (3 * 200)), rel=0.02)
    bn = nn.BatchNorm1d(8)
    assert expected_init_norm(bn, "bias", bn.bias) == 1.0                        # zero init counts as 1
    assert expected_init_norm(bn, "weight", bn.weight) == pytest.approx(math.sqrt(8))


def test_every_parameter_gets_its_own_constraint():
    model = tiny_cnn()
    cfg = SFWConfig(constraint="k_support", k=0.1, radius_factor=3.0)
    cons = make_constraints(model, cfg)
    assert set(cons) == {n for n, _ in model.named_parameters()}           # weights, biases, BatchNorm
    for name, p in model.named_parameters():
        assert cons[name].n == p.numel() and cons[name].k == layer_k(0.1, p.numel())


@pytest.mark.parametrize("constraint", ["k_support", "l1", "l2", "linf", "k_sparse"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_sfw_iterates_stay_feasible_and_the_model_learns(constraint, arch):
    torch.manual_seed(0)
    model = tiny_mlp() if arch == "mlp" else tiny_cnn()
    data = batches(n=128, batch=16)
    cfg = SFWConfig(constraint=constraint, k=0.2, radius_factor=2.0 if constraint != "linf" else 5.0)
    opt = make_sfw(model, list(model.parameters()), cfg)
    losses = sfw_steps_in_the_set(model, opt, data, 150 if arch == "mlp" else 100)      # θ ∈ C after every step
    # it learns (the L1 ball moves one coordinate per tensor and step: slowly)
    assert sum(losses[-10:]) / 10 < (0.95 if constraint == "l1" else 0.8) * sum(losses[:10]) / 10


def test_starting_point_outside_the_set_is_scaled_onto_it():
    model = tiny_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100)
    opt = make_sfw(model, list(model.parameters()), SFWConfig(constraint="l1", radius_factor=1.0))
    for gr in opt.param_groups:
        c = SFW.constraint_of(gr)
        assert c.norm(gr["params"][0].detach()) == pytest.approx(c.radius, rel=1e-5)


def test_step_size_rules():
    c = Constraint(kind="l2", n=4, radius=1.0)
    theta, d = torch.tensor([0.5, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])
    v = c.lmo(d)
    # gradient rescaling: lr ‖d‖ / ‖θ − v‖, clamped to 1
    assert step_size("gradient", 0.1, d, theta, v, c) == pytest.approx(0.1 * 2.0 / float((theta - v).norm()))
    assert step_size("gradient", 10.0, d, theta, v, c) == 1.0
    assert step_size("diameter", 0.1, d, theta, v, c) == pytest.approx(0.1 / 2.0)
    assert step_size("none", 0.3, d, theta, v, c) == pytest.approx(0.3)
    assert step_size("none", 3.0, d, theta, v, c) == 1.0


def test_train_with_sfw_on_a_schedule_and_resume_state_is_json_friendly():
    import json
    torch.manual_seed(0)
    model = tiny_cnn()
    data = batches(n=128, batch=16)
    epochs = 6
    cfg = OptimizerConfig(name="sfw", sfw=SFWConfig(constraint="k_support", k=0.2, radius_factor=5.0))
    result = train(model, data, dense_schedule("linear", 0.3, epochs * len(data), 0.05), epochs=epochs,
                   optimizer=cfg, device=torch.device("cpu"))
    assert result.history[-1]["train_accuracy"] > 0.6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    opt = result.optimizer
    assert isinstance(opt, SFW)
    for gr in opt.param_groups:
        c = SFW.constraint_of(gr)
        assert c.norm(gr["params"][0].detach()) <= c.radius * (1 + 1e-5)
    json.dumps(opt.state_dict()["param_groups"])       # the epoch checkpoint stores them as metadata
    assert cfg.describe() == {"name": "sfw", "constraint": "k_support", "k": 0.2, "radius_factor": 5.0,
                              "momentum": 0.9, "rescale": "gradient"}


def test_sfw_config_rejects_bad_values():
    with pytest.raises(ValueError, match="constraint"):
        SFWConfig(constraint="l3")
    with pytest.raises(ValueError, match="rescale"):
        SFWConfig(rescale="adam")
    with pytest.raises(ValueError, match="k"):
        SFWConfig(k=0)
