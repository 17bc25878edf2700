"""Adversarial review of privacy accounting, ledger and verification.

Cross-checks the accountant against dp_accounting called directly (the published values of
the issue), and checks that a report cannot leave out releases made before it was issued.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.events import GaussianRoundEvent, ReleaseSpec
from restwise.privacy.ledger import PrivacyLedger
from restwise.privacy.report import build_report, write_report
from restwise.privacy.verify import verify_report

DELTA = 1e-5


def _release(r: int, run_id: str = "run-a") -> GaussianRoundEvent:
    return GaussianRoundEvent.from_distributed_noise(
        run_id=run_id, round=r, clip_norm=1.0, planned_noise_multiplier=2.0, planned_clients=4,
        survivors=4, sampling="full", cohort_size=4, population=4, adjacency="add_remove",
        model_hash="%064x" % (r + 1),
    )


# -- the accountant against dp_accounting directly ------------------------------------------------
def test_single_gaussian_release_matches_the_closed_form():
    from dp_accounting import gaussian_mechanism

    acc = PrivacyAccountant()
    for adjacency, sigma, published in (("add_remove", 1.0, 4.377), ("replace_one", 0.5, 9.997)):
        spec = ReleaseSpec.plan(noise_multiplier=1.0, sampling="full", adjacency=adjacency)
        eps = acc.epsilon_value([spec], DELTA)
        exact = gaussian_mechanism.get_epsilon_gaussian(sigma, DELTA)
        assert exact <= eps <= exact + 1e-6  # never low, and tight
        assert eps == pytest.approx(published, abs=5e-4)
        # the RDP monitor is an upper bound, never below the exact value
        assert acc.epsilon_for_rounds(spec, 1, DELTA).epsilon_rdp_bound >= exact


def test_poisson_replace_one_is_the_larger_of_both_dp_accounting_pairs():
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld

    q, z, rounds = 0.05, 1.2, 30
    acc = PrivacyAccountant(claim_amplification=True)  # the amplified value (third parties)
    spec = ReleaseSpec.plan(noise_multiplier=z, sampling="poisson", sampling_rate=q, adjacency="replace_one")
    eps = acc.epsilon_value([spec] * rounds, DELTA)
    direct = []
    for relation in (dp_accounting.NeighboringRelation.REPLACE_ONE, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
        one = pld.from_gaussian_mechanism(
            z, sensitivity=1.0, sampling_prob=q, neighboring_relation=relation,
            value_discretization_interval=1e-4, pessimistic_estimate=True,
        )
        direct.append(one.self_compose(rounds).get_epsilon_for_delta(DELTA))
    # both discretisations are pessimistic: the values agree to the coarser grid's error
    assert eps >= max(direct) - 2e-2
    assert eps == pytest.approx(max(direct), rel=2e-2)
    # and replace-one is never cheaper than add/remove for the same mechanism
    ar = ReleaseSpec.plan(noise_multiplier=z, sampling="poisson", sampling_rate=q, adjacency="add_remove")
    assert eps >= acc.epsilon_value([ar] * rounds, DELTA)


def test_heterogeneous_rounds_compose_like_dp_accounting_pld_accountant():
    import dp_accounting

    specs = [ReleaseSpec.plan(noise_multiplier=z, sampling="poisson", sampling_rate=q, adjacency="add_remove")
             for z, q in ((1.0, 0.02), (2.0, 0.1), (1.0, 0.02), (0.8, 0.01))]
    eps = PrivacyAccountant(claim_amplification=True).epsilon_value(specs, DELTA)
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for s in specs:
        reference.compose(dp_accounting.PoissonSampledDpEvent(s.sampling_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)))
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=5e-3)


def test_dropouts_shrink_the_accounted_noise():
    full = GaussianRoundEvent.from_distributed_noise(
        run_id="r", round=1, clip_norm=1.0, planned_noise_multiplier=1.0, planned_clients=10, survivors=10,
        sampling="full", cohort_size=10, population=10, adjacency="add_remove", model_hash="0" * 64,
    )
    dropped = GaussianRoundEvent.from_distributed_noise(
        run_id="r", round=2, clip_norm=1.0, planned_noise_multiplier=1.0, planned_clients=10, survivors=4,
        sampling="full", cohort_size=10, population=10, adjacency="add_remove", model_hash="0" * 64,
    )
    assert dropped.noise_multiplier == pytest.approx(0.3 ** 0.5)  # 3 counted shares of 10
    from dp_accounting import gaussian_mechanism

    assert PrivacyAccountant().epsilon_value([dropped], DELTA) >= gaussian_mechanism.get_epsilon_gaussian(0.3 ** 0.5, DELTA)


# -- verification: a report must cover every release made before it was issued -------------------
def test_report_that_omits_earlier_releases_of_its_run_fails_verification(tmp_path):
    """The report names its ledger head; an operator could build it from an old head (or a
    truncated view) and anchor it after more rounds ran, understating epsilon. Every release
    of the run recorded before the report's own report_issued entry must be in the report."""
    key = Ed25519PrivateKey.generate()
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", key)
    for r in (1, 2):
        ledger.append(_release(r))
    stale = build_report(ledger, "run-a", delta=DELTA)  # head_seq = 2
    ledger.append(_release(3))  # a third release happens ...
    write_report(stale, tmp_path / "out", ledger=ledger)  # ... and the 2-round report is anchored after it
    res = verify_report(tmp_path / "out", public_key=key.public_key())
    assert not res.ok
    assert any("round 3" in p or "not covered" in p for p in res.problems), res.problems


