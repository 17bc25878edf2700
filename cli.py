"""The `restwise` command: one entry point, one group per kind of user.

    restwise demo        the built-in demo (README's main command)
    restwise device ...  the person's device: store, imports, coach, training consent
    restwise privacy ... operators: plan epsilon / calibrate noise
    restwise audit ...   auditors: build and verify privacy reports
    restwise server ...  operators: federation server, API service
    restwise evaluate    researchers: honest evaluation on real data

Exit codes: 0 success; 1 failure; 2 bad command-line usage; 3 wrong passphrase or key;
4 store missing/in use/already exists; 5 store damaged or tampered; 6 import refused (store
unchanged); 7 privacy budget would be exceeded; 8 verification failed (report or ledger
mismatch); 130 interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from restwise.client.cli import app as device_app

app = typer.Typer(
    help="Restwise: learn recovery models across many people without collecting their data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring line breaks are not kept in help
)
app.add_typer(device_app, name="device")

# Groups owned by other packages register here. Each module keeps heavy imports inside its
# commands so `restwise --help` stays fast.
for _module, _attr, _name in (
    ("restwise.privacy.cli", "privacy_app", "privacy"),
    ("restwise.privacy.cli", "audit_app", "audit"),
    ("restwise.server.cli", "app", "server"),
):
    try:
        _mod = __import__(_module, fromlist=[_attr])
        app.add_typer(getattr(_mod, _attr), name=_name)
    except ImportError as _exc:  # group not built yet in this checkout
        if getattr(_exc, "name", None) != _module:
            raise

try:  # `restwise evaluate` (models issue)
    from restwise.client.evaluate_cli import evaluate as _evaluate

    app.command("evaluate")(_evaluate)
except ImportError as _exc:
    if getattr(_exc, "name", None) != "restwise.client.evaluate_cli":
        raise


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("restwise-demo"), "--workdir", help="Folder for the demo's stores and outputs."
    ),
    persons: int = typer.Option(3, "--persons", min=1, max=500, help="Simulated devices."),
) -> None:
    """Run the built-in demo on generated data: every simulated person gets their own
    encrypted store, their export is imported, and a summary is printed."""
    from restwise.client.cli import print_import_report, print_summary
    from restwise.client.importers import run_import
    from restwise.client.keys import FAST_INSECURE_ARGON2
    from restwise.client.store import DeviceStore, erase_store
    from restwise.demo import write_demo_export

    workdir.mkdir(parents=True, exist_ok=True)
    summary = None
    for i in range(1, persons + 1):
        export = write_demo_export(i, workdir / "exports" / f"person-{i:02d}.jsonl")
        folder = workdir / "stores" / f"person-{i:02d}"
        if DeviceStore.exists(folder):
            erase_store(folder)
        # Demo only: a fixed passphrase and cheap Argon2 so the demo starts in seconds.
        with DeviceStore.create(folder, f"demo-passphrase-{i}", argon2=FAST_INSECURE_ARGON2) as s:
            report = run_import(s, export)
            if i == 1:
                print_import_report(report)
                summary = s.summary()
    if summary is not None:
        print_summary(summary)
    typer.echo(f"{persons} encrypted demo stores are in {workdir / 'stores'}.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
