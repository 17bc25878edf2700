"""`restwise device ...`: the commands a person runs on their own phone or home hub."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from restwise.client import coach_cli, federation_cli, join_cli, receipts_cli, trend, unlock
from restwise.client.cli_support import (
    AllowWeakOpt,
    KeystoreOpt,
    PassFileOpt,
    StoreOpt,
    checked_new_passphrase,
    console,
    device_errors,
    err_console,
    note,
    open_store,
    read_passphrase,
    resolve_keystore,
    resolve_store,
)
from restwise.client.errors import KeystoreNotFoundError, NothingImportedError, RestwiseDeviceError, StoreNotFoundError
from restwise.client.importers import ImportOptions, get_importer, run_import
from restwise.client.importers.checkin_csv import load_column_map
from restwise.client.keys import FileKeystore, read_keyslots
from restwise.client.store import DeviceStore, erase_store
from restwise.common.exit_codes import ExitCode
from restwise.common.fsutil import atomic_write_bytes

app = typer.Typer(
    help="Your device: the encrypted store that holds your wearable data, and what it shares.",
    no_args_is_help=True,
)
passphrase_app = typer.Typer(help="Manage the passphrase that unlocks your store.", no_args_is_help=True)
app.add_typer(passphrase_app, name="passphrase")
keystore_app = typer.Typer(
    help="A keystore slot: the store opens without typing the passphrase (for joining a "
    "federation unattended).", no_args_is_help=True,
)
app.add_typer(keystore_app, name="keystore")



@app.command()
def init(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    allow_weak: bool = AllowWeakOpt,
) -> None:
    """Create a new encrypted store. Choose a passphrase you will remember: without it
    (or a keystore slot) nobody, including you, can read the store. It must be hard to
    guess (four or more unrelated words are)."""
    folder = resolve_store(store)
    with device_errors():
        passphrase = read_passphrase(passphrase_file, confirm=True, prompt="New passphrase")
        checked_new_passphrase(passphrase, allow_weak)
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
        help="JSON file mapping check-in fields to your CSV's columns, for all files or per "
        'file-name pattern ({"files": {"wellness*.csv": {...}}}; see docs/importers.md).',
    ),
    strict: bool = typer.Option(
        False, "--strict", help="A folder or zip imports all or nothing: one unrecognised or "
        "damaged file refuses the whole import (default: it is skipped and listed)."
    ),
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    keystore: Optional[Path] = KeystoreOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import an export (a file, folder or zip) into your store. Each file's format is
    recognised from its content. Importing the same file again adds nothing twice; a file
    that cannot be read is skipped and listed (with --strict: nothing is imported); an
    import that stores nothing says why and exits with code 9."""
    with device_errors():
        mapping = load_column_map(column_map) if column_map is not None else None
        options = ImportOptions(tz=tz, column_map=mapping, person=person)
        importer = None if format == "auto" else get_importer(format, options)
        with open_store(store, passphrase_file, keystore) as s:
            progress = None if quiet else RichProgress()
            try:
                report = run_import(s, path, importer, options=options, progress=progress,
                                    strict=strict)
            except NothingImportedError as exc:
                if exc.report is not None:
                    print_import_report(exc.report, stored=False)
                raise
        print_import_report(report)


class RichProgress:
    """A rich progress bar in bytes, with a records counter."""

    def __init__(self) -> None:
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


MAX_LISTED_FILES = 20


def print_import_report(report, *, stored: bool = True) -> None:
    """What an import stored, what it skipped and why, and what the person should know."""
    out = console if stored else err_console
    if stored:
        title = f"Imported {escape(report.source_name)}" + (" (restored export)" if report.restored else "")
        t = Table(title=f"{title} ({report.format})")
        t.add_column("what")
        t.add_column("records", justify="right")
        for metric, n in sorted(report.inserted.items()):
            t.add_row(metric, str(n))
        t.add_row("already stored (skipped)", str(report.duplicates))
        out.print(t)
        out.print(f"Days covered: {report.first_day or '-'} to {report.last_day or '-'}")
    if report.skipped:
        s = Table(title="Skipped records")
        s.add_column("reason")
        s.add_column("count", justify="right")
        for reason, n in sorted(report.skipped.items()):
            s.add_row(escape(reason), str(n))
        out.print(s)
    if report.skipped_files:
        f = Table(title="Files not imported")
        f.add_column("file")
        f.add_column("why")
        files = report.skipped_files
        if len(files) > MAX_LISTED_FILES:
            by_reason: dict[str, list[str]] = {}
            for member, why in files:
                by_reason.setdefault(why, []).append(member)
            for why, members in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                label = members[0] if len(members) == 1 else f"{len(members)} files, e.g. {members[0]}"
                f.add_row(escape(label), escape(why))
        else:
            for member, why in files:
                f.add_row(escape(member), escape(why))
        out.print(f)
    for text in report.notes:
        note(text)


