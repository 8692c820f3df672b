"""/api/v1/me: who the caller is. Never 401, so that a page can ask before it has a token."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import BearerDep, StoreDep, identify
from api.schemas import MePublic

router = APIRouter(tags=["auth"])


@router.get("/me", response_model=MePublic)
async def me(store: StoreDep, credentials: BearerDep) -> MePublic:
    """Whether auth is on and, if so, whether the bearer token is good and whose it is."""
    auth, caller = identify(store, credentials)
    return MePublic(auth=auth, authenticated=caller is not None, name=caller.name if caller else None,
                    admin=bool(caller and caller.admin))
