"""The API's bearer tokens, stored as the sha256 of their secret. Functions take an open session;
the caller owns the transaction (and the cache: service.store.Store).

A token is good while it is neither revoked (`revoked_at`) nor expired (`expires_at`, optional, set at
creation). A name belongs to at most one token that is not revoked (a partial unique index)."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.orm import Token, utcnow

MAX_LIFETIME = timedelta(days=3650)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)


class TokenRefused(Exception):
    """A secret that does not authenticate: `reason` is unknown, revoked or expired."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text: str | float | int) -> timedelta:
    """A token's lifetime: a number of seconds, or a number and a unit (s, m, h, d, w): "30d", "12h"."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = DURATION.fullmatch(str(text))
        if m is None:
            raise ValueError(f"cannot read the duration {text!r}: give a number and a unit (s, m, h, d, w), "
                             "such as 30d, 12h or 90m")
        seconds = float(m[1]) * UNITS[m[2].lower()]
    if not 0 < seconds <= MAX_LIFETIME.total_seconds():
        raise ValueError(f"a token's lifetime must be more than 0 s and at most {MAX_LIFETIME.days} days")
    return timedelta(seconds=seconds)


def state(token: Token, now: datetime | None = None) -> str:
    """active, revoked or expired."""
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= (now or utcnow()):
        return "expired"
    return "active"


def refusal(token: Token | None, now: datetime | None = None) -> TokenRefused | None:
    """Why this token (None: not found) does not authenticate, or None when it does."""
    if token is None:
        return TokenRefused("unknown", "unknown or revoked token")
    why = state(token, now)
    if why == "revoked":
        return TokenRefused(why, f"the token {token.name!r} was revoked on {token.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    if why == "expired":
        return TokenRefused(why, f"the token {token.name!r} expired on {token.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    return None


def mint(s: Session, name: str, *, admin: bool = False, expires_at: datetime | None = None) -> tuple[Token, str]:
    """A new token for `name`; returns the row and the secret (kept only as its hash)."""
    secret = f"ladle_{secrets.token_urlsafe(32)}"
    token = Token(id=uuid.uuid4().hex, name=name, admin=admin, token_hash=digest(secret), last4=secret[-4:],
                  expires_at=expires_at)
    s.add(token)
    return token, secret


def active_named(s: Session, name: str) -> Token | None:
    return s.scalars(sa.select(Token).where(Token.name == name, Token.revoked_at.is_(None))).one_or_none()


def put(s: Session, name: str, secret: str, *, admin: bool = False) -> Token:
    """The token `name` with this secret and role and no expiry (created, or the one of that name not
    revoked changed to it). A revoked secret is not brought back: ValueError."""
    key = digest(secret)
    same = by_digest(s, key)
    if same is not None and same.revoked_at is not None:
        raise ValueError(f"the token {name!r} of this secret was revoked; set a new secret")
    token = active_named(s, name)
    if token is None:
        token = Token(id=uuid.uuid4().hex, name=name)
        s.add(token)
    token.token_hash, token.admin, token.last4, token.expires_at = key, admin, secret[-4:], None
    return token


def by_digest(s: Session, key: str) -> Token | None:
    return s.scalars(sa.select(Token).where(Token.token_hash == key)).one_or_none()


def listing(s: Session) -> list[Token]:
    """Every token, revoked and expired ones included, oldest first."""
    return list(s.scalars(sa.select(Token).order_by(Token.created_at, Token.id)))


def find(s: Session, ref: str) -> Token | None:
    """The token with this id, or else the token not revoked with this name."""
    return s.get(Token, ref) or active_named(s, ref)


def revoke(s: Session, ref: str) -> Token | None:
    """Revoke the token `ref` (an id, or the name of a token not revoked); a revoked token stays as it is."""
    token = find(s, ref)
    if token is not None and token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def admin_exists(s: Session) -> bool:
    """Whether an admin token is usable: neither revoked nor expired."""
    q = sa.select(sa.func.count()).select_from(Token).where(
        Token.admin.is_(True), Token.revoked_at.is_(None),
        sa.or_(Token.expires_at.is_(None), Token.expires_at > utcnow()))
    return s.scalar(q) > 0
