"""``restwise demo``: a small private federation of generated persons, each with their own
encrypted store, then one person's coach output - computed on that person's device from their
store and the federated model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from restwise.client.app import SIM_KEYSTORE_DIR, DeviceLocation, device_folder_name, open_device_store
from restwise.client.coach_cli import advise
from restwise.server.app import RunSummary
from restwise.server.rundir import RunFiles
from restwise.server.runstatus import TERMINAL_STATUSES
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import FLEET_DIR
from restwise.simulation.runner import run_federation

DEMO_TARGET_EPSILON = 8.0
DEMO_CLIP_NORM = 1.0
DEMO_LEARNING_RATE = 0.003


def demo_config(persons: int, rounds: int, *, seed: int = 0) -> RunConfig:
    """The demo's run: every person in every round, distributed noise, epsilon 8 in total."""
    return RunConfig(
        name="demo", rounds=rounds, population=persons, sampling="poisson", sampling_rate=1.0,
        target_epsilon=DEMO_TARGET_EPSILON, delta=min(1e-5, 0.1 / persons), clip_norm=DEMO_CLIP_NORM,
        secagg_num_neighbours=max(2, min(4, persons - 1)), secagg_threshold=0.6, max_dropout_fraction=0.3,
        local_epochs=1, learning_rate=DEMO_LEARNING_RATE, round_timeout_s=120.0, dataset="demo", seed=seed,
        noise="distributed",
    )


def run_demo_federation(workdir: Path, persons: int = 6, rounds: int = 3) -> RunSummary:
    """``restwise demo``: a small federation on generated persons, in ``workdir/run-demo``."""
    if persons < 3:
        raise ValueError("the demo needs at least 3 persons (secure aggregation needs 3 devices)")
    run_dir = Path(workdir) / "run-demo"
    if run_dir.exists() and RunFiles(run_dir).read_state().get("status") in TERMINAL_STATUSES:
        shutil.rmtree(run_dir)  # a finished demo is run afresh
    return run_federation(run_dir, demo_config(persons, rounds), node_wait_s=60.0)


def demo_outcome(summary: RunSummary, person: int = 0) -> dict[str, Any]:
    """What the demo prints: the privacy spent and one person's coach output (computed on
    that person's device from their store and their federated model)."""
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


__all__ = ["demo_config", "run_demo_federation", "demo_outcome"]
