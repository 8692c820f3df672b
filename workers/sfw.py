"""Compression-aware dense training with Stochastic Frank-Wolfe (Zimmer, Spiegel, Pokutta, arXiv 2205.11921).

Instead of stepping along the negative gradient, SFW keeps every parameter tensor θ inside a convex
constraint set C and moves it towards the point of C that the (momentum-averaged) gradient d favours most:

    v = LMO_C(d) = argmin_{v ∈ C} ⟨d, v⟩            (linear minimisation oracle)
    θ ← θ + γ (v − θ) = (1 − γ) θ + γ v             (a convex combination: θ stays in C)

A constraint set whose vertices are sparse (the k-support norm ball, the k-sparse polytope, the L1 ball)
pulls the weights towards a few large entries and many small ones, so magnitude pruning afterwards
removes little: the trained dense model is robust to pruning.

Constraint sets (per parameter tensor, n entries, radius τ, g the tensor's direction d):

    l1          {‖v‖₁ ≤ τ}:   v = −τ · sign(g_i*) e_i*,  i* = argmax_i |g_i|
    l2          {‖v‖₂ ≤ τ}:   v = −τ · g / ‖g‖₂                       (0 when g = 0)
    linf        {‖v‖∞ ≤ τ}:   v = −τ · sign(g)
    k_sparse    {‖v‖₁ ≤ k τ} ∩ {‖v‖∞ ≤ τ}, the convex hull of the vectors with k entries ±τ and the rest 0:
                v_i = −τ · sign(g_i) on the k largest |g_i|, 0 elsewhere
    k_support   the k-support norm ball of radius τ (Argyriou et al. 2012), the convex hull of the
                k-sparse vectors with ‖v‖₂ ≤ τ:   v = −τ · top_k(g) / ‖top_k(g)‖₂  (top_k keeps the k
                largest |g_i|, zeroes the rest; 0 when g = 0);  min ⟨g, v⟩ = −τ ‖top_k(g)‖₂

Group constraints (robustness to the pruning of whole filters / output channels, the paper's "group
k-support norm"): a conv or linear weight W of shape (m, …) is m groups, its output channels / rows W_1 … W_m
(W_i = W[i], the slice that structured pruning removes with channel i, workers.structured). With
ν(W) = (‖W_1‖₂, …, ‖W_m‖₂) the vector of group norms and G_S the gradient G with every group outside S zeroed:

    group_k_support   ‖W‖_(k),group = ‖ν(W)‖_(k), the k-support norm of the group norms; its ball of radius τ
                      is the convex hull of the W supported on at most k groups with ‖W‖₂ ≤ τ:
                      v = −τ · G_S / ‖G_S‖₂,  S = the k groups with the largest ‖G_i‖₂ (0 when G = 0);
                      min ⟨G, v⟩ = −τ ‖G_S‖₂ = −τ ‖top_k(ν(G))‖₂
    group_l1          Σ_i ‖W_i‖₂ ≤ τ (group_k_support with k = 1), the convex hull of the single-group W with
                      ‖W‖₂ ≤ τ:  v = −τ · G_i* / ‖G_i*‖₂ on the group i* = argmax_i ‖G_i‖₂, 0 elsewhere

A vertex moves k whole filters at once and leaves the others alone, so SFW concentrates the weight on a
few filters and the rest shrink towards 0 (by the factors 1 − γ): removing the smallest filters then
changes little. A tensor with fewer than 2 dimensions (a bias, a BatchNorm weight or bias) has no
filters: it gets the per-entry kind (group_k_support → k_support, group_l1 → l1) with the per-entry k,
which is what grouping its entries one by one would give.

Radius rule (the reference's "initialization" mode): every constraint of a tensor gets the same L2
diameter D = 2 · radius_factor · ‖θ_init‖₂, where ‖θ_init‖₂ is the expected L2 norm of the tensor under
its layer's default initialisation (the mean over `INIT_REPETITIONS` re-initialisations of a copy of
the layer with `reset_parameters`; a tensor initialised to zero, e.g. a BatchNorm bias, counts as 1;
a layer without `reset_parameters` uses the tensor's actual norm). The radius τ that gives diameter D:

    l1, l2, k_support, group_k_support, group_l1:  τ = D / 2
    linf:  τ = D / (2 √n)        k_sparse:  τ = D / (2 √k)

(the group balls lie in the L2 ball of radius τ, since ‖W‖_(k),group ≥ ‖ν(W)‖₂ = ‖W‖₂, and contain ±τ W/‖W‖₂
for any single-group W: their L2 diameter is 2τ, as for k_support).

k is the fraction `k` of the tensor's entries, k = max(1, ⌊k · n⌋); for the group constraints the fraction
of the weight's m groups, k = max(1, min(round(k · m), m)) (halves round up).
A group k is best about the share of channels meant to survive the pruning (k = 0.5 for removing half):
the default 0.05 makes most vertices single filters, and SFW then trains slowly.

Which parameters: as in the reference, every parameter tensor of every layer (conv and linear weights,
their biases, and the BatchNorm weights and biases) has its own constraint set of its own size. The
starting point is made feasible once (a tensor outside its set is scaled by τ / ‖θ‖_C, the reference's
`shift_inside`); afterwards every iterate is a convex combination of feasible points.
Under a group kind every weight with at least 2 dimensions (conv and linear, the classifier included) is
grouped by its output channels / rows, since workers.structured prunes the rows of hidden linear layers as
well as conv filters; the reference's structured setting groups only Conv2d weights and puts every other
tensor in an L2 ball.

Step size (per tensor, lr = the schedule's learning rate at this step, clamped to [0, 1]):

    gradient    γ = min(lr · ‖d‖₂ / ‖θ − v‖₂, 1)     the paper's gradient rescaling: the step is as long as
                                                      an SGD step of length lr · ‖d‖ would be
    diameter    γ = min(lr / D, 1)
    none        γ = min(lr, 1)

Momentum (the reference's, without dampening): d ← μ d + ∇ (d = ∇ at the first step). SFW has no
weight decay: the constraint set is the regulariser.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from workers.config import CONSTRAINTS, GROUP_CONSTRAINTS, RESCALES, SFWConfig  # noqa: F401  (torch-free: the driver and the API use them)

INIT_REPETITIONS = 10        # re-initialisations averaged for a layer's expected init norm
TOLERANCE = 1e-12


# -- linear minimisation oracles: v = argmin_{v ∈ C} ⟨g, v⟩, same shape as g

def lmo_l1(g: Tensor, radius: float) -> Tensor:
    """L1 ball {‖v‖₁ ≤ τ}: v = −τ · sign(g_i*) e_i* at i* = argmax |g_i| (a vertex ±τ e_i)."""
    flat = g.flatten()
    v = torch.zeros_like(flat)
    i = int(flat.abs().argmax())
    v[i] = -radius * torch.sign(flat[i])
    return v.view_as(g)


def lmo_l2(g: Tensor, radius: float) -> Tensor:
    """L2 ball {‖v‖₂ ≤ τ}: v = −τ g / ‖g‖₂ (0 for g = 0)."""
    norm = float(g.norm())
    return -radius * g / norm if norm > TOLERANCE else torch.zeros_like(g)


def lmo_linf(g: Tensor, radius: float) -> Tensor:
    """L∞ ball {‖v‖∞ ≤ τ}: v = −τ sign(g) (entries with g_i = 0 may be anything in [−τ, τ]; 0 here)."""
    return -radius * torch.sign(g)


def _top_k(g: Tensor, k: int) -> Tensor:
    """g with all but its k largest-magnitude entries set to 0 (flat)."""
    flat = g.flatten()
    out = torch.zeros_like(flat)
    idx = flat.abs().topk(min(k, flat.numel())).indices
    out[idx] = flat[idx]
    return out


def lmo_k_sparse(g: Tensor, k: int, radius: float) -> Tensor:
    """k-sparse polytope {‖v‖₁ ≤ k τ} ∩ {‖v‖∞ ≤ τ}: v_i = −τ sign(g_i) on the k largest |g_i|, 0 elsewhere."""
    return (-radius * torch.sign(_top_k(g, k))).view_as(g)


def group_norms(x: Tensor) -> Tensor:
    """ν(x) = (‖x_1‖₂, …, ‖x_m‖₂): the L2 norm of every slice x[i] along dim 0 (a 1-D or 0-D tensor: |x_i|)."""
    return x.reshape(x.shape[0] if x.dim() else 1, -1).norm(dim=1)


def lmo_group_k_support(g: Tensor, k: int, radius: float) -> Tensor:
    """Group k-support norm ball of radius τ over the slices g[i] (convex hull of the x supported on at most
    k slices with ‖x‖₂ ≤ τ): v = −τ g_S / ‖g_S‖₂, S = the k slices of largest ‖g_i‖₂ (0 for g = 0);
    then ⟨g, v⟩ = −τ ‖top_k(ν(g))‖₂."""
    norms = group_norms(g)
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep[norms.topk(min(k, norms.numel())).indices] = True
    top = g * keep.view(-1, *([1] * (g.dim() - 1))) if g.dim() else g
    norm = float(top.norm())
    return -radius * top / norm if norm > TOLERANCE else torch.zeros_like(g)


def lmo_group_l1(g: Tensor, radius: float) -> Tensor:
    """Group-L1 ball {Σ_i ‖v_i‖₂ ≤ τ}: v = −τ g_i* / ‖g_i*‖₂ on the slice i* of largest ‖g_i‖₂, 0 elsewhere."""
    return lmo_group_k_support(g, 1, radius)


def lmo_k_support(g: Tensor, k: int, radius: float) -> Tensor:
    """k-support norm ball of radius τ (convex hull of k-sparse vectors with ‖v‖₂ ≤ τ):
    v = −τ top_k(g) / ‖top_k(g)‖₂ (0 for g = 0); then ⟨g, v⟩ = −τ ‖top_k(g)‖₂."""
    top = _top_k(g, k)
    norm = float(top.norm())
    return (-radius * top / norm).view_as(g) if norm > TOLERANCE else torch.zeros_like(g)


# -- the norms whose unit balls these are (for feasibility)

def k_sparse_norm(x: Tensor, k: int) -> float:
    """The gauge of the k-sparse polytope: max(‖x‖∞, ‖x‖₁ / k)."""
    return max(float(x.abs().max()), float(x.abs().sum()) / k) if x.numel() else 0.0


def k_support_norm(x: Tensor, k: int) -> float:
    """The k-support norm (Argyriou, Foygel, Srebro 2012, Prop. 2.1): with |x| sorted decreasingly
    z_1 ≥ … ≥ z_n (z_0 = +∞) and r ∈ {0, …, k−1} the unique index with
    z_{k−r−1} > (1/(r+1)) Σ_{i=k−r}^{n} z_i ≥ z_{k−r}:
        ‖x‖ = sqrt( Σ_{i=1}^{k−r−1} z_i² + (1/(r+1)) (Σ_{i=k−r}^{n} z_i)² ).
    k = 1 gives ‖x‖₁, k = n gives ‖x‖₂."""
    z = x.detach().flatten().abs().double().sort(descending=True).values
    n = z.numel()
    k = min(k, n)
    if n == 0 or float(z[0]) == 0.0:
        return 0.0
    tail = z.flip(0).cumsum(0).flip(0)            # tail[j] = Σ_{i ≥ j} z_i (0-based)
    head_sq = torch.cat([z.new_zeros(1), (z * z).cumsum(0)])   # head_sq[j] = Σ_{i < j} z_i²
    r = torch.arange(k, dtype=torch.float64, device=z.device)   # r = 0 .. k−1
    j = k - 1 - torch.arange(k, device=z.device)                # 0-based index of z_{k−r}
    mean = tail[j] / (r + 1)
    before = torch.where(j > 0, z[(j - 1).clamp(min=0)], torch.full_like(mean, math.inf))
    # how far each r is from satisfying z_{k−r−1} > mean ≥ z_{k−r} (0: it does); the first best r wins
    violation = torch.stack([torch.zeros_like(mean), z[j] - mean, mean - before]).amax(0)
    best = int(violation.argmin())
    return math.sqrt(float(head_sq[j[best]]) + float(tail[j[best]]) ** 2 / (best + 1))


def group_k_support_norm(x: Tensor, k: int) -> float:
    """The group k-support norm over the slices x[i]: the k-support norm of ν(x) = (‖x_1‖₂, …, ‖x_m‖₂).
    k = 1 gives the group-L1 norm Σ_i ‖x_i‖₂, k = m gives ‖x‖₂."""
    return k_support_norm(group_norms(x.detach().double()), k) if x.numel() else 0.0


def group_l1_norm(x: Tensor) -> float:
    """Σ_i ‖x_i‖₂ over the slices x[i]."""
    return float(group_norms(x.detach().double()).sum()) if x.numel() else 0.0


@dataclass(frozen=True)
class Constraint:
    """One tensor's constraint set: `kind`, its size `n` (entries), `k` (k-sparse / k-support: entries;
    group_k_support: groups, the slices along dim 0) and radius τ."""
    kind: str
    n: int
    radius: float
    k: int = 1

    def lmo(self, g: Tensor) -> Tensor:
        if self.kind == "l1":
            return lmo_l1(g, self.radius)
        if self.kind == "l2":
            return lmo_l2(g, self.radius)
        if self.kind == "linf":
            return lmo_linf(g, self.radius)
        if self.kind == "k_sparse":
            return lmo_k_sparse(g, self.k, self.radius)
        if self.kind == "k_support":
            return lmo_k_support(g, self.k, self.radius)
        if self.kind == "group_k_support":
            return lmo_group_k_support(g, self.k, self.radius)
        if self.kind == "group_l1":
            return lmo_group_l1(g, self.radius)
        raise ValueError(f"unknown SFW constraint {self.kind!r}; known: {', '.join(CONSTRAINTS)}")

    def norm(self, x: Tensor) -> float:
        """The gauge of the set's unit-radius version: x ∈ C ⇔ norm(x) ≤ radius."""
        if self.kind == "l1":
            return float(x.abs().sum())
        if self.kind == "l2":
            return float(x.norm())
        if self.kind == "linf":
            return float(x.abs().max()) if x.numel() else 0.0
        if self.kind == "k_sparse":
            return k_sparse_norm(x, self.k)
        if self.kind == "k_support":
            return k_support_norm(x, self.k)
        if self.kind == "group_k_support":
            return group_k_support_norm(x, self.k)
        if self.kind == "group_l1":
            return group_l1_norm(x)
        raise ValueError(f"unknown SFW constraint {self.kind!r}; known: {', '.join(CONSTRAINTS)}")

    @property
    def diameter(self) -> float:
        """The set's L2 diameter: 2τ (l1, l2, k_support, group_k_support, group_l1), 2τ√n (linf), 2τ√k (k_sparse)."""
        return 2 * self.radius * {"linf": math.sqrt(self.n), "k_sparse": math.sqrt(self.k)}.get(self.kind, 1.0)


