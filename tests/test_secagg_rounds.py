"""Secure aggregation over a run (``SecAggSession``): one setup round, then fast rounds of two
messages per device; dropouts at every stage across rounds, devices that drop out and come
back (they re-key), replayed and cross-round messages, malicious devices (a shifted masked
vector, false accusations), the hooks the orchestrator needs (announced records and the
participation decision, the write-ahead callback before any unmasking share, the final
message) and what crosses the wire. In-process: the real session, the real mod in a real
ClientApp, real Flower Message/RecordDict objects; only the transport is the harness."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from restwise.privacy.secagg import records as R
from restwise.privacy.secagg.config import SecAggConfig as _SecAggConfig
from restwise.privacy.secagg.encoding import encode, ring_mask
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.privacy.secagg.mod import make_secagg_mod
from restwise.privacy.secagg.protocol import PendingUnmask, RoundPlan
from restwise.privacy.secagg.workflow import RoundInput, SecAggSession

D = 48
FIRST = 2000


def SecAggConfig(**kwargs) -> _SecAggConfig:  # noqa: N802
    kwargs.setdefault("timeout_s", 0.05)  # the in-process grid answers at once
    return _SecAggConfig(**kwargs)


def update_of(node: int, round_: int, d: int = D) -> np.ndarray:
    return np.random.default_rng([node, round_]).uniform(-1, 1, d)


class Fleet:
    """n devices with the real mod; each device's update depends on (node, round)."""

    def __init__(self, n: int, *, d: int = D, take_part=None, on_finish=None, loss=False, **grid_kwargs):
        self.nodes = [FIRST + i for i in range(n)]
        self.d = d
        self.seen_first: list[tuple[int, str, dict]] = []  # (node, stage, announced records)
        self.finished: list[tuple[int, str]] = []

        def participation(msg: Message, context) -> bool:
            record = msg.content.config_records.get(R.SERVER_RECORD)
            announced = {k: dict(v) for k, v in msg.content.config_records.items() if k != R.SERVER_RECORD}
            self.seen_first.append((context.node_id, str(record["stage"]), announced))
            return take_part(context.node_id, int(record["round"])) if take_part else True

        def finish(msg: Message, context) -> None:
            self.finished.append((context.node_id, str(msg.content.config_records["receipt"]["entry"])))

        app = ClientApp()

        @app.train(mods=[make_secagg_mod(take_part=participation, on_finish=finish)])
        def train(msg: Message, context) -> Message:
            rnd = int(msg.content.config_records["config"]["round"])
            content = RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(update_of(context.node_id, rnd, d))})})
            if loss:
                content[R.INNER_METRICS] = MetricRecord({"train_loss": float(context.node_id % 5)})
            return Message(content, reply_to=msg)

        self.grid = InProcessGrid(app, self.nodes, **grid_kwargs)

    def content(self, round_: int) -> RecordDict:
        return RecordDict({"config": ConfigRecord({"round": round_})})


def exact(nodes, round_: int, config, d: int = D) -> np.ndarray:
    ring = np.zeros(d, dtype=np.uint64)
    for node in nodes:
        ring += encode(update_of(node, round_, d), clip_range=config.clip_range, frac_bits=config.frac_bits,
                       ring_bits=config.ring_bits)
    return ring & ring_mask(config.ring_bits)


def assert_exact(result, survivors, round_, config, d: int = D):
    assert not result.aborted, result.reason
    assert result.survivors == sorted(survivors)
    np.testing.assert_array_equal(result.total_ring, exact(survivors, round_, config, d))


def run_rounds(fleet: Fleet, session: SecAggSession, rounds, **kwargs):
    return [session.round(fleet.grid, fleet.nodes, fleet.content(r), round=r, vector_length=fleet.d, **kwargs)
            for r in rounds]


# --------------------------------------------------------------------------- the steady state


