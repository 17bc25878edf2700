"""The in-process DP statistics release: noise sized as the deployment sizes it, one event
accounted by the accountant, training periods only, devices that cannot take part, refusal of
NaN, and the shrinkage toward the prior."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from restwise.models import linear_head as lh
from restwise.models.evaluation import LastValue, ProtocolConfig, evaluate, split_person
from restwise.models.prior import PriorAssignment, PublicPriorMethod
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.simulation import federated_statistics as fs

from .test_prior import synthetic_days


@pytest.fixture(scope="module")
def splits():
    cfg = ProtocolConfig(bootstrap=100)
    out = [split_person(p, d, cfg)[0] for p, d in synthetic_days(10, 150, seed0=70).items()]
    assert all(out)
    return out


def _assignment(persons, w0=None, tau2=0.01):
    w0 = np.zeros(lh.N_FEATURES) if w0 is None else w0
    prior = lh.PriorWeights(w0, np.full(lh.N_FEATURES, tau2), 1e-4)
    return PriorAssignment({"g": prior}, {p: "g" for p in persons})


def test_release_noise_is_sized_for_the_minimum_survivors_and_accounted(splits):
    vectors = [fs.device_statistics(s) for s in splits]
    n = len(vectors)
    rel = fs.release_statistics(vectors, target_epsilon=4.0, rng=np.random.default_rng(0))
    t_min = n - math.floor(0.3 * n)
    z = calibrate_noise_multiplier(4.0, 1e-5, 1, sampling="full", adjacency="add_remove").noise_multiplier
    assert rel.min_survivors == t_min == 7
    assert rel.share_std == pytest.approx(z * math.sqrt(2) / math.sqrt(t_min - 1))
    # counted: the other n - 1 shares; actual: all n
    assert rel.event.noise_std_total == pytest.approx(rel.share_std * math.sqrt(n - 1))
    assert rel.actual_noise_std == pytest.approx(rel.share_std * math.sqrt(n))
    assert rel.event.clip_norm == pytest.approx(lh.SENSITIVITY)
    assert rel.epsilon == PrivacyAccountant().epsilon([rel.event], 1e-5).epsilon
    assert rel.epsilon <= 4.0  # all devices present: more noise than the worst case
    noise = rel.noisy_sum - np.sum(vectors, axis=0)
    assert noise.std() == pytest.approx(rel.actual_noise_std, rel=0.12)  # 560 coordinates
    assert rel.noisy_sum.shape == (lh.STATISTICS_LENGTH,)


def test_statistics_come_from_the_training_period_only(splits):
    s = copy.deepcopy(splits[0])
    before = fs.device_statistics(s)
    s.test.X[:] = 9.0  # the test period cannot change what the device shares
    s.test.history[:] = 1.0
    np.testing.assert_array_equal(fs.device_statistics(s), before)


def test_heavy_noise_gives_the_prior_and_small_devices_do_not_take_part(splits):
    splits = copy.deepcopy(splits)
    persons = [s.person for s in splits]
    rng = np.random.default_rng(1)
    w0 = rng.normal(0, 0.3, lh.N_FEATURES)
    assignment = _assignment(persons, w0, tau2=1e-4)
    rows = {"last value": LastValue(), "public prior": PublicPriorMethod(assignment),
            "dp": fs.FederatedStatisticsMethod(assignment, target_epsilon=0.05)}
    short = splits[1]
    short.train = short.train.take(np.arange(10))  # < MIN_EXAMPLES: sends nothing
    res = evaluate(splits, rows, config=ProtocolConfig(bootstrap=100))
    dp = rows["dp"]
    assert dp.chosen["release"]["devices"] == len(splits) - 1
    assert dp.chosen["release"]["not_taking_part"] == 1
    assert dp.chosen["weights_distance_to_prior"]["g"] < 0.05
    assert res.method("dp").mae == pytest.approx(res.method("public prior").mae, abs=0.02)
    assert res.method("dp").epsilon == pytest.approx(dp.epsilon) and 0 < dp.epsilon <= 0.05
    assert len(dp.privacy_releases) == 1


def test_nan_is_refused_before_anything_is_released(splits):
    splits = copy.deepcopy(splits)
    s = splits[2]
    s.train.X[3, 0] = float("nan")
    method = fs.FederatedStatisticsMethod(_assignment([x.person for x in splits]), target_epsilon=1.0)
    with pytest.raises(lh.LinearHeadError, match="NaN"):
        method.fit_predict(splits, 0)
    assert method.epsilon is None and method.privacy_releases == []


def test_rows_are_named_by_target_epsilon():
    rows = fs.statistics_methods(_assignment(["a"]), (1.0, 4.0, 8.0))
    assert list(rows) == ["federated statistics + DP (ε=1)", "federated statistics + DP (ε=4)",
                          "federated statistics + DP (ε=8)"]
