"""The runner: executes one federated run described by a run directory.

    python -m restwise.server.runner run --run-dir DIR       # the API service starts this
    python -m restwise.server.runner prepare --run-dir DIR   # only build the simulated fleet

File contract (the API service reads these; every JSON file is replaced atomically)::

    DIR/config.json     RunConfig.to_dict()                        (written by the creator)
    DIR/state.json      {"status": pending|running|completed|failed|stopped|refused,
                         "reason": str|null, "current_round": int, ...}
    DIR/rounds.jsonl    one line per round: round, attempt, status (completed|failed|refused),
                        sampled, participants, survived, dropped, train_loss, epsilon,
                        epsilon_no_amplification, delta, noise_multiplier_effective,
                        noise_std_total, reason, seconds
    DIR/ledger.jsonl    the run's signed privacy ledger (restwise.privacy.ledger); audit key
                        from config.audit_key_path or DIR/../audit_key.pem (created 0600 if
                        absent); DIR/public_key.pem its public half
    DIR/checkpoint      the global shared model after the last completed round (npz)
    DIR/fleet/          the simulated devices: keystore/ and one encrypted store per person
    DIR/report.json, DIR/report.html   at the end (restwise.privacy.report when available)
    DIR/STOP            create it (or send SIGTERM) to stop after the round in progress

A run directory whose state is not terminal resumes from its checkpoint: rounds already
completed are not repeated (a round that was released but not checkpointed is re-run as a new,
separately accounted attempt).
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

from restwise.server.app import RunFiles, RunSummary, make_server_app
from restwise.server.runconfig import RunConfig

_log = logging.getLogger(__name__)

FLEET_DIR = "fleet"
DEMO_DAYS = 120
TERMINAL = ("completed", "failed", "stopped", "refused")


def shared_data_dir() -> Path:
    env = os.environ.get("RESTWISE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


# -- the simulated fleet -----------------------------------------------------------------
def prepare_fleet(fleet_dir: Path, config: RunConfig, *, demo_days: int = DEMO_DAYS) -> int:
    """One encrypted store per person under ``fleet_dir`` (``device-NNNNN``), keys in
    ``fleet_dir/keystore`` (a FileKeystore: the simulation stand-in for each phone's platform
    keystore). Idempotent: existing stores are kept. Returns the number of devices."""
    from restwise.client.app import SIM_KEYSTORE_DIR, device_folder_name
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore

    fleet_dir = Path(fleet_dir)
    fleet_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keystore = FileKeystore(fleet_dir / SIM_KEYSTORE_DIR)
    n = config.device_count
    if config.dataset in ("demo", "synthetic"):
        from restwise.client.importers import run_import
        from restwise.demo import write_demo_export

        exports = fleet_dir / "exports"
        for i in range(n):
            folder = fleet_dir / device_folder_name(i)
            if DeviceStore.exists(folder):
                continue
            export = write_demo_export(int(config.seed) * 100_003 + i + 1, exports / f"person-{i:05d}.jsonl", days=demo_days)
            with DeviceStore.create(folder, keystore=keystore) as store:
                run_import(store, export)
            export.unlink()  # the plain export is not needed once imported
        return n
    from restwise.client.cohort import import_cohort

    if config.dataset in ("soccermon", "lifesnaps"):
        kind, source = config.dataset, shared_data_dir() / config.dataset
    else:
        kind, source = "folder", Path(config.dataset)
    stores = import_cohort(kind, source, fleet_dir / "persons", keystore=keystore, persons=n)
    if len(stores) < n:
        raise ValueError(f"population: the dataset has {len(stores)} persons, fewer than the population ({n})")
    for i, person in enumerate(stores[:n]):
        link = fleet_dir / device_folder_name(i)
        if not link.exists():
            link.symlink_to(person.folder.resolve(), target_is_directory=True)
    return n


# -- running --------------------------------------------------------------------------------
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
    engine, one simulated device per person. Writes the file contract above."""
    from flwr.simulation import run_simulation

    from restwise.client.app import DeviceLocator, make_client_app

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunFiles(run_dir)
    if not files.config.exists():
        files.config.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = files.read_state()
    if state.get("status") in TERMINAL:
        raise ValueError(f"run {run_dir.name} is already {state['status']}")
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
        _quiet_flower()
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
        raise RuntimeError("the federation ended without a result")
    summary = summaries[0]
    write_report(run_dir, config, summary)
    return summary


def _current_round(files: RunFiles) -> int:
    try:
        return int(files.read_state().get("current_round", 0))
    except Exception:  # noqa: BLE001
        return 0


def _quiet_flower() -> None:
    # run_simulation's deprecation notice and per-message INFO lines are noise for operators;
    # our own progress is logged by restwise.server.app.
    logging.getLogger("flwr").setLevel(logging.ERROR)


