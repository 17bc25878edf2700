"""`restwise device history` and `restwise device consent ...`: what this device sent to
training runs, what it spent there (its receipts, its epsilon against its owner's cap, any
tamper alarm), and whether it may take part in them.

Registered into the device CLI by ``client/cli.py`` (``register(app)``). The CLI helpers come
from ``client/cli_support.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from restwise.client import cli_support as device_cli
from restwise.client import receipts_store
from restwise.privacy.device_budget import DEFAULT_MAX_EPSILON

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ALL_RUNS = "*"


def _when(ts: int) -> str:
    return dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _consent_rows(store) -> list[dict]:
    cur = store.conn.execute("SELECT scope, allowed, updated_at FROM consent ORDER BY scope")
    return [{"scope": s, "allowed": bool(a), "updated_at": int(t)} for s, a, t in cur.fetchall()]


def _budget_view(store) -> dict:
    runs = [r.to_dict() for r in receipts_store.runs(store)]
    return {"runs": runs, "total_epsilon": receipts_store.total_epsilon(store),
            "max_epsilon": receipts_store.max_epsilon(store)}


def _print_budget(view: dict, run: str | None) -> None:
    runs = [r for r in view["runs"] if run is None or r["run_id"] == run]
    if runs:
        t = Table(title="What this device spent, per run (epsilon against the server: no amplification claimed)")
        for col in ("run", "releases", "epsilon", "receipts", "pending", "ledger entries", "alarms"):
            t.add_column(col, justify="left" if col in ("run", "alarms") else "right")
        for r in runs:
            t.add_row(r["run_id"], str(r["releases"]), f"{r['epsilon']:.4g}", str(r["receipts"]), str(r["pending"]),
                      str(r["entries"]), "; ".join(a["reason"] for a in r["alarms"]) or "none")
        device_cli.console.print(t)
    for r in runs:
        for a in r["alarms"]:
            device_cli.console.print(f"[red]TAMPER ALARM[/] run {r['run_id']} ({_when(a['ts'])}): {a['reason']}. "
                                     "This device takes no further part in that run.")
    device_cli.console.print(
        f"Epsilon spent over all runs: {view['total_epsilon']:.4g} of your cap {view['max_epsilon']:.4g} "
        "(pending releases, with no receipt yet, are counted in full). Change the cap with "
        "`restwise device consent --max-epsilon E`.")


def register(app: typer.Typer) -> None:
    StoreOpt, PassFileOpt, KeystoreOpt = device_cli.StoreOpt, device_cli.PassFileOpt, device_cli.KeystoreOpt

    @app.command()
    def history(
        store: Optional[Path] = StoreOpt,
        passphrase_file: Optional[Path] = PassFileOpt,
        keystore: Optional[Path] = KeystoreOpt,
        run: Optional[str] = typer.Option(None, "--run", help="Only messages sent to this run."),
        as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON lines."),
        budget_only: bool = typer.Option(False, "--budget", help="Only what was spent per run and in total (with "
                                         "--json: one JSON object)."),
    ) -> None:
        """Everything this device sent to training runs: when, to which run and round, which
        records (names and sizes - never their values), and the SHA-256 of what was sent. Then,
        per run: the releases it took part in, the epsilon they cost, its receipts (signed
        ledger entries), pending spends, tamper alarms, and the total against your cap."""
        with device_cli.device_errors():
            with device_cli.open_store(store, passphrase_file, keystore) as s:
                rows = s.egress_history()
                view = _budget_view(s)
        if run is not None:
            rows = [r for r in rows if r["run_id"] == run]
        if budget_only:
            if as_json:
                typer.echo(json.dumps(view, sort_keys=True))
            else:
                _print_budget(view, run)
            return
        if as_json:
            for r in rows:
                typer.echo(json.dumps(r, sort_keys=True))
            return
        if not rows:
            device_cli.console.print("This device has not sent anything to a training run.")
            _print_budget(view, run)
            return
        t = Table(title="Messages this device sent to training runs")
        for col in ("when", "run", "round", "message", "records", "bytes", "sha256"):
            t.add_column(col, justify="right" if col in ("round", "bytes") else "left")
        for r in rows:
            records = ", ".join(f"{x['name']} ({x.get('bytes', 0)} B)" if x.get("kind") != "error" else "error (refused)" for x in r["records"])
            t.add_row(
                _when(r["ts"]), r["run_id"], "" if r["round"] is None else str(r["round"]), r["message_type"],
                records, str(r["n_bytes"]), r["sha256"][:16] + "...",
            )
        device_cli.console.print(t)
        device_cli.console.print(
            f"{len(rows)} messages, {sum(r['n_bytes'] for r in rows)} bytes in total. Updates leave only "
            "clipped, noised and masked: the server can read the sum over many devices, never yours."
        )
        _print_budget(view, run)

    @app.command()
    def consent(
        run: Optional[str] = typer.Option(None, "--run", help="The training run (its id, as the operator announced it)."),
        all_runs: bool = typer.Option(False, "--all", help="All training, now and in future runs."),
        allow: bool = typer.Option(False, "--allow", help="Allow taking part."),
        deny: bool = typer.Option(False, "--deny", help="Refuse taking part."),
        max_epsilon: Optional[float] = typer.Option(
            None, "--max-epsilon",
            help=f"Your cap on the epsilon this device may spend over all runs (against the server, at each run's "
            f"delta; default {DEFAULT_MAX_EPSILON:g}). A round that would take it past the cap is not joined.",
        ),
        store: Optional[Path] = StoreOpt,
        passphrase_file: Optional[Path] = PassFileOpt,
        keystore: Optional[Path] = KeystoreOpt,
        as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    ) -> None:
        """Opt out of (or back into) one training run or all training, or set your epsilon cap
        (--max-epsilon). Without --allow/--deny, show the current choices. A refusal of all
        training wins over a run's permission."""
        if max_epsilon is not None and not (max_epsilon > 0 and max_epsilon < float("inf")):
            raise typer.BadParameter("--max-epsilon must be a positive number")
        if allow and deny:
            raise typer.BadParameter("give either --allow or --deny, not both")
        if run is not None and all_runs:
            raise typer.BadParameter("give either --run RUN or --all, not both")
        if run is not None and not RUN_ID_RE.match(run):
            raise typer.BadParameter("--run must be a run id (letters, digits, '.', '_', ':' or '-')")
        changing = allow or deny
        if changing and run is None and not all_runs:
            raise typer.BadParameter("say which: --run RUN or --all")
        with device_cli.device_errors():
            with device_cli.open_store(store, passphrase_file, keystore) as s:
                if changing:
                    s.set_consent(ALL_RUNS if all_runs else run, allow)
                if max_epsilon is not None:
                    receipts_store.set_max_epsilon(s, max_epsilon)
                rows = _consent_rows(s)
                effective = s.consents(run) if run is not None else None
                cap, spent = receipts_store.max_epsilon(s), receipts_store.total_epsilon(s)
        if as_json:
            typer.echo(json.dumps({"choices": rows, "run": run, "may_train": effective, "max_epsilon": cap,
                                   "spent_epsilon": spent}, sort_keys=True))
            return
        device_cli.console.print(f"Epsilon cap over all runs: {cap:g}{' (set now)' if max_epsilon is not None else ''}; "
                                 f"spent so far: {spent:.4g}.")
        if changing:
            what = "all training" if all_runs else f"run {run}"
            device_cli.console.print(f"{'Allowed' if allow else 'Refused'}: {what}.")
        if not rows:
            device_cli.console.print("No choices recorded: this device takes part in the runs it joins.")
        for r in rows:
            scope = "all training" if r["scope"] == ALL_RUNS else f"run {r['scope']}"
            device_cli.console.print(f"  {scope}: {'allowed' if r['allowed'] else 'refused'} (since {_when(r['updated_at'])})")
        if run is not None:
            device_cli.console.print(f"This device {'may' if effective else 'will not'} train in run {run}.")
