"""A stored model in each export format (design section 6c; the formats themselves are workers.export).

    dense    the stored checkpoint itself (safetensors: state, mask, metadata)
    sparse   ``<model uri>.sparse.safetensors``: bitmask or CSR per prunable tensor, loads back exact
    hf       ``<model uri>.hf.zip``: a Hugging Face folder, zipped (causal LMs only)
    onnx     ``<model uri>.onnx`` (image models only; not for ``import:`` archs, whose code the API
             process never imports, design section 8)

An export is built on first request from the stored dense checkpoint (read whole and checked against
the store's sha256 first), written next to it in the artifact store (atomically) and recorded in the
model's metrics: ``sizes`` {format: bytes, "dense" included} and ``export_sha256`` {format: sha256}.
Later requests get the cached file while its size matches the record (its bytes are checked against the
recorded sha256 as they are sent). A model replaced under the same name (a new id) starts with fresh
metrics, so its exports are rebuilt.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import fsspec

from workers.checkpoint import CheckpointError, from_bytes, read_url, sha256_bytes
from workers.export import ExportError, hf_zip, onnx_bytes, to_sparse_bytes
from workers.files import write_url
from workers.lm import is_causal_lm
from workers.models import IMPORT_PREFIX, ModelError

log = logging.getLogger("ladle.exports")
FORMATS = ("dense", "sparse", "hf", "onnx")
SUFFIX = {"dense": ".safetensors", "sparse": ".sparse.safetensors", "hf": ".hf.zip", "onnx": ".onnx"}
MEDIA_TYPE = {"dense": "application/octet-stream", "sparse": "application/octet-stream", "hf": "application/zip",
              "onnx": "application/octet-stream"}


class ExportRefused(ValueError):
    """The format does not fit this model (an LLM as onnx, an image model as hf, ...): the client's mistake."""


class ExportUnavailable(RuntimeError):
    """This server cannot build the export (a package or the model's base folder is missing here)."""


class SourceDamaged(RuntimeError):
    """The stored checkpoint does not match the store's record; nothing is exported from it."""


@dataclass(frozen=True)
class ExportFile:
    """One export of a model: where it is, its size and sha256, and what to call it for a client."""
    format: str
    uri: str
    size_bytes: int
    sha256: str
    filename: str
    media_type: str


def export_uri(model_uri: str, fmt: str) -> str:
    """Where the export `fmt` of the model stored at `model_uri` is kept (the checkpoint itself for dense)."""
    return model_uri if fmt == "dense" else model_uri + SUFFIX[fmt]


def filename(model, fmt: str) -> str:
    return f"{model.name.replace('/', '-')}-{model.id[:8]}{SUFFIX[fmt]}"


def check_format(fmt: str, arch: Any) -> None:
    """ExportRefused unless `fmt` is a format and fits a model of `arch` (the job spec's model.arch)."""
    if fmt not in FORMATS:
        raise ExportRefused(f"unknown export format {fmt!r}; the formats are {', '.join(FORMATS)}")
    llm = is_causal_lm(arch)
    if fmt == "hf" and not llm:
        raise ExportRefused(f"the hf format is for causal language models (arch hf:<dir>); this model's arch is "
                            f"{arch!r}: use dense, sparse or onnx")
    if fmt == "onnx" and llm:
        raise ExportRefused(f"the onnx format is for image models; this model is a causal language model ({arch!r}): "
                            f"use dense, sparse or hf")
    if fmt == "onnx" and isinstance(arch, str) and arch.startswith(IMPORT_PREFIX):
        raise ExportRefused(f"the onnx format needs the model's code, and the API never imports a module a job names "
                            f"({arch!r}); use dense or sparse")