def write_report(run_dir: Path, config: RunConfig, summary: RunSummary) -> None:
    """report.json + report.html via restwise.privacy.report when it is available; otherwise
    a minimal report of the run's accounting (same file names)."""
    run_dir = Path(run_dir)
    try:
        from restwise.privacy import report as privacy_report
    except ImportError:
        privacy_report = None
    if privacy_report is not None:
        try:
            _call_privacy_report(privacy_report, run_dir, config, summary)
            return
        except Exception as exc:  # noqa: BLE001 - fall back to the minimal report, say why
            _log.warning("privacy report could not be built (%s: %s); writing the minimal report", type(exc).__name__, exc)
    from restwise.privacy.egress import allow_list_summary
    from restwise.server.app import atomic_write

    body = {
        "schema": "restwise-run-summary-1",
        "run_id": summary.run_id,
        "status": summary.status,
        "reason": summary.reason,
        "config": config.to_dict(),
        "rounds_completed": summary.rounds_completed,
        "epsilon": summary.epsilon,
        "delta": summary.delta,
        "noise_multiplier": summary.noise_multiplier,
        "rounds": [o.line() for o in summary.rounds],
        "information_leakage": allow_list_summary(),
    }
    atomic_write(run_dir / "report.json", (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    eps = "n/a" if summary.epsilon is None else f"{summary.epsilon:.4g}"
    html = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Restwise run report</title>"
        f"<h1>Run {summary.run_id}</h1><p>Status: {summary.status}. Rounds completed: {summary.rounds_completed}. "
        f"Privacy spent: epsilon = {eps} at delta = {summary.delta:g}.</p></html>\n"
    )
    atomic_write(run_dir / "report.html", html.encode())


def _call_privacy_report(module, run_dir: Path, config: RunConfig, summary: RunSummary) -> None:
    """Adapter to restwise.privacy.report (its API is owned by the accounting area)."""
    for name in ("write_run_report", "write_report"):
        fn = getattr(module, name, None)
        if fn is not None:
            fn(run_dir)
            return
    raise AttributeError("restwise.privacy.report has no write_run_report(run_dir)")


# -- the demo ------------------------------------------------------------------------------
def demo_config(persons: int, rounds: int, *, seed: int = 0) -> RunConfig:
    """The demo's run: every person in every round, distributed noise, epsilon 8 in total."""
    return RunConfig(
        name="demo", rounds=rounds, population=persons, sampling="poisson", sampling_rate=1.0,
        target_epsilon=8.0, delta=min(1e-5, 0.1 / persons), clip_norm=1.0, secagg_num_neighbours=max(2, min(4, persons - 1)),
        secagg_threshold=0.6, max_dropout_fraction=0.3, local_epochs=1, learning_rate=0.003, round_timeout_s=120.0,
        dataset="demo", seed=seed, noise="distributed",
    )


def run_demo_federation(workdir: Path, persons: int = 6, rounds: int = 3) -> RunSummary:
    """``restwise demo``: a small federation on generated persons, in ``workdir/run-demo``."""
    if persons < 3:
        raise ValueError("the demo needs at least 3 persons (secure aggregation needs 3 devices)")
    workdir = Path(workdir)
    run_dir = workdir / "run-demo"
    if run_dir.exists() and RunFiles(run_dir).read_state().get("status") in TERMINAL:
        import shutil

        shutil.rmtree(run_dir)
    config = demo_config(persons, rounds)
    return run_federation(run_dir, config, node_wait_s=60.0)


def demo_outcome(summary: RunSummary, person: int = 0) -> dict[str, Any]:
    """What the demo prints: the privacy spent and one person's coach output (computed on
    that person's device from their store and their federated model)."""
    from restwise.client.app import DeviceLocation, SIM_KEYSTORE_DIR, device_folder_name, open_device_store
    from restwise.client.coach_cli import advise

    fleet = Path(summary.run_dir) / FLEET_DIR
    location = DeviceLocation(fleet / device_folder_name(person), fleet / SIM_KEYSTORE_DIR)
    with open_device_store(location) as store:
        advice, note, model_status = advise(store)
        history = store.egress_history()
    return {
        "run_id": summary.run_id,
        "status": summary.status,
        "rounds_completed": summary.rounds_completed,
        "epsilon": summary.epsilon,
        "delta": summary.delta,
        "noise_multiplier": summary.noise_multiplier,
        "person": device_folder_name(person),
        "advice": advice,
        "note": note,
        "model_status": model_status,
        "messages_sent": len(history),
    }


# -- command line --------------------------------------------------------------------------
class _StopFlag:
    def __init__(self, files: RunFiles):
        self.files = files
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set() or self.files.stop_requested()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restwise.server.runner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "prepare"):
        p = sub.add_parser(name)
        p.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = RunFiles(args.run_dir)
    try:
        config = RunConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        files.write_state("failed", reason=f"invalid config.json: {exc}"[:500])
        print(f"error: invalid config.json: {exc}", file=sys.stderr)
        return 1
    if args.command == "prepare":
        n = prepare_fleet(args.run_dir / FLEET_DIR, config)
        print(f"{n} simulated devices in {args.run_dir / FLEET_DIR}")
        return 0
    stop = _StopFlag(files)
    signal.signal(signal.SIGTERM, lambda *_: stop.event.set())
    try:
        summary = run_federation(args.run_dir, config, should_stop=stop)
    except Exception as exc:  # noqa: BLE001 - state.json already says failed
        print(f"error: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    eps = "n/a" if summary.epsilon is None else f"{summary.epsilon:.4g}"
    print(f"run {summary.run_id}: {summary.status}; {summary.rounds_completed} rounds; epsilon {eps} at delta {summary.delta:g}")
    return 0 if summary.status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
