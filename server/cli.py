"""`restwise server ...`: the operator's commands. Areas add their commands via `register`:
federation/deployment (`server/federation_cli.py`) and the API service (`server/service_cli.py`)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Operators: run the federation server and the API service.", no_args_is_help=True)

for _module in ("restwise.server.federation_cli", "restwise.server.service_cli"):
    try:
        _mod = __import__(_module, fromlist=["register"])
    except ImportError as _exc:
        if getattr(_exc, "name", None) != _module:
            raise
        continue
    _mod.register(app)
