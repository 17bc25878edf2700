"""Run management: create, launch, watch and stop training runs.

A run is a folder ``<data_dir>/runs/<run_id>/`` and a row in the database. Launching starts
the run's executor as a separate process - by default the simulation runner
(``python -m restwise.simulation.runner run --run-dir DIR``), or a deployment's own command
(``Settings.runner_command``). The service never imports the simulation: it names a command.
The executor reads ``config.json`` and writes, as it goes (``server/rundir.py``):

    state.json      {"status": pending|running|completed|failed|stopped|refused,
                     "reason": ..., "current_round": n}
    rounds.jsonl    one line per round: round, sampled, survived, dropped, train_loss,
                    epsilon, delta, noise_multiplier_effective, status
    ledger.jsonl    the run's signed privacy ledger
    report.json, report.html   at the end

Stopping writes ``DIR/STOP`` (no signal: see ``stop``). A watcher thread mirrors those files into the
database so the API and the dashboard read one place; every read of a single run also
refreshes it first, so what a client sees is never older than the files.

The run folders are the truth, the database is their cache. Every run is reconciled from its
folder at start-up (``reconcile_all``), whenever its files change - however it ended, and also
when a runner outside the service (``python -m restwise.simulation.runner``) resumed it - and,
for every run over the same dataset, before a person-budget check. ``releases`` and
``epsilon_spent`` of a run are composed from its signed ledger, never from round metrics.

Liveness is the runner's lock (``rundir.RunnerLock``: a flock on ``DIR/runner.lock``), or the
service's own handle on a process it launched; never a PID. A run whose runner is gone without
recording an end becomes "interrupted" with what was seen (state.json too); ``resume`` continues
it (or a failed run) from its checkpoint, ``stop`` ends it with its report. A run left
"finishing" by a crash is finished by the service itself (report rebuilt from the ledger and
anchored) when no runner holds its lock.

The service itself never trains or accounts anything: it refuses to *start* a run whose
projected ε for all planned rounds exceeds its budget (``BudgetRefusedError``), with the one
release planner (``privacy.release.check_plan``) the ServerApp uses to re-check before every
round.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlalchemy as sa

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.errors import PrivacyError
from restwise.privacy.events import GaussianRoundEvent, event_from_dict
from restwise.privacy.release import BudgetDecision, check_plan
from restwise.server import db as dbm
from restwise.server.errors import (
    AccountingRefusedError,
    BudgetRefusedError,
    RunNotFoundError,
    RunStateError,
)
from restwise.server.rundir import RunFiles, RunnerLock, finish_run, needs_finishing, note_interruption, runner_alive
from restwise.server.runstatus import ACTIVE_STATUSES as ACTIVE
from restwise.server.runstatus import RESUMABLE_STATUSES as RESUMABLE
from restwise.server.runstatus import TERMINAL_STATUSES as TERMINAL
from restwise.server.runconfig import RunConfig

RUN_ID_RE = re.compile(r"^run-[0-9a-f]{12}$")
ROUND_FIELDS = (
    "status",
    "sampled",
    "survived",
    "dropped",
    "train_loss",
    "epsilon",
    "delta",
    "noise_multiplier_effective",
)
# Files an auditor may fetch from a run folder. Anything else is not served, whatever its name.
REPORT_FILES = {
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
    "ledger.jsonl": "application/x-ndjson",
    "public_key.pem": "application/x-pem-file",
}
RUNNER_MODULE = "restwise.simulation.runner"
_log = logging.getLogger(__name__)


class BudgetCheck:
    """The start-time budget check: ε after all planned rounds, from the release planner
    (``privacy.release.check_plan``), against the run's budget (its ``target_epsilon``) and
    the service-wide cap - the smaller wins; a run given a ``noise_multiplier`` instead of a
    target is bounded by the cap only. With ``person_epsilon_cap``, the run's releases are
    also composed with every earlier release over the same dataset (scope "person")."""

    def __init__(self, epsilon_cap: float | None = None, person_epsilon_cap: float | None = None):
        self.epsilon_cap = epsilon_cap
        self.person_epsilon_cap = person_epsilon_cap

    def __call__(self, config: dict[str, Any], past_payloads: Sequence[dict[str, Any]] = ()) -> BudgetDecision:
        run = RunConfig.from_dict(config)
        # The cap in force: the run's own (max_epsilon; default DEFAULT_MAX_EPSILON) and the
        # service's, the smaller winning. Both are charged the epsilon against the sampler.
        caps = [float(v) for v in (self.epsilon_cap, run.max_epsilon) if v is not None]
        return check_plan(
            run.release_policy(), epsilon_cap=min(caps),
            person_epsilon_cap=self.person_epsilon_cap, past_releases=past_payloads,
        )


def runner_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", RUNNER_MODULE, "run", "--run-dir", str(run_dir)]


def command_factory(prefix: Sequence[str] = ()) -> Callable[[Path], list[str]]:
    """``prefix --run-dir DIR`` (a deployment's own runner), or the default runner."""
    if not prefix:
        return runner_command
    return lambda run_dir: [*prefix, "--run-dir", str(run_dir)]


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or caught mid-write: try again next poll
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = text.split("\n")
    # A last line without its newline may be half-written: it is read on a later poll.
    lines = lines[:-1]
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except ValueError:
            break
        if isinstance(item, dict):
            out.append(item)
    return out


def _num(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


class RunManager:
    """Owns run folders, runner processes and their mirror in the database."""

    def __init__(
        self,
        database: dbm.Database,
        runs_dir: Path,
        *,
        budget_check: Callable[[dict[str, Any], Sequence[dict[str, Any]]], BudgetDecision],
        command: Callable[[Path], Sequence[str]] = runner_command,
        poll_interval_s: float = 0.5,
        env: dict[str, str] | None = None,
    ):
        self.db = database
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.budget_check = budget_check
        self.command = command
        self.poll_interval_s = poll_interval_s
        self.env = env
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple] = {}  # run id -> its files' signature when last reconciled
        self._end_checked: dict[str, tuple] = {}  # run id -> signature when its end was last checked

    # -- queries ----------------------------------------------------------------------
    def get(self, run_id: str, *, refresh: bool = True) -> dict[str, Any]:
        if not RUN_ID_RE.match(run_id):
            raise RunNotFoundError(run_id)
        if refresh:
            self.refresh(run_id)
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(dbm.runs).where(dbm.runs.c.id == run_id)).mappings().first()
        if row is None:
            raise RunNotFoundError(run_id)
        return self._public(row)

    def list(self, *, limit: int = 100, offset: int = 0, status: str | None = None) -> list[dict[str, Any]]:
        self.refresh_active()
        q = sa.select(dbm.runs).order_by(dbm.runs.c.created_at.desc(), dbm.runs.c.id).limit(limit).offset(offset)
        if status:
            q = q.where(dbm.runs.c.status == status)
        with self.db.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [self._public(r) for r in rows]

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        self.get(run_id)
        with self.db.engine.connect() as conn:
            rows = (
                conn.execute(sa.select(dbm.rounds).where(dbm.rounds.c.run_id == run_id).order_by(dbm.rounds.c.round))
                .mappings()
                .all()
            )
        return [{k: v for k, v in r.items() if k != "run_id"} for r in rows]

    def latest_epsilons(self, run_ids: Sequence[str]) -> dict[str, float]:
        """ε spent so far by each of ``run_ids`` that released anything: composed over every
        release its signed ledger records (reconciled), not read from round metrics."""
        if not run_ids:
            return {}
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dbm.runs.c.id, dbm.runs.c.epsilon_spent)
                .where(dbm.runs.c.id.in_(list(run_ids)), dbm.runs.c.epsilon_spent.is_not(None),
                       dbm.runs.c.releases > 0)
            ).all()
        return {run_id: eps for run_id, eps in rows}

    def ledger(self, run_id: str) -> list[dict[str, Any]]:
        self.get(run_id)
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dbm.ledger_entries.c.entry_json)
                .where(dbm.ledger_entries.c.run_id == run_id)
                .order_by(dbm.ledger_entries.c.seq)
            ).all()
        return [json.loads(r[0]) for r in rows]

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID_RE.match(run_id):
            raise RunNotFoundError(run_id)
        return self._run_dir(run_id)

    def report_file(self, run_id: str, name: str) -> tuple[Path, str] | None:
        """(path, media type) of an allow-listed file of the run, or None if absent/unknown.
        The name is looked up in a fixed table, never joined onto a path as given."""
        media = REPORT_FILES.get(name)
        if media is None:
            return None
        path = self.run_dir(run_id) / name
        if not path.is_file():
            return None
        return path, media

    @staticmethod
    def _public(row: Any) -> dict[str, Any]:
        out = dict(row)
        out["config"] = json.loads(out.pop("config_json"))
        out.pop("run_dir", None)
        out.pop("pid", None)
        return out

    # -- commands ---------------------------------------------------------------------
    def create(self, name: str, config: dict[str, Any], created_by: str) -> dict[str, Any]:
        run_id = f"run-{secrets.token_hex(6)}"
        run_dir = self.runs_dir / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        with self.db.engine.begin() as conn:
            conn.execute(
                dbm.runs.insert().values(
                    id=run_id,
                    name=name,
                    config_json=json.dumps(config, sort_keys=True),
                    status="created",
                    reason=None,
                    current_round=0,
                    planned_rounds=int(config.get("rounds", 0)),
                    created_at=dbm.utcnow(),
                    created_by=created_by,
                    run_dir=str(run_dir),
                )
            )
        return self.get(run_id, refresh=False)

    def check_budget(self, run_id: str) -> BudgetDecision:
        run = self.get(run_id, refresh=False)
        return self.budget_check(run["config"], self.past_release_payloads(run_id))

    def past_release_payloads(self, run_id: str) -> list[dict[str, Any]]:
        """The release events (ledger payloads) of every *other* run over the same dataset:
        the same persons, so their privacy loss composes with this run's (person budget).
        Every such run's ledger is reconciled from its folder first: a release made while the
        service was not watching (a run resumed by the CLI runner) counts."""
        run = self.get(run_id, refresh=False)
        dataset = run["config"].get("dataset")
        self.reconcile_ledgers(lambda config: config.get("dataset") == dataset)
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dbm.runs.c.id, dbm.runs.c.config_json, dbm.ledger_entries.c.entry_json)
                .select_from(dbm.ledger_entries.join(dbm.runs, dbm.ledger_entries.c.run_id == dbm.runs.c.id))
                .where(dbm.runs.c.id != run_id)
                .order_by(dbm.ledger_entries.c.run_id, dbm.ledger_entries.c.seq)
            ).all()
        out = []
        for other_id, config_json, entry_json in rows:
            if json.loads(config_json).get("dataset") != dataset:
                continue
            entry = json.loads(entry_json)
            payload = entry.get("payload") if isinstance(entry, dict) else None
            if isinstance(payload, dict) and payload.get("kind") == "gaussian_round":
                out.append(payload)
        return out

    def start(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            run = self.get(run_id)
            if run["status"] != "created":
                raise RunStateError(run_id, run["status"], "start")
            try:
                decision = self.check_budget(run_id)
            except PrivacyError as exc:  # the accountant refuses what it cannot account tightly
                err = AccountingRefusedError(run_id, str(exc))
                self._update(run_id, status="refused", reason=str(err)[:2000], finished_at=dbm.utcnow())
                raise err from None
            finite = math.isfinite(decision.projected_epsilon)
            self._update(run_id, projected_epsilon=decision.projected_epsilon if finite else None,
                         epsilon_cap=decision.detail.get("epsilon_cap"))  # the cap in force at start
            if not decision.allowed:
                err = BudgetRefusedError(run_id, decision)
                self._update(run_id, status="refused", reason=str(err), finished_at=dbm.utcnow())
                raise err
            proc = self._launch(run_id)
            self._update(run_id, status="pending", pid=proc.pid, started_at=dbm.utcnow(), reason=None)
        return self.get(run_id)

    def _launch(self, run_id: str) -> subprocess.Popen:
        run_dir = self._run_dir(run_id)
        log = open(run_dir / "runner.log", "ab")
        try:
            proc = subprocess.Popen(
                list(self.command(run_dir)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to the service does not kill the run
                env=self.env,
                cwd=str(run_dir),
            )
        finally:
            log.close()
        self._procs[run_id] = proc
        return proc

    def resume(self, run_id: str) -> dict[str, Any]:
        """Continue an interrupted or failed run from its last checkpoint: rounds already
        released are not run again (a round released but not checkpointed is re-run as a new,
        separately accounted attempt: the ledger says so). The budget is checked again first,
        against every run's reconciled ledger: a refusal leaves the run as it was."""
        with self._lock:
            run = self.get(run_id)
            if run["status"] not in RESUMABLE:
                raise RunStateError(run_id, run["status"], "resume")
            run_dir = self._run_dir(run_id)
            try:
                decision = self.check_budget(run_id)
            except PrivacyError as exc:
                raise AccountingRefusedError(run_id, str(exc)) from None
            if not decision.allowed:
                raise BudgetRefusedError(run_id, decision)
            lock = RunnerLock(run_dir)
            lock.acquire(wait_s=0.5, record=False)  # RunFilesError: a runner outside the service has it
            try:
                files = RunFiles(run_dir)
                state = files.read_state()
                releases = run.get("releases") or 0
                reason = (f"resumed by the service after round {int(state.get('current_round', 0) or 0)} "
                          f"({releases} release(s) already in its ledger; was {run['status']}: {run['reason'] or 'no reason'})")
                files.stop_file.unlink(missing_ok=True)  # an explicit resume overrides an old stop request
                files.write_state("pending", reason=reason[:2000], current_round=int(state.get("current_round", 0) or 0),
                                  **{k: v for k, v in state.items()
                                     if k not in ("status", "reason", "current_round", "updated_at", "outcome",
                                                  "outcome_reason", "report_sha256")})
            finally:
                lock.release()
            proc = self._launch(run_id)
            self._update(run_id, status="pending", pid=proc.pid, reason=reason[:2000], finished_at=None)
        return self.get(run_id)

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ask a running run to stop after its round in progress. A run whose runner is gone
        (interrupted) is ended here and now as stopped, with its report over exactly the
        rounds its ledger records - and a reason that says its runner was not running."""
        with self._lock:
            run = self.get(run_id)
            if run["status"] in TERMINAL:
                raise RunStateError(run_id, run["status"], "stop")
            run_dir = self._run_dir(run_id)
            if run["status"] == "interrupted":
                reason = f"stopped on request while interrupted (no runner was running it; {run['reason'] or 'no reason'})"
                self._finish(run_id, run_dir, "stopped", reason[:2000])
                return self.get(run_id)
            # The STOP file only, no signal: the runner reads it between rounds. A SIGTERM
            # would reach Ray's own handler inside the simulation runner, which aborts the
            # process mid-round (measured: "killed by SIGABRT", no report).
            (run_dir / "STOP").write_text("stop requested by the service\n", encoding="utf-8")
            if run["status"] == "created":
                self._update(run_id, status="stopped", reason="stopped before it started", finished_at=dbm.utcnow())
        return self.get(run_id)

    def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        """Block until the run ends or is interrupted, or the timeout passes (tests, CLI)."""
        deadline = threading.Event()
        waited = 0.0
        while waited < timeout_s:
            run = self.get(run_id)
            if run["status"] in TERMINAL or run["status"] == "interrupted":
                return run
            deadline.wait(0.2)
            waited += 0.2
        return self.get(run_id)

    # -- watching ---------------------------------------------------------------------
    def _run_dir(self, run_id: str) -> Path:
        with self.db.engine.connect() as conn:
            value = conn.execute(sa.select(dbm.runs.c.run_dir).where(dbm.runs.c.id == run_id)).scalar()
        if value is None:
            raise RunNotFoundError(run_id)
        return Path(value)

    def _update(self, run_id: str, **values: Any) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(dbm.runs.update().where(dbm.runs.c.id == run_id).values(**values))

    def refresh_active(self) -> None:
        with self.db.engine.connect() as conn:
            ids = conn.execute(sa.select(dbm.runs.c.id).where(dbm.runs.c.status.in_(ACTIVE))).scalars().all()
        for run_id in ids:
            self.refresh(run_id)

    def reconcile_all(self, *, only_changed: bool = False) -> int:
        """Reconcile every launched run from its folder (at start-up; then, with
        ``only_changed``, those whose files or lock changed since). Returns how many."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dbm.runs.c.id, dbm.runs.c.run_dir).where(dbm.runs.c.status != "created")
            ).all()
        done = 0
        for run_id, run_dir in rows:
            signature = _files_signature(Path(run_dir))
            if only_changed and self._seen.get(run_id) == signature:
                continue
            try:
                self.refresh(run_id)
            except Exception:  # noqa: BLE001 - one unreadable run folder must not hide the others
                _log.exception("run %s could not be reconciled from its folder", run_id)
                continue
            self._seen[run_id] = _files_signature(Path(run_dir))
            done += 1
        return done

    def reconcile_ledgers(self, select: Callable[[dict[str, Any]], bool]) -> None:
        """Mirror the ledgers of every launched run whose configuration ``select`` accepts."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dbm.runs.c.id, dbm.runs.c.run_dir, dbm.runs.c.config_json).where(dbm.runs.c.status != "created")
            ).all()
        for run_id, run_dir, config_json in rows:
            if select(json.loads(config_json)):
                self._mirror_ledger(run_id, Path(run_dir))

    def _alive(self, run_id: str, run_dir: Path) -> tuple[bool, subprocess.Popen | None]:
        """(a runner is running the run, the service's exited process handle if any)."""
        proc = self._procs.get(run_id)
        if proc is not None and proc.poll() is None:
            return True, None
        return runner_alive(run_dir), proc

    def refresh(self, run_id: str) -> None:
        """Reconcile the database's row of the run from its folder: rounds, the signed
        ledger (and ε composed from it), state.json, and whether a runner is running it."""
        with self._lock:
            with self.db.engine.connect() as conn:
                row = conn.execute(sa.select(dbm.runs).where(dbm.runs.c.id == run_id)).mappings().first()
            if row is None or row["status"] == "created":
                return
            run_dir = Path(row["run_dir"])
            self._mirror_rounds(run_id, run_dir)
            self._mirror_ledger(run_id, run_dir)
            alive, exited = self._alive(run_id, run_dir)
            if not alive:
                if exited is not None:
                    self._procs.pop(run_id, None)
                self._settle(run_id, run_dir, row, exited)
                self._mirror_rounds(run_id, run_dir)
                self._mirror_ledger(run_id, run_dir)
            state = read_json(run_dir / "state.json")
            values: dict[str, Any] = {}
            if isinstance(state, dict):
                status = state.get("status")
                if status in TERMINAL | ACTIVE | {"interrupted"}:
                    if alive and status not in ACTIVE | TERMINAL:
                        status = "running"  # a runner holds the lock: it is about to say so
                    if status != row["status"]:
                        values["status"] = status
                elif alive and row["status"] not in ACTIVE:
                    values["status"] = "running"
                if "reason" in state:  # null clears a progress note such as "preparing devices"
                    reason = state["reason"][:2000] if isinstance(state["reason"], str) else None
                    if reason != row["reason"]:
                        values["reason"] = reason
                current = _num(state.get("current_round"), int)
                if current is not None and current != row["current_round"]:
                    values["current_round"] = current
            status = values.get("status", row["status"])
            if status in TERMINAL and not row["finished_at"]:
                values["finished_at"] = dbm.utcnow()
            elif status not in TERMINAL and row["finished_at"]:
                values["finished_at"] = None  # resumed (e.g. by the CLI runner)
            if values:
                self._update(run_id, **values)

    def _settle(self, run_id: str, run_dir: Path, row: Any, exited: subprocess.Popen | None) -> None:
        """No runner is running the run: make its folder say how it really stands. A run
        left "running" is interrupted (state.json says so, with what was seen); a run left
        "finishing" (or ended without its anchored report) is finished here."""
        state = read_json(run_dir / "state.json")
        status = state.get("status") if isinstance(state, dict) else None
        if status is None and row["status"] in ACTIVE and not (run_dir / "state.json").exists():
            # Launched, but the runner never wrote a state and is gone.
            try:
                with RunnerLock(run_dir).acquire(wait_s=0.2, record=False):
                    RunFiles(run_dir).write_state(
                        "interrupted", reason=f"interrupted: the runner {_exit_words(exited)} before it wrote any state")
            except Exception:  # noqa: BLE001 - a runner took the lock meanwhile: it is alive
                return
        elif status == "running" or (status == "pending" and row["status"] in ACTIVE):
            # "pending": launched (or resumed) by the service, gone before its first round.
            try:
                with RunnerLock(run_dir).acquire(wait_s=0.2, record=False):
                    note_interruption(RunFiles(run_dir), found_by=f"the service; the runner {_exit_words(exited)}",
                                      statuses=("running", "pending"))
            except Exception:  # noqa: BLE001 - a runner took the lock meanwhile: it is alive
                return
        elif status == "finishing":
            self._finish(run_id, run_dir, None, None)
        elif status in TERMINAL:
            # Ended without its anchored report (a crash under an older Restwise, or a report
            # damaged since): checked once per change of the folder, not on every read.
            signature = _files_signature(run_dir)
            if self._end_checked.get(run_id) != signature:
                self._end_checked[run_id] = signature
                if needs_finishing(run_dir):
                    self._finish(run_id, run_dir, None, None)

    def _finish(self, run_id: str, run_dir: Path, status: str | None, reason: str | None) -> None:
        """End the run here (the service holds the run's lock meanwhile): report rebuilt from
        the ledger and anchored, then the state. A failure leaves it interrupted, saying why."""
        try:
            with RunnerLock(run_dir).acquire(wait_s=0.5, record=False):
                finish_run(run_dir, status, reason)
        except Exception as exc:  # noqa: BLE001 - recorded on the run, never lost
            _log.warning("run %s could not be finished: %s: %s", run_id, type(exc).__name__, exc)
            reason = f"its end could not be written ({type(exc).__name__}: {exc}); resume or stop it once fixed"[:2000]
            try:  # the folder says so too, or the next look would try again and again
                with RunnerLock(run_dir).acquire(wait_s=0.5, record=False):
                    files = RunFiles(run_dir)
                    files.write_state("interrupted", reason=reason, current_round=int(files.read_state().get("current_round", 0) or 0))
            except Exception:  # noqa: BLE001 - a runner holds it again: it will finish the run
                return
            self._update(run_id, status="interrupted", reason=reason)
            return
        state = read_json(run_dir / "state.json") or {}
        self._update(run_id, status=state.get("status", status), reason=state.get("reason", reason), finished_at=dbm.utcnow())
        self._mirror_ledger(run_id, run_dir)

    def _mirror_rounds(self, run_id: str, run_dir: Path) -> None:
        records = read_jsonl(run_dir / "rounds.jsonl")
        if not records:
            return
        with self.db.engine.begin() as conn:
            known = {
                r[0]: r[1]
                for r in conn.execute(
                    sa.select(dbm.rounds.c.round, dbm.rounds.c.status).where(dbm.rounds.c.run_id == run_id)
                ).all()
            }
            for rec in records:
                rnd = _num(rec.get("round"), int)
                if rnd is None or rnd < 0:
                    continue
                values = {
                    "status": str(rec.get("status"))[:20] if rec.get("status") is not None else None,
                    "sampled": _num(rec.get("sampled"), int),
                    "survived": _num(rec.get("survived"), int),
                    "dropped": _num(rec.get("dropped"), int),
                    "train_loss": _num(rec.get("train_loss"), float),
                    "epsilon": _num(rec.get("epsilon"), float),
                    "delta": _num(rec.get("delta"), float),
                    "noise_multiplier_effective": _num(rec.get("noise_multiplier_effective"), float),
                }
                if rnd in known:
                    conn.execute(
                        dbm.rounds.update()
                        .where(dbm.rounds.c.run_id == run_id, dbm.rounds.c.round == rnd)
                        .values(**values)
                    )
                else:
                    conn.execute(dbm.rounds.insert().values(run_id=run_id, round=rnd, **values))
                    known[rnd] = values["status"]

    def _mirror_ledger(self, run_id: str, run_dir: Path) -> None:
        """Mirror new ledger entries; when any arrived, compose the run's ε over all of its
        releases again (the cached ``releases`` and ``epsilon_spent``)."""
        entries = read_jsonl(run_dir / "ledger.jsonl")
        if not entries:
            return
        with self.db.engine.begin() as conn:
            have = conn.execute(
                sa.select(sa.func.count()).select_from(dbm.ledger_entries).where(dbm.ledger_entries.c.run_id == run_id)
            ).scalar() or 0
            if have >= len(entries):
                return
            for seq, entry in enumerate(entries):
                if seq < have:
                    continue  # append-only: entries already mirrored never change
                conn.execute(
                    dbm.ledger_entries.insert().values(run_id=run_id, seq=seq, entry_json=json.dumps(entry, sort_keys=True))
                )
            config = json.loads(conn.execute(sa.select(dbm.runs.c.config_json).where(dbm.runs.c.id == run_id)).scalar() or "{}")
            releases, epsilon = ledger_epsilon(entries, run_id, config.get("delta"))
            conn.execute(dbm.runs.update().where(dbm.runs.c.id == run_id).values(releases=releases, epsilon_spent=epsilon))

    def start_watching(self) -> None:
        """Reconcile every run from its folder (runs a crash left "running" become
        interrupted; runs left "finishing" are finished), then watch."""
        if self._thread is not None:
            return
        self.reconcile_all()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_loop, name="restwise-run-watcher", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh_active()
                self.reconcile_all(only_changed=True)
            except Exception:  # noqa: BLE001 - a transient DB/file error must not kill the watcher
                continue

    def shutdown(self, *, stop_runs: bool = False) -> None:
        self.stop_watching()
        if stop_runs:
            for run_id, proc in list(self._procs.items()):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def _exit_words(proc: subprocess.Popen | None) -> str:
    """How a runner the service launched ended, in words (or that no process was watched)."""
    if proc is None or proc.returncode is None:
        return "was not running (no process held the run's lock)"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"was killed by {name}"
    return f"exited with code {proc.returncode}"


def _files_signature(run_dir: Path) -> tuple:
    """What changes when a run's folder does: state, ledger and rounds files, and the lock."""
    out: list[Any] = []
    for name in ("state.json", "ledger.jsonl", "rounds.jsonl"):
        try:
            st = (run_dir / name).stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    out.append(runner_alive(run_dir))
    return tuple(out)


def ledger_epsilon(entries: Sequence[dict[str, Any]], run_id: str, delta: Any) -> tuple[int, float | None]:
    """(releases, ε) of ``run_id`` from its ledger entries: every ``gaussian_round`` event,
    composed at ``delta`` by the accountant the report uses (None when it cannot account them)."""
    events = []
    for entry in entries:
        payload = entry.get("payload") if isinstance(entry, dict) else None
        if isinstance(payload, dict) and payload.get("kind") == GaussianRoundEvent.kind and payload.get("run_id") == run_id:
            try:
                events.append(event_from_dict(payload))
            except (PrivacyError, TypeError, ValueError, KeyError):
                return len(events) + 1, None
    if not events:
        return 0, 0.0
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        return len(events), None
    try:
        return len(events), float(PrivacyAccountant().epsilon(events, float(delta)).epsilon)
    except (PrivacyError, ValueError):
        return len(events), None
