"""Is the training loss rising? The test behind the run's ``loss-rising`` warning (issue 14
item 7).

Each released round of a FedAvg run carries the survivors' mean training loss as a DP release
with a known noise std (``train_loss``, ``train_loss_std`` in rounds.jsonl: the loss slot of
``models/loss_slot.py``). Over the last ``WINDOW`` released rounds (at least ``MIN_ROUNDS``):

* the weighted least-squares slope of the loss against the round number, weights 1 / std^2;
* its standard error from the known stds, scaled up by sqrt(chi^2 / (n - 2)) when the points
  scatter more than their DP noise explains (different cohorts each round: sampling adds
  variance the noise std does not hold); never scaled down;
* the loss is rising when the slope exceeds ``RISE_Z`` standard errors *and* the fitted rise
  over the window is at least ``MIN_RELATIVE_RISE`` of the window's mean loss (without noise,
  e.g. a plain benchmark run with std 0, the points are fitted unweighted and the standard
  error comes from the residuals alone).

``RISE_Z`` = 3 (one-sided 0.13% per look), not 2: the test looks again after every round, and
on synthetic flat 20-round runs a 2-sigma test warned on 20% of them, 3 sigma on 1.3%
(window 10; docs/federated.md "Training loss" has the numbers and the power).
Only released estimates enter (never a device's own loss): this module sees DP outputs only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WINDOW = 10  # released rounds looked at
MIN_ROUNDS = 4  # fewer released rounds with a loss: no verdict
RISE_Z = 3.0
MIN_RELATIVE_RISE = 0.10
LOSS_RISING = "loss-rising"  # the run event's kind


@dataclass(frozen=True)
class LossPoint:
    round: int
    loss: float
    std: float | None  # the estimate's noise std; None or 0: unknown / noise-free


@dataclass(frozen=True)
class LossRise:
    """A significant rise: the fit over ``first_round`` .. ``last_round``."""

    first_round: int
    last_round: int
    rounds: int
    slope: float  # loss per round
    slope_se: float
    start: float  # the fitted loss at first_round
    end: float  # the fitted loss at last_round

    @property
    def z(self) -> float:
        return math.inf if self.slope_se == 0 else self.slope / self.slope_se

    def message(self) -> str:
        z = "an exact fit (no noise)" if self.z > 1e6 else f"{self.z:.1f} standard errors"
        return (f"training loss rising over rounds {self.first_round}-{self.last_round}: fitted "
                f"{self.start:.3g} -> {self.end:.3g} ({self.slope:+.3g} per round, {z}); "
                f"the model may be diverging (learning rate, clip norm or noise too large)")

    def details(self) -> dict[str, Any]:
        return {"first_round": self.first_round, "last_round": self.last_round, "rounds": self.rounds,
                "slope": self.slope, "slope_se": self.slope_se, "fitted_start": self.start, "fitted_end": self.end}


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


def loss_rise(points: Sequence[LossPoint], *, window: int = WINDOW, min_rounds: int = MIN_ROUNDS,
              z: float = RISE_Z, min_relative_rise: float = MIN_RELATIVE_RISE) -> LossRise | None:
    """The rise over the last ``window`` points when it is significant (module docstring), else None."""
    pts = list(points)[-window:]
    n = len(pts)
    if n < max(min_rounds, 3):
        return None
    x = np.array([p.round for p in pts], dtype=np.float64)
    y = np.array([p.loss for p in pts], dtype=np.float64)
    known = all(p.std is not None and p.std > 0 for p in pts)
    w = np.array([1.0 / p.std**2 for p in pts]) if known else np.ones(n)
    xw, yw = float(np.sum(w * x) / np.sum(w)), float(np.sum(w * y) / np.sum(w))
    sxx = float(np.sum(w * (x - xw) ** 2))
    if sxx <= 0:
        return None
    slope = float(np.sum(w * (x - xw) * (y - yw)) / sxx)
    chi2 = float(np.sum(w * (y - yw - slope * (x - xw)) ** 2))
    scatter = chi2 / (n - 2)
    se = math.sqrt(max(scatter, 1.0) / sxx) if known else math.sqrt(scatter / sxx)
    start, end = yw + slope * (x[0] - xw), yw + slope * (x[-1] - xw)
    if slope <= z * se or end - start < min_relative_rise * max(abs(yw), 1e-12):
        return None
    return LossRise(int(x[0]), int(x[-1]), n, slope, se, start, end)


__all__ = ["LossPoint", "LossRise", "loss_points", "loss_rise", "LOSS_RISING", "WINDOW", "MIN_ROUNDS", "RISE_Z",
           "MIN_RELATIVE_RISE"]
