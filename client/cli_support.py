"""What every `restwise device ...` command shares: the store, passphrase and keystore options,
opening the store (by passphrase or keystore, ``client/unlock.py``), the consoles, notes, and
the error step (``device_errors``: one line and the exit code of ``restwise.common.exit_codes``).
The command modules (``client/cli.py``, ``coach_cli.py``, ``federation_cli.py``, ``join_cli.py``,
``trend.py``) import it; it imports none of them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from restwise.client import unlock
from restwise.client.errors import RestwiseDeviceError
from restwise.client.passphrase import check_passphrase
from restwise.common.cli_errors import cli_errors

console = Console(stderr=False)
err_console = Console(stderr=True)

STORE_HELP = (
    "Folder of your encrypted Restwise store. Also read from RESTWISE_STORE. "
    "Default: ~/.restwise/store"
)
PASSFILE_HELP = (
    "Read the passphrase from the first line of this file (for automation). "
    "Also read from RESTWISE_PASSPHRASE_FILE. Without it you are asked to type it."
)
KEYSTORE_HELP = (
    "Folder of the file keystore that opens the store (if it has one; see `restwise device "
    "keystore add`). Also read from RESTWISE_KEYSTORE. Default: a folder `keystore` beside "
    "the store folder."
)
ALLOW_WEAK_HELP = (
    "Accept a passphrase that is easy to guess (zxcvbn score below 3). For tests and demos only."
)

def default_store() -> Path:
    env = os.environ.get("RESTWISE_STORE")
    if env:
        return Path(env).expanduser()
    return Path("~/.restwise/store").expanduser()


StoreOpt = typer.Option(None, "--store", "-s", help=STORE_HELP, show_default=False)
PassFileOpt = typer.Option(None, "--passphrase-file", help=PASSFILE_HELP, show_default=False)
KeystoreOpt = typer.Option(None, "--keystore", help=KEYSTORE_HELP, show_default=False)
AllowWeakOpt = typer.Option(False, "--allow-weak", help=ALLOW_WEAK_HELP)


def resolve_store(store: Optional[Path]) -> Path:
    return Path(store).expanduser() if store else default_store()


def resolve_keystore(keystore: Optional[Path], folder: Path) -> Path:
    """--keystore, else RESTWISE_KEYSTORE, else the folder ``keystore`` beside the store."""
    if keystore:
        return Path(keystore).expanduser()
    if os.environ.get("RESTWISE_KEYSTORE"):
        return Path(os.environ["RESTWISE_KEYSTORE"]).expanduser()
    return unlock.default_keystore_dir(folder)


def passphrase_given(passphrase_file: Optional[Path]) -> bool:
    """Did the person hand over the passphrase explicitly (file or environment)?"""
    return passphrase_file is not None or bool(
        os.environ.get("RESTWISE_PASSPHRASE_FILE") or os.environ.get("RESTWISE_PASSPHRASE")
    )


def read_passphrase(passphrase_file: Optional[Path], *, confirm: bool = False, prompt: str = "Passphrase") -> str:
    """Passphrase from --passphrase-file, RESTWISE_PASSPHRASE_FILE, RESTWISE_PASSPHRASE, or a prompt."""
    path = passphrase_file or (
        Path(os.environ["RESTWISE_PASSPHRASE_FILE"]) if os.environ.get("RESTWISE_PASSPHRASE_FILE") else None
    )
    if path is not None:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"cannot read the passphrase file {path}: {exc.strerror}") from None
        first = text.splitlines()[0] if text else ""
        if not first:
            raise typer.BadParameter(f"the passphrase file {path} is empty")
        return first
    if os.environ.get("RESTWISE_PASSPHRASE"):
        return os.environ["RESTWISE_PASSPHRASE"]
    if not sys.stdin.isatty():
        raise typer.BadParameter(
            "no passphrase given: use --passphrase-file, RESTWISE_PASSPHRASE_FILE or "
            "RESTWISE_PASSPHRASE when not running in a terminal"
        )
    return typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


# Device errors and OS errors (a file the person named, a store on a full or read-only disk)
# end a command with one line naming the problem and the documented exit code.
device_errors = cli_errors


def note(text: str) -> None:
    """Tell the person something they should know (stderr, once)."""
    err_console.print(f"[yellow]Note:[/] {escape(text)}")


def open_store(store: Optional[Path], passphrase_file: Optional[Path], keystore: Optional[Path] = None,
               *, remember: dict | None = None):
    """Open the store by passphrase or keystore (rules: :mod:`restwise.client.unlock`).
    ``remember`` receives the passphrase if one was read (for `status --verify`)."""
    folder = resolve_store(store)

    def passphrase() -> str:
        text = read_passphrase(passphrase_file)
        if remember is not None:
            remember["passphrase"] = text
        return text

    return unlock.open_store(
        folder, passphrase=passphrase, passphrase_given=passphrase_given(passphrase_file),
        keystore_dir=resolve_keystore(keystore, folder), on_note=note,
    )


def checked_new_passphrase(passphrase: str, allow_weak: bool) -> str:
    """Refuse an easily guessed new passphrase unless --allow-weak (then say so)."""
    if allow_weak:
        try:
            check_passphrase(passphrase)
        except RestwiseDeviceError:
            note("--allow-weak: this passphrase is easy to guess; use it for tests and demos only")
        return passphrase
    check_passphrase(passphrase)
    return passphrase


__all__ = [
    "console", "err_console", "StoreOpt", "PassFileOpt", "KeystoreOpt", "AllowWeakOpt", "default_store",
    "resolve_store", "resolve_keystore", "passphrase_given", "read_passphrase", "device_errors", "note",
    "open_store", "checked_new_passphrase",
]
