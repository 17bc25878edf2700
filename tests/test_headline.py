"""Issue 15.3, an honest headline: every epsilon that is headlined or checked holds against the
server, which draws each round's cohort (no amplification by sampling claimed); the amplified
value stands beside it, labelled; a run's epsilon is capped by default (``max_epsilon``, 10)
and only an explicit, recorded raise lifts the cap; the dashboard shows each run's remaining
budget and the cap recorded when it started.

Real parts: real signed ledgers and report files, the real service app on a real SQLite file
(FastAPI's TestClient), the real CLI. The headline is checked against the analytic Gaussian
mechanism (Balle & Wang 2018) computed here, independently of the accountant."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from restwise.cli import app as cli_app
from restwise.common.exit_codes import ExitCode
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.events import AuditEvent, GaussianRoundEvent
from restwise.privacy.ledger import PrivacyLedger, load_audit_key
from restwise.privacy.report import build_report, render_text, write_report
from restwise.privacy.verify import verify_report
from restwise.server.app import FederatedServer, plan_refusal
from restwise.server.rundir import open_ledger
from restwise.server.runconfig import RunConfig
from restwise.server.service import Settings, create_app

DELTA = 1e-5
V1_BUNDLE = Path(__file__).resolve().parent / "fixtures" / "report_v1"


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """epsilon of the Gaussian mechanism with std ``sigma`` and sensitivity 1 at ``delta``:
    the root of delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma),
    by bisection (Balle & Wang 2018, Thm 8). Written here, not taken from the accountant."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    def delta_at(eps: float) -> float:
        return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def composed_sigma(noise_multipliers) -> float:
    """n Gaussian releases (sensitivity 1, add/remove) compose into one of std 1/sqrt(sum z^-2)."""
    return 1.0 / math.sqrt(sum(z ** -2 for z in noise_multipliers))


def poisson_release(r: int, run_id: str = "run-h", survivors: int = 10) -> GaussianRoundEvent:
    return GaussianRoundEvent.from_distributed_noise(
        run_id=run_id, round=r, clip_norm=1.0, planned_noise_multiplier=1.5, planned_clients=10,
        survivors=survivors, sampling="poisson", sampling_rate=0.1, cohort_size=10, population=100,
        adjacency="add_remove", model_hash="%064x" % (r + 3),
    )


# -- the report ---------------------------------------------------------------------------------
def test_report_headline_is_the_unamplified_epsilon_computed_independently(tmp_path):
    key = Ed25519PrivateKey.generate()
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", key)
    for r in range(1, 6):
        ledger.append(poisson_release(r, survivors=10 if r != 3 else 8))
    report = build_report(ledger, "run-h", delta=DELTA)
    releases = ledger.releases("run-h")
    independent = analytic_gaussian_epsilon(composed_sigma(ev.noise_multiplier for ev in releases), DELTA)
    assert report["report_schema_version"] == 2 and report["amplification_claimed"] is False
    # Never below the exact value, and equal to it up to the root finder's tolerance.
    assert independent - 1e-9 <= report["epsilon"] == pytest.approx(independent, rel=1e-7)
    assert report["epsilon_curve"][-1]["epsilon"] == report["epsilon"]
    # The amplified value (q = 0.1) stands beside it: smaller, and labelled for what it is.
    amplified = PrivacyAccountant(claim_amplification=True).epsilon(releases, DELTA).epsilon
    assert report["epsilon_amplified"] == amplified < 0.5 * report["epsilon"]
    assert "third parties who see only the released model" in report["epsilon_amplified_label"]
    text = render_text(report)
    assert f"no amplification by sampling claimed): {report['epsilon']:.4g}" in text
    assert f"epsilon for third parties who see only the released model (amplified by sampling): {amplified:.4g}" in text
    paths = write_report(report, tmp_path / "out", ledger=ledger)
    page = paths["html"].read_text()
    assert f'id="epsilon">{report["epsilon"]:.4g}<' in page and f'id="epsilon-amplified">{amplified:.4g}<' in page
    res = verify_report(tmp_path / "out", public_key=key.public_key())
    assert res.ok, res.problems
    assert res.report_schema_version == 2 and res.epsilon_against_server == report["epsilon"]
    assert res.epsilon_amplified == amplified


