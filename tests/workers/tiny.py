"""Tiny models and data shared by the workers tests."""

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


MODELS = {"mlp": tiny_mlp, "cnn": tiny_cnn}


def batches(n: int = 64, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of (x, y) batches of 1x4x4 inputs with a learnable signal in 4 classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5
    x[torch.arange(n), 0, y, y] += 2.0
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def sfw_steps_in_the_set(model, opt, data, steps: int, lr: float = 0.5) -> list[float]:
    """`steps` SFW steps at `lr` over `data` (cycled), checking after every step that each parameter is in its
    constraint set (up to float error); the losses."""
    from torch import nn

    from workers.sfw import SFW
    params = [(p, SFW.constraint_of(gr)) for gr in opt.param_groups for p in gr["params"]]
    losses = []
    for step in range(steps):
        x, y = data[step % len(data)]
        for gr in opt.param_groups:
            gr["lr"] = lr
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for p, c in params:      # θ ∈ C after every step
            assert c.norm(p.detach().double()) <= c.radius * (1 + 1e-5) + 1e-7
    return losses