def layer_k(fraction: float, n: int) -> int:
    """k = max(1, min(⌊fraction · n⌋, n))."""
    return max(1, min(int(fraction * n), n))


def group_k(fraction: float, groups: int) -> int:
    """k of a group constraint: max(1, min(round(fraction · groups), groups)), halves rounding up."""
    return max(1, min(math.floor(fraction * groups + 0.5), groups))


def radius_for(kind: str, diameter: float, n: int, k: int) -> float:
    """The radius τ of a `kind` set with L2 diameter `diameter` (module docstring): D / (2√n) for linf,
    D / (2√k) for k_sparse, D / 2 for l1, l2, k_support, group_k_support and group_l1."""
    if kind not in CONSTRAINTS:
        raise ValueError(f"unknown SFW constraint {kind!r}; known: {', '.join(CONSTRAINTS)}")
    if kind == "linf":
        return diameter / (2 * math.sqrt(n))
    if kind == "k_sparse":
        return diameter / (2 * math.sqrt(k))
    return diameter / 2


def constraint_kind(kind: str, param: Tensor) -> tuple[str, int]:
    """(the kind `param` gets under the configured `kind`, the number of units its k counts): a group kind
    keeps a weight with at least 2 dimensions (its groups: param.shape[0]); a smaller tensor gets the per-entry
    kind (module docstring); other kinds count entries."""
    if kind in GROUP_CONSTRAINTS:
        if param.dim() >= 2:
            return kind, param.shape[0]
        return GROUP_CONSTRAINTS[kind], param.numel()
    return kind, param.numel()


