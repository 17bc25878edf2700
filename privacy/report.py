"""The auditor's privacy report for one run: report.json (schema below) and a self-contained
report.html, written next to a copy of the signed ledger and the server's public key, so
``restwise audit verify`` can check everything from those files alone.

Files written by :func:`write_report` into ``out_dir``::

    report.json      the report (schema version REPORT_SCHEMA_VERSION), UTF-8, indented
    report.html      the same for people: numbers, threat model, leakage, plot of epsilon
    ledger.jsonl     the signed ledger up to and including the entry that attests the report
    public_key.pem   the server's Ed25519 audit public key (pin it: compare its fingerprint)

Anchoring: :func:`write_report` writes report.json and report.html to ``.partial-*`` files,
appends a ``report_issued`` event holding their SHA-256 digests to the ledger, and only then
renames them into place: a report.json in the folder is always one the ledger attests, whatever
moment a crash hits (docs/privacy-accounting.md, "Write order"). Any change to either file, or
to the ledger, is then detected by verification.

An auditor rebuilds the human-readable report from those files with no private key
(``restwise audit report --bundle DIR``): after the ledger and report verify, the page
(:func:`render_html`) and a plain-text version (:func:`render_text`) are rendered again from
the verified report - or, when a bundle holds no report.json (a run that was stopped before
its report), built from the verified ledger alone (:func:`build_report` over a
:class:`LedgerSnapshot`) and labelled as rebuilt, not issued.

report.json (schema 2), top-level keys:

=============================  =================================================================
report_schema_version          2
generated_at                   ISO-8601 UTC
run_id                         the run
privacy_unit                   "person", and what that means
adjacency                      "add_remove" | "replace_one"; adjacency_description in words
delta                          the delta epsilon is stated at
epsilon                        THE HEADLINE: epsilon against the party that samples (the server
                               draws each cohort, so no amplification by sampling is claimed);
                               PLD, pessimistic; null if unaccountable
epsilon_rdp_bound              independent RDP upper bound of ``epsilon``
epsilon_amplified              epsilon for third parties who see only the released model
                               (amplified by sampling): never valid against the server; equal
                               to ``epsilon`` when every round used all devices; null where
                               amplification is undefined (fixed-size under add/remove)
epsilon_amplified_label        what ``epsilon_amplified`` is, in words (show it with the number)
amplification_claimed          false: the headline claims no amplification
accounting                     the accountant's full result: name, version, PLD parameters,
                               composed groups, epsilon_amplified, notes (or {"error": ...})
mechanism                      name, clip norms, effective noise multipliers, noise std
sampling                       methods, rates, cohort sizes, population
releases                       one row per release (from the ledger): round, attempt, sampling,
                               cohort, planned_clients, survivors, noise_multiplier,
                               noise_std_total, clip_norm, model_hash, ledger_seq
epsilon_curve                  [{releases, round, epsilon, epsilon_rdp_bound,
                               epsilon_amplified}], at most 25 points
budget                         {epsilon, delta, scope, and for a run: target_epsilon,
                               max_epsilon (the cap in force), default_max_epsilon,
                               cap_raised} or null
refusals                       budget refusals recorded for the run
secure_aggregation             SecAgg+ parameters given by the caller (shares, threshold,
                               dropouts, ...) or null
threat_model                   list of sentences
information_leakage            {leaves_device: allow-list (given) or default text,
                                server_learns: list of sentences}
ledger                         {file, entries, head_seq, head_hash, head_signature,
                                public_key_file, public_key_fingerprint, signed}
=============================  =================================================================

Schema 1 (reports issued before the headline changed) headlined ``epsilon`` amplified by
sampling wherever a round sampled, with ``epsilon_no_amplification`` (the value against the
server) beside it and ``amplification_claimed`` true. ``restwise audit verify`` still checks
schema-1 reports (:func:`run_accounting_v1` recomputes them) and says which schema it read and
what the epsilon against the server is.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from restwise.common.fsutil import atomic_write_bytes, fsync_dir
from restwise.privacy.accountant import PLDParameters, PrivacyAccountant
from restwise.privacy.budget import DEFAULT_MAX_EPSILON
from restwise.privacy.errors import AccountingError, ReportError
from restwise.privacy.events import AuditEvent, BudgetRefusalEvent, GaussianRoundEvent, ReportIssuedEvent, utc_now
from restwise.privacy.ledger import LedgerEntry, PrivacyLedger, key_fingerprint, load_audit_key, public_key_pem

REPORT_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # what verification reads (1: the amplified headline)
REPORT_FILE = "report.json"
HTML_FILE = "report.html"
LEDGER_FILE = "ledger.jsonl"
PUBLIC_KEY_FILE = "public_key.pem"
CURVE_POINTS = 25

ADJACENCY_WORDS = {
    "add_remove": (
        "add/remove one person: the guarantee compares the run with and without all of one "
        "person's data; a clipped update moves the released sum by at most the clip norm C"
    ),
    "replace_one": (
        "replace one person: the guarantee compares the run with one person's data replaced by "
        "anyone else's; the released sum can move by up to 2C, so the effective noise "
        "multiplier is half the recorded one"
    ),
}
AMPLIFIED_LABEL = (
    "epsilon for third parties who see only the released model (amplified by sampling): it assumes "
    "the observer does not know who took part in each round, so it never holds against the server, "
    "which drew every cohort"
)
HEADLINE_LABEL = "epsilon against the server, which draws each cohort (no amplification by sampling claimed)"
PRIVACY_UNIT = (
    "person: each device holds exactly one person's data and contributes at most one clipped "
    "update per round, so the guarantee covers everything a person contributes"
)
DEFAULT_LEAVES_DEVICE = (
    "Per round, only the person's vector - the update of the shared part of the model, or the "
    "bounded statistics of a one-release model - clipped on the device to L2 norm C, with the "
    "device's share of the Gaussian noise added, and masked by secure aggregation; plus the "
    "protocol's own key and share records. No per-device metric (such as a training loss) is "
    "sent. Raw observations, check-in answers, the personal part of the model and example "
    "counts are never sent. (No explicit allow-list was given to this report.)"
)


def accountant_from(accounting: dict | None, claim_amplification: bool = False) -> PrivacyAccountant:
    pld = PLDParameters()
    if accounting and isinstance(accounting.get("pld_parameters"), dict):
        params = {k: v for k, v in accounting["pld_parameters"].items() if k != "interval_used"}
        pld = PLDParameters(**params)
    return PrivacyAccountant(pld=pld, claim_amplification=claim_amplification)


def _placeholder(accountant: PrivacyAccountant, second: str, value: float | None, **extra: Any) -> dict[str, Any]:
    """The accounting dict when the accountant gives no result: no release (every epsilon 0.0)
    or releases it refuses (None, with the error). ``second``: the number the schema puts
    beside the headline."""
    return {"epsilon": value, "epsilon_rdp_bound": value, second: value,
            "amplification_claimed": accountant.claim_amplification, "pld_parameters": asdict(accountant.pld), **extra}


def _accounted(releases: list[GaussianRoundEvent], delta: float, accountant: PrivacyAccountant,
               second: str) -> tuple[Any, list[dict[str, Any]]]:
    """(the accountant's result, its epsilon curve), or (a placeholder dict, []) when there is
    no release or the accountant refuses them."""
    if not releases:
        return _placeholder(accountant, second, 0.0, notes=["no release was made: nothing about any person was revealed"]), []
    try:
        return accountant.epsilon(releases, delta), accountant.epsilon_curve(releases, delta, max_points=CURVE_POINTS)
    except AccountingError as exc:
        return _placeholder(accountant, second, None, error=f"{type(exc).__name__}: {exc}"), []


def run_accounting(
    releases: list[GaussianRoundEvent], delta: float, accountant: PrivacyAccountant
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(accounting dict, epsilon curve) for a run's releases, schema 2: exactly what
    build_report puts in the report and what verification recomputes. The headline
    ``epsilon`` claims no amplification whatever ``accountant`` says (only its PLD parameters
    are used); ``epsilon_amplified`` stands beside it."""
    headline = PrivacyAccountant(pld=accountant.pld)
    result, points = _accounted(releases, delta, headline, "epsilon_amplified")
    if isinstance(result, dict):
        return result, points
    accounting = result.to_dict()
    accounting.pop("epsilon_no_amplification")  # the headline itself: no amplification claimed
    accounting["epsilon_amplified"] = headline.epsilon_amplified(releases, delta)
    accounting["epsilon_amplified_label"] = AMPLIFIED_LABEL
    if accounting["epsilon_amplified"] is None:
        accounting["notes"].append("no amplified value: amplification by sampling is not defined for these releases")
    curve = []
    for p in points:
        point = {k: v for k, v in p.items() if k != "epsilon_no_amplification"}
        point["epsilon_amplified"] = headline.epsilon_amplified(releases[: p["releases"]], delta)
        curve.append(point)
    return accounting, curve


def run_accounting_v1(
    releases: list[GaussianRoundEvent], delta: float, accountant: PrivacyAccountant
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(accounting dict, epsilon curve) as a schema-1 report holds them (``epsilon`` amplified
    when ``accountant`` claims amplification): what verification recomputes for a report
    issued before schema 2. Never used to issue a report."""
    result, curve = _accounted(releases, delta, accountant, "epsilon_no_amplification")
    return (result if isinstance(result, dict) else result.to_dict()), curve


def release_row(seq: int, ev: GaussianRoundEvent) -> dict[str, Any]:
    return {
        "ledger_seq": seq,
        "round": ev.round,
        "attempt": ev.attempt,
        "timestamp": ev.timestamp,
        "sampling": ev.sampling,
        "sampling_rate": ev.sampling_rate,
        "cohort_size": ev.cohort_size,
        "population": ev.population,
        "planned_clients": ev.planned_clients,
        "survivors": ev.survivors,
        "noise_multiplier": ev.noise_multiplier,
        "noise_std_total": ev.noise_std_total,
        "clip_norm": ev.clip_norm,
        "model_hash": ev.model_hash,
    }


# The AuditEvent a server writes when a release it accounted ahead (before any unmasking
# share) produced no stored model (privacy/release.py NOT_APPLIED_ACTION; named here too so
# that reading a report needs no part of the release machinery).
NOT_APPLIED_ACTION = "release.not-applied"


def spent_not_applied(entries: Sequence[LedgerEntry], run_id: str, limit_seq: int | None = None) -> list[dict[str, Any]]:
    """The releases of ``run_id`` that were spent (counted in epsilon) but produced no model:
    one row per ``release.not-applied`` entry (up to ``limit_seq``), from the ledger alone.
    What the report lists and verification recomputes."""
    out = []
    for entry in entries:
        ev = entry.event
        if limit_seq is not None and entry.seq > limit_seq:
            break
        if isinstance(ev, AuditEvent) and ev.action == NOT_APPLIED_ACTION and ev.target == run_id:
            d = ev.details
            out.append({"release_seq": d.get("release_seq"), "round": d.get("round"), "attempt": d.get("attempt"),
                        "ledger_seq": entry.seq, "reason": d.get("reason")})
    return out


def _threat_model(secagg: dict | None, sampled: bool) -> list[str]:
    out = [
        "Adversary: anyone who sees the released models, including the server operator; they may "
        "know every other person's data. The guarantee is (epsilon, delta)-differential privacy "
        "for each person over the whole run.",
        "Noise is added on the devices in shares (distributed DP): each device adds its share of "
        "the Gaussian noise before masking, so the server only ever sees a noised sum. If fewer "
        "devices survive a round than the noise was sized for, the sum carries less noise; the "
        "ledger records the actual noise of every release and that is what is accounted.",
    ]
    if secagg:
        shares = secagg.get("num_shares", secagg.get("shares"))
        threshold = secagg.get("reconstruction_threshold", secagg.get("threshold"))
        out.append(
            "Secure aggregation (SecAgg+): each device's update is masked; the server can only "
            f"unmask the sum of at least the threshold ({threshold}) of {shares} shares. An honest-"
            "but-curious server learns an individual update only if it colludes with at least "
            "the threshold number of that device's share holders."
        )
    else:
        out.append(
            "No secure-aggregation parameters were given to this report: if the server saw "
            "individual updates, the epsilon above holds against those who see only the released "
            "model, not against the server."
        )
    out.append(
        "No amplification by sampling is claimed in the headline: epsilon holds even against the "
        "server, which draws each round's cohort and knows who took part."
    )
    if sampled:
        out.append(
            "epsilon_amplified is smaller because each person took part in a round only with some "
            "probability; it holds only for third parties who see just the released model and do "
            "not know who took part in each round, never against the server."
        )
    out.append(
        "Not covered: a server that deviates from the protocol to add less noise than recorded, "
        "side channels (timing, message sizes), and what the released model reveals about the "
        "population as a whole (which is its purpose)."
    )
    return out


@dataclass(frozen=True)
class LedgerSnapshot:
    """Ledger entries already read and verified (``ledger.verify_ledger_file``), for
    :func:`build_report` without a ledger object: read-only, no signing key (nothing is
    repaired or appended; an auditor's bundle is never written to)."""

    path: Path
    verified_entries: Sequence[LedgerEntry]
    signing_key: None = None

    def entries(self) -> list[LedgerEntry]:
        return list(self.verified_entries)


def build_report(
    ledger: PrivacyLedger | LedgerSnapshot,
    run_id: str,
    *,
    secagg: dict | None = None,
    delta: float,
    egress_allow_list: Any = None,
    budget: dict | None = None,
    pld: PLDParameters | None = None,
    public_key=None,
    model: dict | None = None,
) -> dict[str, Any]:
    """The report for ``run_id`` from the ledger's events alone (plus the given context).
    ``model``: what was released and to whom (the orchestrator's description: architecture,
    release mechanism and its sensitivity, the released model's hash, its delivery)."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ReportError("delta must be in (0, 1)")
    entries = ledger.entries()
    if not entries:
        raise ReportError(f"the ledger {ledger.path} is empty")
    releases: list[tuple[int, GaussianRoundEvent]] = []
    refusals = []
    mentioned = False
    for entry in entries:
        ev = entry.event
        if isinstance(ev, GaussianRoundEvent) and ev.run_id == run_id:
            releases.append((entry.seq, ev))
        elif isinstance(ev, BudgetRefusalEvent) and ev.run_id == run_id:
            refusals.append({"ledger_seq": entry.seq, **ev.to_dict()})
        elif getattr(ev, "run_id", None) == run_id or getattr(ev, "target", None) == run_id:
            mentioned = True
    if not releases and not refusals and not mentioned:
        raise ReportError(f"the ledger has no entry for run {run_id!r}")
    accountant = PrivacyAccountant(pld=pld)  # the headline claims no amplification
    events = [ev for _, ev in releases]
    accounting, curve = run_accounting(events, delta, accountant)
    adjacencies = sorted({ev.adjacency for ev in events}) or ["add_remove"]
    head = entries[-1]
    if public_key is None and ledger.signing_key is not None:
        public_key = ledger.signing_key.public_key()
    return {
        "report_schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": utc_now(),
        "run_id": run_id,
        "privacy_unit": PRIVACY_UNIT,
        "adjacency": adjacencies[0] if len(adjacencies) == 1 else adjacencies,
        "adjacency_description": ADJACENCY_WORDS.get(adjacencies[0], ""),
        "delta": float(delta),
        "epsilon": accounting.get("epsilon"),
        "epsilon_rdp_bound": accounting.get("epsilon_rdp_bound"),
        "epsilon_amplified": accounting.get("epsilon_amplified"),
        "epsilon_amplified_label": AMPLIFIED_LABEL,
        "amplification_claimed": False,
        "accounting": accounting,
        "mechanism": {
            "name": "gaussian",
            "clip_norms": sorted({ev.clip_norm for ev in events}),
            "noise_multipliers": sorted({ev.noise_multiplier for ev in events}),
            "effective_noise_multipliers": {
                "min": min((ev.noise_multiplier for ev in events), default=None),
                "max": max((ev.noise_multiplier for ev in events), default=None),
            },
            "noise_std_total": {
                "min": min((ev.noise_std_total for ev in events), default=None),
                "max": max((ev.noise_std_total for ev in events), default=None),
            },
        },
        "sampling": {
            "methods": sorted({ev.sampling for ev in events}),
            "rates": sorted({ev.sampling_rate for ev in events}),
            "population": sorted({ev.population for ev in events}),
            "cohort_size": {
                "min": min((ev.cohort_size for ev in events), default=None),
                "max": max((ev.cohort_size for ev in events), default=None),
            },
        },
        "releases": [release_row(seq, ev) for seq, ev in releases],
        # Releases accounted before the aggregate existed that produced no model: in epsilon.
        "spent_not_applied": spent_not_applied(entries, run_id),
        "epsilon_curve": curve,
        "budget": budget,
        "refusals": refusals,
        "secure_aggregation": secagg,
        "threat_model": _threat_model(secagg, any(ev.sampling != "full" for ev in events)),
        "information_leakage": {
            "leaves_device": egress_allow_list if egress_allow_list is not None else DEFAULT_LEAVES_DEVICE,
            "server_learns": [
                "each round's noised sum of clipped vectors (the released model change, or the released "
                "statistics the model is solved from), covered by epsilon",
                "which devices took part in each round and which dropped out, when, and the sizes of their messages",
                "the secure-aggregation protocol's public keys and encrypted shares (no plaintext update)",
                "which connected devices answered the delivery of a released model (an empty reply; "
                "whether a device kept the model is not sent)",
            ],
        },
        "ledger": {
            "file": LEDGER_FILE,
            "entries": len(entries),
            "head_seq": head.seq,
            "head_hash": head.hash,
            "head_signature": head.signature,
            "signed": head.signature is not None,
            "public_key_file": PUBLIC_KEY_FILE if public_key is not None else None,
            "public_key_fingerprint": key_fingerprint(public_key) if public_key is not None else None,
        },
        "model": model,
    }


# --- files -----------------------------------------------------------------------------------
def report_bytes(report: dict) -> bytes:
    return (json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


PARTIAL_PREFIX = ".partial-"  # report files written but not yet anchored and renamed


def _partial(path: Path) -> Path:
    return path.with_name(PARTIAL_PREFIX + path.name)


def _write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _issued_entries(ledger: PrivacyLedger, run_id: str) -> list[LedgerEntry]:
    return [e for e in ledger.entries() if e.kind == ReportIssuedEvent.kind and e.payload.get("run_id") == run_id]


def write_report(
    report: dict,
    out_dir: str | os.PathLike,
    *,
    ledger: PrivacyLedger | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write report.json and report.html; with ``ledger``, anchor both in it (a
    ``report_issued`` entry with their SHA-256) and copy the ledger and public key beside them,
    so the folder verifies on its own. Returns the written paths by name.

    Write order (a crash at any point leaves either no report.json or an anchored one, never
    a report.json the ledger does not attest): both files to ``.partial-*`` files (fsync), the
    anchoring ledger entry (fsync), then the renames - the old report.json (if any) removed
    first, report.html, report.json last - and the folder fsync. :func:`finish_partial_report`
    completes the renames after a crash between anchor and rename. ``on_step`` is called with
    "report-written" and "report-anchored" (the crash test's hook points)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report_bytes(report)
    page = render_html(report).encode("utf-8")
    paths = {"report": out / REPORT_FILE, "html": out / HTML_FILE}
    if ledger is None:
        atomic_write_bytes(paths["report"], data)
        atomic_write_bytes(paths["html"], page)
        return paths
    _write_durable(_partial(paths["html"]), page)
    _write_durable(_partial(paths["report"]), data)
    fsync_dir(out)
    if on_step is not None:
        on_step("report-written")
    entry = ledger.append(
        ReportIssuedEvent(
            run_id=report["run_id"],
            report_sha256=hashlib.sha256(data).hexdigest(),
            html_sha256=hashlib.sha256(page).hexdigest(),
            report_schema_version=REPORT_SCHEMA_VERSION,
        )
    )
    if on_step is not None:
        on_step("report-anchored")
    _rename_partials(out)
    dest = out / LEDGER_FILE
    if dest.resolve() == ledger.path.resolve():
        paths["ledger"] = ledger.path  # writing beside the live ledger: it is the copy
    else:
        paths["ledger"] = ledger.copy_to(dest, upto_seq=entry.seq)
    if ledger.signing_key is not None:
        paths["public_key"] = out / PUBLIC_KEY_FILE
        pem = public_key_pem(ledger.signing_key)
        if not paths["public_key"].exists() or paths["public_key"].read_bytes() != pem:
            atomic_write_bytes(paths["public_key"], pem)
    return paths


def _rename_partials(out: Path) -> None:
    # An older report.json goes first: with it gone, a crash between the two renames leaves
    # no report.json (the run is then finished again), never an old report beside a new page.
    (out / REPORT_FILE).unlink(missing_ok=True)
    os.replace(_partial(out / HTML_FILE), out / HTML_FILE)
    os.replace(_partial(out / REPORT_FILE), out / REPORT_FILE)
    fsync_dir(out)


def finish_partial_report(out_dir: str | os.PathLike, ledger: PrivacyLedger, run_id: str) -> bool:
    """After a crash inside :func:`write_report`: when the ``.partial-*`` files are the ones
    the ledger's last ``report_issued`` entry of ``run_id`` attests, rename them into place
    (True). Otherwise (never anchored, or already renamed) remove the partial files: they
    attest nothing (False)."""
    out = Path(out_dir)
    partial_json, partial_html = _partial(out / REPORT_FILE), _partial(out / HTML_FILE)
    if not partial_json.exists() or not partial_html.exists():
        partial_json.unlink(missing_ok=True)
        partial_html.unlink(missing_ok=True)
        return False
    issued = _issued_entries(ledger, run_id)
    last = issued[-1].payload if issued else {}
    if (last.get("report_sha256") == hashlib.sha256(partial_json.read_bytes()).hexdigest()
            and last.get("html_sha256") == hashlib.sha256(partial_html.read_bytes()).hexdigest()):
        _rename_partials(out)
        return True
    partial_json.unlink()
    partial_html.unlink()
    return False


def report_is_current(out_dir: str | os.PathLike, ledger: PrivacyLedger, run_id: str) -> bool:
    """Whether ``out_dir/report.json`` is attested by a ``report_issued`` entry of ``run_id``
    and covers every release of the run in the ledger (its head is at or after the last one)."""
    path = Path(out_dir) / REPORT_FILE
    try:
        data = path.read_bytes()
        report = json.loads(data)
    except (OSError, ValueError):
        return False
    digest = hashlib.sha256(data).hexdigest()
    entries = ledger.entries()
    if not any(e.kind == ReportIssuedEvent.kind and e.payload.get("report_sha256") == digest for e in entries):
        return False
    head = (report.get("ledger") or {}).get("head_seq") if isinstance(report, dict) else None
    last_release = max((e.seq for e in entries if e.kind == GaussianRoundEvent.kind and e.payload.get("run_id") == run_id),
                       default=0)
    return isinstance(head, int) and head >= last_release


def default_allow_list() -> dict[str, Any]:
    """The device egress allow-list (restwise.privacy.egress), for the information-leakage section."""
    # The allow-list lives with the egress guard, a Flower mod: Flower (about 0.5 s) loads when
    # a report is built, never for `restwise audit verify` or `restwise --help`.
    from restwise.privacy.egress import allow_list_summary

    return allow_list_summary()


def run_budget(config: dict[str, Any]) -> dict[str, Any] | None:
    """A run's budget from its configuration: its target epsilon and its cap ``max_epsilon``
    (the cap in force: config.json is written at creation and never changed), the smaller
    being what the run may spend; None for a configuration that names neither. A
    configuration from before the cap existed carries none (``max_epsilon`` null)."""
    target, cap = config.get("target_epsilon"), config.get("max_epsilon")
    limits = [float(v) for v in (target, cap) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not limits:
        return None
    default = config.get("default_max_epsilon", DEFAULT_MAX_EPSILON)
    return {"epsilon": min(limits), "delta": config.get("delta", 1e-5), "scope": "run",
            "target_epsilon": target, "max_epsilon": cap, "default_max_epsilon": default,
            "cap_raised": isinstance(cap, (int, float)) and cap > default}


def write_run_report(
    run_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    egress_allow_list: Any = None,
    signing_key=None,
    model: dict | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Report for a server run folder (``<data_dir>/runs/<run_id>/``: config.json,
    ledger.jsonl signed with the key at config ``audit_key_path`` or ``../audit_key.pem``).
    Writes into ``out_dir`` (default: the run folder) and anchors the report in the run's ledger."""
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    config_path = run_dir / "config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            raise ReportError(f"{config_path} is not readable JSON") from None
    ledger_path = run_dir / LEDGER_FILE
    if not ledger_path.exists() and not config:
        raise ReportError(f"no ledger at {ledger_path}")
    # A run folder without a ledger released nothing (stopped before its first round): its
    # report says so, and is the ledger's first entry.
    if signing_key is None:
        key_path = Path(config["audit_key_path"]) if config.get("audit_key_path") else run_dir.resolve().parent / "audit_key.pem"
        signing_key = load_audit_key(key_path)
    ledger = PrivacyLedger(ledger_path, signing_key)
    # A run that released nothing has only audit entries (round.failed) naming it as target.
    run_ids = sorted({e.payload.get("run_id") or (e.payload.get("target") if e.payload.get("kind") == "audit" else None)
                      for e in ledger.entries()} - {None})
    if not run_ids:
        run_ids = [run_dir.name]
    run_id = run_dir.name if run_dir.name in run_ids else (run_ids[0] if len(run_ids) == 1 else None)
    if run_id is None:
        raise ReportError(f"cannot tell which run of {ledger_path} to report on ({len(run_ids)} runs found)")
    releases = ledger.releases(run_id)
    secagg = None
    if "secagg_num_neighbours" in config:
        secagg = {
            "num_shares": config.get("secagg_num_neighbours"),
            "reconstruction_threshold": config.get("secagg_threshold"),
            "max_dropout_fraction": config.get("max_dropout_fraction"),
            "noise": config.get("noise"),
            "dropped_devices_total": sum(ev.cohort_size - ev.survivors for ev in releases),
        }
    budget = run_budget(config)
    report = build_report(
        ledger,
        run_id,
        secagg=secagg,
        delta=float(config.get("delta") or 1e-5),
        egress_allow_list=egress_allow_list if egress_allow_list is not None else default_allow_list(),
        budget=budget,
        model=model,
    )
    return write_report(report, out_dir if out_dir is not None else run_dir, ledger=ledger, on_step=on_step)


# --- reading either schema ---------------------------------------------------------------------
def headline_epsilons(report: dict) -> tuple[Any, Any]:
    """(epsilon against the server - the headline -, epsilon for third parties who see only
    the model) of a report of either schema. A schema-1 report headlined the amplified value;
    its value against the server is its ``epsilon_no_amplification``."""
    if report.get("report_schema_version") == 1:
        against = report.get("epsilon_no_amplification")
        return against, report.get("epsilon") if report.get("amplification_claimed") else against
    return report.get("epsilon"), report.get("epsilon_amplified")


def headline_lines(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows that lead every rendering of a report: the headline against the
    server, then the amplified value, labelled."""
    against, amplified = headline_epsilons(report)
    rows = [(HEADLINE_LABEL, f"{_fmt(against)} at delta = {_fmt(report.get('delta'))}"),
            (AMPLIFIED_LABEL.split(":")[0], _fmt(amplified))]
    if report.get("report_schema_version") == 1:
        rows.append(("report schema 1", "its 'epsilon' field headlined the amplified value"
                     if report.get("amplification_claimed") else "no amplification was claimed"))
    return rows


# --- HTML ------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _svg_curve(curve: list[dict], budget_eps: float | None) -> str:
    """Inline SVG: epsilon (PLD) and its RDP bound over rounds, with the budget line."""
    if not curve:
        return "<p>No release: no curve.</p>"
    w, h, pad = 640, 300, 48
    xs = [p["round"] for p in curve]
    series = {
        "epsilon (PLD)": [p["epsilon"] for p in curve],
        "RDP bound": [p["epsilon_rdp_bound"] for p in curve],
    }
    ys = [v for vals in series.values() for v in vals if v is not None]
    if budget_eps:
        ys.append(budget_eps)
    x0, x1 = min(xs + [0]), max(xs) or 1
    y1 = max(ys) * 1.08 or 1.0

    def px(x: float) -> float:
        return pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad)

    def py(y: float) -> float:
        return h - pad - y / y1 * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="epsilon spent over rounds">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
        f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle" font-size="12">round</text>',
        f'<text x="14" y="{h / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {h / 2})">epsilon</text>',
    ]
    for k in range(5):
        yv = y1 * k / 4
        parts.append(f'<text x="{pad - 6}" y="{py(yv) + 4:.1f}" text-anchor="end" font-size="10">{yv:.3g}</text>')
    parts.append(f'<text x="{px(x1):.1f}" y="{h - pad + 14}" text-anchor="end" font-size="10">{x1}</text>')
    colours = {"epsilon (PLD)": "#1f5fbf", "RDP bound": "#b36b00"}
    for i, (name, vals) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, vals) if y is not None)
        if pts:
            dash = ' stroke-dasharray="5,4"' if name != "epsilon (PLD)" else ""
            parts.append(f'<polyline fill="none" stroke="{colours[name]}" stroke-width="2"{dash} points="{pts}"/>')
            parts.append(f'<text x="{w - pad - 8}" y="{h - pad - 34 + 14 * i}" text-anchor="end" font-size="11" fill="{colours[name]}">{name}</text>')
    if budget_eps:
        parts.append(
            f'<line x1="{pad}" y1="{py(budget_eps):.1f}" x2="{w - pad}" y2="{py(budget_eps):.1f}" stroke="#b00" stroke-dasharray="2,3"/>'
            f'<text x="{w - pad}" y="{py(budget_eps) - 4:.1f}" text-anchor="end" font-size="11" fill="#b00">budget {budget_eps:.3g}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _model_html(model: dict | None) -> str:
    """The released model: what it is, how it was released, whether it reached the devices."""
    if not model:
        return ""
    e = html.escape
    rows = "".join(f"<tr><th>{e(str(k).replace('_', ' '))}</th><td>{e(_fmt(v) if not isinstance(v, dict) else json.dumps(v, sort_keys=True))}</td></tr>"
                   for k, v in model.items())
    return f"<h2>The released model</h2><table id=\"released-model\">{rows}</table>"


def render_html(report: dict, *, notice: str | None = None) -> str:
    """The report as a self-contained page. ``notice``: a line shown under the title (e.g.
    that the page was rebuilt by an auditor)."""
    e = html.escape
    acc = report.get("accounting") or {}
    led = report.get("ledger") or {}
    budget = report.get("budget") or {}
    rows = "".join(
        "<tr>" + "".join(f"<td>{e(_fmt(r.get(k)))}</td>" for k in (
            "round", "attempt", "sampling", "sampling_rate", "cohort_size", "planned_clients", "survivors",
            "noise_multiplier", "noise_std_total", "clip_norm", "ledger_seq")) + "</tr>"
        for r in report.get("releases", [])
    )
    leaves = report["information_leakage"]["leaves_device"]
    leaves_html = (
        f"<p>{e(leaves)}</p>" if isinstance(leaves, str)
        else f"<pre>{e(json.dumps(leaves, indent=2, sort_keys=True))}</pre>"
    )
    secagg = report.get("secure_aggregation")
    secagg_html = (
        "<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>" for k, v in sorted(secagg.items())) + "</table>"
        if secagg else "<p>No secure-aggregation parameters were recorded for this report.</p>"
    )
    notes = "".join(f"<li>{e(n)}</li>" for n in acc.get("notes", []))
    error = f"<p class=warn>Accounting refused: {e(acc['error'])}</p>" if acc.get("error") else ""
    not_applied = "".join(
        f"<li>round {e(str(r.get('round')))} attempt {e(str(r.get('attempt')))} (release at ledger seq "
        f"{e(str(r.get('release_seq')))}): {e(str(r.get('reason')))}</li>"
        for r in report.get("spent_not_applied") or []
    )
    if not_applied:
        not_applied = ("<h2>Spent, not applied</h2><p>Accounted before the aggregate existed (counted in "
                       f"&epsilon;); no model was built from them.</p><ul>{not_applied}</ul>\n")
    refusals = "".join(
        f"<li>round {e(str(r['round']))}: {e(r['scope'])} budget {e(_fmt(r['budget_epsilon']))}, "
        f"projected {e(_fmt(r['projected_epsilon']))} (spent {e(_fmt(r['spent_epsilon']))})</li>"
        for r in report.get("refusals", [])
    )
    against, amplified = headline_epsilons(report)
    summary = [
        *headline_lines(report),
        ("epsilon (PLD), RDP upper bound", _fmt(report.get("epsilon_rdp_bound"))),
        ("delta", _fmt(report.get("delta"))),
        ("amplification by sampling claimed in the headline", "yes" if report.get("amplification_claimed") else "no"),
        ("privacy unit", report.get("privacy_unit")),
        ("adjacency", f"{report.get('adjacency')}: {report.get('adjacency_description')}"),
        ("mechanism", "Gaussian noise on the sum of clipped updates"),
        ("clip norm(s)", ", ".join(_fmt(c) for c in report["mechanism"]["clip_norms"]) or "n/a"),
        ("noise multipliers released (effective)", ", ".join(_fmt(c) for c in report["mechanism"]["noise_multipliers"][:12]) or "n/a"),
        ("effective noise multiplier (min..max)", f"{_fmt(report['mechanism']['effective_noise_multipliers']['min'])} .. {_fmt(report['mechanism']['effective_noise_multipliers']['max'])}"),
        ("sampling", ", ".join(report["sampling"]["methods"]) + " at rate(s) " + ", ".join(_fmt(r) for r in report["sampling"]["rates"])),
        ("releases", str(len(report.get("releases", [])))),
        ("budget", _budget_words(budget)),
        ("accountant", f"{acc.get('accountant', 'dp_accounting')} ({acc.get('accountant_version', 'n/a')})"),
        ("PLD parameters", json.dumps(acc.get("pld_parameters", {}), sort_keys=True)),
    ]
    summary_html = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in summary)
    notice_html = f'<p class="warn" id="notice">{e(notice)}</p>\n' if notice else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy report: {e(report['run_id'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111;line-height:1.45}}
table{{border-collapse:collapse;margin:1rem 0}}th,td{{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}}
th{{background:#f3f3f3}}code,pre{{background:#f6f6f6;padding:.2rem;overflow-x:auto}}.warn{{color:#a00;font-weight:bold}}
.big{{font-size:1.6rem}}
</style></head><body>
<h1>Privacy report for run <code>{e(report['run_id'])}</code></h1>
{notice_html}<p class="big">&epsilon; = <strong id="epsilon">{e(_fmt(against))}</strong> at &delta; = {e(_fmt(report.get('delta')))}
<span class="label">against the server, which draws each cohort (no amplification by sampling claimed)</span></p>
<p id="epsilon-amplified-line">{e(AMPLIFIED_LABEL.split(':')[0])}: <strong id="epsilon-amplified">{e(_fmt(amplified))}</strong>
(valid only for someone who does not know who took part in each round)</p>
{error}
<p>Generated {e(report['generated_at'])}. Report schema {e(str(report['report_schema_version']))}.</p>
<h2>Summary</h2><table>{summary_html}</table>
<ul>{notes}</ul>
<h2>&epsilon; over rounds</h2>{_svg_curve(report.get('epsilon_curve', []), budget.get('epsilon'))}
<h2>Secure aggregation (SecAgg+)</h2>{secagg_html}
<h2>Threat model</h2><ul>{''.join(f'<li>{e(t)}</li>' for t in report['threat_model'])}</ul>
<h2>Information leakage</h2>
<h3>What leaves a device</h3>{leaves_html}
<h3>What the server can learn</h3><ul>{''.join(f'<li>{e(t)}</li>' for t in report['information_leakage']['server_learns'])}</ul>
<h2>Budget refusals</h2>{f'<ul>{refusals}</ul>' if refusals else '<p>None.</p>'}
{_model_html(report.get('model'))}
<h2>Releases (from the ledger)</h2>
<table><tr><th>round</th><th>attempt</th><th>sampling</th><th>rate</th><th>cohort</th><th>planned</th><th>survivors</th>
<th>noise multiplier (effective)</th><th>noise std</th><th>clip</th><th>ledger seq</th></tr>{rows}</table>
{not_applied}<h2>Ledger</h2>
<table>
<tr><th>file</th><td>{e(str(led.get('file')))}</td></tr>
<tr><th>entries at report time</th><td>{e(str(led.get('entries')))}</td></tr>
<tr><th>head seq</th><td>{e(str(led.get('head_seq')))}</td></tr>
<tr><th>head hash</th><td><code>{e(str(led.get('head_hash')))}</code></td></tr>
<tr><th>head signature (Ed25519)</th><td><code>{e(str(led.get('head_signature')))}</code></td></tr>
<tr><th>public key fingerprint</th><td><code>{e(str(led.get('public_key_fingerprint')))}</code></td></tr>
</table>
<p>Verify independently: <code>restwise audit verify report.json --public-key SERVER_KEY.pem</code>
(checks every signature and the hash chain, recomputes &epsilon; from the ledger alone, and checks
that this report and page are the ones recorded in the ledger).</p>
</body></html>
"""


def _budget_words(budget: dict) -> str:
    if not budget:
        return "none given"
    words = f"epsilon {_fmt(budget.get('epsilon'))}, delta {_fmt(budget.get('delta'))}"
    if budget.get("max_epsilon") is not None:
        words += (f" (target {_fmt(budget.get('target_epsilon'))}; cap in force {_fmt(budget.get('max_epsilon'))}"
                  + (f", RAISED above the default {_fmt(budget.get('default_max_epsilon'))}" if budget.get("cap_raised") else
                     ", the default") + ")")
    return words


# --- text ------------------------------------------------------------------------------------
def render_text(report: dict, *, notice: str | None = None) -> str:
    """The report as plain text for a terminal or a mail: the same numbers as the page."""
    acc = report.get("accounting") or {}
    led = report.get("ledger") or {}
    budget = report.get("budget") or {}
    mech = report.get("mechanism") or {}
    samp = report.get("sampling") or {}
    releases = report.get("releases") or []
    lines = [f"Privacy report for run {report.get('run_id')}"]
    if notice:
        lines.append(f"NOTE: {notice}")
    lines.append("")
    lines += [f"  {label}: {value}" for label, value in headline_lines(report)]
    lines += [
        f"  delta                                            {_fmt(report.get('delta'))}",
        f"  epsilon (PLD), RDP upper bound                   {_fmt(report.get('epsilon_rdp_bound'))}",
        f"  amplification claimed in the headline            {'yes' if report.get('amplification_claimed') else 'no'}",
        f"  adjacency                                        {report.get('adjacency')}",
        f"  clip norm(s)                                     {', '.join(_fmt(c) for c in mech.get('clip_norms', [])) or 'n/a'}",
        f"  sampling                                         {', '.join(samp.get('methods', [])) or 'n/a'}"
        + (f" at rate(s) {', '.join(_fmt(r) for r in samp.get('rates', []))}" if samp.get("rates") else ""),
        f"  releases                                         {len(releases)}",
        "  budget                                           " + _budget_words(budget),
        f"  accountant                                       {acc.get('accountant', 'dp_accounting')} ({acc.get('accountant_version', 'n/a')})",
    ]
    if acc.get("error"):
        lines.append(f"  ACCOUNTING REFUSED: {acc['error']}")
    lines.append(f"  privacy unit: {report.get('privacy_unit')}")
    for note in acc.get("notes", []):
        lines.append(f"  note: {note}")
    lines += ["", "Releases (from the ledger)"]
    if releases:
        head = ("round", "attempt", "sampling", "rate", "cohort", "survivors", "noise mult.", "noise std", "clip", "seq")
        keys = ("round", "attempt", "sampling", "sampling_rate", "cohort_size", "survivors", "noise_multiplier",
                "noise_std_total", "clip_norm", "ledger_seq")
        rows = [head] + [tuple(_fmt(r.get(k)) for k in keys) for r in releases]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    else:
        lines.append("  none: nothing about any person was released")
    not_applied = report.get("spent_not_applied") or []
    if not_applied:
        lines += ["", "Spent, not applied (counted in epsilon; no model was built from them)"]
        lines += [f"  round {r.get('round')} attempt {r.get('attempt')} (release at ledger seq {r.get('release_seq')}): "
                  f"{r.get('reason')}" for r in not_applied]
    refusals = report.get("refusals") or []
    lines += ["", "Budget refusals"] + (
        [f"  round {r.get('round')}: {r.get('scope')} budget {_fmt(r.get('budget_epsilon'))}, projected "
         f"{_fmt(r.get('projected_epsilon'))} (spent {_fmt(r.get('spent_epsilon'))})" for r in refusals] or ["  none"]
    )
    secagg = report.get("secure_aggregation")
    lines += ["", "Secure aggregation (SecAgg+)"] + (
        [f"  {k}: {_fmt(v)}" for k, v in sorted(secagg.items())] if secagg else ["  no parameters recorded"]
    )
    lines += ["", "Threat model"] + [f"  - {t}" for t in report.get("threat_model", [])]
    leak = report.get("information_leakage") or {}
    leaves = leak.get("leaves_device")
    lines += ["", "What leaves a device"] + (
        [f"  {leaves}"] if isinstance(leaves, str) else ["  " + l for l in json.dumps(leaves, indent=2, sort_keys=True).splitlines()]
    )
    lines += ["", "What the server can learn"] + [f"  - {t}" for t in leak.get("server_learns", [])]
    lines += [
        "", "Ledger",
        f"  entries at report time {led.get('entries')}, head seq {led.get('head_seq')}, signed: {'yes' if led.get('signed') else 'no'}",
        f"  head hash {led.get('head_hash')}",
        f"  public key fingerprint {led.get('public_key_fingerprint')}",
        "",
        "Verify independently: restwise audit verify report.json --public-key SERVER_KEY.pem",
    ]
    return "\n".join(lines) + "\n"
