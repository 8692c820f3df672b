"""The model zoo: `build_model(arch, num_classes=..., in_shape=(C, H, W), **kwargs)`.

`arch` is one of

- a zoo name: ``mlp``, ``lenet5``, ``resnet20``, ``resnet56``, ``vgg16_bn`` — every one works on inputs
  from scikit-learn's 8x8 digits up to CIFAR's 32x32 (and larger);
- ``torchvision:<name>``: any torchvision classifier, randomly initialised (weights are never downloaded);
- ``import:<module>:<callable>``: the user's own model, called with the keyword arguments it accepts
  among ``num_classes``, ``in_shape`` and the spec's model kwargs.

`check_arch` validates a name without building or importing anything (job-spec validation); both raise
`ModelError`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import types
from collections.abc import Callable, Sequence
from math import ceil, prod

import torch
from torch import Tensor, nn
from workers.config import ModelError, SUGGESTED_LR, suggested_lr, IMPORT_PREFIX, _DOTTED, parse_import  # noqa: F401  (torch-free: the driver and the API use them)

Shape = tuple[int, int, int]


# ---------------------------------------------------------------- zoo

def mlp(num_classes: int, in_shape: Shape, widths: Sequence[int] = (300, 100)) -> nn.Module:
    """LeNet-300-100 style: Flatten -> (Linear -> ReLU) per hidden width -> Linear(num_classes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(in_shape)
    for w in widths:
        layers += [nn.Linear(width, int(w)), nn.ReLU(inplace=True)]
        width = int(w)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _conv5_pool2(size: int, padding: int) -> int:
    """Spatial size after a 5x5 convolution with `padding` and a 2x2 max-pool (ceil mode)."""
    return ceil((size + 2 * padding - 4) / 2)


def lenet5(num_classes: int, in_shape: Shape) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: conv 6@5x5 -> pool -> conv 16@5x5 -> pool ->
    fc 120 -> fc 84 -> fc num_classes.

    The classic shapes (16x5x5 features) on 32x32 input and on 28x28 input padded by 2. Smaller inputs
    (8x8 digits) get padding in both convolutions and fewer features; larger ones an adaptive max-pool
    down to 5x5.
    """
    c, h, w = in_shape
    pad1 = 0 if min(h, w) >= 32 else 2
    h1, w1 = _conv5_pool2(h, pad1), _conv5_pool2(w, pad1)
    pad2 = 0 if min(h1, w1) >= 10 else 2
    h2, w2 = min(_conv5_pool2(h1, pad2), 5), min(_conv5_pool2(w1, pad2), 5)
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveMaxPool2d((h2, w2)), nn.Flatten(),
        nn.Linear(16 * h2 * w2, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, num_classes))


def _kaiming_init(model: nn.Module) -> nn.Module:
    """He initialisation for convolutions; BatchNorm starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (a 1x1 conv-BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        project = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if project else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): a 3x3 stem, 3 stages of n basic blocks with 16/32/64 channels
    (times `width`; stages 2 and 3 start with stride 2), global average pool, linear head."""

    def __init__(self, n: int, num_classes: int, in_shape: Shape, width: float = 1.0):
        super().__init__()
        c = [max(1, round(base * width)) for base in (16, 32, 64)]
        self.stem = nn.Sequential(*_conv_bn(in_shape[0], c[0], 3), nn.ReLU(inplace=True))
        blocks, cin = [], c[0]
        for stage, cout in enumerate(c):
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def resnet20(num_classes: int, in_shape: Shape, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-20 (n=3, about 0.27M parameters for 10 classes)."""
    return CifarResNet(3, num_classes, in_shape, width)


def resnet56(num_classes: int, in_shape: Shape, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-56 (n=9, about 0.85M parameters for 10 classes)."""
    return CifarResNet(9, num_classes, in_shape, width)


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(num_classes: int, in_shape: Shape, width: float = 1.0) -> nn.Module:
    """CIFAR-style VGG16 with BatchNorm: 13 conv-BN-ReLU layers (widths times `width`), 5 max-pools, a global
    average pool and one linear layer. A max-pool is skipped once the feature map is down to 1 pixel."""
    layers: list[nn.Module] = []
    cin, size = in_shape[0], min(in_shape[1:])
    for v in VGG16:
        if v == "M":
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            cout = max(1, round(v * width))
            layers += [*_conv_bn(cin, cout, 3), nn.ReLU(inplace=True)]
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return _kaiming_init(nn.Sequential(*layers))


ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp, "lenet5": lenet5, "resnet20": resnet20, "resnet56": resnet56, "vgg16_bn": vgg16_bn,
}
KNOWN = f"known: {', '.join(ZOO)}, torchvision:<name> or import:<module>:<callable>"


# ---------------------------------------------------------------- names

@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """The classification models torchvision can build (`torchvision.models.list_models`)."""
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _import_callable(arch: str) -> Callable[..., object]:
    """The callable named by ``import:<module>:<callable>`` (the callable may be a dotted attribute path).

    Only a worker calls this (spec validation checks the name's form and the operator's allow-list, and never
    imports). The path may not step through another module (``mymodels:os.system``) and the callable must be
    defined in the named module's package, not merely imported into it (``from os import system``)."""
    module_name, attr = parse_import(arch)
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing user code is a bad arch
        raise ModelError(f"arch {arch!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    for name in attr.split("."):
        obj = getattr(obj, name, None)
        if isinstance(obj, types.ModuleType):
            raise ModelError(f"arch {arch!r}: {attr!r} passes through the module {obj.__name__!r}; name a callable "
                             f"of {module_name!r} itself")
    if not callable(obj):
        raise ModelError(f"arch {arch!r}: module {module_name!r} has no callable {attr!r}")
    origin = getattr(obj, "__module__", None) or ""
    package = module_name.split(".")[0]
    if origin != package and not origin.startswith(package + "."):
        raise ModelError(f"arch {arch!r}: {attr!r} is defined in {origin or 'an unknown module'!r}, not in the package "
                         f"{package!r}; name a callable defined there")
    return obj


def check_arch(arch: str) -> None:
    """Raise `ModelError` unless `arch` names a model that can be built (nothing is built, and nothing named
    by ``import:`` is imported: whether the module exists shows when a worker builds the model)."""
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"arch must be a non-empty string; {KNOWN}")
    if arch in ZOO:
        return
    if arch.startswith("torchvision:"):
        name = arch.removeprefix("torchvision:")
        if name not in torchvision_names():
            close = difflib.get_close_matches(name, torchvision_names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"unknown torchvision model {name!r} (see torchvision.models.list_models()){hint}")
        return
    if arch.startswith(IMPORT_PREFIX):
        parse_import(arch)         # the form only: importing is for the workers, which build the model
        return
    hint = f" (did you mean 'torchvision:{arch}'?)" if arch in torchvision_names() else ""
    raise ModelError(f"unknown arch {arch!r}{hint}; {KNOWN}")


# ---------------------------------------------------------------- building

def _check_target(num_classes: int, in_shape: Sequence[int]) -> Shape:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    shape = tuple(in_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ModelError(f"in_shape must be (channels, height, width) of positive integers, got {in_shape!r}")
    return shape  # type: ignore[return-value]


def _call_with_accepted(fn: Callable[..., object], offered: dict) -> object:
    """Call `fn` with the keyword arguments among `offered` that its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: offer everything
        return fn(**offered)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        offered = {k: v for k, v in offered.items() if k in params}
    return fn(**offered)


def build_model(arch: str, *, num_classes: int, in_shape: tuple[int, int, int], **kwargs) -> nn.Module:
    """A freshly initialised model for `num_classes` classes and inputs of shape `in_shape` (C, H, W).

    `kwargs` go to the zoo builder (e.g. ``widths`` for mlp, ``width`` for the ResNets and VGG), to
    ``torchvision.models.get_model``, or to the imported callable (only those it accepts).
    """
    check_arch(arch)
    shape = _check_target(num_classes, in_shape)
    try:
        if arch in ZOO:
            return ZOO[arch](num_classes, shape, **kwargs)
        if arch.startswith("torchvision:"):
            if shape[0] != 3:
                raise ModelError(f"{arch}: torchvision models take 3-channel input; this data has {shape[0]} "
                                 "channel(s)")
            import torchvision
            return torchvision.models.get_model(arch.removeprefix("torchvision:"), weights=None,
                                                num_classes=num_classes, **kwargs)
        model = _call_with_accepted(_import_callable(arch), dict(kwargs, num_classes=num_classes, in_shape=shape))
    except TypeError as e:
        raise ModelError(f"arch {arch!r}: bad model kwargs {kwargs} ({e})") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# The input shape and classes of the datasets whose shape is known without reading them; for others the model
# is sized at a nominal input (a lower bound for most image models: inputs are rarely smaller)
DATASET_SHAPES: dict[str, tuple[Shape, int]] = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}
NOMINAL_SHAPE: tuple[Shape, int] = ((3, 32, 32), 10)


def count_parameters(arch: str, dataset: str, **kwargs) -> int:
    """How many parameters `arch` with `kwargs` has for `dataset` (DATASET_SHAPES, else NOMINAL_SHAPE), built
    on the meta device: no memory is allocated, whatever the sizes. ModelError when it cannot be built (bad
    kwargs). Not for ``import:`` archs, whose code only the workers import."""
    if arch.startswith(IMPORT_PREFIX):
        raise ModelError(f"{arch}: an imported model is not built here")
    shape, classes = DATASET_SHAPES.get(dataset, NOMINAL_SHAPE)
    try:
        with torch.device("meta"):
            model = build_model(arch, num_classes=classes, in_shape=shape, **kwargs)
    except ModelError:
        raise
    except Exception as e:                   # noqa: BLE001  (a kwarg of the right type but an impossible value)
        raise ModelError(f"arch {arch!r}: model kwargs {kwargs} do not build a model ({type(e).__name__}: {e})") from e
    return sum(p.numel() for p in model.parameters())

