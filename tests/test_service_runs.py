"""Run management against the runner's file contract (state.json, rounds.jsonl, ledger.jsonl,
STOP/SIGTERM): processes are real subprocesses; the runner here is a small script that follows
the contract, so the watcher's behaviour (mirroring, stop, crash, restart) is tested exactly.
The real Flower runner is exercised end to end in test_service_flow.py."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from restwise.privacy.release import BudgetDecision
from restwise.server import db as dbm
from restwise.server.runs import RunManager, RunNotFoundError, RunStateError, read_jsonl

CONTRACT_RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    run_dir = Path(sys.argv[1]); mode = sys.argv[2]
    cfg = json.loads((run_dir / "config.json").read_text())
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *a: stop.update(now=True))
    def state(status, rnd, reason=None):
        tmp = run_dir / "state.json.tmp"
        tmp.write_text(json.dumps({"status": status, "current_round": rnd, "reason": reason}))
        os.replace(tmp, run_dir / "state.json")
    state("running", 0)
    if mode == "crash":
        sys.exit(3)
    for rnd in range(1, cfg["rounds"] + 1):
        if stop["now"] or (run_dir / "STOP").exists():
            state("stopped", rnd - 1, "stopped on request"); sys.exit(0)
        time.sleep(float(os.environ.get("ROUND_S", "0.05")))
        rec = {"round": rnd, "sampled": 4, "survived": 3, "dropped": 1, "train_loss": 1.0 / rnd,
               "epsilon": 0.5 * rnd, "delta": 1e-5, "noise_multiplier_effective": 1.1, "status": "completed"}
        with open(run_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\\n")
        with open(run_dir / "ledger.jsonl", "a") as f:
            f.write(json.dumps({"seq": rnd, "kind": "gaussian_round"}) + "\\n")
        state("running", rnd)
    state("completed", cfg["rounds"])
    """
)


def within_any_budget(config, past_payloads):
    """These tests exercise mirroring of the file contract, not budgets (the real budget check
    runs in test_service_flow.py and test_service_auth.py): every run is within budget here."""
    return BudgetDecision(projected_epsilon=0.0, budget_epsilon=None, delta=1e-5, rounds=int(config["rounds"]))


@pytest.fixture
def manager(tmp_path):
    script = tmp_path / "contract_runner.py"
    script.write_text(CONTRACT_RUNNER)
    mode = {"value": "ok"}

    def command(run_dir: Path):
        return [sys.executable, str(script), str(run_dir), mode["value"]]

    database = dbm.Database.open(dbm.default_database_url(tmp_path))
    mgr = RunManager(database, tmp_path / "runs", budget_check=within_any_budget, command=command, poll_interval_s=0.1)
    mgr.mode = mode
    yield mgr
    mgr.shutdown(stop_runs=True)


def _create(mgr, rounds=3):
    return mgr.create("t", {"rounds": rounds, "population": 4}, created_by="tok")["id"]


def test_run_is_mirrored_round_by_round_to_completion(manager):
    run_id = _create(manager, rounds=3)
    assert json.loads((manager.run_dir(run_id) / "config.json").read_text())["rounds"] == 3
    started = manager.start(run_id)
    assert started["status"] in ("pending", "running")
    done = manager.wait(run_id, 30)
    assert done["status"] == "completed" and done["current_round"] == 3 and done["finished_at"]
    rounds = manager.rounds(run_id)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["epsilon"] for r in rounds] == [0.5, 1.0, 1.5]
    assert rounds[1]["train_loss"] == pytest.approx(0.5) and rounds[0]["survived"] == 3
    assert [e["seq"] for e in manager.ledger(run_id)] == [1, 2, 3]
    with pytest.raises(RunStateError):
        manager.start(run_id)
    with pytest.raises(RunStateError):
        manager.stop(run_id)


def test_stop_ends_a_running_run(manager, monkeypatch):
    monkeypatch.setenv("ROUND_S", "0.5")
    manager.env = None  # inherit the patched environment
    run_id = _create(manager, rounds=50)
    manager.start(run_id)
    deadline = time.monotonic() + 20
    while manager.get(run_id)["current_round"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    manager.stop(run_id)
    assert (manager.run_dir(run_id) / "STOP").exists()
    done = manager.wait(run_id, 20)
    assert done["status"] == "stopped" and 1 <= done["current_round"] < 50


def test_runner_crash_is_reported_as_interrupted_with_what_was_seen(manager):
    manager.mode["value"] = "crash"
    run_id = _create(manager)
    manager.start(run_id)
    done = manager.wait(run_id, 20)
    assert done["status"] == "interrupted"
    assert "exited with code 3" in done["reason"] and "after round 0" in done["reason"]
    # The run folder says so too (not "running" forever).
    state = json.loads((manager.run_dir(run_id) / "state.json").read_text())
    assert state["status"] == "interrupted" and state["reason"] == done["reason"]


def test_restarted_service_marks_orphaned_runs_interrupted(manager, tmp_path):
    run_id = _create(manager)
    run_dir = manager.run_dir(run_id)
    (run_dir / "state.json").write_text(json.dumps({"status": "running", "current_round": 2, "reason": None}))
    manager._update(run_id, status="running", pid=os.getpid())  # a live PID owned by another process
    fresh = RunManager(manager.db, manager.runs_dir, budget_check=within_any_budget)
    assert fresh.reconcile_all() == 1
    run = fresh.get(run_id, refresh=False)
    assert run["status"] == "interrupted" and "after round 2" in run["reason"]
    assert "stopped on request" not in run["reason"]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "interrupted"


def test_unknown_and_malformed_run_ids(manager):
    for bad in ("run-000000000000", "../etc", "run-ZZ", ""):
        with pytest.raises(RunNotFoundError):
            manager.get(bad)
    assert manager.report_file(_create(manager), "../config.json") is None


def test_half_written_lines_wait_for_the_next_poll(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "epsi')
    assert read_jsonl(path) == [{"round": 1}]
    path.write_text('{"round": 1}\n{"round": 2}\n')
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_progress_note_is_cleared_when_the_runner_clears_it(manager):
    run_id = _create(manager)
    run_dir = manager.run_dir(run_id)
    manager._update(run_id, status="running", pid=None)
    (run_dir / "state.json").write_text(json.dumps({"status": "running", "reason": "preparing the simulated devices", "current_round": 0}))
    manager._procs[run_id] = _FakeAlive()
    assert manager.get(run_id)["reason"] == "preparing the simulated devices"
    (run_dir / "state.json").write_text(json.dumps({"status": "running", "reason": None, "current_round": 1}))
    run = manager.get(run_id)
    assert run["reason"] is None and run["current_round"] == 1
    manager._procs.pop(run_id)


class _FakeAlive:
    """Stands in for a Popen whose process is still running (only poll() is read)."""

    returncode = None

    def poll(self):
        return None


def test_latest_epsilon_is_the_ledgers_not_the_round_metrics(manager):
    """The contract runner's round lines claim ε 0.5 per round, but its ledger lines are no
    signed releases: what a run spent is composed from its ledger alone."""
    run_id = _create(manager, rounds=3)
    manager.start(run_id)
    manager.wait(run_id, 30)
    other = _create(manager)
    assert [r["epsilon"] for r in manager.rounds(run_id)] == [0.5, 1.0, 1.5]
    assert manager.get(run_id)["releases"] == 0
    assert manager.latest_epsilons([run_id, other]) == {}
    assert manager.latest_epsilons([]) == {}