def test_report_with_releases_of_other_runs_after_its_head_still_verifies(tmp_path):
    key = Ed25519PrivateKey.generate()
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", key)
    ledger.append(_release(1))
    report = build_report(ledger, "run-a", delta=DELTA)
    ledger.append(_release(1, run_id="run-b"))  # another run's release in between is fine
    write_report(report, tmp_path / "out", ledger=ledger)
    res = verify_report(tmp_path / "out", public_key=key.public_key())
    assert res.ok, res.problems


def test_verified_report_without_an_epsilon_warns(tmp_path):
    """Noise below the accountant's minimum cannot be accounted: the report says so (epsilon
    null) and verification must not present it as a plain success. Fixed-size sampling under
    add/remove has a headline (against the server no amplification is claimed) but no
    amplified value: amplification is not defined there."""
    key = Ed25519PrivateKey.generate()
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", key)
    ledger.append(GaussianRoundEvent.from_distributed_noise(
        run_id="run-f", round=1, clip_norm=1.0, planned_noise_multiplier=2.0, planned_clients=4,
        survivors=4, sampling="fixed", cohort_size=4, population=40, adjacency="add_remove",
        model_hash="%064x" % 5,
    ))
    report = build_report(ledger, "run-f", delta=DELTA)
    assert report["epsilon"] > 0 and report["epsilon_amplified"] is None
    ledger.append(GaussianRoundEvent.from_distributed_noise(
        run_id="run-t", round=1, clip_norm=1.0, planned_noise_multiplier=0.3, planned_clients=4,
        survivors=4, sampling="poisson", sampling_rate=0.1, cohort_size=4, population=40,
        adjacency="add_remove", model_hash="%064x" % 6,
    ))
    report = build_report(ledger, "run-t", delta=DELTA)
    assert report["epsilon"] is None and report["epsilon_amplified"] is None
    write_report(report, tmp_path / "out", ledger=ledger)
    res = verify_report(tmp_path / "out", public_key=key.public_key())
    assert res.ok and any("no epsilon" in w for w in res.warnings), (res.problems, res.warnings)


def test_html_escapes_every_operator_supplied_text(tmp_path):
    from restwise.privacy.report import render_html

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", Ed25519PrivateKey.generate())
    ledger.append(_release(1))
    evil = "<script>alert(1)</script>"
    report = build_report(
        ledger, "run-a", delta=DELTA, secagg={evil: evil, "threshold": evil},
        egress_allow_list={evil: [evil]}, budget={"epsilon": 5.0, "delta": DELTA, "scope": evil},
    )
    page = render_html(report)
    assert "<script" not in page and "&lt;script&gt;" in page
    page = render_html(dict(report, egress_allow_list=None) | {"information_leakage": {"leaves_device": evil, "server_learns": [evil]}})
    assert "<script" not in page
