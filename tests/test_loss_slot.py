"""The training loss inside the DP-FedAvg vector (models/loss_slot.py) and the run's
``loss-rising`` warning (server/loss_trend.py, the run's events). The exact check under real
secure aggregation is tests/test_federated_app.py
(test_the_released_training_loss_is_the_survivors_mean_loss_and_no_vector_exceeds_c)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from restwise.common.errors import ModelError
from restwise.models.loss_slot import LossSlot, recorded_loss_slot, split_loss_slot
from restwise.models.recovery_mlp import ARCHITECTURE as MLP
from restwise.models.recovery_mlp import LOSS_SLOT
from restwise.models.registry import ReleasedSum
from restwise.privacy.dp_mods import DPRoundParams, privatize
from restwise.server.app import FederatedServer
from restwise.server.loss_trend import LOSS_RISING, LossPoint, loss_points, loss_rise
from restwise.server.progress import ProgressReporter, RunView, outcome_line
from restwise.server.rundir import RunFiles, append_event, model_section, open_ledger, read_events
from restwise.server.service import Settings, create_app
from restwise.server.runconfig import RunConfig

# The pilot configuration of docs/service.md (recovery-mlp, 50 devices, q = 0.2, eps = 3 over
# 20 rounds -> z = 1.63): about 10 survivors, noise on the sum ~ z C sqrt(10 / 6); the loss
# estimate's std is sigma L / (2 beta C m).
PILOT_LOSS_STD = 1.63 * math.sqrt(10 / 6) * LOSS_SLOT.max_loss / (2 * LOSS_SLOT.beta * 10)


def test_the_vector_never_exceeds_c_and_the_slot_is_never_shrunk():
    rng = np.random.default_rng(0)
    for clip in (0.1, 1.0, 7.5):
        for scale in (0.0, 1e-3, 0.5, 1.0, 10.0, 1e6):
            for loss in (-1.0, 0.0, 0.42, LOSS_SLOT.max_loss, 50.0, math.inf):
                update = rng.normal(size=300) * scale
                v = LOSS_SLOT.append(update, loss, clip)
                assert v.shape == (301,)
                assert np.linalg.norm(v) <= clip  # the DP mod's clip to C never touches it
                # The slot carries the loss whatever the update's size (unbiased estimate).
                clamped = min(max(loss, 0.0), LOSS_SLOT.max_loss)
                assert v[-1] == pytest.approx(LOSS_SLOT.beta * clip * (2 * clamped / LOSS_SLOT.max_loss - 1))
                assert abs(v[-1]) <= LOSS_SLOT.beta * clip
                if np.linalg.norm(update) <= clip * math.sqrt(1 - LOSS_SLOT.beta**2) * 0.99:
                    np.testing.assert_array_equal(v[:-1], update)  # a small update is sent as it is
                # The DP mod (zero noise: central placement) leaves the vector as it is.
                kept = privatize(v, DPRoundParams(clip, 1.0, "central", 1))
                np.testing.assert_array_equal(kept, v)
    # A NaN loss or update stays NaN: the DP mod refuses the whole vector.
    assert math.isnan(LOSS_SLOT.append(np.ones(3), float("nan"), 1.0)[-1])
    assert np.isnan(LOSS_SLOT.append(np.array([1.0, np.nan]), 0.5, 1.0)).any()
    with pytest.raises(ModelError, match="clip norm"):
        LOSS_SLOT.append(np.ones(3), 0.5, 0.0)


def test_the_decoded_sum_is_the_mean_loss_without_noise_and_has_the_stated_std_with_it():
    rng = np.random.default_rng(1)
    clip, m = 0.8, 9
    losses = np.array([0.31, 0.55, 0.7, 1.2, 0.05, 2.2, 9.0, 0.6, 0.44])  # one above max_loss
    vectors = [LOSS_SLOT.append(rng.normal(size=50) * 3, loss, clip) for loss in losses]
    total = np.sum(vectors, axis=0)
    est = LOSS_SLOT.decode(total[-1], m, 0.0, clip)
    assert est.mean == pytest.approx(np.mean(np.minimum(losses, LOSS_SLOT.max_loss)), abs=1e-12)
    assert est.std == 0.0
    # With Gaussian noise of std sigma on the sum: unbiased, with the stated std.
    sigma = 1.3
    draws = [LOSS_SLOT.decode(total[-1] + rng.normal(0, sigma), m, sigma, clip) for _ in range(4000)]
    means = np.array([d.mean for d in draws])
    assert draws[0].std == pytest.approx(sigma * LOSS_SLOT.max_loss / (2 * LOSS_SLOT.beta * clip * m))
    assert np.std(means) == pytest.approx(draws[0].std, rel=0.05)
    assert abs(np.mean(means) - est.mean) < 4 * draws[0].std / math.sqrt(len(draws))


def test_the_architecture_records_its_constants_and_splits_the_released_sum():
    config = MLP.model_config(5)
    assert recorded_loss_slot(config) == LOSS_SLOT
    network, slot = split_loss_slot(config)
    assert "loss_slot" not in json.loads(network) and slot == LOSS_SLOT
    # A configuration written before the slot existed gets the default constants.
    assert split_loss_slot(network)[1] == LossSlot() and recorded_loss_slot(network) is None
    custom = json.dumps({**json.loads(network), "loss_slot": {"beta": 0.5, "max_loss": 2.0}})
    shared = [np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]
    assert MLP.contribution_size(shared) == 11
    vectors = [LossSlot(0.5, 2.0).append(np.full(10, 0.01 * i), loss, 1.0) for i, loss in enumerate((0.5, 1.5, 1.0))]
    released = ReleasedSum(np.sum(vectors, axis=0), 3, 0.9, 4.0, 1.0)
    arrays = MLP.apply_release(custom, shared, released)
    np.testing.assert_allclose(arrays[1], np.full(4, 0.03 / 4), rtol=1e-6)  # the update part / expected cohort
    metrics = MLP.release_metrics(custom, released)
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert metrics["train_loss_std"] == pytest.approx(0.9 * 2.0 / (2 * 0.5 * 1.0 * 3))
    assert MLP.release_metrics(custom, ReleasedSum(released.total, 3, 0.9, 4.0)) == {}  # no C: nothing decoded


def _noisy_runs(true: list[float], std: float, runs: int, rng) -> list[int | None]:
    """For each synthetic run: the first round after which the test warns (None: never)."""
    out = []
    for _ in range(runs):
        points, fired = [], None
        for rnd, level in enumerate(true, 1):
            points.append(LossPoint(rnd, level + rng.normal(0, std), std))
            if loss_rise(points) is not None:
                fired = rnd
                break
        out.append(fired)
    return out


def test_the_warning_fires_on_a_rising_loss_and_stays_quiet_on_a_flat_one():
    rng = np.random.default_rng(14)
    # A cohort of ~50 (std 0.3): a model that diverges from round 6 on (0.6 -> 4 by round 16).
    rising = [min(LOSS_SLOT.max_loss, 0.6 + max(0, r - 5) * 0.34) for r in range(1, 21)]
    flat, falling = [0.6] * 20, [0.3 + 0.6 * math.exp(-r / 5) for r in range(20)]
    fired = _noisy_runs(rising, 0.3, 100, rng)
    assert sum(f is not None for f in fired) >= 97 and np.median([f for f in fired if f]) <= 10
    assert sum(f is not None for f in _noisy_runs(flat, 0.3, 200, rng)) <= 8  # measured 1.3% at window 10
    assert sum(f is not None for f in _noisy_runs(falling, 0.3, 200, rng)) <= 4
    # The pilot's noise (std ~1.2 per round): still quiet on flat runs; detection is weaker.
    assert sum(f is not None for f in _noisy_runs(flat, PILOT_LOSS_STD, 200, rng)) <= 8
    assert sum(f is not None for f in _noisy_runs(rising, PILOT_LOSS_STD, 100, rng)) >= 30
    # Without noise (a plain run, std 0): a steady rise is found, a flat or falling loss is not.
    exact = [LossPoint(r, 0.5 + 0.05 * r, 0.0) for r in range(1, 7)]
    assert loss_rise(exact) is not None and "an exact fit" in loss_rise(exact).message()
    assert loss_rise([LossPoint(r, 0.5, 0.0) for r in range(1, 9)]) is None
    assert loss_rise([LossPoint(r, 1.0 / r, 0.0) for r in range(1, 9)]) is None
    assert loss_rise(exact[:3]) is None  # too few rounds for a verdict


def test_a_run_warns_once_in_its_events_and_every_view_shows_it(tmp_path):
    run_dir = tmp_path / "run-0000000000ab"
    run_dir.mkdir()
    config = RunConfig(name="t", rounds=8, population=10, sampling="poisson", sampling_rate=1.0, noise_multiplier=1.0,
                       delta=1e-3, clip_norm=1.0, dataset="demo", force=True)
    files = RunFiles(run_dir)
    files.write_config(config)
    server = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, config))
    losses = [0.62, 0.60, 0.58, 0.95, 1.6, 2.4, 3.1, 3.6]
    for rnd, loss in enumerate(losses, 1):
        files.append_round({"round": rnd, "attempt": 0, "status": "completed", "sampled": 10, "survived": 10,
                            "train_loss": loss, "train_loss_std": 0.1, "epsilon": 0.1 * rnd, "delta": 1e-3})
        server.watch_loss(rnd)
    assert [p.loss for p in loss_points(files.round_lines())] == losses
    (event,) = read_events(run_dir)  # once, although the loss kept rising
    assert event["kind"] == LOSS_RISING and event["level"] == "warning" and 5 <= event["round"] <= 6
    assert "training loss rising" in event["message"] and event["details"]["end"] > event["details"]["start"]
    view = RunView.from_run_dir(run_dir)
    assert view.events == (event,)
    out = io.StringIO()
    ProgressReporter(Console(file=out, force_terminal=False, width=300)).update(view)
    text = out.getvalue()
    assert f"warning (round {event['round']}/8): training loss rising" in text
    assert "training loss 3.6 ± 0.1" in text  # each round shows its released loss
    files.write_state("completed", current_round=8)
    assert outcome_line(RunView.from_run_dir(run_dir)).endswith("; 1 warning: loss-rising")
    assert model_section(run_dir)["warnings"] == [event["message"]]


def test_the_api_and_the_dashboard_run_page_show_the_warning(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "srv"))
    ctx = app.state.ctx
    _, token = ctx.tokens.create("operator", "olga")
    run = {"name": "pilot", "model": "recovery-mlp", "rounds": 4, "population": 4, "sampling": "poisson",
           "sampling_rate": 0.5, "noise_multiplier": 1.0, "delta": 1e-5, "secagg_num_neighbours": 3,
           "secagg_threshold": 2, "persons": 4, "force": True}
    with TestClient(app) as client:
        run_id = client.post("/api/v1/runs", json=run, headers={"Authorization": f"Bearer {token}"}).json()["id"]
        message = "training loss rising over rounds 1-4: 0.6 -> 3.9 (<b>5.0</b> standard errors)"
        append_event(ctx.runs.run_dir(run_id), LOSS_RISING, rnd=4, level="warning", message=message,
                     details={"test": "slope"})
        detail = client.get(f"/api/v1/runs/{run_id}", headers={"Authorization": f"Bearer {token}"}).json()
        assert [(e["round"], e["kind"], e["level"], e["message"]) for e in detail["events"]] == \
            [(4, LOSS_RISING, "warning", message)]
        client.post("/login", data={"token": token}, follow_redirects=False)
        html = client.get(f"/runs/{run_id}").text
        assert 'id="run-events"' in html and 'data-kind="loss-rising"' in html
        assert "training loss rising over rounds 1-4" in html and "&lt;b&gt;5.0&lt;/b&gt;" in html  # escaped
