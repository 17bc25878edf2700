"""Building blocks of Restwise secure aggregation: parameters, Shamir, crypto, encoding,
graph, extra slots, and the device's refusals of unsafe, replayed or out-of-order requests."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import ConfigRecord

from restwise.privacy.secagg import records as R
from restwise.privacy.secagg import shamir
from restwise.privacy.secagg.config import SecAggConfig
from restwise.privacy.secagg.crypto import (
    agree,
    decrypt,
    encrypt,
    expand_mask,
    generate_keypair,
    key_info,
    share_aad,
)
from restwise.privacy.secagg.encoding import decode_sum, encode
from restwise.privacy.secagg.errors import (
    InputRefusedError,
    ProtocolViolationError,
    SecAggConfigError,
    ShareAuthenticationError,
    ShareError,
)
from restwise.privacy.secagg.device import DeviceSession
from restwise.privacy.secagg.fields import Extra, decode_extras, epoch_fields, extra_slots
from restwise.privacy.secagg.graph import harary_neighbours
from restwise.privacy.secagg.protocol import ServerSession
from restwise.privacy.secagg.workflow import config_from_run_config, secure_sum

SESSION = "ab" * 16

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"num_neighbours": 1}, "num_neighbours"),
        ({"threshold": 0.0}, "fractional threshold"),
        ({"threshold": 1}, "threshold count"),
        ({"threshold": 0.4}, "strict majority"),  # t = 13 of k = 32 is not a majority
        ({"threshold": 0.9}, "reachable after"),  # t = 29 > 32 - floor(0.3 * 32)
        ({"max_dropout_fraction": 0.5}, "max_dropout_fraction"),
        ({"ring_bits": 70}, "ring_bits"),
        ({"frac_bits": 63}, "frac_bits"),
        ({"clip_range": float("inf")}, "clip_range"),
        ({"clip_range": -1.0}, "clip_range"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"out_of_range": "wrap"}, "out_of_range"),
        ({"ring_bits": 32, "frac_bits": 16, "clip_range": 1.0, "max_cohort": 40_000}, "would wrap"),
        ({"frac_bits": 40, "clip_range": 10.0}, "would wrap"),
    ],
)
def test_invalid_parameters_are_refused_with_the_reason(kwargs, fragment):
    with pytest.raises(SecAggConfigError, match=fragment):
        SecAggConfig(**kwargs)


def test_overflow_bound_is_tight():
    """n * ceil(C * 2^f) < 2^(bits-1): the largest accepted cohort sums without wrapping."""
    ok = SecAggConfig(ring_bits=32, frac_bits=16, clip_range=1.0, max_cohort=32_767)
    assert ok.max_cohort * ok.max_abs_encoded < 2**31
    with pytest.raises(SecAggConfigError, match="would wrap"):
        SecAggConfig(ring_bits=32, frac_bits=16, clip_range=1.0, max_cohort=32_768)
    n = ok.max_cohort  # the extreme: every client at +C or at -C decodes exactly
    for sign in (1.0, -1.0):
        one = encode(np.array([sign * ok.clip_range]), clip_range=1.0, frac_bits=16, ring_bits=32)
        ring = (one.astype(object) * n) % 2**32
        total = decode_sum(np.array(ring, dtype=np.uint64), frac_bits=16, ring_bits=32)
        assert total[0] == sign * n


def test_round_parameters():
    config = SecAggConfig()
    assert config.round_parameters(10) == (9, 6, 7)  # complete graph
    assert config.min_survivors(100) == 70
    assert config.round_parameters(1000) == (32, 20, 700)
    assert SecAggConfig(num_neighbours=7).round_parameters(100)[0] == 8  # Harary: even degree
    with pytest.raises(SecAggConfigError, match="at least 3"):
        config.round_parameters(2)
    with pytest.raises(SecAggConfigError, match="max_cohort"):
        SecAggConfig(max_cohort=50).round_parameters(51)


def test_run_config_keys():
    config = config_from_run_config({"secagg-num-neighbours": 8, "secagg-threshold": 0.75, "secagg-timeout-s": 30, "other": 1})
    assert (config.num_neighbours, config.threshold, config.timeout_s) == (8, 0.75, 30.0)
    with pytest.raises(SecAggConfigError):
        config_from_run_config({"secagg-ring-bits": 99})


def test_secure_sum_refuses_an_invalid_call():
    from flwr.app import RecordDict

    with pytest.raises(SecAggConfigError, match="at least 3"):
        secure_sum(None, [1, 2], RecordDict(), SecAggConfig(), round=1, vector_length=4)
    with pytest.raises(SecAggConfigError, match="distinct"):
        ServerSession(SecAggConfig()).start_round([1, 1, 2], 1, 4)
    with pytest.raises(SecAggConfigError, match="vector_length"):
        ServerSession(SecAggConfig()).start_round([1, 2, 3], 1, 0)


# ----------------------------------------------------------------------------- shamir


def test_shamir_any_threshold_subset_reconstructs_and_fewer_do_not():
    secret = bytes(range(32))
    xs = [3, 5, 8, 13, 21, 34]
    shares = shamir.split(secret, xs, 4)
    for subset in itertools.combinations(range(6), 4):
        assert shamir.reconstruct([xs[i] for i in subset], [shares[i] for i in subset]) == secret
    for subset in itertools.combinations(range(6), 3):
        try:
            assert shamir.reconstruct([xs[i] for i in subset], [shares[i] for i in subset]) != secret
        except ShareError:
            pass  # a wrong value may not even be a valid 32-byte secret


def test_shamir_rejects_malformed_shares():
    shares = shamir.split(b"\x07" * 32, [1, 2, 3], 2)
    with pytest.raises(ShareError, match="wrong length"):
        shamir.reconstruct([1, 2], [shares[0], shares[1][:-1]])
    beyond = (shamir.PRIME).to_bytes(16, "big") + shares[1][16:]
    with pytest.raises(ShareError, match="outside the field"):
        shamir.reconstruct([1, 2], [shares[0], beyond])
    with pytest.raises(ShareError):
        shamir.split(b"short", [1, 2], 2)
    with pytest.raises(ShareError):
        shamir.split(b"\x00" * 32, [0, 1], 2)


# ----------------------------------------------------------------------------- crypto


def test_share_encryption_binds_session_epoch_round_sender_and_receiver():
    a_sk, a_pk = generate_keypair()
    b_sk, b_pk = generate_keypair()
    info = key_info(b"share-enc", SESSION, 1, 0, 1, 2)
    key_ab = agree(a_sk, b_pk, info)
    assert key_ab == agree(b_sk, a_pk, key_info(b"share-enc", SESSION, 1, 0, 2, 1))  # symmetric
    assert key_ab != agree(a_sk, b_pk, key_info(b"share-enc", SESSION, 2, 0, 1, 2))  # per epoch
    assert key_ab != agree(a_sk, b_pk, key_info(b"share-enc", "cd" * 16, 1, 0, 1, 2))  # per session
    assert key_ab != agree(a_sk, b_pk, key_info(b"pair-mask", SESSION, 1, 0, 1, 2))  # per purpose
    assert agree(a_sk, b_pk, key_info(b"pair-mask", SESSION, 1, 4, 1, 2)) != agree(
        a_sk, b_pk, key_info(b"pair-mask", SESSION, 1, 5, 1, 2))  # per round
    aad = share_aad(SESSION, 1, 4, 1, 2)
    blob = encrypt(key_ab, b"share", aad)
    assert decrypt(key_ab, blob, aad) == b"share"
    for other in (share_aad(SESSION, 1, 4, 2, 1), share_aad(SESSION, 1, 5, 1, 2), share_aad(SESSION, 1, 4, 1, 3),
                  share_aad(SESSION, 2, 4, 1, 2), share_aad("cd" * 16, 1, 4, 1, 2)):
        with pytest.raises(ShareAuthenticationError):
            decrypt(key_ab, blob, other)
    with pytest.raises(ShareAuthenticationError, match="truncated"):
        decrypt(key_ab, blob[:20], aad)
    with pytest.raises(ShareError, match="invalid"):
        agree(a_sk, bytes(32), info)  # low-order point


def test_mask_stream_is_deterministic_per_seed_and_spans_the_ring():
    seed = bytes(range(32))
    a = expand_mask(seed, 50_000, 64)
    assert np.array_equal(a, expand_mask(seed, 50_000, 64))
    assert not np.array_equal(a, expand_mask(bytes(31) + b"\x01", 50_000, 64))
    assert a.max() > np.uint64(2**63)  # full 64-bit words, not a 32-bit generator's range
    b = expand_mask(seed, 50_000, 20)
    assert b.max() < 2**20 and np.array_equal(b, a & np.uint64(2**20 - 1))
    bits = np.unpackbits(a.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.002


# ----------------------------------------------------------------------------- encoding


def test_encoding_round_trip_and_refusals():
    x = np.array([-1.0, -0.25, 0.0, 1e-7, 0.5, 1.0])
    q = encode(x, clip_range=1.0, frac_bits=20, ring_bits=32)
    assert q.dtype == np.uint64 and q.max() < 2**32
    np.testing.assert_allclose(decode_sum(q, frac_bits=20, ring_bits=32), x, atol=2**-21)
    with pytest.raises(InputRefusedError, match="NaN") as err:
        encode(np.array([0.0, np.nan]), clip_range=1.0, frac_bits=20, ring_bits=32)
    assert err.value.code == "non-finite"
    with pytest.raises(InputRefusedError, match="outside the declared range"):
        encode(np.array([1.0000001]), clip_range=1.0, frac_bits=20, ring_bits=32)
    clipped = encode(np.array([5.0, -5.0]), clip_range=1.0, frac_bits=20, ring_bits=32, clip=True)
    np.testing.assert_array_equal(decode_sum(clipped, frac_bits=20, ring_bits=32), [1.0, -1.0])
    with pytest.raises(InputRefusedError, match="1-D"):
        encode(np.zeros((2, 2)), clip_range=1.0, frac_bits=20, ring_bits=32)


# ----------------------------------------------------------------------------- graph


def test_harary_graph_is_symmetric_and_k_regular():
    indices = list(range(1, 101))
    graph = harary_neighbours(indices, 8)
    assert all(len(nb) == 8 and i not in nb for i, nb in graph.items())
    assert all(i in graph[j] for i, nb in graph.items() for j in nb)
    complete = harary_neighbours(list(range(1, 6)), 4)
    assert complete[1] == [2, 3, 4, 5]


# ----------------------------------------------------------------------------- extra slots


def test_extra_slots_round_trip_sum_and_count_and_clip_into_the_range():
    extras = (Extra("train_loss", 0.0, 100.0), Extra("other", -1.0, 1.0))
    devices = [{"train_loss": 2.5, "other": 0.5}, {"train_loss": 250.0}, {"train_loss": float("nan"), "other": -3.0}]
    slots = sum(extra_slots(extras, values, 1.5) for values in devices)
    decoded = decode_extras(extras, slots, 1.5)
    assert decoded["train_loss"][1] == 2 and decoded["train_loss"][0] == pytest.approx(2.5 + 100.0)
    assert decoded["other"][1] == 2 and decoded["other"][0] == pytest.approx(0.5 - 1.0)
    assert np.all((slots >= 0) & (slots <= 3 * 1.5))
    with pytest.raises(SecAggConfigError):
        Extra("x", 1.0, 1.0)


# ----------------------------------------------------------------------------- device refusals


def _setup_record(**over) -> ConfigRecord:
    fields = {"stage": R.STAGE_SETUP, "session": SESSION, "epoch": 1, "round": 1, "index": 1, "n": 10,
              **epoch_fields(SecAggConfig(num_neighbours=16, max_cohort=100))}
    fields.update(over)
    return ConfigRecord(fields)


@pytest.mark.parametrize(
    "over,error",
    [
        ({"threshold": 2}, SecAggConfigError),  # t = 2 of 9: not a majority
        ({"max_dropout_fraction": 0.0, "threshold": 0.3}, SecAggConfigError),
        ({"frac_bits": 60}, SecAggConfigError),  # the sum would wrap
        ({"index": 11}, ProtocolViolationError),
        ({"ring_bits": "sixty-four"}, ProtocolViolationError),
        ({"session": "short"}, ProtocolViolationError),
        ({"epoch": "1"}, ProtocolViolationError),
    ],
)
def test_device_refuses_unsafe_setup(over, error):
    state = ConfigRecord()
    with pytest.raises(error):
        DeviceSession(state).setup(_setup_record(**over))
    assert len(state) == 0  # a refused message changes nothing


def _unmask(**over) -> ConfigRecord:
    return ConfigRecord({"stage": R.STAGE_UNMASK, "session": SESSION, "epoch": 1, "round": 1, "b_owners": [],
                         "sk_owners": [], "n_survivors": 10, **over})


def test_device_refuses_out_of_order_replayed_and_both_secrets_of_one_client():
    state = ConfigRecord()
    session = DeviceSession(state)
    session.setup(_setup_record())
    with pytest.raises(ProtocolViolationError, match="out of order"):
        session.unmask(_unmask())
    with pytest.raises(ProtocolViolationError, match="already knows"):
        session.setup(_setup_record())  # a replayed setup
    with pytest.raises(ProtocolViolationError, match="another session"):
        session.unmask(_unmask(session="cd" * 16))
    # jump the state to after collect, then ask for both secrets of client 2
    state.update({"phase": "collected", "cur_round": 1, "cur_min_survivors": 7,
                  "held": (2).to_bytes(4, "big") + b"x" * 48 + b"y" * 48})
    before = dict(state)
    with pytest.raises(ProtocolViolationError, match="both secrets"):
        session.unmask(_unmask(b_owners=[2], sk_owners=[2]))
    with pytest.raises(ProtocolViolationError, match="fewer survivors"):
        session.unmask(_unmask(b_owners=[2], n_survivors=6))
    with pytest.raises(ProtocolViolationError, match="another round"):
        session.unmask(_unmask(round=2, b_owners=[2]))
    assert dict(state) == before
    reply = session.unmask(_unmask(b_owners=[2]))
    assert reply.config_records[R.UNMASK_SHARES]["b_share"] == [b"x" * 48]
    with pytest.raises(ProtocolViolationError, match="out of order"):
        session.unmask(_unmask(b_owners=[2]))  # answered once, never twice


def test_device_refuses_neighbour_lists_that_cannot_work():
    session = DeviceSession(ConfigRecord())
    session.setup(_setup_record())
    keys = [generate_keypair()[1] for _ in range(9)]
    base = {"stage": R.STAGE_SHARE_KEYS, "session": SESSION, "epoch": 1, "round": 1, "n": 10}
    with pytest.raises(ProtocolViolationError, match="threshold"):
        session.share_keys(ConfigRecord({**base, "neighbours": [2, 3], "c_pk": keys[:2]}))
    with pytest.raises(ProtocolViolationError, match="invalid"):
        session.share_keys(ConfigRecord({**base, "neighbours": list(range(1, 10)), "c_pk": keys}))
    with pytest.raises(ProtocolViolationError, match="own"):
        own = [bytes(session.state["c_pk"])] + keys[1:]
        session.share_keys(ConfigRecord({**base, "neighbours": list(range(2, 11)), "c_pk": own}))
    reply = session.share_keys(ConfigRecord({**base, "neighbours": list(range(2, 11)), "c_pk": keys}))
    assert len(reply.config_records[R.SHARES]["ct"]) == 9
    with pytest.raises(ProtocolViolationError, match="out of order"):
        session.share_keys(ConfigRecord({**base, "neighbours": list(range(2, 11)), "c_pk": keys}))
