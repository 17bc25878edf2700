"""The one error-to-exit step of every Restwise command.

    with cli_errors():                 # Restwise and OS errors -> one line + the registry's code
        ...
    raise exit_with(exc)               # the same for one caught exception
    raise exit_with(exc, as_json=True) # ... and one JSON line on stdout ({"ok": false, ...})

The line goes to stderr as ``Error: <message>``; the exit code is
``restwise.common.exit_codes.exit_for`` of the (translated) error, unless the caller names one
(``code=``: the same error may be a usage error in one command and a failure in another).
Anything that is neither a Restwise error nor translatable (a bug) propagates with its
traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from restwise.common.errors import translate_error
from restwise.common.exit_codes import ExitCode, exit_for


def json_safe(value: Any) -> Any:
    """JSON has no infinity or NaN: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def emit_json(payload: dict) -> None:
    """One machine-readable JSON line on stdout."""
    typer.echo(json.dumps(json_safe(payload), sort_keys=True, separators=(",", ":"), allow_nan=False))


def error_line(message: str) -> None:
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)


def exit_with(exc: BaseException, *, code: ExitCode | int | None = None, as_json: bool = False) -> typer.Exit:
    """Print ``exc`` as one line (and, with ``as_json``, one JSON line on stdout) and return
    the ``typer.Exit`` to raise."""
    error = translate_error(exc) or exc
    if as_json:
        emit_json({"ok": False, "error": str(error), "error_type": type(error).__name__})
    error_line(str(error))
    return typer.Exit(code=int(exit_for(error) if code is None else code))


def fail(message: str, code: ExitCode | int = ExitCode.FAILURE) -> typer.Exit:
    """A refusal the command itself decided on (no exception): one line, the given code."""
    error_line(message)
    return typer.Exit(code=int(code))


@contextmanager
def cli_errors(*, as_json: bool = False, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Restwise errors and OS errors end the command with one line and their exit code;
    ``also`` names further exception types a command reports the same way (exit 1)."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - translated below, or re-raised as a bug
        if translate_error(exc) is None and not isinstance(exc, also):
            raise
        raise exit_with(exc, as_json=as_json) from None


__all__ = ["cli_errors", "exit_with", "fail", "emit_json", "json_safe", "error_line"]
