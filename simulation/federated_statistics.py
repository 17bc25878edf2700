"""Rows ``federated statistics + DP (ε=…)`` of ``restwise evaluate``: the linear head's one
differentially private release of sufficient statistics, run in-process exactly as a
deployment runs it, without the transport.

One release (one Gaussian event) per row, over every person of the cohort as one device:

1. each device fits its own scale on its **training** examples only
   (:class:`~restwise.models.linear_head.PersonalScale`: mean, scale, step, low threshold stay
   on the device), computes its bounded feature rows and targets on those examples, and its
   statistics vector (``linear_head.device_statistics``: ``d (d + 1) / 2 + d`` = 560 numbers,
   L2 norm <= sqrt 2, checked; fewer than ``MIN_EXAMPLES`` examples: it sends nothing and is
   counted as not taking part; NaN/inf: refused before anything is shared);
2. each device adds its distributed noise share N(0, (z Delta)^2 / (t_min - 1)) per
   coordinate, sized for the smallest releasable cohort t_min (secure aggregation's
   ``min_survivors`` with ``max_dropout_fraction``, as the deployed server sizes them): under
   add/remove a person's own share is not counted, so the other t_min - 1 shares protect them
   with std exactly z Delta if only t_min devices survive; with all n devices present the
   counted noise is z Delta sqrt((n - 1) / (t_min - 1)) (``privacy.dp_mods.total_noise_std``);
3. the sum is exact (secure aggregation's masks cancel; its fixed-point encoding is
   reproduced: every contribution is rounded to 2^-20 as ``SecAggConfig.frac_bits`` does);
4. the release is one ``GaussianRoundEvent`` (sensitivity Delta as the clip norm, the
   counted noise std, full participation, add/remove) and its epsilon is the project's
   accountant's (``privacy.accountant``); z is planned by the release planner
   (``privacy.release.plan_release``) for the row's target epsilon at delta = 1e-5 and one
   release, the shares sized by ``privacy.release.dp_parameters``, the event built by
   ``privacy.release.release_event`` - the functions the deployed release workflow runs;
5. the server unpacks the noisy sum, projects A onto the PSD cone and solves the ridge system
   shrunk toward the prior with the *actual* noise std of the sum (all n shares)
   (``linear_head.solve_with_prior``), once per prior group (cross-fitting: each person is
   scored with the prior that does not contain them);
6. each device predicts with the released weights on its test inputs.

Nothing here is tuned: the constants are the linear head's and the prior's (public data).
Noise comes from a seeded generator so the table is reproducible; devices draw from OS
entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from restwise.models.evaluation import EvaluationError, PersonSplit
from restwise.models.linear_head import (
    SENSITIVITY,
    LinearHead,
    NotEnoughDataError,
    PersonalScale,
    head_inputs,
    solve_with_prior,
    target_delta,
    unpack_statistics,
)
from restwise.models.linear_head import device_statistics as linear_head_statistics
from restwise.models.prior import PriorAssignment, check_history, predict_split
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.events import GaussianRoundEvent, counted_noise_shares
from restwise.privacy.release import (
    ReleasePolicy,
    dp_parameters,
    plan_release,
    release_event,
    released_noise_std,
    sum_noise_std,
)
from restwise.privacy.secagg.config import SecAggConfig

DEFAULT_DELTA = 1e-5
ADJACENCY = "add_remove"
DEFAULT_EPSILONS = (1.0, 4.0, 8.0)
MAX_DROPOUT_FRACTION = SecAggConfig().max_dropout_fraction  # the deployed default (0.3)
FRAC_BITS = SecAggConfig().frac_bits


def device_statistics(s: PersonSplit) -> np.ndarray:
    """One device's shared vector, from its training examples only."""
    personal = PersonalScale.fit(s.train.y, low_threshold=s.low_threshold)
    inputs = head_inputs(s.train.X, s.train.history, personal)
    return linear_head_statistics(inputs.x, target_delta(s.train.y, inputs.anchor, personal))


def quantise(vector: np.ndarray) -> np.ndarray:
    """What secure aggregation's fixed-point encoding keeps of a contribution."""
    return np.round(np.asarray(vector, dtype=np.float64) * 2.0**FRAC_BITS) / 2.0**FRAC_BITS


@dataclass(frozen=True)
class StatisticsRelease:
    """The noisy sum, what is known about its noise, and its accounting."""

    noisy_sum: np.ndarray
    devices: int  # devices whose statistics are in the sum
    not_taking_part: int
    min_survivors: int
    noise_multiplier: float  # z, calibrated for the target epsilon
    share_std: float  # one device's noise std per coordinate
    actual_noise_std: float  # std of all n shares in the sum (what the solve must expect)
    event: GaussianRoundEvent  # counted noise (the person's own share excluded)
    epsilon: float

    def to_dict(self) -> dict:
        return {"devices": self.devices, "not_taking_part": self.not_taking_part,
                "min_survivors": self.min_survivors, "noise_multiplier": self.noise_multiplier,
                "sensitivity": self.event.clip_norm, "share_std": self.share_std,
                "counted_noise_std": self.event.noise_std_total, "actual_noise_std": self.actual_noise_std,
                "statistics_length": int(self.noisy_sum.shape[0]), "epsilon": self.epsilon,
                "delta": DEFAULT_DELTA, "adjacency": ADJACENCY, "sampling": "full", "releases": 1}


