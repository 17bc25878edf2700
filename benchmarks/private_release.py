"""Seconds for ONE private statistics release of the linear head vs a plain FedAvg round.

    python benchmarks/private_release.py               # 100 simulated devices
    python benchmarks/private_release.py --devices 20  # a quicker look

Issue 12's speed target: one statistics release for 100 simulated devices, from setup to the
released model, at most 2x a plain FedAvg round in the same run. Every arm does the real work
on every simulated device, over the same in-process Grid (privacy/secagg/harness.py: real
Flower Messages and RecordDicts, no Ray; as benchmarks/rounds.py), on the same fleet of
encrypted stores:

* ``plain FedAvg round`` (the baseline): the recovery network, mode "plain" - the server sends
  the global model, every device opens its store, builds its features, trains one local epoch
  and replies its raw update, the server averages. No privacy at all.
* ``plain statistics`` (for context): the linear head in the same plain mode - every device
  computes its statistics and replies them in the clear, the server solves.
* ``private release``: the linear head through the full stack - the planner's check, the
  budget check, hello/consent, SecAgg+ (4 stages), the device's clipping and distributed noise
  share, the egress guard logging every reply in the encrypted store, the signed ledger entry,
  the solve toward the shipped prior and the checkpoint ("released model"); then, reported
  apart, the delivery of the model to every device.

"From setup to released model" starts before the ServerApp object is built (run folder,
ledger, plan) and ends when the checkpoint is written. Each arm runs once as a warm-up
(imports, caches; not counted), then ``--repeats`` times, alternating; medians are reported,
as wall seconds and as process CPU seconds (every device runs in this process, so CPU is the
work done, less disturbed by other load on a shared machine).
"""

from __future__ import annotations

import argparse
import json
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

ARMS = ("plain FedAvg round", "plain statistics", "private release")


def config_for(arm: str, n: int) -> RunConfig:
    common = dict(population=n, sampling="poisson", sampling_rate=1.0, delta=min(1e-5, 0.1 / n),
                  secagg_num_neighbours=16, secagg_threshold=0.6, max_dropout_fraction=0.3, round_timeout_s=600.0,
                  dataset="demo", seed=11)
    if arm == "plain FedAvg round":
        return RunConfig(name="bench-fedavg", model="recovery-mlp", rounds=1, noise_multiplier=1.0, clip_norm=1.0,
                         local_epochs=1, learning_rate=0.003, force=True, **common)
    return RunConfig(name="bench-release", model="linear-head", rounds=1, target_epsilon=4.0, **common)


def grid_for(app, n: int) -> InProcessGrid:
    node_ids = [10_000 + i for i in range(n)]
    grid = InProcessGrid(app, node_ids)
    for i, nid in enumerate(node_ids):
        grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(), run_config={})
    return grid


def run_arm(arm: str, n: int, fleet: Path, work: Path) -> dict:
    """One run of ``arm``: wall and CPU seconds from setup to the released model (and the
    delivery, reported apart)."""
    private = arm == "private release"
    config = config_for(arm, n)
    app = make_client_app(DeviceLocator(fleet), private=private)
    grid = grid_for(app, n)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    run_dir = work / f"run-{arm.split()[0]}-{n}-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    ledger = open_ledger(run_dir, config) if private else None
    server = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=ledger, node_wait_s=1.0,
                             mode="private" if private else "plain")
    released: dict = {}
    deliver = server.deliver

    def timed_delivery(grid_, ckpt):
        # The model is released (checkpoint written) when the delivery starts.
        released.update(wall=time.perf_counter() - wall0, cpu=time.process_time() - cpu0)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        out = deliver(grid_, ckpt)
        released.update(delivery_wall=time.perf_counter() - start_wall, delivery_cpu=time.process_time() - start_cpu)
        return out

    server.deliver = timed_delivery
    summary = server.run(grid)
    if summary.status != "completed":
        raise SystemExit(f"{arm} at {n} devices ended {summary.status}: {summary.reason}")
    if not released:  # plain arms deliver nothing: the run ends with the model
        released.update(wall=time.perf_counter() - wall0, cpu=time.process_time() - cpu0)
    released["survivors"] = summary.rounds[-1].survived
    return released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100, help="simulated devices (the target is stated at 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per arm after the warm-up")
    parser.add_argument("--days", type=int, default=120, help="days of generated data per person (the demo's)")
    parser.add_argument("--fleet-dir", type=Path, default=None, help="reuse (or keep) the simulated fleet here")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n = args.devices
    with tempfile.TemporaryDirectory(prefix="restwise-bench-") as tmp:
        work = Path(tmp)
        fleet = (args.fleet_dir or work / "fleet").resolve()
        t0 = time.perf_counter()
        prepare_fleet(fleet, config_for("private release", n), demo_days=args.days)
        print(f"fleet of {n} encrypted stores ready in {time.perf_counter() - t0:.1f} s ({fleet})")
        for arm in ARMS:  # warm-up
            run_arm(arm, n, fleet, work)
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for _ in range(max(1, args.repeats)):
            for arm in ARMS:
                runs[arm].append(run_arm(arm, n, fleet, work))
    med = {arm: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for arm, rs in runs.items()}
    base = med["plain FedAvg round"]
    print(f"{n} devices, median of {args.repeats} runs per arm after a warm-up (setup -> released model)")
    print(f"{'arm':<22} {'wall s':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8}  delivery (wall / CPU s)")
    for arm in ARMS:
        m = med[arm]
        delivery = f"{m['delivery_wall']:.2f} / {m['delivery_cpu']:.2f}" if "delivery_wall" in m else "-"
        print(f"{arm:<22} {m['wall']:>8.2f} {m['wall'] / base['wall']:>7.2f}x {m['cpu']:>8.2f} "
              f"{m['cpu'] / base['cpu']:>7.2f}x  {delivery}")
    ratio_cpu = med["private release"]["cpu"] / base["cpu"]
    ratio_wall = med["private release"]["wall"] / base["wall"]
    verdict = "met" if max(ratio_cpu, ratio_wall) <= 2.0 else "NOT met"
    print(f"target: private release <= 2x a plain FedAvg round at {n} devices: wall {ratio_wall:.2f}x, "
          f"CPU {ratio_cpu:.2f}x -> {verdict}" + ("" if n == 100 else " (the target is stated at 100 devices)"))
    if args.json:
        print(json.dumps({"devices": n, "repeats": args.repeats, "median": med, "ratio_wall": ratio_wall,
                          "ratio_cpu": ratio_cpu}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
