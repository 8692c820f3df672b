"""Checkpoints: safetensors files that carry the model state, its mask and everything to rebuild it.

Layout: tensors ``state/<name>``, ``mask/<name>`` (bool) and ``extra/<name>`` (e.g. optimizer
buffers of an epoch checkpoint); header metadata ``ladle`` (JSON: arch, num_classes, in_shape, model
kwargs, job spec, lineage, ...; typed by `workers.config.CheckpointMeta`, checked on every save and
load, `Checkpoint.info`) and ``content_sha256``, a hash over the
tensors' names, dtypes, shapes and bytes that `load` verifies, so a damaged file is refused.
Files are written atomically (local: temporary file in the same folder, fsync, rename; object
stores through fsspec: one PUT), to a local path or any fsspec URL (s3://bucket/key, memory://...).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workers.evaluate import model_stats
from workers.jsonsafe import loads, safetensors_header
from workers.files import write_atomic, write_url  # noqa: F401  (checkpoint writers' helpers)
from workers.pruning import Masks
from workers.config import CheckpointError, CheckpointMeta, SavedModel  # noqa: F401  (torch-free: the driver and the API use them)


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    masks: Masks = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def info(self) -> CheckpointMeta:
        """The header, typed (CheckpointError names a key of the wrong type)."""
        return CheckpointMeta.of(self.meta)


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_bytes(ckpt: Checkpoint) -> bytes:
    """Serialise a checkpoint to safetensors bytes (CPU copies; shared storage is not a problem)."""
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor of its own storage: safetensors refuses tensors that share one (tied weights), and
        copying only those keeps a large model's save from doubling its memory."""
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() != t.untyped_storage().nbytes() // max(t.element_size(), 1):
            return t.clone()
        seen.add(ptr)
        return t

    ckpt.info                              # refuse to write a header whose keys have the wrong types
    tensors = {f"state/{k}": own(v) for k, v in ckpt.state.items()}
    tensors.update({f"mask/{k}": own(v.bool()) for k, v in ckpt.masks.items()})
    tensors.update({f"extra/{k}": own(v) for k, v in ckpt.extra.items()})
    meta = {"ladle": json.dumps(ckpt.meta, sort_keys=True, default=str),
            "content_sha256": _content_hash(tensors), "format": "ladle-checkpoint-1"}
    return st_save(tensors, metadata=meta)


def from_bytes(data: bytes, *, source: str = "checkpoint") -> Checkpoint:
    """Parse and verify checkpoint bytes; CheckpointError names `source` and what is wrong. The header and
    the metadata are read as untrusted JSON (workers.jsonsafe) before safetensors reads the tensors."""
    try:
        meta = safetensors_header(data, len(data)).metadata
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{source} is not a readable safetensors checkpoint ({e})") from e
    if meta.get("format") != "ladle-checkpoint-1":
        raise CheckpointError(f"{source} is a safetensors file but not a Ladle checkpoint (no ladle metadata)")
    if _content_hash(tensors) != meta.get("content_sha256"):
        raise CheckpointError(f"{source} is corrupted: its tensors do not match the checksum in its header")
    try:
        ladle = loads(meta.get("ladle", ""))
    except ValueError as e:
        raise CheckpointError(f"{source} has Ladle metadata that cannot be read ({e})") from e
    if not isinstance(ladle, dict):
        raise CheckpointError(f"{source} has Ladle metadata that is not a JSON object")
    try:
        CheckpointMeta.of(ladle)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from e
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
    masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask/")}
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}
    return Checkpoint(state=state, masks=masks, meta=ladle, extra=extra)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_url(url: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes at `url`; with `max_bytes`, a `CheckpointError` when it holds more (at most max_bytes + 1
    are read)."""
    with fsspec.open(str(url), "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise CheckpointError(f"checkpoint {url} holds more than {max_bytes} bytes, the most this service reads")
    return data


def save(url: str | os.PathLike, ckpt: Checkpoint) -> tuple[int, str]:
    """Write the checkpoint (atomically); return (size in bytes, sha256 of the file)."""
    data = to_bytes(ckpt)
    write_url(url, data)
    return len(data), sha256_bytes(data)


def load(url: str | os.PathLike, *, max_bytes: int | None = None) -> Checkpoint:
    try:
        data = read_url(url, max_bytes)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {e.strerror or e}") from e
    return from_bytes(data, source=f"checkpoint {url}")


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, detached, on the CPU (what a checkpoint holds, and an outcome with `keep_state`)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_model(url: str, model: torch.nn.Module, masks: Masks, meta: dict[str, Any]) -> SavedModel:
    """Save a model's state (on the CPU) with its masks and `meta` to `url`; return its record."""
    stats = model_stats(model, masks)
    state = cpu_state(model)
    size, sha = save(url, Checkpoint(state=state, masks=masks, meta=meta))
    return SavedModel(uri=str(url), size_bytes=size, sha256=sha, sparsity=stats["sparsity"],
                      nonzeros=stats["nonzeros"], parameters=stats["parameters"],
                      layer_sparsity=stats["layer_sparsity"])