def test_one_setup_round_then_two_messages_per_device_per_round():
    config = SecAggConfig(num_neighbours=8, threshold=5)
    fleet = Fleet(14, record_transcript=True)
    session = SecAggSession(config)
    results = run_rounds(fleet, session, range(1, 6))
    for r, result in enumerate(results, start=1):
        assert_exact(result, fleet.nodes, r, config)
    assert results[0].mode == "setup" and set(results[0].messages.values()) == {4}
    for result in results[1:]:
        assert result.mode == "fast" and result.messages == {n: 2 for n in fleet.nodes}
        assert set(result.stage_seconds) >= {R.STAGE_COLLECT, R.STAGE_UNMASK} and R.STAGE_SETUP not in result.stage_seconds
    # What crossed: every reply of every stage is on the allow-list; no float, no clear metric.
    replies = [(stage, names) for d, _, stage, _, names in fleet.grid.transcript if d == "from-device"]
    assert len(replies) == 14 * (4 + 2 * 4)
    for stage, names in replies:
        assert set(names) <= set(R.CLIENT_REPLY_RECORDS[stage]), (stage, names)
    # Each device used a different mask key in every round (dealt one round ahead).
    for node in fleet.nodes:  # setup, then each collect reply announces the next round's key
        keys = _announced_mask_keys(fleet, node)
        assert len(keys) == len(set(keys)) == 6


def test_the_last_round_deals_nothing_and_devices_forget_the_session():
    config = SecAggConfig()
    fleet = Fleet(6)
    session = SecAggSession(config)
    run_rounds(fleet, session, [1])
    (last,) = run_rounds(fleet, session, [2], last=True)
    assert_exact(last, fleet.nodes, 2, config)
    for context in fleet.grid.contexts.values():  # no secret outlives the session
        assert len(context.state.config_records[R.CLIENT_STATE]) == 0


# --------------------------------------------------------------------------- dropouts across rounds


@pytest.mark.parametrize(
    "schedule",
    [
        # (round, stage, node offsets going offline for that message only)
        [(1, R.STAGE_SETUP, [0]), (1, R.STAGE_SHARE_KEYS, [1]), (1, R.STAGE_COLLECT, [2]), (1, R.STAGE_UNMASK, [3])],
        [(2, R.STAGE_COLLECT, [4, 5]), (3, R.STAGE_UNMASK, [6]), (4, R.STAGE_COLLECT, [7]), (4, R.STAGE_UNMASK, [8])],
        [(2, R.STAGE_COLLECT, [0]), (2, R.STAGE_UNMASK, [1]), (3, R.STAGE_JOIN, [0]), (3, R.STAGE_COLLECT, [2])],
    ],
    ids=["every-stage-of-the-setup-round", "fast-rounds", "a-returning-device-misses-its-join"],
)
def test_dropouts_at_every_stage_across_rounds_give_exact_sums(schedule):
    config = SecAggConfig(num_neighbours=12, threshold=0.6, max_dropout_fraction=0.3)  # k=12, t=8 of 20
    offline = {(r, stage, FIRST + i) for r, stage, offsets in schedule for i in offsets}
    fleet = Fleet(20, offline=lambda node, r, stage: (r, stage, node) in offline)
    session = SecAggSession(config)
    # A device lost at setup is outside the epoch from then on; one lost at share-keys,
    # collect or join dealt nothing for the next round: it misses that round too (it joins).
    absent: set[tuple[int, int]] = set()
    for r, stage, node in offline:
        if stage == R.STAGE_SETUP:
            absent |= {(node, rr) for rr in range(1, 6)}
        elif stage in (R.STAGE_SHARE_KEYS, R.STAGE_COLLECT, R.STAGE_JOIN):
            absent |= {(node, r), (node, r + 1)}
    for r in range(1, 6):
        result = session.round(fleet.grid, fleet.nodes, fleet.content(r), round=r, vector_length=D)
        assert_exact(result, [n for n in fleet.nodes if (n, r) not in absent], r, config)
        for (rr, stage, n) in offline:  # a device lost at unmask had sent its input: it stays in the sum
            if rr == r and stage == R.STAGE_UNMASK:
                assert result.dropped[n] == R.STAGE_UNMASK and n in result.survivors
        if r > 1:
            assert result.mode == "fast" and max(result.messages.values()) <= 2


