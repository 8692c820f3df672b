"""Database administration: `ladle token create|list|revoke` work on the database the server uses
directly (LADLE_DATABASE_URL; no server needed: the first admin token is made this way). Whether the
server asks for tokens is its LADLE_AUTH setting, not whether tokens exist."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from api.cli.render import err_console, fail, out_console
from service.settings import get_settings

token_app = typer.Typer(help="API tokens: create, list, revoke (in the server's database; LADLE_AUTH turns auth on).",
                        no_args_is_help=True)


def _store():
    from service.store import Store
    return Store(get_settings().database_url)


def _when(t: datetime | None, none: str = "") -> str:
    return none if t is None else f"{t:%Y-%m-%d %H:%M} UTC"


@token_app.command("create")
def token_create(
        name: Annotated[str, typer.Option("--name", help="who the token is for (the owner of its jobs)")],
        admin: Annotated[bool, typer.Option("--admin", help="sees and cancels every job, manages tokens")] = False,
        expires_in: Annotated[str | None, typer.Option(
            "--expires-in", help="lifetime, such as 30d, 12h, 90m (default: until revoked)")] = None) -> None:
    """Mint a token in the database the server uses (shown once; stored hashed)."""
    from service.orm import utcnow
    from service.store.tokens import parse_duration
    try:
        expires_at = utcnow() + parse_duration(expires_in) if expires_in is not None else None
    except ValueError as e:
        raise fail(f"--expires-in: {e}", 2) from None
    store = _store()
    try:
        token, secret = store.create_token(name, admin=admin, expires_at=expires_at)
    except ValueError as e:
        raise fail(str(e), 2) from None
    finally:
        store.engine.dispose()
    err_console.print(f"token {token.id} for {name}{' (admin)' if admin else ''}"
                      f"{', expires ' + _when(token.expires_at) if token.expires_at else ''}; it is shown only now:",
                      highlight=False)
    out_console.print(secret, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(json_output: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False) -> None:
    """Every token: id, name, role, state, created, expires, revoked and the secret's last 4 characters
    (never the secret)."""
    from api.schemas import TokenPublic
    store = _store()
    try:
        rows = [TokenPublic.model_validate(t) for t in store.list_tokens()]
    finally:
        store.engine.dispose()
    if json_output:
        out_console.print_json(json.dumps({"data": [r.model_dump(mode="json") for r in rows], "count": len(rows)}))
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption=f"{len(rows)} tokens")
    for col in ("id", "name", "role", "state", "created", "expires", "revoked", "last 4"):
        table.add_column(col, no_wrap=col != "name")
    for r in rows:
        table.add_row(r.id, r.name, "admin" if r.admin else "user", r.state, _when(r.created_at),
                      _when(r.expires_at, "never"), _when(r.revoked_at), f"…{r.last4}" if r.last4 else "")
    out_console.print(table)


@token_app.command("revoke")
def token_revoke(
        token: Annotated[str, typer.Argument(help="the token's id, or the name of a token not revoked")]) -> None:
    """Revoke a token: it stops working at once (within a second on a running server)."""
    store = _store()
    try:
        row = store.revoke_token(token)
    finally:
        store.engine.dispose()
    if row is None:
        raise fail(f"no token {token!r} (give an id from `ladle token list`, or the name of a token not revoked)")
    err_console.print(f"token {row.id} ({row.name}) revoked on {_when(row.revoked_at)}", highlight=False)
