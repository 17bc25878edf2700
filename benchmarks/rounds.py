"""Seconds per federated round: plain FedAvg vs the full Restwise stack.

    python benchmarks/rounds.py            # 20 and 100 simulated clients
    python benchmarks/rounds.py --quick    # 20 only

Both arms run the same real work on every simulated device - open its encrypted store, build
the features, train the real recovery model (shared part) for one local epoch - over the same
in-process Grid (privacy/secagg/harness.py: real Flower Messages and RecordDicts, no Ray), so
the ratio isolates what privacy costs:

* plain FedAvg: the server sends the global model, devices reply their raw update, the server
  averages. No consent check, no clipping, no noise, no masking, no egress log, no ledger.
* full stack: hello/consent, SecAgg+ (4 stages, X25519 + AES-GCM shares, masks), device-side
  clipping + distributed noise share, the egress guard checking and logging every reply in the
  encrypted store, the budget check, the signed ledger entry and the PLD accountant per round.

The first round of each arm is a warm-up (imports, caches) and is not counted.
Target (issue 7): full stack <= 2x plain at 100 clients.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, RecordDict

from restwise.client.app import DeviceLocator, make_client_app
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.server.app import FederatedServer
from restwise.server.rundir import open_ledger
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet


def config_for(n: int, rounds: int) -> RunConfig:
    return RunConfig(
        name=f"bench-{n}", rounds=rounds, population=n, sampling="poisson", sampling_rate=1.0,
        noise_multiplier=1.0, delta=min(1e-5, 0.1 / n), clip_norm=1.0, secagg_num_neighbours=16,
        secagg_threshold=0.6, max_dropout_fraction=0.3, local_epochs=1, learning_rate=0.003,
        round_timeout_s=600.0, dataset="demo", seed=11,
        force=True,  # DP-FedAvg of the network at 20-100 devices: the planner refuses it (this measures cost)
    )


def grid_for(app, n: int) -> InProcessGrid:
    node_ids = [10_000 + i for i in range(n)]
    grid = InProcessGrid(app, node_ids)
    for i, nid in enumerate(node_ids):
        grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(), run_config={})
    return grid


def run_arm(mode: str, n: int, rounds: int, fleet: Path, work: Path) -> list[float]:
    config = config_for(n, rounds)
    run_dir = work / f"run-{mode}-{n}-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    app = make_client_app(DeviceLocator(fleet), private=(mode == "private"))
    ledger = open_ledger(run_dir, config) if mode == "private" else None
    server = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=ledger, node_wait_s=1.0, mode=mode)
    cpu: list[float] = []
    inner = server.run_round

    def timed(grid, rnd, ckpt):
        # Everything (server and every simulated device) runs in this process: its CPU time
        # is the work of the round, unaffected by other load on the machine.
        start = time.process_time()
        out = inner(grid, rnd, ckpt)
        cpu.append(time.process_time() - start)
        return out

    server.run_round = timed
    summary = server.run(grid_for(app, n))
    if summary.status != "completed":
        raise SystemExit(f"{mode} run at {n} clients ended {summary.status}: {summary.reason}")
    return [o.seconds for o in summary.rounds], cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 clients only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per arm (the first is a warm-up)")
    parser.add_argument("--fleet-dir", type=Path, default=None, help="reuse (or keep) the simulated fleet here")
    parser.add_argument("--days", type=int, default=90, help="days of generated data per person")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [20] if args.quick else [20, 100]
    rounds = max(2, args.rounds)
    with tempfile.TemporaryDirectory(prefix="restwise-bench-") as tmp:
        work = Path(tmp)
        fleet = (args.fleet_dir or work / "fleet").resolve()
        t0 = time.perf_counter()
        prepare_fleet(fleet, config_for(max(sizes), rounds), demo_days=args.days)
        print(f"fleet of {max(sizes)} encrypted stores ready in {time.perf_counter() - t0:.1f} s ({fleet})")
        print(f"median of rounds 2..{rounds}; CPU = process CPU seconds (all devices run in this process)")
        print(f"{'clients':>8} {'plain wall':>10} {'full wall':>10} {'ratio':>6} {'plain CPU':>10} {'full CPU':>9} {'ratio':>6}")
        results = []
        for n in sizes:
            plain_wall, plain_cpu = (x[1:] for x in run_arm("plain", n, rounds, fleet, work))
            full_wall, full_cpu = (x[1:] for x in run_arm("private", n, rounds, fleet, work))
            pw, fw = statistics.median(plain_wall), statistics.median(full_wall)
            pc, fc = statistics.median(plain_cpu), statistics.median(full_cpu)
            results.append((n, pw, fw, pc, fc))
            print(f"{n:>8} {pw:>10.2f} {fw:>10.2f} {fw / pw:>5.2f}x {pc:>10.2f} {fc:>9.2f} {fc / pc:>5.2f}x")
        n, pw, fw, pc, fc = results[-1]
        verdict = "met" if fc / pc <= 2.0 else "NOT met"
        print(
            f"target full <= 2x plain at {n} clients: CPU {fc / pc:.2f}x, wall {fw / pw:.2f}x -> {verdict}"
            + ("" if n == 100 else " (the target is stated at 100 clients)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
