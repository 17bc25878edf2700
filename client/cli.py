"""`restwise device ...`: the commands a person runs on their own phone or home hub."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from restwise.client.errors import RestwiseDeviceError, StoreNotFoundError, WrongPassphraseError

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

app = typer.Typer(
    help="Your device: the encrypted store that holds your wearable data, and what it shares.",
    no_args_is_help=True,
)
passphrase_app = typer.Typer(help="Manage the passphrase that unlocks your store.", no_args_is_help=True)
app.add_typer(passphrase_app, name="passphrase")


def default_store() -> Path:
    env = os.environ.get("RESTWISE_STORE")
    if env:
        return Path(env).expanduser()
    return Path("~/.restwise/store").expanduser()


StoreOpt = typer.Option(None, "--store", "-s", help=STORE_HELP, show_default=False)
PassFileOpt = typer.Option(None, "--passphrase-file", help=PASSFILE_HELP, show_default=False)


def resolve_store(store: Optional[Path]) -> Path:
    return Path(store).expanduser() if store else default_store()


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


def fail(exc: RestwiseDeviceError) -> typer.Exit:
    err_console.print(f"[bold red]Error:[/] {exc}")
    return typer.Exit(code=exc.exit_code)


@contextmanager
def device_errors():
    """Turn device errors into one clear line and the documented exit code."""
    try:
        yield
    except RestwiseDeviceError as exc:
        raise fail(exc) from None
    except OSError as exc:
        # A file the person named (export target, a store on a full or read-only disk):
        # one line naming the file and the reason, not a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        err_console.print(f"[bold red]Error:[/] {exc.strerror or type(exc).__name__}{where}", markup=True)
        raise typer.Exit(code=1) from None


def open_store(store: Optional[Path], passphrase_file: Optional[Path]):
    from restwise.client.store import DeviceStore

    folder = resolve_store(store)
    if not DeviceStore.exists(folder):
        raise StoreNotFoundError(f"no Restwise store in {folder} (run `restwise device init`)")
    return DeviceStore.open(folder, read_passphrase(passphrase_file))


@app.command()
def init(store: Optional[Path] = StoreOpt, passphrase_file: Optional[Path] = PassFileOpt) -> None:
    """Create a new encrypted store. Choose a passphrase you will remember: without it
    (or a keystore slot) nobody, including you, can read the store."""
    from restwise.client.store import DeviceStore

    folder = resolve_store(store)
    with device_errors():
        passphrase = read_passphrase(passphrase_file, confirm=True, prompt="New passphrase")
        with DeviceStore.create(folder, passphrase) as s:
            console.print(f"Created an encrypted store in {folder} (store id {s.store_id}).")


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="Export file, zip or folder from your wearable or app."),
    format: str = typer.Option("auto", "--format", "-f", help="Format name, or 'auto' to detect it."),
    tz: Optional[str] = typer.Option(
        None, "--tz", help="Your time zone (e.g. Europe/Oslo) for files that give local times without one."
    ),
    person: Optional[str] = typer.Option(
        None, "--person",
        help="Research datasets only: which person's data to import (SoccerMon player column, LifeSnaps id).",
    ),
    column_map: Optional[Path] = typer.Option(
        None, "--column-map",
        help="JSON file mapping check-in fields to your CSV's columns (see docs/importers.md).",
    ),
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import an export into your store. Importing the same file again adds nothing twice;
    a file that cannot be read leaves the store exactly as it was."""
    from restwise.client.importers import ImportOptions, get_importer, run_import

    with device_errors():
        importer = None if format == "auto" else get_importer(format)
        mapping = None
        if column_map is not None:
            from restwise.client.importers.checkin_csv import CheckinCsvImporter, load_column_map

            mapping = load_column_map(column_map)
            importer = CheckinCsvImporter(column_map=mapping)
        with open_store(store, passphrase_file) as s:
            progress = None if quiet else RichProgress()
            report = run_import(
                s, path, importer, options=ImportOptions(tz=tz, column_map=mapping, person=person),
                progress=progress,
            )
        print_import_report(report)


