"""The linear head: feature rows against hand-computed values, bounds, the statistics vector
and its L2 sensitivity, PSD projection, the shrunk solve, prediction, serialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from restwise.models import linear_head as lh
from restwise.models.features import model_feature_names

NAMES = model_feature_names()
F = len(NAMES)
IX = {n: i for i, n in enumerate(NAMES)}
NAN = float("nan")
PERSON = lh.PersonalScale(mean=6.0, scale=2.0, step=1.0, low_threshold=5.0, lo=2.0, hi=9.0)


def window(n=1, weekday_t=2, **today):
    """Feature windows [n, 7*F]: zeros, day t's weekday one-hot, and given z/has values today."""
    X = np.zeros((n, 7 * F))
    for day in range(7):
        X[:, day * F + IX[f"weekday_{(weekday_t - 6 + day) % 7}"]] = 1.0
    last = 6 * F
    for name, value in today.items():
        X[:, last + IX[f"z_{name}"]] = value
        X[:, last + IX[f"has_{name}"]] = 1.0
    return X


def history(values_by_offset: dict[int, float], n=1):
    """Answer history [n, 56]; offset 0 = day t, 1 = day t-1, ..."""
    H = np.full((n, lh.HISTORY_DAYS), NAN)
    for off, v in values_by_offset.items():
        H[:, lh.HISTORY_DAYS - 1 - off] = v
    return H


def raw(inputs: lh.HeadInputs) -> dict[str, float]:
    """Undo the /4 scaling of a row that was not norm-clipped."""
    return dict(zip(lh.FEATURE_NAMES, inputs.x[0] * lh.FEATURE_SCALE))


def test_spec_is_small_and_pinned():
    assert lh.N_FEATURES == 32 <= 64
    assert lh.STATISTICS_LENGTH == 32 * 33 // 2 + 32 == 560
    assert len(set(lh.FEATURE_NAMES)) == 32
    assert lh.feature_spec_sha256() == lh.feature_spec_sha256()
    assert lh.feature_spec()["base_features"] == NAMES


def test_answer_features_hand_computed():
    # day t answered 8; days t-1..t-6: 7 and 5; target weekday profile: days t+1-7k.
    H = history({0: 8.0, 2: 7.0, 5: 5.0, 6: 4.0, 13: 7.0})
    inp = lh.head_inputs(window(weekday_t=2), H, PERSON)
    f = raw(inp)
    assert f["answer_today"] == pytest.approx((8 - 6) / 2)
    assert f["answered_today"] == 1.0
    assert f["answer_7d"] == pytest.approx((np.mean([8, 7, 5, 4]) - 6) / 2)
    assert f["answer_earlier"] == 0.0  # day t answered: the anchor is its answer
    assert f["answer_weekday_profile"] == pytest.approx((np.mean([4, 7]) - 6) / 2)  # offsets 6, 13
    assert inp.anchor[0] == 8.0
    assert f["target_weekday_3"] == 1.0 and sum(f[f"target_weekday_{i}"] for i in range(7)) == 1.0
    # day t unanswered: anchor is the person mean, the most recent earlier answer is a feature
    inp = lh.head_inputs(window(), history({2: 7.0, 5: 5.0}), PERSON)
    f = raw(inp)
    assert inp.anchor[0] == 6.0 and f["answered_today"] == 0.0 and f["answer_today"] == 0.0
    assert f["answer_earlier"] == pytest.approx(0.5)
    assert f["answer_weekday_profile"] == 0.0  # fewer than 2 answers on that weekday


def test_series_today_and_7d_from_the_windows():
    X = window(fatigue=1.2, load=-0.8)
    X[0, 3 * F + IX["z_fatigue"]] = 2.0  # day t-3 answered 2.0
    X[0, 3 * F + IX["has_fatigue"]] = 1.0
    X[0, 4 * F + IX["z_fatigue"]] = 5.0  # not answered that day (has = 0): ignored
    f = raw(lh.head_inputs(X, history({0: 6.0}), PERSON))
    assert f["fatigue_today"] == pytest.approx(1.2) and f["fatigue_7d"] == pytest.approx(1.6)
    assert f["load_today"] == pytest.approx(-0.8) and f["load_7d"] == pytest.approx(-0.8)
    assert f["mood_today"] == 0.0 and f["ln_rmssd_7d"] == 0.0  # unknown: "your normal"


def test_out_of_range_is_clipped_never_dropped_and_rows_bounded():
    X = window(n=3, readiness=50.0, load=-40.0, stress=0.1)
    inp = lh.head_inputs(X, history({0: 10.0}, n=3), PERSON)
    assert inp.x.shape == (3, 32) and inp.clipped >= 3 * 4
    assert np.all(np.linalg.norm(inp.x, axis=1) <= 1 + 1e-12)
    f = dict(zip(lh.FEATURE_NAMES, inp.x[0]))
    assert f["readiness_today"] > 0 and f["load_today"] < 0 and f["stress_today"] > 0  # kept


