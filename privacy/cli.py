"""`restwise privacy ...` (operators: plan epsilon, calibrate noise) and `restwise audit ...`
(auditors: build and verify privacy reports).

    restwise privacy epsilon   --noise-multiplier Z --rounds R [--sampling poisson|fixed|full]
                               [--rate Q | --cohort M --population N] [--adjacency add-remove|replace-one]
                               [--delta D] [--no-amplification] [--json]
    restwise privacy calibrate --target-epsilon E --rounds R [same sampling options] [--json]
    restwise audit report RUN  (--ledger FILE --key AUDIT_KEY | --data-dir SERVER_DIR) [--out DIR]
    restwise audit verify REPORT [--ledger FILE] [--public-key KEY] [--json]

With --json a command prints exactly one JSON line on stdout (also on failure:
``{"ok": false, "error": ..., "error_type": ...}``). Exit codes (restwise.common.exit_codes):
0 success, 1 refused/failed, 2 bad usage, 8 verification failed. dp_accounting is loaded by
the accountant only when a number is computed, so `restwise --help` stays fast.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from restwise.common.cli_errors import emit_json, exit_with
from restwise.common.exit_codes import ExitCode
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.privacy.errors import EventValidationError, PrivacyError
from restwise.privacy.events import ReleaseSpec
from restwise.privacy.ledger import PrivacyLedger, load_audit_key
from restwise.privacy.report import build_report, default_allow_list, write_report, write_run_report
from restwise.privacy.verify import verify_report

privacy_app = typer.Typer(
    help="Operators: plan privacy - epsilon for a training plan, or the noise for a target epsilon.",
    no_args_is_help=True,
)
audit_app = typer.Typer(
    help="Auditors: build a run's privacy report and verify reports independently.",
    no_args_is_help=True,
)


class Sampling(str, Enum):
    poisson = "poisson"
    fixed = "fixed"
    full = "full"


class Adjacency(str, Enum):
    add_remove = "add-remove"
    replace_one = "replace-one"


def _adjacency(value: Adjacency) -> str:
    return value.value.replace("-", "_")


def _plan_kwargs(sampling: Sampling, rate: Optional[float], cohort: Optional[int], population: Optional[int]) -> dict:
    if sampling is Sampling.fixed and (cohort is None or population is None):
        raise typer.BadParameter("fixed-size sampling needs --cohort and --population", param_hint="--sampling")
    if sampling is Sampling.poisson and rate is None and (cohort is None or population is None):
        raise typer.BadParameter("Poisson sampling needs --rate, or --cohort and --population", param_hint="--sampling")
    if rate is not None and sampling is not Sampling.poisson and rate != 1.0:
        raise typer.BadParameter("--rate applies to Poisson sampling only", param_hint="--rate")
    return dict(
        sampling=sampling.value,
        sampling_rate=rate if sampling is Sampling.poisson else None,
        cohort_size=cohort if sampling is not Sampling.full else None,
        population=population if sampling is not Sampling.full else None,
    )


_SAMPLING = typer.Option(Sampling.poisson, "--sampling", help="How each round's cohort is drawn.", case_sensitive=False)
_RATE = typer.Option(None, "--rate", min=0.0, max=1.0, help="Poisson sampling probability per person and round.")
_COHORT = typer.Option(None, "--cohort", min=1, help="Cohort size (fixed), or expected cohort (Poisson, with --population).")
_POPULATION = typer.Option(None, "--population", min=1, help="Number of persons who could be sampled.")
_ADJ = typer.Option(Adjacency.add_remove, "--adjacency", help="Neighbouring relation (replace-one doubles sensitivity).", case_sensitive=False)
_DELTA = typer.Option(1e-5, "--delta", min=0.0, max=1.0, help="The delta epsilon is stated at.")
_NO_AMP = typer.Option(False, "--no-amplification", help="Do not claim amplification by sampling (server knows the cohort).")
_JSON = typer.Option(False, "--json", help="Print one machine-readable JSON line.")


@privacy_app.command("epsilon")
def epsilon_command(
    noise_multiplier: float = typer.Option(..., "--noise-multiplier", "-z", help="Noise std / clip norm, per round."),
    rounds: int = typer.Option(..., "--rounds", min=1, max=10_000_000, help="Number of rounds (releases)."),
    sampling: Sampling = _SAMPLING,
    rate: Optional[float] = _RATE,
    cohort: Optional[int] = _COHORT,
    population: Optional[int] = _POPULATION,
    adjacency: Adjacency = _ADJ,
    delta: float = _DELTA,
    no_amplification: bool = _NO_AMP,
    as_json: bool = _JSON,
) -> None:
    """Epsilon after ROUNDS releases at the given noise multiplier and sampling."""
    plan = _plan_kwargs(sampling, rate, cohort, population)
    try:
        spec = ReleaseSpec.plan(noise_multiplier=noise_multiplier, adjacency=_adjacency(adjacency), **plan)
    except EventValidationError as exc:
        raise exit_with(exc, code=ExitCode.USAGE, as_json=as_json) from None
    try:
        result = PrivacyAccountant(claim_amplification=not no_amplification).epsilon_for_rounds(spec, rounds, delta)
    except PrivacyError as exc:
        raise exit_with(exc, as_json=as_json) from None
    if as_json:
        emit_json({"ok": True, "noise_multiplier": noise_multiplier, **result.to_dict()})
        return
    typer.echo(f"epsilon = {result.epsilon:.4f} at delta = {delta:g} after {rounds} round(s) (PLD, pessimistic)")
    rdp = "none in dp_accounting for this configuration" if result.epsilon_rdp_bound is None else f"{result.epsilon_rdp_bound:.4f}"
    typer.echo(f"  RDP upper bound:                           {rdp}")
    typer.echo(f"  against a server that knows each cohort:   {result.epsilon_no_amplification:.4f}")
    typer.echo(f"  adjacency {result.adjacency}, amplification claimed: {'yes' if result.amplification_claimed else 'no'}")
    typer.echo(f"  accountant: {result.accountant} ({result.accountant_version})")
    for note in result.notes:
        typer.echo(f"  note: {note}")


@privacy_app.command("calibrate")
def calibrate_command(
    target_epsilon: float = typer.Option(..., "--target-epsilon", "-e", help="Epsilon to stay within after all rounds."),
    rounds: int = typer.Option(..., "--rounds", min=1, max=10_000_000, help="Number of rounds (releases)."),
    sampling: Sampling = _SAMPLING,
    rate: Optional[float] = _RATE,
    cohort: Optional[int] = _COHORT,
    population: Optional[int] = _POPULATION,
    adjacency: Adjacency = _ADJ,
    delta: float = _DELTA,
    no_amplification: bool = _NO_AMP,
    as_json: bool = _JSON,
) -> None:
    """The smallest noise multiplier whose epsilon after ROUNDS stays within the target."""
    plan = _plan_kwargs(sampling, rate, cohort, population)
    try:
        res = calibrate_noise_multiplier(
            target_epsilon, delta, rounds, adjacency=_adjacency(adjacency),
            accountant=PrivacyAccountant(claim_amplification=not no_amplification), **plan,
        )
    except EventValidationError as exc:
        raise exit_with(exc, code=ExitCode.USAGE, as_json=as_json) from None
    except PrivacyError as exc:
        raise exit_with(exc, as_json=as_json) from None
    if as_json:
        emit_json({"ok": True, **res.to_dict()})
        return
    r = res.result
    typer.echo(f"noise multiplier = {res.noise_multiplier:.4f} (noise std = {res.noise_multiplier:.4f} x clip norm per round)")
    typer.echo(f"  gives epsilon = {r.epsilon:.4f} <= {target_epsilon:g} at delta = {delta:g} after {rounds} round(s)")
    if r.epsilon_rdp_bound is not None:
        typer.echo(f"  RDP upper bound: {r.epsilon_rdp_bound:.4f}")
    typer.echo(f"  against a server that knows each cohort: {r.epsilon_no_amplification:.4f}")


# --- audit ---------------------------------------------------------------------------------
@audit_app.command("report")
def report_command(
    run: str = typer.Argument(..., help="The run id."),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="The privacy ledger (JSON lines)."),
    key: Optional[Path] = typer.Option(None, "--key", help="The server's audit private key (PEM) to sign the report entry."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for report.json, report.html, ledger.jsonl, public_key.pem."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="A Restwise server's data folder (instead of --ledger)."),
    delta: float = typer.Option(1e-5, "--delta", min=0.0, max=1.0, help="Delta (with --ledger)."),
    secagg_shares: Optional[int] = typer.Option(None, "--secagg-shares", min=1, help="SecAgg+ shares per device."),
    secagg_threshold: Optional[float] = typer.Option(None, "--secagg-threshold", min=0.0, help="SecAgg+ reconstruction threshold."),
    budget_epsilon: Optional[float] = typer.Option(None, "--budget-epsilon", min=0.0, help="The run's epsilon budget, for the plot."),
    as_json: bool = _JSON,
) -> None:
    """Build RUN's privacy report (JSON + self-contained HTML), anchored in the signed ledger."""
    if (ledger is None) == (data_dir is None):
        raise typer.BadParameter("give exactly one of --ledger FILE or --data-dir DIR", param_hint="--ledger")
    try:
        if data_dir is not None:
            run_dir = data_dir / "runs" / run
            if not run_dir.is_dir() or Path(run).name != run:
                raise typer.BadParameter(f"no run {run!r} in {data_dir / 'runs'}", param_hint="RUN")
            signing = load_audit_key(key) if key is not None else None
            paths = write_run_report(run_dir, out_dir=out, signing_key=signing)
            report = json.loads(paths["report"].read_text())
        else:
            if out is None:
                raise typer.BadParameter("--out DIR is required with --ledger", param_hint="--out")
            if not ledger.exists():
                raise typer.BadParameter(f"no ledger at {ledger}", param_hint="--ledger")
            signing = load_audit_key(key) if key is not None else None
            led = PrivacyLedger(ledger, signing)
            if signing is None and any(e.signature for e in led.entries()):
                raise typer.BadParameter("the ledger is signed: give the server's audit key with --key", param_hint="--key")
            secagg = None
            if secagg_shares is not None or secagg_threshold is not None:
                secagg = {"num_shares": secagg_shares, "reconstruction_threshold": secagg_threshold}
            budget = {"epsilon": budget_epsilon, "delta": delta, "scope": "run"} if budget_epsilon else None
            report = build_report(led, run, secagg=secagg, delta=delta, egress_allow_list=default_allow_list(), budget=budget)
            paths = write_report(report, out, ledger=led)
    except PrivacyError as exc:
        raise exit_with(exc, as_json=as_json) from None
    if as_json:
        emit_json({"ok": True, "run_id": report["run_id"], "epsilon": report["epsilon"], "delta": report["delta"],
                    "files": {k: str(v) for k, v in paths.items()}})
        return
    eps = "unaccountable" if report["epsilon"] is None else f"{report['epsilon']:.4f}"
    typer.echo(f"run {report['run_id']}: epsilon = {eps} at delta = {report['delta']:g} over {len(report['releases'])} release(s)")
    for name, path in paths.items():
        typer.echo(f"  {name}: {path}")


@audit_app.command("verify")
def verify_command(
    report: Path = typer.Argument(..., help="report.json, or the folder holding it."),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="The ledger (default: ledger.jsonl beside the report)."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="The server's audit public key (PEM) to pin."),
    as_json: bool = _JSON,
) -> None:
    """Check signatures and hash chain, recompute epsilon from the ledger alone, and compare with
    the report. Exit 0 when everything matches, 8 on any mismatch or tampering."""
    res = verify_report(report, ledger_path=ledger, public_key=public_key)
    if as_json:
        emit_json(res.to_dict())
    else:
        for warning in res.warnings:
            typer.echo(f"warning: {warning}", err=True)
        if res.ok:
            typer.echo(
                f"OK: run {res.run_id}: {res.ledger_entries} ledger entries, signatures and hash chain valid; "
                f"epsilon = {res.epsilon_recomputed} at delta = {res.delta:g} recomputed from {res.releases} release(s) matches the report"
            )
        else:
            typer.echo(f"VERIFICATION FAILED ({len(res.problems)} problem(s)):", err=True)
            for problem in res.problems:
                typer.echo(f"  - {problem}", err=True)
    if not res.ok:
        raise typer.Exit(code=ExitCode.VERIFICATION_FAILED)
