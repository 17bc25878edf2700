"""A ready-made ServerApp / ClientApp pair that runs Restwise secure aggregation alone (one
session: a setup round, then rounds of two messages per device), for deployment tests
(real SuperLink + SuperNodes) and demos. Import paths:

    restwise.privacy.secagg.demo_apps:server_app
    restwise.privacy.secagg.demo_apps:client_app

Each device contributes ``demo_update(node_id, round, length)`` (deterministic, in
[-0.5, 0.5]), so a test can recompute the exact expected sum from the survivors. Run
config keys (all optional):

    secagg-rounds          rounds to run (default 2)
    secagg-min-nodes       wait until this many nodes are connected (default 3)
    secagg-wait-s          how long to wait for them (default 120)
    secagg-vector-length   update length (default 1000)
    secagg-result-path     write one JSON line per round here (survivors, dropped,
                           excluded, aborted, reason, and the released total)
    secagg-slow-node-s     each device sleeps this long before training (default 0), to
                           leave time to kill a node mid-round
    plus every SecAggConfig key read by ``workflow.config_from_run_config``.

The released total is the aggregate the protocol is meant to release; nothing secret is
written.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import records as R
from .errors import SecAggConfigError
from .mod import secagg_mod
from .protocol import SecureSumResult
from .workflow import SecAggSession, config_from_run_config


def demo_update(node_id: int, round_: int, length: int) -> np.ndarray:
    rng = np.random.default_rng([int(node_id) % 2**63, int(round_)])
    return rng.uniform(-0.5, 0.5, length)


client_app = ClientApp()


@client_app.train(mods=[secagg_mod])
def _train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    delay = float(config.get("slow-node-s", 0.0))
    if delay > 0:
        time.sleep(delay)
    vector = demo_update(context.node_id, int(config["round"]), int(config["vector-length"]))
    return Message(RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(vector)})}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = config_from_run_config(run_config)
    rounds = int(run_config.get("secagg-rounds", 2))
    min_nodes = int(run_config.get("secagg-min-nodes", 3))
    length = int(run_config.get("secagg-vector-length", 1000))
    result_path = run_config.get("secagg-result-path")
    deadline = time.monotonic() + float(run_config.get("secagg-wait-s", 120.0))
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.2)
    session = SecAggSession(config)
    for round_ in range(1, rounds + 1):
        content = RecordDict(
            {
                "config": ConfigRecord(
                    {"round": round_, "vector-length": length,
                     "slow-node-s": float(run_config.get("secagg-slow-node-s", 0.0))}
                )
            }
        )
        nodes = sorted(grid.get_node_ids())
        try:
            result = session.round(grid, nodes, content, round=round_, vector_length=length, last=round_ == rounds)
        except SecAggConfigError as exc:  # e.g. fewer than 3 nodes connected
            result = SecureSumResult(None, [], {}, {}, True, str(exc))
        if result_path:
            line = {
                "round": round_, "sampled": nodes, "survivors": result.survivors,
                "dropped": {str(k): v for k, v in result.dropped.items()},
                "excluded": {str(k): v for k, v in result.excluded.items()},
                "aborted": result.aborted, "reason": result.reason, "mode": result.mode,
                "total": None if result.total is None else result.total.tolist(),
            }
            with open(str(result_path), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