def test_a_dropped_then_returning_device_rekeys_and_is_back_in_the_sum():
    config = SecAggConfig()
    victim = FIRST + 3
    fleet = Fleet(8, offline=lambda node, r, stage: node == victim and r == 2, record_transcript=True)
    session = SecAggSession(config)
    results = run_rounds(fleet, session, range(1, 6))
    r1, r2, r3, r4, r5 = results
    assert_exact(r1, fleet.nodes, 1, config)
    assert_exact(r2, [n for n in fleet.nodes if n != victim], 2, config)
    assert r2.dropped == {victim: R.STAGE_COLLECT}
    # Round 3: the victim's round-2 key was reconstructed and it dealt nothing for round 3:
    # it is asked to join (one message: a fresh key and shares for round 4), not to mask.
    assert r3.mode == "fast" and r3.joined == [victim] and r3.messages[victim] == 1
    assert_exact(r3, [n for n in fleet.nodes if n != victim], 3, config)
    assert_exact(r4, fleet.nodes, 4, config)
    assert_exact(r5, fleet.nodes, 5, config)
    # Every mask key the victim ever announced is new (never reused after the reveal).
    announced = [names for d, node, stage, _, names in fleet.grid.transcript
                 if d == "from-device" and node == victim and R.PUBLIC_KEYS in names]
    # setup (round 1's key), collect 1 (for 2), join in 3 (for 4), collect 4 (for 5), collect 5 (for 6)
    assert len(announced) == 5
    keys = _announced_mask_keys(fleet, victim)
    assert len(keys) == len(set(keys)) == 5


def _announced_mask_keys(fleet: Fleet, node: int) -> list[bytes]:
    out = []
    for message, reply in fleet.grid.delivered:
        if message.metadata.dst_node_id == node and reply is not None and R.PUBLIC_KEYS in reply.config_records:
            out.append(bytes(reply.config_records[R.PUBLIC_KEYS]["s_pk"]))
    return out


def test_both_ends_of_a_mask_gone_reconstructs_only_a_one_round_key():
    """A device lost before its masked input and its neighbour lost at unmask (the classic
    cross-round pitfall): the mask between them is removed with the first one's key of this
    round only; no device ever has its self-mask seed and its mask key of one round both
    reconstructed, and no key is used in two rounds."""
    config = SecAggConfig()
    a, b = FIRST + 1, FIRST + 2
    offline = {(3, R.STAGE_COLLECT, a), (3, R.STAGE_UNMASK, b)}
    fleet = Fleet(9, offline=lambda node, r, stage: (r, stage, node) in offline, record_transcript=True)
    session = SecAggSession(config)
    revealed: list[tuple[int, str, int]] = []  # (round, "b" or "sk", node)
    original = session.server.start_round

    def spying(*args, **kwargs):
        rnd = original(*args, **kwargs)
        inner = rnd.receive_unmask

        def receive(replies):
            inner(replies)
            revealed.extend((rnd.round, "b", rnd.node(i)) for i in rnd.b_seed)
            revealed.extend((rnd.round, "sk", rnd.node(i)) for i in rnd.sk)

        rnd.receive_unmask = receive
        return rnd

    session.server.start_round = spying
    results = run_rounds(fleet, session, range(1, 7))
    for r, result in enumerate(results, start=1):
        expected = [n for n in fleet.nodes if not (r == 3 and n == a) and not (r == 4 and n == a)]
        assert_exact(result, expected, r, config)
    assert (3, "sk", a) in revealed and (3, "b", b) in revealed
    by_round: dict[int, dict[int, set[str]]] = {}
    for r, kind, node in revealed:
        by_round.setdefault(r, {}).setdefault(node, set()).add(kind)
    assert all(kinds != {"b", "sk"} for nodes in by_round.values() for kinds in nodes.values())
    assert results[3].joined == [a]  # it re-keys before it takes part again
    keys = _announced_mask_keys(fleet, a)
    assert len(keys) == len(set(keys))


# --------------------------------------------------------------------------- replays and order


