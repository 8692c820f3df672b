"""/api/v1/uploads: send a checkpoint or a dataset file (streamed to the artifact store, size-capped by
LADLE_MAX_UPLOAD_BYTES), list, inspect and delete your uploads. A spec names one as `upload:<id>`:
`model.checkpoint` for a checkpoint, `data.path` for a dataset (npz or text). See service/uploads.py."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError

from api.deps import CallerDep, RuntimeDep, StoreDep
from api.hardening import SafeJSONRoute
from api.schemas import Message, UploadPublic, UploadsPublic
from service import uploads

router = APIRouter(prefix="/uploads", tags=["uploads"], route_class=SafeJSONRoute)
NOT_FOUND = {404: {"model": Message, "description": "no such upload (or not yours)"}}
BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadPublic, openapi_extra=BINARY_BODY,
             responses={413: {"model": Message, "description": "the body is over LADLE_MAX_UPLOAD_BYTES, or the "
                                                                   "caller's uploads would hold more than "
                                                                   "LADLE_MAX_UPLOAD_BYTES_PER_USER"}})
async def upload(request: Request, store: StoreDep, runtime: RuntimeDep, caller: CallerDep,
                 kind: Annotated[Literal["checkpoint", "dataset"], Query(description="what the file is for")],
                 filename: Annotated[str, Query(min_length=1, max_length=200, description=(
                     "its name: *.safetensors (a checkpoint), *.npz or *.txt (a dataset)"))]) -> UploadPublic:
    """Store the body (the file's bytes, sent as they are) as the caller's upload. It is checked before it is
    kept: a checkpoint must be a Ladle checkpoint (`ladle download` gives one), a dataset an .npz archive or
    a .txt text. Nothing is kept when it is refused (422), too large (413) or broken off."""
    try:
        row = await uploads.receive(request.stream(), store=store, artifacts=runtime.settings.artifacts,
                                    owner=caller.name, kind=kind, filename=filename,
                                    quota=None if caller.admin else runtime.settings.max_upload_bytes_per_user)
    except uploads.UploadOverQuota as e:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(e), headers={"Connection": "close"}) from None
    except uploads.UploadRefused as e:
        raise RequestValidationError([{"loc": ("body",), "msg": str(e), "type": "value_error", "input": None}]) \
            from None
    return UploadPublic.model_validate(row)


@router.get("", response_model=UploadsPublic)
async def list_uploads(store: StoreDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                       offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0) -> UploadsPublic:
    """Your uploads (an admin's: everyone's), newest first."""
    rows, count = store.list_uploads(owner=caller.name, admin=caller.admin, limit=limit, offset=offset)
    return UploadsPublic(data=[UploadPublic.model_validate(r) for r in rows], count=count)


@router.get("/{upload_id}", response_model=UploadPublic, responses=NOT_FOUND)
async def get_upload(upload_id: str, store: StoreDep, caller: CallerDep) -> UploadPublic:
    row = store.get_upload(upload_id, owner=caller.name, admin=caller.admin)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"upload {upload_id} not found")
    return UploadPublic.model_validate(row)


@router.delete("/{upload_id}", response_model=UploadPublic, responses={
    **NOT_FOUND, 503: {"model": Message, "description": "its file cannot be removed now; nothing was deleted"}})
async def delete_upload(upload_id: str, store: StoreDep, caller: CallerDep) -> UploadPublic:
    """Delete your upload and its file. Jobs queued or running that name it fail when they read it."""
    try:
        row = await asyncio.to_thread(uploads.forget, store, upload_id, owner=caller.name, admin=caller.admin)
    except OSError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"upload {upload_id}'s file cannot be removed now "
                            f"({e.strerror or type(e).__name__}); it is kept, with its record: try again") from None
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"upload {upload_id} not found")
    return UploadPublic.model_validate(row)
