"""Seconds per round: plain FedAvg vs Flower's SecAgg+ vs Restwise SecAgg+.

All three run under Flower's simulation runtime (`run_simulation`, Ray backend, 2 actors
with 1 CPU each), same model size (``--params`` float32 parameters), same local
"training" (a cheap NumPy step, so the protocols' cost is what differs), one warm-up
round (Ray start-up) then ``--rounds`` timed rounds. Each variant runs in its own process, and
each variant's function imports Flower's simulation engine (Ray) and its own protocol itself:
a worker process loads only what it measures, and the parent (which only spawns workers and
prints the table) loads none of it.

    plain     Message-API ``flwr.serverapp.strategy.FedAvg`` (``strategy.start``)
    floor2    the plain round plus one empty message per device (the same app, an empty
              reply): what any round of two messages per device costs in this runtime
              before any cryptography (informational: the floor under ``restwise``)
    flower    legacy ``LegacyContext`` + ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``
              + ``secaggplus_mod`` (num_shares k+1, same threshold as Restwise)
    restwise  one ``SecAggSession`` + ``secagg_mod`` (k=16, t=10, max 30% dropout): the warm-up
              round is the session's setup round (four messages per device, its time is
              in the note); the timed rounds are fast rounds (two messages per device)

    python benchmarks/secagg.py            # 20, 100 and 1,000 clients
    python benchmarks/secagg.py --quick    # 20 clients only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

from restwise.privacy.secagg.config import SecAggConfig

WORKER_CAP_S = {20: 600, 100: 900, 1000: 2400}
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


def local_step(weights: np.ndarray, node_id: int, round_: int) -> np.ndarray:
    """The same cheap local 'training' for every variant: a bounded random step."""
    rng = np.random.default_rng([node_id % 2**32, round_])
    return (0.01 * np.tanh(rng.standard_normal(weights.shape[0]))).astype(np.float32)


def wait_for_nodes(grid, n: int) -> list[int]:
    while len(nodes := sorted(grid.get_node_ids())) < n:
        time.sleep(0.1)
    return nodes


def run_plain(n: int, d: int, rounds: int) -> list[float]:
    # this worker's own imports (see the module docstring)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content.array_records["arrays"]["w"].numpy()
        step = local_step(w, context.node_id, int(msg.content.config_records["config"].get("server-round", 0)))
        content = RecordDict({"arrays": ArrayRecord({"w": Array(w + step)}), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    server = ServerApp()
    times: list[float] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        wait_for_nodes(grid, n)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        arrays = ArrayRecord({"w": Array(np.zeros(d, dtype=np.float32))})
        strategy.start(grid, arrays, num_rounds=1, train_config=ConfigRecord({}))  # warm-up
        start = time.perf_counter()
        strategy.start(grid, arrays, num_rounds=rounds, train_config=ConfigRecord({}))
        times.append((time.perf_counter() - start) / rounds)

    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=BACKEND)
    return times


def run_floor2(n: int, d: int, rounds: int) -> list[float]:
    # this worker's own imports (see the module docstring)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        if "arrays" not in msg.content.array_records:  # the second, empty message
            return Message(RecordDict({"ack": ConfigRecord({})}), reply_to=msg)
        w = msg.content.array_records["arrays"]["w"].numpy()
        step = local_step(w, context.node_id, int(msg.content.config_records["config"]["round"]))
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w + step)})}), reply_to=msg)

    server = ServerApp()
    times: list[float] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, n)
        w = np.zeros(d, dtype=np.float32)
        for r in range(rounds + 1):
            start = time.perf_counter()
            train = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "config": ConfigRecord({"round": r})}),
                             dst_node_id=node, message_type="train") for node in nodes]
            replies = list(grid.send_and_receive(train))
            w = np.mean([m.content.array_records["arrays"]["w"].numpy() for m in replies], axis=0).astype(np.float32)
            empty = [Message(RecordDict({"config": ConfigRecord({"round": r})}), dst_node_id=node, message_type="train")
                     for node in nodes]
            list(grid.send_and_receive(empty))
            if r > 0:
                times.append(time.perf_counter() - start)

    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=BACKEND)
    return times


def run_flower_secagg(n: int, d: int, rounds: int, k: int, t: int) -> list[float]:
    # this worker's own imports (see the module docstring)
    from flwr.app import Context
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    class StepClient(NumPyClient):
        def __init__(self, node_id: int):
            self.node_id = node_id

        def fit(self, parameters, config):
            w = parameters[0]
            return [w + local_step(w, self.node_id, int(config.get("server_round", 0)))], 1, {}

    def client_fn(context: Context):
        return StepClient(context.node_id).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    server = ServerApp()
    times: list[float] = []

    @server.main()
    def main(grid, context: Context) -> None:
        wait_for_nodes(grid, n)

        def one_run(num_rounds: int) -> None:
            strategy = FedAvg(
                fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                initial_parameters=ndarrays_to_parameters([np.zeros(d, dtype=np.float32)]),
            )
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
            DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=t))(grid, legacy)

        one_run(1)  # warm-up
        start = time.perf_counter()
        one_run(rounds)
        times.append((time.perf_counter() - start) / rounds)

    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=BACKEND)
    return times


def run_restwise(n: int, d: int, rounds: int) -> tuple[list[float], dict]:
    # this worker's own imports (see the module docstring)
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation
    from restwise.privacy.secagg import records as R
    from restwise.privacy.secagg.mod import secagg_mod
    from restwise.privacy.secagg.workflow import SecAggSession

    client = ClientApp()

    @client.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        w = msg.content.array_records["arrays"]["w"].numpy()
        step = local_step(w, context.node_id, int(msg.content.config_records["config"]["round"]))
        return Message(RecordDict({R.INNER_UPDATE: ArrayRecord({R.INNER_VECTOR: Array(step.astype(np.float64))})}), reply_to=msg)

    server = ServerApp()
    times: list[float] = []
    info: dict = {}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr.app import ConfigRecord  # this worker's own imports (see the module docstring)

        nodes = wait_for_nodes(grid, n)
        config = SecAggConfig(max_cohort=max(n, 3), timeout_s=600.0)
        session = SecAggSession(config)
        w = np.zeros(d, dtype=np.float32)
        for r in range(rounds + 1):
            content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "config": ConfigRecord({"round": r})})
            start = time.perf_counter()
            result = session.round(grid, nodes, content, round=r)
            if not result.aborted:
                w = w + (result.total / len(result.survivors)).astype(np.float32)
            if r == 0:  # the warm-up: the session's setup round
                info["setup_round_s"] = round(time.perf_counter() - start, 3)
            else:
                times.append(time.perf_counter() - start)
                info.setdefault("stages", []).append({k: round(v, 3) for k, v in result.stage_seconds.items()})
                info.setdefault("aborted", []).append(result.aborted)
                info.setdefault("modes", []).append(result.mode)

    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=BACKEND)
    return times, info


def worker(variant: str, n: int, d: int, rounds: int) -> None:
    logging.disable(logging.WARNING)
    info: dict = {}
    if variant == "plain":
        times = run_plain(n, d, rounds)
    elif variant == "floor2":
        times = run_floor2(n, d, rounds)
    elif variant == "flower":
        k, t, _ = SecAggConfig(max_cohort=max(n, 3)).round_parameters(n)
        times = run_flower_secagg(n, d, rounds, k, t)
    else:
        times, info = run_restwise(n, d, rounds)
    print("RESULT " + json.dumps({"variant": variant, "n": n, "seconds": times, **info}), flush=True)


def measure(variant: str, n: int, d: int, rounds: int, cap_s: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--clients", str(n), "--params", str(d), "--rounds", str(rounds)]
    env = {**os.environ, "RAY_DEDUP_LOGS": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    cap = cap_s or WORKER_CAP_S.get(n, 1800)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "n": n, "error": f"did not finish within {cap:.0f} s (warm-up + timed rounds)"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - start
            return result
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    return {"variant": variant, "n": n, "error": "failed: " + " | ".join(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 clients only")
    parser.add_argument("--clients", type=int, nargs="*", default=None)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=["plain", "flower", "restwise"])
    parser.add_argument("--cap-s", type=float, default=None, help="wall-clock cap per variant run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.clients[0], args.params, args.rounds)
        return
    cohorts = args.clients or ([20] if args.quick else [20, 100, 1000])
    print(f"model: {args.params} float32 parameters; {args.rounds} timed rounds after a warm-up; "
          f"Flower simulation (Ray, 2 actors x 1 CPU)")
    print(f"{'clients':>8} {'variant':>9} {'s/round':>9} {'x plain':>8}  note")
    for n in cohorts:
        rows = {v: measure(v, n, args.params, args.rounds, args.cap_s) for v in args.variants}
        plain = rows.get("plain", {}).get("seconds")
        base = float(np.median(plain)) if plain else None
        for v, row in rows.items():
            if "error" in row:
                print(f"{n:>8} {v:>9} {'-':>9} {'-':>8}  {row['error']}")
                continue
            sec = float(np.median(row["seconds"]))
            ratio = f"{sec / base:.2f}" if base else "-"
            note = ""
            if v == "restwise" and row.get("stages"):
                note = (f"{'/'.join(sorted(set(row.get('modes', []))))} rounds, stages " + json.dumps(row["stages"][-1])
                        + f"; setup round {row.get('setup_round_s')} s" + (" ABORTED" if any(row.get("aborted", [])) else ""))
            print(f"{n:>8} {v:>9} {sec:>9.3f} {ratio:>8}  {note}", flush=True)


if __name__ == "__main__":
    main()
