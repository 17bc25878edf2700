"""Calibration: the smallest noise multiplier whose epsilon meets a target (the inverse problem).

A bracketed root search on the accountant itself (PLD, the same numbers that will be
reported): the epsilon against the party that samples (no amplification by sampling claimed),
so the target is met against the server too. The invariant is "epsilon(hi) <= target < epsilon(lo)"; the result is ``hi``, so it
never exceeds the target and is within ``rel_tolerance`` of the smallest such multiplier.

Speed: epsilon(z) is smooth and monotone, so the search interpolates in log-log space
(Illinois variant of regula falsi, which keeps the bracket) and starts from the cheap RDP
answer (RDP bounds the PLD value from above, so the RDP-calibrated multiplier is already
feasible). Small multipliers are the expensive ones for a PLD, and are rarely visited.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from restwise.privacy.accountant import MIN_NOISE_MULTIPLIER, AccountingResult, PrivacyAccountant
from restwise.privacy.errors import CalibrationError
from restwise.privacy.events import ReleaseSpec

MAX_NOISE_MULTIPLIER = 1e4


@dataclass(frozen=True)
class CalibrationResult:
    noise_multiplier: float
    target_epsilon: float
    delta: float
    rounds: int
    result: AccountingResult  # the accounting at the returned multiplier: result.epsilon <= target
    evaluations: int

    def to_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "rounds": self.rounds,
            "evaluations": self.evaluations,
            "accounting": self.result.to_dict(),
        }


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    sampling: str,
    adjacency: str,
    sampling_rate: float | None = None,
    cohort_size: int | None = None,
    population: int | None = None,
    accountant: PrivacyAccountant | None = None,
    rel_tolerance: float = 1e-3,
) -> CalibrationResult:
    """Smallest noise multiplier z (>= 0.5) with epsilon(z) <= target_epsilon after ``rounds``
    releases, to within ``rel_tolerance`` (relative).

    Raises CalibrationError when no multiplier up to 1e4 reaches the target, and
    UnsupportedEventError for configurations the accountant refuses (e.g. fixed-size sampling
    under add/remove).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (0 < target_epsilon < math.inf):
        raise CalibrationError("target_epsilon must be a positive finite number")
    if not (0 < rel_tolerance < 0.1):
        raise CalibrationError("rel_tolerance must be in (0, 0.1)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise CalibrationError("rounds must be a positive integer")
    # The target is met against the party that samples: only the caller's PLD parameters are
    # taken from ``accountant``, never a claim of amplification.
    accountant = PrivacyAccountant(pld=accountant.pld if accountant is not None else None)
    spec = ReleaseSpec.plan(
        noise_multiplier=1.0,
        sampling=sampling,
        adjacency=adjacency,
        sampling_rate=sampling_rate,
        cohort_size=cohort_size,
        population=population,
    )
    accountant.epsilon_for_rounds(spec, 1, delta)  # refuses unsupported configurations early
    evaluations = 0
    cache: dict[float, float] = {}

    def eps(z: float) -> float:
        nonlocal evaluations
        if z not in cache:
            evaluations += 1
            cache[z] = accountant.epsilon_value([spec.with_noise_multiplier(z)] * rounds, delta)
        return cache[z]

    # 1. A feasible start: where the RDP bound meets the target (cheap), else 1.0.
    start = _rdp_start(accountant, spec, rounds, delta, target_epsilon)
    hi = max(MIN_NOISE_MULTIPLIER, start)
    if eps(hi) <= target_epsilon:
        lo = hi
        while eps(lo) <= target_epsilon:
            if lo <= MIN_NOISE_MULTIPLIER:
                return _done(accountant, spec, MIN_NOISE_MULTIPLIER, target_epsilon, delta, rounds, evaluations)
            hi, lo = lo, max(MIN_NOISE_MULTIPLIER, lo * 0.8)
    else:
        lo = hi
        while eps(hi) > target_epsilon:
            lo, hi = hi, hi * 2.0
            if hi > MAX_NOISE_MULTIPLIER:
                raise CalibrationError(
                    f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon <= {target_epsilon:g} "
                    f"at delta={delta:g} over {rounds} rounds"
                )
    # 2. Shrink the bracket (Illinois regula falsi in log-log space, with bisection fallback).
    log_t = math.log(target_epsilon)
    f_lo, f_hi = math.log(eps(lo)) - log_t, math.log(eps(hi)) - log_t
    side = 0
    while hi - lo > rel_tolerance * hi:
        a, b = math.log(lo), math.log(hi)
        x = b - f_hi * (b - a) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (a + b)
        margin = 0.05 * (b - a)
        x = min(max(x, a + margin), b - margin)
        z = math.exp(x)
        f = math.log(eps(z)) - log_t
        if f <= 0:
            hi, f_hi = z, f
            if side == 1:
                f_lo *= 0.5
            side = 1
        else:
            lo, f_lo = z, f
            if side == -1:
                f_hi *= 0.5
            side = -1
    return _done(accountant, spec, hi, target_epsilon, delta, rounds, evaluations)


def _rdp_start(accountant: PrivacyAccountant, spec: ReleaseSpec, rounds: int, delta: float, target: float) -> float:
    """The multiplier at which the RDP bound reaches the target (RDP >= PLD, so PLD is feasible
    there), found by a cheap bisection; 1.0 when there is no RDP bound for this configuration."""
    if accountant.rdp_epsilon_for_rounds(spec, 1, delta, fast=True) is None:
        return 1.0
    lo, hi = MIN_NOISE_MULTIPLIER, 1.0
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # dp_accounting warns about RDP orders it skips at tiny noise
    try:
        while (accountant.rdp_epsilon_for_rounds(spec.with_noise_multiplier(hi), rounds, delta, fast=True) or math.inf) > target:
            lo, hi = hi, hi * 2
            if hi > MAX_NOISE_MULTIPLIER:
                return MAX_NOISE_MULTIPLIER
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if (accountant.rdp_epsilon_for_rounds(spec.with_noise_multiplier(mid), rounds, delta, fast=True) or math.inf) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 2e-2 * hi:  # a starting point only: coarse is enough
                break
    finally:
        absl.setLevel(level)
    return hi


def _done(accountant, spec, z, target, delta, rounds, evaluations) -> CalibrationResult:
    result = accountant.epsilon_for_rounds(spec.with_noise_multiplier(z), rounds, delta)
    if result.epsilon > target:  # cannot happen: every accepted z was checked the same way
        raise CalibrationError("calibration produced a multiplier above the target; refusing")
    return CalibrationResult(float(z), float(target), float(delta), rounds, result, evaluations)
