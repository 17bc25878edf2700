"""Report and independent verification: numbers, self-contained files, tamper detection."""

from __future__ import annotations

import json
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.errors import ReportError, VerificationError
from restwise.privacy.events import AuditEvent, BudgetRefusalEvent, GaussianRoundEvent
from restwise.privacy.ledger import PrivacyLedger, export_public_key
from restwise.privacy.report import REPORT_SCHEMA_VERSION, build_report, render_html, write_report
from restwise.privacy.verify import verify_report

DELTA = 1e-5
SECAGG = {"num_shares": 8, "reconstruction_threshold": 5, "dropouts_tolerated": 3, "clipping_range": 8.0}
ALLOW = {"secagg.masked-input": ["masked"], "metrics": ["train_loss"]}


def release(r, run_id="run-a", survivors=8):
    return GaussianRoundEvent.from_distributed_noise(
        run_id=run_id, round=r, clip_norm=0.8, planned_noise_multiplier=1.6, planned_clients=8,
        survivors=survivors, sampling="poisson", sampling_rate=0.25, cohort_size=8, population=32,
        adjacency="add_remove", model_hash="%064x" % (r + 7),
    )


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    key = Ed25519PrivateKey.generate()
    ledger = PrivacyLedger(tmp / "server" / "ledger.jsonl", key)
    ledger.append(AuditEvent(actor="operator:1", action="run.start", target="run-a"))
    for r in range(1, 7):
        ledger.append(release(r, survivors=8 if r != 4 else 6))  # round 4 lost two devices
        ledger.append(release(r, run_id="run-b"))
    ledger.append(BudgetRefusalEvent(run_id="run-a", round=7, scope="run", spent_epsilon=1.0,
                                     projected_epsilon=1.1, budget_epsilon=1.05, delta=DELTA))
    report = build_report(ledger, "run-a", secagg=SECAGG, delta=DELTA, egress_allow_list=ALLOW,
                          budget={"epsilon": 1.05, "delta": DELTA, "scope": "run"})
    paths = write_report(report, tmp / "out", ledger=ledger)
    return {"key": key, "ledger": ledger, "report": report, "paths": paths, "out": tmp / "out", "tmp": tmp}


