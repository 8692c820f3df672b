"""/api/v1/models: a model's record, its lineage DAG and its checkpoint."""

from __future__ import annotations

import fsspec
from fastapi import APIRouter, HTTPException, status
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, StoreDep, visible
from api.schemas import EdgePublic, LineagePublic, Message, ModelPublic

router = APIRouter(prefix="/models", tags=["models"])
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


@router.get("/{model_id}/download", responses={**NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}})
def download(model_id: str, store: StoreDep, caller: CallerDep) -> StreamingResponse:
    """The checkpoint (safetensors: state, mask and metadata)."""
    model = _model(store, caller, model_id)

    def chunks():
        with fsspec.open(model.uri, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    filename = f"{model.name.replace('/', '-')}-{model.id[:8]}.safetensors"
    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Content-Length": str(model.size_bytes), "X-Checksum-Sha256": model.sha256})