def test_nan_and_inf_are_refused_before_anything_is_computed():
    X = window()
    X[0, 5] = NAN
    with pytest.raises(lh.LinearHeadError, match="NaN or inf"):
        lh.head_inputs(X, history({0: 6.0}), PERSON)
    with pytest.raises(lh.LinearHeadError, match="inf"):
        lh.head_inputs(window(), history({0: math.inf}), PERSON)
    with pytest.raises(lh.LinearHeadError, match="NaN or inf"):
        lh.target_delta(np.array([NAN]), np.array([6.0]), PERSON)
    x = np.zeros((20, 32))
    x[3, 0] = math.inf
    with pytest.raises(lh.LinearHeadError, match="nothing is shared"):
        lh.device_statistics(x, np.zeros(20))


def test_target_is_bounded_in_person_units():
    d = lh.target_delta(np.array([10.0, 6.0, 1.0]), np.array([6.0, 6.0, 6.0]), PERSON)
    np.testing.assert_allclose(d, [2.0, 0.0, -2.0])  # (10-6)/2 = 2; (1-6)/2 = -2.5 -> -2


def test_personal_scale_from_answers():
    p = lh.PersonalScale.fit(np.array([5.0, 7.0, 7.0, 9.0]))
    assert (p.mean, p.step, p.lo, p.hi, p.low_threshold) == (7.0, 1.0, 5.0, 9.0, 6.0)
    assert p.scale == pytest.approx(math.sqrt(2.0))
    assert lh.PersonalScale.fit(np.array([3.0, 3.5])).step == 0.5
    assert lh.PersonalScale.fit(np.array([3.0, 3.0])).scale == lh.MIN_SCALE
    assert lh.PersonalScale.fit(np.array([3.01, 3.3])).step == 0.0
    with pytest.raises(lh.LinearHeadError):
        lh.PersonalScale.fit(np.array([3.0, NAN]))


# ----------------------------------------------------------------------------- statistics
def test_pack_unpack_round_trip_and_norm_is_frobenius():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 32))
    x /= np.maximum(1, np.linalg.norm(x, axis=1, keepdims=True))
    delta = rng.uniform(-2, 2, 30)
    A, b = lh.moments(x, delta)
    v = lh.pack_statistics(A, b)
    assert v.shape == (560,)
    A2, b2 = lh.unpack_statistics(v)
    np.testing.assert_allclose(A2, A, atol=1e-14)
    np.testing.assert_allclose(b2, b, atol=1e-14)
    # sqrt2-weighted triangle: same Euclidean norm as the full matrix (Frobenius)
    assert np.linalg.norm(v) == pytest.approx(math.sqrt(np.sum(A**2) + np.sum((b / 2) ** 2)))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(lh.MIN_EXAMPLES, 60), seed=st.integers(0, 2**31 - 1), axis=st.booleans())
def test_one_device_never_moves_the_sum_more_than_the_sensitivity(m, seed, axis):
    rng = np.random.default_rng(seed)
    if axis:  # the worst case: every row a unit vector on one axis, every target at the bound
        x = np.zeros((m, 32))
        x[:, rng.integers(32)] = 1.0
        delta = np.full(m, lh.TARGET_BOUND)
    else:
        x = rng.normal(size=(m, 32)) * rng.uniform(0.01, 3)
        x /= np.maximum(1, np.linalg.norm(x, axis=1, keepdims=True))
        delta = rng.uniform(-lh.TARGET_BOUND, lh.TARGET_BOUND, m)
    v = lh.device_statistics(x, delta)
    assert np.linalg.norm(v) <= lh.SENSITIVITY * (1 + 1e-12)
    if axis:
        assert np.linalg.norm(v) == pytest.approx(math.sqrt(2.0))  # the bound is tight


def test_devices_out_of_bounds_or_with_too_few_days_send_nothing():
    with pytest.raises(lh.NotEnoughDataError, match="at least 14"):
        lh.device_statistics(np.zeros((13, 32)), np.zeros(13))
    x = np.zeros((20, 32))
    x[0, 0] = 1.5
    with pytest.raises(lh.LinearHeadError, match="bounds"):
        lh.device_statistics(x, np.zeros(20))
    with pytest.raises(lh.LinearHeadError, match="bounds"):
        lh.device_statistics(np.zeros((20, 32)), np.full(20, 2.5))


def test_psd_projection():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(32, 32))
    P = lh.project_psd(M + M.T)
    assert np.linalg.eigvalsh(P).min() >= -1e-10
    np.testing.assert_allclose(P, P.T)
    S = M @ M.T
    np.testing.assert_allclose(lh.project_psd(S), S, atol=1e-9)  # already PSD: unchanged


# ----------------------------------------------------------------------------- the solve
def _synthetic_release(n_persons=40, m=60, seed=3):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(0, 0.5, 32)
    vecs = []
    for _ in range(n_persons):
        x = rng.normal(0, 0.12, (m, 32))
        x /= np.maximum(1, np.linalg.norm(x, axis=1, keepdims=True))
        delta = np.clip(x @ w_true + rng.normal(0, 0.05, m), -2, 2)
        vecs.append(lh.device_statistics(x, delta))
    return w_true, lh.sum_statistics(vecs)


