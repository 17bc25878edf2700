"""`restwise device receipts export DIR`: this device's copy of its runs' signed ledgers, for an
auditor (`restwise audit verify REPORT --public-key KEY --receipts DIR`).

One file per run, ``receipts-<run_id>-<8 random hex>.json`` (privacy/receipts.py): many devices
can export into one folder, and the name says nothing about which device wrote it. The file
holds the run's ledger entries as this device received them (signed lines, no personal value),
the fingerprint of the key it pinned, and which entries are its receipts. Registered into the
device CLI by ``client/cli.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from restwise.client import cli_support as device_cli
from restwise.client import receipts_store
from restwise.client.errors import RestwiseDeviceError
from restwise.privacy.receipts import write_receipt_file


def register(app: typer.Typer) -> None:
    StoreOpt, PassFileOpt, KeystoreOpt = device_cli.StoreOpt, device_cli.PassFileOpt, device_cli.KeystoreOpt
    receipts_app = typer.Typer(help="Your receipts: the signed ledger entries of the runs you took part in.",
                               no_args_is_help=True)
    app.add_typer(receipts_app, name="receipts")

    @receipts_app.command("export")
    def export(
        folder: Path = typer.Argument(..., help="Folder to write the receipt files into (created if needed)."),
        run: Optional[str] = typer.Option(None, "--run", help="Only this run."),
        store: Optional[Path] = StoreOpt,
        passphrase_file: Optional[Path] = PassFileOpt,
        keystore: Optional[Path] = KeystoreOpt,
    ) -> None:
        """Write one receipt file per run this device holds ledger entries of. Exits non-zero
        when there is nothing to export."""
        with device_cli.device_errors():
            with device_cli.open_store(store, passphrase_file, keystore) as s:
                ids = [r.run_id for r in receipts_store.runs(s) if run is None or r.run_id == run]
                documents = [d for d in (receipts_store.export_document(s, rid) for rid in ids) if d is not None]
            if not documents:
                raise RestwiseDeviceError(
                    "nothing to export: this device holds no ledger entries" + (f" of run {run}" if run else "")
                    + " (it has not taken part in a run since receipts exist, or the server sent none)")
            for doc in documents:
                path = write_receipt_file(folder, doc)
                device_cli.console.print(f"run {doc['run_id']}: {len(doc['entries'])} ledger entries, "
                                         f"{len(doc['receipts'])} receipts -> {path}")


__all__ = ["register"]
