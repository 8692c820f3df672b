"""The model zoo on real forward/backward passes; torchvision and import: specs on real modules."""

import sys

import pytest
import torch
from torch import nn

from workers.models import ZOO, ModelError, build_model, check_arch

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 12, 20)]
BN_ARCHS = ["resnet20", "resnet56", "vgg16_bn"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(ZOO))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_zoo_models_train_and_predict_on_small_and_cifar_inputs(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_shape=shape)
    x = torch.randn(3, *shape)
    model(x).logsumexp(1).sum().backward()              # train mode (BatchNorm with batch statistics)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch,n,params", [("resnet20", 3, 0.27e6), ("resnet56", 9, 0.85e6)])
def test_cifar_resnets_have_the_papers_depth_and_size(arch, n, params):
    model = build_model(arch, num_classes=10, in_shape=(3, 32, 32))
    assert abs(n_params(model) - params) / params < 0.03
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 6 * n + 1                # + 1 linear = 6n+2 layers
    assert [c.out_channels for c in convs if c.kernel_size == (1, 1)] == [32, 64]  # projections only
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    wide = build_model(arch, num_classes=10, in_shape=(3, 32, 32), width=2)
    assert 3.8 < n_params(wide) / n_params(model) < 4.1


def test_in_channels_follow_in_shape():
    for arch in ZOO:
        first = next(m for m in build_model(arch, num_classes=3, in_shape=(5, 16, 16)).modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear)))
        width = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
        assert width == (5 * 16 * 16 if arch == "mlp" else 5)


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_convs_feeding_batchnorm_have_no_bias(arch):
    model = build_model(arch, num_classes=10, in_shape=(3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and len(bns) == len(convs) and all(c.bias is None for c in convs)


def test_vgg16_bn_layout():
    model = build_model("vgg16_bn", num_classes=10, in_shape=(3, 32, 32))
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    small = build_model("vgg16_bn", num_classes=10, in_shape=(1, 8, 8))    # 8 -> 4 -> 2 -> 1: 3 pools
    assert sum(isinstance(m, nn.MaxPool2d) for m in small.modules()) == 3


@pytest.mark.parametrize("shape,fc1_in", [((1, 28, 28), 400), ((3, 32, 32), 400), ((1, 8, 8), 64),
                                          ((3, 96, 96), 400)])
def test_lenet5_layout(shape, fc1_in):
    model = build_model("lenet5", num_classes=10, in_shape=shape)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs == [6, 16] and fcs == [(fc1_in, 120), (120, 84), (84, 10)]
    if shape == (1, 28, 28):
        assert n_params(model) == 61706                 # the classic LeNet-5 count


def test_mlp_is_lenet_300_100_with_configurable_widths():
    default = build_model("mlp", num_classes=10, in_shape=(1, 28, 28))
    assert [(m.in_features, m.out_features) for m in default.modules() if isinstance(m, nn.Linear)] == \
        [(784, 300), (300, 100), (100, 10)]
    model = build_model("mlp", num_classes=10, in_shape=(1, 8, 8), widths=[32, 16, 8])
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)] == \
        [(64, 32), (32, 16), (16, 8), (8, 10)]


def test_torchvision_models():
    check_arch("torchvision:resnet18")
    model = build_model("torchvision:resnet18", num_classes=5, in_shape=(3, 32, 32))
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ModelError, match="torchvision models take 3-channel input"):
        build_model("torchvision:resnet18", num_classes=5, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="unknown torchvision model 'resnet9000'.*did you mean"):
        check_arch("torchvision:resnet9000")
    with pytest.raises(ModelError, match="bad model kwargs"):
        build_model("torchvision:resnet18", num_classes=5, in_shape=(3, 32, 32), depth=3)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "ladle_test_user_models"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "def tiny(num_classes, hidden=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden),\n"
        "                               torch.nn.Linear(hidden, num_classes))\n"
        "def sized(num_classes, in_shape):\n"
        "    c, h, w = in_shape\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, num_classes))\n"
        "def anything(**kwargs):\n"
        "    m = torch.nn.Identity()\n"
        "    m.got = kwargs\n"
        "    return m\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, num_classes)\n"
        "def not_a_model(**kw):\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_import_models_get_the_arguments_they_accept(user_module):
    model = build_model(f"import:{user_module}:tiny", num_classes=3, in_shape=(1, 8, 8), hidden=5)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3) and model[1].out_features == 5
    model = build_model(f"import:{user_module}:sized", num_classes=4, in_shape=(3, 2, 2))
    assert model[1].in_features == 12 and model[1].out_features == 4
    model = build_model(f"import:{user_module}:anything", num_classes=4, in_shape=(3, 2, 2), extra=1)
    assert model.got == {"num_classes": 4, "in_shape": (3, 2, 2), "extra": 1}
    assert build_model(f"import:{user_module}:Net", num_classes=6, in_shape=(1, 2, 2)).fc.out_features == 6


def test_import_errors_name_the_problem(user_module):
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        build_model(f"import:{user_module}:not_a_model", num_classes=3, in_shape=(1, 8, 8))
    # check_arch checks the name's form only (spec validation never imports); building imports
    check_arch(f"import:{user_module}:missing")
    check_arch("import:no_such_module_xyz:f")
    with pytest.raises(ModelError, match="no callable 'missing'"):
        build_model(f"import:{user_module}:missing", num_classes=3, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="cannot import module 'no_such_module_xyz'"):
        build_model("import:no_such_module_xyz:f", num_classes=3, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="must look like import:<module>:<callable>"):
        check_arch(f"import:{user_module}")
    with pytest.raises(ModelError, match="bad model kwargs"):
        build_model(f"import:{user_module}:tiny", num_classes=3, in_shape=(1, 8, 8), hidden=None)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ModelError, match=r"unknown arch 'foo'; known: mlp, lenet5, resnet20, resnet56, vgg16_bn, "
                                         r"torchvision:<name> or import:<module>:<callable>"):
        build_model("foo", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match=r"unknown arch 'resnet18' \(did you mean 'torchvision:resnet18'\?\)"):
        check_arch("resnet18")
    with pytest.raises(ModelError, match="non-empty string"):
        check_arch("")


def test_bad_build_arguments_are_model_errors():
    with pytest.raises(ModelError, match="bad model kwargs"):
        build_model("mlp", num_classes=10, in_shape=(1, 8, 8), depth=3)
    with pytest.raises(ModelError, match="num_classes must be a positive integer"):
        build_model("mlp", num_classes=0, in_shape=(1, 8, 8))
    with pytest.raises(ModelError, match=r"in_shape must be \(channels, height, width\)"):
        build_model("lenet5", num_classes=10, in_shape=(8, 8))