def test_replayed_out_of_order_and_cross_round_messages_are_refused():
    config = SecAggConfig()
    fleet = Fleet(6, record_transcript=True)
    session = SecAggSession(config)
    run_rounds(fleet, session, [1, 2])
    node = FIRST + 1
    app, context = fleet.grid.app, fleet.grid.contexts[node]
    sent = {(str(m.content.config_records[R.SERVER_RECORD]["stage"]), int(m.content.config_records[R.SERVER_RECORD]["round"])): m
            for m, _ in fleet.grid.delivered if m.metadata.dst_node_id == node}
    before = {k: v for k, v in context.state.config_records[R.CLIENT_STATE].items()}

    def refused(message) -> str:
        reply = app(_copy(message), context).content
        assert R.REFUSED in reply.config_records, list(reply.keys())
        return str(reply.config_records[R.REFUSED]["code"])

    assert refused(sent[(R.STAGE_COLLECT, 2)]) == "protocol-violation"  # replayed
    assert refused(sent[(R.STAGE_COLLECT, 1)]) == "protocol-violation"  # an earlier round
    assert refused(sent[(R.STAGE_UNMASK, 2)]) == "protocol-violation"  # answered already
    assert refused(sent[(R.STAGE_UNMASK, 1)]) == "protocol-violation"  # another round
    assert refused(sent[(R.STAGE_SHARE_KEYS, 1)]) == "protocol-violation"  # out of order
    other = _with_server_fields(sent[(R.STAGE_COLLECT, 2)], session="cd" * 16, round=3)
    assert refused(other) == "protocol-violation"  # another session
    ahead = _with_server_fields(sent[(R.STAGE_COLLECT, 2)], round=4)
    assert refused(ahead) == "protocol-violation"  # a round it dealt nothing for
    after = {k: v for k, v in context.state.config_records[R.CLIENT_STATE].items()}
    assert after == before  # refused messages change nothing...
    (r3,) = run_rounds(fleet, session, [3])
    assert_exact(r3, fleet.nodes, 3, config)  # ...and the run goes on


def _copy(message: Message) -> Message:
    return Message(RecordDict(dict(message.content.items())), dst_node_id=message.metadata.dst_node_id,
                   message_type=R.MESSAGE_TYPE)


def _with_server_fields(message: Message, **changes) -> Message:
    content = RecordDict(dict(message.content.items()))
    record = ConfigRecord(dict(message.content.config_records[R.SERVER_RECORD]))
    record.update(changes)
    content[R.SERVER_RECORD] = record
    return Message(content, dst_node_id=message.metadata.dst_node_id, message_type=R.MESSAGE_TYPE)


def test_shares_forwarded_into_another_round_fail_authentication():
    """A server that forwards a device's round-2 ciphertexts again in round 3 gets them
    reported (the associated data names the round): both sides are excluded, and the
    sum is exact over the rest."""
    config = SecAggConfig(num_neighbours=9, max_dropout_fraction=0.3)
    fleet = Fleet(10, record_transcript=True)
    session = SecAggSession(config)
    run_rounds(fleet, session, [1, 2])
    s = session.server
    victim = FIRST + 4
    victim_i = s.index_of[victim]
    old_round_cts = {}  # what the victim dealt for round 2, as the server forwarded it in round 2
    for message, _ in fleet.grid.delivered:
        record = message.content.config_records[R.SERVER_RECORD]
        if record["stage"] == R.STAGE_COLLECT and record["round"] == 2 and victim_i in record["src"]:
            old_round_cts[s.index_of[message.metadata.dst_node_id]] = record["ct"][list(record["src"]).index(victim_i)]
    stale = s.material[victim_i]  # dealt in round 2 for round 3: replace it with round 2's
    assert stale.round == 3 and set(old_round_cts) == set(stale.cts)
    replayed_to = sorted(stale.cts)[:2]
    for receiver in replayed_to:
        stale.cts[receiver] = (old_round_cts[receiver], stale.cts[receiver][1])
    (r3,) = run_rounds(fleet, session, [3])
    assert sorted(r3.accusations) == [(s.node_of[j], victim) for j in replayed_to]
    assert set(r3.excluded) == {victim, *(s.node_of[j] for j in replayed_to)}
    assert_exact(r3, [n for n in fleet.nodes if n not in r3.excluded], 3, config)


# --------------------------------------------------------------------------- malicious devices


