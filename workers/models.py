"""The model zoo: `build_model(arch, num_classes=..., in_shape=(C, H, W))`.

arch is a zoo name (mlp, lenet5, resnet20, resnet56, vgg16_bn), ``torchvision:<name>`` for any
torchvision classifier (randomly initialised; weights are never downloaded), or
``import:<module>:<callable>`` for the user's own model (called with the keyword arguments it
accepts among num_classes, in_shape and the spec's model kwargs). Every zoo model works on inputs
as small as scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from math import prod

from torch import nn


class ModelError(ValueError):
    """An unknown architecture, or one that cannot be built for this data."""


def mlp(num_classes: int, in_shape: tuple[int, int, int], widths: tuple[int, ...] = (300, 100)) -> nn.Module:
    """LeNet-300-100 style: Flatten -> Linear -> ReLU -> ... -> Linear(num_classes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(in_shape)
    for w in widths:
        layers += [nn.Linear(width, w), nn.ReLU(inplace=True)]
        width = w
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet5(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """LeNet-5: conv 6 -> pool -> conv 16 -> pool (adaptive, 5x5) -> fc 120 -> fc 84 -> fc classes."""
    return nn.Sequential(
        nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(5),
        nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3 stages of n basic blocks with 16/32/64 channels."""

    def __init__(self, n: int, num_classes: int, in_shape: tuple[int, int, int], width: int = 1):
        super().__init__()
        c = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]),
                                  nn.ReLU(inplace=True))
        blocks, cin = [], c[0]
        for stage, cout in enumerate(c):
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def resnet20(num_classes: int, in_shape: tuple[int, int, int], width: int = 1) -> nn.Module:
    return CifarResNet(3, num_classes, in_shape, width)


def resnet56(num_classes: int, in_shape: tuple[int, int, int], width: int = 1) -> nn.Module:
    return CifarResNet(9, num_classes, in_shape, width)


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """CIFAR-style VGG16 with BatchNorm; a max-pool is skipped once the feature map is 1x1."""
    layers: list[nn.Module] = []
    cin, size = in_shape[0], min(in_shape[1:])
    for v in VGG16:
        if v == "M":
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp, "lenet5": lenet5, "resnet20": resnet20, "resnet56": resnet56, "vgg16_bn": vgg16_bn,
}
KNOWN = f"known: {', '.join(ZOO)}, torchvision:<name> or import:<module>:<callable>"


def _torchvision_names() -> list[str]:
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def _import_callable(arch: str) -> Callable[..., nn.Module]:
    parts = arch.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ModelError(f"arch {arch!r} must look like import:<module>:<callable>")
    try:
        module = importlib.import_module(parts[1])
    except ImportError as e:
        raise ModelError(f"arch {arch!r}: cannot import module {parts[1]!r} ({e})") from None
    fn = getattr(module, parts[2], None)
    if not callable(fn):
        raise ModelError(f"arch {arch!r}: module {parts[1]!r} has no callable {parts[2]!r}")
    return fn


def check_arch(arch: str) -> None:
    """Refuse an unknown architecture (without building it)."""
    if arch in ZOO:
        return
    if arch.startswith("torchvision:"):
        name = arch.split(":", 1)[1]
        if name not in _torchvision_names():
            raise ModelError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
        return
    if arch.startswith("import:"):
        _import_callable(arch)
        return
    raise ModelError(f"unknown arch {arch!r}; {KNOWN}")


def build_model(arch: str, *, num_classes: int, in_shape: tuple[int, int, int], **kwargs) -> nn.Module:
    """A freshly initialised model for `num_classes` classes and inputs of shape `in_shape` (C, H, W)."""
    check_arch(arch)
    in_shape = tuple(in_shape)
    if arch in ZOO:
        try:
            return ZOO[arch](num_classes, in_shape, **kwargs)
        except TypeError as e:
            raise ModelError(f"arch {arch!r}: bad model kwargs {kwargs} ({e})") from None
    if arch.startswith("torchvision:"):
        import torchvision
        if in_shape[0] != 3:
            raise ModelError(f"{arch} takes 3-channel images; this data has {in_shape[0]} channel(s)")
        return torchvision.models.get_model(arch.split(":", 1)[1], weights=None, num_classes=num_classes, **kwargs)
    fn = _import_callable(arch)
    offered = dict(kwargs, num_classes=num_classes, in_shape=in_shape)
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    model = fn(**{k: v for k, v in offered.items() if takes_any or k in params})
    if not isinstance(model, nn.Module):
        raise ModelError(f"arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
