"""Privacy events and the accountant against published and independently computed values."""

from __future__ import annotations

import json
import math

import pytest

from restwise.privacy.accountant import MIN_NOISE_MULTIPLIER, PrivacyAccountant
from restwise.privacy.errors import (
    EventValidationError,
    NoiseTooSmallError,
    UnknownSchemaVersionError,
    UnsupportedEventError,
)
from restwise.privacy.events import (
    AuditEvent,
    counted_noise_shares,
    BudgetRefusalEvent,
    GaussianRoundEvent,
    ReleaseSpec,
    ReportIssuedEvent,
    event_from_dict,
)

DELTA = 1e-5
HASH = "ab" * 32


def release(round=1, *, z=1.0, clip=1.0, sampling="full", rate=None, cohort=10, population=10,
            adjacency="add_remove", planned=None, survivors=None, run_id="run-1", attempt=0):
    survivors = cohort if survivors is None else survivors
    # noise sized so the shares counted for one person add up to z C (see counted_noise_shares)
    planned = counted_noise_shares(survivors, adjacency) if planned is None else planned
    return GaussianRoundEvent.from_distributed_noise(
        run_id=run_id, round=round, clip_norm=clip, planned_noise_multiplier=z,
        planned_clients=planned, survivors=survivors, sampling=sampling, sampling_rate=rate,
        cohort_size=cohort, population=population, adjacency=adjacency, model_hash=HASH,
        timestamp="2026-01-01T00:00:00.000000Z", attempt=attempt,
    )


def spec(z, sampling="full", adjacency="add_remove", **kw):
    return ReleaseSpec.plan(noise_multiplier=z, sampling=sampling, adjacency=adjacency, **kw)


# The amplified machinery (the value for third parties who see only the model); the default
# accountant claims no amplification (test_default_claims_no_amplification).
acc = PrivacyAccountant(claim_amplification=True)


# --- published / exact values ---------------------------------------------------------------
def test_single_gaussian_add_remove_z1_is_4_377():
    r = acc.epsilon([release(z=1.0)], DELTA)
    assert r.epsilon == pytest.approx(4.377, abs=1e-3)
    assert r.epsilon_no_amplification == pytest.approx(r.epsilon)
    assert r.epsilon_rdp_bound >= r.epsilon  # an RDP bound may be higher, never lower
    assert r.accountant_version.startswith("dp-accounting 0.6")


def test_single_gaussian_replace_one_z1_is_9_997_not_flowers_4_73():
    r = acc.epsilon([release(z=1.0, adjacency="replace_one")], DELTA)
    assert r.epsilon == pytest.approx(9.997, abs=1e-3)
    assert r.epsilon_rdp_bound >= r.epsilon
    # replace-one is sensitivity 2C: identical to add/remove at half the noise multiplier
    half = acc.epsilon([release(z=0.5)], DELTA)
    assert r.epsilon == pytest.approx(half.epsilon, rel=1e-9)


def test_exact_gaussian_agrees_with_dp_accounting_pld_and_is_not_above_it():
    from dp_accounting import NeighboringRelation as NR, dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    for z, rel, adj in [(1.0, NR.ADD_OR_REMOVE_ONE, "add_remove"), (1.0, NR.REPLACE_ONE, "replace_one"),
                        (2.5, NR.ADD_OR_REMOVE_ONE, "add_remove")]:
        pld = PLDAccountant(rel, value_discretization_interval=1e-3)
        pld.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), 2))
        ours = acc.epsilon_for_rounds(spec(z, adjacency=adj), 2, DELTA).epsilon
        assert ours == pytest.approx(pld.get_epsilon(DELTA), abs=5e-3)
        assert ours <= pld.get_epsilon(DELTA) + 1e-6  # pessimistic PLD is an upper bound of the exact value


def test_abadi_2016_setting():
    r = acc.epsilon_for_rounds(spec(4.0, "poisson", sampling_rate=0.01), 10_000, DELTA)
    assert r.epsilon == pytest.approx(0.95, abs=0.01)
    # the moments accountant gave 1.26; dp_accounting's RDP (more orders) is tighter, never below PLD
    assert r.epsilon <= r.epsilon_rdp_bound <= 1.26
    assert r.epsilon_no_amplification > 100  # a server that knows the cohort gets no amplification


# --- sampling ---------------------------------------------------------------------------------
def test_poisson_amplifies_full_does_not():
    full = acc.epsilon_for_rounds(spec(1.0), 10, DELTA)
    poisson = acc.epsilon_for_rounds(spec(1.0, "poisson", sampling_rate=0.1), 10, DELTA)
    assert poisson.epsilon < 0.5 * full.epsilon
    assert poisson.epsilon_no_amplification == pytest.approx(full.epsilon)
    assert poisson.epsilon_rdp_bound >= poisson.epsilon