def _shift_masked(node: int, delta_ring: int, coordinate: int | None = None):
    def tamper(n, stage, content):
        if n == node and stage == R.STAGE_COLLECT and R.MASKED_INPUT in content.array_records:
            y = content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY].numpy().copy()
            if coordinate is None:
                y += np.uint64(delta_ring % 2**64)
            else:
                y[coordinate] += np.uint64(delta_ring % 2**64)
            content.array_records[R.MASKED_INPUT][R.MASKED_ARRAY] = Array(y)
        return content
    return tamper


def test_a_device_adding_2_to_the_40_to_its_masked_vector_fails_the_round_closed():
    config = SecAggConfig()
    attacker = FIRST + 2
    rounds_tampered = {2}
    fleet = Fleet(8)
    fleet.grid.tamper = lambda n, stage, content: (
        _shift_masked(attacker, 2**40)(n, stage, content) if fleet.grid.current_round in rounds_tampered else content)
    session = SecAggSession(config)
    r1, r2, r3 = run_rounds(fleet, session, [1, 2, 3])
    assert_exact(r1, fleet.nodes, 1, config)
    assert r2.aborted and r2.failure == "sum-out-of-bounds" and r2.total is None and r2.survivors == []
    assert r2.out_of_bounds["coordinates"] == D
    assert r2.out_of_bounds["bound"] == 8 * config.clip_range
    assert r2.out_of_bounds["max_abs"] >= 2**40 / 2**config.frac_bits - 8  # shifted by 2^20 = 1,048,576
    assert "survivors x clip range" in r2.reason and "nothing was released" in r2.reason
    assert_exact(r3, fleet.nodes, 3, config)  # the session goes on


def test_what_the_sum_bound_does_not_catch_is_measured():
    """The bound refuses any sum outside [-m C, m C] (m survivors). A device that adds less
    passes: its effect on a coordinate is bounded by m C minus the honest sum there, i.e.
    up to about 2 m C, not C. This test measures it (docs/secure-aggregation.md reports
    the number): only a range proof of each input would bound it by C."""
    config = SecAggConfig()
    attacker, m = FIRST + 2, 8
    fleet = Fleet(m)
    honest = exact(fleet.nodes, 1, config)  # the unshifted ring sum of round 1
    from restwise.privacy.secagg.encoding import decode_sum

    honest_value = float(decode_sum(honest[:1], frac_bits=config.frac_bits, ring_bits=config.ring_bits)[0])
    room = m * config.clip_range - honest_value - 1e-3  # as far as the bound lets it go
    fleet.grid.tamper = _shift_masked(attacker, int(room * 2**config.frac_bits), coordinate=0)
    session = SecAggSession(config)
    (r1,) = run_rounds(fleet, session, [1])
    assert not r1.aborted
    effect = r1.total[0] - honest_value
    assert effect == pytest.approx(room, abs=1e-5)
    assert config.clip_range < effect <= 2 * m * config.clip_range  # more than C: not bounded by C


@pytest.mark.parametrize("accused_count", [1, 3, 4])
def test_a_false_accuser_excludes_itself_with_its_victims_and_is_banned_after_two_rounds(accused_count):
    config = SecAggConfig(num_neighbours=16, threshold=10, max_dropout_fraction=0.3)  # 20 devices, k=16, t=10
    liar = FIRST + 5
    accusing_rounds = {2, 3}
    victims: dict[int, list[int]] = {}

    def tamper(node, stage, content):
        if node == liar and stage == R.STAGE_COLLECT and fleet.grid.current_round in accusing_rounds \
                and R.MASKED_STATUS in content.config_records:
            record = fleet.grid.current_message.content.config_records[R.SERVER_RECORD]
            src = list(record["src"])[:accused_count]  # honest neighbours whose shares were fine
            victims[fleet.grid.current_round] = [session.server.node_of[i] for i in src]
            content.config_records[R.MASKED_STATUS]["bad_share_senders"] = src
        return content

    fleet = Fleet(20, tamper=tamper)
    session = SecAggSession(config)
    results = run_rounds(fleet, session, range(1, 6))
    r1, r2, r3, r4, r5 = results
    assert_exact(r1, fleet.nodes, 1, config)
    for result, r in ((r2, 2), (r3, 3)):
        out = {liar, *victims[r]}
        assert set(result.excluded) == out
        assert sorted(result.accusations) == sorted((liar, v) for v in victims[r])
        assert_exact(result, [n for n in fleet.nodes if n not in out], r, config)
    assert r2.banned == []
    # After its second round of accusations the liar is out for the rest of the run, and so is
    # any device it accused in both rounds (the rule does not know who lied).
    twice = set(victims[2]) & set(victims[3])
    assert set(r3.banned) == {liar, *twice}
    for result, r in ((r4, 4), (r5, 5)):
        assert set(result.excluded) == {liar, *twice}
        assert all("banned" in reason for reason in result.excluded.values())
        assert_exact(result, [n for n in fleet.nodes if n not in {liar, *twice}], r, config)


