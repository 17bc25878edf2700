"""Rows ``warning model, private (ε=…)`` of ``restwise evaluate --task early-warning``: the
early-warning model from one differentially private release of the devices' bounded
statistics, run in-process exactly as the linear head's rows
(:mod:`restwise.simulation.federated_statistics`, whose release this reuses).

1. each device fits its personal part on its **training** days only (the low threshold, the
   scale and its own rate of low weeks stay on the device), computes its feature rows and
   targets on its labelled training days and its statistics vector
   (``models.warning.device_statistics``: 350 numbers, L2 norm <= sqrt 2; fewer than 14
   labelled days: it sends nothing and is counted as not taking part);
2. one Gaussian release of the sum with distributed noise shares
   (``federated_statistics.release_statistics``: calibrated for the row's target epsilon at
   delta = 1e-5, accounted by the project's accountant, one event);
3. the server unpacks the noisy sum and solves toward each person's (cross-fitted) prior with
   the actual noise std (``linear_head.solve_with_prior``, target bound 1);
4. each device scores its days; the operating point is the one stored with the prior (chosen
   on public data), so no choice is made on the cohort's private data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from restwise.models.linear_head import unpack_statistics
from restwise.models.prior import PriorAssignment
from restwise.models.warning import ARCHITECTURE_NAME, N_FEATURES, TARGET_BOUND, feature_spec_sha256
from restwise.models.warning_evaluation import model_scores, public_point, solve_groups, statistics_vectors
from restwise.simulation.federated_statistics import DEFAULT_DELTA, OneReleaseRow

DEFAULT_EPSILONS = (1.0, 4.0, 8.0)
# The released object is the sum of statistics; the event names it by the architecture and spec.
RELEASE_NAME = hashlib.sha256(f"{ARCHITECTURE_NAME}:{feature_spec_sha256()}".encode()).hexdigest()


def row_name(epsilon: float) -> str:
    return f"warning model, private (ε={epsilon:g})"


@dataclass
class WarningStatisticsMethod(OneReleaseRow):
    """A row: one DP statistics release at ``target_epsilon``, solved toward the prior; the
    operating point is the prior's (chosen on public data)."""

    operating_point: object = field(default=None, init=False)
    operating_point_source: str = field(default="", init=False)
    model_label = "warning model"
    noise_salt = 7207

    def fit_score(self, splits: Sequence, protocol, seed: int) -> dict:
        vectors, skipped = statistics_vectors(splits)
        release = self.release(vectors, skipped, seed, model_hash=RELEASE_NAME)
        A, b = unpack_statistics(release.noisy_sum, N_FEATURES, TARGET_BOUND)
        models = solve_groups(A, b, self.assignment, noise_std=release.actual_noise_std, devices=release.devices)
        self.operating_point, self.operating_point_source = public_point(self.assignment)
        self.chosen = {"release": release.to_dict(), "prior": self.assignment.describe(),
                       "weights_distance_to_prior": {
                           g: float(np.linalg.norm(m.weights - self.assignment.groups[g].weights))
                           for g, m in models.items()}}
        return model_scores(models, self.assignment, splits)


def warning_statistics_methods(assignment: PriorAssignment, epsilons: Sequence[float] = DEFAULT_EPSILONS, *,
                               delta: float = DEFAULT_DELTA) -> dict:
    """The private rows, one release each."""
    return {row_name(e): WarningStatisticsMethod(assignment, float(e), delta) for e in epsilons}


__all__ = ["WarningStatisticsMethod", "warning_statistics_methods", "row_name", "DEFAULT_EPSILONS"]
