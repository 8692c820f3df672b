import sys

import pytest
import torch

from workers.models import ZOO, ModelError, build_model, check_arch
from workers.pruning import prunable_names

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_zoo_models_run_on_small_and_cifar_inputs(arch, shape):
    model = build_model(arch, num_classes=7, in_shape=shape)
    model.eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)
    assert prunable_names(model)          # every model has conv/linear weights to prune


@pytest.mark.parametrize("arch,params", [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_cifar_resnet_sizes(arch, params):
    model = build_model(arch, num_classes=10, in_shape=(3, 32, 32))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.03
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_mlp_widths_are_configurable():
    model = build_model("mlp", num_classes=10, in_shape=(1, 8, 8), widths=(32, 16, 8))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 32), (32, 16), (16, 8), (8, 10)]


def test_torchvision_models():
    model = build_model("torchvision:resnet18", num_classes=5, in_shape=(3, 32, 32))
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ModelError, match="3-channel"):
        build_model("torchvision:resnet18", num_classes=5, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="unknown torchvision model"):
        check_arch("torchvision:resnet9000")


def test_import_models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny(num_classes, hidden=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.Linear(hidden, num_classes))\n"
        "def not_a_model(**kw):\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("import:my_models:tiny", num_classes=3, in_shape=(1, 8, 8), hidden=5)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model("import:my_models:not_a_model", num_classes=3, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="no callable 'missing'"):
        check_arch("import:my_models:missing")
    with pytest.raises(ModelError, match="cannot import module"):
        check_arch("import:no_such_module_xyz:f")
    sys.modules.pop("my_models", None)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ModelError, match="unknown arch 'resnet9000'.*mlp, lenet5, resnet20, resnet56, vgg16_bn"):
        build_model("resnet9000", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="bad model kwargs"):
        build_model("mlp", num_classes=10, in_shape=(1, 8, 8), depth=3)
