"""`restwise privacy ...` and `restwise audit ...` through the real root CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from restwise.cli import app
from restwise.privacy.events import GaussianRoundEvent
from restwise.privacy.ledger import PrivacyLedger, export_public_key, generate_audit_key

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def one_json_line(result):
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_epsilon_known_values_json():
    r = run("privacy", "epsilon", "--noise-multiplier", "1", "--rounds", "1", "--sampling", "full", "--json")
    assert r.exit_code == 0, r.output
    assert one_json_line(r)["epsilon"] == pytest.approx(4.377, abs=1e-3)
    r = run("privacy", "epsilon", "-z", "1", "--rounds", "1", "--sampling", "full", "--adjacency", "replace-one", "--json")
    out = one_json_line(r)
    assert out["epsilon"] == pytest.approx(9.997, abs=1e-3) and out["epsilon_rdp_bound"] >= out["epsilon"]


def test_epsilon_human_output_poisson_cohort_over_population():
    r = run("privacy", "epsilon", "-z", "1.2", "--rounds", "50", "--cohort", "10", "--population", "100")
    assert r.exit_code == 0, r.output
    assert "epsilon = " in r.stdout and "against the server" in r.stdout and "dp-accounting" in r.stdout
    assert "for third parties who see only the model (amplified by sampling)" in r.stdout


def test_calibrate_round_trip_json():
    r = run("privacy", "calibrate", "--target-epsilon", "2", "--rounds", "30", "--rate", "0.1", "--json")
    assert r.exit_code == 0, r.output
    out = one_json_line(r)
    z = out["noise_multiplier"]
    back = one_json_line(run("privacy", "epsilon", "-z", repr(z), "--rounds", "30", "--rate", "0.1", "--json"))
    assert back["epsilon"] <= 2.0 and back["epsilon"] == pytest.approx(2.0, rel=5e-3)


def test_refusals_and_usage_errors():
    r = run("privacy", "epsilon", "-z", "0.3", "--rounds", "2", "--sampling", "full", "--json")
    assert r.exit_code == 1 and one_json_line(r)["error_type"] == "NoiseTooSmallError"
    r = run("privacy", "epsilon", "-z", "1", "--rounds", "2", "--sampling", "fixed", "--cohort", "5", "--population", "50",
            "--adjacency", "add-remove", "--json")
    # Against the server (no amplification) K of N under add/remove is a known cohort's
    # Gaussian; only the amplified value is undefined there.
    assert r.exit_code == 0 and one_json_line(r)["epsilon_amplified"] is None
    r = run("privacy", "epsilon", "-z", "1", "--rounds", "2", "--sampling", "fixed", "--cohort", "5", "--population", "50",
            "--adjacency", "replace-one", "--json")
    assert r.exit_code == 0 and one_json_line(r)["amplification_claimed"] is False
    assert one_json_line(r)["epsilon_amplified"] < one_json_line(r)["epsilon"] == one_json_line(r)["epsilon_no_amplification"]
    r = run("privacy", "epsilon", "-z", "1", "--rounds", "2", "--sampling", "fixed", "--cohort", "5", "--population", "50",
            "--adjacency", "replace-one", "--no-amplification", "--json")  # accepted from old scripts: the default
    assert r.exit_code == 0 and one_json_line(r)["amplification_claimed"] is False
    assert run("privacy", "epsilon", "-z", "1", "--rounds", "2", "--sampling", "fixed").exit_code == 2
    assert run("privacy", "epsilon", "-z", "1", "--rounds", "2").exit_code == 2  # poisson without a rate
    assert run("privacy", "epsilon", "-z", "1", "--rounds", "2", "--cohort", "20", "--population", "10", "--json").exit_code == 2


def _ledger(tmp_path, run_id="run-cli"):
    key = generate_audit_key(tmp_path / "keys" / "audit.pem")
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", key)
    for r in range(1, 4):
        ledger.append(GaussianRoundEvent.from_distributed_noise(
            run_id=run_id, round=r, clip_norm=1.0, planned_noise_multiplier=2.0, planned_clients=6, survivors=6 - (r == 2),
            sampling="poisson", sampling_rate=0.3, cohort_size=6, population=20, adjacency="add_remove",
            model_hash="%064x" % r))
    return key, ledger


def test_audit_report_then_verify(tmp_path):
    key, ledger = _ledger(tmp_path)
    out = tmp_path / "out"
    r = run("audit", "report", "run-cli", "--ledger", str(ledger.path), "--key", str(tmp_path / "keys" / "audit.pem"),
            "--out", str(out), "--secagg-shares", "4", "--secagg-threshold", "3", "--json")
    assert r.exit_code == 0, r.output
    made = one_json_line(r)
    assert made["epsilon"] > 0 and sorted(made["files"]) == ["html", "ledger", "public_key", "report"]
    pub = export_public_key(key, tmp_path / "server.pub.pem")
    ok = run("audit", "verify", str(out / "report.json"), "--public-key", str(pub))
    assert ok.exit_code == 0 and "OK" in ok.stdout
    # from a real process too (exit codes as the auditor sees them)
    proc = subprocess.run([sys.executable, "-m", "restwise.cli", "audit", "verify", str(out), "--public-key", str(pub), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    other = export_public_key(generate_audit_key(tmp_path / "other.pem"), tmp_path / "other.pub")
    assert run("audit", "verify", str(out), "--public-key", str(other)).exit_code == 8
    data = bytearray((out / "report.json").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "report.json").write_bytes(bytes(data))
    bad = run("audit", "verify", str(out), "--public-key", str(pub))
    assert bad.exit_code == 8 and "altered" in bad.output


def test_audit_report_needs_key_for_signed_ledger(tmp_path):
    _, ledger = _ledger(tmp_path)
    r = run("audit", "report", "run-cli", "--ledger", str(ledger.path), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--key" in r.output
    r = run("audit", "report", "run-nope", "--ledger", str(ledger.path), "--key", str(tmp_path / "keys" / "audit.pem"),
            "--out", str(tmp_path / "o"), "--json")
    assert r.exit_code == 1 and one_json_line(r)["error_type"] == "ReportError"


def test_audit_report_from_server_data_dir(tmp_path):
    data_dir = tmp_path / "server"
    run_dir = data_dir / "runs" / "run-0123456789ab"
    run_dir.mkdir(parents=True)
    key = generate_audit_key(data_dir / "runs" / "audit_key.pem")
    (run_dir / "config.json").write_text(json.dumps({"delta": 1e-6, "target_epsilon": 5.0, "secagg_num_neighbours": 4,
                                                     "secagg_threshold": 3, "noise": "distributed"}))
    ledger = PrivacyLedger(run_dir / "ledger.jsonl", key)
    for r in (1, 2):
        ledger.append(GaussianRoundEvent.from_distributed_noise(
            run_id="run-0123456789ab", round=r, clip_norm=1.0, planned_noise_multiplier=3.0, planned_clients=5,
            survivors=5, sampling="full", cohort_size=5, population=5, adjacency="add_remove", model_hash="cd" * 32))
    export_public_key(key, run_dir / "public_key.pem")
    r = run("audit", "report", "run-0123456789ab", "--data-dir", str(data_dir), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["delta"] == 1e-6 and report["budget"]["epsilon"] == 5.0
    assert report["secure_aggregation"]["num_shares"] == 4
    assert run("audit", "verify", str(run_dir), "--public-key", str(run_dir / "public_key.pem")).exit_code == 0
    assert run("audit", "report", "../etc", "--data-dir", str(data_dir)).exit_code == 2


# -- `audit report --bundle`: the auditor's, with no private key -----------------------------
def _issued_bundle(tmp_path):
    """A bundle as the service serves it: report.json, report.html, ledger.jsonl and
    public_key.pem, issued with the operator's key (which the auditor never sees)."""
    key, ledger = _ledger(tmp_path / "server")
    out = tmp_path / "bundle" / "run-cli"
    r = run("audit", "report", "run-cli", "--ledger", str(ledger.path), "--key", str(tmp_path / "server" / "keys" / "audit.pem"),
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    pub = export_public_key(key, tmp_path / "published.pem")  # the key the operator publishes
    return out, pub


def test_audit_report_rebuilds_text_and_html_from_a_bundle_without_a_private_key(tmp_path):
    import zipfile

    bundle, pub = _issued_bundle(tmp_path)
    issued = json.loads((bundle / "report.json").read_text())
    r = run("audit", "report", "--bundle", str(bundle.parent), "--public-key", str(pub), "--out", str(tmp_path / "rebuilt"))
    assert r.exit_code == 0, r.output
    eps = f"{issued['epsilon']:.4g}"
    text = (tmp_path / "rebuilt" / "report.txt").read_text()
    assert text in r.stdout and f"{eps} at delta = 1e-05" in text and "Rebuilt by the auditor from a verified bundle" in text
    assert [line.split()[0] for line in text.split("Releases (from the ledger)\n")[1].splitlines()[1:4]] == ["1", "2", "3"]
    page = (tmp_path / "rebuilt" / "report.html").read_text()
    assert f'<strong id="epsilon">{eps}</strong>' in page and 'id="notice"' in page
    # The same from the zip the service serves, as JSON.
    zipped = tmp_path / "run-cli-verification.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in bundle.iterdir():
            zf.write(f, f"run-cli/{f.name}")
        zf.writestr("../../evil.txt", "a path the archive chose")  # never written anywhere
    r = run("audit", "report", "--bundle", str(zipped), "--public-key", str(pub), "--json")
    assert r.exit_code == 0, r.output
    made = one_json_line(r)
    assert made["epsilon"] == issued["epsilon"] and made["source"] == "report" and made["files"] == {}
    assert not (tmp_path.parent / "evil.txt").exists()


def test_audit_report_from_a_bundle_fails_closed(tmp_path):
    bundle, pub = _issued_bundle(tmp_path)
    out = tmp_path / "rebuilt"

    def rebuild(*extra):
        return run("audit", "report", "--bundle", str(bundle), "--out", str(out), *extra)

    assert rebuild().exit_code == 8  # no key pinned and none trusted: nothing is rebuilt
    other = export_public_key(generate_audit_key(tmp_path / "other.pem"), tmp_path / "other.pub")
    r = rebuild("--public-key", str(other))
    assert r.exit_code == 8 and "does not verify" in r.output
    shipped = rebuild("--trust-shipped-key")
    assert shipped.exit_code == 0 and "fingerprint" in shipped.output
    (out / "report.html").unlink()
    (out / "report.txt").unlink()
    # One changed byte in the ledger: it does not verify, nothing is written.
    ledger = (bundle / "ledger.jsonl").read_bytes()
    i = ledger.index(b'"noise_multiplier":') + len(b'"noise_multiplier":')
    (bundle / "ledger.jsonl").write_bytes(ledger[:i] + (b"9" if ledger[i:i + 1] != b"9" else b"8") + ledger[i + 1:])
    r = rebuild("--public-key", str(pub))
    assert r.exit_code == 8 and "the ledger does not verify" in r.output
    assert not (out / "report.html").exists() and not (out / "report.txt").exists()
    (bundle / "ledger.jsonl").write_bytes(ledger)
    # A report.json that is not the one the ledger records.
    report = json.loads((bundle / "report.json").read_text())
    report["epsilon"] = report["epsilon"] / 4
    (bundle / "report.json").write_text(json.dumps(report))
    r = rebuild("--public-key", str(pub))
    assert r.exit_code == 8 and "not recorded in the ledger" in r.output and not (out / "report.html").exists()


def test_audit_report_from_a_bundle_with_no_report_rebuilds_it_from_the_ledger(tmp_path):
    """A run stopped before its report: the ledger and the key alone give its ε."""
    from restwise.privacy.accountant import PrivacyAccountant

    key, ledger = _ledger(tmp_path / "server", run_id="run-stopped")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ledger.jsonl").write_bytes(ledger.path.read_bytes())
    pub = export_public_key(key, bundle / "public_key.pem")
    r = run("audit", "report", "--bundle", str(bundle), "--public-key", str(pub), "--out", str(tmp_path / "rebuilt"), "--json")
    assert r.exit_code == 0, r.output
    made = one_json_line(r)
    expected = PrivacyAccountant().epsilon(ledger.releases("run-stopped"), 1e-5).epsilon
    assert made["source"] == "ledger" and made["run_id"] == "run-stopped"
    assert made["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert "from the signed ledger alone" in (tmp_path / "rebuilt" / "report.txt").read_text()
    assert run("audit", "report", "run-other", "--bundle", str(bundle), "--public-key", str(pub)).exit_code == 1
