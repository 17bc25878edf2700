"""The Flower apps ``benchmarks/deployment.py`` runs on its SuperLink and SuperNodes. The file
is shipped into the throw-away Flower app directory (and so into the FAB); Flower loads the
components from there:

    plain_server, plain_client   Flower's plain FedAvg (``flwr.serverapp.strategy.FedAvg``, one
                                 train message per device per round, no evaluation stage); the
                                 client trains the same Restwise model on the same encrypted
                                 store as the restwise variant, and replies its new arrays.
                                 No consent check, no clipping, no noise, no masking, no log.
    restwise_server              benchmark-only (the ``driver`` variant; the ``restwise``
                                 variant runs the real ServerApp): the run's rounds through one
                                 ``SecAggSession`` (a setup round, then two messages per
                                 device and round), with the train content and DP parameters
                                 the release workflow computes (distributed noise), to the
                                 real Restwise ClientApp (``restwise.client.app:app``: egress
                                 guard, secure-aggregation mod, DP mod). It applies each
                                 release to the model like the server does, but writes no
                                 ledger: the integrated ServerApp is phase 2's.

Run config (all set by the benchmark): ``bench-nodes``, ``bench-rounds``, ``bench-result``
(a JSON-lines file: one line per round with its wall time), ``bench-wait-s``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from restwise.client import receipts_store
from restwise.client.app import SIM_KEYSTORE_DIR, DeviceLocation, DeviceLocator, device_folder_name, local_update, open_device_store
from restwise.models.registry import ReleasedSum
from restwise.privacy import wire
from restwise.privacy.release import ReleaseWorkflow, plan_release
from restwise.privacy.secagg.workflow import RoundInput, SecAggSession
from restwise.server.app import FederatedServer, initial_checkpoint
from restwise.server.rundir import open_ledger
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet

RUN_ID = "deployment-benchmark"


def bench_config(nodes: int, rounds: int) -> RunConfig:
    """The run both variants train: every device every round, the recovery model, one local
    epoch; DP-FedAvg with distributed noise for the restwise variant."""
    return RunConfig(
        name=RUN_ID, rounds=rounds, population=nodes, sampling="poisson", sampling_rate=1.0, noise_multiplier=1.0,
        delta=1e-5, clip_norm=1.0, secagg_num_neighbours=max(2, nodes - 1), secagg_threshold=0.6,
        max_dropout_fraction=0.25, local_epochs=1, learning_rate=0.003, round_timeout_s=120.0, dataset="demo", seed=7,
        force=True,  # the planner refuses the network under DP on 4 devices (its noise swamps the update)
        # a speed measurement, not a study: the run's epsilon cap (default 10, reached after 4 of
        # these rounds) is raised so that --rounds 6 runs too (recorded in the run's ledger)
        max_epsilon=100.0,
    )


def prepare_bench_fleet(fleet: Path, config: RunConfig, *, demo_days: int = 90) -> int:
    """The generated fleet, each device's own epsilon cap raised to the run's (a speed
    measurement over many rounds, not a study: at the default cap of 10 the devices would
    decline after about four of these rounds, and the measured rounds would abort)."""
    n = prepare_fleet(fleet, config, demo_days=demo_days)
    for i in range(n):
        location = DeviceLocation(fleet / device_folder_name(i), fleet / SIM_KEYSTORE_DIR)
        with open_device_store(location) as store:
            receipts_store.set_max_epsilon(store, float(config.max_epsilon))
    return n


def _wait_for_nodes(grid: Grid, want: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(int(n) for n in grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return nodes


def _write(path: str, line: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


# -- plain: Flower's FedAvg -------------------------------------------------------------------
plain_client = ClientApp()


@plain_client.train()
def _plain_train(msg: Message, context: Context) -> Message:
    received = msg.content.array_records["arrays"]
    config = msg.content.config_records["config"]
    global_arrays = [received[k].numpy() for k in sorted(received.keys())]
    with open_device_store(DeviceLocator().locate(context)) as store:
        update, _ = local_update(store, global_arrays, config, run_id=RUN_ID, round_=int(config["server-round"]))
    new, at = {}, 0
    for key in sorted(received.keys()):
        array = received[key].numpy()
        new[key] = Array((array.reshape(-1) + update[at:at + array.size]).reshape(array.shape).astype(array.dtype))
        at += array.size
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


plain_server = ServerApp()


@plain_server.main()
def _plain_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n, rounds, out = int(rc["bench-nodes"]), int(rc["bench-rounds"]), str(rc["bench-result"])
    _wait_for_nodes(grid, n, float(rc.get("bench-wait-s", 120.0)))
    config = bench_config(n, rounds)
    ckpt = initial_checkpoint(config)
    arrays = wire.arrays_record(ckpt.arrays)
    train = ConfigRecord({"model": ckpt.model, "model_config": ckpt.model_config, "local_epochs": config.local_epochs,
                          "learning_rate": config.learning_rate, "batch_size": config.batch_size, "seed": 7})
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        result = strategy.start(grid, arrays, num_rounds=1, train_config=train, timeout=float(config.round_timeout_s))
        arrays = result.arrays
        _write(out, {"variant": "plain", "round": r, "seconds": time.perf_counter() - start, "messages": 1,
                     "ended_at": time.time()})


# -- restwise: the session driver with the release workflow's parameters ------------------------
class RestwiseRounds:
    """The restwise variant's rounds over any Grid (deployed here; in-process for the
    cold-start measurement): train content and DP parameters as the release workflow
    computes them, secure aggregation through one session, each release applied."""

    def __init__(self, config: RunConfig, nodes: list[int], run_dir: Path):
        self.config, self.nodes = config, nodes
        plan = plan_release(config.release_policy())
        # Only the workflow's parameter step is used (no releases are written): the server is a
        # private one over a throwaway ledger so that its run record carries the ledger key the
        # devices pin (a run record without one is declined, privacy/receipts.py).
        self.release = ReleaseWorkflow(plan, ledger=None, run_id=RUN_ID)
        server_dir = Path(run_dir) / "server"
        server_dir.mkdir(parents=True, exist_ok=True)
        self.server = FederatedServer(config, server_dir, run_id=RUN_ID, ledger=open_ledger(server_dir, config))
        self.architecture = config.architecture
        self.ckpt = initial_checkpoint(config)
        self.session = SecAggSession(self.release.round_parameters(len(nodes)).secagg)

    def round(self, grid: Grid, r: int):
        ckpt = self.ckpt

        def content_for(plan_):
            params = self.release.round_parameters(plan_.participants)
            return RoundInput(self.server.train_content(r, ckpt, params.dp), clip_range=params.secagg.clip_range)

        result = self.session.round(
            grid, self.nodes, content_for, round=r, vector_length=self.architecture.contribution_size(ckpt.arrays),
            announce=self.server.announcer(r, 0)[0], last=r == self.config.rounds,
        )
        if not result.aborted:
            released = ReleasedSum(result.total, len(result.survivors), 0.0, float(len(self.nodes)))
            self.ckpt = type(ckpt)(r, self.architecture.apply_release(ckpt.model_config, ckpt.arrays, released), ckpt.model,
                                   ckpt.model_config, {})
        return result


restwise_server = ServerApp()


@restwise_server.main()
def _restwise_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n, rounds, out = int(rc["bench-nodes"]), int(rc["bench-rounds"]), str(rc["bench-result"])
    nodes = _wait_for_nodes(grid, n, float(rc.get("bench-wait-s", 120.0)))
    with tempfile.TemporaryDirectory() as tmp:
        rounds_ = RestwiseRounds(bench_config(n, rounds), nodes, Path(tmp))
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            result = rounds_.round(grid, r)
            _write(out, {
                "variant": "restwise", "round": r, "seconds": time.perf_counter() - start, "mode": result.mode,
                "aborted": result.aborted, "reason": result.reason, "survivors": len(result.survivors),
                "messages": max(result.messages.values(), default=0), "train_loss": result.metrics.get("train_loss"),
                "stages": {k: round(v, 3) for k, v in result.stage_seconds.items()},
            })
