"""/api/v1/me: who the caller is. Never 401, so that a page can ask before it has a token."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.deps import AuthDep, BearerDep, StoreDep, authenticate
from api.hardening import SafeJSONRoute
from api.schemas import MePublic

router = APIRouter(tags=["auth"], route_class=SafeJSONRoute)


@router.get("/me", response_model=MePublic)
async def me(auth: AuthDep, store: StoreDep, credentials: BearerDep) -> MePublic:
    """Whether auth is on and, if so, whether the bearer token is good and whose it is."""
    try:
        caller = authenticate(auth, store, credentials)
    except HTTPException:
        caller = None
    return MePublic(auth=auth, authenticated=caller is not None, name=caller.name if caller else None,
                    admin=bool(caller and caller.admin))
