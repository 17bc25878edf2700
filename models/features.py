"""Daily recovery features, computed on the device from a person's own days.

Two layers:

* :func:`compute_raw_features` — interpretable values in their own units (lnRMSSD, bpm,
  minutes, load units, ratios), ``NaN`` where there is not enough data. The coach reads these.
* :func:`compute_features` — the same values made model-ready: each continuous feature is
  z-scored against the person's *own past* (an expanding mean/SD over days ``<= t``, shrunk
  towards a population prior while there are few days), clipped, ``NaN`` -> 0 (= "your
  normal"), plus 0/1 data-quality flags. No population data leaves or enters the device; the
  prior is a constant.

Everything is strictly causal: row ``t`` uses days ``<= t`` only (tested by a property test).

Definitions (``w`` = daily load, ``r`` = nightly RMSSD in ms; windows are calendar days that end
on day ``t`` inclusive unless stated):

* ``ln_rmssd`` = ln r_t; ``ln_rmssd_7d`` = mean of the available ln r over the last 7 days
  (>= 3 nights); ``ln_rmssd_cv_7d`` = SD/mean of those ln r (sample SD, >= 3 nights) — the
  "CV of lnRMSSD" of Plews et al. (2012).
* baseline: mean and SD of ln r over the ``baseline_days`` (60) days *before* t (>= 14 nights;
  the coach calls it provisional below 28). ``hrv_dev_7d`` = ln_rmssd_7d - baseline mean;
  ``hrv_swc`` = 0.5 x baseline SD (smallest worthwhile change, Hopkins 2004; Plews 2013);
  ``hrv_below_swc`` = 1 when ln_rmssd_7d < baseline - SWC.
* resting HR: ``rhr_dev`` = RHR_t - mean RHR of the 60 days before t (>= 7 values).
* sleep: minutes and efficiency of the night ending on t; ``sleep_debt_7d`` = sum over the
  recorded nights of the last 7 of max(0, 480 - minutes) (need taken as 8 h); regularity
  ``sleep_sd_7d`` = SD of the recorded sleep minutes of the last 7 nights (>= 3). Sleep minutes
  come from the device, else from the check-in's sleep hours.
* two kinds of load, each against its own baseline and never added together (session-RPE
  load is CR-10 x minutes in arbitrary units; heart-rate load is a TRIMP: other units, other
  physiology). ``load`` is session-RPE load (Foster); ``hr_load`` heart-rate load (TRIMP from
  heart-rate zones, or a device's own heart-rate-based load).
* session-RPE load (unknown days excluded from means): acute =
  mean of the last 7 days (>= 4 known), chronic = mean of the last 28 days (>= 14 known),
  ``acwr`` = acute/chronic (rolling-average ACWR, Hulin/Gabbett 2016; NaN when chronic = 0),
  ``monotony`` = mean/SD of the last 7 days' loads (Foster 1998; capped at 10, SD 0 -> cap
  when mean > 0), ``strain`` = 7 x acute x monotony (weekly load x monotony).
* heart-rate load, the same windows on its own series: ``hr_acute_load``,
  ``hr_chronic_load``, ``hr_acwr``; ``hr_load_known`` flags days with a known value (raw
  features only, for now: see ``_ZSCORED``).
* Banister fitness-fatigue from session-RPE load, in exponentially-weighted form (unknown
  load counts as 0):
  ``fitness_t = fitness_{t-1} * exp(-1/42) + (1 - exp(-1/42)) * w_t`` and the same with 7 days
  for ``fatigue``; ``form = fitness - fatigue`` (Banister 1975; Morton 1990).
* check-ins: today's answers; ``readiness_last`` carries the most recent readiness forward,
  ``days_since_checkin`` says how old it is (capped at 14).
* data quality: ``worn_7d`` (days of the last 7 with any wearable value), ``missing_night``
  (no HRV today), ``missing_nights_7d``, ``baseline_nights`` (HRV nights in the baseline
  window), ``history_days`` (days since the first day of data, capped at 365).
* baselines the coach states reasons against: ``rhr_baseline_sd``, ``sleep_baseline_sd``,
  ``readiness_baseline`` / ``_sd`` (mean/SD over the 60 days before t, >= 7 resp. 3 values).

The model features add the weekday of each day (one-hot): training weeks are periodised.
"""

