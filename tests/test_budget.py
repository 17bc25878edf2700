"""Budget refusal at the exact boundary, run and person scope."""

from __future__ import annotations

import pytest

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.budget import PrivacyBudget, check_next_round, refusal_event
from restwise.privacy.errors import BudgetExceededError, PrivacyError
from restwise.privacy.events import AuditEvent, BudgetRefusalEvent, GaussianRoundEvent, ReleaseSpec

DELTA = 1e-5


def release(round, run_id="run-a", z=1.5, survivors=8, planned=8):
    return GaussianRoundEvent.from_distributed_noise(
        run_id=run_id, round=round, clip_norm=0.5, planned_noise_multiplier=z, planned_clients=planned,
        survivors=survivors, sampling="poisson", sampling_rate=0.2, cohort_size=survivors, population=50,
        adjacency="add_remove", model_hash="0f" * 32,
    )


def test_exact_boundary_allowed_and_one_more_refused():
    acc = PrivacyAccountant()
    events = [release(r) for r in range(1, 6)]
    eps5 = acc.epsilon(events, DELTA).epsilon
    budget = PrivacyBudget(eps5, DELTA)
    # the fifth release lands exactly on the budget: allowed
    assert budget.check_next_round(events[:4], events[4]) == eps5
    # a sixth would exceed it: refused with the numbers
    with pytest.raises(BudgetExceededError) as info:
        budget.check_next_round(events, release(6))
    err = info.value
    assert err.spent == eps5 and err.projected > eps5 and err.budget_epsilon == eps5
    assert err.exit_code == 7 and err.run_id == "run-a" and err.round == 6
    assert f"{eps5:.6g}" in str(err) and "run privacy budget" in str(err)
    # a budget one ulp below the exact value refuses the fifth
    import math

    with pytest.raises(BudgetExceededError):
        PrivacyBudget(math.nextafter(eps5, 0), DELTA).check_next_round(events[:4], events[4])


def test_run_budget_ignores_other_runs_person_budget_counts_them():
    other = [release(r, run_id="run-b") for r in range(1, 21)]
    mine = [release(r) for r in range(1, 3)]
    past = other + mine + [AuditEvent(actor="op", action="run.start")]
    nxt = release(3)
    run_eps = PrivacyAccountant().epsilon(mine + [nxt], DELTA).epsilon
    all_eps = PrivacyAccountant().epsilon(other + mine + [nxt], DELTA).epsilon
    run_budget = PrivacyBudget(run_eps, DELTA)
    assert check_next_round(past, nxt, run_budget=run_budget) == run_eps
    with pytest.raises(BudgetExceededError) as info:
        check_next_round(past, nxt, run_budget=run_budget, person_budget=PrivacyBudget(all_eps * 0.99, DELTA, scope="person"))
    assert info.value.scope == "person"
    assert check_next_round(past, nxt, run_budget=run_budget, person_budget=PrivacyBudget(all_eps, DELTA, scope="person")) == run_eps


def test_worst_case_survivors_projection_is_stricter():
    past = [release(r) for r in range(1, 4)]
    full = release(4, survivors=8)
    threshold = release(4, survivors=5)  # only the secure-aggregation threshold survives
    eps_full = PrivacyBudget(100, DELTA).check_next_round(past, full)
    eps_thr = PrivacyBudget(100, DELTA).check_next_round(past, threshold)
    assert eps_thr > eps_full


def test_plan_before_start_and_refusal_event():
    spec = ReleaseSpec.plan(noise_multiplier=1.5, sampling="poisson", sampling_rate=0.2, adjacency="add_remove")
    eps10 = PrivacyAccountant().epsilon_for_rounds(spec, 10, DELTA).epsilon
    budget = PrivacyBudget(eps10, DELTA)
    assert budget.check_plan([], spec, 10, run_id="run-z") == eps10
    with pytest.raises(BudgetExceededError) as info:
        budget.check_plan([], spec, 11, run_id="run-z", round=1)
    ev = refusal_event(info.value)
    assert isinstance(ev, BudgetRefusalEvent)
    assert ev.run_id == "run-z" and ev.round == 1 and ev.budget_epsilon == eps10 and ev.spent_epsilon == 0.0


def test_budget_charges_the_epsilon_against_the_sampler():
    """Every budget is charged the unamplified epsilon, even when handed an accountant that
    claims amplification; a budget 'against' the amplified value is refused."""
    past = [release(r) for r in range(1, 4)]
    charged = PrivacyBudget(1000, DELTA).check_next_round(past, release(4))
    claiming = PrivacyBudget(1000, DELTA).check_next_round(
        past, release(4), accountant=PrivacyAccountant(claim_amplification=True))
    unamplified = PrivacyAccountant().epsilon(past + [release(4)], DELTA)
    assert charged == claiming == unamplified.epsilon == unamplified.epsilon_no_amplification
    assert charged > PrivacyAccountant(claim_amplification=True).epsilon(past + [release(4)], DELTA).epsilon
    with pytest.raises(PrivacyError, match="never the one amplified"):
        PrivacyBudget(1000, DELTA, against="amplified")


@pytest.mark.parametrize("eps, delta", [(0, 1e-5), (-1, 1e-5), (float("inf"), 1e-5), (1, 0), (1, 1), (True, 1e-5)])
def test_invalid_budget(eps, delta):
    with pytest.raises(PrivacyError):
        PrivacyBudget(eps, delta)


def test_no_amplification_budget_accepts_fixed_size_sampling():
    spec = ReleaseSpec.plan(noise_multiplier=2.0, sampling="fixed", cohort_size=5, population=50, adjacency="replace_one")
    eps = PrivacyBudget(100, DELTA, against="no_amplification").check_plan([], spec, 3, run_id="r")
    full = PrivacyAccountant().epsilon_for_rounds(ReleaseSpec.plan(noise_multiplier=2.0, sampling="full", adjacency="replace_one"), 3, DELTA)
    assert eps == full.epsilon
