"""Group constraints of SFW (workers/sfw.py: group_k_support, group_l1): the oracles minimise ⟨G, v⟩ over
the group balls and land on their boundary with exactly k filters, the group norms match their special
cases, SFW keeps a conv net inside the balls, and (the point of them) a CNN trained under group_k_support
loses less accuracy than one trained under k_support when half of every conv layer's filters are removed."""

import itertools

import pytest
import torch
from torch import nn

from tests.workers.tiny import batches, sfw_steps_in_the_set, tiny_cnn
from workers.config import CONSTRAINTS, GROUP_CONSTRAINTS
from workers.sfw import (SFW, Constraint, SFWConfig, constraint_kind, group_k, group_k_support_norm, group_l1_norm,
                         group_norms, k_support_norm, layer_k, lmo_group_k_support, lmo_group_l1, make_constraints,
                         make_sfw, radius_for)

TAU = 1.3
SHAPES = [(5, 3, 2, 2), (6, 4), (4, 1, 3, 3)]       # conv weights (out, in, kh, kw) and a linear weight (out, in)


def gradients(shape, count=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(count)]


def support(v):
    """The groups (output filters / rows) where v is nonzero."""
    return {i for i in range(v.shape[0]) if bool(v[i].ne(0).any())}


def best_over_k_group_unit_vectors(g, k):
    """min over x supported on k groups with ‖x‖₂ ≤ 1 of ⟨g, x⟩, by enumerating the supports: −max_S ‖g_S‖₂."""
    return -max(float(g[list(s)].norm()) for s in itertools.combinations(range(g.shape[0]), k))


def random_feasible(shape, k, tau, gen, count=30):
    """Points of the group k-support ball of radius τ: vertices (k random groups, random direction, ‖x‖₂ = τ),
    their random convex combinations, and random dense tensors scaled onto the boundary."""
    m = shape[0]
    vertices = []
    for _ in range(count):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        groups = torch.randperm(m, generator=gen)[:k]
        mask = torch.zeros(m, dtype=torch.bool)
        mask[groups] = True
        x = x * mask.view(-1, *([1] * (len(shape) - 1)))
        vertices.append(tau * x / x.norm())
    points = list(vertices)
    for _ in range(count):
        w = torch.rand(len(vertices), generator=gen, dtype=torch.float64)
        points.append(sum(wi * v for wi, v in zip(w / w.sum(), vertices)))
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        points.append(tau * x / group_k_support_norm(x, k))
    return points


