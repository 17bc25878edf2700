"""`restwise server ...`: the operator's commands - federation and deployment
(``server/federation_cli.py``) and the API service (``server/service_cli.py``)."""

from __future__ import annotations

import typer

from restwise.server import federation_cli, service_cli

app = typer.Typer(help="Operators: run the federation server and the API service.", no_args_is_help=True)
federation_cli.register(app)
service_cli.register(app)