@app.command()
def status(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    keystore: Optional[Path] = KeystoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Also check every page of the store and every key slot for "
        "damage or tampering, and say what was checked."
    ),
) -> None:
    """Show what your store holds: counts per measurement, days covered, what was sent."""
    folder = resolve_store(store)
    remembered: dict = {}
    with device_errors():
        with open_store(store, passphrase_file, keystore, remember=remembered) as s:
            summary = s.summary()
            if verify:
                summary["verified"] = s.verify()
                summary["key_slot_checks"] = s.verify_key_slots(
                    passphrase=remembered.get("passphrase"),
                    keystore=_store_keystore(s, resolve_keystore(keystore, folder)),
                )
    print_summary(summary, as_json)
    if verify and not as_json:
        print_verification(summary)


def _store_keystore(store, keystore_dir: Path):
    """The keystore of the store's keystore slot, None without one."""
    providers = store.key_slots.keystore_providers()
    if not providers:
        return None
    try:
        return unlock.keystore_for(providers[0], keystore_dir)
    except RestwiseDeviceError:
        return None


def print_verification(summary: dict) -> None:
    v = summary["verified"]
    console.print(
        f"[bold green]Verified[/]: {v['pages']} database pages of {v['page_size']} bytes, each "
        "page's HMAC-SHA512 and the database structure (schema "
        f"v{v['schema_version']}); write-ahead log: {v['wal_bytes']} bytes, checked with them."
    )
    console.print(f"Key slots ({len(summary['key_slot_checks'])}):")
    for slot in summary["key_slot_checks"]:
        what = slot["kind"]
        if slot["kind"] == "keystore":
            what += f" ({slot.get('provider')})"
        kdf = slot.get("kdf")
        if kdf:
            what += (f" ({kdf.get('name')}, {kdf.get('memory_kib')} KiB, {kdf.get('iterations')} "
                     f"passes, {kdf.get('lanes')} lanes)")
        console.print(f"  {escape(what)}: {escape(slot['status'])}")
    if any("does NOT" in slot["status"] for slot in summary["key_slot_checks"]):
        raise typer.Exit(code=ExitCode.STORE_DAMAGED)


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
    keystore: Optional[Path] = KeystoreOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write everything your store holds to a plain (unencrypted) file you can keep or read:
    measurements, check-ins, sessions, what was sent, consent choices and past imports (the
    trained model is not included: it is learned again). `restwise device import FILE` into a
    new store restores it exactly."""
    with device_errors():
        if out.exists() and not force:
            raise typer.BadParameter(f"{out} exists; use --force to overwrite it")
        with open_store(store, passphrase_file, keystore) as s:
            lines = list(s.export_lines())
        atomic_write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)
        console.print(f"Wrote {len(lines) - 1} records to {out}. This file is not encrypted: keep it safe.")


@app.command()
def erase(
    store: Optional[Path] = StoreOpt,
    keystore: Optional[Path] = KeystoreOpt,
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Destroy your store for good: the key material first (key slots, and the keystore's
    key for this store), then the data files. No passphrase needed (you may have forgotten
    it). This cannot be undone."""
    folder = resolve_store(store)
    with device_errors():
        if not yes:
            typer.confirm(f"Erase the store in {folder} for good?", abort=True)
        try:
            slots = read_keyslots(folder)
            store_id, providers = slots.store_id, slots.keystore_providers()
        except RestwiseDeviceError:  # damaged or missing key slots: erase the files anyway
            store_id, providers = None, []
        erase_store(folder)
        console.print(f"Erased the store in {folder}.")
        for provider in providers:
            try:
                unlock.keystore_for(provider, resolve_keystore(keystore, folder)).destroy(store_id)
                console.print(f"Destroyed this store's key in the {provider} keystore.")
            except RestwiseDeviceError as exc:
                note(f"the {provider} keystore's key for this store was not destroyed ({exc}); "
                     "it no longer opens anything (the store's key slots are gone)")


@passphrase_app.command("change")
def passphrase_change(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    keystore: Optional[Path] = KeystoreOpt,
    new_passphrase_file: Optional[Path] = typer.Option(
        None, "--new-passphrase-file", help="Read the new passphrase from this file (automation)."
    ),
    allow_weak: bool = AllowWeakOpt,
) -> None:
    """Change your passphrase (or set one on a store opened by its keystore). Your data is
    not re-encrypted, only its key is re-wrapped."""
    with device_errors():
        with open_store(store, passphrase_file, keystore) as s:
            new = (
                read_passphrase(new_passphrase_file)
                if new_passphrase_file
                else _prompt_new()
            )
            checked_new_passphrase(new, allow_weak)
            s.change_passphrase(new)
        console.print("Passphrase changed.")


def _prompt_new() -> str:
    if os.environ.get("RESTWISE_NEW_PASSPHRASE"):
        return os.environ["RESTWISE_NEW_PASSPHRASE"]
    if not sys.stdin.isatty():
        raise typer.BadParameter("give the new passphrase with --new-passphrase-file or RESTWISE_NEW_PASSPHRASE")
    return typer.prompt("New passphrase", hide_input=True, confirmation_prompt=True)


