"""The daily coach: today's readiness 0-100, a band, a recommendation and the reasons,
always stated against the person's *own* baseline.

How today's number is made (all on the device; see docs/coach.md for the plain-words version):

1. Component scores in SD units of the person's own past (positive = better than usual;
   each clipped to [-3, 3]):

   * HRV: ``0.5 * (lnRMSSD_today - normal_7d) / sd + 0.5 * (lnRMSSD_7d - baseline) / sd``
     (``normal_7d`` = mean lnRMSSD of the 7 nights before today, the baseline when fewer than
     3; baseline = mean/SD of the 60 days before today, ``sd`` floored at 0.03; one term alone
     when the other is missing): a sudden drop and a sustained one both count;
   * resting HR: ``-(RHR_today - baseline) / max(sd, 2 bpm)``;
   * sleep: ``(minutes_today - usual) / max(sd, 30 min)``;
   * check-in: ``(readiness_today - usual) / max(sd, 1)``; with no usual yet, ``(r - 6) / 2``
     (usual = mean/SD of the readiness answers of the 60 days before today);
   * load (penalty only): ``-(ACWR - 1.3) / 0.2`` when the session-RPE load's ACWR > 1.3,
     ``-(monotony - 2) / 0.5`` when its monotony > 2, and ``-(ACWR_hr - 1.3) / 0.2`` when the
     heart-rate load's (TRIMP) own ACWR > 1.3: the worst of these. The two kinds of load are
     compared each with its own past, never added together (different units).

2. Rules score ``z_rules`` = weighted mean of the available components (weights
   check-in 1.0, HRV 0.35, resting HR 0.20, sleep 0.15, load 0.20).

3. With a trained model and at least ``min_baseline_days`` (14) baseline days, the model's
   forecast of today's readiness (from the days up to yesterday) is turned into the same units,
   ``z_model = (forecast - person's mean) / person's scale``, and
   ``z = (1 - model_weight) * z_rules + model_weight * z_model`` (model_weight 0.5, halved
   once today's readiness answer is in). Below 14 baseline days: rules only. A check-in the
   person marked as an override sets ``z = z_checkin`` alone.

4. ``readiness = clip(75 + 12.5 * z, 0, 100)``: 75 is a usual day for *you*.
   Bands: green ``>= 65``, yellow ``45 <= r < 65``, red ``< 45`` (edges belong to the better
   band). Recommendation: green -> "as planned", yellow -> "lighter", red -> "rest".

The literature's overreaching rule is a reason, not a verdict (issue 18): sustained HRV
suppression — the 7-day lnRMSSD mean below ``baseline - SWC`` (SWC = 0.5 x baseline SD) on at
least 4 of the last 5 days — together with high load on at least 3 of the last 7 days
(session-RPE ACWR >= 1.5 or Foster monotony >= 2.0, or heart-rate-load ACWR >= 1.5). After
Plews et al. 2012/2013 (7-day lnRMSSD vs the SWC band), Foster 1998 (monotony > 2 with
illness), Gabbett 2016 (ACWR > 1.5 with injury) and the ECSS/ACSM consensus (Meeusen et al.
2013). When it holds it is the first reason and ``overreaching`` is set; it no longer changes
the recommendation: measured on SoccerMon, ACWR > 1.5 and monotony > 2 predict a low week at
chance (docs/evaluation.md, early warning).

The 7-day warning (``warning``, :mod:`restwise.models.warning`): the risk of a low week in the
next 7 days from the shipped warning prior, shown only above the operating point chosen on
validation data, with its measured record in plain words and the literature's rules that hold
today as reasons, each with its own record.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.features import (
    DEFAULT_FEATURE_CONFIG,
    DailyData,
    FeatureConfig,
    FeatureFrame,
    compute_raw_features,
    make_inputs,
    model_features_from_raw,
)
from restwise.models.warning import warning_today

BANDS = ("green", "yellow", "red")
AS_PLANNED = "as planned"
LIGHTER = "lighter"
REST = "rest"
OVERREACHING = "overreaching risk — talk to your coach"
RECOMMENDATIONS = (AS_PLANNED, LIGHTER, REST, OVERREACHING)


class CoachError(ModelError):
    """The coach cannot give advice for this input (message says why)."""


@dataclass(frozen=True)
class CoachConfig:
    usual_score: float = 75.0
    points_per_sd: float = 12.5
    green_from: float = 65.0
    red_below: float = 45.0
    min_baseline_days: int = 14
    full_confidence_days: int = 28
    model_weight: float = 0.5
    # The person's own readiness answer weighs as much as the objective signals together:
    # subjective measures track training stress at least as well (Saw et al. 2016).
    weights: tuple[tuple[str, float], ...] = (
        ("hrv", 0.35), ("checkin", 1.0), ("rhr", 0.20), ("sleep", 0.15), ("load", 0.20),
    )
    # overreaching rule
    suppressed_days: int = 4
    suppressed_window: int = 5
    high_load_days: int = 3
    high_load_window: int = 7
    acwr_high: float = 1.5
    monotony_high: float = 2.0
    # the model is blended in only if it beat "same as the last answer" on recent days
    trust_window: int = 28
    trust_min_days: int = 7

    def __post_init__(self) -> None:
        if not self.red_below < self.green_from:
            raise CoachError("CoachConfig: red_below must be below green_from")
        if not 0.0 <= self.model_weight <= 1.0:
            raise CoachError("CoachConfig: model_weight must be in [0, 1]")
        if self.min_baseline_days < 1 or self.full_confidence_days < self.min_baseline_days:
            raise CoachError("CoachConfig: need 1 <= min_baseline_days <= full_confidence_days")


DEFAULT_COACH_CONFIG = CoachConfig()


@dataclass(frozen=True)
class CoachAdvice:
    day: str
    readiness: int  # 0-100, 75 = a usual day for this person
    band: str  # green / yellow / red
    recommendation: str
    reasons: tuple[str, ...]  # at most three, most important first
    confidence: float  # 0-1
    confidence_label: str  # low / medium / high
    baseline_days: int  # days with data among the 60 before today
    rules_only: bool
    overreaching: bool
    model_readiness: float | None = None  # the model's forecast on the 0-10 check-in scale
    components: dict = field(default_factory=dict)  # component -> SD units (for the curious)
    model_note: str | None = None  # why the model was or was not blended in
    warning: dict | None = None  # the 7-day warning (models.warning.WarningAdvice.to_dict); None: no readiness

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def band_for(readiness: float, config: CoachConfig = DEFAULT_COACH_CONFIG) -> str:
    """Green at or above ``green_from``, red below ``red_below``, yellow in between."""
    if readiness >= config.green_from:
        return "green"
    if readiness >= config.red_below:
        return "yellow"
    return "red"


def recommendation_for(band: str, overreaching: bool = False) -> str:
    if overreaching:
        return OVERREACHING
    return {"green": AS_PLANNED, "yellow": LIGHTER, "red": REST}[band]


def score_from_z(z: float, config: CoachConfig = DEFAULT_COACH_CONFIG) -> float:
    return float(np.clip(config.usual_score + config.points_per_sd * z, 0.0, 100.0))


@dataclass(frozen=True)
class _Reason:
    impact: float  # weight x |z|; the larger, the more it explains today's number
    text: str


def _fin(x) -> bool:
    return x is not None and math.isfinite(float(x))


def _pct(ratio: float) -> str:
    return f"{abs(ratio - 1) * 100:.0f}%"


def _extend_to(data: DailyData, today: str) -> DailyData:
    last = dt.date.fromisoformat(data.days[-1])
    target = dt.date.fromisoformat(today)
    extra = (target - last).days
    if extra <= 0:
        return data
    days = data.days + [(last + dt.timedelta(days=i + 1)).isoformat() for i in range(extra)]
    return DailyData(days, {k: np.concatenate([v, np.full(extra, np.nan)]) for k, v in data.series.items()})


def overreaching_risk(raw, t: int, config: CoachConfig = DEFAULT_COACH_CONFIG) -> bool:
    """The documented rule on the raw feature frame at day index ``t``."""
    below = raw.column("hrv_below_swc")[max(0, t - config.suppressed_window + 1) : t + 1]
    suppressed = int(np.nansum(below == 1.0)) >= config.suppressed_days
    lo = max(0, t - config.high_load_window + 1)
    acwr = raw.column("acwr")[lo : t + 1]
    mono = raw.column("monotony")[lo : t + 1]
    hr_acwr = raw.column("hr_acwr")[lo : t + 1]
    high = (
        (np.nan_to_num(acwr, nan=0.0) >= config.acwr_high)
        | (np.nan_to_num(mono, nan=0.0) >= config.monotony_high)
        | (np.nan_to_num(hr_acwr, nan=0.0) >= config.acwr_high)
    )
    return bool(suppressed and int(high.sum()) >= config.high_load_days)


def coach_today(
    data: DailyData,
    model=None,
    *,
    today: str | None = None,
    config: CoachConfig = DEFAULT_COACH_CONFIG,
    feature_config: FeatureConfig = DEFAULT_FEATURE_CONFIG,
    override: bool = False,
    warning_weights: np.ndarray | None = None,
) -> CoachAdvice:
    """Today's advice from the person's days (``today`` defaults to the last day of ``data``;
    a later day extends the data with empty days). ``model``: a :class:`Forecaster` (e.g. the
    released linear head, ``models.linear_head_architecture.LinearHeadForecaster``), a trained
    :class:`~restwise.models.network.RecoveryNet` whose personal part was fitted, or None.
    Either way it is blended in only when it beats "same as your last answer" on the person's
    recent days (:func:`model_earns_trust`). ``override``: today's readiness answer was the
    person's correction of the coach; it then sets the number alone (the person knows best).
    ``warning_weights``: a released early-warning model the device holds (default: the
    shipped prior's)."""
    if not isinstance(data, DailyData) or len(data) == 0:
        raise CoachError("the coach needs at least one day of data")
    today = today or data.days[-1]
    try:
        dt.date.fromisoformat(today)
    except (TypeError, ValueError):
        raise CoachError("today must be a day written YYYY-MM-DD") from None
    if today < data.days[0]:
        raise CoachError("today is before the first day of data")
    data = _extend_to(data, today)
    t = data.index_of(today)
    raw = compute_raw_features(data, feature_config)

    def col(name: str) -> float:
        v = float(raw.column(name)[t])
        return v if math.isfinite(v) else float("nan")

    s = data.series
    comps: dict[str, float] = {}
    reasons: list[_Reason] = []
    w = dict(config.weights)

    # --- baseline days: days with any wearable value or check-in among the 60 before today
    lo = max(0, t - feature_config.baseline_days)
    any_data = np.zeros(t - lo, dtype=bool)
    for key in ("rmssd_ms", "sdnn_ms", "resting_hr", "sleep_minutes", "readiness"):
        any_data |= np.isfinite(s[key][lo:t])
    baseline_days = int(any_data.sum())

    # --- HRV: today against the recent 7-day normal, and the 7-day mean against the baseline
    base, sd = col("hrv_baseline"), col("hrv_baseline_sd")
    ln_today, ln_7d = col("ln_rmssd"), col("ln_rmssd_7d")
    prev = np.log(s["rmssd_ms"][max(0, t - 7) : t])
    prev = prev[np.isfinite(prev)]
    recent = float(prev.mean()) if prev.size >= feature_config.short_min else float("nan")
    if _fin(base) and _fin(sd):
        sdf = max(sd, 0.03)
        acute_ref = recent if _fin(recent) else base
        terms = []
        if _fin(ln_today):
            terms.append((ln_today - acute_ref) / sdf)
        if _fin(ln_7d):
            terms.append((ln_7d - base) / sdf)
        if terms:
            comps["hrv"] = float(np.clip(np.mean(terms), -3, 3))
        if _fin(ln_today):
            ratio = math.exp(ln_today - acute_ref)
            ref = "your 7-day normal" if _fin(recent) else "your baseline"
            word = "below" if ratio < 1 else "above"
            reasons.append(_Reason(w["hrv"] * abs(ln_today - acute_ref) / sdf / 2,
                                   f"HRV {_pct(ratio)} {word} {ref}"))
        if _fin(ln_7d):
            ratio = math.exp(ln_7d - base)
            word = "below" if ratio < 1 else "above"
            extra = (", outside your normal range" if col("hrv_below_swc") == 1.0 else "")
            reasons.append(_Reason(w["hrv"] * abs(ln_7d - base) / sdf / 2,
                                   f"7-day HRV average {_pct(ratio)} {word} your baseline{extra}"))
    elif _fin(ln_today) and _fin(recent):
        # No baseline yet: say how today compares with the last week, without scoring it.
        ratio = math.exp(ln_today - recent)
        word = "below" if ratio < 1 else "above"
        reasons.append(_Reason(0.01, f"HRV {_pct(ratio)} {word} your 7-day normal"))

    # --- resting HR
    rhr, rhr_base, rhr_sd = col("resting_hr"), col("rhr_baseline"), col("rhr_baseline_sd")
    if _fin(rhr) and _fin(rhr_base):
        z = -(rhr - rhr_base) / max(rhr_sd if _fin(rhr_sd) else 0.0, 2.0)
        comps["rhr"] = float(np.clip(z, -3, 3))
        diff = rhr - rhr_base
        word = "above" if diff >= 0 else "below"
        reasons.append(_Reason(w["rhr"] * abs(comps["rhr"]),
                               f"resting HR {abs(diff):.0f} bpm {word} your baseline"))

    # --- sleep
    sleep, usual, ssd = col("sleep_minutes"), col("sleep_baseline"), col("sleep_baseline_sd")
    if _fin(sleep) and _fin(usual):
        z = (sleep - usual) / max(ssd if _fin(ssd) else 0.0, 30.0)
        comps["sleep"] = float(np.clip(z, -3, 3))
        diff = (sleep - usual) / 60
        word = "less" if diff < 0 else "more"
        reasons.append(_Reason(
            w["sleep"] * abs(comps["sleep"]),
            f"slept {sleep / 60:.1f} h, {abs(diff):.1f} h {word} than your usual {usual / 60:.1f} h",
        ))

    # --- check-in
    ready, r_base, r_sd = col("readiness"), col("readiness_baseline"), col("readiness_baseline_sd")
    if _fin(ready):
        if _fin(r_base):
            z = (ready - r_base) / max(r_sd if _fin(r_sd) else 0.0, 1.0)
            text = f"you rated your readiness {ready:g}/10; your usual is {r_base:.1f}"
        else:
            z = (ready - 6.0) / 2.0
            text = f"you rated your readiness {ready:g}/10"
        comps["checkin"] = float(np.clip(z, -3, 3))
        reasons.append(_Reason(w["checkin"] * abs(comps["checkin"]), text))

    # --- load (penalty only): each kind against its own past, never summed
    acwr, mono, hr_acwr = col("acwr"), col("monotony"), col("hr_acwr")
    penalties = []
    for ratio, what in ((acwr, "session-RPE load"), (hr_acwr, "heart-rate load (TRIMP)")):
        if not _fin(ratio):
            continue
        if ratio > 1.3:
            penalties.append(-(ratio - 1.3) / 0.2)
        word_impact = w["load"] * abs(min(0.0, -(ratio - 1.3) / 0.2)) if ratio > 1.3 else 0.05 * abs(ratio - 1)
        reasons.append(_Reason(word_impact, f"acute {what} {ratio:.1f}x your chronic {what}"))
    if _fin(mono) and mono > 2.0:
        penalties.append(-(mono - 2.0) / 0.5)
        reasons.append(_Reason(
            w["load"] * (mono - 2.0) / 0.5,
            f"training monotony {mono:.1f} (similar session-RPE load day after day; above 2 raises risk)",
        ))
    if penalties:
        comps["load"] = float(np.clip(min(penalties), -3, 0))

    if comps:
        total_w = sum(w[k] for k in comps)
        z_rules = sum(w[k] * v for k, v in comps.items()) / total_w
    else:
        z_rules = 0.0

    # --- model blend (the model forecasts today from the days up to yesterday; once today's
    # own readiness answer is in, the forecast counts half as much)
    rules_only = True
    model_readiness = None
    model_note = None
    z = z_rules
    model_weight = config.model_weight * (0.5 if "checkin" in comps else 1.0)
    forecaster = as_forecaster(model)
    if forecaster is not None and baseline_days >= config.min_baseline_days and t >= 1:
        frame = model_features_from_raw(raw, feature_config)
        not_usable = forecaster.unusable(frame)
        if not_usable is None:
            trusted, model_note = model_earns_trust(forecaster, data, frame, t, config)
        else:
            trusted, model_note = False, not_usable
        today_forecast = forecaster.forecast(data, frame, [t])[0] if trusted else None
        if today_forecast is not None:
            model_readiness, mean, scale = today_forecast
            z_model = float(np.clip((model_readiness - mean) / scale, -3, 3))
            comps["model"] = z_model
            z = (1 - model_weight) * z_rules + model_weight * z_model
            rules_only = False
            word = "below" if model_readiness < mean else "above"
            reasons.append(_Reason(
                model_weight * abs(z_model),
                f"your model expects readiness {model_readiness:.1f}/10 today, {word} "
                f"your average {mean:.1f}",
            ))

    if override and "checkin" in comps:
        z = comps["checkin"]
        reasons.append(_Reason(1e9, "you corrected the coach today: your own answer sets the number"))

    readiness = score_from_z(z, config)
    readiness_int = int(round(readiness))
    band = band_for(readiness_int, config)
    over = overreaching_risk(raw, t, config)
    recommendation = recommendation_for(band)  # the rule is a reason below, not a verdict
    warning = None
    if np.isfinite(s["readiness"][: t + 1]).any():
        warning = warning_today(data, today=today, raw=raw, weights=warning_weights).to_dict()

    # --- confidence
    history = min(1.0, baseline_days / config.full_confidence_days)
    coverage = sum(1 for k in ("hrv", "rhr", "sleep", "checkin") if k in comps) / 4
    conf = 0.1 + 0.6 * history * (0.4 + 0.6 * coverage) + (0.2 if not rules_only else 0.0)
    if baseline_days < config.min_baseline_days:
        conf = min(conf, 0.35)
    conf = float(np.clip(conf, 0.0, 1.0))
    label = "low" if conf < 0.4 else "medium" if conf < 0.7 else "high"

    ordered = sorted(reasons, key=lambda r: -r.impact)
    texts = [r.text for r in ordered[:3]]
    if over:
        texts = ["HRV suppressed for days while training load stays high (a literature rule: a reason "
                 "to look closer, not a verdict)"] + texts[:2]
    if baseline_days < config.min_baseline_days:
        note = (f"building your baseline: {baseline_days} of {config.min_baseline_days} days "
                "(rules only until then)")
        texts = (texts[:2] + [note]) if len(texts) >= 3 else texts + [note]

    return CoachAdvice(
        day=today,
        readiness=readiness_int,
        band=band,
        recommendation=recommendation,
        reasons=tuple(texts[:3]),
        confidence=round(conf, 2),
        confidence_label=label,
        baseline_days=baseline_days,
        rules_only=rules_only,
        overreaching=over,
        model_readiness=None if model_readiness is None else round(model_readiness, 2),
        components={k: round(v, 3) for k, v in comps.items()},
        model_note=model_note,
        warning=warning,
    )


class Forecaster(Protocol):
    """A model as the coach uses it: the forecast of day j's readiness made on day j-1."""

    label: str

    def unusable(self, frame: FeatureFrame) -> str | None:
        """Why the model cannot be used for this person (None: it can); CoachError when it
        was made for other features."""

    def forecast(self, data: DailyData, frame: FeatureFrame,
                 targets: Sequence[int]) -> list[tuple[float, float, float] | None]:
        """Per target day index j: (forecast on the 0-10 scale, the person's mean, their
        scale), from the days before j only; None when none can be made."""


@dataclass(frozen=True)
class NetworkForecaster:
    """The recovery network (shared part + the person's fitted personal part)."""

    model: Any
    label: str = "recovery network"

    def unusable(self, frame: FeatureFrame) -> str | None:
        if frame.n_features != self.model.config.n_features:
            raise CoachError("the stored model was trained on a different feature set; retrain it")
        if float(self.model.personal.fitted.item()) <= 0:
            return "the model's personal part is not fitted yet"
        return None

    def forecast(self, data: DailyData, frame: FeatureFrame,
                 targets: Sequence[int]) -> list[tuple[float, float, float] | None]:
        from restwise.models.training import predict  # late: torch only when a network is used

        if not targets:
            return []
        x = np.concatenate([make_inputs(frame, j - 1, self.model.config.window) for j in targets])
        pred, _ = predict(self.model, x, snap=False)
        mean = float(self.model.personal.target_mean.item())
        scale = float(self.model.personal.target_scale.item())
        return [(float(p), mean, scale) for p in pred]


def as_forecaster(model) -> Forecaster | None:
    """``model`` as the coach uses it: a Forecaster as it is, a recovery network wrapped."""
    if model is None or hasattr(model, "forecast"):
        return model
    return NetworkForecaster(model)


def model_earns_trust(forecaster: Forecaster, data: DailyData, frame: FeatureFrame, t: int,
                      config: CoachConfig) -> tuple[bool, str]:
    """Does the model forecast this person's readiness better than their own last answer?

    A backtest on the person's recent days (up to ``trust_window`` days before today, each
    forecast from the days before it, exactly as today's is made): the model is blended in only
    when it has at least ``trust_min_days`` scored days and its mean absolute error is no worse
    than "tomorrow = the last answer". A federated model early in training, or one wrecked by
    privacy noise on a tiny cohort, then cannot move anyone's advice.
    """
    readiness = data.series.get("readiness")
    if readiness is None:
        return False, "no readiness answers to check the model against"
    r = np.asarray(readiness, dtype=float)
    days = [j for j in range(max(1, t - config.trust_window), t) if np.isfinite(r[j])]
    last = [r[: j][np.isfinite(r[: j])] for j in days]
    pairs = [(j, lv[-1]) for j, lv in zip(days, last) if lv.size]
    forecasts = forecaster.forecast(data, frame, [j for j, _ in pairs]) if pairs else []
    scored = [(f[0], lv, r[j]) for (j, lv), f in zip(pairs, forecasts) if f is not None]
    if len(scored) < config.trust_min_days:
        return False, (f"model not used yet: {len(scored)} of {config.trust_min_days} recent "
                       "answered days to check it against")
    pred, last_values, truth = (np.array(v, dtype=float) for v in zip(*scored))
    mae_model = float(np.mean(np.abs(pred - truth)))
    mae_last = float(np.mean(np.abs(last_values - truth)))
    if mae_model <= mae_last:
        return True, (f"model used: recent error {mae_model:.2f} vs {mae_last:.2f} for "
                      "'same as your last answer'")
    return False, (f"model not used: recent error {mae_model:.2f} is worse than "
                   f"{mae_last:.2f} for 'same as your last answer'")


__all__ = [
    "CoachAdvice", "CoachConfig", "CoachError", "DEFAULT_COACH_CONFIG", "BANDS", "RECOMMENDATIONS",
    "AS_PLANNED", "LIGHTER", "REST", "OVERREACHING", "band_for", "recommendation_for",
    "score_from_z", "overreaching_risk", "coach_today", "Forecaster", "NetworkForecaster", "as_forecaster",
    "model_earns_trust",
]
