"""Independent verification of a privacy report, from its files alone.

:func:`verify_report` checks, and lists every problem it finds:

1. the ledger: canonical format, hash chain, and every Ed25519 signature against the public
   key. Fails closed: the key must be pinned (the server's published key, given by the
   auditor). The ``public_key.pem`` shipped beside the report is used only when the caller
   asks for it (``trust_shipped_key=True``, ``--trust-shipped-key``): it proves only that the
   folder is self-consistent (anyone can sign a forged ledger with a fresh key and ship that
   key), so it is flagged with its fingerprint, to be compared with the published one;
2. that the ledger holds a ``report_issued`` entry with the SHA-256 of this exact
   report.json (and of report.html when present): any changed byte is detected; and that no
   entry follows it (a release appended after the report was issued, even correctly signed,
   is a release the report does not describe: each such entry is named);
3. that the report's recorded ledger head (seq, hash, signature) is in the ledger;
4. that every number of the report is what the accountant computes again from the ledger's
   release events alone: epsilon, its RDP bound, the amplified epsilon beside it, each release
   row, the epsilon curve (relative tolerance 1e-9), and the releases that were spent but not
   applied (``release.not-applied``: counted in epsilon, no model built);
5. with ``receipts`` (a folder of devices' receipt files, ``--receipts``): that every entry the
   devices received for this run is in the ledger, byte for byte, under the pinned key
   (privacy/receipts.py). A ledger rewritten and re-signed with the real key fails here.

It reads report schema 2 (the headline epsilon claims no amplification by sampling: it holds
against the server, which draws each cohort; ``epsilon_amplified`` beside it) and schema 1
(the headline was amplified wherever a round sampled): a schema-1 report is recomputed as it
was issued, and the result says which schema was read and what the epsilon against the server
is (``epsilon_against_server``), with a warning that its headline claimed amplification.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restwise.privacy.errors import KeyFileError, LedgerCorruptError, LedgerError, PrivacyError, VerificationError
from restwise.privacy.events import GaussianRoundEvent, ReportIssuedEvent
from restwise.privacy.ledger import key_fingerprint, load_public_key, verify_ledger_file
from restwise.privacy.receipts import compare_with_ledger
from restwise.privacy.report import (
    HTML_FILE,
    LEDGER_FILE,
    PUBLIC_KEY_FILE,
    READABLE_SCHEMA_VERSIONS,
    REPORT_FILE,
    accountant_from,
    headline_epsilons,
    release_row,
    run_accounting,
    run_accounting_v1,
    spent_not_applied,
)

# The numbers recomputed and compared, per report schema.
COMPARED = {1: ("epsilon", "epsilon_rdp_bound", "epsilon_no_amplification"),
            2: ("epsilon", "epsilon_rdp_bound", "epsilon_amplified")}

REL_TOLERANCE = 1e-9


@dataclass
class VerificationResult:
    ok: bool
    run_id: str | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    epsilon_reported: float | None = None
    epsilon_recomputed: float | None = None
    delta: float | None = None
    ledger_entries: int = 0
    releases: int = 0
    key_pinned: bool = False
    key_fingerprint: str | None = None
    key_source: str | None = None  # "pinned", "shipped" (trusted on request) or None (no key)
    spent_not_applied: list[dict] = field(default_factory=list)
    report_schema_version: int | None = None
    # Recomputed from the ledger, whatever the schema: the headline (against the server, which
    # drew each cohort) and the value for third parties who see only the model.
    epsilon_against_server: float | None = None
    epsilon_amplified: float | None = None
    receipt_files: int | None = None  # receipt files checked (None: no --receipts)

    def raise_for_problems(self) -> "VerificationResult":
        if not self.ok:
            raise VerificationError(self.problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_MEMO: dict[str, tuple[dict, list]] = {}


def _recompute(releases, delta: float, accountant, schema: int) -> tuple[dict, list]:
    """run_accounting, memoised on its exact inputs (verifying many copies of one report,
    e.g. in tests or for a batch of auditors, recomputes once)."""
    key = hashlib.sha256(
        json.dumps(
            [[ev.to_dict() for ev in releases], delta, accountant.claim_amplification, accountant.pld.__dict__, schema],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    if key not in _MEMO:
        if len(_MEMO) > 32:
            _MEMO.clear()
        _MEMO[key] = (run_accounting_v1 if schema == 1 else run_accounting)(releases, delta, accountant)
    accounting, curve = _MEMO[key]
    return json.loads(json.dumps(accounting)), json.loads(json.dumps(curve))


def _describe(entry) -> str:
    """A ledger entry in a few words, for a problem line (no values beyond what it accounts)."""
    payload = entry.payload if isinstance(entry.payload, dict) else {}
    words = [entry.kind]
    if payload.get("run_id") is not None:
        words.append(f"run {payload.get('run_id')}")
    if payload.get("round") is not None:
        words.append(f"round {payload.get('round')}")
    if entry.kind == "audit" and payload.get("action"):
        words.append(f"action {payload.get('action')}")
    return ", ".join(str(w) for w in words)


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isinf(a) or math.isinf(b):
            return a == b
        return abs(a - b) <= REL_TOLERANCE * max(1.0, abs(a), abs(b))
    return a == b


def verify_report(
    report_path: str | os.PathLike,
    ledger_path: str | os.PathLike | None = None,
    public_key: Any = None,
    *,
    trust_shipped_key: bool = False,
    receipts: str | os.PathLike | None = None,
) -> VerificationResult:
    """Verify a report; see :func:`_verify`. A report whose structure is not what this
    verifier reads fails verification (never an exception). ``receipts``: a folder of
    devices' receipt files to check the ledger against (module docstring, 5)."""
    try:
        res = _verify(report_path, ledger_path, public_key, trust_shipped_key)
        if receipts is not None:
            _check_receipts(res, Path(receipts), report_path, ledger_path, public_key, trust_shipped_key)
        return res
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as exc:
        res = VerificationResult(ok=False, run_id=None)
        res.problems.append(f"the report's structure is not valid ({type(exc).__name__}); it was altered or is not a Restwise report")
        return res


