"""The API's bearer tokens, stored as the sha256 of their secret. Functions take an open session;
the caller owns the transaction (and the cache: service.store.Store)."""

from __future__ import annotations

import hashlib
import secrets
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Token


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(s: Session, name: str, *, admin: bool = False) -> tuple[Token, str]:
    """A new token for `name`; returns the row and the secret (kept only as its hash)."""
    secret = f"ladle_{secrets.token_urlsafe(32)}"
    token = Token(id=uuid.uuid4().hex, name=name, admin=admin, token_hash=digest(secret))
    s.add(token)
    return token, secret


def put(s: Session, name: str, secret: str, *, admin: bool = False) -> Token:
    """The token `name` with this secret and role (created, or its secret and role replaced)."""
    token = s.scalars(sa.select(Token).where(Token.name == name)).one_or_none()
    if token is None:
        token = Token(id=uuid.uuid4().hex, name=name)
        s.add(token)
    token.token_hash, token.admin = digest(secret), admin
    return token


def by_digest(s: Session, key: str) -> Token | None:
    return s.scalars(sa.select(Token).where(Token.token_hash == key)).one_or_none()


def any_exist(s: Session) -> bool:
    return s.scalar(sa.select(sa.func.count()).select_from(Token)) > 0