@torch.no_grad()
def expected_init_norm(module: nn.Module, name: str, param: Tensor, repetitions: int = INIT_REPETITIONS) -> float:
    """The mean L2 norm of `module`'s parameter `name` over `repetitions` default re-initialisations of a
    copy of the module (the model and the global random stream are untouched); 1 when that is 0
    (zero-initialised tensors); the parameter's actual norm when the module has no `reset_parameters`."""
    if not hasattr(module, "reset_parameters") or not isinstance(module, nn.Module):
        norm = float(param.norm())
    else:
        twin = copy.deepcopy(module)
        total = 0.0
        with torch.random.fork_rng(devices=[]):       # the caller's random stream is left as it was
            for _ in range(repetitions):
                twin.reset_parameters()
                total += float(getattr(twin, name).norm())
        norm = total / repetitions
    return norm if norm > 0 else 1.0


def make_constraints(model: nn.Module, cfg: SFWConfig, only: Iterable[nn.Parameter] | None = None,
                     repetitions: int = INIT_REPETITIONS) -> dict[str, Constraint]:
    """Per parameter tensor of `model` (restricted to `only` when given): its constraint set, with
    diameter 2 · radius_factor · expected init norm (module docstring); under a group kind the tensors
    with fewer than 2 dimensions get the per-entry kind (`constraint_kind`)."""
    keep = None if only is None else {id(p) for p in only}
    out: dict[str, Constraint] = {}
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if keep is not None and id(p) not in keep:
                continue
            n = p.numel()
            kind, units = constraint_kind(cfg.constraint, p)
            k = group_k(cfg.k, units) if kind in GROUP_CONSTRAINTS else layer_k(cfg.k, units)
            diameter = 2 * cfg.radius_factor * expected_init_norm(module, pname, p, repetitions)
            full = f"{mod_name}.{pname}" if mod_name else pname
            out[full] = Constraint(kind=kind, n=n, radius=radius_for(kind, diameter, n, k), k=k)
    return out


