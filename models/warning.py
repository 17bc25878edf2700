"""Early warning of overreaching: a 7-day risk from the coach's features, learned like the
linear head (public prior + at most one DP release of bounded statistics).

Pure numpy; imports nothing from Restwise outside ``models``. The evaluation is
:mod:`restwise.models.warning_evaluation`, the in-process private release
:mod:`restwise.simulation.warning_statistics`.

Events (issue 18)
-----------------
* **Primary: a low week.** For day t, the event is that at least ``MIN_LOW_DAYS`` (3) of the
  next ``HORIZON`` (7) days t+1..t+7 are answered at or below the person's low threshold, the
  threshold of the day-ahead flag (their median answer - 1, ``PersonalScale.low_threshold``).
  The label of day t is defined when at least ``MIN_ANSWERED`` (4) of those 7 days are
  answered (definedness does not depend on the threshold, so the split can be made before the
  threshold is fitted); 1 when 3+ of the answered days are low, else 0.
  An *episode* starts on a low day d whose window d..d+6 holds 3+ low days and that lies
  after the last low day of the previous episode; the episode runs while the windows of its
  later low days still hold 3+ low days. Episode starts are the events lead times are
  measured to.
* **Secondary: an injury or illness report** (SoccerMon). Reports of one problem come on
  consecutive days, so reports less than ``REPORT_EPISODE_GAP`` (7) days apart are one
  episode; its first report is the event. The label of day t is 1 when an episode starts on
  t+1..t+7, undefined while the person is inside an episode (first to last report: already
  hurt or ill) and when they answered nothing on days t-6..t (not using the app, so no report
  means nothing), else 0.

Features (spec version 1; :func:`feature_spec` and its sha256 pin them)
-----------------------------------------------------------------------
For day t, with the person's low threshold ``thr`` and scale ``s`` (their SD, at least 0.5;
both from their own answers, kept on the device):

* the answer series (the target, e.g. readiness) against the low threshold, in the person's
  units: today ``(a_t - thr) / s`` (0 unanswered), answered today (1/0), the 7-day mean and
  the 28-day mean against the threshold, low days of the last 7 (x 3/7), the 7-day slope
  (least squares over the answered days, at least 3, as the change over the week / s), and
  answered days of the last 7 (x 3/7);
* fatigue and soreness (7-day mean and 7-day slope of the person's own causal z-scores of
  :mod:`restwise.models.features`), sleep quality, sleep minutes, stress and mood (7-day mean
  z), 0 where unknown;
* training load on day t: the z-scores of ACWR, monotony, strain, acute load and Banister form,
  and the literature cuts as 0/1 flags: ACWR > 1.5 (Gabbett 2016) and monotony > 2 (Foster
  1998), on ``features.compute_raw_features``' definitions;
* wearables where present: the 7-day lnRMSSD mean against its 60-day baseline in SWC units
  (``hrv_dev_7d / hrv_swc``), the below-SWC flag (Plews 2012/2013), and the 7-day mean of the
  resting-HR deviation from its baseline / 4 bpm; 0 where unknown.

25 features, bounded exactly as the linear head's (``linear_head.bound_rows``: clip to
[-3, 3], / 4, rows to L2 norm <= 1).

Model
-----
``risk_t = clip(anchor + clip(w . x_t, -1, 1), 0, 1)`` where ``anchor`` is the person's own
rate of low weeks on their labelled past days, shrunk toward ``BASE_RATE`` with
``BASE_RATE_PSEUDO_DAYS`` pseudo-days (kept on the device, like the threshold). Zero weights
mean "your usual risk". Trained as a linear probability model: the target of day t is
``event_t - anchor`` in [-1, 1] (bound B = 1). The shared vector of one device is the linear
head's (``linear_head.device_statistics``: upper triangle of X'X/m with off-diagonal x sqrt 2,
then X'delta/m / B): 25 * 26 / 2 + 25 = 350 numbers, L2 norm <= sqrt 2 by the linear head's
derivation (||x|| <= 1, |delta / B| <= 1). The model has 25 shared numbers (<= 64).

Operating point
---------------
A warning is shown on day t when the risk score exceeds the operating point. An *alarm* is
issued on a warning day at least 7 days after the last issued alarm (an alarm speaks for the
next 7 days; a warning that stays on is issued again each week, so it cannot pass for a
single alarm); a *false alarm* is an alarm on a day whose label is 0 (no low week followed). The operating point is chosen on validation data only
(:func:`choose_operating_point`): the threshold that detects the most episode starts (a
warning in the 7 days before) among those with at most ``FALSE_ALARM_BUDGET`` (2) false
alarms per person-month; for the prior and the private model on public data (the prior's own
persons' held-out later days), stored in the prior file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.evaluation import chronological_positions
from restwise.models.features import (
    DailyData,
    FeatureFrame,
    compute_raw_features,
    model_features_from_raw,
)
from restwise.models.linear_head import (
    SENSITIVITY,
    LinearHeadError,
    NotEnoughDataError,
    PersonalScale,
    bound_rows,
    moments,
    statistics_length,
)
from restwise.models.linear_head import device_statistics as bounded_statistics
from restwise.models.prior import (
    PersonMoments,
    PriorSpec,
    PublicCohort,
    TargetPrior,
    load_prior,
    ridge_from_moments,
)

ARCHITECTURE_NAME = "early-warning"
FEATURE_SPEC_VERSION = 1
HORIZON = 7  # the event window: days t+1..t+7
MIN_LOW_DAYS = 3
MIN_ANSWERED = 4
REPORT_EPISODE_GAP = 7
WINDOW = 7  # input days t-6..t (the split's gap is measured from their start)
LONG_WINDOW = 28
TARGET_BOUND = 1.0
BASE_RATE = 0.3  # the shrinkage target of a person's own rate (SoccerMon's rate, public)
BASE_RATE_PSEUDO_DAYS = 14.0
MIN_EXAMPLES = 14  # labelled days a device needs to take part in a release
ACWR_CUT = 1.5  # Gabbett 2016
MONOTONY_CUT = 2.0  # Foster 1998
HRV_SWC_CUT = 1.0  # 7-day lnRMSSD more than 1 SWC below baseline (Plews)
FALSE_ALARM_BUDGET = 2.0  # per person-month, on validation data
DAYS_PER_MONTH = 30.44
OPERATING_GRID = tuple(float(q) for q in np.round(np.arange(0.30, 0.996, 0.005), 3))

ANSWER_FEATURES = ("answer_today", "answered_today", "answer_7d", "answer_28d", "low_days_7d",
                   "answer_slope_7d", "answered_7d")
CHECKIN_FEATURES = ("fatigue_7d", "fatigue_slope_7d", "soreness_7d", "soreness_slope_7d",
                    "sleep_quality_7d", "sleep_minutes_7d", "stress_7d", "mood_7d")
LOAD_FEATURES = ("acwr_z", "monotony_z", "strain_z", "acute_load_z", "form_z", "acwr_above_1_5",
                 "monotony_above_2")
WEARABLE_FEATURES = ("hrv_vs_baseline_swc", "hrv_below_swc", "rhr_dev_7d")
FEATURE_NAMES: tuple[str, ...] = ANSWER_FEATURES + CHECKIN_FEATURES + LOAD_FEATURES + WEARABLE_FEATURES
N_FEATURES = len(FEATURE_NAMES)  # 25 shared numbers (<= 64)
STATISTICS_LENGTH = statistics_length(N_FEATURES)  # 350


class WarningError(ModelError):
    """The warning cannot be computed for this input (too few answers, a bad model...)."""


def feature_spec() -> dict:
    """Everything that fixes what a feature row, a label and the target mean."""
    return {
        "architecture": ARCHITECTURE_NAME, "version": FEATURE_SPEC_VERSION, "names": list(FEATURE_NAMES),
        "horizon": HORIZON, "min_low_days": MIN_LOW_DAYS, "min_answered": MIN_ANSWERED,
        "window": WINDOW, "long_window": LONG_WINDOW, "target_bound": TARGET_BOUND,
        "base_rate": BASE_RATE, "base_rate_pseudo_days": BASE_RATE_PSEUDO_DAYS,
        "cuts": {"acwr": ACWR_CUT, "monotony": MONOTONY_CUT, "hrv_swc": HRV_SWC_CUT},
        "bounds": "linear_head.bound_rows", "statistics": "linear_head.device_statistics",
        "sensitivity": SENSITIVITY,
    }


def feature_spec_sha256() -> str:
    return hashlib.sha256(json.dumps(feature_spec(), sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


# ------------------------------------------------------------------------------ windows
def trailing_windows(x: np.ndarray, width: int) -> np.ndarray:
    """Row t = x[t-width+1 .. t] (NaN before day 0)."""
    padded = np.concatenate([np.full(width - 1, np.nan), np.asarray(x, dtype=np.float64)])
    return np.lib.stride_tricks.sliding_window_view(padded, width)


def _ahead(x: np.ndarray, horizon: int = HORIZON) -> np.ndarray:
    """Row t = x[t+1 .. t+horizon] (NaN after the last day)."""
    padded = np.concatenate([np.asarray(x, dtype=np.float64), np.full(horizon, np.nan)])
    return np.lib.stride_tricks.sliding_window_view(padded[1:], horizon)


def _mean(w: np.ndarray) -> np.ndarray:
    n = np.isfinite(w).sum(axis=1)
    return np.where(n > 0, np.nansum(w, axis=1) / np.maximum(n, 1), np.nan)


def window_slope(w: np.ndarray, min_points: int = 3) -> np.ndarray:
    """Least-squares slope per row over the finite entries (position = day), NaN below
    ``min_points`` points."""
    ok = np.isfinite(w)
    k = np.broadcast_to(np.arange(w.shape[1], dtype=np.float64), w.shape)
    n = ok.sum(axis=1)
    kbar = np.where(n > 0, (k * ok).sum(axis=1) / np.maximum(n, 1), 0.0)
    vbar = _mean(w)
    dk = np.where(ok, k - kbar[:, None], 0.0)
    dv = np.where(ok, w - np.nan_to_num(vbar)[:, None], 0.0)
    den = (dk * dk).sum(axis=1)
    return np.where((n >= min_points) & (den > 0), (dk * dv).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


# ------------------------------------------------------------------------------ events
def label_defined(answers: np.ndarray) -> np.ndarray:
    """Day t's low-week label is defined: at least MIN_ANSWERED of days t+1..t+7 answered."""
    return np.isfinite(_ahead(answers)).sum(axis=1) >= MIN_ANSWERED


