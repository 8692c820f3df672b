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
