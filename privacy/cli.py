"""`restwise privacy ...` (operators: plan epsilon, calibrate noise) and `restwise audit ...`
(auditors: build and verify privacy reports).

    restwise privacy epsilon   --noise-multiplier Z --rounds R [--sampling poisson|fixed|full]
                               [--rate Q | --cohort M --population N] [--adjacency add-remove|replace-one]
                               [--delta D] [--json]
    restwise privacy calibrate --target-epsilon E --rounds R [same sampling options] [--json]

Both headline epsilon against the server, which draws each round's cohort: no amplification by
sampling is claimed (calibration meets the target against the server). The amplified value,
valid only for third parties who see just the released model, is printed beside it, labelled
(``epsilon_amplified`` in JSON).
    restwise audit report RUN  (--ledger FILE --key AUDIT_KEY | --data-dir SERVER_DIR) [--out DIR]
    restwise audit report --bundle DIR|ZIP (--public-key KEY | --trust-shipped-key) [--out DIR] [RUN]
    restwise audit verify REPORT [--ledger FILE] (--public-key KEY | --trust-shipped-key) [--receipts DIR] [--json]
    restwise audit fingerprint KEY [--json]

``audit verify`` fails closed: without a pinned key (--public-key, the operator's published
audit key) it exits 8; --trust-shipped-key checks against the public_key.pem shipped beside the
report instead, warns, and prints that key's fingerprint to compare with the published one.
A key's fingerprint (``audit fingerprint``, the reports, the warnings) is ``sha256:`` and the
SHA-256 of its 32 raw Ed25519 public-key bytes in lowercase hex; the command also prints it
in groups of four for reading aloud.

``audit report --bundle`` is the auditor's: it needs no private key. It verifies the bundle
first (every signature and the hash chain against the pinned key, and report.json against the
ledger) and fails closed (exit 8, nothing written) when anything does not verify; then it
renders the report again as text (stdout, and report.txt) and as a page (report.html). A
bundle without report.json (a run stopped before its report) gets a report built from the
verified ledger alone, labelled as rebuilt.

With --json a command prints exactly one JSON line on stdout (also on failure:
``{"ok": false, "error": ..., "error_type": ...}``). Exit codes (restwise.common.exit_codes):
0 success, 1 refused/failed, 2 bad usage, 8 verification failed. dp_accounting is loaded by
the accountant only when a number is computed, so `restwise --help` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Optional

import typer

from restwise.common.cli_errors import emit_json, exit_with, fail
from restwise.common.exit_codes import ExitCode
from restwise.common.fsutil import atomic_write_bytes
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.privacy.errors import EventValidationError, KeyFileError, LedgerError, PrivacyError
from restwise.privacy.events import ReleaseSpec
from restwise.privacy.ledger import PrivacyLedger, key_fingerprint, load_audit_key, load_public_key, verify_ledger_file
from restwise.privacy.report import (
    HTML_FILE,
    LEDGER_FILE,
    PUBLIC_KEY_FILE,
    REPORT_FILE,
    LedgerSnapshot,
    build_report,
    default_allow_list,
    headline_epsilons,
    render_html,
    render_text,
    write_report,
    write_run_report,
)
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
_NO_AMP = typer.Option(
    False, "--no-amplification", hidden=True,
    help="Accepted for old scripts: no amplification by sampling is ever claimed in the headline.")
AMPLIFIED_WORDS = "for third parties who see only the model (amplified by sampling)"
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
        accountant = PrivacyAccountant()
        result = accountant.epsilon_for_rounds(spec, rounds, delta)
        amplified = accountant.epsilon_amplified([spec] * rounds, delta)
    except PrivacyError as exc:
        raise exit_with(exc, as_json=as_json) from None
    if as_json:
        emit_json({"ok": True, "noise_multiplier": noise_multiplier, **result.to_dict(), "epsilon_amplified": amplified})
        return
    typer.echo(f"epsilon = {result.epsilon:.4f} at delta = {delta:g} after {rounds} round(s), against the server "
               "(no amplification by sampling claimed; PLD, pessimistic)")
    rdp = "none in dp_accounting for this configuration" if result.epsilon_rdp_bound is None else f"{result.epsilon_rdp_bound:.4f}"
    typer.echo(f"  RDP upper bound:  {rdp}")
    typer.echo(f"  epsilon {AMPLIFIED_WORDS}: {_fmt_eps(amplified)}")
    typer.echo(f"  adjacency {result.adjacency}")
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
        res = calibrate_noise_multiplier(target_epsilon, delta, rounds, adjacency=_adjacency(adjacency), **plan)
        spec = ReleaseSpec.plan(noise_multiplier=res.noise_multiplier, adjacency=_adjacency(adjacency), **plan)
        amplified = PrivacyAccountant().epsilon_amplified([spec] * rounds, delta)
    except EventValidationError as exc:
        raise exit_with(exc, code=ExitCode.USAGE, as_json=as_json) from None
    except PrivacyError as exc:
        raise exit_with(exc, as_json=as_json) from None
    if as_json:
        emit_json({"ok": True, **res.to_dict(), "epsilon_amplified": amplified})
        return
    r = res.result
    typer.echo(f"noise multiplier = {res.noise_multiplier:.4f} (noise std = {res.noise_multiplier:.4f} x clip norm per round)")
    typer.echo(f"  gives epsilon = {r.epsilon:.4f} <= {target_epsilon:g} at delta = {delta:g} after {rounds} round(s), "
               "against the server (no amplification by sampling claimed)")
    if r.epsilon_rdp_bound is not None:
        typer.echo(f"  RDP upper bound: {r.epsilon_rdp_bound:.4f}")
    typer.echo(f"  epsilon {AMPLIFIED_WORDS}: {_fmt_eps(amplified)}")


def _fmt_eps(value) -> str:
    return "undefined for this sampling" if value is None else f"{value:.4f}"


# --- audit ---------------------------------------------------------------------------------
@audit_app.command("report")
def report_command(
    run: Optional[str] = typer.Argument(None, help="The run id (with --bundle: only to check it is that run's)."),
    bundle: Optional[Path] = typer.Option(
        None, "--bundle",
        help="Auditors: rebuild the human-readable report from a verification bundle (its folder, or the .zip "
        "the service serves) with no private key. Verifies it first; fails (exit 8) on anything that does not verify.",
    ),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="With --bundle: the server's published audit public key, pinned."),
    trust_shipped_key: bool = typer.Option(
        False, "--trust-shipped-key",
        help="With --bundle and no --public-key: check against the key shipped in the bundle (proves only that "
        "the bundle is consistent, not who signed it).",
    ),
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
    """Build RUN's privacy report (JSON + self-contained HTML), anchored in the signed ledger
    (operators, with the audit key); or, with --bundle, rebuild a verified bundle's report as
    text and HTML (auditors, no private key)."""
    if bundle is not None:
        if ledger is not None or data_dir is not None or key is not None:
            raise typer.BadParameter("--bundle needs no --ledger, --data-dir or --key (no private key)", param_hint="--bundle")
        _report_from_bundle(bundle, run, public_key, trust_shipped_key, out, delta, as_json)
        return
    if public_key is not None or trust_shipped_key:
        raise typer.BadParameter("--public-key and --trust-shipped-key go with --bundle", param_hint="--bundle")
    if run is None:
        raise typer.BadParameter("give the run id", param_hint="RUN")
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
                    "epsilon_amplified": report.get("epsilon_amplified"),
                    "files": {k: str(v) for k, v in paths.items()}})
        return
    eps = "unaccountable" if report["epsilon"] is None else f"{report['epsilon']:.4f}"
    typer.echo(f"run {report['run_id']}: epsilon = {eps} at delta = {report['delta']:g} over {len(report['releases'])} "
               "release(s), against the server (no amplification by sampling claimed)")
    typer.echo(f"  epsilon {AMPLIFIED_WORDS}: {_fmt_eps(report.get('epsilon_amplified'))}")
    for name, path in paths.items():
        typer.echo(f"  {name}: {path}")


BUNDLE_FILES = (REPORT_FILE, HTML_FILE, LEDGER_FILE, PUBLIC_KEY_FILE)
MAX_BUNDLE_MEMBER = 512 * 1024 * 1024
REBUILT_FROM_LEDGER = (
    "Rebuilt by the auditor from the signed ledger alone: the bundle holds no report.json (none was "
    "issued), so no budget or secure-aggregation settings are shown; every number is recomputed from "
    "the ledger's release events."
)


def _bundle_folder(bundle: Path, scratch: Path) -> Path:
    """The folder holding the bundle's files: ``bundle`` itself, its one subfolder (an unzipped
    bundle is ``<run id>/...``), or, for a .zip, its known files copied into ``scratch`` (by
    name only: nothing in the archive chooses a path here)."""
    if bundle.is_dir():
        if (bundle / LEDGER_FILE).is_file():
            return bundle
        inner = [d for d in bundle.iterdir() if d.is_dir() and (d / LEDGER_FILE).is_file()]
        if len(inner) == 1:
            return inner[0]
        raise typer.BadParameter(f"{bundle} holds no {LEDGER_FILE} (nor one folder with it)", param_hint="--bundle")
    try:
        with zipfile.ZipFile(bundle) as zf:
            seen = set()
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                name = parts[-1] if parts else ""
                if info.is_dir() or name not in BUNDLE_FILES or len(parts) > 2:
                    continue
                if name in seen:
                    raise typer.BadParameter(f"{bundle} holds {name} twice", param_hint="--bundle")
                if info.file_size > MAX_BUNDLE_MEMBER:
                    raise typer.BadParameter(f"{name} in {bundle} is larger than a bundle file can be", param_hint="--bundle")
                seen.add(name)
                (scratch / name).write_bytes(zf.read(info))
    except (OSError, zipfile.BadZipFile) as exc:
        raise typer.BadParameter(f"{bundle} is neither a bundle folder nor a readable zip ({exc})", param_hint="--bundle") from None
    if LEDGER_FILE not in seen:
        raise typer.BadParameter(f"{bundle} holds no {LEDGER_FILE}", param_hint="--bundle")
    return scratch


def _report_from_bundle(bundle: Path, run: Optional[str], public_key: Optional[Path], trust_shipped_key: bool,
                        out: Optional[Path], delta: float, as_json: bool) -> None:
    code = ExitCode.VERIFICATION_FAILED
    with tempfile.TemporaryDirectory(prefix="restwise-bundle-") as scratch:
        folder = _bundle_folder(Path(bundle), Path(scratch))
        ledger_file = folder / LEDGER_FILE
        shipped = folder / PUBLIC_KEY_FILE
        # -- the key: pinned, or the shipped one only when asked for ----------------------
        try:
            if public_key is not None:
                key = load_public_key(public_key)
            elif trust_shipped_key:
                if not shipped.is_file():
                    raise fail("the bundle ships no public_key.pem to trust; pass --public-key", code)
                key = load_public_key(shipped)
                typer.echo(f"warning: checking against the key shipped in the bundle (fingerprint {key_fingerprint(key)}): "
                           "compare it with the one the operator published", err=True)
            else:
                raise fail("no key to check the signatures against: pass --public-key with the operator's published "
                           "key (or --trust-shipped-key); nothing was rebuilt", code)
        except KeyFileError as exc:
            raise exit_with(exc, code=code, as_json=as_json) from None
        # -- the ledger, then the report: nothing is rendered from anything unverified -----
        try:
            entries, _ = verify_ledger_file(ledger_file, key)
        except LedgerError as exc:
            raise fail(f"the ledger does not verify: {exc}; nothing was rebuilt", code) from None
        if not entries:
            raise fail("the ledger is empty; nothing was rebuilt", code)
        report_file = folder / REPORT_FILE
        if report_file.is_file():
            res = verify_report(report_file, ledger_path=ledger_file, public_key=key)
            if not res.ok:
                for problem in res.problems:
                    typer.echo(f"  - {problem}", err=True)
                raise fail(f"the bundle does not verify ({len(res.problems)} problem(s)); nothing was rebuilt", code)
            for warning in res.warnings:
                typer.echo(f"warning: {warning}", err=True)
            report = json.loads(report_file.read_text(encoding="utf-8"))
            digest = hashlib.sha256(report_file.read_bytes()).hexdigest()
            notice = (f"Rebuilt by the auditor from a verified bundle: report.json (sha256 {digest[:16]}...) is the one "
                      f"recorded in the signed ledger; signatures checked against key {key_fingerprint(key)}.")
            source = "report"
        else:
            run_ids = sorted({e.payload.get("run_id") or (e.payload.get("target") if e.payload.get("kind") == "audit" else None)
                              for e in entries} - {None})
            run_id = run if run is not None else (run_ids[0] if len(run_ids) == 1 else None)
            if run_id is None:
                raise typer.BadParameter(f"the ledger holds {len(run_ids)} runs: name one", param_hint="RUN")
            try:
                report = build_report(LedgerSnapshot(ledger_file, entries), run_id, delta=delta, public_key=key)
            except PrivacyError as exc:
                raise exit_with(exc, as_json=as_json) from None
            notice, source = REBUILT_FROM_LEDGER, "ledger"
        if run is not None and report.get("run_id") != run:
            raise fail(f"the bundle is run {report.get('run_id')}'s, not {run}'s", ExitCode.USAGE)
        text, page = render_text(report, notice=notice), render_html(report, notice=notice)
    files = {}
    if out is not None:
        if out.resolve() == Path(bundle).resolve() or (out / REPORT_FILE).exists():
            raise typer.BadParameter("write the rebuilt report into a folder of its own, not over a bundle", param_hint="--out")
        out.mkdir(parents=True, exist_ok=True)
        files = {"html": out / HTML_FILE, "text": out / "report.txt"}
        atomic_write_bytes(files["html"], page.encode("utf-8"))
        atomic_write_bytes(files["text"], text.encode("utf-8"))
    if as_json:
        against, amplified = headline_epsilons(report)
        emit_json({"ok": True, "run_id": report["run_id"], "epsilon": against, "epsilon_amplified": amplified,
                   "report_schema_version": report.get("report_schema_version"), "delta": report.get("delta"),
                   "source": source, "key_fingerprint": key_fingerprint(key), "files": {k: str(v) for k, v in files.items()}})
        return
    typer.echo(text, nl=False)
    for name, path in files.items():
        typer.echo(f"  {name}: {path}")


@audit_app.command("verify")
def verify_command(
    report: Path = typer.Argument(..., help="report.json, or the folder holding it."),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="The ledger (default: ledger.jsonl beside the report)."),
    public_key: Optional[Path] = typer.Option(
        None, "--public-key", help="The server's published audit public key (PEM), pinned. Required unless --trust-shipped-key."
    ),
    trust_shipped_key: bool = typer.Option(
        False, "--trust-shipped-key",
        help="No pinned key: check against the public_key.pem shipped beside the report (proves only that the "
        "folder is self-consistent, not who signed it); warns and prints its fingerprint.",
    ),
    receipts: Optional[Path] = typer.Option(
        None, "--receipts",
        help="A folder of devices' receipt files (`restwise device receipts export`): every entry they received "
        "must be in the ledger, byte for byte. No receipt file for the run fails.",
    ),
    as_json: bool = _JSON,
) -> None:
    """Check signatures and hash chain, recompute epsilon from the ledger alone, and compare with
    the report (and, with --receipts, the ledger with the devices' receipts). Exit 0 when
    everything matches, 8 on any mismatch or tampering, or when no key is pinned (--public-key)
    and --trust-shipped-key was not given."""
    if public_key is not None and trust_shipped_key:
        raise typer.BadParameter("give either --public-key or --trust-shipped-key, not both", param_hint="--trust-shipped-key")
    res = verify_report(report, ledger_path=ledger, public_key=public_key, trust_shipped_key=trust_shipped_key,
                        receipts=receipts)
    if as_json:
        emit_json(res.to_dict())
    else:
        for warning in res.warnings:
            typer.echo(f"warning: {warning}", err=True)
        if res.ok:
            key = "pinned key" if res.key_pinned else "shipped key (not pinned)"
            typer.echo(
                f"OK: run {res.run_id}: {res.ledger_entries} ledger entries, signatures ({key} "
                f"{res.key_fingerprint}) and hash chain valid; report schema {res.report_schema_version}; "
                f"epsilon = {res.epsilon_against_server} against the server (no amplification by sampling claimed) at "
                f"delta = {res.delta:g}, recomputed from {res.releases} release(s), matches the report"
            )
            typer.echo(f"  epsilon {AMPLIFIED_WORDS}: {_fmt_eps(res.epsilon_amplified)}")
            if res.receipt_files is not None:
                typer.echo(f"  receipts: {res.receipt_files} device receipt file(s) for this run agree with the ledger")
            for row in res.spent_not_applied:
                typer.echo(f"  spent, not applied: round {row['round']} attempt {row['attempt']} "
                           f"(release at ledger seq {row['release_seq']}; counted in epsilon): {row['reason']}")
        else:
            typer.echo(f"VERIFICATION FAILED ({len(res.problems)} problem(s)):", err=True)
            for problem in res.problems:
                typer.echo(f"  - {problem}", err=True)
    if not res.ok:
        raise typer.Exit(code=ExitCode.VERIFICATION_FAILED)


def grouped_fingerprint(fingerprint: str) -> str:
    """``sha256:abcd...`` as ``abcd ef01 ...`` (16 groups of four hex digits) for reading aloud."""
    digest = fingerprint.split(":", 1)[-1]
    return " ".join(digest[i:i + 4] for i in range(0, len(digest), 4))


@audit_app.command("fingerprint")
def fingerprint_command(
    key: Path = typer.Argument(..., help="An Ed25519 public key (PEM), e.g. the operator's published audit key."),
    as_json: bool = _JSON,
) -> None:
    """Print a public key's fingerprint: sha256: + the SHA-256 of its 32 raw Ed25519 bytes (hex),
    and the same digest in groups of four. Compare it with the one the operator published and
    with the one `audit verify --trust-shipped-key` prints."""
    try:
        public = load_public_key(key)
    except KeyFileError as exc:
        raise exit_with(exc, code=ExitCode.USAGE, as_json=as_json) from None
    fingerprint = key_fingerprint(public)
    if as_json:
        emit_json({"ok": True, "fingerprint": fingerprint, "grouped": grouped_fingerprint(fingerprint)})
        return
    typer.echo(fingerprint)
    typer.echo(grouped_fingerprint(fingerprint))