from __future__ import annotations

import datetime as dt
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from restwise.common.errors import ModelError

# ------------------------------------------------------------------------------ data
SERIES_KEYS: tuple[str, ...] = (
    "rmssd_ms",
    "sdnn_ms",
    "resting_hr",
    "sleep_minutes",
    "sleep_efficiency",
    "load",
    "hr_load",
    "readiness",
    "fatigue",
    "soreness",
    "stress",
    "mood",
    "sleep_quality",
    "sleep_hours",
)
WEARABLE_KEYS = ("rmssd_ms", "sdnn_ms", "resting_hr", "sleep_minutes", "sleep_efficiency")
# Load series, one per kind of load: session-RPE load (AU) and heart-rate load (TRIMP).
LOAD_KEYS = ("load", "hr_load")
CHECKIN_KEYS = ("readiness", "fatigue", "soreness", "stress", "mood", "sleep_quality", "sleep_hours")


class FeatureError(ModelError):
    """Input to the feature pipeline has the wrong shape or content (message says which)."""


@dataclass
class DailyData:
    """A person's days: consecutive ISO calendar days (no gaps) and one float64 series per
    quantity, ``NaN`` for missing. Missing keys are filled with ``NaN`` on construction;
    unknown keys are refused."""

    days: list[str]
    series: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.days = [str(d) for d in self.days]
        n = len(self.days)
        prev = None
        for i, d in enumerate(self.days):
            try:
                cur = dt.date.fromisoformat(d)
            except ValueError:
                raise FeatureError(f"day {i} is not an ISO date (YYYY-MM-DD)") from None
            if prev is not None and cur - prev != dt.timedelta(days=1):
                raise FeatureError(
                    f"days must be consecutive calendar days without gaps (day {i} breaks it)"
                )
            prev = cur
        unknown = sorted(set(self.series) - set(SERIES_KEYS))
        if unknown:
            raise FeatureError(f"unknown series {unknown}; known: {list(SERIES_KEYS)}")
        out: dict[str, np.ndarray] = {}
        for key in SERIES_KEYS:
            if key in self.series and self.series[key] is not None:
                arr = np.asarray(self.series[key], dtype=np.float64).reshape(-1)
                if arr.shape[0] != n:
                    raise FeatureError(
                        f"series {key!r} has {arr.shape[0]} values for {n} days"
                    )
                arr = arr.copy()
                arr[~np.isfinite(arr)] = np.nan
            else:
                arr = np.full(n, np.nan)
            out[key] = arr
        self.series = out

    @classmethod
    def from_columns(cls, days, **series) -> "DailyData":
        return cls(list(days), dict(series))

    @classmethod
    def empty(cls, start: str, n_days: int) -> "DailyData":
        d0 = dt.date.fromisoformat(start)
        return cls([(d0 + dt.timedelta(days=i)).isoformat() for i in range(n_days)])

    def __len__(self) -> int:
        return len(self.days)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.series[key]

    def slice(self, start: int, stop: int) -> "DailyData":
        """Days ``start..stop-1`` (positions), as a new DailyData."""
        return DailyData(self.days[start:stop], {k: v[start:stop] for k, v in self.series.items()})

    def index_of(self, day: str) -> int:
        try:
            return self.days.index(day)
        except ValueError:
            raise FeatureError("that day is outside the data's range") from None


@dataclass
class FeatureFrame:
    """Per-day feature rows: ``X[t]`` describes day ``days[t]`` using days ``<= t`` only."""

    days: list[str]
    X: np.ndarray
    names: list[str]

    def column(self, name: str) -> np.ndarray:
        try:
            return self.X[:, self.names.index(name)]
        except ValueError:
            raise FeatureError(f"no feature named {name!r}") from None

    @property
    def n_features(self) -> int:
        return len(self.names)


