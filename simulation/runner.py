"""The simulation runner: one federated run, every device simulated in this process tree.

    python -m restwise.simulation.runner run --run-dir DIR       # the API service starts this
    python -m restwise.simulation.runner prepare --run-dir DIR   # only build the simulated fleet

It reads ``DIR/config.json``, checks the plan (``server.app.plan_refusal``: a DP run the
planner refuses is refused before any store is made, unless the config says ``force``), builds
the simulated fleet (``DIR/fleet/``, one encrypted store
per person: ``restwise.simulation.fleet``), and runs the server's ServerApp
(``restwise.server.app``) against the real ClientApp (``restwise.client.app``) on Flower's
simulation engine. It writes the run directory's file contract (``restwise.server.rundir``);
``DIR/STOP`` stops it after the round in progress (SIGTERM too, outside Ray). It holds the run's lock
(``DIR/runner.lock``) while it runs; started on a run whose runner vanished, it records the
interruption and resumes from the checkpoint, or only finishes a run that stopped while
writing its report. Exit code 0 when the run completed or was stopped, 1 otherwise (refused, failed:
state.json says why).
"""

from __future__ import annotations

import argparse
import json
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
from restwise.server.rundir import (RunFiles, RunnerLock, crash_point, finish_failed, finish_run, needs_finishing,
                                     note_interruption)
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
    engine, one simulated device per person. Writes the run directory's files, holding the
    run's lock throughout (``rundir.RunnerLock``: RunFilesError if another runner has it).

    A run left "running" by a runner that vanished is recorded as interrupted, then resumed
    from its checkpoint; a run left "finishing" (or ended without its anchored report) is only
    finished; an ended run is refused."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunnerLock(run_dir):
        files = RunFiles(run_dir)
        if not files.config.exists():
            files.write_config(config)
        crash_point("before-setup")
        interrupted = note_interruption(files, found_by="the runner at start")
        if interrupted:
            _log.warning("run %s %s; resuming from its checkpoint", run_dir.name, interrupted)
        if needs_finishing(run_dir):
            _log.warning("run %s ended without its anchored report: finishing it from its ledger", run_dir.name)
            return _summary_from_files(files, config, finish_run(run_dir))
        state = files.read_state()
        if state.get("status") in TERMINAL_STATUSES:
            raise RunFilesError(f"run {run_dir.name} is already {state['status']}")
        current = int(state.get("current_round", 0) or 0)
        try:
            refusal = plan_refusal(config)  # before any store is made (the ServerApp checks again)
        except Exception as exc:  # noqa: BLE001 - recorded in state.json, then re-raised
            files.write_state("failed", reason=f"{type(exc).__name__}: {exc}"[:500], current_round=current)
            raise
        if refusal is not None:
            files.write_state("refused", reason=refusal[:2000], current_round=current)
            return RunSummary(run_dir.name, run_dir, "refused", refusal, 0, None, config.delta, 0.0)
        return _run_simulation(run_dir, files, config, state, should_stop, backend_config, node_wait_s, client_app)


def _run_simulation(run_dir, files, config, state, should_stop, backend_config, node_wait_s, client_app) -> RunSummary:
    # Flower's simulation engine starts Ray: imported only when a simulation runs, so that
    # the CLI and the runner's `prepare` stay fast.
    from flwr.simulation import run_simulation

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
        finish_failed(run_dir, f"{type(exc).__name__}: {exc}"[:500])
        raise
    if not summaries:
        finish_failed(run_dir, "the server app ended without a result")
        raise RunFilesError("the federation ended without a result")
    final = finish_run(run_dir)
    summary = summaries[0]
    summary.status, summary.reason = final["status"], final.get("reason")
    return summary


def _summary_from_files(files: RunFiles, config: RunConfig, state: dict[str, Any]) -> RunSummary:
    """The summary of a run that was only finished (no round ran in this process)."""
    report = read_report(files.run_dir)
    return RunSummary(
        run_id=files.run_dir.name, run_dir=files.run_dir, status=state["status"], reason=state.get("reason"),
        rounds_completed=int(state.get("completed_rounds", state.get("current_round", 0)) or 0),
        epsilon=report.get("epsilon") if report else None, delta=config.delta, noise_multiplier=0.0,
    )


def read_report(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
