"""Running pruned models with sparse weights (`torch.sparse`), for measuring what sparsity buys at inference.

`sparsify(model, layout)` returns a copy of a pruned model whose conv and linear layers multiply with their
weight stored sparse, and the names of the layers it left dense (with the reason):

linear   y = x W^T + b computed as (W_sparse @ x^T)^T with `torch.sparse.mm` (inputs of any leading shape
         are flattened to rows first).
conv2d   torch has no sparse convolution on the CPU, so a conv is lowered to im2col: the input's patches
         (`F.unfold`: [batch, in * kh * kw, positions]) times the weight as an [out, in * kh * kw] sparse
         matrix, then folded back to [batch, out, h', w']. Grouped convs and non-zero padding modes stay dense.
layouts  "csr" (compressed rows; any sparsity pattern) and "bsr" (compressed rows of dense b x b blocks, b the
         largest of 16, 8, 4, 2, 1 that divides both weight dimensions; only blocks with a nonzero are kept,
         so unstructured sparsity keeps almost every block and BSR helps only block-structured weights).

`sparse_bytes` is what a layout stores (values, column indices and row pointers, int64 as torch makes them),
against 4 bytes per float32 weight dense: CSR is smaller than dense only above 2/3 sparsity.

On CUDA, `semi_structured(model)` puts 2:4-sparse linear weights (float16 / bfloat16) into
`torch.sparse.to_sparse_semi_structured`, the layout sparse tensor cores run.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from workers.pruning import is_nm

LAYOUTS = ("csr", "bsr")
BLOCK_SIZES = (16, 8, 4, 2, 1)


class SparseInferenceError(ValueError):
    """A layout or model that cannot be run sparse as asked."""


def block_size(shape: tuple[int, int]) -> int:
    """The largest b in BLOCK_SIZES that divides both dimensions of a matrix of `shape`."""
    return next(b for b in BLOCK_SIZES if shape[0] % b == 0 and shape[1] % b == 0)


def to_layout(matrix: torch.Tensor, layout: str) -> torch.Tensor:
    """A dense 2-D matrix as a sparse CSR or BSR tensor (same values, zeros not stored); "dense" keeps it
    dense (a reference: the same lowering, e.g. im2col, with a dense matmul)."""
    if matrix.dim() != 2:
        raise SparseInferenceError(f"a sparse weight must be a matrix, got shape {tuple(matrix.shape)}")
    if layout == "dense":                      # the lowering alone, for reference (im2col with a dense matmul)
        return matrix.detach().contiguous()
    with warnings.catch_warnings():            # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        if layout == "csr":
            return matrix.detach().to_sparse_csr()
        if layout == "bsr":
            b = block_size(tuple(matrix.shape))
            return matrix.detach().to_sparse_bsr((b, b))
    raise SparseInferenceError(f"unknown sparse layout {layout!r}; known: {', '.join(LAYOUTS)}")


def sparse_bytes(sparse: torch.Tensor) -> int:
    """Bytes a CSR / BSR tensor stores: values + column indices + row pointers."""
    if sparse.layout == torch.sparse_csr:
        parts = (sparse.values(), sparse.col_indices(), sparse.crow_indices())
    elif sparse.layout == torch.sparse_bsr:
        parts = (sparse.values(), sparse.col_indices(), sparse.crow_indices())
    else:
        raise SparseInferenceError(f"sparse_bytes takes CSR or BSR tensors, not {sparse.layout}")
    return sum(p.numel() * p.element_size() for p in parts)


def dense_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _mm(weight: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(weight, rhs) if weight.layout != torch.strided else weight @ rhs


class SparseLinear(nn.Module):
    """nn.Linear with its weight held sparse: y = (W_sparse @ x^T)^T + b."""

    def __init__(self, linear: nn.Linear, layout: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.layout = layout
        self.register_buffer("weight", to_layout(linear.weight, layout))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = _mm(self.weight, rows.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseConv2d(nn.Module):
    """nn.Conv2d (groups 1, zero padding) as im2col times a sparse [out, in * kh * kw] weight."""

    def __init__(self, conv: nn.Conv2d, layout: str):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise SparseInferenceError("only convs with groups 1 and numeric zero padding are lowered to im2col")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.layout = layout
        self.register_buffer("weight", to_layout(conv.weight.reshape(conv.out_channels, -1), layout))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        k, positions = cols.shape[1], cols.shape[2]
        out = _mm(self.weight, cols.transpose(0, 1).reshape(k, batch * positions))
        out = out.reshape(self.out_channels, batch, positions).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias[None, :, None]
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.reshape(batch, self.out_channels, h_out, w_out)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def sparsify(model: nn.Module, layout: str = "csr", *, names: Iterable[str] | None = None
             ) -> tuple[nn.Module, dict[str, str]]:
    """A copy of `model` (in eval mode, on the CPU) whose linear and 2-D conv layers run with sparse weights
    (module docstring), and {layer: why it stayed dense} for the layers it could not convert. `names`:
    only the modules of these weight names (as in a mask, "blocks.0.mlp.weight"); None: every such layer.
    layout "dense" lowers the same way with dense weights: what the lowering costs by itself."""
    if layout not in LAYOUTS + ("dense",):
        raise SparseInferenceError(f"unknown sparse layout {layout!r}; known: {', '.join(LAYOUTS)} (and dense)")
    wanted = None if names is None else {n.removesuffix(".weight") for n in names}
    model = copy.deepcopy(model).cpu().eval()
    dense: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not name or (wanted is not None and name not in wanted):
            continue
        if isinstance(module, nn.Linear):
            _replace(model, name, SparseLinear(module, layout))
        elif isinstance(module, nn.Conv2d):
            try:
                _replace(model, name, SparseConv2d(module, layout))
            except SparseInferenceError as e:
                dense[name] = str(e)
        elif isinstance(module, (nn.Conv1d, nn.Conv3d)):
            dense[name] = f"{type(module).__name__}: no sparse lowering here"
    return model, dense


def sparse_weights(model: nn.Module) -> list[torch.Tensor]:
    """The sparse weights of a `sparsify`-ed model."""
    return [m.weight for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d))]


def size_ratio(model: nn.Module) -> float:
    """Bytes of the sparse weights of a `sparsify`-ed model over the same weights stored dense (float32)."""
    weights = sparse_weights(model)
    dense = sum(w.shape.numel() * w.values().element_size() for w in weights)
    return sum(sparse_bytes(w) for w in weights) / dense if dense else 1.0


@torch.no_grad()
def semi_structured(model: nn.Module, *, names: Iterable[str] | None = None) -> tuple[nn.Module, dict[str, str]]:
    """CUDA only: a copy of `model` whose 2:4-sparse nn.Linear weights are `to_sparse_semi_structured`
    tensors (the model must be float16 / bfloat16 on a CUDA device); {layer: why it stayed dense}."""
    from torch.sparse import to_sparse_semi_structured
    wanted = None if names is None else {n.removesuffix(".weight") for n in names}
    model = copy.deepcopy(model).eval()
    dense: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (wanted is not None and name not in wanted):
            continue
        w = module.weight
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            dense[name] = f"needs a float16/bfloat16 weight on CUDA, got {w.dtype} on {w.device.type}"
        elif not is_nm(w, 2, 4):
            dense[name] = "not 2:4 sparse"
        else:
            try:
                module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
            except (RuntimeError, ValueError) as e:       # shapes the kernels do not take
                dense[name] = str(e).splitlines()[0]
    return model, dense
