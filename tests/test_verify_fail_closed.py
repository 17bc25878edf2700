"""`restwise audit verify` fails closed (issue 15, item 4), with real keys and real ledgers:

* no pinned key and no --trust-shipped-key: exit 8;
* a ledger forged with a fresh key (noise raised, report reissued) is refused without
  --trust-shipped-key, and with it is accepted only when the shipped key is the forger's own,
  and then with a warning whose fingerprint is not the operator's published one;
* an entry appended after report_issued, signed with the real key, fails and is named;
* `restwise audit fingerprint KEY` prints sha256 of the raw key bytes.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from restwise.cli import app
from restwise.privacy.events import GaussianRoundEvent
from restwise.privacy.ledger import PrivacyLedger, export_public_key, generate_audit_key, key_fingerprint
from restwise.privacy.report import build_report, write_report

runner = CliRunner()
DELTA = 1e-5
RUN = "run-trust"


def run(*args):
    return runner.invoke(app, list(args))


def _release(r: int, noise: float) -> GaussianRoundEvent:
    return GaussianRoundEvent.from_distributed_noise(
        run_id=RUN, round=r, clip_norm=1.0, planned_noise_multiplier=noise, planned_clients=6, survivors=6,
        sampling="poisson", sampling_rate=0.3, cohort_size=6, population=20, adjacency="add_remove",
        model_hash="%064x" % r,
    )


def _issue(folder, key, noise: float, rounds: int = 3):
    """A real run ledger signed by ``key`` and its report written to ``folder/out``."""
    ledger = PrivacyLedger(folder / "ledger.jsonl", key)
    for r in range(1, rounds + 1):
        ledger.append(_release(r, noise))
    report = build_report(ledger, RUN, delta=DELTA)
    write_report(report, folder / "out", ledger=ledger)
    return report


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    """The operator's audit key, its published public half, and a genuine report."""
    root = tmp_path_factory.mktemp("operator")
    key = generate_audit_key(root / "audit-key.pem")
    published = export_public_key(key, root / "published.pub.pem")
    report = _issue(root, key, noise=1.0)
    return {"key": key, "published": published, "out": root / "out", "report": report}


def _copy(src, dest):
    shutil.copytree(src, dest)
    return dest


def test_without_a_pinned_key_verify_exits_8(operator):
    r = run("audit", "verify", str(operator["out"]))
    assert r.exit_code == 8
    assert "no pinned public key" in r.output and "--public-key" in r.output
    assert run("audit", "verify", str(operator["out"]), "--public-key", str(operator["published"])).exit_code == 0
    both = run("audit", "verify", str(operator["out"]), "--public-key", str(operator["published"]), "--trust-shipped-key")
    assert both.exit_code == 2


def test_trusting_the_shipped_key_warns_with_its_fingerprint(operator):
    r = run("audit", "verify", str(operator["out"]), "--trust-shipped-key")
    assert r.exit_code == 0, r.output
    fingerprint = key_fingerprint(operator["key"])
    assert "warning" in r.stderr and fingerprint in r.stderr and "not pinned" in r.stdout


def test_a_ledger_forged_with_a_fresh_key_is_refused(operator, tmp_path):
    """The attack of the issue: noise raised x4.3 in every release, re-signed with a fresh key,
    report reissued; the forger ships either the operator's public key or their own."""
    forger = generate_audit_key(tmp_path / "forger.pem")
    forged = _issue(tmp_path, forger, noise=4.3)
    assert forged["epsilon"] < operator["report"]["epsilon"] / 2  # the forgery claims much less
    out = tmp_path / "out"
    shipped_forger = run("audit", "verify", str(out))
    assert shipped_forger.exit_code == 8 and "no pinned public key" in shipped_forger.output
    pinned = run("audit", "verify", str(out), "--public-key", str(operator["published"]))
    assert pinned.exit_code == 8 and "signature" in pinned.output

    # The forger ships the operator's real public key: the signatures do not match it.
    real_shipped = _copy(out, tmp_path / "real-shipped")
    shutil.copy(operator["published"], real_shipped / "public_key.pem")
    r = run("audit", "verify", str(real_shipped), "--trust-shipped-key")
    assert r.exit_code == 8 and "signature" in r.output

    # The forger ships their own key: self-consistent, so --trust-shipped-key accepts it, but
    # only with a warning naming a fingerprint that is not the operator's published one.
    r = run("audit", "verify", str(out), "--trust-shipped-key")
    assert r.exit_code == 0
    published = run("audit", "fingerprint", str(operator["published"])).stdout.splitlines()[0]
    assert key_fingerprint(forger) in r.stderr and published not in r.stderr + r.stdout


def test_an_entry_after_report_issued_fails_verify_and_is_named(operator, tmp_path):
    folder = _copy(operator["out"], tmp_path / "bundle")
    # A release appended after the report, chained and signed with the operator's real key.
    extra = PrivacyLedger(folder / "ledger.jsonl", operator["key"]).append(_release(4, 1.0))
    r = run("audit", "verify", str(folder), "--public-key", str(operator["published"]))
    assert r.exit_code == 8
    assert f"ledger entry seq {extra.seq} (gaussian_round, run {RUN}, round 4)" in r.output
    assert "after the report_issued entry" in r.output


def test_fingerprint_is_sha256_of_the_raw_public_key(operator, tmp_path):
    raw = operator["key"].public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashlib.sha256(raw).hexdigest()
    r = run("audit", "fingerprint", str(operator["published"]))
    assert r.exit_code == 0
    first, grouped = r.stdout.splitlines()
    assert first == "sha256:" + digest == operator["report"]["ledger"]["public_key_fingerprint"]
    assert grouped.split() == [digest[i:i + 4] for i in range(0, 64, 4)]
    (tmp_path / "junk.pem").write_text("not a key\n")
    bad = run("audit", "fingerprint", str(tmp_path / "junk.pem"))
    assert bad.exit_code == 2 and "not a PEM public key" in bad.output
