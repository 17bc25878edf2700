"""The evaluation protocol: split without leakage (asserted on day indices), metrics against
hand-computed values, baselines, the method plug-in, and `restwise evaluate` end to end
(on generated cohorts; on the real SoccerMon data in a slow test)."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from restwise.models.evaluation import (
    BASELINE_ROWS,
    CentralRidge,
    LastAnswerInWindow,
    EvaluationError,
    GlobalMean,
    LastValue,
    LocalRidge,
    NeuralConfig,
    PersonMean,
    Prediction,
    ProtocolConfig,
    auroc,
    bootstrap_ci,
    check_no_leakage,
    chronological_split,
    default_methods,
    evaluate,
    split_person,
    validation_splits,
    windowed_examples,
)
from restwise.models.features import DailyData, FeatureFrame
from restwise.models.synthetic import synthetic_person

NAN = float("nan")


def index_features(data: DailyData) -> FeatureFrame:
    """Feature row t = (t, target_t or -1): lets tests see exactly which days an input holds."""
    n = len(data)
    r = data.series["readiness"]
    X = np.stack([np.arange(n, dtype=np.float32), np.where(np.isfinite(r), r, -1).astype(np.float32)], 1)
    return FeatureFrame(list(data.days), X, ["day", "ready"])


def person_days(n: int, readiness, start="2024-01-01", **series) -> DailyData:
    return DailyData.from_columns(DailyData.empty(start, n).days, readiness=readiness, **series)


def synthetic_cohort(n_persons: int, n_days: int = 200, seed0: int = 0) -> dict[str, DailyData]:
    out = {}
    for k in range(n_persons):
        rows = synthetic_person(seed0 + k, n_days)
        cols = {
            "rmssd_ms": [r.rmssd_ms for r in rows], "resting_hr": [r.resting_hr for r in rows],
            "sleep_minutes": [r.sleep_minutes for r in rows],
            "load": [r.session_minutes * r.session_rpe for r in rows],
            "readiness": [r.readiness for r in rows], "fatigue": [r.fatigue for r in rows],
            "soreness": [r.soreness for r in rows], "stress": [r.stress for r in rows],
            "mood": [r.mood for r in rows], "sleep_quality": [r.sleep_quality for r in rows],
        }
        cols = {key: [NAN if v is None else v for v in vals] for key, vals in cols.items()}
        out[f"p{k:02d}"] = DailyData([r.day for r in rows], cols)
    return out


# ----------------------------------------------------------------------------- split
def test_windows_hold_exactly_days_t_minus_6_to_t():
    rng = np.random.default_rng(1)
    r = rng.integers(1, 11, 60).astype(float)
    r[[10, 11, 30]] = NAN
    data = person_days(60, r)
    ex = windowed_examples(index_features(data), data["readiness"], 7)
    for i in range(len(ex)):
        t = ex.end_idx[i]
        assert ex.X[i, 0::2].tolist() == list(range(t - 6, t + 1))  # day index per window slot
        assert ex.y[i] == r[t + 1]
        window = r[t - 6 : t + 1]
        known = window[np.isfinite(window)]
        assert ex.last_value[i] == (known[-1] if known.size else pytest.approx(NAN, nan_ok=True)) \
            or (not known.size and math.isnan(ex.last_value[i]))
    # targets that are missing give no example; the first example needs 7 input days
    assert 10 not in ex.target_idx and 11 not in ex.target_idx and ex.end_idx.min() == 6


def test_split_is_chronological_with_gap_and_no_leakage():
    rng = np.random.default_rng(2)
    r = rng.integers(1, 11, 240).astype(float)
    r[rng.random(240) < 0.2] = NAN
    data = person_days(240, r)
    cfg = ProtocolConfig()
    split, why = split_person("p", data, cfg, feature_fn=index_features)
    assert why is None
    tr, te = split.train, split.test
    n_all = len(windowed_examples(index_features(data), r, 7))
    assert len(tr) == math.floor(0.75 * n_all)
    last_train_target = int(tr.target_idx.max())
    # test inputs start after the last training target + the 7-day gap
    assert int(te.start_idx.min()) > last_train_target + 7
    train_targets = set(tr.target_idx.tolist())
    test_input_days = {d for s in te.start_idx for d in range(s, s + 7)}
    assert not train_targets & test_input_days
    assert not set(te.target_idx.tolist()) & {d for e in tr.end_idx for d in range(e - 6, e + 1)}
    # the features really are those days (no shuffling, no mixing)
    assert te.X[:, 0::2].min() > last_train_target + 7
    assert np.all(np.diff(tr.end_idx) > 0) and np.all(np.diff(te.end_idx) > 0)
    # and every example after the gap is used: nothing silently dropped
    later = [t for t in range(6, 239) if np.isfinite(r[t + 1]) and t - 6 > last_train_target + 7]
    assert te.end_idx.tolist() == later
    assert split.low_threshold == np.median(tr.y) - 1


def test_leakage_check_catches_overlap():
    data = person_days(100, np.arange(100) % 10 + 0.0)
    ex = windowed_examples(index_features(data), data["readiness"], 7)
    first, later = chronological_split(ex, 0.75, gap_days=7)
    check_no_leakage(first, later, 7)
    bad = ex.take(np.arange(len(first), len(ex)))  # no gap at all
    with pytest.raises(AssertionError, match="overlap"):
        check_no_leakage(first, bad, 7)


def test_validation_slices_live_inside_training_period():
    cohort = synthetic_cohort(3, 200)
    cfg = ProtocolConfig()
    splits = [split_person(p, d, cfg)[0] for p, d in cohort.items()]
    val = validation_splits(splits, cfg)
    for s, v in zip(splits, val):
        assert int(v.test.target_idx.max()) <= int(s.train.target_idx.max())
        assert int(v.test.start_idx.min()) > int(v.train.target_idx.max()) + 7


def test_too_little_data_is_excluded_with_reason():
    r = np.full(60, NAN)
    r[:20] = 5.0
    split, why = split_person("p", person_days(60, r), ProtocolConfig())
    assert split is None and why == "too few target days"


# ----------------------------------------------------------------------------- metrics
def test_auroc_hand_computed_with_ties():
    # pos scores 0.8, 0.4; neg 0.4, 0.1 -> pairs: (0.8>0.4)1 (0.8>0.1)1 (0.4=0.4)0.5 (0.4>0.1)1
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == pytest.approx(3.5 / 4)
    assert auroc(np.array([1, 0]), np.array([0.0, 1.0])) == 0.0
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    v = np.array([0.5, 0.7, 0.9, 1.1, 1.3, 0.8])
    a = bootstrap_ci(v, 2000, seed=3)
    assert a == bootstrap_ci(v, 2000, seed=3)
    assert a[0] < v.mean() < a[1] and a[0] > v.min() and a[1] < v.max()


# ----------------------------------------------------------------------------- baselines
def _two_person_splits():
    cfg = ProtocolConfig(min_train=10, min_test=3, bootstrap=200)
    a = np.tile([6.0, 8.0], 40)  # alternating: last value is always wrong by 2
    b = np.full(80, 3.0)
    b[::5] = 4.0
    cohort = {"a": person_days(80, a), "b": person_days(80, b)}
    return cohort, cfg


def test_simple_baselines_exact_values():
    cohort, cfg = _two_person_splits()
    res = evaluate(cohort, {"global mean": GlobalMean(), "person mean": PersonMean(),
                            "last value": LastValue()}, config=cfg, feature_fn=index_features)
    pa = res.method("person mean").per_person_mae
    assert pa["a"] == pytest.approx(1.0)  # mean 7, every answer is 6 or 8
    assert res.method("last value").per_person_mae["a"] == pytest.approx(2.0)
    assert res.method("person mean").auroc == pytest.approx(0.5)  # constant score
    splits = [split_person(p, d, cfg, index_features)[0] for p, d in cohort.items()]
    g = np.mean(np.concatenate([s.train.y for s in splits]))
    assert res.method("global mean").per_person_mae["b"] == pytest.approx(
        np.mean(np.abs(g - splits[1].test.y)))


def test_last_value_is_day_t_else_the_person_mean_and_the_old_rule_is_its_own_row():
    # every third day unanswered: day t is sometimes answered, sometimes not
    r = np.tile([4.0, 8.0, 6.0, 5.0, 7.0], 24)
    r[::3] = NAN
    cfg = ProtocolConfig(min_train=10, min_test=3, bootstrap=50)
    split, _ = split_person("a", person_days(120, r), cfg, index_features)
    assert split.test.history.shape[1] == cfg.history_days
    assert np.array_equal(split.test.today, r[split.test.end_idx], equal_nan=True)
    new = LastValue().fit_predict([split], 0)["a"].value
    old = LastAnswerInWindow().fit_predict([split], 0)["a"].value
    answered = np.isfinite(r[split.test.end_idx])
    assert answered.any() and (~answered).any()
    np.testing.assert_array_equal(new[answered], r[split.test.end_idx][answered])
    np.testing.assert_allclose(new[~answered], split.train_mean)  # day t unanswered: person mean
    np.testing.assert_array_equal(old[~answered], split.test.last_value[~answered])  # day t-1
    assert not np.allclose(new, old)


def test_rows_carry_epsilon_and_the_paired_comparison_with_last_value():
    cohort, cfg = _two_person_splits()

    class Private(PersonMean):
        epsilon = 2.5

    res = evaluate(cohort, {"last value": LastValue(), "person mean": PersonMean(), "private": Private()},
                   config=cfg, feature_fn=index_features)
    lv, pm = res.method("last value"), res.method("person mean")
    diffs = [pm.per_person_mae[p] - lv.per_person_mae[p] for p in ("a", "b")]
    assert pm.paired_vs_last_value["mean"] == pytest.approx(np.mean(diffs))
    lo, hi = pm.paired_vs_last_value["ci"]
    assert lo <= np.mean(diffs) <= hi
    assert pm.persons_better == sum(d < 0 for d in diffs) and pm.persons_worse == sum(d > 0 for d in diffs)
    assert (lv.persons_better, lv.persons_worse, lv.paired_vs_last_value["mean"]) == (0, 0, 0.0)
    d = json.loads(res.to_json())
    rows = {m["name"]: m for m in d["methods"]}
    assert rows["private"]["epsilon"] == 2.5 and rows["person mean"]["epsilon"] is None
    assert {"paired_vs_last_value", "persons_better", "persons_worse"} <= set(rows["person mean"])
    assert "| private | 2.50 |" in res.to_markdown()


def test_ridge_learns_a_linear_signal_and_pools_across_persons():
    rng = np.random.default_rng(5)
    cohort = {}
    for k in range(4):
        x = rng.normal(0, 1, 200)
        r = np.full(200, NAN)
        r[1:] = 5 + k + 1.5 * x[:-1] + rng.normal(0, 0.2, 199)  # tomorrow follows today's x
        cohort[f"p{k}"] = DailyData.from_columns(DailyData.empty("2024-01-01", 200).days,
                                                 readiness=r, rmssd_ms=np.exp(4 + 0.1 * x))

    def feat(data):
        ln = np.log(data["rmssd_ms"])
        return FeatureFrame(list(data.days), ((ln - 4) / 0.1)[:, None].astype(np.float32), ["x"])

    cfg = ProtocolConfig(bootstrap=100)
    res = evaluate(cohort, {"person mean": PersonMean(), "local ridge": LocalRidge(config=cfg),
                            "central ridge": CentralRidge(config=cfg)}, config=cfg, feature_fn=feat)
    assert res.method("person mean").mae > 1.0
    assert res.method("local ridge").mae < 0.3 and res.method("central ridge").mae < 0.3
    assert res.method("central ridge").auroc > 0.9


class Oracle:
    """A method that tries to peek at the test targets: it must find them hidden."""

    description = "tries to cheat"

    def fit_predict(self, splits, seed):
        out = {}
        for s in splits:
            assert np.isnan(s.test.y).all()
            out[s.person] = Prediction(np.full(len(s.test), s.train_mean), None)
        return out


def test_plugged_in_method_is_a_row_and_cannot_see_test_targets():
    cohort, cfg = _two_person_splits()
    res = evaluate(cohort, {"person mean": PersonMean(), "federated (test)": Oracle()},
                   config=cfg, feature_fn=index_features)
    assert [m.name for m in res.methods] == ["person mean", "federated (test)"]
    assert res.method("federated (test)").mae == res.method("person mean").mae
    d = json.loads(res.to_json())
    assert [m["name"] for m in d["methods"]] == ["person mean", "federated (test)"]
    assert "| federated (test) |" in res.to_markdown()


def test_evaluate_needs_two_persons():
    cohort, cfg = _two_person_splits()
    with pytest.raises(EvaluationError, match="need >= 2"):
        evaluate({"a": cohort["a"]}, {"pm": PersonMean()}, config=cfg, feature_fn=index_features)


def test_all_rows_on_a_synthetic_cohort_with_real_features():
    cohort = synthetic_cohort(5, 200)
    cfg = ProtocolConfig(bootstrap=200)
    neural = NeuralConfig(n_seeds=1, local_epochs=(3,), central_epochs=3, finetune_epochs=(0, 2))
    res = evaluate(cohort, default_methods(cfg, neural), config=cfg, dataset="synthetic")
    names = [m.name for m in res.methods]
    assert names == [*BASELINE_ROWS, "personalised"]
    for m in res.methods:
        assert math.isfinite(m.mae) and 0.2 < m.mae < 3.0
        assert m.mae_ci[0] <= m.mae <= m.mae_ci[1]
    # The generative story makes readiness depend on load and HRV: the learned rows beat the
    # person's mean.
    assert res.method("central ridge").mae < res.method("person mean").mae
    assert res.method("personalised").mae < res.method("person mean").mae
    assert res.method("personalised").chosen["finetune_epochs"] in (0, 2)
    # deterministic with the seed
    again = evaluate(cohort, {"personalised": default_methods(cfg, neural)["personalised"]},
                     config=cfg, dataset="synthetic")
    assert again.method("personalised").mae == res.method("personalised").mae


# ----------------------------------------------------------------------------- CLI
def _write_cohort_folder(root, n_persons=3, n_days=150):
    cohort = synthetic_cohort(n_persons, n_days, seed0=10)
    for person, data in cohort.items():
        d = root / person
        d.mkdir(parents=True)
        lines = ["date,readiness,fatigue,soreness,sleep_hours,rpe,minutes"]
        for i, day in enumerate(data.days):
            def cell(key, scale=1.0):
                v = data[key][i]
                return "" if not np.isfinite(v) else f"{v * scale:g}"
            load = data["load"][i]
            rpe, minutes = ("", "") if not load > 0 else ("5", f"{load / 5:g}")
            lines.append(f"{day},{cell('readiness')},{cell('fatigue')},{cell('soreness')},"
                         f"{cell('sleep_minutes', 1 / 60)},{rpe},{minutes}")
        (d / "checkins.csv").write_text("\n".join(lines) + "\n")
    return cohort


def _cli():
    from restwise.cli import app

    return app


def test_cli_cohort_folder_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    import restwise.models.evaluation as ev

    # Small neural settings keep this test fast; the real-data test runs the defaults.
    small = NeuralConfig(n_seeds=1, local_epochs=(2,), central_epochs=2, finetune_epochs=(0,))
    monkeypatch.setattr(ev, "NeuralConfig", lambda **_kw: small)
    _write_cohort_folder(tmp_path / "cohort")
    result = CliRunner().invoke(_cli(), [
        "evaluate", "--cohort", str(tmp_path / "cohort"), "--out", str(tmp_path / "out"),
        "--workdir", str(tmp_path / "work"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out/results.json").read_text())
    assert data["n_persons"] == 3 and data["protocol"]["seed"] == 1
    assert [m["name"] for m in data["methods"]] == [*BASELINE_ROWS, "personalised", *LINEAR_ROWS]
    assert (tmp_path / "out/results.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out/results.md").read_text()
    assert "| personalised |" in md and "**Total ε" in md
    rows = {m["name"]: m for m in data["methods"]}
    # a cohort folder nobody has seen: the shipped prior, epsilon 0; each DP row one release
    assert rows["public prior"]["epsilon"] == 0.0
    assert rows["public prior"]["chosen"]["prior"]["sources"]["shipped"].startswith("shipped prior")
    for name in LINEAR_ROWS[1:]:
        assert 0 < rows[name]["epsilon"] <= float(name.split("=")[1].rstrip(")"))
        assert rows[name]["chosen"]["release"]["releases"] == 1
    assert data["privacy"]["releases"] == 3 and rows["personalised"]["epsilon"] is None
    # each person really went through their own encrypted store
    stores = sorted(p.name for p in (tmp_path / "work/stores").iterdir())
    assert stores == ["p00", "p01", "p02"]
    assert b"SQLite format 3" not in (tmp_path / "work/stores/p00/restwise.db").read_bytes()[:16]


def test_cli_usage_errors(tmp_path):
    r = CliRunner().invoke(_cli(), ["evaluate", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "either --dataset" in r.output
    r = CliRunner().invoke(_cli(), ["evaluate", "--dataset", "pmdata", "--data", str(tmp_path)])
    assert r.exit_code == 2
    r = CliRunner().invoke(_cli(), ["evaluate", "--dataset", "soccermon", "--data",
                                    str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 6 and "does not exist" in r.output


# ----------------------------------------------------------------------------- real data
REFERENCE = {"person mean": 0.91, "last value": 0.83, "local ridge": 0.80, "central ridge": 0.81}
LINEAR_ROWS = ("public prior", "federated statistics + DP (ε=1)", "federated statistics + DP (ε=4)",
               "federated statistics + DP (ε=8)")


@pytest.mark.slow
@pytest.mark.realdata
def test_restwise_evaluate_on_real_soccermon(shared_data, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(_cli(), [
        "evaluate", "--dataset", "soccermon", "--data", str(shared_data / "soccermon"),
        "--out", str(out), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    rows = {m["name"]: m for m in data["methods"]}
    assert list(rows) == [*BASELINE_ROWS, "personalised", *LINEAR_ROWS]
    assert data["n_persons"] >= 45
    for m in rows.values():
        assert math.isfinite(m["mae"]) and 0.4 < m["mae"] < 1.3
        assert m["mae_ci"][0] <= m["mae"] <= m["mae_ci"][1]
    for name, ref in REFERENCE.items():
        assert rows[name]["mae"] == pytest.approx(ref, abs=0.06), name
    # the person's own level matters: person mean beats the global mean clearly
    assert rows["person mean"]["mae"] < 0.9 * rows["global mean"]["mae"]
    # our model must not lose to "tomorrow = today"
    assert rows["personalised"]["mae"] < rows["last value"]["mae"]
    assert (out / "results.png").stat().st_size > 1000
    # issue 12: the cross-fitted public prior beats last value; no private row is significantly
    # worse than it; the best private row at epsilon <= 4 is better for most persons
    prior = rows["public prior"]
    assert prior["epsilon"] == 0.0 and prior["mae"] < rows["last value"]["mae"]
    assert prior["paired_vs_last_value"]["ci"][1] < 0
    for name in LINEAR_ROWS[1:]:
        assert rows[name]["paired_vs_last_value"]["ci"][0] <= 0, name
        assert 0 < rows[name]["epsilon"] <= float(name.split("=")[1].rstrip(")")) + 1e-9
    best = min((rows[n] for n in LINEAR_ROWS if rows[n]["epsilon"] <= 4), key=lambda m: m["mae"])
    assert best["paired_vs_last_value"]["ci"][1] < 0 and best["persons_better"] >= 0.6 * data["n_persons"]


def test_tuning_falls_back_to_the_default_without_validation_data():
    cohort, _ = _two_person_splits()
    cfg = ProtocolConfig(min_train=10, min_test=3, bootstrap=50, validation_fraction=0.05)
    ridge = LocalRidge(alphas=(123.0, 1.0), config=cfg)
    evaluate(cohort, {"pm": PersonMean(), "local ridge": ridge}, config=cfg,
             feature_fn=index_features)
    assert ridge.chosen == {"alpha": 123.0}


def test_personal_mixing_with_last_answer():
    from restwise.models.evaluation import Personalised

    cohort, cfg = _two_person_splits()
    splits = [split_person(p, d, cfg, index_features)[0] for p, d in cohort.items()]
    s = splits[0]
    s.test.last_value[0] = NAN  # no answer in the window: the model alone
    model = {s.person: Prediction(np.full(len(s.test), 7.0), np.zeros(len(s.test)))}
    mixed = Personalised._mix(model, [s], 0.25)[s.person].value
    assert mixed[0] == 7.0
    np.testing.assert_allclose(mixed[1:], 0.25 * 7.0 + 0.75 * s.test.last_value[1:])
    with pytest.raises(EvaluationError):
        NeuralConfig(mix_alphas=(1.5,))


@pytest.mark.slow
@pytest.mark.realdata
def test_restwise_evaluate_on_real_lifesnaps(shared_data, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(_cli(), [
        "evaluate", "--dataset", "lifesnaps", "--data", str(shared_data / "lifesnaps"),
        "--min-train", "15", "--min-test", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"]["target"] == "fatigue"
    assert data["n_persons"] >= 5 and len(data["excluded"]) + data["n_persons"] == 71
    rows = {m["name"]: m for m in data["methods"]}
    assert list(rows) == [*BASELINE_ROWS, "personalised", *LINEAR_ROWS]
    for name in LINEAR_ROWS[1:]:  # no private row significantly worse than last value
        assert rows[name]["paired_vs_last_value"]["ci"][0] <= 0, name
    for m in rows.values():  # fatigue proxy lives on 2..4: MAE can't exceed 2
        assert math.isfinite(m["mae"]) and 0.0 < m["mae"] < 2.0
