"""The daily coach: band edges, rules-only regime, reasons against the person's baseline,
the overreaching rule, the model blend."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from restwise.models.coach import (
    AS_PLANNED,
    LIGHTER,
    OVERREACHING,
    REST,
    CoachAdvice,
    CoachError,
    band_for,
    coach_today,
    recommendation_for,
    score_from_z,
)
from restwise.models.features import DailyData, compute_features, make_examples
from restwise.models.warning import load_record
from restwise.models.network import ModelConfig, build_model
from restwise.models.training import train_local

NAN = float("nan")


def checkin_only(n_before: int, today_answer: float) -> DailyData:
    """``n_before`` days answering 6 (SD 0 -> the floor of 1), then today's answer."""
    return DailyData.from_columns(
        DailyData.empty("2024-03-01", n_before + 1).days,
        readiness=[6.0] * n_before + [today_answer],
    )


# ------------------------------------------------------------------ band edges
def test_band_edges_belong_to_the_better_band():
    assert band_for(100) == band_for(65) == "green"
    assert band_for(64.99) == band_for(45) == "yellow"
    assert band_for(44.99) == band_for(0) == "red"
    assert [recommendation_for(b, False) for b in ("green", "yellow", "red")] == [AS_PLANNED, LIGHTER, REST]
    assert recommendation_for("green", True) == OVERREACHING
    assert score_from_z(0) == 75 and score_from_z(-0.8) == 65 and score_from_z(-2.4) == 45
    assert score_from_z(10) == 100 and score_from_z(-10) == 0


@pytest.mark.parametrize(
    "answer,readiness,band,rec",
    [
        (5.2, 65, "green", AS_PLANNED),  # z = -0.8 exactly at the green edge
        (5.1, 64, "yellow", LIGHTER),  # 63.75 -> 64
        (3.6, 45, "yellow", LIGHTER),  # z = -2.4 exactly at the red edge
        (3.5, 44, "red", REST),  # 43.75 -> 44
    ],
)
def test_coach_at_the_band_edges(answer, readiness, band, rec):
    advice = coach_today(checkin_only(20, answer))
    assert advice.components == {"checkin": pytest.approx(answer - 6.0)}
    assert (advice.readiness, advice.band, advice.recommendation) == (readiness, band, rec)
    assert advice.reasons[0] == f"you rated your readiness {answer:g}/10; your usual is 6.0"


# ------------------------------------------------------------------ rules-only regime
def _trained_model(data: DailyData):
    ex = make_examples(compute_features(data), data)
    model = build_model(ModelConfig(n_features=ex.n_features, window=ex.window, seed=0))
    train_local(model, ex, epochs=2)
    return model


def _hrv_person(n: int, seed: int = 0) -> DailyData:
    rng = np.random.default_rng(seed)
    return DailyData.from_columns(
        DailyData.empty("2024-01-01", n).days,
        rmssd_ms=np.exp(rng.normal(4.0, 0.08, n)),
        resting_hr=rng.normal(52, 1.5, n),
        readiness=np.round(rng.normal(6, 1.2, n)).clip(0, 10),
        load=rng.uniform(100, 400, n),
    )


def test_rules_only_below_14_baseline_days_then_blended():
    data = _hrv_person(80)
    model = _trained_model(data)
    early = coach_today(data.slice(0, 11), model)  # 10 baseline days before today
    assert early.baseline_days == 10 and early.rules_only and early.model_readiness is None
    assert early.confidence <= 0.35 and early.confidence_label == "low"
    assert "building your baseline: 10 of 14 days" in early.reasons[-1]
    edge = coach_today(data.slice(0, 15), model)  # exactly 14 baseline days
    assert edge.baseline_days == 14 and not edge.rules_only
    later = coach_today(data, model)
    assert not later.rules_only and later.model_readiness is not None
    assert later.confidence > early.confidence


def test_model_blend_follows_the_documented_formula():
    data = _hrv_person(80)
    data.series["readiness"][-1] = NAN  # no answer today -> model weight 0.5
    model = _trained_model(data)
    rules = coach_today(data)
    blended = coach_today(data, model)
    zm = blended.components["model"]
    mean = float(model.personal.target_mean)
    scale = float(model.personal.target_scale)
    assert zm == pytest.approx((blended.model_readiness - mean) / scale, abs=2e-3)
    z_rules = (rules.readiness - 75) / 12.5
    assert blended.readiness == pytest.approx(75 + 12.5 * (0.5 * z_rules + 0.5 * zm), abs=1.0)


def test_no_model_and_rules_only_are_the_same_advice():
    data = _hrv_person(40)
    assert coach_today(data) == coach_today(data, None)


# ------------------------------------------------------------------ reasons
def test_reasons_are_stated_against_the_persons_own_baseline():
    n = 40
    rmssd = [50.0] * (n - 1) + [43.0]  # 14% below the 7-day normal of 50
    rhr = [50.0] * (n - 1) + [55.0]  # 5 bpm above the baseline
    week = np.array([0, 300, 250, 300, 0, 250, 400], dtype=float)  # rest days: monotony < 2
    load = np.concatenate([np.tile(week, 5)[: n - 7], 2 * np.roll(week, -((n - 7) % 7))])
    data = DailyData.from_columns(DailyData.empty("2024-01-01", n).days,
                                  rmssd_ms=rmssd, resting_hr=rhr, load=load)
    advice = coach_today(data)
    acwr = load[-7:].mean() / load[-28:].mean()
    assert round(acwr, 1) == 1.6
    assert sorted(advice.reasons) == sorted([
        "HRV 14% below your 7-day normal",
        "resting HR 5 bpm above your baseline",
        "acute session-RPE load 1.6x your chronic session-RPE load",
    ])
    assert advice.components["load"] == pytest.approx(-(acwr - 1.3) / 0.2)
    assert advice.components["rhr"] == -2.5  # 5 bpm / the 2 bpm floor