def test_poisson_rate_from_cohort_over_population():
    a = spec(1.0, "poisson", cohort_size=20, population=200)
    b = spec(1.0, "poisson", sampling_rate=0.1)
    assert a == b


def test_fixed_size_sampling_under_add_remove_is_refused_not_guessed():
    """K of N is accounted under replace-one (tests/test_fixed_size_sampling.py); under
    add/remove it is not defined (the population size is public) and is refused."""
    s = spec(1.0, "fixed", adjacency="add_remove", cohort_size=10, population=100)
    assert not acc.supports(s)
    with pytest.raises(UnsupportedEventError, match="fixed-size sampling"):
        acc.epsilon_for_rounds(s, 5, DELTA)
    ev = release(sampling="fixed", cohort=10, population=100, adjacency="add_remove")
    with pytest.raises(UnsupportedEventError, match="round 1"):
        acc.epsilon([ev], DELTA)
    assert acc.supports(spec(1.0, "fixed", adjacency="replace_one", cohort_size=10, population=100))


def test_fixed_size_without_amplification_is_accounted_as_known_cohort():
    no_amp = PrivacyAccountant(claim_amplification=False)
    s = spec(1.0, "fixed", adjacency="replace_one", cohort_size=10, population=100)
    r = no_amp.epsilon_for_rounds(s, 5, DELTA)
    full = acc.epsilon_for_rounds(spec(1.0, adjacency="replace_one"), 5, DELTA)
    assert r.epsilon == pytest.approx(full.epsilon, rel=1e-12)
    assert r.amplification_claimed is False
    assert r.epsilon_rdp_bound >= r.epsilon


def test_fixed_size_of_whole_population_is_full_participation():
    assert spec(1.0, "fixed", cohort_size=10, population=10) == spec(1.0, "full")


def test_poisson_replace_one_has_pld_but_no_rdp_bound():
    r = acc.epsilon_for_rounds(spec(1.0, "poisson", "replace_one", sampling_rate=0.1), 10, DELTA)
    add = acc.epsilon_for_rounds(spec(1.0, "poisson", sampling_rate=0.1), 10, DELTA)
    assert r.epsilon > add.epsilon
    assert r.epsilon_rdp_bound is None
    assert any("no RDP bound" in n for n in r.notes)


def test_poisson_replace_one_is_max_over_candidate_pairs():
    from dp_accounting import NeighboringRelation as NR, dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    for q in (0.05, 0.5):
        ours = acc.epsilon_for_rounds(spec(1.5, "poisson", "replace_one", sampling_rate=q), 20, DELTA).epsilon
        for rel in (NR.REPLACE_ONE, NR.ADD_OR_REMOVE_ONE):
            pld = PLDAccountant(rel, value_discretization_interval=1e-3)
            pld.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.5)), 20))
            assert ours >= pld.get_epsilon(DELTA) - 1e-9


def test_mixed_adjacency_refused():
    with pytest.raises(UnsupportedEventError, match="adjacency"):
        acc.epsilon([release(1), release(2, adjacency="replace_one")], DELTA)


# --- dropouts and noise floor -------------------------------------------------------------
def test_dropouts_reduce_noise_and_raise_epsilon():
    planned = release(z=1.2, planned=9, survivors=10)  # 9 counted shares of 10 (add/remove)
    dropped = release(z=1.2, planned=9, survivors=7)   # 6 counted shares left
    assert planned.noise_multiplier == pytest.approx(1.2)
    assert dropped.noise_multiplier == pytest.approx(1.2 * math.sqrt(6 / 9))
    assert dropped.noise_std_total < planned.noise_std_total
    e_planned = acc.epsilon([planned] * 3, DELTA).epsilon
    e_dropped = acc.epsilon([planned, dropped, planned], DELTA).epsilon
    assert e_dropped > e_planned
    # and equals the exact composition at the effective multipliers
    expected = acc.epsilon([spec(1.2), spec(1.2 * math.sqrt(6 / 9)), spec(1.2)], DELTA).epsilon
    assert e_dropped == pytest.approx(expected, rel=1e-12)


def test_noise_multiplier_below_half_refused():
    with pytest.raises(NoiseTooSmallError) as info:
        acc.epsilon([release(z=0.49)], DELTA)
    assert info.value.minimum == MIN_NOISE_MULTIPLIER
    assert not acc.supports(spec(0.49))
    assert acc.supports(spec(0.5))
    # dropouts can push a planned 0.55 below the floor: the release is refused, never guessed
    with pytest.raises(NoiseTooSmallError):
        acc.epsilon([release(z=0.55, planned=10, survivors=6)], DELTA)


