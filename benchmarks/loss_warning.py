"""Does the rising-loss warning fire on the pilot configuration that diverged? (issue 14 item 7)

    python benchmarks/loss_warning.py                 # the pilot, sampling seeds 1-3, and the synthetic rates
    python benchmarks/loss_warning.py --seeds 1 2 3 4 5 --synthetic-runs 1000

The pilot configuration of docs/service.md (``soccermon-pilot``: recovery-mlp, 50 demo devices,
Poisson q = 0.2, epsilon 3 over 20 rounds, clip 1; forced, since the planner refuses it), run
on the in-process Grid (privacy/secagg/harness.py: the real ServerApp loop, the real ClientApp
with every mod, real encrypted stores, secure aggregation and distributed DP noise; no Ray).
Per round it prints the released training loss and its std (rounds.jsonl), and beside it the
devices' true mean loss, which this script records by wrapping ``client.app.local_update`` in
this process (a measurement only: nothing of it is sent or stored). Then the run's events: did
the ``loss-rising`` warning fire, and after which round.

``--synthetic-runs N``: the warning's rates on synthetic 20-round runs (flat, falling, slowly
and quickly diverging losses) at a per-round std of 0.3 (about 50 survivors) and of the pilot
(about 1.4), as in docs/federated.md "Training loss and the rising-loss warning".
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict

import restwise.client.app as client_app
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.server.app import FederatedServer
from restwise.server.loss_trend import LossPoint, loss_rise
from restwise.server.rundir import RunFiles, open_ledger, read_events
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet

PILOT = dict(name="soccermon-pilot", model="recovery-mlp", dataset="demo", rounds=20, population=50, sampling="poisson",
             sampling_rate=0.2, target_epsilon=3.0, delta=1e-5, clip_norm=1.0, secagg_num_neighbours=4,
             secagg_threshold=3, max_dropout_fraction=0.3, round_timeout_s=600, force=True)
NODE_BASE = 1000


def pilot_run(work: Path, fleet: Path, seed: int, config: RunConfig) -> dict:
    run_dir = work / f"run-pilot{seed:07d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shutil.copytree(fleet, run_dir / "fleet", symlinks=True)
    RunFiles(run_dir).write_config(config)
    true_losses: dict[int, list[float]] = {}
    real_update = client_app.local_update

    def recording_update(store, *args, **kwargs):  # the measurement: the devices' own losses, kept in this process
        vector, loss = real_update(store, *args, **kwargs)
        true_losses.setdefault(int(kwargs["round_"]), []).append(float(loss))
        return vector, loss

    client_app.local_update = recording_update
    try:
        app = client_app.make_client_app(client_app.DeviceLocator(run_dir / "fleet"))
        nodes = [NODE_BASE + i for i in range(config.population)]
        grid = InProcessGrid(app, nodes)
        for i, nid in enumerate(nodes):
            grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(),
                                         run_config={})
        started = time.perf_counter()
        summary = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, config),
                                  node_wait_s=1.0, sampling_rng=np.random.default_rng(seed)).run(grid)
        seconds = time.perf_counter() - started
    finally:
        client_app.local_update = real_update
    return {"summary": summary, "seconds": seconds, "lines": RunFiles(run_dir).round_lines(), "truth": true_losses,
            "events": read_events(run_dir)}


def synthetic_rates(runs: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    rounds = 20
    shapes = {
        "flat": [0.6] * rounds,
        "falling": [0.3 + 0.6 * math.exp(-r / 5) for r in range(rounds)],
        "slow divergence": [min(4.0, 0.6 + max(0, r - 5) * 0.34) for r in range(1, rounds + 1)],
        "fast divergence": [min(4.0, 0.6 * 2.0 ** max(0, r - 1)) for r in range(1, rounds + 1)],
    }
    print(f"\nsynthetic 20-round runs ({runs} each): share warned, median round of the warning")
    for std in (0.3, 1.4):
        for name, truth in shapes.items():
            fired = []
            for _ in range(runs):
                points = []
                for rnd, level in enumerate(truth, 1):
                    points.append(LossPoint(rnd, level + rng.normal(0, std), std))
                    if loss_rise(points) is not None:
                        fired.append(rnd)
                        break
            median = f"{np.median(fired):.0f}" if fired else "-"
            print(f"  std {std:<4} {name:<16} warned {len(fired) / runs:6.1%}  median round {median}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3], help="sampling seeds of the pilot runs")
    parser.add_argument("--synthetic-runs", type=int, default=500, help="synthetic runs per shape (0: none)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    config = RunConfig.from_dict(PILOT)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="restwise-losswarn-"))
    work.mkdir(parents=True, exist_ok=True)
    fleet = work / "fleet-template"
    if args.seeds and not fleet.exists():
        prepare_fleet(fleet, config)
    warned = 0
    for seed in args.seeds:
        result = pilot_run(work, fleet, seed, config)
        print(f"\npilot, sampling seed {seed}: {result['summary'].status}, epsilon {result['summary'].epsilon:.3f}, "
              f"{result['seconds']:.0f} s")
        print("  round  survived  released loss ± std   devices' true mean (capped at 4)")
        for line in result["lines"]:
            truth = result["truth"].get(line["round"], [])
            true_mean = f"{np.mean(truth):6.3f} ({np.mean(np.minimum(truth, 4.0)):.3f})" if truth else "-"
            loss, std = line.get("train_loss"), line.get("train_loss_std")
            shown = f"{loss:7.3f} ± {std:5.3f}" if loss is not None else "not released"
            print(f"  {line['round']:>5}  {line['survived']:>8}  {shown:>19}   {true_mean}")
        events = [e for e in result["events"] if e["kind"] == "loss-rising"]
        warned += bool(events)
        print("  warning: " + (f"after round {events[0]['round']}: {events[0]['message']}" if events else "none"))
    if args.seeds:
        print(f"\nthe warning fired in {warned} of {len(args.seeds)} pilot runs")
    if args.synthetic_runs:
        synthetic_rates(args.synthetic_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