def test_schema_1_report_still_verifies_and_says_which_schema_it_read(tmp_path):
    """A report issued before the headline changed (schema 1, by the earlier code: its headline
    1.69 is amplified, 8.53 against the server) still verifies; the verifier names the schema and
    gives the epsilon against the server."""
    bundle = tmp_path / "v1"
    shutil.copytree(V1_BUNDLE, bundle)
    report = json.loads((bundle / "report.json").read_text())
    assert report["report_schema_version"] == 1 and report["amplification_claimed"] is True
    res = verify_report(bundle, public_key=bundle / "public_key.pem")
    assert res.ok, res.problems
    assert res.report_schema_version == 1
    assert res.epsilon_against_server == pytest.approx(report["epsilon_no_amplification"], rel=1e-9)
    assert res.epsilon_amplified == pytest.approx(report["epsilon"], rel=1e-9)
    assert res.epsilon_amplified < res.epsilon_against_server
    independent = analytic_gaussian_epsilon(composed_sigma([1.2 * math.sqrt(9 / 10)] * 4), DELTA)
    assert res.epsilon_against_server == pytest.approx(independent, rel=1e-7)
    assert any("schema-1 report" in w and "claims amplification" in w for w in res.warnings)
    r = CliRunner().invoke(cli_app, ["audit", "verify", str(bundle / "report.json"), "--public-key",
                                     str(bundle / "public_key.pem")])
    assert r.exit_code == 0, r.output
    assert "report schema 1" in r.stdout and f"epsilon = {res.epsilon_against_server} against the server" in r.stdout
    # A schema-1 number changed, even re-anchored by whoever holds the key, still fails.
    report["epsilon_no_amplification"] = report["epsilon"]
    (bundle / "report.json").write_text(json.dumps(report))
    assert not verify_report(bundle, public_key=bundle / "public_key.pem").ok


# -- the cap ------------------------------------------------------------------------------------
def capped_run(**changes) -> RunConfig:
    """Poisson q = 0.1 at z = 1 over 10 rounds: under amplification by sampling epsilon is about
    1.6, against the server about 40 - above the default cap of 10."""
    base = dict(name="capped", rounds=10, population=100, sampling="poisson", sampling_rate=0.1, noise_multiplier=1.0,
                delta=DELTA, secagg_num_neighbours=16, secagg_threshold=0.6, force=True)
    return RunConfig(**{**base, **changes})


def test_poisson_run_under_the_cap_only_when_amplified_is_refused(tmp_path):
    cfg = capped_run()
    assert cfg.max_epsilon == 10.0
    cap = cfg.cap_check()
    independent = analytic_gaussian_epsilon(composed_sigma([1.0] * 10), DELTA)
    assert cap.projected_epsilon == pytest.approx(independent, rel=1e-7) and cap.projected_epsilon > 10
    assert cap.epsilon_amplified < 10 and not cap.allowed and not cap.raised
    # force lifts the planner's refusal, never the cap; every creation path asks plan_refusal.
    reason = plan_refusal(cfg)
    assert reason is not None and "epsilon cap" in reason and f"{cap.projected_epsilon:.4g}" in reason
    assert f"{cap.epsilon_amplified:.4g}" in reason and "raise the cap explicitly" in reason
    raised = capped_run(max_epsilon=50.0)
    assert raised.cap_check().allowed and raised.cap_check().raised and plan_refusal(raised) is None
    # The ServerApp's own check at start refuses it too, and records a raised cap in the ledger.
    for name, config in (("run-refused", cfg), ("run-raised", raised)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        server = FederatedServer(config, run_dir, run_id=name, ledger=open_ledger(run_dir, config), node_wait_s=0.1)
        outcome = server.check_plan()
        assert (outcome is not None and "epsilon cap" in outcome) if config is cfg else outcome is None
    events = open_ledger(tmp_path / "run-raised", raised).events()
    (entry,) = [e for e in events if isinstance(e, AuditEvent) and e.action == "cap.raised"]
    assert entry.details["max_epsilon"] == 50.0 and entry.details["default_max_epsilon"] == 10.0
    assert entry.details["projected_epsilon"] == pytest.approx(independent, rel=1e-7)
    # `restwise server run` refuses it before any SuperLink is contacted: exit 7, the numbers.
    cfg_file = tmp_path / "capped.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    r = CliRunner().invoke(cli_app, ["server", "run", "--run-dir", str(tmp_path / "cli-run"), "--config", str(cfg_file),
                                     "--force", "--superlink", "127.0.0.1:1"])
    assert r.exit_code == ExitCode.BUDGET_EXCEEDED, r.output
    assert f"{cap.projected_epsilon:.4g}" in r.output and "epsilon cap 10" in r.output
    assert not (tmp_path / "cli-run" / "config.json").exists()