def _check_receipts(res: VerificationResult, folder: Path, report_path, ledger_path, public_key,
                    trust_shipped_key: bool) -> None:
    """Compare the devices' receipt files with the ledger (failures join ``res.problems``)."""
    report_folder = Path(report_path) if Path(report_path).is_dir() else Path(report_path).parent
    ledger_file = Path(ledger_path) if ledger_path is not None else report_folder / LEDGER_FILE
    try:
        if public_key is None:
            key = load_public_key(report_folder / PUBLIC_KEY_FILE) if trust_shipped_key else None
        elif isinstance(public_key, (str, os.PathLike, bytes)):
            key = load_public_key(public_key)
        else:
            key = public_key
        entries = verify_ledger_file(ledger_file, key)[0] if key is not None else []
    except (KeyFileError, LedgerError):
        entries, key = [], None
    if key is None or res.run_id is None:
        res.problems.append("receipts: no ledger verified under a key to compare the receipts with")
    elif not folder.is_dir():
        res.problems.append(f"receipts: {folder} is not a folder")
    else:
        problems, res.receipt_files = compare_with_ledger(folder, res.run_id, key, entries)
        res.problems.extend(f"receipts: {p}" for p in problems)
    res.ok = not res.problems


def _verify(
    report_path: str | os.PathLike,
    ledger_path: str | os.PathLike | None = None,
    public_key: Any = None,
    trust_shipped_key: bool = False,
) -> VerificationResult:
    """Verify a report (path to report.json or its folder). ``public_key``: an Ed25519 public
    key object, PEM bytes, or a PEM file path (pinned). Without it verification fails unless
    ``trust_shipped_key``, which checks against the folder's own public_key.pem and warns with
    its fingerprint. Never raises for a failed check: read
    ``result.ok`` / ``result.problems``, or call ``result.raise_for_problems()``."""
    path = Path(report_path)
    if path.is_dir():
        path = path / REPORT_FILE
    folder = path.parent
    res = VerificationResult(ok=False, run_id=None)

    # -- the report file ------------------------------------------------------------------
    try:
        data = path.read_bytes()
    except OSError as exc:
        res.problems.append(f"cannot read the report {path}: {exc.strerror}")
        return res
    try:
        report = json.loads(data.decode("utf-8"))
        if not isinstance(report, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        report = None
        res.problems.append(f"{path.name} is not a JSON object (damaged or altered)")
    if report is not None:
        res.run_id = report.get("run_id") if isinstance(report.get("run_id"), str) else None
        version = report.get("report_schema_version")
        if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
            res.problems.append(
                f"report_schema_version is {version!r}; this verifier reads "
                f"{' and '.join(str(v) for v in READABLE_SCHEMA_VERSIONS)}"
            )
        else:
            res.report_schema_version = version

    # -- the key: pinned, or the shipped one only when asked for (fail closed) -------------
    key = None
    try:
        if public_key is None:
            shipped = folder / PUBLIC_KEY_FILE
            if not trust_shipped_key:
                res.problems.append(
                    "no pinned public key: pass --public-key with the server's published audit key "
                    "(a ledger signed with any fresh key verifies against a key shipped beside it); "
                    "--trust-shipped-key checks only that the folder is self-consistent"
                )
            elif shipped.exists():
                key = load_public_key(shipped)
                res.key_source = "shipped"
                res.warnings.append(
                    "signatures were checked against the public key shipped with the report, not a pinned "
                    f"one: this proves only that the folder is self-consistent. Its fingerprint is "
                    f"{key_fingerprint(key)}: compare it with the one the operator published"
                )
            else:
                res.problems.append("--trust-shipped-key, but no public_key.pem is shipped with the report")
        elif isinstance(public_key, (str, os.PathLike, bytes)):
            key = load_public_key(public_key)
            res.key_pinned, res.key_source = True, "pinned"
        else:
            key = public_key
            res.key_pinned, res.key_source = True, "pinned"
    except KeyFileError as exc:
        res.problems.append(str(exc))
    if key is not None:
        res.key_fingerprint = key_fingerprint(key)

    # -- the ledger ---------------------------------------------------------------------------
    ledger_file = Path(ledger_path) if ledger_path is not None else folder / LEDGER_FILE
    entries = []
    try:
        entries, lv = verify_ledger_file(ledger_file, key)
        res.ledger_entries = lv.entries
    except LedgerCorruptError as exc:
        res.problems.append(f"ledger {ledger_file.name}: {exc}")
    except LedgerError as exc:
        res.problems.append(str(exc))
    if report is None or not entries:
        if not entries and not res.problems:
            res.problems.append("the ledger is empty")
        return res

    # -- the report is the one recorded in the ledger --------------------------------------
    digest = hashlib.sha256(data).hexdigest()
    issued = [
        e for e in entries
        if e.kind == ReportIssuedEvent.kind and e.payload.get("report_sha256") == digest
    ]
    if not issued:
        res.problems.append(
            f"{path.name} (sha256 {digest[:16]}...) is not recorded in the ledger: it was altered, or never issued"
        )
    else:
        attest = issued[-1]
        # The report_issued entry closes the report's ledger: anything after it (a release
        # appended and re-signed with the real key, a second report) is not described by
        # this report, so the ledger is not this report's.
        after = [e for e in entries if e.seq > attest.seq]
        for e in after[:10]:
            res.problems.append(
                f"ledger entry seq {e.seq} ({_describe(e)}) comes after the report_issued entry "
                f"(seq {attest.seq}) that anchors this report: nothing may follow it"
            )
        if len(after) > 10:
            res.problems.append(f"... and {len(after) - 10} more entries after the report_issued entry")
        if attest.payload.get("run_id") != res.run_id:
            res.problems.append("the ledger records this report for a different run")
        html_path = folder / HTML_FILE
        if html_path.exists() and attest.payload.get("html_sha256"):
            if hashlib.sha256(html_path.read_bytes()).hexdigest() != attest.payload["html_sha256"]:
                res.problems.append(f"{HTML_FILE} differs from the page recorded in the ledger (altered)")

    head = report.get("ledger") if isinstance(report.get("ledger"), dict) else {}
    head_seq = head.get("head_seq")
    by_seq = {e.seq: e for e in entries}
    at_head = by_seq.get(head_seq) if isinstance(head_seq, int) else None
    if at_head is None:
        res.problems.append(f"the report's ledger head (seq {head_seq!r}) is not in the ledger")
    else:
        if at_head.hash != head.get("head_hash"):
            res.problems.append(f"ledger head hash mismatch at seq {head_seq}: report {head.get('head_hash')!r}, ledger {at_head.hash!r}")
        if at_head.signature != head.get("head_signature"):
            res.problems.append(f"ledger head signature mismatch at seq {head_seq}")
    if issued and isinstance(head_seq, int):
        # The report must cover every release of its run recorded before the report itself
        # was anchored: a report built from an old head (or a truncated copy) and issued
        # after more rounds ran would understate epsilon while every signature checks out.
        attest_seq = issued[-1].seq
        left_out = [
            e for e in entries
            if e.kind == GaussianRoundEvent.kind and head_seq < e.seq < attest_seq
            and e.payload.get("run_id") == res.run_id
        ]
        if left_out:
            rounds = ", ".join(str(e.payload.get("round")) for e in left_out[:10])
            res.problems.append(
                f"{len(left_out)} release(s) of this run recorded before the report was issued are not "
                f"covered by it (its ledger head is seq {head_seq}; round {rounds}): the report is stale "
                "or understates epsilon"
            )
    if key is not None and head.get("public_key_fingerprint") not in (None, res.key_fingerprint):
        res.problems.append(
            f"the report names public key {head.get('public_key_fingerprint')}, but the ledger was checked with {res.key_fingerprint}"
        )

    # -- recompute every number from the ledger's events alone ------------------------------
    limit = head_seq if isinstance(head_seq, int) else max(by_seq)
    releases = [
        (e.seq, e.event) for e in entries
        if e.kind == GaussianRoundEvent.kind and e.seq <= limit and e.payload.get("run_id") == res.run_id
    ]
    res.releases = len(releases)
    delta = report.get("delta")
    res.delta = delta
    res.epsilon_reported = report.get("epsilon")
    schema = res.report_schema_version
    if schema == 2 and report.get("amplification_claimed") is not False:
        res.problems.append("a schema-2 report must claim no amplification in its headline (amplification_claimed false)")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        res.problems.append(f"the report's delta {delta!r} is not in (0, 1)")
    elif schema is not None:
        try:
            # Schema 1 said whether its headline claimed amplification; schema 2 never does.
            claimed = bool(report.get("amplification_claimed", True)) if schema == 1 else False
            accountant = accountant_from(report.get("accounting"), claimed)
        except (PrivacyError, TypeError) as exc:
            res.problems.append(f"the report's accounting parameters are not acceptable: {exc}")
        else:
            accounting, curve = _recompute([ev for _, ev in releases], float(delta), accountant, schema)
            res.epsilon_recomputed = accounting.get("epsilon")
            res.epsilon_against_server, res.epsilon_amplified = headline_epsilons(
                {"report_schema_version": schema, "amplification_claimed": claimed, **accounting})
            if schema == 1 and claimed and res.epsilon_recomputed != res.epsilon_against_server:
                res.warnings.append(
                    f"this is a schema-1 report: its headline epsilon {res.epsilon_recomputed!r} claims amplification "
                    f"by sampling, which does not hold against the server that drew each cohort; against the server "
                    f"epsilon is {res.epsilon_against_server!r} (its epsilon_no_amplification)"
                )
            for name in COMPARED[schema]:
                if not _close(report.get(name), accounting.get(name)):
                    res.problems.append(
                        f"{name}: the report says {report.get(name)!r}, the ledger's events give {accounting.get(name)!r}"
                    )
            reported_acc = report.get("accounting") or {}
            for name in ("accountant_version", "releases", "adjacency", "error"):
                if name in accounting or name in reported_acc:
                    if reported_acc.get(name) != accounting.get(name):
                        if name == "accountant_version":
                            res.warnings.append(
                                f"the report was computed with {reported_acc.get(name)}, this verifier uses {accounting.get(name)}"
                            )
                        else:
                            res.problems.append(f"accounting.{name}: report {reported_acc.get(name)!r}, recomputed {accounting.get(name)!r}")
            if len(curve) != len(report.get("epsilon_curve") or []) or not all(
                all(_close(a.get(k), b.get(k)) for k in set(a) | set(b))
                for a, b in zip(curve, report.get("epsilon_curve") or [])
            ):
                res.problems.append("epsilon_curve does not match the curve recomputed from the ledger")
    res.spent_not_applied = spent_not_applied(entries, res.run_id, limit)
    if (report.get("spent_not_applied") or []) != res.spent_not_applied:
        res.problems.append("spent_not_applied: the report's list differs from the ledger's release.not-applied entries")
    rows = [release_row(seq, ev) for seq, ev in releases]
    reported_rows = report.get("releases") or []
    if len(rows) != len(reported_rows):
        res.problems.append(f"the report lists {len(reported_rows)} releases, the ledger holds {len(rows)} for this run")
    else:
        for mine, theirs in zip(rows, reported_rows):
            diff = sorted(k for k in set(mine) | set(theirs) if not _close(mine.get(k), theirs.get(k)))
            if diff:
                res.problems.append(f"release at ledger seq {mine['ledger_seq']}: {', '.join(diff)} differ from the ledger")
    if res.releases and report.get("epsilon") is None:
        # Faithful to the ledger, but it bounds nothing: say so rather than a bare "ok".
        res.warnings.append(
            "the report states no epsilon for its releases (the accountant refused them): "
            "this run's privacy loss is not bounded by this report"
        )
    res.ok = not res.problems
    return res