def test_non_finite_and_out_of_range_inputs_are_refused_on_the_device_every_round():
    config = SecAggConfig()
    bad = {FIRST + 1: np.nan, FIRST + 2: np.inf, FIRST + 3: 1.5}  # clip range 1.0
    fleet = Fleet(12)
    app = ClientApp()

    @app.train(mods=[make_secagg_mod()])
    def train(msg, context):
        rnd = int(msg.content.config_records["config"]["round"])
        vector = update_of(context.node_id, rnd)
        if context.node_id in bad and rnd == 2:
            vector[5] = bad[context.node_id]
        return Message(RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(vector)})}), reply_to=msg)

    fleet.grid.app = app
    session = SecAggSession(config)
    r1, r2, r3, r4 = run_rounds(fleet, session, [1, 2, 3, 4])
    assert {n: reason.split("(")[-1] for n, reason in r2.excluded.items()} == {
        FIRST + 1: "non-finite)", FIRST + 2: "non-finite)", FIRST + 3: "out-of-range)"}
    assert_exact(r2, [n for n in fleet.nodes if n not in bad], 2, config)
    assert sorted(r3.joined) == sorted(bad)  # they dropped their round material: they re-key
    assert_exact(r4, fleet.nodes, 4, config)


# --------------------------------------------------------------------------- the hooks


def test_announced_records_reach_the_first_message_of_every_round_and_a_refusal_is_non_participation():
    config = SecAggConfig()
    refuser = FIRST + 4
    fleet = Fleet(8, take_part=lambda node, r: not (node == refuser and r in (2, 3)), record_transcript=True)
    session = SecAggSession(config)
    for r in range(1, 5):
        receipt = RecordDict({"receipt": ConfigRecord({"entry": f"signed-entry-{r - 1}"})})
        result = session.round(fleet.grid, fleet.nodes, fleet.content(r), round=r, vector_length=D, announce=receipt)
        expected = [n for n in fleet.nodes if not (n == refuser and r in (2, 3, 4))]
        assert_exact(result, expected, r, config)
        if r == 2:
            assert result.declined == [refuser] and refuser not in result.excluded and refuser not in result.dropped
    acks = session.finish(fleet.grid, fleet.nodes, announce=RecordDict({"receipt": ConfigRecord({"entry": "signed-entry-4"})}), round=4)
    assert all(acks.values())
    # Every device saw the receipt in the first message of each of its rounds: setup in round
    # 1, collect (or join) after; the refuser's "no" arrived at collect in round 2 and at
    # join in round 3; it re-keyed at join in round 4 (not in that round's sum) and is back.
    by_node: dict[int, list[tuple[str, str]]] = {}
    for node, stage, announced in fleet.seen_first:
        by_node.setdefault(node, []).append((stage, announced["receipt"]["entry"]))
    honest = FIRST
    assert by_node[honest] == [(R.STAGE_SETUP, "signed-entry-0")] + [(R.STAGE_COLLECT, f"signed-entry-{r - 1}") for r in (2, 3, 4)]
    assert by_node[refuser] == [(R.STAGE_SETUP, "signed-entry-0"), (R.STAGE_COLLECT, "signed-entry-1"),
                                (R.STAGE_JOIN, "signed-entry-2"), (R.STAGE_JOIN, "signed-entry-3")]
    assert sorted(fleet.finished) == sorted((n, "signed-entry-4") for n in fleet.nodes)
    # "Not taking part" is one record with no content, whatever the reason.
    declines = [(stage, names) for d, node, stage, blob, names in fleet.grid.transcript if d == "from-device" and node == refuser
                and R.DECLINED in names]
    assert declines == [(R.STAGE_COLLECT, (R.DECLINED,)), (R.STAGE_JOIN, (R.DECLINED,))]
    for context in fleet.grid.contexts.values():
        assert len(context.state.config_records[R.CLIENT_STATE]) == 0  # finish: the session is forgotten