def test_service_refuses_over_the_cap_with_409_and_records_a_raise(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "srv"))
    _, op = app.state.ctx.tokens.create("operator", "olga")
    headers = {"Authorization": f"Bearer {op}"}
    body = {k: v for k, v in capped_run().to_dict().items() if k not in ("audit_key_path", "max_epsilon")}
    with TestClient(app) as client:
        r = client.post("/api/v1/runs", json=body, headers=headers)
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["type"] == "urn:restwise:problem:epsilon-cap"
        assert problem["max_epsilon"] == 10.0 and problem["projected_epsilon"] > 10 > problem["epsilon_amplified"]
        assert f"{problem['projected_epsilon']:.4g}" in problem["detail"]
        assert client.get("/api/v1/runs", headers=headers).json() == []  # nothing was created
        ok = client.post("/api/v1/runs", json={**body, "max_epsilon": 50.0}, headers=headers)
        assert ok.status_code == 201, ok.text
        assert ok.json()["config"]["max_epsilon"] == 50.0
        log = client.get("/api/v1/audit-log", headers=headers).json()
    creates = [e for e in reversed(log) if e["action"] == "run.create"]
    assert [e["outcome"] for e in creates] == ["refused", "ok"]
    assert creates[0]["detail"]["epsilon_cap"]["projected_epsilon"] == problem["projected_epsilon"]
    assert creates[1]["detail"]["raised_epsilon_cap"]["max_epsilon"] == 50.0
    assert creates[1]["detail"]["raised_epsilon_cap"]["cap_raised"] is True


# -- the dashboard ------------------------------------------------------------------------------
def test_dashboard_shows_remaining_budget_and_the_cap_recorded_at_start(tmp_path):
    """Started under a service cap of 5, the run keeps that cap on the dashboard after the service
    is restarted with a cap of 3; what remains is the cap less the epsilon its ledger spent."""
    data_dir = tmp_path / "srv"
    body = {"name": "dash", "rounds": 2, "population": 100, "sampling": "poisson", "sampling_rate": 0.1,
            "noise_multiplier": 2.0, "secagg_num_neighbours": 16, "secagg_threshold": 0.6, "force": True}
    first = create_app(Settings(data_dir=data_dir, epsilon_cap=5.0, runner_command=("true",)))
    _, op = first.state.ctx.tokens.create("operator", "olga")
    headers = {"Authorization": f"Bearer {op}"}
    with TestClient(first) as client:
        run = client.post("/api/v1/runs", json=body, headers=headers).json()
        started = client.post(f"/api/v1/runs/{run['id']}/start", headers=headers)
        assert started.status_code == 200, started.text
        assert started.json()["epsilon_cap"] == 5.0
    run_dir = data_dir / "runs" / run["id"]
    config = json.loads((run_dir / "config.json").read_text())
    ledger = PrivacyLedger(run_dir / "ledger.jsonl", load_audit_key(config["audit_key_path"]))
    ledger.append(poisson_release(1, run_id=run["id"]))
    spent = analytic_gaussian_epsilon(ledger.releases(run["id"])[0].noise_multiplier, DELTA)

    later = create_app(Settings(data_dir=data_dir, epsilon_cap=3.0, runner_command=("true",)))
    with TestClient(later) as client:
        detail = client.get(f"/api/v1/runs/{run['id']}", headers=headers).json()
        assert detail["epsilon_cap"] == 5.0 and detail["epsilon_spent"] == pytest.approx(spent, rel=1e-7)
        client.cookies.clear()
        assert client.post("/login", data={"token": op}, follow_redirects=False).status_code == 303
        page = client.get(f"/runs/{run['id']}").text
        listing = client.get("/").text
    remaining = 5.0 - detail["epsilon_spent"]
    assert f'id="epsilon-cap">{5.0:.4g}<' in page and "in force when the run started" in page
    assert f'id="epsilon-remaining">{remaining:.4g}<' in page
    assert f'id="epsilon-spent">{detail["epsilon_spent"]:.4g}<' in page and "against the server" in page
    assert f'class="epsilon-remaining">{remaining:.4g} ' in listing and f'class="epsilon-cap">{5.0:.3g}<' in listing