@pytest.mark.parametrize("shape", SHAPES)
def test_group_k_support_lmo_is_a_boundary_point_on_k_filters_and_the_minimiser(shape):
    gen = torch.Generator().manual_seed(1)
    for k in range(1, shape[0] + 1):
        feasible = random_feasible(shape, k, TAU, gen)
        for g in gradients(shape):
            v = lmo_group_k_support(g, k, TAU)
            assert v.shape == g.shape
            # on the ball's boundary, supported on exactly k filters (the k of largest gradient norm)
            assert group_k_support_norm(v, k) == pytest.approx(TAU, rel=1e-9)
            assert float(v.norm()) == pytest.approx(TAU, rel=1e-12)
            assert support(v) == set(group_norms(g).topk(k).indices.tolist())
            # the minimum of a linear function over the hull is over its generators: −τ max_S ‖g_S‖₂ ...
            value = float((g * v).sum())
            assert value == pytest.approx(TAU * best_over_k_group_unit_vectors(g, k), rel=1e-12)
            assert value == pytest.approx(-TAU * float(group_norms(g).sort(descending=True).values[:k].norm()))
            # ... and no feasible point does better
            assert all(value <= float((g * u).sum()) + 1e-9 for u in feasible)
            assert all(group_k_support_norm(u, k) <= TAU * (1 + 1e-9) for u in feasible)
    assert torch.equal(lmo_group_k_support(torch.zeros(shape), 2, TAU), torch.zeros(shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_group_l1_lmo_moves_the_single_filter_of_largest_gradient(shape):
    gen = torch.Generator().manual_seed(2)
    feasible = random_feasible(shape, 1, TAU, gen)
    for g in gradients(shape):
        v = lmo_group_l1(g, TAU)
        i = int(group_norms(g).argmax())
        assert support(v) == {i}
        assert torch.allclose(v[i], -TAU * g[i] / g[i].norm())
        assert group_l1_norm(v) == pytest.approx(TAU)
        value = float((g * v).sum())
        assert value == pytest.approx(-TAU * float(g[i].norm()))
        assert all(value <= float((g * u).sum()) + 1e-9 for u in feasible)
        assert torch.equal(v, Constraint(kind="group_l1", n=g.numel(), radius=TAU).lmo(g))


def test_group_norms_and_their_special_cases():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
        nu = x.flatten(1).norm(dim=1)
        assert torch.allclose(group_norms(x), nu)
        assert group_k_support_norm(x, 1) == pytest.approx(float(nu.sum()))          # k = 1: group L1
        assert group_l1_norm(x) == pytest.approx(float(nu.sum()))
        assert group_k_support_norm(x, 6) == pytest.approx(float(x.norm()))           # k = m: L2
        norms = [group_k_support_norm(x, k) for k in range(1, 7)]
        assert all(a >= b - 1e-12 for a, b in zip(norms, norms[1:]))                   # shrinks as k grows
        for k in range(1, 7):
            assert norms[k - 1] == pytest.approx(k_support_norm(nu, k))
            # the dual norm is ‖top_k(ν(u))‖₂: ⟨x, u⟩ ≤ ‖x‖ ‖top_k(ν(u))‖₂
            u = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
            top = group_norms(u).sort(descending=True).values[:k].norm()
            assert float((x * u).sum()) <= norms[k - 1] * float(top) + 1e-9
            # a tensor on k filters: the group k-support norm is its L2 norm
            xs = x.clone()
            xs[nu.argsort()[:6 - k]] = 0
            assert group_k_support_norm(xs, k) == pytest.approx(float(xs.norm()))
    # a 1-D tensor is groups of one entry: the per-entry norms
    v = torch.randn(7, generator=gen, dtype=torch.float64)
    assert group_k_support_norm(v, 3) == pytest.approx(k_support_norm(v, 3))
    assert group_l1_norm(v) == pytest.approx(float(v.abs().sum()))
    assert torch.allclose(lmo_group_k_support(v, 1, TAU), Constraint(kind="l1", n=7, radius=TAU).lmo(v))


def test_k_counts_groups_and_the_radius_gives_the_common_diameter():
    assert [group_k(0.5, 5), group_k(0.05, 10), group_k(0.04, 10), group_k(0.3, 16), group_k(1.0, 7)] == [3, 1, 1, 5, 7]
    n, diameter = 5 * 3 * 2 * 2, 4.0
    g = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    for kind, k in (("group_k_support", 2), ("group_l1", 1)):
        c = Constraint(kind=kind, n=n, radius=radius_for(kind, diameter, n, k), k=k)
        assert c.radius == pytest.approx(diameter / 2) and c.diameter == pytest.approx(diameter)
        assert float((c.lmo(g) - c.lmo(-g)).norm()) == pytest.approx(diameter)     # two boundary points 2τ apart
    assert set(GROUP_CONSTRAINTS) <= set(CONSTRAINTS)


def test_weights_are_grouped_by_output_channel_and_small_tensors_get_the_per_entry_kind():
    model = tiny_cnn()
    for kind, entry_kind in GROUP_CONSTRAINTS.items():
        cons = make_constraints(model, SFWConfig(constraint=kind, k=0.5, radius_factor=3.0))
        assert set(cons) == {n for n, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            c = cons[name]
            assert c.n == p.numel()
            if p.dim() >= 2:        # conv weights (6 and 8 filters) and the classifier's rows (4)
                assert (c.kind, c.k) == (kind, group_k(0.5, p.shape[0]))
            else:                   # BatchNorm weights and biases, the conv / linear biases
                assert (c.kind, c.k) == (entry_kind, layer_k(0.5, p.numel()))
        assert constraint_kind(kind, model[0].weight) == (kind, 6)
        assert constraint_kind(kind, model[1].bias) == (entry_kind, 6)
    assert constraint_kind("k_support", model[0].weight) == ("k_support", 54)


def test_unknown_kinds_are_refused():
    c = Constraint(kind="group_linf", n=4, radius=1.0)
    for call in (lambda: c.lmo(torch.ones(2, 2)), lambda: c.norm(torch.ones(2, 2)),
                 lambda: radius_for("group_linf", 1.0, 4, 1), lambda: SFWConfig(constraint="group_linf")):
        with pytest.raises(ValueError, match="unknown SFW constraint 'group_linf'; known: .*group_k_support"):
            call()


@pytest.mark.parametrize("constraint", list(GROUP_CONSTRAINTS))
def test_sfw_iterates_stay_in_the_group_balls(constraint):
    torch.manual_seed(0)
    model = tiny_cnn()
    with torch.no_grad():
        model[0].weight.mul_(50)          # outside its ball at first: scaled onto it
    data = batches(n=128, batch=16)
    opt = make_sfw(model, list(model.parameters()), SFWConfig(constraint=constraint, k=0.5, radius_factor=2.0))
    params = [(p, SFW.constraint_of(gr)) for gr in opt.param_groups for p in gr["params"]]
    c0 = dict(params)[model[0].weight]
    assert c0.kind == constraint and c0.norm(model[0].weight.detach().double()) == pytest.approx(c0.radius, rel=1e-6)
    losses = sfw_steps_in_the_set(model, opt, data, 60)
    assert sum(losses[-10:]) < sum(losses[:10])          # it learns


# -- robustness to the pruning of whole filters, on scikit-learn's 8x8 digits

def digits_split():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def two_conv_net():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_sfw(constraint, seed, train, steps=1000, lr=0.3, batch=32):
    """SFW (k = 0.5, radius factor 10, gradient rescaling) for `steps` minibatch steps, LR decaying linearly
    from `lr` to 0; the same seed gives the same initial weights and batches for every constraint."""
    x, y = train
    torch.manual_seed(seed)
    model = two_conv_net()
    opt = make_sfw(model, list(model.parameters()), SFWConfig(constraint=constraint, k=0.5, radius_factor=10.0))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        for gr in opt.param_groups:
            gr["lr"] = lr * (1 - step / steps)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def removed_norm_share(model):
    """Σ over the conv layers of the share of the layer's total filter norm Σ_i ‖W_i‖₂ held by its weaker half."""
    out = 0.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            norms = group_norms(m.weight.detach()).sort().values
            out += float(norms[:len(norms) // 2].sum() / norms.sum())
    return out


def test_group_k_support_makes_a_cnn_robust_to_removing_half_of_its_filters():
    from workers.structured import prune_channels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, (x_test, y_test) = digits_split()
        drop, pruned_acc, removed = {}, {}, {}
        for constraint in ("k_support", "group_k_support"):
            drops, accs, shares = [], [], []
            for seed in range(3):
                model = train_sfw(constraint, seed, train)
                dense = accuracy(model, x_test, y_test)
                pruned = prune_channels(model, None, 0.5, example_input=x_test[:2], scope="layerwise").model
                for m in (m for m in pruned.modules() if isinstance(m, nn.Conv2d)):   # half of each conv's filters gone
                    assert int((group_norms(m.weight) == 0).sum()) == m.out_channels // 2
                acc = accuracy(pruned, x_test, y_test)
                assert dense > 0.85, (constraint, seed, dense)                         # both train
                drops.append(dense - acc)
                accs.append(acc)
                shares.append(removed_norm_share(model))
            drop[constraint], pruned_acc[constraint] = sum(drops) / 3, sum(accs) / 3
            removed[constraint] = shares
    finally:
        torch.set_num_threads(threads)
    # observed (seeds 0-2, test accuracy dense -> pruned): k_support 0.962 -> 0.887, 0.965 -> 0.947, 0.965 -> 0.929;
    # group_k_support 0.965 -> 0.965, 0.950 -> 0.950, 0.962 -> 0.960
    assert drop["group_k_support"] < 0.01
    assert drop["k_support"] > drop["group_k_support"] + 0.015
    assert pruned_acc["group_k_support"] > pruned_acc["k_support"]
    # the weaker half of the filters holds far less of the filter norm (observed 0.015 / 0.028 / 0.031
    # against 0.158 / 0.142 / 0.197)
    assert all(g < 0.5 * k for g, k in zip(removed["group_k_support"], removed["k_support"])), removed