def test_advice_is_frozen_and_serialisable():
    advice = coach_today(checkin_only(20, 6.0))
    assert isinstance(advice, CoachAdvice)
    with pytest.raises(dataclasses.FrozenInstanceError):
        advice.readiness = 1  # type: ignore[misc]
    d = advice.to_dict()
    assert d["readiness"] == 75 and d["band"] == "green" and isinstance(d["reasons"], list)


def test_override_sets_the_number_from_the_persons_answer():
    data = _hrv_person(60)
    data.series["readiness"][:-1] = 6.0
    data.series["readiness"][-1] = 3.0
    normal = coach_today(data)
    corrected = coach_today(data, override=True)
    assert corrected.readiness == round(75 + 12.5 * -3.0) == 38
    assert corrected.band == "red" and corrected.readiness <= normal.readiness
    assert corrected.reasons[0].startswith("you corrected the coach")


def test_bad_input_is_refused_clearly():
    with pytest.raises(CoachError, match="at least one day"):
        coach_today(DailyData([]))
    with pytest.raises(CoachError, match="YYYY-MM-DD"):
        coach_today(checkin_only(3, 6), today="yesterday")
    with pytest.raises(CoachError, match="before the first day"):
        coach_today(checkin_only(3, 6), today="2020-01-01")


def test_today_after_the_data_extends_with_empty_days():
    data = checkin_only(20, 6.0)
    advice = coach_today(data, today="2024-03-25")
    assert advice.day == "2024-03-25" and advice.components == {}
    assert advice.readiness == 75


# ------------------------------------------------------------------ overreaching
def _overreaching_case(hrv_drop: bool, load_jump: bool) -> DailyData:
    n = 70
    rng = np.random.default_rng(3)
    ln = rng.normal(math.log(60), 0.05, n)
    if hrv_drop:
        ln[-8:] = math.log(40)
    week = np.array([0, 300, 250, 300, 0, 250, 400], dtype=float)  # rest days: monotony < 2
    load = np.tile(week, 10)[:n]
    if load_jump:
        load[-10:] *= 2.2
    return DailyData.from_columns(DailyData.empty("2024-01-01", n).days,
                                  rmssd_ms=np.exp(ln), load=load)


def test_overreaching_needs_both_sustained_hrv_suppression_and_high_load():
    both = coach_today(_overreaching_case(True, True))
    # the literature's rule is the first reason, not a verdict: the recommendation follows the band
    assert both.overreaching and both.recommendation == recommendation_for(both.band) != OVERREACHING
    assert both.reasons[0].startswith("HRV suppressed for days while training load stays high")
    assert "not a verdict" in both.reasons[0]
    assert both.warning is None  # no readiness answers: no 7-day warning
    assert not coach_today(_overreaching_case(True, False)).overreaching
    assert not coach_today(_overreaching_case(False, True)).overreaching


def _low_stretch(low_from: int, n: int = 120, past_lows: bool = False) -> DailyData:
    rng = np.random.default_rng(5)
    ready = np.clip(np.round(rng.normal(7, 0.4, n)), 1, 10)
    if past_lows:  # a person who has had low weeks before (their own rate of low weeks is high)
        for start in range(10, low_from - 14, 14):
            ready[start : start + 5] = 4
    ready[low_from:] = 3  # answers at the person's low from here on
    return DailyData.from_columns(DailyData.empty("2024-01-01", n).days, readiness=ready)


def test_seven_day_warning_is_shown_at_its_operating_point_with_its_record():
    calm = coach_today(_low_stretch(200), today="2024-04-20")
    low = coach_today(_low_stretch(105), today="2024-04-20")  # day 110: a low stretch under way
    again = coach_today(_low_stretch(105, past_lows=True), today="2024-04-20")
    for advice in (calm, low, again):
        w = advice.warning
        assert 0.0 <= w["risk"] <= 1.0 and w["record"] == load_record().sentence()
        assert w["record"].startswith("in past data") and "public prior" in w["model"]
        assert w["shown"] == (w["risk"] > w["operating_point"])
    assert calm.warning["risk"] < low.warning["risk"] < again.warning["risk"]
    assert again.warning["shown"] and not calm.warning["shown"]
    assert any("at or below your usual low" in r for r in low.warning["reasons"])
    early = coach_today(_low_stretch(200), today="2024-01-10")
    assert early.warning["risk"] is None and "not enough answers" in early.warning["note"]


def test_a_model_worse_than_the_last_answer_is_not_blended_in():
    """The trust gate: a wrecked model (e.g. a federated model ruined by noise on a tiny cohort)
    must not move the advice; a model that beats 'same as the last answer' is used."""
    from restwise.models.network import set_shared_arrays, shared_arrays

    data = _hrv_person(80)
    good = _trained_model(data)
    used = coach_today(data, good)
    assert not used.rules_only and used.model_note.startswith("model used")
    wrecked = _trained_model(data)
    rng = np.random.default_rng(1)
    set_shared_arrays(wrecked, [a + rng.normal(0, 5.0, a.shape).astype(a.dtype)
                                for a in shared_arrays(wrecked)])
    advice = coach_today(data, wrecked)
    assert advice.rules_only and advice.model_readiness is None
    assert "model" not in advice.components
    assert advice.model_note.startswith("model not used: recent error")
    assert advice.readiness == coach_today(data).readiness
