"""Crash safety without Flower (fast): the runner's lock as the one liveness test, interrupted
runs, the report's write order (partial files, anchor, renames) and finishing a run from its
ledger, the service's cache reconciled from run folders, and a demo that never deletes an
earlier run. Real files, real signed ledgers, a real SQLite database, real processes killed
with SIGKILL. The same with the real runner and a real service: test_crash_matrix.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from restwise.privacy.events import GaussianRoundEvent
from restwise.privacy.ledger import load_audit_key, load_or_create_audit_key
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.release import BudgetDecision
from restwise.privacy.verify import verify_report
from restwise.server import db as dbm
from restwise.server.errors import RunFilesError
from restwise.server.rundir import (
    RunFiles,
    RunnerLock,
    finish_run,
    needs_finishing,
    open_ledger,
    runner_alive,
)
from restwise.server.runconfig import RunConfig
from restwise.server.runs import RunManager, RunStateError
from restwise.simulation.demo import demo_run_dir

CONFIG = {"name": "t", "dataset": "demo", "rounds": 4, "population": 4, "persons": 4, "sampling": "poisson",
          "sampling_rate": 1.0, "noise_multiplier": 1.5, "delta": 1e-5, "secagg_num_neighbours": 3, "secagg_threshold": 2}

HOLDER = textwrap.dedent(
    """
    import sys, time
    from restwise.server.rundir import RunnerLock
    lock = RunnerLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def within_any_budget(config, past_payloads):
    return BudgetDecision(projected_epsilon=0.0, budget_epsilon=None, delta=1e-5, rounds=int(config["rounds"]))


def _release(run_id: str, rnd: int, z: float = 1.5) -> GaussianRoundEvent:
    return GaussianRoundEvent(
        run_id=run_id, round=rnd, noise_multiplier=z, clip_norm=1.0, sampling="poisson", sampling_rate=1.0,
        cohort_size=4, population=4, adjacency="add_remove", planned_clients=4, survivors=4,
        noise_std_total=z, model_hash="ab" * 16,
    )


def _run_folder(runs_dir: Path, run_id: str, *, releases: int, status: str, **state) -> RunFiles:
    """A run folder as a runner leaves it: config, a ledger signed with the service's key
    (``runs/../audit_key.pem``), and state.json."""
    files = RunFiles(runs_dir / run_id)
    files.run_dir.mkdir(parents=True, exist_ok=True)
    files.write_config(RunConfig.from_dict(CONFIG))
    ledger = open_ledger(files.run_dir, files.read_config())
    for rnd in range(1, releases + 1):
        ledger.append(_release(run_id, rnd))
    files.write_state(status, current_round=releases, run_id=run_id, **state)
    return files


def _verify(run_dir: Path):
    """`audit verify` of the run folder's report, pinned to the service's key (the private key
    that signed the ledger: ``runs/audit_key.pem``)."""
    return verify_report(run_dir / "report.json", public_key=load_audit_key(run_dir.parent / "audit_key.pem").public_key())


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def manager(tmp_path):
    database = dbm.Database.open(dbm.default_database_url(tmp_path))
    mgr = RunManager(database, tmp_path / "runs", budget_check=within_any_budget, poll_interval_s=0.1)
    yield mgr
    mgr.shutdown(stop_runs=True)
    database.dispose()


def _launched(mgr: RunManager, releases: int, status: str, *, pid: int | None = None, **state) -> tuple[str, RunFiles]:
    """A run the service created and launched, whose folder then looks as given."""
    run_id = mgr.create("t", CONFIG, created_by="tok")["id"]
    files = _run_folder(mgr.runs_dir, run_id, releases=releases, status=status, **state)
    mgr._update(run_id, status="running", pid=pid, started_at=dbm.utcnow())
    return run_id, files


# -- liveness ----------------------------------------------------------------------------------
def test_the_lock_is_liveness_and_dies_with_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert not runner_alive(run_dir)  # no lock file: nobody ever ran it
    proc = _holder(run_dir)
    try:
        assert runner_alive(run_dir)
        with pytest.raises(RunFilesError, match="another runner"):
            RunnerLock(run_dir).acquire(wait_s=0.2)  # never two runners on one run
        assert f"pid {proc.pid}" in (run_dir / "runner.lock").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not runner_alive(run_dir)  # the kernel dropped the lock with the process
    with RunnerLock(run_dir) as lock:
        assert lock.held and runner_alive(run_dir)
    assert not runner_alive(run_dir)


