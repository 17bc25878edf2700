"""Is the training loss rising? The test behind the run's ``loss-rising`` warning (issue 14
item 7).

Each released round of a FedAvg run carries the survivors' mean training loss as a DP release
with a known noise std (``train_loss``, ``train_loss_std`` in rounds.jsonl: the loss slot of
``models/loss_slot.py``). After every round, two one-sided tests on the released estimates
(at least ``MIN_ROUNDS`` of them), both weighted by 1 / std^2:

* **slope** (a gradual rise): the weighted least-squares slope of the loss against the round
  number over the last ``WINDOW`` released rounds, against its standard error;
* **level** (a divergence that happened and stays, e.g. a loss that jumps within a few rounds
  and saturates at the slot's cap): the weighted mean of the last ``LEVEL_ROUNDS`` released
  rounds against the weighted mean of the run's first ``LEVEL_ROUNDS`` (fewer, and never
  overlapping, while the run is short), against the standard error of the difference.

Standard errors come from the known noise stds, scaled up by sqrt(chi^2 / dof) when the points
scatter more than their DP noise explains (each round samples a different cohort: sampling adds
variance the noise std does not hold); never scaled down. The loss is rising when a test's
statistic exceeds ``RISE_Z`` standard errors *and* the rise is at least ``MIN_RELATIVE_RISE`` of
the loss it rose from. Without noise (a plain benchmark run, std 0) the points are weighted
equally and the standard errors come from the residuals alone.

``RISE_Z`` = 3 (one-sided 0.13% per look), not 2: the tests look again after every round, and
on synthetic flat 20-round runs a 2-sigma slope test alone warned on 20% of them (numbers in
docs/federated.md, "Training loss and the rising-loss warning").
Only released estimates enter (never a device's own loss): this module sees DP outputs only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WINDOW = 10  # released rounds the slope is fitted over
LEVEL_ROUNDS = 5  # released rounds at each end of the run the level test compares
MIN_ROUNDS = 4  # fewer released rounds with a loss: no verdict
RISE_Z = 3.0
MIN_RELATIVE_RISE = 0.10
LOSS_RISING = "loss-rising"  # the run event's kind
TESTS = ("slope", "level")


@dataclass(frozen=True)
class LossPoint:
    round: int
    loss: float
    std: float | None  # the estimate's noise std; None or 0: unknown / noise-free


@dataclass(frozen=True)
class LossRise:
    """A significant rise found by ``test``: from ``start`` (the fitted loss at
    ``first_round``, or the first rounds' mean) to ``end`` (at ``last_round``, or the last
    rounds' mean), with the standard error of ``end - start``."""

    test: str  # slope | level
    first_round: int
    last_round: int
    rounds: int  # released rounds the test used
    start: float
    end: float
    rise_se: float

    @property
    def z(self) -> float:
        return math.inf if self.rise_se == 0 else (self.end - self.start) / self.rise_se

    def message(self) -> str:
        z = "an exact fit (no noise)" if self.z > 1e6 else f"{self.z:.1f} standard errors"
        how = ("fitted over the rounds" if self.test == "slope"
               else "mean of the last rounds against the first")
        return (f"training loss rising over rounds {self.first_round}-{self.last_round}: "
                f"{self.start:.3g} -> {self.end:.3g} ({how}, {z}); "
                f"the model may be diverging (learning rate, clip norm or noise too large)")

    def details(self) -> dict[str, Any]:
        return {"test": self.test, "first_round": self.first_round, "last_round": self.last_round,
                "rounds": self.rounds, "start": self.start, "end": self.end, "rise_se": self.rise_se}


def loss_points(round_lines: Iterable[Mapping[str, Any]]) -> list[LossPoint]:
    """The released rounds' loss estimates from rounds.jsonl lines, in round order (the last
    line of a round wins: a re-run attempt replaces an earlier one)."""
    by_round: dict[int, LossPoint] = {}
    for line in round_lines:
        loss, std, rnd = line.get("train_loss"), line.get("train_loss_std"), line.get("round")
        if line.get("status") not in ("completed", "released") or not isinstance(rnd, int):
            continue
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        ok_std = isinstance(std, (int, float)) and math.isfinite(std) and std >= 0
        by_round[rnd] = LossPoint(rnd, float(loss), float(std) if ok_std else None)
    return [by_round[r] for r in sorted(by_round)]


def _weights(pts: Sequence[LossPoint]) -> tuple[np.ndarray, bool]:
    known = all(p.std is not None and p.std > 0 for p in pts)
    return (np.array([1.0 / p.std**2 for p in pts]) if known else np.ones(len(pts))), known


def _se(known: bool, base_variance: float, chi2: float, dof: int) -> float:
    """Known noise: its standard error, scaled up by the excess scatter; else from the scatter."""
    scatter = chi2 / dof
    return math.sqrt(base_variance * (max(scatter, 1.0) if known else scatter))


def slope_rise(points: Sequence[LossPoint], *, window: int = WINDOW) -> LossRise | None:
    """The weighted least-squares line over the last ``window`` points (None: fewer than 3)."""
    pts = list(points)[-window:]
    n = len(pts)
    if n < 3:
        return None
    x = np.array([p.round for p in pts], dtype=np.float64)
    y = np.array([p.loss for p in pts], dtype=np.float64)
    w, known = _weights(pts)
    xw, yw = float(np.sum(w * x) / np.sum(w)), float(np.sum(w * y) / np.sum(w))
    sxx = float(np.sum(w * (x - xw) ** 2))
    if sxx <= 0:
        return None
    slope = float(np.sum(w * (x - xw) * (y - yw)) / sxx)
    chi2 = float(np.sum(w * (y - yw - slope * (x - xw)) ** 2))
    span = float(x[-1] - x[0])
    se = _se(known, 1.0 / sxx, chi2, n - 2) * span
    return LossRise("slope", int(x[0]), int(x[-1]), n, yw + slope * (x[0] - xw), yw + slope * (x[-1] - xw), se)


def level_rise(points: Sequence[LossPoint], *, rounds: int = LEVEL_ROUNDS) -> LossRise | None:
    """The last ``k`` points' weighted mean against the first ``k``'s, k = min(rounds, n // 2)
    (None: k < 2)."""
    pts = list(points)
    k = min(rounds, len(pts) // 2)
    if k < 2:
        return None
    first, last = pts[:k], pts[-k:]
    (wa, known_a), (wb, known_b) = _weights(first), _weights(last)
    known = known_a and known_b
    if not known:
        wa, wb = np.ones(k), np.ones(k)
    ya, yb = np.array([p.loss for p in first]), np.array([p.loss for p in last])
    ma, mb = float(np.sum(wa * ya) / np.sum(wa)), float(np.sum(wb * yb) / np.sum(wb))
    chi2 = float(np.sum(wa * (ya - ma) ** 2) + np.sum(wb * (yb - mb) ** 2))
    se = _se(known, 1.0 / float(np.sum(wa)) + 1.0 / float(np.sum(wb)), chi2, 2 * k - 2)
    return LossRise("level", first[0].round, last[-1].round, 2 * k, ma, mb, se)


def loss_rise(points: Sequence[LossPoint], *, min_rounds: int = MIN_ROUNDS, z: float = RISE_Z,
              min_relative_rise: float = MIN_RELATIVE_RISE, window: int = WINDOW,
              level_rounds: int = LEVEL_ROUNDS) -> LossRise | None:
    """The first significant rise the tests find (module docstring), else None."""
    if len(points) < min_rounds:
        return None
    for rise in (slope_rise(points, window=window), level_rise(points, rounds=level_rounds)):
        if rise is None:
            continue
        grew = rise.end - rise.start
        if grew > z * rise.rise_se and grew >= min_relative_rise * max(abs(rise.start), 1e-12):
            return rise
    return None


__all__ = ["LossPoint", "LossRise", "loss_points", "loss_rise", "slope_rise", "level_rise", "LOSS_RISING", "WINDOW",
           "LEVEL_ROUNDS", "MIN_ROUNDS", "RISE_Z", "MIN_RELATIVE_RISE", "TESTS"]