def test_before_unmask_runs_after_every_masked_input_and_before_any_unmasking_share():
    config = SecAggConfig()
    lost = FIRST + 6
    fleet = Fleet(9, offline=lambda node, r, stage: node == lost and r == 2 and stage == R.STAGE_UNMASK,
                  record_transcript=True)
    session = SecAggSession(config)
    calls: list[tuple[PendingUnmask, list[str]]] = []

    def write_ahead(pending: PendingUnmask) -> None:
        stages = [stage for d, _, stage, _, _ in fleet.grid.transcript if d == "to-device"]
        calls.append((pending, stages))

    r1, r2 = run_rounds(fleet, session, [1, 2], before_unmask=write_ahead)
    (_, stages1), (p2, stages2) = calls
    assert stages1.count(R.STAGE_COLLECT) == 9 and R.STAGE_UNMASK not in stages1
    assert stages2.count(R.STAGE_UNMASK) == 9  # round 1's only: none of round 2's yet
    assert p2.round == 2 and p2.survivors == r2.survivors == fleet.nodes  # final: the lost one stays in
    assert (p2.participants, p2.min_survivors) == (9, 7)

    class LedgerDown(Exception):
        pass

    def failing(pending):
        raise LedgerDown("the ledger could not be written")

    sent_before = len(fleet.grid.transcript)
    with pytest.raises(LedgerDown):
        session.round(fleet.grid, fleet.nodes, fleet.content(3), round=3, vector_length=D, before_unmask=failing)
    assert not [e for e in fleet.grid.transcript[sent_before:] if e[0] == "to-device" and e[2] == R.STAGE_UNMASK]
    (r4,) = run_rounds(fleet, session, [4])
    assert_exact(r4, fleet.nodes, 4, config)  # devices dealt round 4's shares with round 3's input


def test_content_is_built_for_the_round_participants_and_its_clip_range():
    config = SecAggConfig(max_cohort=100)
    fleet = Fleet(8, offline=lambda node, r, stage: node == FIRST and r == 1 and stage == R.STAGE_SETUP)
    session = SecAggSession(config)
    plans: list[RoundPlan] = []

    def content_for(plan: RoundPlan) -> RoundInput:
        plans.append(plan)
        return RoundInput(fleet.content(plan.round), clip_range=2.0)

    for r in (1, 2):
        result = session.round(fleet.grid, fleet.nodes, content_for, round=r, vector_length=D)
        assert not result.aborted
    # Round 1: one device did not answer the setup: 7 participants. Round 2: the 8th joins.
    assert [(p.round, p.participants, p.min_survivors, p.mode) for p in plans] == [(1, 7, 5, "setup"), (2, 7, 5, "fast")]


def test_extras_are_summed_inside_the_masked_vector_and_never_sent_in_the_clear():
    config = SecAggConfig(metric_keys=("train_loss",), metric_range=(0.0, 10.0))
    fleet = Fleet(7, loss=True, record_transcript=True)
    session = SecAggSession(config)
    r1, r2 = run_rounds(fleet, session, [1, 2])
    for result, r in ((r1, 1), (r2, 2)):
        assert_exact(result, fleet.nodes, r, config)
        total, count = result.extras["train_loss"]
        assert count == 7 and total == pytest.approx(sum(n % 5 for n in fleet.nodes), abs=1e-3)
        assert result.metrics["train_loss"] == pytest.approx(np.mean([n % 5 for n in fleet.nodes]), abs=1e-3)
    for d, _, stage, blob, names in fleet.grid.transcript:
        if d == "from-device":
            assert R.METRICS not in names
            if stage == R.STAGE_COLLECT:
                assert names and set(names) <= set(R.CLIENT_REPLY_RECORDS[R.STAGE_COLLECT])