@dataclass
class Examples:
    """Supervised examples: inputs of days t-window+1..t, target = readiness of day t+1.

    ``last_readiness`` is the most recent readiness answer known on the input's last day (the
    "last value" baseline), ``NaN`` when none.
    """

    X: np.ndarray
    y: np.ndarray
    target_days: list[str]
    input_end_days: list[str]
    last_readiness: np.ndarray
    window: int
    n_features: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx) -> "Examples":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Examples(
            X=self.X[idx], y=self.y[idx],
            target_days=[self.target_days[i] for i in idx],
            input_end_days=[self.input_end_days[i] for i in idx],
            last_readiness=self.last_readiness[idx], window=self.window, n_features=self.n_features,
        )


# ------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class FeatureConfig:
    baseline_days: int = 60  # HRV / RHR / sleep baseline window, days before t
    baseline_min_nights: int = 14  # fewer nights -> no baseline (NaN)
    rhr_baseline_min: int = 7
    short_days: int = 7  # rolling HRV, acute load, sleep debt, monotony
    short_min: int = 3
    acute_min: int = 4
    chronic_days: int = 28
    chronic_min: int = 14
    fitness_tau: float = 42.0
    fatigue_tau: float = 7.0
    sleep_need_min: float = 480.0
    monotony_cap: float = 10.0
    checkin_carry_cap: int = 14
    history_cap: int = 365
    z_clip: float = 5.0
    prior_weight: float = 3.0  # pseudo-days of the population prior in the expanding z-score

    def __post_init__(self) -> None:
        for name in ("baseline_days", "baseline_min_nights", "short_days", "short_min",
                     "acute_min", "chronic_days", "chronic_min", "rhr_baseline_min"):
            if int(getattr(self, name)) < 1:
                raise FeatureError(f"FeatureConfig.{name} must be >= 1")
        if self.short_min > self.short_days or self.acute_min > self.short_days:
            raise FeatureError("FeatureConfig: minimum counts cannot exceed the 7-day window")
        if self.chronic_min > self.chronic_days or self.baseline_min_nights > self.baseline_days:
            raise FeatureError("FeatureConfig: minimum counts cannot exceed their windows")
        if self.fitness_tau <= 0 or self.fatigue_tau <= 0:
            raise FeatureError("FeatureConfig: Banister time constants must be > 0")


DEFAULT_FEATURE_CONFIG = FeatureConfig()


# ------------------------------------------------------------------------------ helpers
def _window_matrix(x: np.ndarray, window: int, lag: int = 0) -> np.ndarray:
    """Row t = x[t-lag-window+1 .. t-lag] (NaN where before day 0)."""
    n = len(x)
    padded = np.concatenate([np.full(window + lag, np.nan), x])
    view = np.lib.stride_tricks.sliding_window_view(padded, window)
    # view[i] = padded[i : i+window] = x[i-window-lag .. i-lag-1]; row t needs i = t+1.
    return view[1 : n + 1]


def _count(m: np.ndarray) -> np.ndarray:
    return np.sum(np.isfinite(m), axis=1)


