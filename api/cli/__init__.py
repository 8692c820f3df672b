"""The `ladle` command line (console script `ladle = "api.cli:app"`), one module per role:

- render: what the commands print (consoles, tables, progress, the demo's verdict)
- remote: the client commands that talk to a server through the SDK (submit, status, logs, cancel,
  lineage, download, export, upload, compare)
- host: the commands that host the service or run a job in this process (run, demo, serve)
- admin: the database's administration (token create, list, revoke)

This module only builds the Typer app from them, in the order `ladle --help` lists the commands.
"""

from __future__ import annotations

import typer
from pydantic import ValidationError

from api.cli import admin, host, remote
from api.cli.render import fail
from service.settings import get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Ladle: prune neural networks and retrain them as Sparse Model Soups.")


@app.callback()
def settings_first() -> None:
    """LADLE_* settings that do not validate stop every command with one message naming them (exit 2)."""
    try:
        get_settings()
    except ValidationError as e:
        raise fail("bad settings: " + "; ".join(f"LADLE_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                                                for err in e.errors()), 2) from None
for command in (*host.COMMANDS, *remote.COMMANDS):
    app.command()(command)
app.add_typer(admin.token_app, name="token")