def release_statistics(vectors: Sequence[np.ndarray], *, target_epsilon: float, delta: float = DEFAULT_DELTA,
                       max_dropout_fraction: float = MAX_DROPOUT_FRACTION,
                       rng: np.random.Generator, not_taking_part: int = 0,
                       run_id: str = "evaluation", sensitivity: float = SENSITIVITY,
                       model_hash: str | None = None) -> StatisticsRelease:
    """One Gaussian release of the sum of ``vectors`` (each of L2 norm <= ``sensitivity``)
    with distributed noise shares, planned, sized and accounted by the deployed release
    workflow's functions (privacy.release). ``model_hash`` names the released object in the
    event (default: the linear head's zero model; the early-warning rows pass their own)."""
    n = len(vectors)
    if n < 3:
        raise EvaluationError(f"a secure statistics release needs at least 3 devices, got {n}")
    t_min = SecAggConfig(max_dropout_fraction=max_dropout_fraction, max_cohort=max(n, 3)).min_survivors(n)
    if counted_noise_shares(t_min, ADJACENCY) < 1:
        raise EvaluationError("distributed noise needs at least 2 surviving devices")
    # Every device in the one release (q = 1), add/remove, distributed noise: as a deployment.
    policy = ReleasePolicy(sensitivity=sensitivity, population=n, sampling="poisson", sampling_rate=1.0,
                           releases=1, delta=delta, target_epsilon=target_epsilon, noise="distributed")
    plan = plan_release(policy)
    params = dp_parameters(policy, plan.noise_multiplier, t_min)
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.float64))
    for v in vectors:  # what each device hands to secure aggregation: statistics + its share
        total += quantise(np.asarray(v, dtype=np.float64) + rng.normal(0.0, params.share_std, size=total.shape))
    counted_std = released_noise_std(plan, params, n)
    if model_hash is None:
        model_hash = LinearHead.zero().model_hash()  # the released object is the sum; its model follows
    event = release_event(plan, run_id=run_id, round_=1, sampled=n, survivors=n, noise_std=counted_std,
                          model_hash=model_hash)
    epsilon = PrivacyAccountant().epsilon([event], delta).epsilon
    return StatisticsRelease(total, n, not_taking_part, t_min, plan.noise_multiplier, params.share_std,
                             sum_noise_std(plan, params, n), event, float(epsilon))


def row_name(epsilon: float) -> str:
    return f"federated statistics + DP (ε={epsilon:g})"


@dataclass
class OneReleaseRow:
    """What an evaluation row made of one DP statistics release holds (the linear head's rows
    here, the early-warning model's in ``simulation.warning_statistics``): the prior each
    person is scored with, the target epsilon, and afterwards the accounted epsilon and the
    release's event. Subclasses name the model (``model_label``) and the noise stream
    (``noise_salt``)."""

    assignment: PriorAssignment
    target_epsilon: float
    delta: float = DEFAULT_DELTA
    max_dropout_fraction: float = MAX_DROPOUT_FRACTION
    description: str = ""
    epsilon: float | None = field(default=None, init=False)
    privacy_releases: list = field(default_factory=list, init=False)
    model_label = "linear head"
    noise_salt = 4099

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise EvaluationError("target_epsilon must be a positive finite number")
        if not self.description:
            self.description = (f"{self.model_label}: one distributed-DP release of the devices' sufficient "
                                f"statistics (target eps={self.target_epsilon:g}, delta={self.delta:g}), solved "
                                "toward the public prior")

    def release(self, vectors: Sequence[np.ndarray], skipped: int, seed: int, **kw) -> StatisticsRelease:
        """The row's one release (seeded noise: a reproducible table); accounted on the row."""
        rng = np.random.default_rng([int(seed), int(round(self.target_epsilon * 1000)), self.noise_salt])
        release = release_statistics(vectors, target_epsilon=self.target_epsilon, delta=self.delta,
                                     max_dropout_fraction=self.max_dropout_fraction, rng=rng,
                                     not_taking_part=skipped, **kw)
        self.epsilon = release.epsilon
        self.privacy_releases = [release.event.spec()]
        return release


@dataclass
class FederatedStatisticsMethod(OneReleaseRow):
    """A row (Method protocol): one DP statistics release at ``target_epsilon``, the model
    solved toward each person's (cross-fitted) prior."""

    def fit_predict(self, splits, seed):
        check_history(splits)
        vectors, skipped = [], 0
        for s in splits:
            try:
                vectors.append(device_statistics(s))
            except NotEnoughDataError:
                skipped += 1  # sends nothing: not taking part
        release = self.release(vectors, skipped, seed)
        A, b = unpack_statistics(release.noisy_sum)
        models = {group: LinearHead(solve_with_prior(A, b, prior, noise_std=release.actual_noise_std,
                                                     devices=release.devices))
                  for group, prior in self.assignment.groups.items()}
        self.chosen = {"release": release.to_dict(), "prior": self.assignment.describe(),
                       "weights_distance_to_prior": {
                           g: float(np.linalg.norm(m.weights - self.assignment.groups[g].weights))
                           for g, m in models.items()}}
        return {s.person: predict_split(models[self.assignment.person_group[s.person]], s) for s in splits}


def statistics_methods(assignment: PriorAssignment, epsilons: Sequence[float] = DEFAULT_EPSILONS, *,
                       delta: float = DEFAULT_DELTA) -> dict:
    """The rows, one release each."""
    return {row_name(e): FederatedStatisticsMethod(assignment, float(e), delta) for e in epsilons}


__all__ = ["FederatedStatisticsMethod", "OneReleaseRow", "StatisticsRelease", "release_statistics", "statistics_methods",
           "device_statistics", "row_name", "DEFAULT_EPSILONS"]
