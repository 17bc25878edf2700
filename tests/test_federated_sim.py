"""The federation on Flower's simulation engine (Ray): the runner's file contract, a real
simulated fleet of encrypted stores, 30% of the sampled devices failing mid-round."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from restwise.privacy.events import GaussianRoundEvent
from restwise.privacy.ledger import PrivacyLedger, load_public_key, verify_ledger_file
from restwise.server.app import initial_checkpoint
from restwise.server.rundir import Checkpoint
from restwise.server.runconfig import RunConfig

pytestmark = pytest.mark.slow


def _config(**changes) -> RunConfig:
    base = dict(
        name="sim", rounds=2, population=10, sampling="poisson", sampling_rate=1.0, noise_multiplier=1.0,
        delta=1e-3, clip_norm=1.0, secagg_num_neighbours=9, secagg_threshold=5, max_dropout_fraction=0.4,
        local_epochs=1, learning_rate=0.003, round_timeout_s=60.0, dataset="demo", seed=1,
        force=True,  # the network under DP on 10 devices: the planner refuses it unless forced
    )
    base.update(changes)
    return RunConfig(**base)


def _failing_partitions_mod(failing: frozenset[int]):
    # A closure (pickled by value into the Ray workers) that makes some devices crash while
    # training, i.e. after they took part in the key exchange.
    def crash_mod(msg, context, call_next):
        if msg.metadata.message_type == "train" and int(context.node_config.get("partition-id", -1)) in failing:
            raise RuntimeError("simulated device crash during training")
        return call_next(msg, context)

    return crash_mod


def test_simulated_run_with_thirty_percent_failing_devices(tmp_path):
    from restwise.client.app import DeviceLocator, make_client_app
    from restwise.simulation.fleet import FLEET_DIR
    from restwise.simulation.runner import run_federation

    run_dir = tmp_path / "run-sim000000001"
    config = _config()
    client = make_client_app(
        DeviceLocator((run_dir / FLEET_DIR).resolve()), extra_mods=(_failing_partitions_mod(frozenset({2, 5, 8})),)
    )
    summary = run_federation(run_dir, config, client_app=client)
    assert summary.status == "completed", summary.reason
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "completed" and state["current_round"] == 2
    lines = [json.loads(l) for l in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(l["round"], l["status"], l["sampled"], l["survived"], l["dropped"]) for l in lines] == [
        (1, "completed", 10, 7, 3), (2, "completed", 10, 7, 3),
    ]
    assert 0 < lines[0]["epsilon"] < lines[1]["epsilon"]
    releases = PrivacyLedger(run_dir / "ledger.jsonl").releases()
    assert [(e.round, e.survivors) for e in releases] == [(1, 7), (2, 7)]
    _, verification = verify_ledger_file(run_dir / "ledger.jsonl", load_public_key(run_dir / "public_key.pem"))
    assert verification.signed
    end = Checkpoint.from_bytes((run_dir / "checkpoint").read_bytes())
    start = initial_checkpoint(config)
    assert end.round == 2
    assert np.linalg.norm(np.concatenate([a.ravel() for a in end.arrays]) - np.concatenate([a.ravel() for a in start.arrays])) > 1e-3
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run_id"] == run_dir.name
    assert (run_dir / "report.html").exists()
    # What `restwise demo` prints: the privacy spent and one person's coach output.
    from restwise.simulation.demo import demo_outcome

    shown = demo_outcome(summary, person=0)
    assert shown["epsilon"] == pytest.approx(lines[1]["epsilon"]) and shown["delta"] == config.delta
    assert shown["advice"].band in ("green", "yellow", "red")
    assert shown["model_status"].startswith("stored (federated)")
    # one session: a setup round (4 stages), then a fast round (2); then the run's last ledger
    # entries (device receipts: one message per run, its reply empty)
    assert shown["messages_sent"] == 4 + 2 + 1


def test_runner_command_line_runs_a_run_directory(tmp_path):
    run_dir = tmp_path / "runs" / "run-cli000000001"
    run_dir.mkdir(parents=True)
    config = _config(population=6, rounds=1, secagg_num_neighbours=5, secagg_threshold=4, max_dropout_fraction=0.3)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "restwise.simulation.runner", "run", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "completed"
    assert (tmp_path / "runs" / "audit_key.pem").exists()  # DIR/../audit_key.pem
    (line,) = [json.loads(l) for l in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert line["status"] == "completed" and line["survived"] == 6 and line["epsilon"] > 0
    assert "epsilon" in proc.stdout


def test_runner_refuses_an_invalid_config_with_a_failed_state(tmp_path):
    run_dir = tmp_path / "run-bad000000001"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"name": "x", "rounds": 0, "population": 5}))
    proc = subprocess.run(
        [sys.executable, "-m", "restwise.simulation.runner", "run", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and "rounds" in state["reason"]