class SFW(torch.optim.Optimizer):
    """Stochastic Frank-Wolfe over one constraint set per parameter tensor (module docstring).

    Each param group holds one tensor and its constraint as plain values (`constraint`, `n`, `k`,
    `radius`), so that the optimizer's state_dict stays JSON-friendly; `lr` is set per step by the
    caller's schedule. `make_feasible` (default on) scales a starting tensor that lies outside its set
    onto the set's boundary."""

    def __init__(self, params: list[tuple[nn.Parameter, Constraint]], lr: float = 0.1, momentum: float = 0.9,
                 rescale: str = "gradient", make_feasible: bool = True):
        if rescale not in RESCALES:
            raise ValueError(f"unknown SFW rescale {rescale!r}; known: {', '.join(RESCALES)}")
        if not 0 <= momentum < 1:
            raise ValueError(f"SFW momentum must be in [0, 1), got {momentum}")
        groups = [{"params": [p], "constraint": c.kind, "n": c.n, "k": c.k, "radius": c.radius} for p, c in params]
        super().__init__(groups, dict(lr=lr, momentum=momentum, rescale=rescale))
        if make_feasible:
            self.make_feasible()

    @staticmethod
    def constraint_of(group: dict) -> Constraint:
        return Constraint(kind=group["constraint"], n=group["n"], radius=group["radius"], k=group["k"])

    @torch.no_grad()
    def make_feasible(self) -> None:
        for group in self.param_groups:
            c = self.constraint_of(group)
            for p in group["params"]:
                norm = c.norm(p)
                if norm > c.radius:
                    p.mul_(c.radius / norm)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            c = self.constraint_of(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["momentum"] > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                v = c.lmo(d)
                gamma = step_size(group["rescale"], group["lr"], d, p, v, c)
                if gamma > 0:
                    p.mul_(1 - gamma).add_(v, alpha=gamma)
        return loss


def step_size(rescale: str, lr: float, d: Tensor, theta: Tensor, v: Tensor, c: Constraint) -> float:
    """γ ∈ [0, 1]: gradient: lr ‖d‖ / ‖θ − v‖; diameter: lr / D; none: lr (module docstring)."""
    if rescale == "gradient":
        dist = float((theta - v).norm())
        factor = float(d.norm()) / dist if dist > TOLERANCE else 0.0
    elif rescale == "diameter":
        factor = 1.0 / c.diameter if c.diameter > 0 else 0.0
    else:
        factor = 1.0
    return max(0.0, min(factor * lr, 1.0))


def make_sfw(model: nn.Module, trainable: list[nn.Parameter], cfg: SFWConfig) -> SFW:
    """An SFW optimizer over `trainable` (parameters of `model`), one constraint per tensor."""
    constraints = make_constraints(model, cfg, only=trainable)
    named = dict(model.named_parameters())
    return SFW([(named[n], c) for n, c in constraints.items()], momentum=cfg.momentum, rescale=cfg.rescale)
