"""Deployable exports of a stored model (design section 6c): the pure format code.

sparse  one safetensors file, ``ladle-sparse-1``. Per prunable tensor (those with a mask) of n elements
        of b bytes each, k of them nonzero, the smallest of three layouts:

            dense     the tensor as it is                                          n b bytes
            bitmask   ``bitmask/<name>``: uint8[ceil(n / 8)], bit i (little bit order, numpy
                      ``packbits(..., bitorder="little")``) set when element i is nonzero;
                      ``values/<name>``: the k nonzero elements in row-major order      ceil(n / 8) + k b
            csr       the tensor seen as a matrix of r = shape[0] rows and c = n / r columns;
                      ``indptr/<name>``: r + 1 offsets (row i's values are values[indptr[i]:indptr[i+1]]),
                      ``indices/<name>``: the k column indices, ``values/<name>``       (r + 1) p + k (q + b)

        where p and q are the bytes of the smallest unsigned int dtype that holds k and c - 1 (uint8,
        uint16, uint32, else int64). The state loads back equal (``torch.equal``) and bit-exact but for
        the sign of zeros: a -0.0 (masking leaves one wherever it zeroed a negative weight, about half
        the pruned weights) loads as 0.0; keeping those signs would cost a bit per zero. The tensor's
        mask is its nonzero pattern in nearly every model (a kept
        weight is almost never exactly 0.0); when it is not, ``mask/<name>`` holds it as packed bits too.
        Other tensors (biases, norms, BatchNorm statistics) are stored as ``dense/<name>``, once: an
        unmasked tensor equal to one stored before it (a LM head tied to the embeddings, which the
        dense checkpoint holds twice) is an ``alias`` of it, with no bytes of its own.
        At 90 % unstructured sparsity in fp32: 0.1 * 4 + 1/8 = 0.525 bytes per weight against 4 (+ 1 for
        the mask's bool) in the dense checkpoint, about 0.13 of its state (0.105 of its file).

        Header metadata (strings): ``format`` = ``ladle-sparse-1``; ``ladle`` = the model's own metadata
        (JSON: arch, lineage, the job's spec, ...); ``tensors`` = JSON {name: {shape, dtype, layout, digest,
        and for a masked tensor nnz and mask: "support" | "packed"}}, where digest is a 64-bit BLAKE2b of the
        decoded tensor's dtype, shape and bytes (and its mask's), so that a damaged file is refused naming the
        tensor (the whole file's sha256 is what the store records and downloads check); and
        ``metadata_digest``, a 64-bit BLAKE2b of the format, ``ladle`` and ``tensors`` strings.

hf      a causal LM's Hugging Face folder (``save_pretrained``, safetensors, with its tokenizer) whose
        config carries ``ladle_sparsity`` (the recipe: prune section, sparsity, model id, parent), sent as
        a zip archive (stored, not compressed; fixed timestamps, so the same model gives the same bytes).

onnx    an image model through torch's TorchScript exporter (``dynamo=False``, no onnxscript needed),
        batch axis dynamic, every conv and linear weight an initializer under its state-dict name (no
        constant folding: onnxruntime fuses BatchNorm itself when it loads the graph), checked to keep the
        mask's zeros.

compact an image model pruned with ``prune.structure: channels`` with its removed channels taken out
        (workers.structured.shrink): one safetensors file of the smaller state, header ``format`` =
        ``ladle-compact-1`` and ``ladle`` = the model's metadata plus ``removed_channels`` ({group root:
        [channels]}); `load_compact` rebuilds the architecture, removes the same channels and loads it.

A model pruned with ``structure: channels`` comes out physically smaller in every built format but sparse:
onnx and compact (image models: the removed channels gone from every coupled layer) and hf (language
models: the removed MLP neurons and KV groups gone, the config's intermediate_size and head counts
updated, so that plain ``from_pretrained`` loads it). The dense download stays the checkpoint itself
(full shapes and the mask: what retraining, soups and resume work on).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workers.checkpoint import Checkpoint, CheckpointError
from workers.jsonsafe import JSONRefused, loads, safetensors_header
from workers.pruning import Masks

SPARSE_FORMAT = "ladle-sparse-1"
LAYOUTS = ("dense", "bitmask", "csr")        # what a masked tensor may take, the smallest one
ALIAS = "alias"                               # an unmasked tensor equal to an earlier one (tied embeddings)
# the parts each layout keeps in the file (beside mask/<name> when the mask is not the support)
PARTS: dict[str, tuple[str, ...]] = {"dense": ("dense",), "bitmask": ("bitmask", "values"),
                                     "csr": ("indptr", "indices", "values"), ALIAS: ()}
INDEX_DTYPES = ((torch.uint8, 2**8 - 1), (torch.uint16, 2**16 - 1), (torch.uint32, 2**32 - 1), (torch.int64, 2**63 - 1))
HF_RECIPE_KEY = "ladle_sparsity"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class ExportError(ValueError):
    """A model that cannot be exported in the format asked for (the message says why)."""


class SparseFormatError(CheckpointError):
    """A sparse file that is damaged, truncated or inconsistent; the message names the tensor and the problem."""


# ---------------------------------------------------------------- sparse: sizes and layouts

def index_dtype(max_value: int) -> torch.dtype:
    """The smallest unsigned int dtype (uint8, uint16, uint32; else int64) that holds 0..max_value."""
    for dtype, top in INDEX_DTYPES:
        if max_value <= top:
            return dtype
    raise ExportError(f"index {max_value} does not fit in int64")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def csr_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of the matrix a tensor is seen as for CSR: shape[0] rows (1 for a 1-D tensor)."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) > 1 else 1
    return rows, (n // rows if rows else 0)


def layout_bytes(shape: tuple[int, ...], dtype: torch.dtype, nnz: int) -> dict[str, int]:
    """Bytes each layout takes for a tensor of `shape` and `dtype` with `nnz` nonzeros (see the module doc)."""
    n, b = math.prod(shape), _itemsize(dtype)
    rows, cols = csr_shape(shape)
    out = {"dense": n * b, "bitmask": (n + 7) // 8 + nnz * b}
    if len(shape) >= 1 and n:
        p, q = _itemsize(index_dtype(nnz)), _itemsize(index_dtype(max(cols - 1, 0)))
        out["csr"] = (rows + 1) * p + nnz * (q + b)
    return out


def choose_layout(shape: tuple[int, ...], dtype: torch.dtype, nnz: int) -> str:
    """The smallest layout (ties: dense, then bitmask, then csr)."""
    sizes = layout_bytes(shape, dtype, nnz)
    return min(sizes, key=lambda k: (sizes[k], LAYOUTS.index(k)))


def support(t: torch.Tensor) -> torch.Tensor:
    """Flat bool tensor: which elements are nonzero (NaN counts as nonzero, -0.0 as zero)."""
    return t.contiguous().reshape(-1) != 0


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """uint8[ceil(n / 8)]: bit i (little bit order) of the flat bool tensor `flags`."""
    return torch.from_numpy(np.packbits(flags.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n flags `pack_bits` packed (flat bool tensor)."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").astype(bool))


def _digest(t: torch.Tensor, mask: torch.Tensor | None) -> str:
    """A 64-bit BLAKE2b of the tensor's dtype, shape and bytes (and its mask's): enough to catch damage, short
    enough that the header stays small beside a small model's weights."""
    h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}|".encode(), digest_size=8)
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if mask is not None:
        h.update(b"|mask|" + mask.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_tensor(name: str, t: torch.Tensor, mask: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors for one state tensor and its header entry. Tensors without a mask stay dense."""
    t = t.detach().cpu().contiguous()
    entry: dict[str, Any] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "layout": "dense",
                             "digest": _digest(t, mask)}
    if mask is None:
        return {f"dense/{name}": t}, entry
    mask = mask.detach().cpu().bool().contiguous()
    if tuple(mask.shape) != tuple(t.shape):
        raise ExportError(f"tensor {name!r}: its mask has shape {tuple(mask.shape)}, the tensor {tuple(t.shape)}")
    keep = support(t)
    nnz = int(keep.sum())
    layout = choose_layout(tuple(t.shape), t.dtype, nnz)
    flat = t.reshape(-1)
    if layout != "dense":                       # what decoding gives: zeros (no sign) but at the support
        canonical = torch.zeros_like(flat)
        canonical[keep] = flat[keep]
        entry["digest"] = _digest(canonical.reshape(t.shape), mask)
    entry.update(layout=layout, nnz=nnz)
    out: dict[str, torch.Tensor] = {}
    if layout == "dense":
        out[f"dense/{name}"] = t
    elif layout == "bitmask":
        out[f"bitmask/{name}"] = pack_bits(keep)
        out[f"values/{name}"] = flat[keep].clone()
    else:
        rows, cols = csr_shape(tuple(t.shape))
        where = keep.nonzero().reshape(-1)                     # flat positions, ascending (row-major)
        counts = torch.bincount(where // cols, minlength=rows)
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        indptr[1:] = counts.cumsum(0)
        out[f"indptr/{name}"] = torch.from_numpy(indptr.numpy().astype(_np_dtype(index_dtype(nnz))))
        columns = (where % cols).numpy().astype(_np_dtype(index_dtype(max(cols - 1, 0))))
        out[f"indices/{name}"] = torch.from_numpy(columns)
        out[f"values/{name}"] = flat[where].clone()
    if torch.equal(mask.reshape(-1), keep):
        entry["mask"] = "support"
    else:
        entry["mask"] = "packed"
        out[f"mask/{name}"] = pack_bits(mask)
    return out, entry


def _np_dtype(dtype: torch.dtype):
    return {torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32, torch.int64: np.int64}[dtype]


def to_sparse_bytes(ckpt: Checkpoint) -> bytes:
    """A checkpoint's state and masks in the sparse format (epoch-checkpoint extras are left out)."""
    unknown = sorted(set(ckpt.masks) - set(ckpt.state))
    if unknown:
        raise ExportError(f"masks without a state tensor: {', '.join(unknown)}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[str, str] = {}                            # digest of an unmasked tensor -> its name
    for name in sorted(ckpt.state):
        t, mask = ckpt.state[name], ckpt.masks.get(name)
        if mask is None:
            digest = _digest(t.detach().cpu(), None)
            first = seen.get(digest)
            if first is not None and torch.equal(ckpt.state[first].detach().cpu(), t.detach().cpu()):
                entries[name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "layout": ALIAS, "of": first,
                                 "digest": digest}
                continue
            seen[digest] = name
        parts, entries[name] = encode_tensor(name, t, mask)
        tensors.update(parts)
    meta = {"format": SPARSE_FORMAT, "ladle": json.dumps(ckpt.meta, sort_keys=True, default=str),
            "tensors": json.dumps(entries, sort_keys=True, separators=(",", ":"))}
    meta["metadata_digest"] = _metadata_digest(meta)
    return st_save(tensors, metadata=meta)


def _metadata_digest(meta: dict[str, str]) -> str:
    """A 64-bit BLAKE2b of the format, the model's metadata and the tensors' entries."""
    h = hashlib.blake2b(digest_size=8)
    for key in ("format", "ladle", "tensors"):
        h.update(f"{key}={meta.get(key)}|".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- sparse: loading back

def _header(data: bytes, source: str) -> dict[str, str]:
    """The file's metadata, its header read as untrusted JSON (workers.jsonsafe)."""
    if len(data) < 8:
        raise SparseFormatError(f"{source} is truncated: {len(data)} bytes, not even a safetensors header")
    try:
        return safetensors_header(data, len(data)).metadata
    except JSONRefused as e:
        raise SparseFormatError(f"{source} is truncated or damaged: {e}") from e


def _parse_dtype(name: str, value: object, source: str) -> torch.dtype:
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise SparseFormatError(f"{source}: tensor {name!r} has an unknown dtype {value!r} in its metadata")
    return dtype


def _check_entry(name: str, e: object, source: str) -> tuple[tuple[int, ...], torch.dtype, str]:
    if not isinstance(e, dict):
        raise SparseFormatError(f"{source}: the metadata of tensor {name!r} is not an object")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise SparseFormatError(f"{source}: tensor {name!r} has a bad shape {shape!r} in its metadata")
    layout = e.get("layout")
    if layout not in PARTS:
        raise SparseFormatError(f"{source}: tensor {name!r} has an unknown layout {layout!r} "
                                f"(known: {', '.join(PARTS)})")
    if layout == ALIAS and (not isinstance(e.get("of"), str) or e.get("mask") is not None):
        raise SparseFormatError(f"{source}: tensor {name!r} is an alias without the name of the tensor it repeats")
    if e.get("mask") not in (None, "support", "packed"):
        raise SparseFormatError(f"{source}: tensor {name!r} has an unknown mask kind {e.get('mask')!r}")
    if layout in ("bitmask", "csr") and not (isinstance(e.get("nnz"), int) and 0 <= e["nnz"] <= math.prod(shape)):
        raise SparseFormatError(f"{source}: tensor {name!r} has a bad nonzero count {e.get('nnz')!r} for shape {shape}")
    if not isinstance(e.get("digest"), str):
        raise SparseFormatError(f"{source}: tensor {name!r} has no digest in its metadata")
    return tuple(shape), _parse_dtype(name, e.get("dtype"), source), layout


def _part(tensors: dict[str, torch.Tensor], kind: str, name: str, source: str, *, length: int | None = None,
          dtype: torch.dtype | None = None, dtypes: tuple[torch.dtype, ...] = ()) -> torch.Tensor:
    key = f"{kind}/{name}"
    t = tensors.get(key)
    if t is None:
        raise SparseFormatError(f"{source}: tensor {name!r} lacks its part {key!r}")
    if dtype is not None and t.dtype != dtype or dtypes and t.dtype not in dtypes:
        raise SparseFormatError(f"{source}: part {key!r} is {t.dtype}, not {dtype or ' or '.join(map(str, dtypes))}")
    if length is not None and (t.dim() != 1 or t.numel() != length):
        raise SparseFormatError(f"{source}: part {key!r} has shape {tuple(t.shape)}, not ({length},) as the "
                                f"metadata implies")
    return t


def decode_tensor(name: str, entry: dict, tensors: dict[str, torch.Tensor], source: str = "sparse file"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, mask or None) of one header entry, checked against it part by part and by its digest."""
    shape, dtype, layout = _check_entry(name, entry, source)
    n = math.prod(shape)
    if layout == "dense":
        t = _part(tensors, "dense", name, source, dtype=dtype)
        if tuple(t.shape) != shape:
            raise SparseFormatError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, its metadata says {shape}")
        keep = support(t) if entry.get("mask") == "support" else None
    else:
        nnz = entry["nnz"]
        values = _part(tensors, "values", name, source, length=nnz, dtype=dtype)
        flat = torch.zeros(n, dtype=dtype)
        if layout == "bitmask":
            keep = unpack_bits(_part(tensors, "bitmask", name, source, length=(n + 7) // 8, dtype=torch.uint8), n)
            if int(keep.sum()) != nnz:
                raise SparseFormatError(f"{source}: tensor {name!r}: its bitmask has {int(keep.sum())} bits set, "
                                        f"its metadata says {nnz} nonzeros")
            flat[keep] = values
        else:
            rows, cols = csr_shape(shape)
            ok = tuple(d for d, _ in INDEX_DTYPES)
            indptr = _part(tensors, "indptr", name, source, length=rows + 1, dtypes=ok).to(torch.int64)
            indices = _part(tensors, "indices", name, source, length=nnz, dtypes=ok).to(torch.int64)
            counts = indptr.diff()
            if int(indptr[0]) != 0 or int(indptr[-1]) != nnz or bool((counts < 0).any()):
                raise SparseFormatError(f"{source}: tensor {name!r}: its CSR row offsets are not a nondecreasing "
                                        f"run from 0 to {nnz}")
            if nnz and (int(indices.min()) < 0 or int(indices.max()) >= cols):
                raise SparseFormatError(f"{source}: tensor {name!r}: a CSR column index lies outside 0..{cols - 1}")
            where = torch.repeat_interleave(torch.arange(rows), counts) * cols + indices
            flat[where] = values
            keep = support(flat)
        t = flat.reshape(shape)
    mask = None
    if entry.get("mask") == "support":
        mask = keep.reshape(shape)
    elif entry.get("mask") == "packed":
        packed = _part(tensors, "mask", name, source, length=(n + 7) // 8, dtype=torch.uint8)
        mask = unpack_bits(packed, n).reshape(shape)
    if _digest(t, mask) != entry["digest"]:
        raise SparseFormatError(f"{source} is damaged: tensor {name!r} does not match the digest in its metadata")
    return t, mask


def from_sparse_bytes(data: bytes, *, source: str = "sparse file") -> Checkpoint:
    """Load a sparse export back into the checkpoint it was made from (state and masks bit-exact, its meta).
    A truncated, damaged or inconsistent file raises SparseFormatError naming the tensor and the problem."""
    meta = _header(data, source)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise SparseFormatError(f"{source} is not a readable safetensors file ({e})") from e
    if meta.get("format") != SPARSE_FORMAT:
        raise SparseFormatError(f"{source} is not a Ladle sparse export (format {meta.get('format')!r}, expected "
                                f"{SPARSE_FORMAT!r})")
    if meta.get("metadata_digest") != _metadata_digest(meta):
        raise SparseFormatError(f"{source} is damaged: its metadata (the model's or the tensors' entries) does not "
                                f"match the digest in its header")
    try:
        entries, ladle = loads(meta["tensors"], max_depth=8), loads(meta["ladle"])
    except (KeyError, ValueError, TypeError) as e:
        raise SparseFormatError(f"{source}: its metadata lacks or garbles 'tensors' or 'ladle' ({e})") from e
    if not isinstance(entries, dict):
        raise SparseFormatError(f"{source}: its 'tensors' metadata is not an object")
    expected = set()
    for name, e in entries.items():
        _check_entry(name, e, source)
        expected |= {f"{p}/{name}" for p in PARTS[e["layout"]]}
        if e.get("mask") == "packed":
            expected.add(f"mask/{name}")
    stray = sorted(set(tensors) - expected)
    if stray:
        raise SparseFormatError(f"{source}: tensors {', '.join(stray[:5])} are not described by its metadata")
    state, masks = {}, {}
    for name in sorted(entries):
        if entries[name]["layout"] == ALIAS:
            continue
        t, mask = decode_tensor(name, entries[name], tensors, source)
        state[name] = t
        if mask is not None:
            masks[name] = mask
    for name in sorted(entries):
        if entries[name]["layout"] == ALIAS:
            state[name] = decode_alias(name, entries[name], state, source)
    return Checkpoint(state={k: state[k] for k in sorted(state)}, masks=masks, meta=ladle)


def decode_alias(name: str, entry: dict, state: dict[str, torch.Tensor], source: str = "sparse file") -> torch.Tensor:
    """A copy of the tensor an alias repeats, checked against the alias's shape, dtype and digest."""
    shape, dtype, _ = _check_entry(name, entry, source)
    of = state.get(entry["of"])
    if of is None:
        raise SparseFormatError(f"{source}: tensor {name!r} is an alias of {entry['of']!r}, which the file does not "
                                f"hold")
    if tuple(of.shape) != shape or of.dtype != dtype:
        raise SparseFormatError(f"{source}: tensor {name!r} is an alias of {entry['of']!r}, which is "
                                f"{tuple(of.shape)} {of.dtype}, not {shape} {dtype}")
    t = of.clone()
    if _digest(t, None) != entry["digest"]:
        raise SparseFormatError(f"{source} is damaged: tensor {name!r} does not match the digest in its metadata")
    return t


def sparse_sizes(ckpt: Checkpoint) -> dict[str, int]:
    """Per layout, how many prunable tensors the sparse format stores in it (for reports)."""
    out = {k: 0 for k in LAYOUTS}
    for name, mask in ckpt.masks.items():
        t = ckpt.state[name]
        out[choose_layout(tuple(t.shape), t.dtype, int(support(t).sum()))] += 1
    return out


# ---------------------------------------------------------------- hf

def masked_sparsity(masks: Masks) -> float:
    """The share of prunable weights the masks prune (0 with no masks)."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int((~m.bool()).sum()) for m in masks.values()) / total) if total else 0.0


def hf_recipe(ckpt: Checkpoint) -> dict[str, Any]:
    """What `config.ladle_sparsity` says of a model: its id, kind, phase, job, the job's prune (and retrain)
    sections, the sparsity its masks reach and its lineage parents."""
    info = ckpt.info
    spec = info.spec or {}
    return {"format": "ladle-hf-1", "model_id": info.model_id, "kind": info.kind, "phase": info.phase,
            "name": info.name, "job": info.job, "structure": info.structure,
            "sparsity": round(masked_sparsity(ckpt.masks), 6),
            "prune": spec.get("prune"), "retrain": spec.get("retrain"), "parents": list(info.parents),
            "parent": info.parent, "arch": info.arch}


def save_hf(ckpt: Checkpoint, folder: str | Path) -> Path:
    """Write a causal LM checkpoint as a Hugging Face folder (``save_pretrained``: config.json with
    ``ladle_sparsity``, model.safetensors, the tokenizer's files) that ``AutoModelForCausalLM.from_pretrained``
    loads. The architecture and tokenizer come from the model's ``hf:`` folder; the weights from the checkpoint."""
    from workers.lm.model import is_causal_lm, load_causal_lm
    info = ckpt.info
    arch = info.arch
    if not is_causal_lm(arch):
        raise ExportError(f"the hf format is for causal language models (arch hf:<dir>); this model's arch is {arch!r}")
    model, tokenizer = load_causal_lm(arch, **info.model_kwargs)
    try:
        model.load_state_dict(ckpt.state)
    except RuntimeError as e:
        raise ExportError(f"the checkpoint does not fit {arch!r}: {e}") from e
    recipe = hf_recipe(ckpt)
    if info.structure != "unstructured":          # the removed neurons and KV groups leave the model
        from workers.lm.structured import check_whole_lm_groups, lm_groups, lm_removed, shrink_lm
        groups = lm_groups(model)
        check_whole_lm_groups(ckpt.masks, groups)
        removed = lm_removed(ckpt.masks, groups)
        model = shrink_lm(model, removed)
        recipe["removed"] = {"neurons_per_layer": len(removed["layers"][0]["neurons"]) if removed["layers"] else 0,
                             "kv_groups_per_layer": len(removed["layers"][0]["kv_groups"]) if removed["layers"] else 0}
    setattr(model.config, HF_RECIPE_KEY, recipe)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def zip_folder(folder: str | Path) -> bytes:
    """The files under `folder` as a zip archive (stored, sorted, fixed timestamps: same files, same bytes)."""
    folder, buf = Path(folder), io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())
    return buf.getvalue()


def hf_zip(ckpt: Checkpoint) -> bytes:
    """`save_hf` into a temporary folder, zipped (`zip_folder`)."""
    with tempfile.TemporaryDirectory(prefix="ladle-hf-") as tmp:
        return zip_folder(save_hf(ckpt, tmp))


# ---------------------------------------------------------------- one entry for every format

EXPORTERS = ("sparse", "hf", "onnx", "compact")   # the formats built from a checkpoint (dense is the checkpoint)


def export_bytes(ckpt: Checkpoint, fmt: str) -> bytes:
    """The export `fmt` (one of EXPORTERS) of a checkpoint; ExportError when the format does not fit it,
    ImportError when a package the format needs is missing here."""
    if fmt == "sparse":
        return to_sparse_bytes(ckpt)
    if fmt == "hf":
        return hf_zip(ckpt)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (the exporter's check of the zeros reads the graph with it)
        except ImportError as e:
            raise ImportError("the onnx export needs the onnx package (pip install onnx; a dependency of Ladle)") from e
        return onnx_bytes(ckpt)
    if fmt == "compact":
        return compact_bytes(ckpt)
    raise ExportError(f"unknown export format {fmt!r}; the formats built from a checkpoint are {', '.join(EXPORTERS)}")


# ---------------------------------------------------------------- onnx

def onnx_bytes(ckpt: Checkpoint, *, opset: int | None = None) -> bytes:
    """An image model's checkpoint as ONNX (input ``input`` of shape (batch, *in_shape), output ``logits``),
    checked to keep the mask's zeros in its initializers (a channel-pruned model: with its removed channels
    taken out, `image_model`)."""
    model, x, removed = image_model(ckpt, "onnx")
    buf = io.BytesIO()
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)        # the TorchScript exporter is "legacy"
        kw = {} if opset is None else {"opset_version": opset}
        torch.onnx.export(model, (x,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
    data = buf.getvalue()
    if removed is None:
        check_onnx_zeros(data, ckpt.masks)
    return data


def image_model(ckpt: Checkpoint, fmt: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, list[int]] | None]:
    """The image model of a checkpoint rebuilt, its state loaded, in eval mode, with one zero input of its
    shape, and, for a model pruned with structure channels, physically smaller (its removed channels, checked
    to be whole, taken out: the third value; None for other models)."""
    from workers.lm.model import is_causal_lm
    from workers.models import build_model
    info = ckpt.info
    arch = info.arch
    if is_causal_lm(arch) or info.task == "causal_lm":
        raise ExportError(f"the {fmt} format is for image models; {arch!r} is a causal language model (use hf)")
    if info.in_shape is None or info.num_classes is None:
        raise ExportError(f"the checkpoint's metadata lacks in_shape or num_classes, which the {fmt} export needs")
    model = build_model(arch, num_classes=info.num_classes, in_shape=info.in_shape, **info.model_kwargs)
    try:
        model.load_state_dict(ckpt.state)
    except RuntimeError as e:
        raise ExportError(f"the checkpoint does not fit {arch!r}: {e}") from e
    model.eval()
    x = torch.zeros(1, *info.in_shape)
    if info.structure != "channels":
        return model, x, None
    from workers.structured import channel_groups, check_whole_groups, shrink
    groups, _ = channel_groups(model, x)
    removed = check_whole_groups(ckpt.masks, groups)
    return shrink(model, x, removed).eval(), x, removed


# ---------------------------------------------------------------- compact

COMPACT_FORMAT = "ladle-compact-1"


def compact_bytes(ckpt: Checkpoint) -> bytes:
    """A channel-pruned image model with its removed channels taken out (module docstring: compact)."""
    from workers.checkpoint import cpu_state
    from workers.structured import removed_to_json
    if ckpt.info.structure != "channels":
        raise ExportError("the compact format is for models pruned with prune.structure channels (a model pruned "
                          "weight by weight keeps its shapes: use dense, sparse or onnx)")
    model, _, removed = image_model(ckpt, "compact")
    header = dict(ckpt.meta, removed_channels=removed_to_json(removed or {}))
    return st_save(cpu_state(model), metadata={"format": COMPACT_FORMAT,
                                               "ladle": json.dumps(header, sort_keys=True, default=str)})


def load_compact(data: bytes, *, source: str = "compact file") -> torch.nn.Module:
    """The smaller model of a compact export, in eval mode: its architecture built from the header
    (workers.models.build_model), the recorded channels removed the same way (workers.structured.rebuild),
    the state loaded."""
    from workers.config import CheckpointMeta
    from workers.models import build_model
    from workers.structured import rebuild
    try:
        meta = safetensors_header(data, len(data)).metadata
        state = st_load(data)
        header = loads(meta.get("ladle", ""))
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{source} is not a readable compact export ({e})") from e
    if meta.get("format") != COMPACT_FORMAT or not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a Ladle compact export (format {meta.get('format')!r})")
    info = CheckpointMeta.of(header)
    if info.arch is None or info.in_shape is None or info.num_classes is None:
        raise CheckpointError(f"{source} lacks the arch, in_shape or num_classes to rebuild its model")
    fresh = build_model(info.arch, num_classes=info.num_classes, in_shape=info.in_shape, **info.model_kwargs)
    model = rebuild(fresh.eval(), torch.zeros(1, *info.in_shape), header.get("removed_channels") or {})
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit its rebuilt model: {e}") from e
    return model.eval()


def onnx_initializers(data: bytes) -> dict[str, np.ndarray]:
    """The initializers of an ONNX model, by name."""
    import onnx
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}


def check_onnx_zeros(data: bytes, masks: Masks) -> None:
    """ExportError unless every masked weight is an initializer under its name that is 0 wherever its mask is."""
    inits = onnx_initializers(data)
    for name, mask in masks.items():
        w = inits.get(name)
        if w is None or tuple(w.shape) != tuple(mask.shape):
            raise ExportError(f"onnx export: weight {name!r} is not an initializer of its shape in the graph")
        if np.any(w[~mask.numpy().astype(bool)] != 0):
            raise ExportError(f"onnx export: weight {name!r} lost zeros of its mask")
