"""Device-side DP: clipping (NaN/inf refused), the distributed noise share, the mod."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from restwise.privacy import dp_mods as D
from restwise.privacy import wire
from restwise.privacy.secagg import records as SR
from restwise.privacy.secagg.harness import ensure_task_identity

ensure_task_identity()


def _ctx(state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=state or RecordDict(), run_config={})


def _train_msg(params: D.DPRoundParams | None) -> Message:
    content = RecordDict({"restwise.run": ConfigRecord({"run_id": "run-x", "round": 1})})
    if params is not None:
        content[wire.DP_RECORD] = params.to_record()
    return Message(content, dst_node_id=7, message_type="train")


def _inner_returning(vector: np.ndarray, loss: float = 0.5):
    def inner(msg, ctx):
        return Message(
            RecordDict({
                SR.INNER_UPDATE: ArrayRecord({SR.INNER_VECTOR: Array(np.asarray(vector, dtype=np.float64))}),
                SR.INNER_METRICS: MetricRecord({"train_loss": loss}),
            }),
            reply_to=msg,
        )
    return inner


def test_clip_scales_long_vectors_to_the_bound_and_keeps_short_ones():
    v = np.array([3.0, 4.0])
    clipped, norm = D.clip_update(v, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.linalg.norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    short, _ = D.clip_update(np.array([0.1, 0.2]), 1.0)
    np.testing.assert_array_equal(short, [0.1, 0.2])


def test_clip_survives_a_vector_whose_norm_would_overflow():
    v = np.full(10, 1e300)
    clipped, norm = D.clip_update(v, 2.0)
    assert math.isfinite(norm) and norm > 1e300
    assert np.linalg.norm(clipped) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_refuses_non_finite_values(bad):
    with pytest.raises(D.NonFiniteUpdateError):
        D.clip_update(np.array([0.0, bad, 1.0]), 1.0)


def test_noise_share_is_sized_for_the_minimum_surviving_cohort():
    p = D.DPRoundParams(clip_norm=2.0, noise_multiplier=1.5, placement="distributed", noise_divisor=9)
    assert p.share_std == pytest.approx(1.5 * 2.0 / 3.0)
    # 9 shares sum to std z*C; 12 survivors give more noise, never less.
    assert D.total_noise_std(1.5, 2.0, 9, 9) == pytest.approx(3.0)
    assert D.total_noise_std(1.5, 2.0, 12, 9) == pytest.approx(3.0 * math.sqrt(12 / 9))
    central = D.DPRoundParams(clip_norm=2.0, noise_multiplier=1.5, placement="central", noise_divisor=1)
    assert central.share_std == 0.0


def test_privatize_adds_gaussian_noise_of_the_share_std():
    p = D.DPRoundParams(clip_norm=1.0, noise_multiplier=2.0, placement="distributed", noise_divisor=4)
    rng = np.random.default_rng(1)
    out = D.privatize(np.zeros(200_000), p, rng)
    assert out.std() == pytest.approx(1.0, rel=0.01)  # 2 * 1 / sqrt(4)
    assert abs(out.mean()) < 0.01


def test_central_noise_is_added_by_the_server_with_std_zc():
    out = D.add_central_noise(np.zeros(200_000), 1.5, 2.0, np.random.default_rng(2))
    assert out.std() == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip_norm=0.0, noise_multiplier=1.0, placement="distributed", noise_divisor=3),
        dict(clip_norm=math.nan, noise_multiplier=1.0, placement="distributed", noise_divisor=3),
        dict(clip_norm=1.0, noise_multiplier=0.1, placement="distributed", noise_divisor=3),
        dict(clip_norm=1.0, noise_multiplier=1.0, placement="local", noise_divisor=3),
        dict(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", noise_divisor=0),
    ],
)
def test_unsafe_round_parameters_are_refused(kwargs):
    with pytest.raises(D.UnsafeParametersError):
        D.DPRoundParams(**kwargs)


def test_mod_clips_and_noises_the_inner_update_and_keeps_metrics():
    p = D.DPRoundParams(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", noise_divisor=4)
    mod = D.make_dp_mod(lambda: np.random.default_rng(3))
    reply = mod(_train_msg(p), _ctx(), _inner_returning(np.full(50_000, 10.0)))
    assert not reply.has_error()
    out = reply.content.array_records[SR.INNER_UPDATE][SR.INNER_VECTOR].numpy()
    expected_clean = np.full(50_000, 1.0 / math.sqrt(50_000))
    noise = out - expected_clean
    assert noise.std() == pytest.approx(0.5, rel=0.02)
    assert reply.content.metric_records[SR.INNER_METRICS]["train_loss"] == 0.5


def test_mod_refuses_nan_updates_without_sending_any_vector():
    p = D.DPRoundParams(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", noise_divisor=4)
    reply = D.dp_mod(_train_msg(p), _ctx(), _inner_returning(np.array([1.0, np.nan])))
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_NON_FINITE


def test_mod_refuses_a_train_message_without_dp_parameters():
    called = []

    def inner(msg, ctx):
        called.append(1)
        return _inner_returning(np.zeros(3))(msg, ctx)

    reply = D.dp_mod(_train_msg(None), _ctx(), inner)
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_BAD_PARAMS
    assert not called  # nothing was even trained


def test_mod_refuses_a_noise_divisor_above_the_secure_rounds_guarantee():
    # The secure-aggregation mod recorded that 5 survivors are enough to release this round;
    # a server claiming t_min = 8 would make each share too small for a 5-survivor release.
    state = RecordDict({SR.CLIENT_STATE: ConfigRecord({"min_survivors": 5})})
    p = D.DPRoundParams(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", noise_divisor=8)
    reply = D.dp_mod(_train_msg(p), _ctx(state), _inner_returning(np.zeros(3)))
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_BAD_PARAMS
    ok = D.DPRoundParams(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", noise_divisor=5)
    assert not D.dp_mod(_train_msg(ok), _ctx(state), _inner_returning(np.zeros(3))).has_error()


def test_non_train_messages_pass_through():
    msg = Message(RecordDict(), dst_node_id=7, message_type="query.restwise_hello")
    seen = []
    D.dp_mod(msg, _ctx(), lambda m, c: seen.append(m) or Message(RecordDict(), reply_to=m))
    assert seen == [msg]