@app.command()
def rekey(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    keystore: Optional[Path] = KeystoreOpt,
) -> None:
    """Re-encrypt the whole store under a fresh random key (e.g. after a device was lost
    with the store copied on it). Your passphrase (and keystore) stay the same; a running
    `restwise device join` must be started again afterwards."""
    folder = resolve_store(store)
    with device_errors():
        if not DeviceStore.exists(folder):
            raise StoreNotFoundError(f"no Restwise store in {folder} (run `restwise device init`)")
        slots = read_keyslots(folder)
        providers = slots.keystore_providers()
        ks = unlock.keystore_for(providers[0], resolve_keystore(keystore, folder)) if providers else None
        passphrase = read_passphrase(passphrase_file) if slots.has_kind("passphrase") else None
        with (DeviceStore.open(folder, passphrase) if passphrase is not None
              else DeviceStore.open(folder, keystore=ks)) as s:
            s.rekey(passphrase, keystore=ks)
        console.print("The store is now encrypted under a new key.")


@keystore_app.command("add")
def keystore_add(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    backend: str = typer.Option(
        "auto", "--backend", help="keyring: the OS keyring (Secret Service, KWallet, macOS "
        "Keychain, Windows); file: a 0600 key file in --keystore; auto: the keyring where one "
        "is usable, else the file (and it says so).",
    ),
    keystore: Optional[Path] = KeystoreOpt,
) -> None:
    """Add a keystore slot that wraps your store's key, so the store opens without the
    passphrase: what a device joining a federation unattended needs (`restwise device
    join` then needs no passphrase). Your passphrase keeps working."""
    if backend not in ("auto", "keyring", "file"):
        raise typer.BadParameter("--backend must be auto, keyring or file")
    folder = resolve_store(store)
    with device_errors():
        chosen = backend
        if backend in ("auto", "keyring"):
            # Deferred: `keyring` costs ~0.1 s to import; only this command needs it.
            from restwise.client.os_keyring import keyring_problem

            problem = keyring_problem()
            if problem is not None:
                if backend == "keyring":
                    raise KeystoreNotFoundError(
                        f"{problem}: no keystore slot was added (use --backend file for a key file "
                        "instead, and read its risk in docs/deployment.md)"
                    )
                chosen = "file"
                note(f"{problem}. The keystore is a key file instead, readable by your user "
                     "account: whoever can read it and a copy of the store opens the store "
                     "(see docs/deployment.md)")
            else:
                chosen = "keyring"
        keystore_dir = resolve_keystore(keystore, folder)
        inside = keystore_dir.resolve()
        if chosen == "file" and (inside == folder.resolve() or folder.resolve() in inside.parents):
            # a copy of the store folder would carry its own key
            raise typer.BadParameter("--keystore must be a folder outside the store folder")
        provider = unlock.keystore_for(chosen, keystore_dir)
        with unlock.open_store(
            folder, passphrase=lambda: read_passphrase(passphrase_file), passphrase_given=True,
            keystore_dir=keystore_dir, on_note=note,
        ) as s:
            replaced = s.add_keystore_slot(provider)
        where = (f"the key file keystore {keystore_dir} (file mode 0600)" if isinstance(provider, FileKeystore)
                 else "the OS keyring")
        console.print(f"Added a keystore slot: the store now also opens with the key in {where}.")
        if replaced:
            console.print(f"It replaces the previous keystore slot ({', '.join(replaced)}).")


@keystore_app.command("remove")
def keystore_remove(
    store: Optional[Path] = StoreOpt,
    passphrase_file: Optional[Path] = PassFileOpt,
    keystore: Optional[Path] = KeystoreOpt,
) -> None:
    """Remove the keystore slot: only the passphrase opens the store again. The keystore's
    key for this store is destroyed too."""
    folder = resolve_store(store)
    with device_errors():
        keystore_dir = resolve_keystore(keystore, folder)
        with unlock.open_store(
            folder, passphrase=lambda: read_passphrase(passphrase_file), passphrase_given=True,
            keystore_dir=keystore_dir, on_note=note,
        ) as s:
            removed = s.remove_keystore_slot()
            store_id = s.store_id
        if not removed:
            console.print("This store has no keystore slot; nothing changed.")
            raise typer.Exit(code=ExitCode.FAILURE)
        for provider in removed:
            try:
                unlock.keystore_for(provider, keystore_dir).destroy(store_id)
            except RestwiseDeviceError as exc:
                note(f"the {provider} keystore's key was not destroyed ({exc}); it opens nothing now")
        console.print(f"Removed the keystore slot ({', '.join(removed)}): only your passphrase opens the store.")


# Command groups owned by other modules add themselves to `app` (keeps this file small and
# lets each area evolve alone): the coach (`today`, `checkin`), federated training
# (`history`, `consent`, `join`), receipts (`receipts export`) and the trend.
for _commands in (coach_cli, federation_cli, join_cli, receipts_cli, trend):
    _commands.register(app)

__all__ = ["app"]
