"""Sparse execution of pruned models (workers.sparse_inference): the same outputs as dense, whatever the
layer's shape, layout and sparsity; honest sizes; semi-structured 2:4 on CUDA (gpu marker)."""

import pytest
import torch
from torch import nn

from workers.models import build_model
from workers.pruning import nm_keep_mask, prune
from workers.sparse_inference import (LAYOUTS, SparseConv2d, SparseInferenceError, SparseLinear, block_size,
                                      size_ratio, sparse_bytes, sparsify, to_layout)


def _sparse_(weight: torch.Tensor, sparsity: float, g: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        weight.mul_(torch.rand(weight.shape, generator=g) >= sparsity)
    return weight


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_linear_property_same_outputs_as_dense(seed, layout):
    g = torch.Generator().manual_seed(seed)
    cin, cout = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
    lin = nn.Linear(cin, cout, bias=seed % 2 == 0)
    _sparse_(lin.weight, [0.0, 0.5, 0.9, 0.99, 1.0][seed % 5], g)
    lead = [(), (3,), (2, 5)][seed % 3]
    x = torch.randn(*lead, 1 + seed % 4, cin, generator=g)
    with torch.no_grad():
        close(SparseLinear(lin, layout)(x), lin(x))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_conv_as_im2col_property_same_outputs_as_dense(seed, layout):
    g = torch.Generator().manual_seed(seed)
    cin, cout = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    k = [(1, 1), (3, 3), (2, 3)][seed % 3]
    conv = nn.Conv2d(cin, cout, k, stride=1 + seed % 2, padding=seed % 3, dilation=1 + (seed // 6),
                     bias=seed % 2 == 1)
    _sparse_(conv.weight, [0.5, 0.9, 0.0][seed % 3], g)
    x = torch.randn(1 + seed % 3, cin, 7 + seed % 4, 6, generator=g)
    with torch.no_grad():
        close(SparseConv2d(conv, layout)(x), conv(x))


@pytest.mark.parametrize("arch,in_shape", [("mlp", (1, 8, 8)), ("lenet5", (1, 8, 8)), ("resnet20", (3, 8, 8))])
@pytest.mark.parametrize("what", [0.9, "2:4"])
def test_sparsified_zoo_models_compute_what_the_pruned_ones_do(arch, in_shape, what):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_shape=in_shape, **({"width": 0.5} if arch == "resnet20" else {}))
    result = prune(model, None, 0.5, pattern=what) if what == "2:4" else prune(model, None, what)
    pruned = result.model.eval()
    x = torch.randn(3, *in_shape)
    for layout in LAYOUTS:
        sparse, left = sparsify(pruned, layout, names=result.masks)
        assert left == {}
        kinds = [type(m) for m in sparse.modules()]
        assert nn.Linear not in kinds and nn.Conv2d not in kinds
        with torch.no_grad():
            close(sparse(x), pruned(x))


def test_layers_it_cannot_lower_stay_dense_and_are_named():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Identity(), nn.Conv2d(4, 2, 1, padding_mode="reflect", padding=1), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 6, 6))
    sparse, left = sparsify(model, "csr")
    assert set(left) == {"0", "2"} and "groups 1" in left["0"]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        close(sparse(x), model(x))
    with pytest.raises(SparseInferenceError, match="unknown sparse layout"):
        sparsify(model, "coo")


def test_sizes_are_what_the_layouts_store():
    w = torch.zeros(8, 16)
    w[0, :5] = 1.0
    w[7, 12] = 2.0
    csr = to_layout(w, "csr")
    assert sparse_bytes(csr) == 6 * 4 + 6 * 8 + 9 * 8          # values, int64 column indices, row pointers
    assert block_size((8, 16)) == 8 and block_size((10, 16)) == 2 and block_size((7, 16)) == 1
    bsr = to_layout(w, "bsr")                                  # blocks of 8x8: the two with a nonzero
    assert sparse_bytes(bsr) == 2 * 64 * 4 + 2 * 8 + 2 * 8     # values, column indices, 1 + 1 row pointers
    model, _ = sparsify(nn.Sequential(nn.Linear(16, 8)).requires_grad_(False).apply(
        lambda m: m.weight.copy_(w) if isinstance(m, nn.Linear) else None), "csr")
    assert size_ratio(model) == pytest.approx(sparse_bytes(csr) / (8 * 16 * 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_2_4_gives_the_dense_outputs_on_cuda():
    from workers.sparse_inference import semi_structured
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda().eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(nm_keep_mask(m.weight.abs(), None, 2, 4))
    semi, left = semi_structured(model)
    assert left == {}
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(semi(x), model(x), rtol=1e-2, atol=1e-2)
