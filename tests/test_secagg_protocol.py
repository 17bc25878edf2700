"""Restwise secure aggregation, one round at a time, end to end in-process: the real workflow
(``secure_sum``: a one-off session, i.e. a setup round), the real client mod inside a real
flwr ClientApp, real Flower Message/RecordDict objects; only the transport is the in-process
grid (the Flower-simulation test is test_secagg_flower.py; rounds over a run, dropouts
across rounds, returning devices and malicious devices: test_secagg_rounds.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from restwise.privacy.secagg import records as R
from restwise.privacy.secagg.config import SecAggConfig as _SecAggConfig
from restwise.privacy.secagg.encoding import decode_sum, encode, ring_mask
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.privacy.secagg.mod import secagg_mod
from restwise.privacy.secagg.workflow import SecAggSession, secure_sum

D = 64


def SecAggConfig(**kwargs) -> _SecAggConfig:  # noqa: N802
    """The in-process grid answers at once: a short stage timeout makes drops cheap."""
    kwargs.setdefault("timeout_s", 0.05)
    return _SecAggConfig(**kwargs)

FIRST_NODE = 1000


def make_updates(n: int, d: int = D, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {FIRST_NODE + i: rng.uniform(-scale, scale, d) for i in range(n)}


def make_app(updates: dict[int, np.ndarray], metrics: bool = False) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context) -> Message:
        content = RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(updates[context.node_id])})})
        if metrics:
            content[R.INNER_METRICS] = MetricRecord({"loss": float(context.node_id % 7), "secret": 1.0})
        return Message(content, reply_to=msg)

    return app


def train_content(d: int = D) -> RecordDict:
    return RecordDict(
        {"model": ArrayRecord({"w": Array(np.zeros(d, dtype=np.float32))}), "config": ConfigRecord({"lr": 0.1})}
    )


def exact_total(updates, nodes, config: SecAggConfig) -> np.ndarray:
    ring = np.zeros(len(next(iter(updates.values()))), dtype=np.uint64)
    for node in nodes:
        ring += encode(updates[node], clip_range=config.clip_range, frac_bits=config.frac_bits, ring_bits=config.ring_bits)
    ring &= ring_mask(config.ring_bits)
    return ring


def run(updates, config, **grid_kwargs):
    grid = InProcessGrid(make_app(updates, grid_kwargs.pop("metrics", False)), updates, **grid_kwargs)
    result = secure_sum(grid, list(updates), train_content(len(next(iter(updates.values())))), config, round=3)
    return result, grid


def assert_exact(result, updates, survivors, config):
    assert not result.aborted, result.reason
    assert result.survivors == sorted(survivors)
    ring = exact_total(updates, survivors, config)
    np.testing.assert_array_equal(result.total_ring, ring)
    np.testing.assert_array_equal(result.total, decode_sum(ring, frac_bits=config.frac_bits, ring_bits=config.ring_bits))
    # and the fixed-point error is within the documented bound n / 2^(f+1)
    plain = sum(updates[n] for n in survivors)
    assert np.max(np.abs(result.total - plain)) <= len(survivors) / 2 ** (config.frac_bits + 1)


# --------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", R.STAGES)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_sum_is_exact_for_dropouts_up_to_the_threshold(stage, fraction):
    """20 clients, k=16 of 19 (sparse), t=10, max 30% dropout: any 6 drops leave every
    neighbourhood >= t shares, so the outcome does not depend on the random graph."""
    config = SecAggConfig(num_neighbours=16)
    updates = make_updates(20, seed=int(fraction * 10) + R.STAGES.index(stage))
    drop = list(updates)[: int(round(fraction * 20))]
    result, _ = run(updates, config, drop_at={n: stage for n in drop})
    # clients lost at unmask already sent their masked input: they stay in the sum,
    # their self-mask reconstructed from the neighbours' shares
    survivors = list(updates) if stage == R.STAGE_UNMASK else [n for n in updates if n not in drop]
    assert_exact(result, updates, survivors, config)
    assert result.dropped == {n: stage for n in drop}
    assert result.excluded == {}


@pytest.mark.parametrize("stage", [R.STAGE_SETUP, R.STAGE_SHARE_KEYS, R.STAGE_COLLECT])
def test_round_aborts_below_threshold_and_releases_nothing(stage):
    updates = make_updates(20)
    drop = list(updates)[:7]  # 35% > 30%
    result, _ = run(updates, SecAggConfig(), drop_at={n: stage for n in drop})
    assert result.aborted
    assert result.total is None and result.total_ring is None and result.survivors == []
    assert f"aborted at {stage}" in result.reason and "13 of 20" in result.reason
    assert "nothing was released" in result.reason


def test_round_aborts_when_too_many_drop_at_unmask():
    """Complete graph of 10 (k=9, t=6): with 4 lost at unmask a survivor's self-mask has
    only 5 shares left."""
    updates = make_updates(10)
    result, _ = run(updates, SecAggConfig(), drop_at={n: R.STAGE_UNMASK for n in list(updates)[:4]})
    assert result.aborted and result.total is None
    assert "5 of the 6 shares" in result.reason


def test_sparse_graph_larger_cohort_with_dropout_after_sharing():
    config = SecAggConfig(num_neighbours=8, threshold=0.6)  # k=8, t=5 of 150
    updates = make_updates(150, d=16)
    drop = list(updates)[10:13]
    result, _ = run(updates, config, drop_at={n: R.STAGE_COLLECT for n in drop})
    assert_exact(result, updates, [n for n in updates if n not in drop], config)


def test_dropped_and_excluded_mixed_in_one_round():
    updates = make_updates(20)
    updates[FIRST_NODE + 5] = np.full(D, np.nan)
    result, _ = run(updates, SecAggConfig(), drop_at={FIRST_NODE: R.STAGE_SHARE_KEYS, FIRST_NODE + 1: R.STAGE_COLLECT})
    assert FIRST_NODE + 5 in result.excluded and "non-finite" in result.excluded[FIRST_NODE + 5]
    assert_exact(result, updates, [n for n in updates if n not in (FIRST_NODE, FIRST_NODE + 1, FIRST_NODE + 5)], SecAggConfig())


# --------------------------------------------------------------------------- what the server sees


def test_single_masked_vector_is_uniform_while_the_sum_is_exact():
    """A constant update (maximally non-uniform) is masked into values that pass a
    chi-square test of uniformity over Z_2^16; the sum still comes out exact."""
    config = SecAggConfig(ring_bits=16, frac_bits=8, clip_range=1.0, max_cohort=100)
    d = 20_000
    updates = {FIRST_NODE + i: np.full(d, 0.5) for i in range(5)}
    result, masked = _masked_inputs(updates, config)
    assert_exact(result, updates, list(updates), config)
    seen = {}
    bins = 64
    critical = 131.37  # chi-square, 63 degrees of freedom, p = 1e-6
    for node, y in masked.items():
        counts = np.bincount((y >> np.uint64(10)).astype(np.int64), minlength=bins)
        expected = d / bins
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < critical, (node, chi2)
        seen[node] = chi2
        plain = encode(updates[node], clip_range=1.0, frac_bits=8, ring_bits=16)
        plain_counts = np.bincount((plain >> np.uint64(10)).astype(np.int64), minlength=bins)
        assert float(np.sum((plain_counts - expected) ** 2 / expected)) > 1e5  # the test has power
    assert len(seen) == 5


def _masked_inputs(updates, config):
    """Run a round capturing the masked vectors as the server receives them."""
    captured = {}

    def capture(node, stage, content):
        if stage == R.STAGE_COLLECT:
            captured[node] = content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY].numpy().copy()
        return content

    result, _ = run(updates, config, tamper=capture)
    return result, captured


def test_transcript_contains_no_plaintext_update_and_only_allow_listed_records():
    config = SecAggConfig(metric_keys=("loss",))
    updates = make_updates(12, d=256, seed=7)
    result, grid = run(updates, config, record_transcript=True, metrics=True)
    assert not result.aborted
    from_device = [(node, stage, blob, names) for direction, node, stage, blob, names in grid.transcript if direction == "from-device"]
    everything = b"".join(blob for _, _, blob, _ in from_device)
    for node, x in updates.items():
        encoded = encode(x, clip_range=config.clip_range, frac_bits=config.frac_bits, ring_bits=config.ring_bits)
        for needle in (
            encoded[100:104].tobytes(), encoded[100:104].astype(">u8").tobytes(),
            x[100:102].tobytes(), x[100:102].astype(">f8").tobytes(), x[100:104].astype(np.float32).tobytes(),
        ):
            assert needle not in everything
    for node, stage, _, names in from_device:  # each stage's reply names are on the allow-list
        assert set(names) <= set(R.CLIENT_REPLY_RECORDS[stage]), (stage, names)
    assert b"secret" not in everything  # a metric not in metric_keys is never sent
    # the loss is summed inside the masked vector (fixed point: 100 / 2^20 per device)
    assert result.metrics == pytest.approx({"loss": float(np.mean([n % 7 for n in updates]))}, abs=1e-3)
    assert result.extras["loss"][1] == len(updates)
    assert not [names for d, _, _, _, names in grid.transcript if d == "from-device" and R.METRICS in names]


# --------------------------------------------------------------------------- faults


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


@pytest.mark.parametrize("how", ["tampered", "truncated", "swapped"])
def test_bad_encrypted_share_excludes_its_sender_and_the_reporter(how):
    updates = make_updates(12)
    culprit = FIRST_NODE + 3
    receivers: list[int] = []

    def tamper(node, stage, content):
        if node == culprit and stage == R.STAGE_SHARE_KEYS:
            rec = content.config_records[R.SHARES]
            cts = list(rec["ct"])
            if how == "tampered":
                cts[0] = _flip(cts[0], 30)
            elif how == "truncated":
                cts[0] = cts[0][:20]
            else:  # a valid ciphertext replayed to another receiver fails the AAD check
                cts[0], cts[1] = cts[1], cts[0]
            rec["ct"] = cts
            receivers.extend(FIRST_NODE + j - 1 for j in rec["dst"][: 2 if how == "swapped" else 1])
        return content

    result, _ = run(updates, SecAggConfig(), tamper=tamper)
    assert "reported as malformed or failing authentication" in result.excluded[culprit]
    for reporter in receivers:  # an accusation excludes both sides
        assert "it reported client" in result.excluded[reporter]
        assert (reporter, culprit) in result.accusations
    assert_exact(result, updates, [n for n in updates if n != culprit and n not in receivers], SecAggConfig())


@pytest.mark.parametrize("how", ["tampered", "truncated"])
def test_bad_unmask_share_is_not_used(how):
    updates = make_updates(12)
    culprit = FIRST_NODE + 4

    def tamper(node, stage, content):
        if node == culprit and stage == R.STAGE_UNMASK:
            rec = content.config_records[R.UNMASK_SHARES]
            shares = list(rec["b_share"])
            shares[0] = _flip(shares[0], 20) if how == "tampered" else shares[0][:-3]
            rec["b_share"] = shares
        return content

    result, _ = run(updates, SecAggConfig(), tamper=tamper)
    assert culprit in result.faults
    assert_exact(result, updates, list(updates), SecAggConfig())  # its own input still counts


@pytest.mark.parametrize("stage", R.STAGES)
def test_duplicate_replies_are_excluded_not_crashed_on(stage):
    updates = make_updates(12)
    culprit = FIRST_NODE + 2

    def tamper(node, st, content):
        return [content, content] if node == culprit and st == stage else content

    result, _ = run(updates, SecAggConfig(), tamper=tamper)
    if stage == R.STAGE_UNMASK:
        assert "duplicate" in result.faults[culprit]
        assert_exact(result, updates, list(updates), SecAggConfig())
    else:
        assert "duplicate" in result.excluded[culprit]
        assert_exact(result, updates, [n for n in updates if n != culprit], SecAggConfig())


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (lambda y: y[:-1], "wrong length"),
        (lambda y: y.astype(np.float64), "not a uint64 vector"),
        (lambda y: y | np.uint64(1 << 40), "outside the ring"),
        (lambda y: y.reshape(2, -1), "not a uint64 vector"),
    ],
)
def test_malformed_masked_input_is_excluded(corrupt, reason):
    config = SecAggConfig(ring_bits=32, frac_bits=12, clip_range=1.0, max_cohort=1000)
    updates = make_updates(12)
    culprit = FIRST_NODE + 7

    def tamper(node, stage, content):
        if node == culprit and stage == R.STAGE_COLLECT:
            y = content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY].numpy()
            content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY] = Array(corrupt(y))
        return content

    result, _ = run(updates, config, tamper=tamper)
    assert reason in result.excluded[culprit]
    assert_exact(result, updates, [n for n in updates if n != culprit], config)


def test_device_refuses_out_of_range_and_non_finite_before_masking():
    updates = make_updates(12)
    updates[FIRST_NODE + 1] = updates[FIRST_NODE + 1] * 0 + 1.5  # clip_range is 1.0
    updates[FIRST_NODE + 2][3] = np.inf
    updates[FIRST_NODE + 3] = updates[FIRST_NODE + 3][:-1]  # wrong length
    result, grid = run(updates, SecAggConfig(), record_transcript=True)
    assert "out-of-range" in result.excluded[FIRST_NODE + 1]
    assert "non-finite" in result.excluded[FIRST_NODE + 2]
    assert "bad-length" in result.excluded[FIRST_NODE + 3]
    refused = [names for d, node, stage, _, names in grid.transcript if d == "from-device" and node == FIRST_NODE + 1 and stage == R.STAGE_COLLECT]
    assert refused == [(R.REFUSED,)]  # nothing else (no masked vector) left the device
    assert_exact(result, updates, [n for n in updates if n not in (FIRST_NODE + 1, FIRST_NODE + 2, FIRST_NODE + 3)], SecAggConfig())


def test_clip_mode_clips_into_the_range_on_the_device():
    config = SecAggConfig(out_of_range="clip")
    updates = make_updates(10)
    updates[FIRST_NODE] = np.full(D, 7.0)
    result, _ = run(updates, config)
    clipped = dict(updates)
    clipped[FIRST_NODE] = np.full(D, config.clip_range)
    assert_exact(result, clipped, list(updates), config)


def test_inner_app_failure_is_a_refusal():
    updates = make_updates(10)
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg, context):
        if context.node_id == FIRST_NODE:
            raise RuntimeError("boom")
        return Message(RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(updates[context.node_id])})}), reply_to=msg)

    grid = InProcessGrid(app, updates)
    result = secure_sum(grid, list(updates), train_content(), SecAggConfig(), round=1)
    assert FIRST_NODE in result.excluded or FIRST_NODE in result.dropped
    assert_exact(result, updates, [n for n in updates if n != FIRST_NODE], SecAggConfig())


def test_a_second_round_on_the_same_nodes_uses_fresh_state():
    updates = make_updates(10)
    app = make_app(updates)
    grid = InProcessGrid(app, updates)
    for round_ in (1, 2):
        result = secure_sum(grid, list(updates), train_content(), SecAggConfig(), round=round_)
        assert_exact(result, updates, list(updates), SecAggConfig())
    for context in grid.contexts.values():  # no secret outlives a round in the node state
        state = context.state.config_records[R.CLIENT_STATE]
        assert len(state) == 0  # a one-off session: the device forgot it after its unmask


def test_plain_train_messages_pass_the_mod_untouched():
    app = make_app({FIRST_NODE: np.ones(3)})
    grid = InProcessGrid(app, [FIRST_NODE])
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=FIRST_NODE, message_type="train")
    (msg_id,) = grid.push_messages([msg])
    (reply,) = grid.pull_messages([msg_id])
    assert R.INNER_UPDATE in reply.content.array_records  # the inner app answered directly


def test_demo_apps_release_the_exact_sum_of_survivors(tmp_path):
    """The ServerApp/ClientApp pair for deployment trials, here in-process: one session."""
    import json

    from flwr.app import Context

    from restwise.privacy.secagg import demo_apps

    nodes = [FIRST_NODE + i for i in range(8)]
    grid = InProcessGrid(demo_apps.client_app, nodes, drop_at={nodes[2]: R.STAGE_COLLECT})
    out = tmp_path / "rounds.jsonl"
    run_config = {"secagg-rounds": 2, "secagg-vector-length": 50, "secagg-result-path": str(out), "secagg-timeout-s": 0.05}
    demo_apps._main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    config = _SecAggConfig()
    assert [line["mode"] for line in lines] == ["setup", "fast"]
    for line, stage in zip(lines, (R.STAGE_COLLECT, R.STAGE_JOIN)):  # round 2: asked to join, still away
        survivors = [n for n in nodes if n != nodes[2]]
        assert line["survivors"] == survivors and line["dropped"] == {str(nodes[2]): stage}
        ring = np.zeros(50, dtype=np.uint64)
        for n in survivors:
            ring += encode(demo_apps.demo_update(n, line["round"], 50), clip_range=1.0, frac_bits=config.frac_bits, ring_bits=64)
        assert line["total"] == decode_sum(ring, frac_bits=config.frac_bits, ring_bits=64).tolist()


def test_secure_fedavg_round_applies_the_mean_update_of_survivors():
    from restwise.privacy.secagg.fedavg import flatten_arrays, secure_fedavg_round, unflatten_like

    arrays = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32)), "b": Array(np.ones(2, dtype=np.float32))})
    steps = {FIRST_NODE + i: np.full(14, 0.01 * (i + 1)) for i in range(10)}
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg, context):
        received = msg.content.array_records["arrays"]
        trained = unflatten_like(flatten_arrays(received) + steps[context.node_id], received)
        update = flatten_arrays(trained) - flatten_arrays(received)
        return Message(RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(update)})}), reply_to=msg)

    grid = InProcessGrid(app, steps, drop_at={FIRST_NODE + 9: R.STAGE_COLLECT})
    session = SecAggSession(SecAggConfig())
    new, result = secure_fedavg_round(grid, session, list(steps), arrays, ConfigRecord({"lr": 0.1}), round=1)
    assert result.survivors == list(steps)[:9]
    expected = np.mean([0.01 * (i + 1) for i in range(9)])  # float32 steps as the device saw them
    np.testing.assert_allclose(new["w"].numpy(), np.full((3, 4), expected), atol=1e-6)
    np.testing.assert_allclose(new["b"].numpy(), np.full(2, 1 + expected), atol=1e-6)
    assert new["w"].numpy().dtype == np.float32


def test_undecodable_masked_input_is_excluded():
    updates = make_updates(8)
    culprit = FIRST_NODE + 1

    def tamper(node, stage, content):
        if node == culprit and stage == R.STAGE_COLLECT:
            good = content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY]
            content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY] = Array(
                dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"\x93NUMPY garbage"
            )
        return content

    result, _ = run(updates, SecAggConfig(), tamper=tamper)
    assert "cannot be decoded" in result.excluded[culprit]
    assert_exact(result, updates, [n for n in updates if n != culprit], SecAggConfig())


def test_round_aborts_before_asking_for_shares_when_a_neighbourhood_is_lost():
    """Sparse graph k=4, t=3 over 30 clients: a client and two of its four neighbours drop
    after sharing. The overall count is fine (27 >= 21) but that client's mask key is held
    by only 2 survivors: the server aborts before requesting any share."""
    config = SecAggConfig(num_neighbours=4, threshold=3)
    updates = make_updates(30)
    nodes = list(updates)
    victim = nodes[0]
    lost: set[int] = set()

    def tamper(node, stage, content):
        if stage == R.STAGE_SHARE_KEYS and node == victim:
            dst = content.config_records[R.SHARES]["dst"]
            lost.update({victim, nodes[dst[0] - 1], nodes[dst[1] - 1]})
        if stage == R.STAGE_COLLECT and node in lost:
            return None  # the reply never arrives
        return content

    result, grid = run(updates, config, tamper=tamper, record_transcript=True)
    assert result.aborted and result.total is None
    assert "before unmask" in result.reason and "held by 2 surviving neighbours" in result.reason
    assert not [entry for entry in grid.transcript if entry[2] == R.STAGE_UNMASK]
