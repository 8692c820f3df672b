"""/api/v1/models: a model's record, its lineage DAG, its one-shot robustness curve and its checkpoint."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import fsspec
from fastapi import APIRouter, HTTPException, status
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, StoreDep, visible
from api.schemas import EdgePublic, LineagePublic, Message, ModelPublic, RobustnessPoint, RobustnessPublic

router = APIRouter(prefix="/models", tags=["models"])
log = logging.getLogger("ladle.api")
NOT_FOUND = {404: {"model": Message, "description": "no such model (or not yours)"}}


def public(model) -> ModelPublic:
    out = ModelPublic.model_validate(model)
    out.accuracy = (model.metrics or {}).get("test_accuracy")
    out.perplexity = (model.metrics or {}).get("test_perplexity")
    return out


def _model(store, caller, model_id: str):
    model = store.get_model(model_id)
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} not found")
    job = store.get_job(model.job_id)
    if not visible(caller, job.owner if job else None):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} not found")
    return model


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


def verified_chunks(model, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The model's file, chunk by chunk, checked against the store's size and sha256 as it is read. The
    last chunk is held back until the whole file has matched: on a mismatch CorruptArtifact is logged and
    raised instead, so the response breaks off short of its Content-Length and no client takes a file
    that differs from the store's record for a whole one."""
    digest, size, held = hashlib.sha256(), 0, b""
    with fsspec.open(model.uri, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
            if size > model.size_bytes:
                break
            if held:
                yield held
            held = chunk
    why = (f"longer than the {model.size_bytes} bytes recorded" if size > model.size_bytes else
           f"{size} bytes, not the {model.size_bytes} recorded" if size < model.size_bytes else
           f"sha256 {digest.hexdigest()}, not the {model.sha256} recorded" if digest.hexdigest() != model.sha256
           else None)
    if why is not None:
        log.error("model %s: its file %s does not match the store (%s); the download was broken off",
                  model.id, model.uri, why)
        raise CorruptArtifact(f"model {model.id}: its file does not match the store ({why})")
    if held:
        yield held


@router.get("/{model_id}/download", responses={**NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}})
def download(model_id: str, store: StoreDep, caller: CallerDep) -> StreamingResponse:
    """The checkpoint (safetensors: state, mask and metadata). `X-Checksum-Sha256` is the sha256 the
    store recorded: the bytes are checked against it as they are sent, and a file that does not match
    is not sent whole (the transfer breaks off); clients check it too (api.client.Client.download)."""
    model = _model(store, caller, model_id)
    filename = f"{model.name.replace('/', '-')}-{model.id[:8]}.safetensors"
    return StreamingResponse(verified_chunks(model), media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Content-Length": str(model.size_bytes), "X-Checksum-Sha256": model.sha256})
