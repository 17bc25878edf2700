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

Stopping writes ``DIR/STOP`` and sends SIGTERM. A watcher thread mirrors those files into the
database so the API and the dashboard read one place; every read of a single run also
refreshes it first, so what a client sees is never older than the files.

The service itself never trains or accounts anything: it refuses to *start* a run whose
projected ε for all planned rounds exceeds its budget (``BudgetRefusedError``), with the one
release planner (``privacy.release.check_plan``) the ServerApp uses to re-check before every
round.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlalchemy as sa

from restwise.privacy.errors import PrivacyError
from restwise.privacy.release import BudgetDecision, check_plan
from restwise.server import db as dbm
from restwise.server.errors import (
    AccountingRefusedError,
    BudgetRefusedError,
    RunNotFoundError,
    RunStateError,
)
from restwise.server.runstatus import ACTIVE_STATUSES as ACTIVE
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
        return check_plan(
            RunConfig.from_dict(config).release_policy(), epsilon_cap=self.epsilon_cap,
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
        """ε spent so far (the last round that reported one) for each of ``run_ids``."""
        if not run_ids:
            return {}
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dbm.rounds.c.run_id, dbm.rounds.c.epsilon)
                .where(dbm.rounds.c.run_id.in_(list(run_ids)), dbm.rounds.c.epsilon.is_not(None))
                .order_by(dbm.rounds.c.run_id, dbm.rounds.c.round)
            ).all()
        return {run_id: eps for run_id, eps in rows}  # ordered by round: the last one wins

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
        the same persons, so their privacy loss composes with this run's (person budget)."""
        run = self.get(run_id, refresh=False)
        dataset = run["config"].get("dataset")
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
            self._update(run_id, projected_epsilon=decision.projected_epsilon if finite else None)
            if not decision.allowed:
                err = BudgetRefusedError(run_id, decision)
                self._update(run_id, status="refused", reason=str(err), finished_at=dbm.utcnow())
                raise err
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
            self._update(run_id, status="pending", pid=proc.pid, started_at=dbm.utcnow(), reason=None)
        return self.get(run_id)

    def stop(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            run = self.get(run_id)
            if run["status"] in TERMINAL:
                raise RunStateError(run_id, run["status"], "stop")
            run_dir = self._run_dir(run_id)
            (run_dir / "STOP").write_text("stop requested by the service\n", encoding="utf-8")
            proc = self._procs.get(run_id)
            if proc is not None and proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if run["status"] == "created":
                self._update(run_id, status="stopped", reason="stopped before it started", finished_at=dbm.utcnow())
        return self.get(run_id)

    def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        """Block until the run reaches a terminal status or the timeout passes (tests, CLI)."""
        deadline = threading.Event()
        waited = 0.0
        while waited < timeout_s:
            run = self.get(run_id)
            if run["status"] in TERMINAL:
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

    def refresh(self, run_id: str) -> None:
        """Mirror the run folder's files into the database."""
        with self._lock:
            with self.db.engine.connect() as conn:
                row = conn.execute(sa.select(dbm.runs).where(dbm.runs.c.id == run_id)).mappings().first()
            if row is None or row["status"] == "created":
                return
            run_dir = Path(row["run_dir"])
            self._mirror_rounds(run_id, run_dir)
            self._mirror_ledger(run_id, run_dir)
            if row["status"] in TERMINAL and row["finished_at"] and row["status"] != "refused":
                # Terminal and already mirrored once after the end: nothing changes any more,
                # except report files, which are read from the folder on demand.
                if run_id not in self._procs:
                    return
            state = read_json(run_dir / "state.json")
            values: dict[str, Any] = {}
            if isinstance(state, dict):
                status = state.get("status")
                if status in TERMINAL | ACTIVE and status != row["status"]:
                    values["status"] = status
                if "reason" in state:  # null clears a progress note such as "preparing devices"
                    reason = state["reason"][:2000] if isinstance(state["reason"], str) else None
                    if reason != row["reason"]:
                        values["reason"] = reason
                current = _num(state.get("current_round"), int)
                if current is not None and current != row["current_round"]:
                    values["current_round"] = current
            proc = self._procs.get(run_id)
            exited = proc is not None and proc.poll() is not None
            if proc is None and row["status"] in ACTIVE and not _pid_alive(row["pid"]):
                exited = True  # the service restarted and the runner is gone
            alive = not exited and (proc is not None or _pid_alive(row["pid"]))
            if values.get("status") in TERMINAL and alive:
                # The runner still writes its report after declaring the end: the run counts
                # as ended (and its bundle as ready) only once the process has exited.
                values.pop("status")
            status = values.get("status", row["status"])
            if exited:
                self._procs.pop(run_id, None)
                if status not in TERMINAL:
                    # Re-read: the runner may have written its final state just before exiting.
                    state = read_json(run_dir / "state.json")
                    final = state.get("status") if isinstance(state, dict) else None
                    if final in TERMINAL:
                        values["status"] = final
                        if isinstance(state.get("reason"), str):
                            values["reason"] = state["reason"][:2000]
                        # The first read may predate the runner's last rounds: the final
                        # state's round is the one that counts (the run never refreshes again).
                        current = _num(state.get("current_round"), int)
                        if current is not None:
                            values["current_round"] = current
                    elif (run_dir / "STOP").exists():
                        values["status"] = "stopped"
                        values.setdefault("reason", "stopped on request")
                    else:
                        code = proc.returncode if proc is not None else None
                        values["status"] = "failed"
                        values["reason"] = f"the runner exited (code {code}) without reporting an end state"
                self._mirror_rounds(run_id, run_dir)
                self._mirror_ledger(run_id, run_dir)
            if values.get("status", row["status"]) in TERMINAL and not row["finished_at"]:
                values["finished_at"] = dbm.utcnow()
            if values:
                self._update(run_id, **values)

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
        entries = read_jsonl(run_dir / "ledger.jsonl")
        if not entries:
            return
        with self.db.engine.begin() as conn:
            have = conn.execute(
                sa.select(sa.func.count()).select_from(dbm.ledger_entries).where(dbm.ledger_entries.c.run_id == run_id)
            ).scalar()
            for seq, entry in enumerate(entries):
                if seq < (have or 0):
                    continue  # append-only: entries already mirrored never change
                conn.execute(
                    dbm.ledger_entries.insert().values(run_id=run_id, seq=seq, entry_json=json.dumps(entry, sort_keys=True))
                )

    def start_watching(self) -> None:
        if self._thread is not None:
            return
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
            except Exception:  # noqa: BLE001 - a transient DB/file error must not kill the watcher
                continue

    def shutdown(self, *, stop_runs: bool = False) -> None:
        self.stop_watching()
        if stop_runs:
            for run_id, proc in list(self._procs.items()):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