def test_the_unmask_stage_ends_once_the_shares_suffice_and_waits_for_all_after_a_wrong_one():
    """The server stops waiting once every needed secret has t shares (the slowest device is
    not waited for); if a share among those turns out wrong, it waits for the rest."""
    config = SecAggConfig()  # 6 devices: complete graph, k = 5, t = 3
    liar, slow = FIRST + 1, [FIRST + 4, FIRST + 5]

    def tamper(node, stage, content):
        if node == liar and stage == R.STAGE_UNMASK and fleet.grid.current_round == 2:
            rec = content.config_records[R.UNMASK_SHARES]
            rec["b_share"] = [bytes(48 - 1) + b"\x01" for _ in rec["b_share"]]  # valid form, wrong values
        return content

    class SlowGrid(InProcessGrid):
        held: list = []

        def pull_messages(self, message_ids):
            got = list(super().pull_messages(message_ids))
            keep = [m for m in got if m.metadata.src_node_id in slow and self.current_round == 2
                    and R.UNMASK_SHARES in m.content and not SlowGrid.held_once]
            SlowGrid.held.extend(keep)
            if keep:
                SlowGrid.held_once = True
                return [m for m in got if m not in keep]
            out, SlowGrid.held = list(SlowGrid.held), []
            return got + out

    SlowGrid.held_once = False
    fleet = Fleet(6, tamper=tamper)
    fleet.grid.__class__ = SlowGrid
    session = SecAggSession(config)
    r1, r2 = run_rounds(fleet, session, [1, 2])
    assert_exact(r1, fleet.nodes, 1, config)
    assert_exact(r2, fleet.nodes, 2, config)  # the wrong shares were found once all were in
    assert liar in r2.faults


def test_a_device_that_missed_the_epochs_setup_waits_for_the_next_epoch():
    config = SecAggConfig()
    late = FIRST + 2
    fleet = Fleet(7, offline=lambda node, r, stage: node == late and r == 1)
    session = SecAggSession(config)
    r1, r2 = run_rounds(fleet, session, [1, 2])
    assert r1.dropped == {late: R.STAGE_SETUP} and r2.mode == "fast"
    assert "not in the current epoch" in r2.excluded[late]
    assert_exact(r2, [n for n in fleet.nodes if n != late], 2, config)
    session.restart_epoch()
    r3, r4 = run_rounds(fleet, session, [3, 4])
    assert (r3.mode, r4.mode) == ("setup", "fast")
    assert_exact(r3, fleet.nodes, 3, config)
    assert_exact(r4, fleet.nodes, 4, config)


def test_on_stage_reports_counts_per_stage_and_the_write_ahead_commitment_binds_the_masked_sum():
    """Progress: every stage of a setup round and of a fast round is reported when it starts
    and when it ends, with counts only (a lost device shows as dropped). The commitment the
    write-ahead entry names is fixed by the masked inputs before any share is asked for."""
    config = SecAggConfig()
    lost = FIRST + 2
    fleet = Fleet(6, offline=lambda node, r, stage: node == lost and r == 2 and stage == R.STAGE_COLLECT)
    session = SecAggSession(config)
    seen: list[tuple] = []
    commitments: list[str] = []
    for r in (1, 2):
        result = session.round(fleet.grid, fleet.nodes, fleet.content(r), round=r, vector_length=D,
                               on_stage=lambda *a, r=r: seen.append((r, *a)),
                               before_unmask=lambda p: commitments.append(p.commitment))
        assert not result.aborted
    starts = [(r, stage, expected) for r, stage, expected, received, _ in seen if received == 0]
    assert starts == [(1, R.STAGE_SETUP, 6), (1, R.STAGE_SHARE_KEYS, 6), (1, R.STAGE_COLLECT, 6), (1, R.STAGE_UNMASK, 6),
                      (2, R.STAGE_COLLECT, 6), (2, R.STAGE_UNMASK, 5)]
    ends = {(r, stage): (received, dropped) for r, stage, _, received, dropped in seen if received}
    assert ends[(1, R.STAGE_SETUP)] == (6, 0) and ends[(2, R.STAGE_COLLECT)] == (5, 1)
    assert all(isinstance(x, int) or x is None for row in seen for x in row[2:])
    assert len(commitments) == 2 and len(set(commitments)) == 2
    assert all(len(c) == 64 and int(c, 16) >= 0 for c in commitments)
