"""/api/v1/tokens: the API's bearer tokens, for admins (403 for other tokens): list, create (the secret
is in that answer only), revoke. A revoked token fails at once on this server, and within
api.deps.AUTH_MAX_AGE on other replicas."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api.deps import AdminDep, StoreDep
from api.hardening import SafeJSONRoute
from api.schemas import Message, TokenCreate, TokenCreatedPublic, TokenPublic, TokensPublic
from service.orm import utcnow
from service.store.tokens import parse_duration

router = APIRouter(prefix="/tokens", tags=["auth"], route_class=SafeJSONRoute)
ADMIN_ONLY = {403: {"model": Message, "description": "not an admin token"}}


@router.get("", response_model=TokensPublic, responses=ADMIN_ONLY)
async def list_tokens(store: StoreDep, _: AdminDep) -> TokensPublic:
    """Every token, oldest first, with its state (active, expired, revoked); never a secret."""
    rows = [TokenPublic.model_validate(t) for t in store.list_tokens()]
    return TokensPublic(data=rows, count=len(rows))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreatedPublic,
             responses={**ADMIN_ONLY, 409: {"model": Message, "description": "a token of that name is not revoked"}})
async def create_token(body: TokenCreate, store: StoreDep, _: AdminDep) -> TokenCreatedPublic:
    """Mint a token; its secret is in this answer only."""
    expires_at = utcnow() + parse_duration(body.expires_in) if body.expires_in is not None else None
    try:
        token, secret = store.create_token(body.name, admin=body.admin, expires_at=expires_at)
    except ValueError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    return TokenCreatedPublic(**TokenPublic.model_validate(token).model_dump(exclude={"state"}), secret=secret)


@router.delete("/{token_id}", response_model=TokenPublic,
               responses={**ADMIN_ONLY, 404: {"model": Message, "description": "no such token"}})
async def revoke_token(token_id: str, store: StoreDep, _: AdminDep) -> TokenPublic:
    """Revoke a token (by id, or by the name of a token not revoked); revoking it again changes nothing."""
    token = store.revoke_token(token_id)
    if token is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"token {token_id} not found")
    return TokenPublic.model_validate(token)
