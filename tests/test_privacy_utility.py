"""The planner: expected noise-to-signal from the accountant's noise, the verdict, the force
override, and `restwise privacy plan`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from restwise.common.errors import ModelError
from restwise.planning import plan_run
from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.privacy.utility import (
    FedAvgShape,
    StatisticsReleaseShape,
    assess_fedavg,
    assess_statistics_release,
    min_survivors,
)


def test_fedavg_noise_to_signal_is_the_documented_arithmetic():
    shape = FedAvgShape("net", 17_732, 1.0, 10)
    v = assess_fedavg(shape, 47, 8.0, 1e-5)
    z = calibrate_noise_multiplier(8.0, 1e-5, 10, sampling="full", adjacency="add_remove").noise_multiplier
    assert v.noise_multiplier == pytest.approx(z)
    assert v.noise_std == pytest.approx(z / 47)
    assert v.noise_to_signal == pytest.approx(z * math.sqrt(17_732) / 47)
    assert 5.0 < v.noise_to_signal < 5.8  # the 5.4 of docs/evaluation.md
    assert not v.expected_to_beat_prior and v.refused and not v.allowed
    assert "17,732" in v.message and f"{v.noise_to_signal:.2f}" in v.message
    assert v.numbers["devices_needed"] == math.ceil(z * math.sqrt(17_732))
    forced = assess_fedavg(shape, 47, 8.0, 1e-5, force=True)
    assert forced.allowed and forced.refused and forced.forced and "Forced" in forced.message
    big = assess_fedavg(shape, 300, 8.0, 1e-5)
    assert big.expected_to_beat_prior and big.allowed
    sampled = assess_fedavg(FedAvgShape("net", 17_732, 1.0, 10, sampling_rate=0.5), 300, 8.0)
    assert sampled.noise_std == pytest.approx(sampled.noise_multiplier / 150)


def _toy_shape():
    d = 4
    return StatisticsReleaseShape("toy", d * (d + 1) // 2 + d, math.sqrt(2), 2.0, np.eye(d) * 0.05,
                                  np.full(d, 0.01), 1.0, 1e-4, 0.2)


def test_statistics_release_gets_better_with_more_devices_and_is_never_refused():
    shape = _toy_shape()
    verdicts = [assess_statistics_release(shape, n, 4.0) for n in (10, 100, 1000, 10_000)]
    nsr = [v.noise_to_signal for v in verdicts]
    red = [v.numbers["reduction"] for v in verdicts]
    assert nsr == sorted(nsr, reverse=True) and red == sorted(red)
    assert 0 <= red[0] < 0.05 < red[-1] < 1
    assert not verdicts[0].expected_to_beat_prior and verdicts[-1].expected_to_beat_prior
    assert all(not v.refused and v.allowed for v in verdicts)  # it falls back to the prior
    v = verdicts[1]
    assert v.numbers["min_survivors"] == min_survivors(100) == 70
    assert v.noise_std == pytest.approx(v.noise_multiplier * math.sqrt(2) * math.sqrt(100 / 69))
    assert v.noise_to_signal == pytest.approx(v.noise_std * math.sqrt(shape.statistics_length) / (100 * 0.2))


def test_bad_plans_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="cohort"):
        assess_statistics_release(_toy_shape(), 1, 4.0)
    with pytest.raises(ValueError, match="epsilon"):
        assess_fedavg(FedAvgShape("net", 10, 1.0, 10), 10, -1.0)
    with pytest.raises(ModelError, match="unknown model"):
        plan_run("transformer", 10, 1.0)


def test_plan_run_uses_the_architectures_numbers():
    from restwise.models.registry import get_architecture

    shape = get_architecture("linear-head").release_shape(rounds=1, clip_norm=1.0, sampling_rate=1.0)
    assert shape["mechanism"] == "statistics"
    assert (shape["statistics_length"], shape["sensitivity"]) == (560, pytest.approx(math.sqrt(2)))
    v = plan_run("linear-head", 47, 4.0)
    assert v.mechanism == "statistics" and v.allowed and not v.expected_to_beat_prior
    assert plan_run("linear-head", 5000, 4.0).expected_to_beat_prior


def test_restwise_privacy_plan():
    from restwise.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["privacy", "plan", "--cohort", "47", "--epsilon", "8", "--model", "recovery-mlp"])
    assert r.exit_code == 1 and "noise-to-signal 5.3" in r.output and "refused" in r.output
    r = runner.invoke(app, ["privacy", "plan", "--cohort", "47", "--epsilon", "8", "--model", "recovery-mlp",
                            "--force", "--json"])
    assert r.exit_code == 0
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["forced"] and out["allowed"] and out["numbers"]["shared_length"] == 17_732
    r = runner.invoke(app, ["privacy", "plan", "--cohort", "47", "--epsilon", "4"])
    assert r.exit_code == 0 and "linear-head" in r.output and "560 numbers" in r.output
    r = runner.invoke(app, ["privacy", "plan", "--cohort", "47", "--epsilon", "4", "--model", "nope"])
    assert r.exit_code == 2