def low_days(answers: np.ndarray, threshold: float) -> np.ndarray:
    a = np.asarray(answers, dtype=np.float64)
    return np.isfinite(a) & (a <= threshold)


def low_week_labels(answers: np.ndarray, threshold: float) -> np.ndarray:
    """Per day t: 1.0 when 3+ of days t+1..t+7 are at or below ``threshold``, 0.0 when not,
    NaN when fewer than MIN_ANSWERED of them are answered."""
    lows = _ahead(low_days(answers, threshold).astype(np.float64)).sum(axis=1)
    return np.where(label_defined(answers), (lows >= MIN_LOW_DAYS).astype(np.float64), np.nan)


def low_week_episodes(answers: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(first, last low day) of each low-week episode, in day indices: an episode starts on a
    low day whose 7-day window (that day and the 6 after) holds 3+ low days, after the end of
    the previous episode, and extends to the last low day of every such window that starts
    inside it."""
    low = low_days(answers, threshold)
    padded = np.concatenate([low.astype(np.float64), np.zeros(HORIZON - 1)])
    qualifies = low & (np.lib.stride_tricks.sliding_window_view(padded, HORIZON).sum(axis=1) >= MIN_LOW_DAYS)
    episodes: list[tuple[int, int]] = []
    for start in np.flatnonzero(qualifies):
        if episodes and start <= episodes[-1][1]:
            continue
        end = j = int(start)
        while j <= end:
            if qualifies[j]:
                end = max(end, j + int(np.flatnonzero(low[j : j + HORIZON])[-1]))
            j += 1
        episodes.append((int(start), end))
    return episodes


def report_episodes(report_days: Sequence[int]) -> list[tuple[int, int]]:
    """(first, last report) of each report episode: reports < REPORT_EPISODE_GAP days apart."""
    days = sorted({int(d) for d in report_days})
    episodes: list[tuple[int, int]] = []
    for d in days:
        if episodes and d - episodes[-1][1] < REPORT_EPISODE_GAP:
            episodes[-1] = (episodes[-1][0], d)
        else:
            episodes.append((d, d))
    return episodes


def report_labels(n_days: int, report_days: Sequence[int], answers: np.ndarray) -> np.ndarray:
    """Per day t: 1.0 when a report episode starts on t+1..t+7, NaN inside an episode or when
    nothing was answered on days t-6..t, else 0.0."""
    episodes = report_episodes(report_days)
    starts = np.zeros(n_days)
    inside = np.zeros(n_days, dtype=bool)
    for first, last in episodes:
        if 0 <= first < n_days:
            starts[first] = 1.0
        inside[max(first, 0) : min(last + 1, n_days)] = True
    labels = (_ahead(starts).sum(axis=1) > 0).astype(np.float64)
    active = np.isfinite(trailing_windows(answers, WINDOW)).any(axis=1)
    return np.where(inside | ~active, np.nan, labels)


# ------------------------------------------------------------------------------ personal part
@dataclass(frozen=True)
class WarningPersonal:
    """What stays on the device: the low threshold and scale of the person's answers (the
    day-ahead flag's, :class:`~restwise.models.linear_head.PersonalScale`) and their own
    shrunk rate of low weeks (the model's anchor)."""

    low_threshold: float
    scale: float
    base_rate: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(float(v)) for v in (self.low_threshold, self.scale, self.base_rate)):
            raise WarningError("the warning's personal part must be finite")
        if self.scale <= 0 or not 0.0 <= self.base_rate <= 1.0:
            raise WarningError("the warning's personal part needs scale > 0 and a rate in [0, 1]")

    @classmethod
    def fit(cls, answers: np.ndarray, labels: np.ndarray | None = None, *,
            low_threshold: float | None = None) -> "WarningPersonal":
        """From the person's own answers (the days they may use: their training period on
        a device's past) and, for the rate, the labels of those days (NaN = undefined)."""
        a = np.asarray(answers, dtype=np.float64)
        a = a[np.isfinite(a)]
        if a.size == 0:
            raise NotEnoughDataError("no answers to fit the warning's threshold on")
        scale = PersonalScale.fit(a, low_threshold=low_threshold)
        lab = np.zeros(0) if labels is None else np.asarray(labels, dtype=np.float64)
        lab = lab[np.isfinite(lab)]
        rate = (float(lab.sum()) + BASE_RATE_PSEUDO_DAYS * BASE_RATE) / (lab.size + BASE_RATE_PSEUDO_DAYS)
        return cls(scale.low_threshold, scale.scale, rate)


# ------------------------------------------------------------------------------ features
@dataclass(frozen=True)
class PersonDays:
    """One person's days as the warning reads them: the answer series and both feature
    frames, computed once (everything causal: row t uses days <= t)."""

    days: list[str]
    answers: np.ndarray
    raw: FeatureFrame
    frame: FeatureFrame

    @classmethod
    def from_daily(cls, data: DailyData, target: str = "readiness", raw: FeatureFrame | None = None) -> "PersonDays":
        """``raw``: the raw feature frame of ``data`` when the caller has it already."""
        if target not in data.series:
            raise WarningError(f"no series named {target!r} in the data")
        raw = compute_raw_features(data) if raw is None else raw
        return cls(list(data.days), np.asarray(data.series[target], dtype=np.float64), raw,
                   model_features_from_raw(raw))

    def __len__(self) -> int:
        return len(self.days)


@dataclass
class WarningInputs:
    x: np.ndarray  # [n, N_FEATURES], ||x|| <= 1
    anchor: np.ndarray  # [n]: the person's own rate
    raw: np.ndarray  # [n, N_FEATURES] before bounding (reasons are stated from these)
    clipped: int


def _zero(v: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(v), v, 0.0)


def warning_inputs(person: PersonDays, personal: WarningPersonal) -> WarningInputs:
    """Feature rows for every day of ``person`` (module docstring)."""
    a = person.answers
    if np.any(np.isinf(a)):
        raise WarningError("the answers contain inf")
    thr, s = personal.low_threshold, personal.scale
    w7, w28 = trailing_windows(a, WINDOW), trailing_windows(a, LONG_WINDOW)
    cols = {
        "answer_today": _zero((a - thr) / s),
        "answered_today": np.isfinite(a).astype(np.float64),
        "answer_7d": _zero((_mean(w7) - thr) / s),
        "answer_28d": _zero((_mean(w28) - thr) / s),
        "low_days_7d": (np.isfinite(w7) & (np.nan_to_num(w7, nan=np.inf) <= thr)).sum(axis=1) * 3.0 / WINDOW,
        "answer_slope_7d": _zero(window_slope(w7) * (WINDOW - 1) / s),
        "answered_7d": np.isfinite(w7).sum(axis=1) * 3.0 / WINDOW,
    }
    frame = person.frame

    def z_window(series: str) -> np.ndarray:
        z, has = frame.column(f"z_{series}"), frame.column(f"has_{series}")
        return trailing_windows(np.where(has > 0, z, np.nan), WINDOW)

    for series in ("fatigue", "soreness"):
        zw = z_window(series)
        cols[f"{series}_7d"] = _zero(_mean(zw))
        cols[f"{series}_slope_7d"] = _zero(window_slope(zw) * (WINDOW - 1))
    for series in ("sleep_quality", "sleep_minutes", "stress", "mood"):
        cols[f"{series}_7d"] = _zero(_mean(z_window(series)))
    for name, series in (("acwr_z", "acwr"), ("monotony_z", "monotony"), ("strain_z", "strain"),
                         ("acute_load_z", "acute_load"), ("form_z", "form")):
        cols[name] = frame.column(f"z_{series}").astype(np.float64) * frame.column(f"has_{series}")
    raw = person.raw
    cols["acwr_above_1_5"] = (np.nan_to_num(raw.column("acwr"), nan=0.0) > ACWR_CUT).astype(np.float64)
    cols["monotony_above_2"] = (np.nan_to_num(raw.column("monotony"), nan=0.0) > MONOTONY_CUT).astype(np.float64)
    cols["hrv_vs_baseline_swc"] = _zero(hrv_swc_units(raw))
    cols["hrv_below_swc"] = np.nan_to_num(raw.column("hrv_below_swc"), nan=0.0)
    cols["rhr_dev_7d"] = _zero(_mean(trailing_windows(raw.column("rhr_dev"), WINDOW)) / 4.0)
    matrix = np.stack([np.asarray(cols[name], dtype=np.float64) for name in FEATURE_NAMES], axis=1)
    x, clipped = bound_rows(matrix)
    return WarningInputs(x, np.full(len(person), personal.base_rate), matrix, clipped)


def hrv_swc_units(raw: FeatureFrame) -> np.ndarray:
    """The 7-day lnRMSSD mean against the baseline in SWC units (negative = below)."""
    swc = raw.column("hrv_swc")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(swc > 0, raw.column("hrv_dev_7d") / swc, np.nan)


def warning_delta(labels: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The training target: event (0/1) minus the person's rate, in [-1, 1]."""
    y = np.asarray(labels, dtype=np.float64)
    if not np.all(np.isfinite(y)) or not np.all((y == 0) | (y == 1)):
        raise WarningError("the warning's labels must be 0 or 1")
    return np.clip(y - np.asarray(anchor, dtype=np.float64), -TARGET_BOUND, TARGET_BOUND)


def device_statistics(inputs: WarningInputs, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """What one device shares: the bounded statistics of its labelled ``rows`` (day indices),
    350 numbers, L2 norm <= sqrt 2 (checked by ``linear_head.device_statistics``)."""
    rows = np.asarray(rows, dtype=int)
    return bounded_statistics(inputs.x[rows], warning_delta(labels[rows], inputs.anchor[rows]),
                              n_features=N_FEATURES, target_bound=TARGET_BOUND, min_examples=MIN_EXAMPLES)


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class WarningModel:
    """The shared weights (25) under one feature spec; ``score`` and ``risk`` run on the device."""

    weights: np.ndarray

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if w.shape != (N_FEATURES,) or not np.all(np.isfinite(w)):
            raise WarningError(f"a warning model has {N_FEATURES} finite weights")
        object.__setattr__(self, "weights", w)

    def score(self, inputs: WarningInputs) -> np.ndarray:
        """The continuous risk (anchor + w . x): ranks days; the operating point applies to it."""
        return inputs.anchor + np.clip(inputs.x @ self.weights, -TARGET_BOUND, TARGET_BOUND)

    def risk(self, inputs: WarningInputs) -> np.ndarray:
        """The 7-day risk shown to the person, in [0, 1]."""
        return np.clip(self.score(inputs), 0.0, 1.0)

    def contributions(self, inputs: WarningInputs, row: int) -> dict[str, float]:
        """Each feature's share of ``w . x`` on one day (what raises or lowers the risk)."""
        return {name: float(inputs.x[row, j] * self.weights[j]) for j, name in enumerate(FEATURE_NAMES)}


# ------------------------------------------------------------------------------ operating point
@dataclass(frozen=True)
class AlarmRecord:
    """A score at one operating point, over persons' scored days."""

    threshold: float
    alarms: int  # new warnings on days with a defined label
    true_alarms: int  # ... followed by the event
    false_alarms: int
    person_months: float  # labelled days / 30.44
    episodes: int  # event starts whose 7 days before were all scored
    detected: int  # ... with a warning on one of those days
    lead_times: tuple[int, ...]  # days from the first warning to the event start, per detected
    warning_days: int
    scored_days: int

    @property
    def false_alarms_per_person_month(self) -> float:
        return self.false_alarms / self.person_months if self.person_months > 0 else float("nan")

    @property
    def detection(self) -> float:
        return self.detected / self.episodes if self.episodes else float("nan")

    @property
    def median_lead(self) -> float:
        return float(np.median(self.lead_times)) if self.lead_times else float("nan")

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "alarms": self.alarms, "true_alarms": self.true_alarms,
                "false_alarms": self.false_alarms, "person_months": self.person_months,
                "false_alarms_per_person_month": self.false_alarms_per_person_month,
                "episodes": self.episodes, "detected": self.detected, "detection": self.detection,
                "median_lead_days": self.median_lead, "lead_times": list(self.lead_times),
                "warning_days": self.warning_days, "scored_days": self.scored_days}


@dataclass(frozen=True)
class ScoredDays:
    """One person's scored period: consecutive day indices ``days``, a score per day, the
    label per day (NaN undefined) and the event starts (day indices) of the period."""

    days: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    starts: np.ndarray


def issued_alarms(warn: np.ndarray) -> np.ndarray:
    """Days the coach issues an alarm: a warning day at least HORIZON days after the last
    issued alarm. An alarm speaks for the next 7 days, so a warning that stays on is issued
    again each week (and counts again): a warning shown every day cannot look like one alarm."""
    issued = np.zeros(len(warn), dtype=bool)
    last = -HORIZON
    for t in np.flatnonzero(warn):
        if t - last >= HORIZON:
            issued[t] = True
            last = int(t)
    return issued


def alarm_record(periods: Sequence[ScoredDays], threshold: float) -> AlarmRecord:
    """Alarms, false alarms, detection and lead times of ``score > threshold``."""
    alarms = true_alarms = false_alarms = warning_days = scored = 0
    labelled = episodes = detected = 0
    leads: list[int] = []
    for p in periods:
        warn = np.asarray(p.scores) > threshold
        new = issued_alarms(warn)
        lab = np.asarray(p.labels)
        known = np.isfinite(lab)
        alarms += int((new & known).sum())
        true_alarms += int((new & known & (lab == 1)).sum())
        false_alarms += int((new & known & (lab == 0)).sum())
        warning_days += int(warn.sum())
        scored += len(warn)
        labelled += int(known.sum())
        if len(p.days) == 0:
            continue
        first, last = int(p.days[0]), int(p.days[-1])
        for d in np.asarray(p.starts, dtype=int):
            if d - HORIZON < first or d > last + 1:
                continue  # the 7 days before the event are not all in the scored period
            episodes += 1
            before = warn[d - HORIZON - first : d - first]
            if before.any():
                detected += 1
                leads.append(HORIZON - int(np.argmax(before)))
    return AlarmRecord(float(threshold), alarms, true_alarms, false_alarms, labelled / DAYS_PER_MONTH,
                       episodes, detected, tuple(leads), warning_days, scored)


def choose_operating_point(periods: Sequence[ScoredDays], budget: float = FALSE_ALARM_BUDGET) -> AlarmRecord:
    """On validation data: among thresholds at the quantiles ``OPERATING_GRID`` of the pooled
    scores, those with at most ``budget`` false alarms per person-month that warn on no more
    days than the event occurs (the share of warning days at most the share of labelled days
    followed by the event: a warning shown more often than the thing it warns of says little);
    of those the one detecting the most event starts (ties: the higher threshold, fewer
    warnings). The strictest threshold when none qualifies."""
    pooled = np.concatenate([np.asarray(p.scores, dtype=np.float64) for p in periods]) if periods else np.zeros(0)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        raise WarningError("no validation scores to choose an operating point on")
    labels = np.concatenate([np.asarray(p.labels, dtype=np.float64) for p in periods])
    labels = labels[np.isfinite(labels)]
    event_rate = float(labels.mean()) if labels.size else 0.0
    candidates = sorted({float(v) for v in np.quantile(pooled, OPERATING_GRID)})
    records = [alarm_record(periods, t) for t in candidates]
    ok = [r for r in records if r.false_alarms_per_person_month <= budget
          and r.warning_days <= event_rate * r.scored_days]
    if not ok:
        return records[-1]
    return max(ok, key=lambda r: (r.detected, r.threshold))


# ------------------------------------------------------------------------------ the prior
def labelled_rows(person: PersonDays, rows: np.ndarray | None = None) -> np.ndarray:
    """Day indices with a defined low-week label whose input window lies inside the data."""
    idx = np.flatnonzero(label_defined(person.answers))
    idx = idx[idx >= WINDOW - 1]
    return idx if rows is None else np.intersect1d(idx, rows)


def fit_person(person: PersonDays, rows: np.ndarray) -> tuple[WarningPersonal, WarningInputs, np.ndarray]:
    """The device's personal part from its labelled ``rows`` (the answers up to their last
    target day: the threshold, scale and rate), its feature rows for every day, and the
    labels of every day at that threshold."""
    rows = np.asarray(rows, dtype=int)
    if rows.size == 0:
        raise NotEnoughDataError("no labelled days")
    answers = person.answers[: int(rows.max()) + HORIZON + 1]
    labels = low_week_labels(person.answers, WarningPersonal.fit(answers).low_threshold)
    personal = WarningPersonal.fit(answers, labels[rows])
    return personal, warning_inputs(person, personal), labels


def warning_person_moments(person: str, dataset: str, data: DailyData, target: str) -> PersonMoments | None:
    """A public person's moments over all their labelled days (the prior's input)."""
    if target not in data.series:
        return None
    days = PersonDays.from_daily(data, target)
    rows = labelled_rows(days)
    if rows.size < MIN_EXAMPLES:
        return None
    _, inputs, labels = fit_person(days, rows)
    delta = warning_delta(labels[rows], inputs.anchor[rows])
    A, b = moments(inputs.x[rows], delta)
    return PersonMoments(person, dataset, A, b, float(np.mean(delta**2)), int(rows.size))


def split_rows(rows: np.ndarray, fraction: float, gap_days: int) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's chronological split of labelled day indices (targets t+1..t+7)."""
    first, later = chronological_positions(rows, fraction, gap_days, window=WINDOW, horizon=HORIZON)
    return rows[first], rows[later]


def scored_period(person: PersonDays, later: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  starts: Sequence[int]) -> ScoredDays:
    """Every day from the first to the last later labelled day (warnings are shown daily)."""
    days = np.arange(int(later.min()), int(later.max()) + 1) if later.size else np.zeros(0, dtype=int)
    inside = [d for d in starts if days.size and days[0] <= d <= days[-1] + 1]
    return ScoredDays(days, scores[days], labels[days], np.asarray(inside, dtype=int))


def public_operating_point(target: str, cohorts: Sequence[PublicCohort], fitted, *,
                           fraction: float = 0.75, gap_days: int = 7) -> dict:
    """The operating point on public data (``PriorSpec.annotate``): each public person's
    labelled days split chronologically (first 75%, then the days after a 7-day gap); the
    weights refitted on the first parts at the prior's ridge penalty; the threshold chosen on
    the later parts (:func:`choose_operating_point`)."""
    fits, periods = [], []
    for cohort in cohorts:
        for name in sorted(cohort.days):
            data = cohort.days[name]
            if target not in data.series:
                continue
            person = PersonDays.from_daily(data, target)
            rows = labelled_rows(person)
            first, later = split_rows(rows, fraction, gap_days)
            if first.size < MIN_EXAMPLES or later.size == 0:
                continue
            personal, inputs, labels = fit_person(person, first)
            delta = warning_delta(labels[first], inputs.anchor[first])
            A, b = moments(inputs.x[first], delta)
            fits.append((PersonMoments(name, cohort.name, A, b, float(np.mean(delta**2)), int(first.size)),
                         person, inputs, labels, later, personal))
    if len(fits) < 2:
        raise WarningError("too few public persons with held-out days to choose an operating point")
    model = WarningModel(ridge_from_moments([f[0] for f in fits], fitted.ridge_lambda))
    for _, person, inputs, labels, later, personal in fits:
        starts = [s for s, _ in low_week_episodes(person.answers, personal.low_threshold)]
        periods.append(scored_period(person, later, model.score(inputs), labels, starts))
    rec = choose_operating_point(periods)
    return {"operating_point": rec.threshold, "budget_false_alarms_per_person_month": FALSE_ALARM_BUDGET,
            "chosen_on": f"public persons' later days ({len(periods)} persons, first {fraction:.0%} "
                         f"of each person's labelled days fitted, {gap_days}-day gap)",
            "validation": rec.to_dict()}


WARNING_PRIOR_FORMAT = "restwise-early-warning-prior"
SHIPPED_WARNING_PRIOR = "priors/warning_prior.json"
# The sha256 of the shipped warning prior (its "sha256" field); rebuilding it means updating
# this pin in the same change (tests/test_warning.py checks that they agree).
SHIPPED_WARNING_PRIOR_SHA256 = "4bd9cc6eba2a6c3d0f352dbcd0254542f4c5c3d60b52e277e954f224ff520d2a"

WARNING_PRIOR = PriorSpec(
    format=WARNING_PRIOR_FORMAT, architecture=ARCHITECTURE_NAME, feature_spec_version=FEATURE_SPEC_VERSION,
    feature_spec_sha256=feature_spec_sha256, person_moments=warning_person_moments, target_bound=TARGET_BOUND,
    min_examples=MIN_EXAMPLES, shipped=SHIPPED_WARNING_PRIOR, shipped_sha256=SHIPPED_WARNING_PRIOR_SHA256,
    build_command="restwise model prior --model early-warning", annotate=public_operating_point)


def operating_point_of(details: Mapping) -> float:
    """The operating point stored with a fitted warning prior (its ``extra`` fields)."""
    try:
        return float(details["operating_point"])
    except (KeyError, TypeError, ValueError):
        raise WarningError("the warning prior carries no operating point") from None


__all__ = [
    "ARCHITECTURE_NAME", "FEATURE_SPEC_VERSION", "FEATURE_NAMES", "N_FEATURES", "STATISTICS_LENGTH",
    "HORIZON", "MIN_LOW_DAYS", "MIN_ANSWERED", "MIN_EXAMPLES", "TARGET_BOUND", "FALSE_ALARM_BUDGET",
    "ACWR_CUT", "MONOTONY_CUT", "HRV_SWC_CUT", "WarningError", "feature_spec", "feature_spec_sha256",
    "label_defined", "low_week_labels", "low_week_episodes", "report_episodes", "report_labels",
    "WarningPersonal", "PersonDays", "WarningInputs", "warning_inputs", "warning_delta", "hrv_swc_units",
    "device_statistics", "WarningModel", "AlarmRecord", "SENSITIVITY",
    "ScoredDays", "alarm_record", "issued_alarms", "choose_operating_point", "labelled_rows", "fit_person",
    "warning_person_moments", "split_rows", "scored_period", "public_operating_point", "WARNING_PRIOR",
    "operating_point_of", "window_slope", "trailing_windows", "LinearHeadError", "WarningRecord", "WarningAdvice",
    "record_from_results", "load_record", "warning_today", "past_warnings", "rule_reasons", "device_scores",
    "RECORD_FORMAT", "SHIPPED_RECORD",
]


# ------------------------------------------------------------------------------ on the device
RECORD_FORMAT = "restwise-early-warning-record"
SHIPPED_RECORD = "priors/warning_record.json"  # written by `restwise model warning-record`
MIN_PAST_LABELLED = MIN_EXAMPLES  # labelled past days before the device shows a risk


@dataclass(frozen=True)
class WarningRecord:
    """What the shipped evaluation measured for the warning the coach shows, and for each
    literature rule alone (stated next to the rule when it is given as a reason)."""

    row: str
    dataset: str
    persons: int
    true_alarms: int
    alarms: int
    detected: int
    episodes: int
    false_alarms_per_person_month: float
    median_lead_days: float
    rules: dict  # rule row -> {"auroc": float | None, "auroc_ci": [lo, hi] | None, "reason": str | None}
    results_sha256: str
    command: str

    def sentence(self) -> str:
        """The measured record in plain words."""
        if not self.alarms:
            return "in past data this warning was never shown, so its record is unknown"
        return (f"in past data ({self.dataset}, {self.persons} persons), {self.true_alarms} of {self.alarms} such "
                f"warnings were followed by a low week, and it warned ahead of {self.detected} of {self.episodes} "
                "low weeks")

    def rule_note(self, rule: str) -> str:
        r = self.rules.get(rule) or {}
        if r.get("auroc") is None:
            return f"not measured on real outcomes yet ({r.get('reason') or 'no data'})"
        return f"alone it predicted low weeks at AUROC {r['auroc']:.2f} in past data (0.5 = chance)"

    def to_dict(self) -> dict:
        return {"format": RECORD_FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "WarningRecord":
        if d.get("format") != RECORD_FORMAT:
            raise WarningError("not a Restwise early-warning record")
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except KeyError as exc:
            raise WarningError(f"the early-warning record lacks {exc}") from None


def record_from_results(results: Mapping, row: str, *, results_sha256: str, command: str) -> WarningRecord:
    """The record of ``row`` (and of every rule) from an early-warning results.json."""
    if results.get("task") != "early-warning":
        raise WarningError("not the results of `restwise evaluate --task early-warning`")
    rows = {m["name"]: m for m in results["methods"]}
    if row not in rows or not rows[row]["available"]:
        raise WarningError(f"the results have no scored row {row!r}")
    op = rows[row]["at_operating_point"]
    rules = {name: {"auroc": m.get("auroc"), "auroc_ci": m.get("auroc_ci"), "reason": m.get("reason")}
             for name, m in rows.items() if name in ("ACWR > 1.5", "monotony > 2", "HRV below baseline (SWC)",
                                                      "readiness trend")}
    return WarningRecord(row, str(results["dataset"]), int(results["n_persons"]), int(op["true_alarms"]),
                         int(op["alarms"]), int(op["detected"]), int(op["episodes"]),
                         float(op["false_alarms_per_person_month"]), float(op["median_lead_days"] or math.nan),
                         rules, results_sha256, command)


def load_record(path=None) -> WarningRecord:
    """The shipped record (package data), or the one at ``path``."""
    try:
        text = (resources.files("restwise.models").joinpath(SHIPPED_RECORD).read_bytes() if path is None
                else Path(path).read_bytes())
        return WarningRecord.from_dict(json.loads(text))
    except (OSError, ValueError) as exc:
        raise WarningError(f"the early-warning record cannot be read ({exc})") from None


@dataclass(frozen=True)
class WarningAdvice:
    """The 7-day risk of a low week on one day, as the coach shows it."""

    day: str
    risk: float | None  # 0-1; None while the person's baseline is too short
    shown: bool  # risk above the operating point chosen on validation data
    operating_point: float
    reasons: tuple[str, ...]  # what raises the risk most (the model's largest contributions)
    rule_reasons: tuple[str, ...]  # the literature's rules that hold today: reasons, not verdicts
    record: str  # the measured record in plain words
    model: str
    note: str | None = None

    def to_dict(self) -> dict:
        return {"day": self.day, "risk": None if self.risk is None else round(self.risk, 3), "shown": self.shown,
                "operating_point": round(self.operating_point, 3), "reasons": list(self.reasons),
                "rule_reasons": list(self.rule_reasons), "record": self.record, "model": self.model,
                "note": self.note}


def device_scores(person: PersonDays, days: Sequence[int], weights: np.ndarray) -> dict[int, tuple]:
    """For each day index t: (score, personal part, inputs) as the device computes it on day
    t: threshold, scale and rate from the answers up to t only (labels of days <= t - 7)."""
    model = WarningModel(weights)
    out = {}
    for t in days:
        past = person.answers[: t + 1]
        if not np.isfinite(past).any():
            continue
        threshold = WarningPersonal.fit(past).low_threshold
        labels = low_week_labels(past, threshold)
        known = labels[np.isfinite(labels)]
        if known.size < MIN_PAST_LABELLED:
            continue
        personal = WarningPersonal.fit(past, known, low_threshold=threshold)
        inputs = warning_inputs(person, personal)
        out[int(t)] = (float(model.score(inputs)[t]), personal, inputs)
    return out


_REASON_TEXT = {
    "low_days_7d": lambda v, p: f"{round(v * WINDOW / 3)} of your last 7 answers were at or below your usual low "
                                f"({p.low_threshold:g})",
    "answer_7d": lambda v, p: "your answers this week sit close to your usual low",
    "answer_28d": lambda v, p: "your answers of the last 4 weeks sit close to your usual low",
    "answer_today": lambda v, p: "today's answer is close to your usual low",
    "answer_slope_7d": lambda v, p: "your answers have been falling this week",
    "fatigue_7d": lambda v, p: "more fatigue than usual this week",
    "fatigue_slope_7d": lambda v, p: "fatigue rising this week",
    "soreness_7d": lambda v, p: "more soreness than usual this week",
    "soreness_slope_7d": lambda v, p: "soreness rising this week",
    "sleep_quality_7d": lambda v, p: "sleep quality below your usual this week",
    "sleep_minutes_7d": lambda v, p: "less sleep than usual this week",
    "stress_7d": lambda v, p: "more stress than usual this week",
    "mood_7d": lambda v, p: "mood below your usual this week",
    "strain_z": lambda v, p: "training strain above your usual",
    "acute_load_z": lambda v, p: "this week's training load differs from your usual",
    "form_z": lambda v, p: "recent load above your longer-term load (Banister form)",
    "acwr_z": lambda v, p: "acute:chronic load ratio away from your usual",
    "monotony_z": lambda v, p: "training monotony away from your usual",
    "rhr_dev_7d": lambda v, p: "resting heart rate above your baseline this week",
    "hrv_vs_baseline_swc": lambda v, p: "HRV away from your baseline this week",
}


def warning_today(data: DailyData, *, today: str | None = None, target: str = "readiness", raw=None,
                  prior=None, record: WarningRecord | None = None, weights: np.ndarray | None = None) -> WarningAdvice:
    """The 7-day risk of a low week for ``today`` (default: the last day), with the shipped
    warning prior's weights and operating point (or ``prior``, a loaded warning prior) and the
    shipped record. ``raw``: the raw feature frame of ``data`` when the caller has it.
    ``weights``: a released model the device holds (``models.warning_architecture``), scored
    at the prior's operating point; the record quoted is then still the prior's (said so)."""
    prior = prior or load_prior(spec=WARNING_PRIOR)
    record = record or load_record()
    tp = prior.target(target)
    point = operating_point_of(tp.extra)
    today = today or data.days[-1]
    t = data.index_of(today)
    model_name = f"public prior (sha256 {prior.sha256[:12]}...), operating point {point:.2f}"
    if weights is not None:
        model_name = (f"released model (one DP release, shrunk toward the public prior {prior.sha256[:12]}...), "
                      f"the prior's operating point {point:.2f}; the record below is the prior's")
        tp = TargetPrior(**{**tp.__dict__, "weights": WarningModel(weights).weights})
    person = PersonDays.from_daily(data, target, raw)
    rules = rule_reasons(person.raw, t, record)
    scored = device_scores(person, [t], tp.weights)
    if t not in scored:
        return WarningAdvice(today, None, False, point, (), rules, record.sentence(), model_name,
                             note=f"not enough answers yet for the 7-day warning (it needs {MIN_PAST_LABELLED} past "
                                  f"days with a known following week)")
    score, personal, inputs = scored[t]
    contributions = WarningModel(tp.weights).contributions(inputs, t)
    # the largest contributions that raise the risk and mean something to a person (not
    # bookkeeping such as "answered today")
    top = [k for k, v in sorted(contributions.items(), key=lambda kv: -kv[1]) if v > 0.005 and k in _REASON_TEXT][:3]
    reasons = tuple(_REASON_TEXT[k](float(inputs.raw[t, FEATURE_NAMES.index(k)]), personal) for k in top)
    risk = float(np.clip(score, 0.0, 1.0))
    return WarningAdvice(today, risk, bool(score > point), point, reasons, rules, record.sentence(), model_name)


def rule_reasons(raw: FeatureFrame, t: int, record: WarningRecord) -> tuple[str, ...]:
    """The literature's rules that hold on day t, each with its own measured record."""
    out = []
    acwr = float(raw.column("acwr")[t])
    mono = float(raw.column("monotony")[t])
    hrv = float(hrv_swc_units(raw)[t])
    if math.isfinite(acwr) and acwr > ACWR_CUT:
        out.append(f"session-RPE ACWR {acwr:.1f}, above {ACWR_CUT:g} (Gabbett 2016); "
                   + record.rule_note("ACWR > 1.5"))
    if math.isfinite(mono) and mono > MONOTONY_CUT:
        out.append(f"training monotony {mono:.1f}, above {MONOTONY_CUT:g} (Foster 1998); "
                   + record.rule_note("monotony > 2"))
    if math.isfinite(hrv) and -hrv > HRV_SWC_CUT:
        out.append("7-day HRV more than one SWC below your baseline (Plews); "
                   + record.rule_note("HRV below baseline (SWC)"))
    return tuple(out)


def past_warnings(data: DailyData, start: str, end: str, *, target: str = "readiness", prior=None) -> list[tuple[str, float]]:
    """The days between ``start`` and ``end`` on which the coach would have issued a warning
    (an alarm: above the operating point, at most one a week), each computed from the days up
    to it only, with its risk."""
    prior = prior or load_prior(spec=WARNING_PRIOR)
    tp = prior.target(target)
    point = operating_point_of(tp.extra)
    lo, hi = data.index_of(start), data.index_of(end)
    person = PersonDays.from_daily(data, target)
    scored = device_scores(person, range(lo, hi + 1), tp.weights)
    scores = np.array([scored[t][0] if t in scored else -np.inf for t in range(lo, hi + 1)])
    issued = issued_alarms(scores > point)
    return [(data.days[lo + i], float(np.clip(scores[i], 0, 1))) for i in np.flatnonzero(issued)]
