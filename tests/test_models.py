"""The recovery network and local training: shapes, validation, determinism, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from restwise.models.features import DailyData, compute_features, make_examples
from restwise.models.network import (
    ModelConfig,
    ModelError,
    build_model,
    model_from_bytes,
    model_to_bytes,
    personal_arrays,
    set_personal_arrays,
    set_shared_arrays,
    shared_arrays,
)
from restwise.models.synthetic import synthetic_person
from restwise.models.training import (
    low_labels,
    low_threshold_for,
    predict,
    snap_to_answers,
    train_local,
)


def person_examples(seed=1, n_days=120, window=7):
    p = synthetic_person(seed, days=n_days)
    nan = float("nan")
    data = DailyData.from_columns(
        [d.day for d in p],
        rmssd_ms=[d.rmssd_ms if d.rmssd_ms is not None else nan for d in p],
        resting_hr=[d.resting_hr if d.resting_hr is not None else nan for d in p],
        sleep_minutes=[d.sleep_minutes if d.sleep_minutes is not None else nan for d in p],
        load=[d.session_minutes * d.session_rpe for d in p],
        readiness=[d.readiness if d.readiness is not None else nan for d in p],
        fatigue=[d.fatigue if d.fatigue is not None else nan for d in p],
    )
    fr = compute_features(data)
    return make_examples(fr, data, window=window)


@pytest.fixture(scope="module")
def examples():
    return person_examples()


def test_config_validation_names_the_field():
    with pytest.raises(ModelError, match="n_features"):
        ModelConfig(n_features=0)
    with pytest.raises(ModelError, match="hidden"):
        ModelConfig(n_features=3, hidden=(8, 0))
    with pytest.raises(ModelError, match="dropout"):
        ModelConfig(n_features=3, dropout=1.0)
    with pytest.raises(ModelError, match="window"):
        ModelConfig(n_features=3, window=0)


def test_same_seed_gives_identical_weights(examples):
    cfg = ModelConfig(n_features=examples.n_features, window=examples.window, seed=3)
    a, b = build_model(cfg), build_model(cfg)
    for x, y in zip(shared_arrays(a), shared_arrays(b)):
        np.testing.assert_array_equal(x, y)
    state = torch.random.get_rng_state()
    ra = train_local(a, examples, epochs=3, seed=11)
    rb = train_local(b, examples, epochs=3, seed=11)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG left alone
    assert ra == rb and ra["n_examples"] == len(examples)
    for x, y in zip(shared_arrays(a) + personal_arrays(a), shared_arrays(b) + personal_arrays(b)):
        np.testing.assert_array_equal(x, y)
    c = build_model(cfg)
    train_local(c, examples, epochs=3, seed=12)
    assert any(not np.array_equal(x, y) for x, y in zip(shared_arrays(a), shared_arrays(c)))


def test_shared_and_personal_parts_train_separately(examples):
    cfg = ModelConfig(n_features=examples.n_features, window=examples.window)
    m = build_model(cfg)
    s0, p0 = shared_arrays(m), personal_arrays(m)
    train_local(m, examples, epochs=2, train_shared=False, train_personal=True)
    assert all(np.array_equal(x, y) for x, y in zip(s0, shared_arrays(m)))
    assert not all(np.array_equal(x, y) for x, y in zip(p0, personal_arrays(m)))
    p1 = personal_arrays(m)
    train_local(m, examples, epochs=2, train_shared=True, train_personal=False)
    assert not all(np.array_equal(x, y) for x, y in zip(s0, shared_arrays(m)))
    assert all(np.array_equal(x, y) for x, y in zip(p1, personal_arrays(m)))


def test_target_scaler_and_low_threshold_fitted_on_training_examples(examples):
    m = build_model(ModelConfig(n_features=examples.n_features, window=examples.window))
    train_local(m, examples, epochs=1)
    y = examples.y.astype(np.float64)
    assert float(m.personal.target_mean) == pytest.approx(y.mean(), rel=1e-5)
    assert float(m.personal.target_scale) == pytest.approx(y.std(), rel=1e-5)
    assert float(m.personal.low_threshold) == pytest.approx(np.median(y) - 1)
    assert float(m.personal.target_step) == 1.0  # synthetic answers are whole numbers
    assert low_threshold_for([5, 6, 7]) == 5.0
    assert list(low_labels([4, 5, 6], 5.0)) == [1, 1, 0]
    train_local(m, examples, epochs=1, low_threshold=2.5)
    assert float(m.personal.low_threshold) == 2.5


def test_training_learns_something(examples):
    n = len(examples)
    train, test = examples.subset(range(int(n * 0.75))), examples.subset(range(int(n * 0.75), n))
    m = build_model(ModelConfig(n_features=examples.n_features, window=examples.window))
    before = train_local(m, train, epochs=1)["loss"]
    after = train_local(m, train, epochs=30)["loss"]
    assert after < before
    r, p = predict(m, test.X)
    assert r.shape == p.shape == (len(test),)
    assert np.all((p >= 0) & (p <= 1))
    # on the training person's scale, not the default (5, 2)
    assert abs(r.mean() - train.y.mean()) < 1.5


def test_shape_errors_are_clear(examples):
    m = build_model(ModelConfig(n_features=examples.n_features, window=examples.window))
    with pytest.raises(ModelError, match="expects"):
        predict(m, np.zeros((2, 5), dtype=np.float32))
    bad = shared_arrays(m)
    bad[0] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ModelError, match=r"shape \(3, 3\)"):
        set_shared_arrays(m, bad)
    with pytest.raises(ModelError, match="expected"):
        set_shared_arrays(m, shared_arrays(m)[:-1])
    nan = shared_arrays(m)
    nan[1] = nan[1] * np.nan
    with pytest.raises(ModelError, match="NaN"):
        set_shared_arrays(m, nan)
    with pytest.raises(ModelError, match="NaN"):
        predict(m, np.full((1, m.config.input_size), np.nan, dtype=np.float32))


def test_arrays_and_bytes_round_trip(examples):
    m = build_model(ModelConfig(n_features=examples.n_features, window=examples.window, seed=5))
    train_local(m, examples, epochs=2)
    blob = model_to_bytes(m)
    m2 = model_from_bytes(blob)
    assert m2.config == m.config
    np.testing.assert_array_equal(predict(m, examples.X)[0], predict(m2, examples.X)[0])
    m3 = build_model(m.config)
    set_shared_arrays(m3, shared_arrays(m))
    set_personal_arrays(m3, personal_arrays(m))
    np.testing.assert_array_equal(predict(m, examples.X)[1], predict(m3, examples.X)[1])
    with pytest.raises(ModelError, match="cannot be read"):
        model_from_bytes(b"garbage")


def test_predictions_snap_to_whole_answers_and_stay_on_scale(examples):
    m = build_model(ModelConfig(n_features=examples.n_features, window=examples.window))
    train_local(m, examples, epochs=3)
    cont, _ = predict(m, examples.X, snap=False)
    snapped, _ = predict(m, examples.X)  # whole-number answers -> snapped by default
    np.testing.assert_array_equal(snapped, np.clip(np.round(cont), 0, 10))
    np.testing.assert_array_equal(snap_to_answers(m, cont), snapped)
    assert np.any(cont != np.round(cont))
    frac = examples.subset(range(len(examples)))
    frac.y = frac.y + 0.25
    train_local(m, frac, epochs=1)
    assert float(m.personal.target_step) == 0.0
    r, _ = predict(m, examples.X)
    assert np.any(r != np.round(r))
    with torch.no_grad():
        m.personal.target_mean.fill_(50.0)
    assert predict(m, examples.X)[0].max() == 10.0


def test_our_adamw_matches_torch_optim_adamw():
    from restwise.models.training import _AdamW

    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    ours = _AdamW(list(a.parameters()), lr=0.01, weight_decay=0.05)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.05)
    x = torch.randn(16, 6)
    for _ in range(5):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