def test_solve_recovers_the_weights_without_noise_and_returns_the_prior_under_heavy_noise():
    w_true, total = _synthetic_release()
    A, b = lh.unpack_statistics(total)
    prior = lh.PriorWeights(np.zeros(32), np.full(32, 1.0), 1e-6)
    w = lh.solve_with_prior(A, b, prior, noise_std=0.0, devices=40)
    assert np.linalg.norm(w - w_true) < 0.05 * np.linalg.norm(w_true)
    w0 = np.full(32, 0.3)
    away = lh.PriorWeights(w0, np.full(32, 0.01), 1e-6)
    dists = [np.linalg.norm(lh.solve_with_prior(A, b, away, noise_std=s, devices=40) - w0)
             for s in (0.0, 1.0, 10.0, 1e4)]
    assert dists == sorted(dists, reverse=True)  # more noise, closer to the prior
    assert dists[-1] < 1e-4


def test_noisy_release_degrades_toward_the_prior_not_below_it():
    w_true, total = _synthetic_release(seed=4)
    rng = np.random.default_rng(5)
    prior = lh.PriorWeights(w_true + rng.normal(0, 0.05, 32), np.full(32, 0.05**2), 1e-6)
    errs = []
    for _ in range(20):
        noisy = total + rng.normal(0, 2.0, total.shape)  # far noisier than the 40-person signal
        A, b = lh.unpack_statistics(noisy)
        errs.append(np.linalg.norm(lh.solve_with_prior(A, b, prior, noise_std=2.0, devices=40) - w_true))
    assert np.mean(errs) <= 1.05 * np.linalg.norm(prior.weights - w_true)


# ----------------------------------------------------------------------------- the model
def test_zero_weights_are_same_as_your_last_answer_and_forecasts_are_snapped():
    H = np.stack([history({0: 8.0})[0], history({3: 4.0})[0]])
    X = window(n=2)
    inp = lh.head_inputs(X, H, PERSON)
    value, cont = lh.LinearHead.zero().predict(inp, PERSON)
    np.testing.assert_allclose(value, [8.0, 6.0])  # day t's answer, else the person mean
    w = np.zeros(32)
    w[lh.FEATURE_NAMES.index("answered_today")] = 0.7 * lh.FEATURE_SCALE  # +0.7 scale units
    value, cont = lh.LinearHead(w).predict(inp, PERSON)
    assert cont[0] == pytest.approx(8.0 + 2.0 * 0.7 * 4 * np.asarray(inp.x)[0, 1])
    assert value[0] == min(round(cont[0]), PERSON.hi) and float(value[0]).is_integer()
    assert value[0] <= PERSON.hi


def test_model_serialisation_and_spec_check():
    m = lh.LinearHead(np.arange(32) / 100.0)
    back = lh.LinearHead.from_bytes(m.to_bytes())
    np.testing.assert_array_equal(back.weights, m.weights)
    assert back.model_hash() == m.model_hash()
    with pytest.raises(lh.LinearHeadError, match="another feature spec"):
        lh.LinearHead(np.zeros(32), spec_sha256="0" * 64)
    with pytest.raises(lh.LinearHeadError, match="version"):
        lh.LinearHead.from_bytes(m.to_bytes().replace(b'"feature_spec_version": 1', b'"feature_spec_version": 2'))
    with pytest.raises(lh.LinearHeadError, match="unreadable"):
        lh.LinearHead.from_bytes(b"{}")


def test_architecture_object_wires_device_server_and_prediction():
    from restwise.models.linear_head_architecture import ARCHITECTURE as arch
    from restwise.models.registry import ONE_RELEASE, get_architecture

    assert get_architecture("linear-head") is arch
    assert (arch.name, lh.N_FEATURES, arch.statistics_length, arch.protocol, arch.l2_sensitivity) == \
        ("linear-head", 32, 560, ONE_RELEASE, lh.SENSITIVITY)
    rng = np.random.default_rng(6)
    n = 30
    X = np.concatenate([window(n=n, readiness=0.5)] * 1)
    X[:, 6 * F + IX["z_fatigue"]] = rng.normal(0, 1, n)
    H = np.stack([history({0: float(v)})[0] for v in rng.integers(3, 9, n)])
    y = rng.integers(3, 9, n).astype(float)
    v = arch.device_statistics(X, H, y, PERSON)
    assert v.shape == (560,) and np.linalg.norm(v) <= arch.l2_sensitivity
    model = arch.server_model(v * 5, noise_std=0.0, devices=5,
                              prior=lh.PriorWeights(np.zeros(32), np.full(32, 0.01), 0.01))
    value, _ = arch.predict(model, X, H, PERSON)
    assert value.shape == (n,) and np.all(np.isfinite(value))
    assert arch.deserialise(arch.serialise(model)).model_hash() == model.model_hash()