def _copy(issued, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(issued["out"], dest)
    return dest


def test_report_numbers_come_from_the_ledger(issued):
    rep = issued["report"]
    releases = issued["ledger"].releases("run-a")
    acc = PrivacyAccountant().epsilon(releases, DELTA)
    assert rep["report_schema_version"] == REPORT_SCHEMA_VERSION
    assert rep["epsilon"] == acc.epsilon and rep["epsilon_rdp_bound"] == acc.epsilon_rdp_bound
    assert rep["epsilon_rdp_bound"] >= rep["epsilon"]
    # The headline claims no amplification; the amplified value stands beside it, smaller.
    assert rep["amplification_claimed"] is False and rep["epsilon_amplified"] < rep["epsilon"]
    assert rep["epsilon_amplified"] == PrivacyAccountant(claim_amplification=True).epsilon(releases, DELTA).epsilon
    assert [r["round"] for r in rep["releases"]] == [1, 2, 3, 4, 5, 6]
    assert rep["releases"][3]["survivors"] == 6 and rep["releases"][3]["noise_multiplier"] < rep["releases"][0]["noise_multiplier"]
    full = rep["releases"][0]["noise_multiplier"]  # 8 survivors: 7 counted shares of 8 (add/remove)
    assert full == pytest.approx(1.6 * (7 / 8) ** 0.5)
    assert rep["mechanism"]["noise_multipliers"] == pytest.approx(sorted({full, rep["releases"][3]["noise_multiplier"]}))
    assert rep["mechanism"]["clip_norms"] == [0.8]
    assert rep["adjacency"] == "add_remove" and "person" in rep["privacy_unit"]
    assert rep["secure_aggregation"] == SECAGG and rep["information_leakage"]["leaves_device"] == ALLOW
    assert len(rep["refusals"]) == 1 and rep["refusals"][0]["round"] == 7
    assert rep["accounting"]["accountant_version"].startswith("dp-accounting")
    assert rep["epsilon_curve"][-1]["epsilon"] == rep["epsilon"]
    assert rep["ledger"]["signed"] and rep["ledger"]["public_key_fingerprint"].startswith("sha256:")
    assert any("epsilon_amplified" in t and "never against the server" in t for t in rep["threat_model"])


def test_html_is_self_contained_and_shows_the_numbers(issued):
    page = issued["paths"]["html"].read_text()
    assert "<svg" in page and "polyline" in page
    assert f"{issued['report']['epsilon']:.4g}" in page
    for needle in ("Threat model", "Information leakage", "secagg.masked-input", "reconstruction_threshold",
                   issued["report"]["ledger"]["head_hash"], "dp_accounting"):
        assert needle in page
    stripped = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in stripped and "https://" not in stripped and "src=" not in stripped


def test_default_leakage_text_without_allow_list(issued):
    rep = build_report(issued["ledger"], "run-b", delta=DELTA)
    assert "never sent" in rep["information_leakage"]["leaves_device"]
    assert rep["secure_aggregation"] is None
    assert "No secure-aggregation" in render_html(rep)


def test_verify_passes_from_the_files_alone(issued, tmp_path):
    dest = _copy(issued, tmp_path)
    res = verify_report(dest / "report.json", public_key=issued["key"].public_key())
    assert res.ok, res.problems
    assert res.key_pinned and res.releases == 6 and res.epsilon_recomputed == issued["report"]["epsilon"]
    pub = export_public_key(issued["key"], tmp_path / "server.pub")
    assert verify_report(dest, public_key=pub).ok
    unpinned = verify_report(dest)  # no key pinned: fails closed
    assert not unpinned.ok and not unpinned.key_pinned and any("no pinned public key" in p for p in unpinned.problems)
    shipped = verify_report(dest, trust_shipped_key=True)  # asked for: passes, warns with the fingerprint
    assert shipped.ok and not shipped.key_pinned and shipped.key_source == "shipped"
    assert issued["report"]["ledger"]["public_key_fingerprint"] in shipped.warnings[0]


def test_verify_fails_with_another_key(issued, tmp_path):
    dest = _copy(issued, tmp_path)
    res = verify_report(dest, public_key=Ed25519PrivateKey.generate().public_key())
    assert not res.ok and any("signature" in p for p in res.problems)
    with pytest.raises(VerificationError):
        res.raise_for_problems()


def _positions(n, count=45):
    return sorted({int(i * (n - 1) / (count - 1)) for i in range(count)})


@pytest.mark.parametrize("name", ["report.json", "ledger.jsonl", "report.html"])
def test_flipping_bytes_fails_verification(issued, tmp_path, name):
    dest = _copy(issued, tmp_path)
    target = dest / name
    original = target.read_bytes()
    for pos in _positions(len(original)):
        for mask in (0x01, 0x20):
            data = bytearray(original)
            data[pos] ^= mask
            target.write_bytes(bytes(data))
            res = verify_report(dest, public_key=issued["key"].public_key())
            assert not res.ok, (name, pos, mask)
    target.write_bytes(original)
    assert verify_report(dest, public_key=issued["key"].public_key()).ok


def test_bytes_all_over_report_json_matter(issued, tmp_path):
    """~300 positions spread over the whole of report.json: each flip breaks the attestation."""
    dest = _copy(issued, tmp_path)
    target = dest / "report.json"
    original = target.read_bytes()
    for pos in range(0, len(original), max(1, len(original) // 300)):
        data = bytearray(original)
        data[pos] ^= 0x01
        target.write_bytes(bytes(data))
        res = verify_report(dest, public_key=issued["key"].public_key())
        assert not res.ok and res.problems, pos


def test_dishonest_numbers_are_caught_even_when_attested(issued, tmp_path):
    """An operator who signs a report with a wrong epsilon is caught by the recomputation."""
    ledger = PrivacyLedger(tmp_path / "l.jsonl", issued["key"])
    for r in range(1, 4):
        ledger.append(release(r))
    report = build_report(ledger, "run-a", delta=DELTA)
    true_eps = report["epsilon"]
    report["epsilon"] = true_eps * 0.9
    report["releases"][1]["survivors"] = 7
    write_report(report, tmp_path / "out", ledger=ledger)
    res = verify_report(tmp_path / "out", public_key=issued["key"].public_key())
    assert not res.ok
    assert any(p.startswith("epsilon: the report says") and repr(true_eps) in p for p in res.problems)
    assert any("survivors" in p for p in res.problems)


def test_missing_ledger_or_separate_ledger_path(issued, tmp_path):
    dest = _copy(issued, tmp_path)
    moved = tmp_path / "elsewhere.jsonl"
    (dest / "ledger.jsonl").rename(moved)
    assert not verify_report(dest, public_key=issued["key"].public_key()).ok
    assert verify_report(dest, ledger_path=moved, public_key=issued["key"].public_key()).ok
    # a ledger that goes on after the report_issued entry is not the report's: fails, naming the entry
    grown = tmp_path / "grown.jsonl"
    shutil.copy(issued["ledger"].path, grown)
    extra = PrivacyLedger(grown, issued["key"]).append(AuditEvent(actor="auditor:2", action="report.download", target="run-a"))
    res = verify_report(dest, ledger_path=grown, public_key=issued["key"].public_key())
    assert not res.ok
    assert any(f"ledger entry seq {extra.seq} (audit" in p and "after the report_issued entry" in p for p in res.problems)


def test_unknown_run_and_unaccountable_run(issued, tmp_path):
    with pytest.raises(ReportError, match="no entry for run"):
        build_report(issued["ledger"], "run-zzz", delta=DELTA)
    ledger = PrivacyLedger(tmp_path / "l.jsonl", issued["key"])
    ledger.append(GaussianRoundEvent.from_distributed_noise(
        run_id="run-x", round=1, clip_norm=1.0, planned_noise_multiplier=0.6, planned_clients=10, survivors=5,
        sampling="full", cohort_size=5, population=5, adjacency="add_remove", model_hash="ab" * 32))
    rep = build_report(ledger, "run-x", delta=DELTA)
    assert rep["epsilon"] is None and "NoiseTooSmallError" in rep["accounting"]["error"]
    write_report(rep, tmp_path / "out", ledger=ledger)
    assert verify_report(tmp_path / "out", public_key=issued["key"].public_key()).ok
    json.loads((tmp_path / "out" / "report.json").read_text())


@pytest.mark.parametrize("field, value", [("releases", 5), ("ledger", []), ("epsilon_curve", "x"), ("accounting", {"pld_parameters": {"bogus": 1}})])
def test_malformed_report_structure_fails_cleanly(issued, tmp_path, field, value):
    dest = _copy(issued, tmp_path)
    report = json.loads((dest / "report.json").read_text())
    report[field] = value
    (dest / "report.json").write_text(json.dumps(report))
    res = verify_report(dest, public_key=issued["key"].public_key())
    assert not res.ok and res.problems
