"""`python -m api.cli`: the `ladle` command without the console script."""

from __future__ import annotations

from api.cli import app

app()
