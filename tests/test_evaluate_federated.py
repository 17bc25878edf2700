"""Federated rows of the evaluation: the in-process FedAvg equals a hand-rolled one, the DP
noise has the calibrated size, the reported epsilon is the accountant's, and clipping bounds
what one device can do to the global model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import restwise.models.training as training
from restwise.simulation.evaluate_federated import (
    FederatedMethod,
    federated_methods,
    federated_train,
    noise_share_std,
)
from restwise.models.evaluation import (
    NeuralConfig,
    ProtocolConfig,
    blinded,
    evaluate,
    split_person,
)
from restwise.models.features import DailyData
from restwise.models.network import ModelConfig, build_model, set_shared_arrays, shared_arrays
from restwise.models.synthetic import synthetic_person
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.events import ReleaseSpec

NAN = float("nan")
FAST = NeuralConfig(n_seeds=1, finetune_epochs=(0,), hidden=(8,), dropout=0.0)


def _cohort(n_persons: int, n_days: int = 120) -> dict[str, DailyData]:
    out = {}
    for k in range(n_persons):
        rows = synthetic_person(100 + k, n_days)
        cols = {
            "rmssd_ms": [r.rmssd_ms for r in rows], "resting_hr": [r.resting_hr for r in rows],
            "sleep_minutes": [r.sleep_minutes for r in rows],
            "load": [r.session_minutes * r.session_rpe for r in rows],
            "readiness": [r.readiness for r in rows], "fatigue": [r.fatigue for r in rows],
        }
        cols = {key: [NAN if v is None else v for v in vals] for key, vals in cols.items()}
        out[f"p{k:02d}"] = DailyData([r.day for r in rows], cols)
    return out


@pytest.fixture(scope="module")
def splits():
    cfg = ProtocolConfig(bootstrap=100)
    out = []
    for person, data in _cohort(4).items():
        s, why = split_person(person, data, cfg)
        assert s is not None, why
        out.append(s)
    return out


def _model_config(splits, seed=0):
    s = splits[0]
    return ModelConfig(n_features=s.train.n_features, window=s.train.window, hidden=(8,), dropout=0.0, seed=seed)


def _hand_rolled_fedavg(splits, mcfg, rounds, lr, seed):
    """Plain FedAvg written out from scratch: each device trains from the global shared part
    (personal part kept on the device), the server adds the mean of the changes."""
    glob = [a.astype(np.float64) for a in shared_arrays(build_model(mcfg))]
    devices = [build_model(mcfg) for _ in splits]
    for rnd in range(1, rounds + 1):
        deltas = []
        for s, model in zip(splits, devices):
            set_shared_arrays(model, [g.astype(np.float32) for g in glob])
            start = [a.astype(np.float64) for a in shared_arrays(model)]
            training.train_local(model, s.train.to_examples(s.days), epochs=1, lr=lr, batch_size=32,
                                 seed=seed + 7919 * rnd, low_threshold=s.low_threshold)
            deltas.append([a.astype(np.float64) - b for a, b in zip(shared_arrays(model), start)])
        glob = [g + np.mean([d[i] for d in deltas], axis=0) for i, g in enumerate(glob)]
    return [g.astype(np.float32) for g in glob]


def test_plain_federated_equals_hand_rolled_fedavg(splits):
    mcfg = _model_config(splits)
    got = federated_train(splits, mcfg, rounds=3, local_epochs=1, lr=3e-3, batch_size=32,
                          weight_decay=training.DEFAULT_WEIGHT_DECAY, seed=0, clip_norm=None,
                          noise_multiplier=None)
    want = _hand_rolled_fedavg(splits, mcfg, rounds=3, lr=3e-3, seed=0)
    for a, b in zip(shared_arrays(got), want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # training moved the model (the comparison is not between two untouched initialisations)
    init = shared_arrays(build_model(mcfg))
    assert sum(float(np.abs(a - b).sum()) for a, b in zip(shared_arrays(got), init)) > 1e-2


def test_federated_row_predicts_with_the_global_model_on_each_persons_scale(splits):
    method = FederatedMethod(rounds=2, cfg=FAST, config=ProtocolConfig())
    preds = method.fit_predict(blinded(splits), seed=0)
    mcfg = _model_config(splits, seed=0)
    glob = _hand_rolled_fedavg(splits, mcfg, rounds=2, lr=FAST.lr, seed=0)
    for s in splits:
        model = build_model(mcfg)
        set_shared_arrays(model, glob)
        training.fit_target_scaler(model, s.train.y, s.low_threshold)
        value, p_low = training.predict(model, s.test.X)
        np.testing.assert_allclose(preds[s.person].value, value, atol=1e-5)
        np.testing.assert_allclose(preds[s.person].low_score, p_low, atol=1e-5)
    assert method.chosen["finetune_epochs"] == 0 and "epsilon" not in method.chosen


def test_dp_noise_per_round_has_the_calibrated_std(splits):
    n, z, clip = len(splits), 2.0, 0.5
    mcfg = _model_config(splits)
    totals = {}

    def run(noise):
        def keep(rnd, total, _before, _after):
            totals[noise] = total.copy()
        federated_train(splits, mcfg, rounds=1, local_epochs=1, lr=3e-3, batch_size=32,
                        weight_decay=training.DEFAULT_WEIGHT_DECAY, seed=0, clip_norm=clip,
                        noise_multiplier=noise, rng=np.random.default_rng(5), on_round=keep)

    run(None)
    run(z)
    noise = totals[z] - totals[None]  # same starting model and data: the difference is the noise
    share = noise_share_std(z, clip, n)
    assert share == pytest.approx(z * clip / math.sqrt(n - 1))
    # the sum carries n shares; the n - 1 that protect one person add up to z C exactly
    measured_share = float(noise.std()) / math.sqrt(n)
    assert measured_share == pytest.approx(share, rel=0.04)
    assert measured_share * math.sqrt(n - 1) == pytest.approx(z * clip * math.sqrt((n - 1) / (n - 1)), rel=0.04)
    assert abs(float(noise.mean())) < 4 * share * math.sqrt(n / noise.size)


def test_reported_epsilon_is_the_accountants(splits):
    cfg = NeuralConfig(n_seeds=2, finetune_epochs=(0,), hidden=(8,))
    method = FederatedMethod(rounds=3, clip_norm=0.7, target_epsilon=4.0, cfg=cfg)
    spec = ReleaseSpec.plan(noise_multiplier=method.noise_multiplier, sampling="full", adjacency="add_remove")
    expected = PrivacyAccountant().epsilon_for_rounds(spec, 3 * 2, 1e-5).epsilon
    assert method.releases == 6
    assert method.epsilon == pytest.approx(expected, rel=1e-12)
    assert 3.9 < method.epsilon <= 4.0
    # a smaller multiplier would overshoot: the calibration is tight, not merely safe
    looser = ReleaseSpec.plan(noise_multiplier=method.noise_multiplier * 0.98, sampling="full", adjacency="add_remove")
    assert PrivacyAccountant().epsilon_for_rounds(looser, 6, 1e-5).epsilon > 4.0
    rows = federated_methods(ProtocolConfig(), cfg, target_epsilon=4.0, rounds=3, dp_ensemble=2)
    assert list(rows) == ["federated (no DP)", f"federated + DP (ε={method.epsilon:.2f})"]
    assert rows[f"federated + DP (ε={method.epsilon:.2f})"].noise_multiplier == method.noise_multiplier
    single = federated_methods(ProtocolConfig(), cfg, target_epsilon=4.0, rounds=3)  # one DP run
    dp_single = list(single.values())[1]
    assert dp_single.releases == 3 and dp_single.noise_multiplier < method.noise_multiplier
    assert single["federated (no DP)"].cfg.n_seeds == 2
    assert rows["federated (no DP)"].noise_multiplier is None and rows["federated (no DP)"].clip_norm is None


def test_clipped_huge_update_moves_the_global_model_by_at_most_c_over_n(splits, monkeypatch):
    n, clip = len(splits), 0.25
    mcfg = _model_config(splits)
    real_train = training.train_local

    def attacker(model, examples, **kw):  # device p00 sends an absurd update
        out = real_train(model, examples, **kw)
        if examples.target_days == splits[0].train.to_examples(splits[0].days).target_days:
            with torch.no_grad():
                for p in model.shared.parameters():
                    p.mul_(1e6).add_(1e3)
        return out

    monkeypatch.setattr(training, "train_local", attacker)

    def one_round(clip_norm):
        seen, moved = {}, {}

        def upd(_rnd, person, contribution):
            seen[person] = contribution

        def rnd_(_rnd, total, before, after):
            moved["step"] = after - before
        federated_train(splits, mcfg, rounds=1, local_epochs=1, lr=3e-3, batch_size=32,
                        weight_decay=training.DEFAULT_WEIGHT_DECAY, seed=0, clip_norm=clip_norm,
                        noise_multiplier=None, on_update=upd, on_round=rnd_)
        return seen, moved["step"]

    seen, step = one_round(clip)
    attacker_part = seen[splits[0].person] / n
    assert np.linalg.norm(attacker_part) == pytest.approx(clip / n, rel=1e-9)  # clipped to exactly C
    assert np.linalg.norm(step) <= clip * (1 + 1e-9)  # the whole step: at most n x C / n
    honest = sum(v for p, v in seen.items() if p != splits[0].person) / n
    assert np.linalg.norm(step - honest) <= clip / n * (1 + 1e-9)
    # without clipping (the plain mode) the same device moves the model by far more
    seen_plain, step_plain = one_round(None)
    assert np.linalg.norm(step_plain) > 1e3 * clip


def test_rows_plug_into_evaluate(splits):
    rows = federated_methods(ProtocolConfig(bootstrap=100), FAST, target_epsilon=8.0, rounds=2)
    res = evaluate(splits, rows, config=ProtocolConfig(bootstrap=100), dataset="synthetic")
    names = [m.name for m in res.methods]
    assert names[0] == "federated (no DP)" and names[1].startswith("federated + DP (ε=")
    dp = res.methods[1]
    assert dp.chosen["epsilon"] <= 8.0 and dp.chosen["devices"] == len(splits)
    for m in res.methods:
        assert math.isfinite(m.mae) and 0.1 < m.mae < 4.0


def test_cli_federated_flag_appends_both_rows(tmp_path, monkeypatch):
    import json

    import restwise.models.evaluation as ev
    import restwise.simulation.evaluate_cli as evaluate_cli
    from restwise.cli import app
    from typer.testing import CliRunner

    from restwise.models.evaluation import BASELINE_ROWS

    small = NeuralConfig(n_seeds=1, local_epochs=(2,), central_epochs=2, finetune_epochs=(0,), hidden=(8,))
    monkeypatch.setattr(ev, "NeuralConfig", lambda **_kw: small)
    monkeypatch.setattr(evaluate_cli, "NeuralConfig", lambda **_kw: small)  # the command's own import
    for person, data in _cohort(3, 150).items():
        folder = tmp_path / "cohort" / person
        folder.mkdir(parents=True)
        lines = ["date,readiness,fatigue"]
        for i, day in enumerate(data.days):
            r, f = data["readiness"][i], data["fatigue"][i]
            lines.append(f"{day},{'' if not np.isfinite(r) else f'{r:g}'},{'' if not np.isfinite(f) else f'{f:g}'}")
        (folder / "checkins.csv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, [
        "evaluate", "--cohort", str(tmp_path / "cohort"), "--out", str(tmp_path / "out"), "--federated"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out/results.json").read_text())
    names = [m["name"] for m in data["methods"]]
    linear = ["public prior", *(f"federated statistics + DP (ε={e})" for e in (1, 4, 8))]
    assert names[:-2] == [*BASELINE_ROWS, "personalised", *linear]
    assert names[-2] == "federated (no DP)" and names[-1].startswith("federated + DP (ε=")
    dp = data["methods"][-1]["chosen"]
    assert dp["devices"] == 3 and dp["releases"] == 10 and dp["epsilon"] <= 8.0
    # the row's epsilon counts every release it made (selection included)
    assert data["methods"][-1]["epsilon"] == dp["epsilon_with_selection"]
    assert data["methods"][-2]["epsilon"] is None
    assert data["privacy"]["releases"] == 3 + dp["releases"]
    assert f"| {names[-1]} |" in (tmp_path / "out/results.md").read_text()
