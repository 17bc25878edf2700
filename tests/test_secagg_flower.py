"""Restwise secure aggregation under Flower's own simulation runtime (`run_simulation`:
SuperLink state, InMemoryGrid, Ray-backed SuperNodes): a ServerApp whose main runs three
rounds of one ``SecAggSession`` (a setup round, then fast rounds: the device state lives in
Flower's node contexts between messages and rounds) and a ClientApp with ``secagg_mod``;
one node's app fails in every round, the rounds still complete."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from restwise.privacy.secagg import records as R
from restwise.privacy.secagg.config import SecAggConfig
from restwise.privacy.secagg.encoding import decode_sum, encode, ring_mask
from restwise.privacy.secagg.mod import secagg_mod
from restwise.privacy.secagg.workflow import SecAggSession

D = 32
NUM_NODES = 6


def update_of(node_id: int) -> np.ndarray:
    return np.random.default_rng(node_id % 2**32).uniform(-1, 1, D)


@pytest.mark.slow
def test_secure_sum_in_flower_simulation():
    from flwr.simulation import run_simulation

    config = SecAggConfig(timeout_s=60.0)
    outcome: dict = {}

    client_app = ClientApp()

    @client_app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        if msg.content.config_records["config"]["fail-node"] == str(context.node_id):
            raise RuntimeError("this device fails")
        vector = update_of(context.node_id)
        return Message(RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(vector)})}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        while len(nodes := sorted(grid.get_node_ids())) < NUM_NODES and time.monotonic() < deadline:
            time.sleep(0.1)  # SuperNodes register after the ServerApp starts
        content = RecordDict(
            {"model": ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32))}),
             "config": ConfigRecord({"fail-node": str(nodes[0])})}
        )
        outcome["nodes"] = nodes
        outcome["failing"] = [nodes[0]]
        session = SecAggSession(config)
        outcome["rounds"] = [session.round(grid, nodes, content, round=r) for r in (1, 2, 3)]

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    assert len(outcome["nodes"]) == NUM_NODES
    assert [r.mode for r in outcome["rounds"]] == ["setup", "fast", "fast"]
    failing = outcome["failing"][0]
    # the failing node re-keys (join) each round after a failure: one message, no input
    assert outcome["rounds"][1].joined == [failing] and outcome["rounds"][1].messages[failing] == 1
    for result in outcome["rounds"]:
        assert not result.aborted, result.reason
        expected = [n for n in outcome["nodes"] if n not in outcome["failing"]]
        assert result.survivors == expected
        if result.mode == "setup":
            assert set(result.excluded) == {failing} and "train-failed" in result.excluded[failing]
        else:
            assert failing not in result.survivors and max(result.messages.values()) <= 2
        ring = np.zeros(D, dtype=np.uint64)
        for node in expected:
            ring += encode(update_of(node), clip_range=1.0, frac_bits=config.frac_bits, ring_bits=config.ring_bits)
        ring &= ring_mask(config.ring_bits)
        np.testing.assert_array_equal(result.total_ring, ring)
        np.testing.assert_array_equal(result.total, decode_sum(ring, frac_bits=config.frac_bits, ring_bits=config.ring_bits))