def test_a_live_pid_of_another_process_is_not_a_running_run(manager):
    """After a reboot the run's old PID may belong to anything: the lock decides."""
    run_id, files = _launched(manager, 2, "running", pid=os.getpid())
    run = manager.get(run_id)
    assert run["status"] == "interrupted"
    assert "ended without recording an end after round 2" in run["reason"] and "stopped on request" not in run["reason"]
    assert files.read_state()["status"] == "interrupted"
    assert manager.latest_epsilons([run_id]) == {run_id: pytest.approx(run["epsilon_spent"])}
    assert run["releases"] == 2


def test_a_runner_outside_the_service_holding_the_lock_is_running_until_killed(manager):
    run_id, files = _launched(manager, 1, "running")
    proc = _holder(files.run_dir)
    try:
        assert manager.reconcile_all() == 1
        assert manager.get(run_id)["status"] == "running"
        # It releases a round while the service watches only through the folder.
        open_ledger(files.run_dir, files.read_config()).append(_release(run_id, 2))
        assert manager.get(run_id)["releases"] == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = manager.get(run_id)
    assert run["status"] == "interrupted" and "after round 1" in run["reason"]


def test_stop_on_a_dead_run_ends_it_truthfully_with_its_report(manager):
    run_id, files = _launched(manager, 2, "running", pid=os.getpid())
    (files.run_dir / "STOP").write_text("stop")  # asked before it died: still not "stopped on request"
    run = manager.stop(run_id)
    assert run["status"] == "stopped" and run["finished_at"]
    assert run["reason"].startswith("stopped on request while interrupted (no runner was running it;")
    assert "a stop had been requested" in run["reason"]
    result = _verify(files.run_dir)
    assert result.ok, result.problems
    assert result.releases == 2 and result.epsilon_recomputed == pytest.approx(run["epsilon_spent"])
    with pytest.raises(RunStateError):
        manager.stop(run_id)


def test_resume_relaunches_an_interrupted_run_and_refuses_others(manager, tmp_path):
    run_id, files = _launched(manager, 1, "running")
    manager.get(run_id)
    (files.run_dir / "STOP").write_text("stop")
    manager.command = lambda run_dir: [sys.executable, "-c", "import time; time.sleep(30)"]
    run = manager.resume(run_id)
    assert run["status"] == "pending" and run["finished_at"] is None
    assert "resumed by the service after round 1 (1 release(s) already in its ledger; was interrupted" in run["reason"]
    assert files.read_state()["status"] == "pending" and not (files.run_dir / "STOP").exists()
    with pytest.raises(RunStateError):
        manager.resume(run_id)  # it is running again
    manager._procs[run_id].kill()
    manager._procs[run_id].wait()
    run = manager.get(run_id)  # gone before its first round: interrupted again, saying how
    assert run["status"] == "interrupted" and "killed by SIGKILL" in run["reason"]


# -- the report's write order and finishing ------------------------------------------------------
class Crash(Exception):
    pass


def _crash_at(point: str):
    def step(name: str) -> None:
        if name == point:
            raise Crash(name)
    return step


@pytest.mark.parametrize("point", ["report-written", "report-anchored"])
def test_a_crash_inside_the_report_never_leaves_an_unattested_report(tmp_path, point):
    from restwise.privacy.report import write_run_report

    files = _run_folder(tmp_path / "runs", "run-000000000001", releases=3, status="finishing", outcome="completed")
    with pytest.raises(Crash):
        write_run_report(files.run_dir, on_step=_crash_at(point))
    assert not (files.run_dir / "report.json").exists()  # never a report the ledger does not attest
    assert (files.run_dir / ".partial-report.json").exists()
    assert needs_finishing(files.run_dir)
    state = finish_run(files.run_dir)
    assert state["status"] == "completed" and state["report_sha256"]
    assert not list(files.run_dir.glob(".partial-*"))
    result = _verify(files.run_dir)
    assert result.ok, result.problems
    assert result.releases == 3
    anchors = [e for e in open_ledger(files.run_dir, files.read_config()).entries() if e.kind == "report_issued"]
    # Anchored partial files are renamed, not issued again; unanchored ones are rebuilt.
    assert len(anchors) == 1
    assert not needs_finishing(files.run_dir)