def _nanmean(m: np.ndarray, min_n: int) -> np.ndarray:
    n = _count(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmean(m, axis=1)
    out[n < min_n] = np.nan
    return out


def _nanstd(m: np.ndarray, min_n: int, ddof: int = 1) -> np.ndarray:
    n = _count(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanstd(m, axis=1, ddof=ddof)
    out[n < max(min_n, ddof + 1)] = np.nan
    return out


def _ffill_with_age(x: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    last = np.full(len(x), np.nan)
    age = np.full(len(x), float(cap))
    cur, cur_age = np.nan, math.inf
    for t, v in enumerate(x):
        if np.isfinite(v):
            cur, cur_age = v, 0
        else:
            cur_age += 1
        if cur_age <= cap:
            last[t] = cur
            age[t] = cur_age
        else:
            age[t] = cap
    return last, age


def _ewma(w: np.ndarray, tau: float) -> np.ndarray:
    decay = math.exp(-1.0 / tau)
    out = np.empty(len(w))
    state = 0.0
    for t, v in enumerate(w):
        state = state * decay + (1.0 - decay) * (v if np.isfinite(v) else 0.0)
        out[t] = state
    return out


# ------------------------------------------------------------------------------ raw features
RAW_FEATURES: tuple[str, ...] = (
    # HRV
    "ln_rmssd", "ln_rmssd_7d", "ln_rmssd_cv_7d", "hrv_baseline", "hrv_baseline_sd",
    "hrv_dev_today", "hrv_dev_7d", "hrv_swc", "hrv_below_swc", "ln_sdnn",
    # resting HR
    "resting_hr", "rhr_baseline", "rhr_dev",
    # sleep
    "sleep_minutes", "sleep_efficiency", "sleep_debt_7d", "sleep_sd_7d", "sleep_baseline",
    # load
    "load", "acute_load", "chronic_load", "acwr", "monotony", "strain",
    "fitness", "fatigue_load", "form",
    # heart-rate load (TRIMP), kept apart from session-RPE load
    "hr_load", "hr_acute_load", "hr_chronic_load", "hr_acwr",
    # check-ins
    "readiness", "readiness_last", "readiness_7d", "fatigue", "soreness", "stress", "mood",
    "sleep_quality", "days_since_checkin",
    # data quality
    "worn_7d", "missing_night", "missing_nights_7d", "baseline_nights", "load_known",
    "hr_load_known", "checkin_today", "history_days",
    # personal baselines the coach states reasons against (60 days before t)
    "rhr_baseline_sd", "sleep_baseline_sd", "readiness_baseline", "readiness_baseline_sd",
)


def compute_raw_features(
    data: DailyData, config: FeatureConfig = DEFAULT_FEATURE_CONFIG
) -> FeatureFrame:
    """Interpretable per-day features (see module docstring), NaN where undefined."""
    if not isinstance(data, DailyData):
        raise FeatureError("compute_raw_features needs a DailyData")
    c = config
    n = len(data)
    s = data.series
    f: dict[str, np.ndarray] = {}

    with np.errstate(divide="ignore", invalid="ignore"):
        rmssd = s["rmssd_ms"].copy()
        rmssd[~(rmssd > 0)] = np.nan
        ln = np.log(rmssd)
        sdnn = s["sdnn_ms"].copy()
        sdnn[~(sdnn > 0)] = np.nan
        f["ln_rmssd"] = ln
        f["ln_sdnn"] = np.log(sdnn)

        w7 = _window_matrix(ln, c.short_days)
        f["ln_rmssd_7d"] = _nanmean(w7, c.short_min)
        f["ln_rmssd_cv_7d"] = _nanstd(w7, c.short_min) / f["ln_rmssd_7d"]
        wb = _window_matrix(ln, c.baseline_days, lag=1)
        base = _nanmean(wb, c.baseline_min_nights)
        base_sd = _nanstd(wb, c.baseline_min_nights)
        f["hrv_baseline"] = base
        f["hrv_baseline_sd"] = base_sd
        f["hrv_dev_today"] = ln - base
        f["hrv_dev_7d"] = f["ln_rmssd_7d"] - base
        f["hrv_swc"] = 0.5 * base_sd
        below = f["ln_rmssd_7d"] < base - f["hrv_swc"]
        f["hrv_below_swc"] = np.where(
            np.isfinite(f["ln_rmssd_7d"]) & np.isfinite(base) & np.isfinite(base_sd),
            below.astype(float), np.nan,
        )

        rhr = s["resting_hr"]
        f["resting_hr"] = rhr.copy()
        f["rhr_baseline"] = _nanmean(_window_matrix(rhr, c.baseline_days, lag=1), c.rhr_baseline_min)
        f["rhr_dev"] = rhr - f["rhr_baseline"]
        f["rhr_baseline_sd"] = _nanstd(_window_matrix(rhr, c.baseline_days, lag=1), c.rhr_baseline_min)

        sleep = s["sleep_minutes"].copy()
        from_checkin = s["sleep_hours"] * 60.0
        sleep = np.where(np.isfinite(sleep), sleep, from_checkin)
        f["sleep_minutes"] = sleep
        f["sleep_efficiency"] = s["sleep_efficiency"].copy()
        ws = _window_matrix(sleep, c.short_days)
        f["sleep_debt_7d"] = np.where(
            _count(ws) > 0, np.nansum(np.maximum(0.0, c.sleep_need_min - ws), axis=1), np.nan
        )
        f["sleep_sd_7d"] = _nanstd(ws, c.short_min)
        wsb = _window_matrix(sleep, c.baseline_days, lag=1)
        f["sleep_baseline"] = _nanmean(wsb, c.short_min)
        f["sleep_baseline_sd"] = _nanstd(wsb, c.short_min)

        load = s["load"].copy()
        load[load < 0] = np.nan
        f["load"] = load
        wa = _window_matrix(load, c.short_days)
        acute = _nanmean(wa, c.acute_min)
        chronic = _nanmean(_window_matrix(load, c.chronic_days), c.chronic_min)
        f["acute_load"] = acute
        f["chronic_load"] = chronic
        f["acwr"] = np.where(chronic > 0, acute / chronic, np.nan)
        sd7 = _nanstd(wa, c.acute_min)
        mono = np.where(sd7 > 0, acute / sd7, np.where(acute > 0, c.monotony_cap, np.nan))
        mono = np.where(np.isfinite(acute) & np.isfinite(sd7), np.minimum(mono, c.monotony_cap), np.nan)
        f["monotony"] = mono
        f["strain"] = c.short_days * acute * mono
        f["fitness"] = _ewma(load, c.fitness_tau)
        f["fatigue_load"] = _ewma(load, c.fatigue_tau)
        f["form"] = f["fitness"] - f["fatigue_load"]

        hr_load = s["hr_load"].copy()
        hr_load[hr_load < 0] = np.nan
        f["hr_load"] = hr_load
        hr_acute = _nanmean(_window_matrix(hr_load, c.short_days), c.acute_min)
        hr_chronic = _nanmean(_window_matrix(hr_load, c.chronic_days), c.chronic_min)
        f["hr_acute_load"] = hr_acute
        f["hr_chronic_load"] = hr_chronic
        f["hr_acwr"] = np.where(hr_chronic > 0, hr_acute / hr_chronic, np.nan)

        ready = s["readiness"]
        f["readiness"] = ready.copy()
        last, age = _ffill_with_age(ready, c.checkin_carry_cap)
        f["readiness_last"] = last
        f["readiness_7d"] = _nanmean(_window_matrix(ready, c.short_days), 1)
        wrb = _window_matrix(ready, c.baseline_days, lag=1)
        f["readiness_baseline"] = _nanmean(wrb, c.short_min)
        f["readiness_baseline_sd"] = _nanstd(wrb, c.short_min)
        for key in ("fatigue", "soreness", "stress", "mood", "sleep_quality"):
            f[key] = s[key].copy()
        f["days_since_checkin"] = age

        wearable_any = np.zeros(n, dtype=bool)
        for key in WEARABLE_KEYS:
            wearable_any |= np.isfinite(s[key])
        worn = wearable_any.astype(float)
        f["worn_7d"] = np.nansum(_window_matrix(worn, c.short_days), axis=1)
        missing = (~np.isfinite(ln)).astype(float)
        f["missing_night"] = missing
        f["missing_nights_7d"] = np.nansum(_window_matrix(missing, c.short_days), axis=1)
        f["baseline_nights"] = _count(wb).astype(float)
        f["load_known"] = np.isfinite(load).astype(float)
        f["hr_load_known"] = np.isfinite(hr_load).astype(float)
        any_checkin = np.zeros(n, dtype=bool)
        for key in CHECKIN_KEYS:
            any_checkin |= np.isfinite(s[key])
        f["checkin_today"] = any_checkin.astype(float)
        has_any = wearable_any | any_checkin | np.isfinite(load) | np.isfinite(hr_load)
        first = int(np.argmax(has_any)) if has_any.any() else n
        hist = np.arange(n, dtype=float) - first + 1
        f["history_days"] = np.clip(hist, 0, c.history_cap)

    for k in f:
        f[k] = np.asarray(f[k], dtype=np.float64)
        f[k][~np.isfinite(f[k])] = np.nan
    X = np.stack([f[name] for name in RAW_FEATURES], axis=1) if n else np.zeros((0, len(RAW_FEATURES)))
    return FeatureFrame(days=list(data.days), X=X, names=list(RAW_FEATURES))


# ------------------------------------------------------------------------------ model features
# Continuous features z-scored against the person's own expanding past: (prior mean, prior SD)
# of the population prior that the first few days are shrunk towards. Deviation features are
# already relative to the person and are only scaled.
_ZSCORED: dict[str, tuple[float, float]] = {
    "ln_rmssd": (4.0, 0.4),
    "ln_rmssd_7d": (4.0, 0.3),
    "ln_rmssd_cv_7d": (0.05, 0.03),
    "ln_sdnn": (3.9, 0.4),
    "resting_hr": (58.0, 7.0),
    "sleep_minutes": (450.0, 60.0),
    "sleep_efficiency": (88.0, 6.0),
    "sleep_debt_7d": (150.0, 150.0),
    "sleep_sd_7d": (45.0, 30.0),
    "load": (250.0, 250.0),
    "acute_load": (250.0, 150.0),
    "chronic_load": (250.0, 120.0),
    "acwr": (1.0, 0.3),
    "monotony": (1.2, 0.6),
    "strain": (2000.0, 1500.0),
    "fitness": (250.0, 120.0),
    "fatigue_load": (250.0, 150.0),
    "form": (0.0, 80.0),
    "readiness": (5.5, 1.8),
    "readiness_last": (5.5, 1.8),
    "readiness_7d": (5.5, 1.5),
    "fatigue": (3.0, 0.8),
    "soreness": (3.0, 0.8),
    "stress": (3.0, 0.8),
    "mood": (3.0, 0.8),
    "sleep_quality": (3.0, 0.8),
}
# Heart-rate load (hr_load, hr_acute_load, hr_chronic_load, hr_acwr, hr_load_known) is a raw
# feature (coach, trend) but not yet a model feature: the model features' names and order
# are pinned by the linear head's feature-spec hash and the public prior fitted under it
# (models/linear_head.py, models/prior.py). Adding them means a new feature-spec version and
# a refitted prior.
_SCALED: dict[str, float] = {  # feature -> fixed scale (already personal deviations)
    "hrv_dev_today": 0.15,
    "hrv_dev_7d": 0.1,
    "hrv_swc": 0.05,
    "rhr_dev": 4.0,
}
_FLAGS: tuple[str, ...] = ("hrv_below_swc", "missing_night", "load_known", "checkin_today")
_COUNTS: dict[str, float] = {  # feature -> divisor to bring into [0, 1]
    "worn_7d": 7.0,
    "missing_nights_7d": 7.0,
    "baseline_nights": 60.0,
    "days_since_checkin": 14.0,
    "history_days": 365.0,
}


def _expanding_z(x: np.ndarray, prior_mean: float, prior_sd: float, k: float) -> np.ndarray:
    """z of x_t against mean/SD of the person's values on days <= t, shrunk towards the prior
    with ``k`` pseudo-observations (so day 1 is not divided by a zero SD)."""
    ok = np.isfinite(x)
    xv = np.where(ok, x, 0.0)
    n = np.cumsum(ok)
    s1 = np.cumsum(xv)
    s2 = np.cumsum(xv * xv)
    mean = (s1 + k * prior_mean) / (n + k)
    # Sum of squared deviations around the shrunk mean, plus the prior's spread.
    ss = s2 - 2 * mean * s1 + n * mean * mean
    var = (np.maximum(ss, 0.0) + k * prior_sd * prior_sd) / (n + k)
    sd = np.sqrt(np.maximum(var, (0.05 * prior_sd) ** 2))
    return np.where(ok, (x - mean) / sd, np.nan)


def model_feature_names() -> list[str]:
    names = [f"z_{k}" for k in _ZSCORED] + [f"s_{k}" for k in _SCALED]
    names += [f"flag_{k}" for k in _FLAGS] + [f"frac_{k}" for k in _COUNTS]
    names += [f"has_{k}" for k in _ZSCORED]
    names += [f"weekday_{i}" for i in range(7)]
    return names


def compute_features(data: DailyData, config: FeatureConfig = DEFAULT_FEATURE_CONFIG) -> FeatureFrame:
    """Model-ready, NaN-free float32 features (see module docstring). Strictly causal."""
    raw = compute_raw_features(data, config)
    return model_features_from_raw(raw, config)


def model_features_from_raw(raw: FeatureFrame, config: FeatureConfig = DEFAULT_FEATURE_CONFIG) -> FeatureFrame:
    cols: list[np.ndarray] = []
    present: list[np.ndarray] = []
    for name, (m0, s0) in _ZSCORED.items():
        x = raw.column(name)
        z = _expanding_z(x, m0, s0, config.prior_weight)
        cols.append(z)
        present.append(np.isfinite(x).astype(float))
    for name, scale in _SCALED.items():
        cols.append(raw.column(name) / scale)
    for name in _FLAGS:
        cols.append(raw.column(name))
    for name, div in _COUNTS.items():
        cols.append(raw.column(name) / div)
    cols.extend(present)
    # Calendar: training weeks are periodised (match day, recovery day), so the weekday of the
    # input's last day (and hence of the target day) is informative and known in advance.
    weekday = np.array([dt.date.fromisoformat(d).weekday() for d in raw.days], dtype=int)
    for i in range(7):
        cols.append((weekday == i).astype(float))
    n = len(raw.days)
    X = np.stack(cols, axis=1) if n else np.zeros((0, len(cols)))
    X = np.clip(np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0), -config.z_clip, config.z_clip)
    return FeatureFrame(days=list(raw.days), X=X.astype(np.float32), names=model_feature_names())


# ------------------------------------------------------------------------------ examples
def make_examples(
    frame: FeatureFrame, data: DailyData, window: int = 7, *, flat: bool = True
) -> Examples:
    """Examples predicting readiness of day t+1 from feature rows t-window+1..t.

    Only examples whose target (readiness of day t+1) exists and whose whole input window
    lies inside the data. ``flat``: X is [n, window*n_feat] (oldest day first), else
    [n, window, n_feat].
    """
    if window < 1:
        raise FeatureError("window must be >= 1")
    if frame.days != data.days:
        raise FeatureError("the feature frame and the data cover different days")
    X = np.asarray(frame.X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != len(frame.days):
        raise FeatureError("feature matrix must be [n_days, n_features]")
    n, n_feat = X.shape
    ready = data.series["readiness"]
    last, _ = _ffill_with_age(ready, 10**9)
    ends = [t for t in range(window - 1, n - 1) if np.isfinite(ready[t + 1])]
    if ends:
        idx = np.asarray(ends)
        stacked = np.stack([X[idx - window + 1 + k] for k in range(window)], axis=1)
    else:
        stacked = np.zeros((0, window, n_feat), dtype=np.float32)
    Xo = stacked.reshape(len(ends), window * n_feat) if flat else stacked
    return Examples(
        X=np.ascontiguousarray(Xo, dtype=np.float32),
        y=np.asarray([ready[t + 1] for t in ends], dtype=np.float32),
        target_days=[data.days[t + 1] for t in ends],
        input_end_days=[data.days[t] for t in ends],
        last_readiness=np.asarray([last[t] for t in ends], dtype=np.float32),
        window=window,
        n_features=n_feat,
    )


def make_inputs(frame: FeatureFrame, end_index: int, window: int = 7) -> np.ndarray:
    """One flat input row [1, window*n_feat] for the window ending at ``end_index`` (used by
    the coach to predict the day after ``end_index``). Days before the start repeat day 0."""
    if not 0 <= end_index < len(frame.days):
        raise FeatureError("end_index is outside the feature frame")
    idx = np.clip(np.arange(end_index - window + 1, end_index + 1), 0, None)
    return frame.X[idx].reshape(1, -1).astype(np.float32)


__all__ = [
    "SERIES_KEYS", "LOAD_KEYS", "DailyData", "FeatureFrame", "Examples", "FeatureConfig", "FeatureError",
    "DEFAULT_FEATURE_CONFIG", "RAW_FEATURES", "compute_raw_features", "compute_features",
    "model_features_from_raw", "model_feature_names", "make_examples", "make_inputs",
]
