"""Database administration: `ladle token create` writes to the database the server uses directly (no
server needed: the first token is how auth gets turned on)."""

from __future__ import annotations

from typing import Annotated

import typer

from api.cli.render import err_console, fail, out_console
from service.settings import get_settings

token_app = typer.Typer(help="API tokens (auth is on as soon as one exists).", no_args_is_help=True)


@token_app.command("create")
def token_create(name: Annotated[str, typer.Option("--name", help="who the token is for")],
                 admin: Annotated[bool, typer.Option("--admin", help="sees and cancels every job")] = False) -> None:
    """Mint a token in the database the server uses (shown once; stored hashed)."""
    from service.store import Store
    try:
        _, secret = Store(get_settings().database_url).create_token(name, admin=admin)
    except ValueError as e:
        raise fail(str(e), 2) from None
    err_console.print(f"token for {name}{' (admin)' if admin else ''}; it is shown only now:", highlight=False)
    out_console.print(secret)