class RichProgress:
    """A rich progress bar in bytes, with a records counter."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
        )

        self._p = Progress(
            TextColumn("[bold]Importing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TextColumn("{task.fields[records]} records"), TimeRemainingColumn(),
            console=err_console, transient=False,
        )
        self._task = None

    def start(self, total_bytes: int) -> None:
        self._p.start()
        self._task = self._p.add_task("import", total=total_bytes, records=0)

    def advance(self, n_bytes: int) -> None:
        if self._task is not None:
            self._p.advance(self._task, n_bytes)

    def records(self, n: int) -> None:
        if self._task is not None:
            self._p.update(self._task, records=n)

    def stop(self) -> None:
        if self._task is not None:
            self._p.update(self._task, completed=self._p.tasks[0].total)
        self._p.stop()


def print_import_report(report) -> None:
    t = Table(title=f"Imported {report.source_name} ({report.format})")
    t.add_column("what")
    t.add_column("records", justify="right")
    for metric, n in sorted(report.inserted.items()):
        t.add_row(metric, str(n))
    t.add_row("already stored (skipped)", str(report.duplicates))
    console.print(t)
    console.print(f"Days covered: {report.first_day or '-'} to {report.last_day or '-'}")
    if report.skipped:
        s = Table(title="Skipped records")
        s.add_column("reason")
        s.add_column("count", justify="right")
        for reason, n in sorted(report.skipped.items()):
            s.add_row(reason, str(n))
        console.print(s)


@app.command()
def status(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Also check every page of the store for damage or tampering."
    ),
) -> None:
    """Show what your store holds: counts per measurement, days covered, what was sent."""
    with device_errors():
        with open_store(store, passphrase_file) as s:
            if verify:
                s.verify()
            summary = s.summary()
    print_summary(summary, as_json)


def print_summary(summary: dict, as_json: bool = False) -> None:
    if as_json:
        console.print_json(json.dumps(summary))
        return
    t = Table(title=f"Store {summary['store_id']} (schema v{summary['schema_version']})")
    t.add_column("measurement")
    t.add_column("records", justify="right")
    t.add_column("first day")
    t.add_column("last day")
    for metric, d in summary["observations"].items():
        t.add_row(f"{metric} ({d['unit']})", str(d["count"]), d["first_day"], d["last_day"])
    c = summary["checkins"]
    t.add_row("daily check-ins", str(c["count"]), c["first_day"] or "-", c["last_day"] or "-")
    t.add_row("training sessions", str(summary["sessions"]), "", "")
    console.print(t)
    console.print(
        f"Unlocked by: {', '.join(summary['key_slots'])}; key generation {summary['key_generation']}; "
        f"imports: {summary['imports']}; messages sent to training runs: {summary['sent_messages']}"
    )


@app.command()
def export(
    out: Path = typer.Argument(..., help="File to write (JSON lines). It is NOT encrypted."),
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write everything your store holds to a plain (unencrypted) file you can keep or read.
    It can be imported again into a new store."""
    from restwise.client.fsutil import atomic_write_bytes

    with device_errors():
        if out.exists() and not force:
            raise typer.BadParameter(f"{out} exists; use --force to overwrite it")
        with open_store(store, passphrase_file) as s:
            lines = [json.dumps(row, sort_keys=True) for row in s.export_rows()]
        atomic_write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)
        console.print(f"Wrote {len(lines)} records to {out}. This file is not encrypted: keep it safe.")


@app.command()
def erase(
    store: Optional[Path] = StoreOpt,
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Destroy your store for good: the key material first, then the data files.
    No passphrase needed (you may have forgotten it). This cannot be undone."""
    from restwise.client.store import erase_store

    folder = resolve_store(store)
    with device_errors():
        if not yes:
            typer.confirm(f"Erase the store in {folder} for good?", abort=True)
        erase_store(folder)
        console.print(f"Erased the store in {folder}.")


@passphrase_app.command("change")
def passphrase_change(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    new_passphrase_file: Optional[Path] = typer.Option(
        None, "--new-passphrase-file", help="Read the new passphrase from this file (automation)."
    ),
) -> None:
    """Change your passphrase. Your data is not re-encrypted, only its key is re-wrapped."""
    with device_errors():
        with open_store(store, passphrase_file) as s:
            new = (
                read_passphrase(new_passphrase_file)
                if new_passphrase_file
                else _prompt_new()
            )
            s.change_passphrase(new)
        console.print("Passphrase changed.")


def _prompt_new() -> str:
    if os.environ.get("RESTWISE_NEW_PASSPHRASE"):
        return os.environ["RESTWISE_NEW_PASSPHRASE"]
    if not sys.stdin.isatty():
        raise typer.BadParameter("give the new passphrase with --new-passphrase-file or RESTWISE_NEW_PASSPHRASE")
    return typer.prompt("New passphrase", hide_input=True, confirmation_prompt=True)


@app.command()
def rekey(store: Optional[Path] = StoreOpt, passphrase_file: Optional[Path] = PassFileOpt) -> None:
    """Re-encrypt the whole store under a fresh random key (e.g. after a device was lost
    with the store copied on it). Your passphrase stays the same."""
    from restwise.client.store import DeviceStore

    folder = resolve_store(store)
    with device_errors():
        if not DeviceStore.exists(folder):
            raise StoreNotFoundError(f"no Restwise store in {folder} (run `restwise device init`)")
        passphrase = read_passphrase(passphrase_file)
        with DeviceStore.open(folder, passphrase) as s:
            s.rekey(passphrase)
        console.print("The store is now encrypted under a new key.")


# Command groups owned by other modules add themselves to `app` (keeps this file small and
# lets each area evolve alone): the coach (`today`, `checkin`) and federated training
# (`history`, `consent`, `join`).
for _module in ("restwise.client.coach_cli", "restwise.client.federation_cli", "restwise.client.join_cli"):
    try:
        _mod = __import__(_module, fromlist=["register"])
    except ImportError as _exc:  # module not built yet in this checkout
        if getattr(_exc, "name", None) != _module:
            raise
        continue
    _mod.register(app)

__all__ = ["app", "WrongPassphraseError"]
