"""Dependencies shared by the routers: the store, the runtime and the caller's identity.

Whether auth is on is the app's setting (`create_app(auth=...)`, from LADLE_AUTH and the bind address),
fixed for the server's life: it never depends on which tokens are stored. With auth off every caller is
an anonymous admin (and api.app serves loopback Host names only); with auth on every route but /health
and /me needs a good bearer token (401 otherwise, saying whether it is missing, unknown, revoked or
expired), and the admin routes need an admin token (403)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.runtime import ApiRuntime, Runtime
from service.store import Store, TokenRefused

bearer = HTTPBearer(auto_error=False)
# A good token's answer may be this old (seconds): the check runs on every request, so a token deleted or
# revoked by another process (`ladle token revoke`, another API replica) still passes for at most this
# long. One revoked through this server's API fails at once; an expired one fails at once.
AUTH_MAX_AGE = 1.0


@dataclass(frozen=True)
class Caller:
    name: str | None          # None: auth is off (loopback only)
    admin: bool


ANONYMOUS = Caller(name=None, admin=True)


# The dependencies are `async def` so that they run on the event loop: a sync dependency would cost a
# trip to the thread pool on every request. get_caller asks the database at most once per AUTH_MAX_AGE.
async def get_runtime(request: Request) -> Runtime | ApiRuntime:
    return request.app.state.runtime


async def get_store(request: Request) -> Store:
    return request.app.state.runtime.store


async def auth_on(request: Request) -> bool:
    return request.app.state.auth


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
AuthDep = Annotated[bool, Depends(auth_on)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def authenticate(auth: bool, store: Store, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    """Who is calling, or HTTPException 401 (the reason in its detail)."""
    if not auth:
        return ANONYMOUS
    if credentials is None:
        raise _unauthorized("a bearer token is required")
    try:
        token = store.authenticate(credentials.credentials, max_age=AUTH_MAX_AGE)
    except TokenRefused as e:
        raise _unauthorized(e.message) from None
    return Caller(name=token.name, admin=token.admin)


async def get_caller(request: Request, credentials: BearerDep) -> Caller:
    # the app's auth setting and store read here, not through auth_on and get_store: each dependency
    # FastAPI solves costs some µs on every request (these two: 0.01 ms of a 0.33 ms GET /jobs/{id})
    state = request.app.state
    return authenticate(state.auth, state.runtime.store, credentials)


async def get_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"this needs an admin token; the token {caller.name!r} is not one")
    return caller


RuntimeDep = Annotated[Runtime | ApiRuntime, Depends(get_runtime)]
StoreDep = Annotated[Store, Depends(get_store)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(get_admin)]


def visible(caller: Caller, owner: str | None) -> bool:
    """Admins and auth-less callers see everything; a user sees their own jobs and models."""
    return caller.admin or caller.name is None or owner == caller.name
