"""The `restwise` command: one entry point, one group per kind of user.

    restwise demo        the built-in demo (README's main command)
    restwise device ...  the person's device: store, imports, coach, training consent
    restwise privacy ... operators: plan epsilon / calibrate noise / expected utility
    restwise audit ...   auditors: build and verify privacy reports
    restwise server ...  operators: federation server, API service
    restwise evaluate    researchers: honest evaluation on real data
    restwise model ...   researchers: the linear head's public prior

Exit codes: restwise.common.exit_codes (the README's table is generated from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from restwise.client.cli import app as device_app
from restwise.client.coach_cli import print_advice
from restwise.common.exit_codes import ExitCode
from restwise.planning import plan_command
from restwise.privacy.cli import audit_app, privacy_app
from restwise.server.cli import app as server_app
from restwise.simulation.evaluate_cli import evaluate
from restwise.simulation.model_cli import model_app

app = typer.Typer(
    help="Restwise: learn recovery models across many people without collecting their data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring line breaks are not kept in help
)
app.add_typer(device_app, name="device")

privacy_app.command("plan")(plan_command)  # `restwise privacy plan` needs models and privacy: planning.py
app.add_typer(privacy_app, name="privacy")
app.add_typer(audit_app, name="audit")
app.add_typer(server_app, name="server")
app.add_typer(model_app, name="model")
app.command("evaluate")(evaluate)


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("restwise-demo"), "--workdir", help="Folder for the demo's devices, run and report."
    ),
    persons: int = typer.Option(
        6, "--persons", min=3, max=200, help="Simulated devices (one encrypted store each)."
    ),
    model: str = typer.Option(
        "linear-head", "--model", help="linear-head (the public prior + one DP release of statistics) or "
        "recovery-mlp (the network by DP-FedAvg; the planner refuses it on a few devices unless --force)."
    ),
    rounds: Optional[int] = typer.Option(
        None, "--rounds", min=1, max=50, help="Federated rounds of a FedAvg model (default 3); a one-release model has one."
    ),
    force: bool = typer.Option(False, "--force", help="Run a plan the planner refuses (recorded in the run's ledger)."),
) -> None:
    """The built-in demo: generated persons, each with their own encrypted store, learn a
    recovery model together with secure aggregation and distributed differential privacy.
    Prints the privacy spent, on how many devices the coach used the learned model, and one
    person's coach output."""
    # Deferred: the demo loads Flower's simulation engine (and torch for the network), which
    # `restwise --help` and every other command must not pay for.
    from restwise.common.cli_errors import cli_errors
    from restwise.server.rundir import RunFiles
    from restwise.simulation.demo import demo_outcome, run_demo_federation

    console = Console()
    with cli_errors():
        summary = run_demo_federation(workdir, persons=persons, rounds=rounds, model=model, force=force)
    if summary.status == "refused":
        console.print(f"The demo's run was refused: {summary.reason}")
        raise typer.Exit(code=ExitCode.FAILURE)
    shown = demo_outcome(summary, person=0, persons=persons)
    eps = "n/a" if shown["epsilon"] is None else f"{shown['epsilon']:.3f}"
    run_config = RunFiles(summary.run_dir).read_config()
    planned = run_config.rounds
    console.print(
        f"Federated run {shown['run_id']} ({model}): {shown['status']}, {shown['rounds_completed']} of "
        f"{planned} rounds, {persons} devices."
    )
    console.print(
        f"Privacy spent: epsilon = {eps} at delta = {shown['delta']:.0e}, against the server (no amplification "
        f"by sampling claimed; the run's cap {run_config.max_epsilon:g}; noise multiplier "
        f"{shown['noise_multiplier']:.3g}); signed ledger and report in {summary.run_dir}."
    )
    console.print(f"{shown['person']} sent {shown['messages_sent']} messages (restwise device history).")
    if shown["delivered"]:
        console.print(f"The released model was delivered to {shown['delivered']['devices']} of {persons} devices.")
    console.print(shown["coach_line"], markup=False, highlight=False)
    receipts = f" --receipts {shown['receipts_dir']}" if shown["receipts_dir"] else ""
    if shown["receipts_dir"]:
        console.print(f"{shown['receipt_files']} devices exported their receipts (the run's signed ledger entries "
                      f"they received) into {shown['receipts_dir']}.")
    console.print(
        f"An auditor checks it independently, pinning the published key and the devices' receipts: restwise audit "
        f"verify {summary.run_dir / 'report.json'} --public-key {shown['published_key']}{receipts}",
        soft_wrap=True,  # a command to copy: never wrapped
    )
    print_advice(console, shown["advice"], shown["note"], shown["model_status"])
    if shown["status"] != "completed":
        raise typer.Exit(code=ExitCode.FAILURE)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
