"""The DP release workflow's planner and its transport-free steps (privacy/release.py). The
whole workflow runs in tests/test_federated_app.py (real apps, real secure aggregation, the
signed ledger); here its numbers are checked directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.errors import PrivacyError
from restwise.privacy.events import ReleaseSpec
from restwise.privacy.ledger import PrivacyLedger
from restwise.privacy.release import (
    ReleasePolicy,
    ReleaseWorkflow,
    add_noise,
    check_plan,
    dp_parameters,
    plan_release,
    released_noise_std,
)
from restwise.privacy.secagg.errors import SecAggConfigError
from restwise.server.runconfig import RunConfig
from restwise.server.runs import BudgetCheck

BASE = dict(name="t", rounds=20, population=50, sampling="poisson", sampling_rate=0.2, target_epsilon=3.0,
            delta=1e-5, clip_norm=0.7, secagg_num_neighbours=16, secagg_threshold=0.6, max_dropout_fraction=0.3)


def test_one_planner_serves_the_server_and_the_service():
    config = RunConfig(**BASE)
    plan = plan_release(config.release_policy())
    # Calibrated: the smallest z whose epsilon over all planned rounds stays within the target.
    assert plan.calibrated and plan.planned_epsilon <= 3.0 and plan.planned_epsilon > 2.9
    assert plan.adjacency == "add_remove" and not plan.claim_amplification
    spec = ReleaseSpec.plan(noise_multiplier=plan.noise_multiplier, sampling="poisson", sampling_rate=0.2,
                            adjacency="add_remove")
    assert plan.spec == spec
    assert PrivacyAccountant().epsilon_for_rounds(spec, 20, 1e-5).epsilon == pytest.approx(plan.planned_epsilon)
    # The service's start-time check is the same plan, with a cap on top.
    decision = BudgetCheck(epsilon_cap=2.0)(config.to_dict(), [])
    assert decision.detail["noise_multiplier"] == plan.noise_multiplier
    assert decision.budget_epsilon == 2.0 and not decision.allowed
    assert decision.projected_epsilon == pytest.approx(plan.planned_epsilon)
    assert decision.projected_epsilon <= config.target_epsilon  # without the cap: allowed


def test_fixed_size_sampling_is_planned_under_replace_one_with_amplification_beside():
    """K of N (Flower's default client selection): accounted, not refused; the plan charges the
    epsilon against the sampler and shows the amplified (K-of-N) value beside it."""
    config = RunConfig(**{**BASE, "sampling": "fixed", "sampling_rate": None, "cohort_size": 10,
                          "target_epsilon": None, "noise_multiplier": 2.0})
    plan = plan_release(config.release_policy())
    assert not plan.calibrated and plan.noise_multiplier == 2.0
    assert plan.adjacency == "replace_one" and not plan.claim_amplification
    result = PrivacyAccountant().epsilon_for_rounds(plan.spec, 20, 1e-5)
    assert plan.budget_epsilon == pytest.approx(result.epsilon) == pytest.approx(plan.planned_epsilon)
    amplified = PrivacyAccountant(claim_amplification=True).epsilon_for_rounds(plan.spec, 20, 1e-5)
    assert plan.planned_epsilon_amplified == amplified.epsilon < result.epsilon == amplified.epsilon_no_amplification
    calibrated = plan_release(RunConfig(**{**BASE, "sampling": "fixed", "sampling_rate": None, "cohort_size": 10}).release_policy())
    assert calibrated.calibrated and calibrated.planned_epsilon <= BASE["target_epsilon"]


def test_person_budget_composes_with_earlier_releases():
    config = RunConfig(**{**BASE, "target_epsilon": None, "noise_multiplier": 1.5})
    policy = config.release_policy()
    alone = check_plan(policy, person_epsilon_cap=100.0)
    past = [{"kind": "gaussian_round", "schema_version": 1, "run_id": "run-earlier", "round": r, "noise_multiplier": 1.5,
             "clip_norm": 0.7, "noise_std_total": 1.05, "sampling": "poisson", "sampling_rate": 0.2, "cohort_size": 10,
             "population": 50, "adjacency": "add_remove", "planned_clients": 10, "survivors": 10,
             "model_hash": "ab" * 32, "timestamp": "2026-01-01T00:00:00.000000Z"} for r in range(1, 21)]
    both = check_plan(policy, person_epsilon_cap=100.0, past_releases=past)
    assert both.person_spent_epsilon > 0 and both.person_projected_epsilon > alone.person_projected_epsilon
    # Twice the same releases: the person's epsilon is that of 40 rounds.
    forty = PrivacyAccountant().epsilon_for_rounds(policy.spec(1.5), 40, 1e-5).epsilon
    assert both.person_projected_epsilon == pytest.approx(forty, rel=1e-6)
    tight = check_plan(policy, person_epsilon_cap=both.person_projected_epsilon * 0.9, past_releases=past)
    assert tight.run_allowed and not tight.person_allowed


def test_noise_shares_are_sized_for_the_smallest_releasable_cohort():
    policy = RunConfig(**BASE).release_policy()
    params = dp_parameters(policy, 1.2, min_survivors=6)
    assert params.noise_divisor == 5  # add/remove: a person's own share never counts
    assert params.clip_norm == 0.7 and params.share_std == pytest.approx(1.2 * 0.7 / math.sqrt(5))
    plan = plan_release(policy)
    params = dp_parameters(policy, plan.noise_multiplier, min_survivors=6)
    # 8 survivors: the 7 other shares protect a person, z C sqrt(7 / 5) >= z C.
    assert released_noise_std(plan, params, 8) == pytest.approx(plan.noise_multiplier * 0.7 * math.sqrt(7 / 5))
    assert released_noise_std(plan, params, 6) == pytest.approx(plan.noise_multiplier * 0.7)
    replace = RunConfig(**{**BASE, "sampling": "fixed", "sampling_rate": None, "cohort_size": 10}).release_policy()
    assert dp_parameters(replace, 1.2, min_survivors=6).noise_divisor == 6
    central = RunConfig(**{**BASE, "noise": "central"}).release_policy()
    central_params = dp_parameters(central, 1.2, min_survivors=6)
    assert central_params.noise_divisor == 1 and central_params.share_std == 0.0


def test_central_noise_is_added_by_the_release_with_std_z_c():
    central = RunConfig(**{**BASE, "noise": "central", "target_epsilon": None, "noise_multiplier": 2.0})
    plan = plan_release(central.release_policy())
    params = dp_parameters(central.release_policy(), 2.0, min_survivors=6)
    released, std = add_noise(plan, params, np.zeros(200_000), survivors=9, rng=np.random.default_rng(3))
    assert std == pytest.approx(2.0 * 0.7)
    assert float(released.std()) == pytest.approx(std, rel=0.01)


def test_the_policy_and_the_workflow_fail_closed(tmp_path):
    with pytest.raises(PrivacyError):
        ReleasePolicy(sensitivity=1.0, population=10, sampling="poisson", sampling_rate=0.5, releases=3, delta=1e-5,
                      noise_multiplier=0.4)  # below the accountable minimum
    with pytest.raises(PrivacyError):
        ReleasePolicy(sensitivity=1.0, population=10, sampling="poisson", sampling_rate=0.5, releases=3, delta=1e-5,
                      noise_multiplier=1.0, target_epsilon=2.0)  # both
    with pytest.raises(PrivacyError):
        ReleasePolicy(sensitivity=0.0, population=10, sampling="poisson", sampling_rate=0.5, releases=3, delta=1e-5,
                      noise_multiplier=1.0)
    # Planned and accounted, but never released without secure aggregation.
    policy = ReleasePolicy(sensitivity=1.0, population=10, sampling="poisson", sampling_rate=0.5, releases=3,
                           delta=1e-5, noise_multiplier=1.0)
    workflow = ReleaseWorkflow(plan_release(policy), PrivacyLedger(tmp_path / "ledger.jsonl"), "run-x")
    with pytest.raises(SecAggConfigError):
        workflow.round_parameters(8)
    assert workflow.epsilon() is None and workflow.attempt(1) == 0