def build(data: bytes, fmt: str, *, source: str = "checkpoint") -> bytes:
    """The export `fmt` of the checkpoint bytes `data`."""
    ckpt = from_bytes(data, source=source)
    if fmt == "sparse":
        return to_sparse_bytes(ckpt)
    if fmt == "hf":
        return hf_zip(ckpt)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (the exporter's check of the zeros reads the graph with it)
        except ImportError as e:
            raise ExportUnavailable("the onnx export needs the onnx package on the server (pip install onnx; "
                                    "a dependency of Ladle)") from e
        return onnx_bytes(ckpt)
    raise ExportRefused(f"unknown export format {fmt!r}; the formats are {', '.join(FORMATS)}")


def cached(model, fmt: str) -> ExportFile | None:
    """The recorded export `fmt` of `model` if its file is there with the recorded size."""
    metrics = model.metrics or {}
    size, sha = (metrics.get("sizes") or {}).get(fmt), (metrics.get("export_sha256") or {}).get(fmt)
    if not isinstance(size, int) or not isinstance(sha, str):
        return None
    uri = export_uri(model.uri, fmt)
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        if fs.size(path) != size:
            return None
    except (FileNotFoundError, OSError):
        return None
    return ExportFile(fmt, uri, size, sha, filename(model, fmt), MEDIA_TYPE[fmt])


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(model_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(model_id, threading.Lock())


def ensure(store, model, fmt: str, arch: Any) -> ExportFile:
    """The export `fmt` of the stored `model` (a store row) of a job whose model.arch is `arch`: the cached
    file, or one built now, written beside the checkpoint and recorded in the model's metrics. Blocking (it
    may take seconds): call it off the event loop. ExportRefused, ExportUnavailable, SourceDamaged."""
    check_format(fmt, arch)
    if fmt == "dense":
        return ExportFile(fmt, model.uri, model.size_bytes, model.sha256, filename(model, fmt), MEDIA_TYPE[fmt])
    with _lock(model.id):                       # one build per model at a time in this process
        model = store.get_model(model.id) or model
        hit = cached(model, fmt)
        if hit is not None:
            return hit
        try:
            data = read_url(model.uri)
        except OSError as e:
            raise SourceDamaged(f"model {model.id}: its checkpoint cannot be read ({e.strerror or e})") from e
        if len(data) != model.size_bytes or sha256_bytes(data) != model.sha256:
            raise SourceDamaged(f"model {model.id}: its stored checkpoint does not match the store's size and sha256; "
                                f"nothing was exported from it")
        try:
            out = build(data, fmt, source=f"model {model.id}'s checkpoint")
        except CheckpointError as e:
            raise SourceDamaged(str(e)) from e
        except ExportError as e:
            raise ExportRefused(str(e)) from e
        except ModelError as e:                 # the model's base (an hf: folder, a torchvision name) is not here
            raise ExportUnavailable(f"model {model.id} cannot be rebuilt on this server for the {fmt} export: "
                                    f"{e}") from e
        except (ExportUnavailable, ExportRefused):
            raise
        except Exception as e:  # noqa: BLE001 - an exporter's own failure (torch.onnx, transformers): said, not a trace
            log.exception("model %s: the %s export failed", model.id, fmt)
            raise ExportUnavailable(f"the {fmt} export of model {model.id} failed on this server "
                                    f"({type(e).__name__}: {e})") from e
        uri = export_uri(model.uri, fmt)
        try:
            write_url(uri, out)
        except OSError as e:
            raise ExportUnavailable(f"the {fmt} export of model {model.id} cannot be written to the artifact store "
                                    f"({e.strerror or e})") from e
        sha = sha256_bytes(out)
        metrics = model.metrics or {}
        store.add_model_metrics(model.id, sizes={**(metrics.get("sizes") or {}), "dense": model.size_bytes,
                                                 fmt: len(out)},
                                export_sha256={**(metrics.get("export_sha256") or {}), fmt: sha})
        return ExportFile(fmt, uri, len(out), sha, filename(model, fmt), MEDIA_TYPE[fmt])
