"""Features against hand-computed values on tiny series, causality, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from restwise.models.features import (
    DailyData,
    FeatureConfig,
    FeatureError,
    compute_features,
    compute_raw_features,
    make_examples,
)

NAN = float("nan")


def days(n, start="2024-01-01"):
    return DailyData.empty(start, n).days


def raw(data, cfg=FeatureConfig()):
    return compute_raw_features(data, cfg)


# ------------------------------------------------------------------ DailyData validation
def test_dailydata_refuses_gaps_unknown_series_and_wrong_lengths():
    with pytest.raises(FeatureError, match="consecutive"):
        DailyData(["2024-01-01", "2024-01-03"])
    with pytest.raises(FeatureError, match="ISO"):
        DailyData(["01.01.2024"])
    with pytest.raises(FeatureError, match="unknown series"):
        DailyData.from_columns(days(2), hrv=[1, 2])
    with pytest.raises(FeatureError, match="has 3 values for 2 days"):
        DailyData.from_columns(days(2), load=[1, 2, 3])


def test_dailydata_fills_missing_series_and_nonfinite_with_nan():
    d = DailyData.from_columns(days(3), load=[1.0, float("inf"), None])
    assert np.isnan(d["rmssd_ms"]).all()
    assert d["load"][0] == 1.0 and np.isnan(d["load"][1]) and np.isnan(d["load"][2])


# ------------------------------------------------------------------ HRV
def test_ln_rmssd_rolling_mean_and_cv_by_hand():
    r = [50.0, 60.0, NAN, 40.0, 55.0, 45.0, 70.0, 65.0]
    f = raw(DailyData.from_columns(days(8), rmssd_ms=r))
    ln = np.log([50, 60, 40, 55, 45, 70])  # days 0..6 without the missing night
    assert f.column("ln_rmssd")[0] == pytest.approx(math.log(50))
    assert np.isnan(f.column("ln_rmssd")[2])
    # Fewer than 3 nights -> undefined
    assert np.isnan(f.column("ln_rmssd_7d")[1])
    assert f.column("ln_rmssd_7d")[3] == pytest.approx(np.mean(np.log([50, 60, 40])))
    assert f.column("ln_rmssd_7d")[6] == pytest.approx(ln.mean())
    assert f.column("ln_rmssd_cv_7d")[6] == pytest.approx(ln.std(ddof=1) / ln.mean())
    # Day 7 window = days 1..7 (day 0 drops out)
    w = np.log([60, 40, 55, 45, 70, 65])
    assert f.column("ln_rmssd_7d")[7] == pytest.approx(w.mean())


def test_hrv_baseline_swc_band_and_missing_flags():
    cfg = FeatureConfig(baseline_days=5, baseline_min_nights=3, short_days=3, short_min=2,
                        acute_min=2, chronic_days=5, chronic_min=2)
    r = [50.0, 52.0, 48.0, NAN, 51.0, 40.0, 38.0]
    f = raw(DailyData.from_columns(days(7), rmssd_ms=r), cfg)
    ln = np.log(np.array(r))
    # Day 4: baseline over days 0..3 (before today) = 3 nights
    b = np.log([50, 52, 48])
    assert f.column("hrv_baseline")[4] == pytest.approx(b.mean())
    assert f.column("hrv_baseline_sd")[4] == pytest.approx(b.std(ddof=1))
    assert f.column("hrv_swc")[4] == pytest.approx(0.5 * b.std(ddof=1))
    assert np.isnan(f.column("hrv_baseline")[2])  # only 2 nights before day 2
    # Day 6: baseline days 1..5, 7-day(here 3-day) mean days 4..6
    b6 = np.log([52, 48, 51, 40])
    m6 = np.mean(ln[[4, 5, 6]])
    assert f.column("hrv_dev_7d")[6] == pytest.approx(m6 - b6.mean())
    assert f.column("hrv_dev_today")[6] == pytest.approx(ln[6] - b6.mean())
    below = m6 < b6.mean() - 0.5 * b6.std(ddof=1)
    assert below and f.column("hrv_below_swc")[6] == 1.0
    assert f.column("hrv_below_swc")[4] == 0.0
    assert list(f.column("missing_night")) == [0, 0, 0, 1, 0, 0, 0]
    assert list(f.column("missing_nights_7d")) == [0, 0, 0, 1, 1, 1, 0]
    assert list(f.column("baseline_nights")) == [0, 1, 2, 3, 3, 4, 4]


def test_resting_hr_deviation_from_past_baseline():
    cfg = FeatureConfig(rhr_baseline_min=2)
    f = raw(DailyData.from_columns(days(4), resting_hr=[50, 52, NAN, 57]), cfg)
    assert np.isnan(f.column("rhr_dev")[1])  # one value before -> no baseline
    assert f.column("rhr_baseline")[3] == pytest.approx(51.0)
    assert f.column("rhr_dev")[3] == pytest.approx(6.0)


# ------------------------------------------------------------------ sleep
def test_sleep_debt_regularity_and_checkin_fallback():
    sleep = [420.0, 500.0, NAN, 390.0]
    hours = [NAN, NAN, 7.0, NAN]  # the check-in's hours fill the missing device night
    f = raw(DailyData.from_columns(days(4), sleep_minutes=sleep, sleep_hours=hours))
    assert f.column("sleep_minutes")[2] == 420.0
    # debt over the 4 nights: 60 + 0 + 60 + 90
    assert f.column("sleep_debt_7d")[3] == pytest.approx(210.0)
    assert f.column("sleep_sd_7d")[3] == pytest.approx(np.std([420, 500, 420, 390], ddof=1))
    assert np.isnan(f.column("sleep_sd_7d")[1])  # fewer than 3 nights


# ------------------------------------------------------------------ load
def test_acwr_monotony_strain_by_hand():
    load = [100.0] * 21 + [0, 200, 300, 0, 400, 300, 200]  # 28 days
    f = raw(DailyData.from_columns(days(28), load=load))
    last7 = np.array([0, 200, 300, 0, 400, 300, 200], dtype=float)
    acute = last7.mean()
    chronic = np.mean(load)
    assert f.column("acute_load")[27] == pytest.approx(acute)
    assert f.column("chronic_load")[27] == pytest.approx(chronic)
    assert f.column("acwr")[27] == pytest.approx(acute / chronic)
    mono = acute / last7.std(ddof=1)
    assert f.column("monotony")[27] == pytest.approx(mono)
    assert f.column("strain")[27] == pytest.approx(last7.sum() * mono)
    # Chronic needs 14 known days
    assert np.isnan(f.column("chronic_load")[12]) and f.column("chronic_load")[13] == 100.0
    # Identical loads: SD 0 -> monotony capped
    assert f.column("monotony")[20] == 10.0
    assert f.column("acwr")[20] == pytest.approx(1.0)


def test_unknown_load_days_are_excluded_from_means():
    load = [100.0, NAN, 300.0, NAN, NAN, 200.0, 0.0]
    f = raw(DailyData.from_columns(days(7), load=load))
    assert f.column("acute_load")[6] == pytest.approx(150.0)  # mean of 100, 300, 200, 0
    assert np.isnan(f.column("acute_load")[5])  # only 3 known days (< 4)
    assert list(f.column("load_known")) == [1, 0, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("tau,name", [(42.0, "fitness"), (7.0, "fatigue_load")])
def test_banister_both_time_constants(tau, name):
    load = [100.0, 0.0, 50.0, NAN]
    f = raw(DailyData.from_columns(days(4), load=load))
    k = math.exp(-1 / tau)
    expect = []
    s = 0.0
    for w in [100.0, 0.0, 50.0, 0.0]:  # unknown -> 0
        s = s * k + (1 - k) * w
        expect.append(s)
    assert f.column(name) == pytest.approx(expect)
    assert f.column("form")[3] == pytest.approx(f.column("fitness")[3] - f.column("fatigue_load")[3])
    # Day 0 values by hand
    assert f.column("fitness")[0] == pytest.approx(100 * (1 - math.exp(-1 / 42)))
    assert f.column("fatigue_load")[0] == pytest.approx(100 * (1 - math.exp(-1 / 7)))


# ------------------------------------------------------------------ check-ins, quality
def test_checkin_carry_forward_and_quality_flags():
    ready = [6.0, NAN, NAN, 4.0]
    f = raw(DailyData.from_columns(days(4), readiness=ready, resting_hr=[NAN, 50, NAN, 52]))
    assert list(f.column("readiness_last")) == [6, 6, 6, 4]
    assert list(f.column("days_since_checkin")) == [0, 1, 2, 0]
    assert list(f.column("checkin_today")) == [1, 0, 0, 1]
    assert list(f.column("worn_7d")) == [0, 1, 1, 2]
    assert list(f.column("history_days")) == [1, 2, 3, 4]


# ------------------------------------------------------------------ model features, causality
def _random_data(rng, n):
    def s(lo, hi, p=0.2):
        v = rng.uniform(lo, hi, n)
        v[rng.random(n) < p] = np.nan
        return v

    return DailyData.from_columns(
        days(n), rmssd_ms=s(20, 120), resting_hr=s(45, 70), sleep_minutes=s(300, 540),
        sleep_efficiency=s(70, 98), load=s(0, 600), readiness=s(1, 10), fatigue=s(1, 5),
        soreness=s(1, 5), stress=s(1, 5), mood=s(1, 5), sleep_quality=s(1, 5), sleep_hours=s(5, 9),
    )


def test_model_features_are_finite_float32_and_named():
    data = _random_data(np.random.default_rng(0), 90)
    fr = compute_features(data)
    assert fr.X.dtype == np.float32 and fr.X.shape == (90, len(fr.names))
    assert np.isfinite(fr.X).all()
    assert len(set(fr.names)) == len(fr.names)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(1, 79))
def test_changing_future_days_never_changes_earlier_rows(seed, cut):
    rng = np.random.default_rng(seed)
    a = _random_data(rng, 80)
    b = _random_data(np.random.default_rng(seed + 1), 80)
    mixed = DailyData(a.days, {k: np.concatenate([a[k][:cut], b[k][cut:]]) for k in a.series})
    ra, rm = compute_raw_features(a), compute_raw_features(mixed)
    np.testing.assert_array_equal(ra.X[:cut], rm.X[:cut])  # NaN == NaN here
    fa, fm = compute_features(a), compute_features(mixed)
    np.testing.assert_array_equal(fa.X[:cut], fm.X[:cut])


def test_make_examples_targets_windows_and_shapes():
    ready = [5, 6, NAN, 7, 8, 4, NAN, 3, 2, 9]
    data = DailyData.from_columns(days(10), readiness=ready)
    fr = compute_features(data)
    ex = make_examples(fr, data, window=3)
    # input windows end at t = 2..8, target t+1 must exist: t+1 in {3,4,5,7,8,9}
    assert ex.input_end_days == [data.days[t] for t in (2, 3, 4, 6, 7, 8)]
    assert ex.target_days == [data.days[t] for t in (3, 4, 5, 7, 8, 9)]
    assert list(ex.y) == [7, 8, 4, 3, 2, 9]
    assert list(ex.last_readiness) == [6, 7, 8, 4, 3, 2]
    assert ex.X.shape == (6, 3 * fr.n_features)
    # oldest day first: the first example holds rows 0, 1, 2
    np.testing.assert_array_equal(ex.X[0], fr.X[0:3].reshape(-1))
    ex3 = make_examples(fr, data, window=3, flat=False)
    assert ex3.X.shape == (6, 3, fr.n_features)
    with pytest.raises(FeatureError, match="window"):
        make_examples(fr, data, window=0)
    other = DailyData.empty("2023-01-01", 10)
    with pytest.raises(FeatureError, match="different days"):
        make_examples(fr, other)
