"""Calibration round-trips: the returned noise meets the target and is (nearly) the smallest."""

from __future__ import annotations

import pytest

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.privacy.errors import CalibrationError, UnsupportedEventError
from restwise.privacy.events import ReleaseSpec

DELTA = 1e-5


@pytest.mark.parametrize(
    "target, rounds, kw",
    [
        (4.377, 1, dict(sampling="full", adjacency="add_remove")),
        (9.997, 1, dict(sampling="full", adjacency="replace_one")),
        (1.0, 200, dict(sampling="poisson", sampling_rate=0.05, adjacency="add_remove")),
        (2.0, 50, dict(sampling="poisson", cohort_size=10, population=100, adjacency="replace_one")),
    ],
)
def test_round_trip(target, rounds, kw):
    res = calibrate_noise_multiplier(target, DELTA, rounds, **kw)
    acc = PrivacyAccountant()
    spec = ReleaseSpec.plan(noise_multiplier=res.noise_multiplier, **kw)
    eps = acc.epsilon_for_rounds(spec, rounds, DELTA).epsilon
    assert eps <= target  # never above the target
    assert eps == res.result.epsilon
    smaller = acc.epsilon_for_rounds(spec.with_noise_multiplier(res.noise_multiplier * (1 - 2e-3)), rounds, DELTA)
    assert smaller.epsilon > target  # and (within tolerance) the smallest such noise


def test_known_inverse_single_gaussian():
    assert calibrate_noise_multiplier(4.3772, DELTA, 1, sampling="full", adjacency="add_remove").noise_multiplier == pytest.approx(1.0, rel=2e-3)
    assert calibrate_noise_multiplier(9.9973, DELTA, 1, sampling="full", adjacency="replace_one").noise_multiplier == pytest.approx(1.0, rel=2e-3)


def test_large_target_returns_minimum_supported_noise():
    res = calibrate_noise_multiplier(50.0, DELTA, 1, sampling="full", adjacency="add_remove")
    assert res.noise_multiplier == 0.5


def test_unreachable_target():
    with pytest.raises(CalibrationError, match="no noise multiplier"):
        calibrate_noise_multiplier(1e-9, DELTA, 1000, sampling="full", adjacency="add_remove")


def test_fixed_size_sampling_calibrated_under_replace_one_and_add_remove_without_amplification():
    res = calibrate_noise_multiplier(3.0, DELTA, 10, sampling="fixed", cohort_size=5, population=50, adjacency="replace_one")
    assert res.result.epsilon <= 3.0 and not res.result.amplification_claimed
    spec = ReleaseSpec.plan(noise_multiplier=res.noise_multiplier, sampling="fixed", cohort_size=5, population=50, adjacency="replace_one")
    assert PrivacyAccountant().epsilon_for_rounds(spec, 10, DELTA).epsilon <= 3.0
    # Against the server no amplification is claimed, so K of N under add/remove is a known
    # cohort's Gaussian: calibrated like full participation; only the amplified value is undefined.
    add_remove = calibrate_noise_multiplier(1.0, DELTA, 10, sampling="fixed", cohort_size=5, population=50, adjacency="add_remove")
    full = calibrate_noise_multiplier(1.0, DELTA, 10, sampling="full", adjacency="add_remove")
    assert add_remove.noise_multiplier == full.noise_multiplier
    with pytest.raises(UnsupportedEventError):
        PrivacyAccountant(claim_amplification=True).epsilon_for_rounds(ReleaseSpec.plan(
            noise_multiplier=1.0, sampling="fixed", cohort_size=5, population=50, adjacency="add_remove"), 10, DELTA)


def test_calibration_meets_the_target_against_the_sampler():
    """The noise is calibrated so that the target holds against the server (no amplification),
    whatever accountant is passed: much more noise than an amplified calibration would pick."""
    kw = dict(sampling="poisson", sampling_rate=0.1, adjacency="add_remove")
    res = calibrate_noise_multiplier(3.0, DELTA, 100, **kw)
    claiming = calibrate_noise_multiplier(3.0, DELTA, 100, accountant=PrivacyAccountant(claim_amplification=True), **kw)
    assert claiming.noise_multiplier == res.noise_multiplier
    spec = ReleaseSpec.plan(noise_multiplier=res.noise_multiplier, **kw)
    assert PrivacyAccountant().epsilon_for_rounds(spec, 100, DELTA).epsilon_no_amplification <= 3.0
    full = calibrate_noise_multiplier(3.0, DELTA, 100, sampling="full", adjacency="add_remove")
    assert res.noise_multiplier == pytest.approx(full.noise_multiplier, rel=2e-3)
    # an amplified target would have needed far less noise: that is the claim no longer made
    amplified = PrivacyAccountant(claim_amplification=True).epsilon_for_rounds(spec.with_noise_multiplier(res.noise_multiplier / 2), 100, DELTA)
    assert amplified.epsilon < 3.0