def test_an_ended_run_without_its_report_is_finished_by_the_service(manager):
    """"completed" written before the report (an older Restwise) and then a crash: the
    service rebuilds the report from the ledger and anchors it."""
    run_id, files = _launched(manager, 3, "completed", pid=None)
    with open(files.ledger, "ab") as fh:
        fh.write(b'{"seq": 4, "kind": "gaussian_r')  # and a torn last line from the crash
    assert needs_finishing(files.run_dir)
    run = manager.get(run_id)
    assert run["status"] == "completed"
    result = _verify(files.run_dir)
    assert result.ok and result.releases == 3
    assert (files.run_dir / "ledger.jsonl.torn-1").read_bytes() == b'{"seq": 4, "kind": "gaussian_r'  # moved aside, kept
    expected = PrivacyAccountant().epsilon([_release(run_id, r) for r in (1, 2, 3)], 1e-5).epsilon
    assert run["epsilon_spent"] == pytest.approx(expected) and result.epsilon_recomputed == pytest.approx(expected)


def test_a_report_older_than_the_ledger_is_not_current(tmp_path):
    files = _run_folder(tmp_path / "runs", "run-000000000002", releases=1, status="finishing", outcome="stopped")
    finish_run(files.run_dir)
    assert not needs_finishing(files.run_dir)
    # Resumed later, one more release: the old report no longer covers the run.
    open_ledger(files.run_dir, files.read_config()).append(_release("run-000000000002", 2))
    files.write_state("stopped", current_round=2, run_id="run-000000000002")
    assert needs_finishing(files.run_dir)
    finish_run(files.run_dir)
    result = _verify(files.run_dir)
    assert result.ok and result.releases == 2


# -- one source of truth ---------------------------------------------------------------------------
def test_person_budget_reads_every_release_of_the_ledgers_not_the_cache(tmp_path):
    """A run the service knew as interrupted with 1 release was resumed outside it (3 more):
    the person-budget check composes all 4."""
    from restwise.server.runs import BudgetCheck

    database = dbm.Database.open(dbm.default_database_url(tmp_path))
    mgr = RunManager(database, tmp_path / "runs", budget_check=BudgetCheck(person_epsilon_cap=1000.0))
    try:
        earlier, files = _launched(mgr, 1, "running")
        assert mgr.get(earlier)["status"] == "interrupted" and mgr.get(earlier)["releases"] == 1
        ledger = open_ledger(files.run_dir, files.read_config())
        for rnd in (2, 3, 4):  # what the CLI runner appends while the service does not look
            ledger.append(_release(earlier, rnd))
        later = mgr.create("t", CONFIG, created_by="tok")["id"]
        decision = mgr.check_budget(later)
        four = PrivacyAccountant().epsilon([_release(earlier, r) for r in (1, 2, 3, 4)], 1e-5).epsilon
        assert decision.person_spent_epsilon == pytest.approx(four, rel=1e-9)
        assert mgr.get(earlier, refresh=False)["releases"] == 4
    finally:
        database.dispose()


# -- evidence is never deleted -------------------------------------------------------------------------
def test_rerunning_the_demo_continues_it_or_starts_a_new_run_beside_it(tmp_path):
    load_or_create_audit_key(tmp_path / "audit_key.pem")
    assert demo_run_dir(tmp_path) == tmp_path / "run-demo"
    files = _run_folder(tmp_path, "run-demo", releases=2, status="running")
    assert demo_run_dir(tmp_path) == tmp_path / "run-demo"  # not ended: continued
    files.write_state("finishing", current_round=2, run_id="run-demo", outcome="completed")
    assert demo_run_dir(tmp_path) == tmp_path / "run-demo"  # ended half-way: finished
    finish_run(files.run_dir)
    ledger_bytes = files.ledger.read_bytes()
    assert demo_run_dir(tmp_path) == tmp_path / "run-demo-2"  # ended: a new run beside it
    assert files.ledger.read_bytes() == ledger_bytes


def test_no_production_code_deletes_a_run_folder():
    root = Path(__file__).resolve().parents[1]
    for sub in ("server", "simulation", "privacy"):
        for path in (root / sub).rglob("*.py"):
            assert "rmtree" not in path.read_text(encoding="utf-8"), path


def test_finishing_without_the_audit_key_fails_closed(manager):
    """A missing signing key is never replaced by a new one: the run stays unfinished, saying why."""
    run_id, files = _launched(manager, 2, "finishing", outcome="completed")
    key = manager.runs_dir / "audit_key.pem"
    key.rename(key.with_suffix(".away"))
    run = manager.get(run_id)
    assert run["status"] == "interrupted" and run["reason"].startswith("its end could not be written (")
    assert not key.exists() and not (files.run_dir / "report.json").exists()
    key.with_suffix(".away").rename(key)  # the operator restores the key: stop ends it with its report
    assert manager.stop(run_id)["status"] == "stopped"
    assert _verify(files.run_dir).ok
