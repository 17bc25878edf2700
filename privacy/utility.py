"""Will a DP release help? Expected noise-to-signal and a verdict, from plain numbers.

The planner behind ``restwise privacy plan`` and the run-creation check: given what an
architecture shares (its *release shape*, supplied by the model side as plain numbers and
arrays: privacy/ never imports models/), a cohort size, epsilon and delta, it calibrates the
noise with the project's accountant (:mod:`restwise.privacy.calibration`) and says what the
noise will do. Two mechanisms:

**One release of bounded sufficient statistics** (:class:`StatisticsReleaseShape`, the linear
head). One Gaussian release, full participation, add/remove, sensitivity Delta; distributed
noise shares sized for the smallest releasable cohort ``t_min``, so with all n devices present
the sum carries noise std ``sigma = z Delta sqrt(n / (t_min - 1))`` per number.

* noise-to-signal = ``sigma sqrt(L) / (n ||s||)``: the norm of the noise on the L released
  numbers over the norm of the expected sum (``||s||``: the norm of one person's mean
  statistics vector, estimated on public data and stored with the prior);
* expected benefit over the prior, in the model's own Bayesian terms (the solve of
  ``linear_head.solve_with_prior``): with the prior ``w ~ N(w0, T)`` and the release's data
  precision ``(n A)^2 / v`` (A: the mean per-person second moment of public data,
  ``v = n person_variance + (B sigma)^2 + sigma^2 ||w0||^2``), the expected excess risk of the
  weights, ``tr(A Sigma)``, falls from ``tr(A T)`` (prior) to ``tr(A (T^-1 + (nA)^2/v)^-1)``.
  The release is expected to beat the prior when it removes at least ``MIN_USEFUL_REDUCTION``
  (5%) of the prior's excess risk. It never makes the model worse than the prior in
  expectation: the solve shrinks toward the prior, so a small cohort is *allowed* (it just
  stays close to the prior); the verdict says so.

**DP-FedAvg of a network** (:class:`FedAvgShape`). ``rounds`` releases of the clipped sum
(clip C), Poisson rate q (1 = everyone), noise multiplier z calibrated for all rounds. The
noise on the averaged update is ``z C / (q n)`` per coordinate, a vector of norm
``z C sqrt(d) / (q n)``, against an averaged update of norm at most C (``signal_fraction`` x C;
1 is the most favourable assumption for the network). Noise-to-signal
``= z sqrt(d) / (signal_fraction q n)``. Expected to beat the prior only if it is at most
``MAX_FEDAVG_NOISE_TO_SIGNAL`` (1: the noise no larger than the best-case update in every
round). Measured on SoccerMon: 5.4 at n = 47, epsilon 8 gave MAE 1.171 against 0.849 for the
last answer (docs/evaluation.md). Below that, a DP run is refused unless forced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.privacy.errors import CalibrationError

MIN_USEFUL_REDUCTION = 0.05
MAX_FEDAVG_NOISE_TO_SIGNAL = 1.0
DEFAULT_MAX_DROPOUT_FRACTION = 0.3  # secure aggregation's default (SecAggConfig)


@dataclass(frozen=True)
class StatisticsReleaseShape:
    """What an architecture that releases sufficient statistics once shares, as numbers."""

    name: str
    statistics_length: int  # L numbers per device
    sensitivity: float  # Delta: L2 bound of one device's vector (add/remove)
    target_bound: float  # B: the vector holds b / B
    mean_second_moment: np.ndarray  # A: mean per-person X'X/m on public data (d x d)
    prior_tau2: np.ndarray  # T: prior variance of each weight
    prior_weights_norm2: float  # ||w0||^2
    person_variance: float
    mean_statistics_norm: float  # ||s||: one person's mean statistics vector, public data


@dataclass(frozen=True)
class FedAvgShape:
    """What DP-FedAvg of a network shares, as numbers."""

    name: str
    shared_length: int  # d
    clip_norm: float  # C
    rounds: int
    sampling_rate: float = 1.0  # q; 1 = full participation
    signal_fraction: float = 1.0  # ||averaged clipped update|| / C assumed (1 = best case)


@dataclass(frozen=True)
class UtilityVerdict:
    """The planner's answer. ``allowed``: whether run creation may proceed (a refused plan
    can be forced: ``forced``)."""

    model: str
    mechanism: str  # "statistics" or "fedavg"
    cohort: int
    epsilon: float
    delta: float
    noise_multiplier: float
    noise_std: float  # per released number (statistics) / per coordinate of the average (fedavg)
    noise_to_signal: float
    expected_to_beat_prior: bool
    refused: bool  # refused unless forced
    forced: bool
    message: str
    numbers: dict = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return not self.refused or self.forced

    def to_dict(self) -> dict:
        return {**asdict(self), "allowed": self.allowed}


def _check(cohort: int, epsilon: float, delta: float) -> None:
    if isinstance(cohort, bool) or not isinstance(cohort, int) or cohort < 2:
        raise ValueError("cohort must be an integer >= 2")
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon < math.inf):
        raise ValueError("epsilon must be a positive finite number")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError("delta must be in (0, 1)")


def min_survivors(cohort: int, max_dropout_fraction: float = DEFAULT_MAX_DROPOUT_FRACTION) -> int:
    """The smallest cohort a round can release with (secure aggregation's rule)."""
    return cohort - math.floor(max_dropout_fraction * cohort)


def statistics_release_noise(epsilon: float, delta: float, cohort: int, sensitivity: float,
                             max_dropout_fraction: float = DEFAULT_MAX_DROPOUT_FRACTION, *,
                             noise_multiplier: float | None = None,
                             distributed: bool = True) -> tuple[float, float]:
    """(z, std of the noise actually in the sum with all ``cohort`` devices present). z is
    calibrated for one release at ``epsilon`` unless the run's own ``noise_multiplier`` is
    given; central noise is exactly z Delta."""
    z = noise_multiplier if noise_multiplier is not None else calibrate_noise_multiplier(
        epsilon, delta, 1, sampling="full", adjacency="add_remove").noise_multiplier
    if not distributed:
        return z, z * sensitivity
    counted_min = min_survivors(cohort, max_dropout_fraction) - 1  # add/remove: own share not counted
    if counted_min < 1:
        raise ValueError("distributed noise needs at least 2 surviving devices")
    return z, z * sensitivity * math.sqrt(cohort / counted_min)


def statistics_release_benefit(shape: StatisticsReleaseShape, cohort: int, noise_std: float) -> dict:
    """Expected excess risk of the weights under the prior alone and after the release."""
    A = np.asarray(shape.mean_second_moment, dtype=np.float64)
    T = np.asarray(shape.prior_tau2, dtype=np.float64)
    v = (cohort * shape.person_variance + (shape.target_bound * noise_std) ** 2
         + noise_std**2 * shape.prior_weights_norm2)
    nA = cohort * A
    posterior = np.linalg.inv(np.diag(1.0 / T) + nA.T @ nA / max(v, 1e-300))
    prior_risk = float(np.trace(A @ np.diag(T)))
    post_risk = float(np.trace(A @ posterior))
    return {"prior_risk": prior_risk, "posterior_risk": post_risk,
            "reduction": 1.0 - post_risk / prior_risk if prior_risk > 0 else 0.0, "v": v}


def assess_statistics_release(shape: StatisticsReleaseShape, cohort: int, epsilon: float, delta: float = 1e-5,
                              *, max_dropout_fraction: float = DEFAULT_MAX_DROPOUT_FRACTION,
                              noise_multiplier: float | None = None, distributed: bool = True,
                              force: bool = False) -> UtilityVerdict:
    _check(cohort, epsilon, delta)
    z, sigma = statistics_release_noise(epsilon, delta, cohort, shape.sensitivity, max_dropout_fraction,
                                        noise_multiplier=noise_multiplier, distributed=distributed)
    nsr = sigma * math.sqrt(shape.statistics_length) / (cohort * max(shape.mean_statistics_norm, 1e-300))
    benefit = statistics_release_benefit(shape, cohort, sigma)
    beats = benefit["reduction"] >= MIN_USEFUL_REDUCTION
    outcome = ("expected to improve on the public prior" if beats else
               "expected to stay close to the public prior (the solve shrinks toward it; never worse "
               "in expectation), so the release adds little")
    message = (f"{shape.name}: one statistics release from {cohort} devices at epsilon {epsilon:g} "
               f"(delta {delta:g}): noise std {sigma:.3g} on each of {shape.statistics_length} numbers "
               f"(z {z:.3g}, sensitivity {shape.sensitivity:.3g}), noise-to-signal {nsr:.2f}. It removes "
               f"{100 * benefit['reduction']:.1f}% of the prior's expected weight error (at least "
               f"{100 * MIN_USEFUL_REDUCTION:.0f}% counts as beating it): {outcome}.")
    return UtilityVerdict(shape.name, "statistics", cohort, float(epsilon), float(delta), z, sigma, nsr,
                          beats, False, bool(force), message,
                          {"statistics_length": shape.statistics_length, "sensitivity": shape.sensitivity,
                           "min_survivors": min_survivors(cohort, max_dropout_fraction), **benefit})


def assess_fedavg(shape: FedAvgShape, cohort: int, epsilon: float, delta: float = 1e-5, *,
                  noise_multiplier: float | None = None, force: bool = False) -> UtilityVerdict:
    """``noise_multiplier``: the run's own z (run creation); else calibrated for ``rounds``
    releases at ``epsilon`` with Poisson rate ``sampling_rate`` (``restwise privacy plan``)."""
    _check(cohort, epsilon, delta)
    q = float(shape.sampling_rate)
    if not 0 < q <= 1:
        raise ValueError("sampling_rate must be in (0, 1]")
    sampling = "full" if q == 1.0 else "poisson"
    if noise_multiplier is not None:
        z = float(noise_multiplier)
    else:
        try:
            z = calibrate_noise_multiplier(epsilon, delta, int(shape.rounds), sampling=sampling,
                                           adjacency="add_remove",
                                           sampling_rate=None if sampling == "full" else q).noise_multiplier
        except CalibrationError as exc:
            raise ValueError(str(exc)) from None
    expected = q * cohort
    noise_avg = z * shape.clip_norm / expected
    nsr = z * math.sqrt(shape.shared_length) / (shape.signal_fraction * expected)
    beats = nsr <= MAX_FEDAVG_NOISE_TO_SIGNAL
    needed = math.ceil(z * math.sqrt(shape.shared_length) / (shape.signal_fraction * q * MAX_FEDAVG_NOISE_TO_SIGNAL))
    refused = not beats
    message = (f"{shape.name}: DP-FedAvg of {shape.shared_length:,} shared numbers, {shape.rounds} rounds, "
               f"{expected:g} devices per round, epsilon {epsilon:g} (delta {delta:g}): z {z:.3g}, noise on the "
               f"averaged update {noise_avg:.3g} per number (norm {noise_avg * math.sqrt(shape.shared_length):.3g}) "
               f"against an update of norm at most {shape.signal_fraction * shape.clip_norm:.3g}: "
               f"noise-to-signal {nsr:.2f} per round. "
               + ("Expected to learn beyond the prior." if beats else
                  f"The noise swamps the update: expected to be worse than the public prior / the last answer "
                  f"(on SoccerMon, 5.4 gave MAE 1.171 vs 0.849). It needs about {needed:,} devices per round "
                  f"at this epsilon, or a model that shares far fewer numbers (the linear head)."))
    if refused and force:
        message += " Forced by the operator."
    return UtilityVerdict(shape.name, "fedavg", cohort, float(epsilon), float(delta), z, noise_avg, nsr, beats,
                          refused, bool(force), message,
                          {"shared_length": shape.shared_length, "rounds": shape.rounds, "clip_norm": shape.clip_norm,
                           "sampling_rate": q, "signal_fraction": shape.signal_fraction,
                           "devices_needed": needed})


MECHANISMS = {"statistics": StatisticsReleaseShape, "fedavg": FedAvgShape}


def assess_release(shape: Mapping[str, Any], cohort: int, epsilon: float, delta: float = 1e-5, *,
                   noise_multiplier: float | None = None,
                   max_dropout_fraction: float = DEFAULT_MAX_DROPOUT_FRACTION, distributed: bool = True,
                   force: bool = False) -> UtilityVerdict:
    """The verdict for an architecture's release shape (``Architecture.release_shape``: plain
    numbers, ``mechanism`` "statistics" or "fedavg"): the one check behind both ``restwise
    privacy plan`` and run creation."""
    fields_ = dict(shape)
    kind = fields_.pop("mechanism", None)
    if kind not in MECHANISMS:
        raise ValueError(f"unknown release mechanism {kind!r}; known: {', '.join(MECHANISMS)}")
    try:
        typed = MECHANISMS[kind](**fields_)
    except TypeError as exc:
        raise ValueError(f"a {kind} release shape is malformed ({exc})") from None
    if kind == "statistics":
        return assess_statistics_release(typed, cohort, epsilon, delta, max_dropout_fraction=max_dropout_fraction,
                                         noise_multiplier=noise_multiplier, distributed=distributed, force=force)
    return assess_fedavg(typed, cohort, epsilon, delta, noise_multiplier=noise_multiplier, force=force)


__all__ = ["StatisticsReleaseShape", "FedAvgShape", "UtilityVerdict", "assess_statistics_release", "assess_release",
           "assess_fedavg", "statistics_release_noise", "statistics_release_benefit", "min_survivors",
           "MIN_USEFUL_REDUCTION", "MAX_FEDAVG_NOISE_TO_SIGNAL"]