# --- composition ------------------------------------------------------------------------------
def test_identical_rounds_grouped_order_independent():
    a = release(1, z=1.5, sampling="poisson", rate=0.2, cohort=3, population=50)
    b = release(2, z=2.0, sampling="poisson", rate=0.2, cohort=12, population=50)
    r1 = acc.epsilon([a, a, b, a, b], DELTA)
    r2 = acc.epsilon([b, b, a, a, a], DELTA)
    assert r1.epsilon == r2.epsilon
    assert r1.releases == 5 and len(r1.groups) == 2  # realised Poisson cohort size does not split groups
    assert acc.epsilon([a] * 4, DELTA).epsilon == acc.epsilon_for_rounds(a.spec(), 4, DELTA).epsilon


def test_epsilon_curve_monotone_and_ends_at_total():
    events = [release(i, z=2.0, sampling="poisson", rate=0.3, cohort=3, population=10) for i in range(1, 13)]
    curve = acc.epsilon_curve(events, DELTA, max_points=5)
    assert curve[-1]["releases"] == 12 and curve[-1]["round"] == 12
    assert curve[-1]["epsilon"] == acc.epsilon(events, DELTA).epsilon
    eps = [p["epsilon"] for p in curve]
    assert eps == sorted(eps) and len(curve) <= 6


# --- events -----------------------------------------------------------------------------------
def test_events_round_trip_through_json():
    events = [
        release(3, z=1.1, sampling="poisson", rate=0.25, cohort=4, population=16, planned=5, survivors=3),
        BudgetRefusalEvent(run_id="r", round=4, scope="run", spent_epsilon=1.0, projected_epsilon=1.2,
                           budget_epsilon=1.1, delta=1e-5),
        AuditEvent(actor="operator:alice", action="run.start", target="run-1", details={"rounds": 5}),
        ReportIssuedEvent(run_id="run-1", report_sha256="cd" * 32),
    ]
    for ev in events:
        back = event_from_dict(json.loads(json.dumps(ev.to_dict())))
        assert back == ev and type(back) is type(ev)


def test_unknown_schema_version_is_precise():
    d = release().to_dict()
    d["schema_version"] = 2
    with pytest.raises(UnknownSchemaVersionError, match="schema_version 2") as info:
        event_from_dict(d)
    assert info.value.found == 2 and info.value.supported == (1,)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sampling": "bernoulli"}, "sampling"),
        ({"adjacency": "swap"}, "adjacency"),
        ({"noise_multiplier": 2.0}, "noise_multiplier"),  # not noise_std_total / clip_norm
        ({"survivors": 11}, "survivors"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"round": True}, "round"),
        ({"mechanism": "laplace"}, "mechanism"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"model_hash": "XYZ"}, "model_hash"),
        ({"run_id": "../etc"}, "run_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_event_fields_named(change, field):
    d = release().to_dict()
    d.update(change)
    with pytest.raises(EventValidationError) as info:
        event_from_dict(d)
    assert info.value.field == field


def test_missing_field_named():
    d = release().to_dict()
    del d["clip_norm"]
    with pytest.raises(EventValidationError, match="missing field.*clip_norm"):
        event_from_dict(d)


def test_add_remove_never_counts_the_persons_own_noise_share():
    """Distributed noise under add/remove: the neighbouring dataset lacks the person and their
    device's share, so only the other survivors' shares protect them; replace-one counts all."""
    ar = release(z=1.0, planned=4, survivors=4, adjacency="add_remove")
    ro = release(z=1.0, planned=4, survivors=4, adjacency="replace_one")
    assert ar.noise_multiplier == pytest.approx(math.sqrt(3 / 4))
    assert ro.noise_multiplier == pytest.approx(1.0)
    assert counted_noise_shares(4, "add_remove") == 3 and counted_noise_shares(4, "replace_one") == 4
    # the reviewer's table: 4 survivors with shares sized for 4 -> epsilon 5.175 (not 4.377)
    assert acc.epsilon([ar], DELTA).epsilon == pytest.approx(5.175, abs=2e-3)
    with pytest.raises(Exception, match="at least 2 survivors"):
        release(z=1.0, planned=1, survivors=1, adjacency="add_remove")


def test_default_claims_no_amplification():
    """The headline accountant holds against the server: Poisson sampling gives the same epsilon
    as full participation, and the amplified value is only asked for explicitly."""
    default = PrivacyAccountant()
    poisson = spec(1.0, "poisson", sampling_rate=0.1)
    r = default.epsilon_for_rounds(poisson, 10, DELTA)
    assert r.amplification_claimed is False
    assert r.epsilon == pytest.approx(default.epsilon_for_rounds(spec(1.0), 10, DELTA).epsilon, rel=1e-12)
    amplified = default.epsilon_amplified([poisson] * 10, DELTA)
    assert amplified == acc.epsilon_for_rounds(poisson, 10, DELTA).epsilon and amplified < 0.5 * r.epsilon
    assert default.epsilon_amplified([spec(1.0, "fixed", adjacency="add_remove", cohort_size=10, population=100)], DELTA) is None
