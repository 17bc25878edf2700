"""``restwise demo``: a small private federation of generated persons, each with their own
encrypted store, then what the coach made of the learned model on every device and one
person's coach output - computed on that person's device from their store and the model.

By default the model is the linear head (``linear-head``): the shipped public prior plus ONE
distributed-DP release of the devices' sufficient statistics (epsilon 4), delivered to every
device. Each device's coach blends it in only where it beat "same as your last answer" on that
person's recent days (the trust gate, unchanged); the demo prints for how many persons it did,
in exactly one line: ``coach used the learned model for K of N persons``. ``--model
recovery-mlp`` runs the network by DP-FedAvg instead (the planner refuses it on a handful of
devices unless ``--force``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from restwise.client import receipts_store
from restwise.client.app import SIM_KEYSTORE_DIR, DeviceLocation, device_folder_name, open_device_store
from restwise.client.coach_cli import advise
from restwise.models.registry import ONE_RELEASE, get_architecture
from restwise.privacy.ledger import export_public_key, load_audit_key
from restwise.privacy.receipts import write_receipt_file
from restwise.server.app import RunSummary
from restwise.server.rundir import RunFiles, needs_finishing
from restwise.server.runstatus import TERMINAL_STATUSES
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import FLEET_DIR
from restwise.simulation.runner import run_federation

DEMO_MODEL = "linear-head"
DEMO_TARGET_EPSILON = 8.0  # a FedAvg model, over all its rounds (the evaluation's DP-FedAvg row too)
DEMO_RELEASE_EPSILON = 4.0  # a one-release model: its one statistics release
DEMO_NETWORK_ROUNDS = 3
DEMO_CLIP_NORM = 1.0
DEMO_LEARNING_RATE = 0.003
# The demo operator's "published" audit public key, kept beside (not inside) the run folder, so
# the verify command the demo prints pins it instead of trusting the copy shipped in the folder.
DEMO_PUBLISHED_KEY = "audit-public-key.pem"
# Where the demo's devices export their receipts (beside the run folders): what an auditor
# passes to `restwise audit verify --receipts`.
DEMO_RECEIPTS_DIR = "receipts"


def demo_config(persons: int, rounds: int | None = None, *, seed: int = 0, model: str = DEMO_MODEL,
                force: bool = False) -> RunConfig:
    """The demo's run: every person in every round, distributed noise; a one-release model
    has exactly one round."""
    one_release = get_architecture(model).protocol == ONE_RELEASE
    return RunConfig(
        name="demo", model=model, rounds=1 if one_release else int(rounds or DEMO_NETWORK_ROUNDS), population=persons,
        sampling="poisson", sampling_rate=1.0, target_epsilon=DEMO_RELEASE_EPSILON if one_release else DEMO_TARGET_EPSILON,
        delta=min(1e-5, 0.1 / persons), clip_norm=DEMO_CLIP_NORM,
        secagg_num_neighbours=max(2, min(4, persons - 1)), secagg_threshold=0.6, max_dropout_fraction=0.3,
        local_epochs=1, learning_rate=DEMO_LEARNING_RATE, round_timeout_s=120.0, dataset="demo", seed=seed,
        noise="distributed", force=force,
    )


def run_demo_federation(workdir: Path, persons: int = 6, rounds: int | None = None, *, model: str = DEMO_MODEL,
                        force: bool = False) -> RunSummary:
    """``restwise demo``: a small federation on generated persons, in ``workdir/run-demo``."""
    if persons < 3:
        raise ValueError("the demo needs at least 3 persons (secure aggregation needs 3 devices)")
    config = demo_config(persons, rounds, model=model, force=force)  # RunConfigError before anything is made
    return run_federation(demo_run_dir(workdir), config, node_wait_s=60.0)


def demo_run_dir(workdir: Path) -> Path:
    """Where the demo runs: ``workdir/run-demo``, continued while it has not ended (an
    interrupted demo resumes; one that stopped while writing its report is finished); once it
    has ended, a new run beside it (``run-demo-2``, ``run-demo-3``, ...). An earlier run - its
    signed ledger above all - is never deleted: it is the evidence of what its persons spent."""
    n = 1
    while True:
        run_dir = Path(workdir) / ("run-demo" if n == 1 else f"run-demo-{n}")
        if not run_dir.exists():
            return run_dir
        files = RunFiles(run_dir)
        if files.read_state().get("status") not in TERMINAL_STATUSES or needs_finishing(run_dir):
            return run_dir
        n += 1


def coach_line(used: int, persons: int) -> str:
    """The demo's one line about the learned model (its exact form is documented)."""
    return f"coach used the learned model for {used} of {persons} persons"


def publish_demo_key(run_dir: Path) -> Path:
    """Write the public half of the demo's audit key (``run_dir/../audit_key.pem``, see
    server.rundir.open_ledger) to ``run_dir/../audit-public-key.pem``: what an operator would
    publish out of band, and what an auditor pins with ``--public-key``."""
    run_dir = Path(run_dir).resolve()
    return export_public_key(load_audit_key(run_dir.parent / "audit_key.pem"), run_dir.parent / DEMO_PUBLISHED_KEY)


def demo_outcome(summary: RunSummary, person: int = 0, persons: int | None = None) -> dict[str, Any]:
    """What the demo prints: the privacy spent, on how many devices the coach used the learned
    model (each computed on that person's device from their store), and one person's coach
    output. Each device exports its receipts of the run into ``receipts/`` beside the run
    folder (``receipts_dir``; None when no device holds any)."""
    fleet = Path(summary.run_dir) / FLEET_DIR
    n = persons if persons is not None else RunFiles(Path(summary.run_dir)).read_config().population
    used, notes, shown = 0, [], None
    receipts = Path(summary.run_dir).resolve().parent / DEMO_RECEIPTS_DIR
    exported = 0
    for i in range(n):
        location = DeviceLocation(fleet / device_folder_name(i), fleet / SIM_KEYSTORE_DIR)
        with open_device_store(location) as store:
            # Each device exports its copy of the run's signed ledger (`device receipts export`).
            document = receipts_store.export_document(store, summary.run_id)
            if document is not None:
                write_receipt_file(receipts, document)
                exported += 1
            advice, note, model_status = advise(store)
            if i == person:
                shown = (advice, note, model_status, store.egress_history())
        used += int(not advice.rules_only)
        notes.append(advice.model_note or model_status)
    if shown is None:
        raise ValueError(f"person {person} is not one of the demo's {n} persons")
    advice, note, model_status, history = shown
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
        "learned_model_used": used,
        "persons": n,
        "coach_line": coach_line(used, n),
        "model_notes": notes,
        "delivered": summary.delivered,
        "published_key": publish_demo_key(Path(summary.run_dir)),
        "receipts_dir": receipts if exported else None,
        "receipt_files": exported,
    }


__all__ = ["demo_config", "run_demo_federation", "demo_run_dir", "demo_outcome", "coach_line", "publish_demo_key",
           "DEMO_MODEL", "DEMO_RECEIPTS_DIR"]
