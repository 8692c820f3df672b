"""Dependencies shared by the routers: the store, the runtime and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.runtime import Runtime
from service.store import Store

bearer = HTTPBearer(auto_error=False)
# Auth answers (is auth on? whose token is this?) may be this old: the check runs on every request, and
# a token minted by another process (`ladle token create`) turns auth on within this many seconds.
AUTH_MAX_AGE = 1.0


@dataclass(frozen=True)
class Caller:
    name: str | None          # None: auth is off (embedded, loopback only)
    admin: bool


# The dependencies are `async def` so that they run on the event loop: a sync dependency would cost a
# trip to the thread pool on every request. get_caller asks the database at most once per AUTH_MAX_AGE.
async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_store(request: Request) -> Store:
    return request.app.state.runtime.store


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def identify(store: Store, credentials: HTTPAuthorizationCredentials | None) -> tuple[bool, Caller | None]:
    """(is auth on, who is calling): the caller is None when auth is on and the token is missing or bad."""
    if not store.auth_enabled(max_age=AUTH_MAX_AGE):
        return False, Caller(name=None, admin=True)
    token = store.check_token(credentials.credentials, max_age=AUTH_MAX_AGE) if credentials else None
    return True, (Caller(name=token.name, admin=token.admin) if token else None)


async def get_caller(store: Annotated[Store, Depends(get_store)], credentials: BearerDep) -> Caller:
    _, caller = identify(store, credentials)
    if caller is not None:
        return caller
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown or revoked token",
                        headers={"WWW-Authenticate": "Bearer"})


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
StoreDep = Annotated[Store, Depends(get_store)]
CallerDep = Annotated[Caller, Depends(get_caller)]


def visible(caller: Caller, owner: str | None) -> bool:
    """Admins and auth-less callers see everything; a user sees their own jobs and models."""
    return caller.admin or caller.name is None or owner == caller.name
