"""/api/v1/models: a model's record, its lineage DAG, its one-shot robustness curve and its checkpoint, in
each export format (`?format=dense|sparse|hf|onnx`, service.exports)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Annotated, Literal

import fsspec
from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field

from api.deps import CallerDep, RuntimeDep, StoreDep, visible
from api.hardening import SafeJSONRoute
from api.schemas import EdgePublic, LineagePublic, Message, ModelPublic, RobustnessPoint, RobustnessPublic
from service import exports

router = APIRouter(prefix="/models", tags=["models"], route_class=SafeJSONRoute)
log = logging.getLogger("ladle.api")
NOT_FOUND = {404: {"model": Message, "description": "no such model (or not yours)"}}


def public(model) -> ModelPublic:
    out = ModelPublic.model_validate(model)
    out.accuracy = (model.metrics or {}).get("test_accuracy")
    out.perplexity = (model.metrics or {}).get("test_perplexity")
    sizes = (model.metrics or {}).get("sizes")
    out.sizes = {"dense": model.size_bytes, **(sizes if isinstance(sizes, dict) else {})}
    return out


def _model_and_job(store, caller, model_id: str):
    model = store.get_model(model_id)
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} not found")
    job = store.get_job(model.job_id)
    if not visible(caller, job.owner if job else None):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} not found")
    return model, job


def _model(store, caller, model_id: str):
    return _model_and_job(store, caller, model_id)[0]


@router.get("/{model_id}", response_model=ModelPublic, responses=NOT_FOUND)
async def get_model(model_id: str, store: StoreDep, caller: CallerDep) -> ModelPublic:
    # two key lookups, on the event loop (see api.routes.jobs)
    return public(_model(store, caller, model_id))


@router.get("/{model_id}/lineage", response_model=LineagePublic, responses=NOT_FOUND)
def get_lineage(model_id: str, store: StoreDep, caller: CallerDep) -> LineagePublic:
    """The model and all its ancestors, with typed edges (pruned_from, retrained_from, averaged_from)."""
    _model(store, caller, model_id)
    graph = store.lineage(model_id)
    return LineagePublic(nodes=[public(n) for n in graph["nodes"]], edges=[EdgePublic(**e) for e in graph["edges"]])


def _not_measured(model, spec: dict) -> str:
    """Why a model has no robustness curve."""
    if model.kind != "dense":
        return (f"not measured: the one-shot robustness curve is measured for a job's dense model (phase 0), "
                f"this is a {model.kind} model")
    if "robustness" in (spec.get("prune") or {}) and not spec["prune"]["robustness"]:
        return "not measured: the job's spec turned it off (prune.robustness: null)"
    if "test_perplexity" in (model.metrics or {}) or "val_perplexity" in (model.metrics or {}):
        return "not measured: language models have no one-shot robustness curve"
    return "not measured: the job that made this model did not measure it"


@router.get("/{model_id}/robustness", response_model=RobustnessPublic, responses=NOT_FOUND)
def get_robustness(model_id: str, store: StoreDep, caller: CallerDep) -> RobustnessPublic:
    """The dense model's one-shot robustness curve: its accuracy after global magnitude pruning to each
    sparsity of the job's `prune.robustness` grid, BatchNorm recalibrated, no retraining (measured in
    phase 0; also in the model's `metrics.robustness`). A model without one gets 200 with no points and
    a `detail` saying why; an unknown model (or another user's) gets 404."""
    model = _model(store, caller, model_id)
    metrics = model.metrics or {}
    points = metrics.get("robustness") or []
    split = metrics.get("robustness_split")
    out = RobustnessPublic(model_id=model.id, points=[RobustnessPoint(**p) for p in points], split=split,
                           dense_accuracy=metrics.get(f"{split}_accuracy") if split else None)
    if not points:
        job = store.get_job(model.job_id)
        out.detail = _not_measured(model, (job.spec if job else None) or {})
    return out


class CorruptArtifact(RuntimeError):
    """A model's stored file does not match the size or sha256 the store recorded for it."""


def verified_chunks(model, chunk_size: int = 1 << 20, *, uri: str | None = None, size_bytes: int | None = None,
                    sha256: str | None = None, what: str = "file") -> Iterator[bytes]:
    """The model's file (or the export at `uri` with its recorded `size_bytes` and `sha256`), chunk by chunk,
    checked against the store's size and sha256 as it is read. The last chunk is held back until the whole
    file has matched: on a mismatch CorruptArtifact is logged and raised instead, so the response breaks off
    short of its Content-Length and no client takes a file that differs from the store's record for a whole one."""
    uri = model.uri if uri is None else uri
    expected_size = model.size_bytes if size_bytes is None else size_bytes
    expected_sha = model.sha256 if sha256 is None else sha256
    digest, size, held = hashlib.sha256(), 0, b""
    with fsspec.open(uri, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
            if size > expected_size:
                break
            if held:
                yield held
            held = chunk
    why = (f"longer than the {expected_size} bytes recorded" if size > expected_size else
           f"{size} bytes, not the {expected_size} recorded" if size < expected_size else
           f"sha256 {digest.hexdigest()}, not the {expected_sha} recorded" if digest.hexdigest() != expected_sha
           else None)
    if why is not None:
        log.error("model %s: its %s %s does not match the store (%s); the download was broken off",
                  model.id, what, uri, why)
        raise CorruptArtifact(f"model {model.id}: its {what} does not match the store ({why})")
    if held:
        yield held


ExportFormat = Literal[exports.FORMATS]
DEFAULT_EXPORT_WAIT, MAX_EXPORT_WAIT = 30.0, 300.0
WAIT_HELP = ("seconds to wait for an export that is not built yet (its build goes on after that: the answer is then "
             "202, ask again)")
FORMAT_HELP = ("dense: the stored checkpoint (safetensors: state, mask, metadata); sparse: safetensors with a bitmask "
               "or CSR per pruned tensor (loads back exact, workers.export.from_sparse_bytes); hf: a zip of a Hugging "
               "Face folder (causal LMs); onnx: ONNX (image models); compact: safetensors of an image model pruned with "
               "prune.structure channels with its removed channels taken out (workers.export.load_compact). A "
               "channel-pruned model's onnx and hf exports come out physically smaller too")


class ExportPendingPublic(Message):
    """An export still being built when the wait ran out: ask again (the build goes on)."""
    state: str = Field(description="the build's state: pending (waiting for a node with its resources) or running")
    seconds: float = Field(description="seconds since the build started")


@router.get("/{model_id}/download", responses={
    **NOT_FOUND, 200: {"content": {"application/octet-stream": {}, "application/zip": {}}},
    202: {"model": ExportPendingPublic, "description": "the export is being built on the cluster: ask again "
                                                          "(Retry-After says when)"},
    500: {"model": Message, "description": "the stored checkpoint does not match the store's record"},
    503: {"model": Message, "description": "the export cannot be built now (the cluster does not answer, no "
                                           "node can hold it, a package is missing) or its build failed"}})
def download(model_id: str, store: StoreDep, caller: CallerDep, runtime: RuntimeDep,
             format: Annotated[ExportFormat, Query(description=FORMAT_HELP)] = "dense",
             wait: Annotated[float, Query(ge=0, le=MAX_EXPORT_WAIT, allow_inf_nan=False,
                                          description=WAIT_HELP)] = DEFAULT_EXPORT_WAIT) -> Response:
    """The model in an export format (default dense: the checkpoint as stored). An export other than dense is
    built from the checkpoint on the first request, as a Ray job of its own on the cluster with the model's
    resources (the API process never loads the model), kept next to it in the artifact store and recorded in
    the model's metrics (`sizes`, `export_sha256`). A build not done within `wait` seconds answers 202 with its
    state; it goes on, and asking again joins it (from any API process).
    `X-Checksum-Sha256` is the sha256 the store recorded for the file sent: the bytes are checked against it
    as they are sent, and a file that does not match is not sent whole (the transfer breaks off); clients
    check it too (api.client.Client.download, Client.export)."""
    model, job = _model_and_job(store, caller, model_id)
    try:
        out = exports.ensure(store, model, format, job.spec if job is not None else None, runtime.exporter,
                             wait=wait)
    except exports.ExportPending as e:
        body = ExportPendingPublic(detail=str(e), state=e.state, seconds=round(e.seconds, 1))
        return JSONResponse(body.model_dump(), status_code=status.HTTP_202_ACCEPTED, headers={"Retry-After": "1"})
    except exports.ExportRefused as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,       # shaped like a validation error
                            [{"loc": ["query", "format"], "msg": str(e), "type": "value_error"}]) from None
    except exports.ExportUnavailable as e:
        log.warning("model %s: %s", model.id, e)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
    except exports.SourceDamaged as e:
        log.error("model %s: %s", model.id, e)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(e)) from None
    what = "file" if format == "dense" else f"{format} export"
    return StreamingResponse(verified_chunks(model, uri=out.uri, size_bytes=out.size_bytes, sha256=out.sha256,
                                             what=what),
                             media_type=out.media_type,
                             headers={"Content-Disposition": f'attachment; filename="{out.filename}"',
                                      "Content-Length": str(out.size_bytes), "X-Checksum-Sha256": out.sha256,
                                      "X-Ladle-Format": format})
