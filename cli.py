"""The `restwise` command: one entry point, one group per kind of user.

    restwise demo        the built-in demo (README's main command)
    restwise device ...  the person's device: store, imports, coach, training consent
    restwise privacy ... operators: plan epsilon / calibrate noise / expected utility
    restwise audit ...   auditors: build and verify privacy reports
    restwise server ...  operators: federation server, API service
    restwise evaluate    researchers: honest evaluation on real data
    restwise model ...   researchers: the linear head's public prior

Exit codes: 0 success; 1 failure; 2 bad command-line usage; 3 wrong passphrase or key;
4 store missing/in use/already exists; 5 store damaged or tampered; 6 import refused (store
unchanged); 7 privacy budget would be exceeded; 8 verification failed (report or ledger
mismatch); 9 an import stored nothing (reasons listed, store unchanged); 130 interrupted.
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
    ("restwise.client.model_cli", "model_app", "model"),
):
    try:
        _mod = __import__(_module, fromlist=[_attr])
        app.add_typer(getattr(_mod, _attr), name=_name)
    except ImportError as _exc:  # group not built yet in this checkout
        if getattr(_exc, "name", None) != _module:
            raise

from restwise.planning import plan_command  # noqa: E402  `restwise privacy plan` (issue 12)
from restwise.privacy.cli import privacy_app  # noqa: E402

privacy_app.command("plan")(plan_command)

try:  # `restwise evaluate` (models issue)
    from restwise.client.evaluate_cli import evaluate as _evaluate

    app.command("evaluate")(_evaluate)
except ImportError as _exc:
    if getattr(_exc, "name", None) != "restwise.client.evaluate_cli":
        raise


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("restwise-demo"), "--workdir", help="Folder for the demo's devices, run and report."
    ),
    persons: int = typer.Option(
        6, "--persons", min=3, max=200, help="Simulated devices (one encrypted store each)."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, max=50, help="Federated rounds."),
) -> None:
    """The built-in demo: generated persons, each with their own encrypted store, train the
    recovery model together with secure aggregation and distributed differential privacy.
    Prints the privacy spent and one person's coach output."""
    from rich.console import Console

    from restwise.client.coach_cli import print_advice
    from restwise.server.runner import demo_outcome, run_demo_federation

    console = Console()
    summary = run_demo_federation(workdir, persons=persons, rounds=rounds)
    shown = demo_outcome(summary, person=0)
    eps = "n/a" if shown["epsilon"] is None else f"{shown['epsilon']:.3f}"
    console.print(
        f"Federated run {shown['run_id']}: {shown['status']}, {shown['rounds_completed']} of "
        f"{rounds} rounds, {persons} devices."
    )
    console.print(
        f"Privacy spent: epsilon = {eps} at delta = {shown['delta']:.0e} (noise multiplier "
        f"{shown['noise_multiplier']:.3g}); signed ledger and report in {summary.run_dir}."
    )
    console.print(f"{shown['person']} sent {shown['messages_sent']} messages (restwise device history).")
    console.print(
        f"An auditor checks it independently: restwise audit verify {summary.run_dir / 'report.json'}"
    )
    print_advice(console, shown["advice"], shown["note"], shown["model_status"])
    if shown["status"] != "completed":
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
