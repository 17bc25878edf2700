"""The simulation runner: one federated run, every device simulated in this process tree.

    python -m restwise.simulation.runner run --run-dir DIR       # the API service starts this
    python -m restwise.simulation.runner prepare --run-dir DIR   # only build the simulated fleet

It reads ``DIR/config.json``, checks the plan (``server.app.plan_refusal``: a DP run the
planner refuses is refused before any store is made, unless the config says ``force``), builds
the simulated fleet (``DIR/fleet/``, one encrypted store
per person: ``restwise.simulation.fleet``), and runs the server's ServerApp
(``restwise.server.app``) against the real ClientApp (``restwise.client.app``) on Flower's
simulation engine. It writes the run directory's file contract (``restwise.server.rundir``);
``DIR/STOP`` or SIGTERM stops it after the round in progress. Exit code 0 when the run
completed or was stopped, 1 otherwise (refused, failed: state.json says why).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from restwise.client.app import DeviceLocator, make_client_app
from restwise.common.errors import RestwiseError
from restwise.common.exit_codes import ExitCode
from restwise.server.app import RunSummary, make_server_app, plan_refusal
from restwise.server.errors import RunFilesError
from restwise.server.rundir import RunFiles, write_report
from restwise.server.runstatus import TERMINAL_STATUSES
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import FLEET_DIR, prepare_fleet

_log = logging.getLogger(__name__)


def default_backend_config(num_cpus_per_client: float = 0.5) -> dict[str, Any]:
    return {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


def run_federation(
    run_dir: Path,
    config: RunConfig,
    *,
    should_stop: Callable[[], bool] | None = None,
    backend_config: dict[str, Any] | None = None,
    node_wait_s: float = 60.0,
    client_app=None,
) -> RunSummary:
    """Run (or resume) the federation of ``config`` in ``run_dir`` with Flower's simulation
    engine, one simulated device per person. Writes the run directory's files."""
    # Flower's simulation engine starts Ray: imported only when a simulation runs, so that
    # the CLI and the runner's `prepare` stay fast.
    from flwr.simulation import run_simulation

    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    if not files.config.exists():
        files.write_config(config)
    state = files.read_state()
    if state.get("status") in TERMINAL_STATUSES:
        raise RunFilesError(f"run {run_dir.name} is already {state['status']}")
    try:
        refusal = plan_refusal(config)  # before any store is made (the ServerApp checks again)
    except Exception as exc:  # noqa: BLE001 - recorded in state.json, then re-raised
        files.write_state("failed", reason=f"{type(exc).__name__}: {exc}"[:500], current_round=_current_round(files))
        raise
    if refusal is not None:
        files.write_state("refused", reason=refusal[:2000], current_round=_current_round(files))
        return RunSummary(run_dir.name, run_dir, "refused", refusal, 0, None, config.delta, 0.0)
    files.write_state("running", reason="preparing the simulated devices", current_round=int(state.get("current_round", 0)))
    summaries: list[RunSummary] = []
    try:
        fleet = run_dir / FLEET_DIR
        prepare_fleet(fleet, config)
        server_app = make_server_app(
            config, run_dir, run_id=run_dir.name, should_stop=should_stop, on_summary=summaries.append,
            node_wait_s=node_wait_s,
        )
        client = client_app or make_client_app(DeviceLocator(fleet.resolve()))
        # run_simulation's deprecation notice and per-message INFO lines are noise for
        # operators; our own progress is logged by restwise.server.app.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        # Ray (under Flower's simulation engine) warns on every start about a future change to
        # accelerator env vars; there are no accelerators here, so opt in to the new behaviour.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        run_simulation(
            server_app=server_app, client_app=client, num_supernodes=config.device_count,
            backend_config=backend_config or default_backend_config(),
        )
    except Exception as exc:  # noqa: BLE001 - recorded in state.json, then re-raised
        files.write_state("failed", reason=f"{type(exc).__name__}: {exc}"[:500], current_round=_current_round(files))
        raise
    if not summaries:
        files.write_state("failed", reason="the server app ended without a result", current_round=_current_round(files))
        raise RunFilesError("the federation ended without a result")
    write_report(run_dir)
    return summaries[0]


def _current_round(files: RunFiles) -> int:
    try:
        return int(files.read_state().get("current_round", 0))
    except RunFilesError:
        return 0


class _StopFlag:
    def __init__(self, files: RunFiles):
        self.files = files
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set() or self.files.stop_requested()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restwise.simulation.runner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "prepare"):
        p = sub.add_parser(name)
        p.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = RunFiles(args.run_dir)
    try:
        config = files.read_config()
    except RestwiseError as exc:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        files.write_state("failed", reason=f"invalid config.json: {exc}"[:500])
        print(f"Error: invalid config.json: {exc}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    if args.command == "prepare":
        n = prepare_fleet(args.run_dir / FLEET_DIR, config)
        print(f"{n} simulated devices in {args.run_dir / FLEET_DIR}")
        return int(ExitCode.SUCCESS)
    stop = _StopFlag(files)
    signal.signal(signal.SIGTERM, lambda *_: stop.event.set())
    try:
        summary = run_federation(args.run_dir, config, should_stop=stop)
    except Exception as exc:  # noqa: BLE001 - state.json already says failed
        print(f"Error: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    eps = "n/a" if summary.epsilon is None else f"{summary.epsilon:.4g}"
    print(f"run {summary.run_id}: {summary.status}; {summary.rounds_completed} rounds; epsilon {eps} at delta {summary.delta:g}")
    if summary.delivered:
        print(f"released model delivered to {summary.delivered['devices']} of {summary.delivered['connected']} devices")
    if summary.status not in ("completed", "stopped"):
        print(f"Error: {summary.reason}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    return int(ExitCode.SUCCESS)


if __name__ == "__main__":
    sys.exit(main())
