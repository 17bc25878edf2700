"""A run directory: the file contract between whoever creates a run (the service, the CLI,
the demo), the ServerApp that executes it (simulated or deployed) and the service that watches
it. Every JSON file is replaced atomically::

    DIR/config.json     RunConfig.to_dict()                        (written by the creator)
    DIR/state.json      {"status": pending|running|completed|failed|stopped|refused,
                         "reason": str|null, "current_round": int, ..., "delivered":
                         {"round", "model_hash", "devices", "connected", "seconds"} once a
                         model computed on the server went to the devices}
    DIR/rounds.jsonl    one line per round: round, attempt, status (completed|failed|refused),
                        sampled, participants, survived, dropped, train_loss and
                        train_loss_std (the survivors' mean training loss as a DP release
                        from the loss slot of the securely summed vector, and its noise std;
                        null when the model carries none - never one device's loss), epsilon
                        (against the server: no amplification by sampling claimed),
                        epsilon_amplified (third parties who see only the model), delta,
                        noise_multiplier_effective,
                        noise_std_total, reason, seconds
    DIR/events.jsonl    run events for operators, appended (append_event, at the end of this
                        module): e.g. ``loss-rising``, the warning that the training loss rises
                        over several rounds (server/loss_trend.py)
    DIR/ledger.jsonl    the run's signed privacy ledger (restwise.privacy.ledger); audit key
                        from config.audit_key_path or DIR/../audit_key.pem (created 0600 if
                        absent); DIR/public_key.pem its public half
    DIR/progress.jsonl  where the current round is, one line per stage (append_progress, at
                        the end of this module: the format is documented there)
    DIR/checkpoint      the global shared model after the last completed round (npz)
    DIR/report.json, DIR/report.html   at the end (restwise.privacy.report), with the released
                        model's account (``model``: architecture, release, hash, delivery)
    DIR/STOP            create it to stop after the round in progress (the service does; SIGTERM
                        works for the deployed ServerApp, not under Ray's simulation engine)
    DIR/runner.lock     the runner holds an exclusive flock on it for as long as it runs: the
                        one liveness test (``runner_alive``; never a PID alone - after a reboot
                        or a crash the PID may belong to any other process). It also holds the
                        runner's PID and start time, for people.

A simulation adds ``DIR/fleet/`` (its generated devices' stores, ``restwise.simulation``); a
deployment's run directory never holds a store.

A run directory whose state is not terminal resumes from its checkpoint: rounds already
completed are not repeated (a round that was released but not checkpointed is re-run as a new,
separately accounted attempt). A runner that finds state "running" but no lock held marks the
run "interrupted" (with what it saw) before it resumes.

Ending a run (``finish_run``), in this order: state "finishing" with the ``outcome``; the
report to ``.partial-*`` files; its anchoring ledger entry; the renames; state = the outcome.
A run whose state says "finishing" (or ended without a current, anchored report: written by an
older Restwise) is finished again from its ledger by whoever opens it next - the runner, or
the service when no runner holds the lock.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from restwise.common.arrays import arrays_sha256
from restwise.common.fsutil import atomic_write_bytes
from restwise.models.loss_slot import recorded_loss_slot
from restwise.models.registry import DEFAULT_MODEL, ONE_RELEASE
from restwise.privacy.errors import LedgerError
from restwise.privacy.ledger import PrivacyLedger, export_public_key, load_or_create_audit_key, parse_ledger_bytes
from restwise.privacy.report import finish_partial_report, report_is_current, write_run_report
from restwise.server.errors import RunFilesError
from restwise.server.runconfig import RunConfig
from restwise.server.runstatus import ACTIVE_STATUSES, RESUMABLE_STATUSES, STATUSES, TERMINAL_STATUSES

CHECKPOINT_FORMAT = "restwise-checkpoint-2"  # -1: the same without "model" (always recovery-mlp)


def dump_json(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True) + "\n").encode("utf-8")


@dataclass
class RunFiles:
    """The files of one run directory (see the module docstring)."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def state(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def rounds(self) -> Path:
        return self.run_dir / "rounds.jsonl"

    @property
    def ledger(self) -> Path:
        return self.run_dir / "ledger.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def stop_file(self) -> Path:
        return self.run_dir / "STOP"

    def read_config(self) -> RunConfig:
        """The run's configuration; RunFilesError when config.json is missing or unreadable,
        RunConfigError (naming the field) when it is invalid."""
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunFilesError(f"{self.config} is unreadable ({type(exc).__name__})", path=self.config) from None
        return RunConfig.from_dict(data)

    def write_config(self, config: RunConfig) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.config, (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"status": "pending", "reason": None, "current_round": 0}
        except (OSError, ValueError) as exc:
            raise RunFilesError(f"{self.state} is unreadable ({type(exc).__name__})", path=self.state) from None

    def write_state(self, status: str, *, reason: str | None = None, current_round: int = 0, **extra: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        body = {"status": status, "reason": reason, "current_round": int(current_round), "updated_at": time.time(), **extra}
        atomic_write_bytes(self.state, dump_json(body))

    def round_lines(self) -> list[dict[str, Any]]:
        if not self.rounds.exists():
            return []
        out = []
        for line in self.rounds.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line after a crash
        return out

    def append_round(self, line: dict[str, Any]) -> None:
        existing = {(d.get("round"), d.get("attempt", 0)) for d in self.round_lines()}
        if (line.get("round"), line.get("attempt", 0)) in existing:
            return
        with open(self.rounds, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def stop_requested(self) -> bool:
        return self.stop_file.exists()


@dataclass(frozen=True)
class Checkpoint:
    round: int  # the last completed round (0: the initial model)
    arrays: list[np.ndarray]  # the global shared arrays
    model: str  # the architecture's registry name
    model_config: str  # the architecture's model configuration (json)
    meta: dict

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        header = json.dumps({"format": CHECKPOINT_FORMAT, "round": self.round, "model": self.model,
                             "model_config": self.model_config, "meta": self.meta})
        np.savez(buf, header=np.frombuffer(header.encode("utf-8"), dtype=np.uint8),
                 **{f"s{i:03d}": a for i, a in enumerate(self.arrays)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Checkpoint":
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode("utf-8"))
                if header.get("format") not in (CHECKPOINT_FORMAT, "restwise-checkpoint-1"):
                    raise RunFilesError("not a Restwise checkpoint")
                names = sorted(k for k in z.files if k != "header")
                arrays = [np.array(z[k]) for k in names]
        except RunFilesError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged file
            raise RunFilesError(f"the checkpoint cannot be read ({type(exc).__name__})") from None
        # Format 1 predates the model registry: its only model was the default one.
        model = str(header.get("model", DEFAULT_MODEL))
        return cls(int(header["round"]), arrays, model, str(header["model_config"]), dict(header.get("meta", {})))

    def model_hash(self) -> str:
        return arrays_sha256(self.arrays)


def open_ledger(run_dir: Path, config: RunConfig) -> PrivacyLedger:
    """The run's signed ledger: key from ``config.audit_key_path`` or ``run_dir/../audit_key.pem``
    (created on first use, mode 0600); the public key is written next to the ledger."""
    key_path = Path(config.audit_key_path) if config.audit_key_path else Path(run_dir).resolve().parent / "audit_key.pem"
    key = load_or_create_audit_key(key_path)
    pub = Path(run_dir) / "public_key.pem"
    if not pub.exists():
        export_public_key(key, pub)
    return PrivacyLedger(Path(run_dir) / "ledger.jsonl", signing_key=key)


def model_section(run_dir: Path) -> dict[str, Any] | None:
    """The report's account of the released model: the architecture, how it was released
    (rounds of DP-FedAvg, or one release of bounded statistics with its documented L2
    sensitivity), the hash the ledger names, and its delivery to the devices."""
    files = RunFiles(Path(run_dir))
    try:
        config = files.read_config()
        state = files.read_state()
    except (RunFilesError, ValueError):
        return None  # no readable configuration: the report stands on the ledger alone
    architecture = config.architecture
    one_release = architecture.protocol == ONE_RELEASE
    out: dict[str, Any] = {
        "architecture": config.model,
        "release": ("one release of bounded sufficient statistics (L2 sensitivity per person, add/remove: "
                    f"{config.sensitivity:.6g}), solved on the server toward the public prior"
                    if one_release else f"DP-FedAvg over {config.rounds} rounds (clip norm {config.sensitivity:.6g})"),
        "sensitivity": config.sensitivity,
        "training_loss": "not collected (no per-device metric leaves a device in the clear)",
    }
    if files.checkpoint.exists():
        blob = files.checkpoint.read_bytes()
        ckpt = Checkpoint.from_bytes(blob)
        out.update(released_model_hash=ckpt.model_hash(), shared_numbers=int(sum(np.asarray(a).size for a in ckpt.arrays)),
                   checkpoint_sha256=hashlib.sha256(blob).hexdigest(), rounds_completed=ckpt.round)
        slot = recorded_loss_slot(ckpt.model_config)
        if slot is not None:
            out["training_loss"] = ("each round's mean over its survivors, released from a loss slot inside the clipped, "
                                    "noised, securely summed vector (no extra epsilon; no device's loss is sent): "
                                    "rounds.jsonl train_loss, train_loss_std")
            out["loss_slot"] = slot.to_dict()
    warnings = [e["message"] for e in read_events(run_dir) if e["level"] == "warning"]
    if warnings:
        out["warnings"] = warnings
    delivered = state.get("delivered")
    if architecture.delivers_model:
        out["delivered"] = delivered if isinstance(delivered, dict) else "not delivered"
    if config.force:
        out["forced_plan"] = "the operator forced a plan the planner refuses (ledger: plan.forced)"
    return out


def write_report(run_dir: Path) -> dict[str, Path]:
    """report.json and report.html of the run (restwise.privacy.report), anchored in its ledger,
    with the released model's account (:func:`model_section`)."""
    return write_run_report(Path(run_dir), model=model_section(Path(run_dir)), on_step=crash_point)


# -- test-only crash points ------------------------------------------------------------------
CRASH_ENV = "RESTWISE_TEST_CRASH_AT"
# In a round (server/app.py, privacy/release.py): after each secure-aggregation stage that
# ends with its replies counted (the unmask stage ends in the aggregate), after the release's
# write-ahead ledger entry (no unmasking share asked for yet), after the aggregate (model built,
# nothing stored), after the checkpoint (before release.applied).
ROUND_CRASH_POINTS = ("after-stage-setup", "after-stage-share-keys", "after-stage-collect-masked-input",
                      "after-write-ahead", "after-aggregate", "after-checkpoint")
CRASH_POINTS = ("before-setup", *ROUND_CRASH_POINTS, "report-written", "report-anchored", "report-renamed")


def crash_point(name: str) -> None:
    """TEST ONLY: when ``$RESTWISE_TEST_CRASH_AT`` names this point, the process kills itself
    with SIGKILL here - no handler, no cleanup, exactly as a power cut or the OOM killer would
    (tests/test_crash_matrix.py). Unset in any real deployment: then this does nothing."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# -- liveness: the runner's lock ---------------------------------------------------------------
RUNNER_LOCK_FILE = "runner.lock"


class RunnerLock:
    """An exclusive ``flock`` on ``DIR/runner.lock``, held by the runner for as long as it runs
    the run (or finishes it). The kernel drops it when the process dies, however it dies, so
    "someone holds the lock" is true exactly while a runner lives - unlike a PID, which another
    process may own after a crash or a reboot. Two runners never run one run at once."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / RUNNER_LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 3.0, record: bool = True) -> "RunnerLock":
        """Take the lock (waiting up to ``wait_s`` for a prober to let go); RunFilesError when
        another runner holds it. ``record``: write this process's PID and start time into the
        file (a runner does; the service, settling a run briefly, keeps the last runner's)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunFilesError(
                        f"another runner is running {self.path.parent.name} ({runner_info(self.path.parent) or 'unknown'})",
                        path=self.path,
                    ) from None
                time.sleep(0.02)
        if record:
            os.ftruncate(fd, 0)
            started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            os.write(fd, f"pid {os.getpid()} started {started}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunnerLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def runner_alive(run_dir: str | os.PathLike) -> bool:
    """Whether a runner holds the run's lock now (a shared probe, let go at once)."""
    try:
        fd = os.open(Path(run_dir) / RUNNER_LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no runner ever started here (or not yet)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our probe's shared lock
    return False


def runner_info(run_dir: str | os.PathLike) -> str | None:
    """What the last runner wrote into the lock file ("pid N started T"), for messages only."""
    try:
        return (Path(run_dir) / RUNNER_LOCK_FILE).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def note_interruption(files: RunFiles, *, found_by: str, statuses: tuple[str, ...] = ("running",)) -> str | None:
    """With the run's lock held: when state.json still says "running" (or one of
    ``statuses``), its runner vanished without recording an end. Record "interrupted" with
    what was seen; returns the reason (None when the state was something else)."""
    try:
        state = files.read_state()
    except RunFilesError:
        return None
    if state.get("status") not in statuses:
        return None
    rnd = int(state.get("current_round", 0) or 0)
    reason = (f"interrupted: its runner ({runner_info(files.run_dir) or 'unknown process'}) ended without recording "
              f"an end after round {rnd} (found by {found_by})")
    if files.stop_requested():
        reason += "; a stop had been requested"
    files.write_state("interrupted", reason=reason, current_round=rnd,
                      **{k: v for k, v in state.items() if k not in ("status", "reason", "current_round", "updated_at")})
    return reason


# -- ending a run ------------------------------------------------------------------------------
_STATE_KEYS = ("status", "reason", "current_round", "updated_at", "outcome", "outcome_reason", "report_sha256")


def _released_anything(files: RunFiles, run_id: str) -> bool:
    """Whether the ledger holds any entry of the run (read-only: a torn last line, which the
    report's writer moves aside, is not read). False for a file that is no ledger at all -
    nothing can be reported from it (the run's report says so when it is written)."""
    try:
        data = files.ledger.read_bytes()
    except OSError:
        return False
    try:
        entries = parse_ledger_bytes(data[: data.rfind(b"\n") + 1])
    except LedgerError:
        return False
    return any(e.payload.get("run_id") == run_id or e.payload.get("target") == run_id for e in entries)


def needs_finishing(run_dir: str | os.PathLike) -> bool:
    """A run whose end is not complete: state "finishing", or ended (not refused) with an
    entry in its ledger but no current, anchored report (e.g. a crash of an older Restwise)."""
    files = RunFiles(Path(run_dir))
    try:
        state = files.read_state()
    except RunFilesError:
        return False
    status = state.get("status")
    if status == "finishing":
        return True
    if status not in TERMINAL_STATUSES or status == "refused":
        return False
    run_id = str(state.get("run_id") or files.run_dir.name)
    if not _released_anything(files, run_id):
        return False
    # Read only, without the signing key: a missing key is never replaced by a new one here
    # (the report's own writer loads the key and fails closed without it).
    return not report_is_current(files.run_dir, PrivacyLedger(files.ledger), run_id)


def finish_run(run_dir: str | os.PathLike, status: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """End the run as ``status`` (default: the ``outcome`` recorded in a "finishing" state):
    state "finishing", then its report (``.partial-*`` files, anchoring ledger entry, renames:
    ``privacy.report.write_report``), then state = ``status``. Safe to call again after a
    crash at any point: partial files the ledger attests are renamed, others rebuilt from the
    ledger. A run with no ledger entry released nothing and gets no report. Call it with the
    run's lock held. Returns the final state."""
    files = RunFiles(Path(run_dir))
    state = files.read_state()
    if status is None:
        status = state.get("outcome") or state.get("status")
        reason = state.get("outcome_reason", state.get("reason"))
    if status not in TERMINAL_STATUSES:
        raise RunFilesError(f"cannot finish run {files.run_dir.name} as {status!r}", path=files.state)
    keep = {k: v for k, v in state.items() if k not in _STATE_KEYS}
    current = int(state.get("current_round", 0) or 0)
    files.write_state("finishing", reason=f"writing the report of the {status} run", current_round=current,
                      outcome=status, outcome_reason=reason, **keep)
    run_id = str(state.get("run_id") or files.run_dir.name)
    digest = None
    if _released_anything(files, run_id):
        ledger = PrivacyLedger(files.ledger)  # reading and renaming need no key; write_report loads it
        finish_partial_report(files.run_dir, ledger, run_id)
        if not report_is_current(files.run_dir, ledger, run_id):
            write_report(files.run_dir)
        crash_point("report-renamed")
        digest = hashlib.sha256((files.run_dir / "report.json").read_bytes()).hexdigest()
    files.write_state(status, reason=reason, current_round=current, report_sha256=digest, **keep)
    return files.read_state()


def finish_failed(run_dir: str | os.PathLike, reason: str) -> None:
    """End the run as failed with ``reason`` - with its report when it released anything. If
    even that fails (no key, unreadable configuration), state.json still says failed and why."""
    try:
        finish_run(run_dir, "failed", reason)
    except Exception as exc:  # noqa: BLE001 - the run's failure is what must be recorded
        files = RunFiles(Path(run_dir))
        files.write_state("failed", reason=f"{reason}; its report could not be written: {type(exc).__name__}: {exc}"[:1000],
                          current_round=_state_round(files))


def _state_round(files: RunFiles) -> int:
    try:
        return int(files.read_state().get("current_round", 0) or 0)
    except (RunFilesError, TypeError, ValueError):
        return 0


__all__ = [
    "finish_failed", "STATUSES", "TERMINAL_STATUSES", "ACTIVE_STATUSES", "RESUMABLE_STATUSES", "RunFiles", "Checkpoint", "open_ledger",
    "write_report", "dump_json", "RunnerLock", "runner_alive", "runner_info", "note_interruption", "needs_finishing",
    "finish_run", "crash_point", "CRASH_ENV", "CRASH_POINTS", "ROUND_CRASH_POINTS", "RUNNER_LOCK_FILE",
]


# ---------------------------------------------------------------------------------------------
# Progress: DIR/progress.jsonl (issue 14, "progress everywhere"). Self-contained: the round
# appends a line at every stage through `append_progress`; `restwise server run`, `runs show
# --watch` (through the service's API) and the demo read it with `read_progress`
# (server/progress.py renders it).
#
# One JSON object per line, appended (never rewritten), in this exact shape:
#
#     {"v": 1, "at": 1733312345.12, "round": 3, "attempt": 0, "stage": "collect-masked",
#      "expected": 4, "received": 3, "dropped": 1}
#
#   v         format version (1)
#   at        when (Unix seconds, float)
#   round     the round the stage belongs to (0: before the first round, e.g. waiting for nodes)
#   attempt   the round's attempt (0 unless a round is re-run after a crash)
#   stage     a name, [a-z][a-z0-9-]{0,39}: waiting-for-nodes, sampling, hello, then the secure
#             aggregation's own stages (e.g. setup, share-keys, collect-masked, unmask), release,
#             checkpoint, report. Readers show any name.
#   expected  devices (or messages) this stage waits for, or null
#   received  replies so far (or nodes connected), or null
#   dropped   devices lost in this stage so far, or null
#
# Counts and names only: no metric, no loss, no identifier of a device or person. A stage may
# be written more than once (e.g. when a reply arrives); the last line is where the run is.
PROGRESS_FILE = "progress.jsonl"
PROGRESS_VERSION = 1
_PROGRESS_STAGE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_PROGRESS_COUNTS = ("expected", "received", "dropped")
_PROGRESS_TAIL_BYTES = 64 * 1024


def _progress_stage(stage: Any) -> bool:
    """[a-z][a-z0-9-]{0,39}"""
    return (isinstance(stage, str) and 1 <= len(stage) <= 40 and "a" <= stage[0] <= "z"
            and set(stage) <= _PROGRESS_STAGE_CHARS)


def _progress_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"progress {name} must be a non-negative integer or None, got {value!r}")
    return value


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """One ``write`` of one short JSON line on an append-only file: readers never see half a
    line from a live writer."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def append_progress(
    run_dir: str | os.PathLike,
    stage: str,
    *,
    rnd: int,
    attempt: int = 0,
    expected: int | None = None,
    received: int | None = None,
    dropped: int | None = None,
) -> dict[str, Any]:
    """Append one progress line to ``run_dir/progress.jsonl`` and return it. Raises
    ValueError for a stage name or count outside the format (a programming error), OSError
    when the file cannot be written. One ``write`` of a short line on an append-only file:
    readers never see half a line from a live writer."""
    if not _progress_stage(stage):
        raise ValueError(f"progress stage must be [a-z][a-z0-9-]{{0,39}}, got {stage!r}")
    record = {
        "v": PROGRESS_VERSION, "at": round(time.time(), 3),
        "round": _progress_count("round", rnd), "attempt": _progress_count("attempt", attempt), "stage": stage,
        "expected": _progress_count("expected", expected), "received": _progress_count("received", received),
        "dropped": _progress_count("dropped", dropped),
    }
    _append_line(Path(run_dir) / PROGRESS_FILE, record)
    return record


def _progress_record(item: Any) -> dict[str, Any] | None:
    """A line of the format, or None (another version, or not the shape above)."""
    if not isinstance(item, dict) or item.get("v") != PROGRESS_VERSION:
        return None
    if not _progress_stage(item.get("stage")):
        return None
    if isinstance(item.get("at"), bool) or not isinstance(item.get("at"), (int, float)):
        return None
    try:
        counts = {k: _progress_count(k, item.get(k)) for k in ("round", "attempt", *_PROGRESS_COUNTS)}
    except ValueError:
        return None
    if counts["round"] is None:
        return None
    return {"at": float(item["at"]), "stage": item["stage"], **counts, "attempt": counts["attempt"] or 0}


def read_progress(run_dir: str | os.PathLike, *, last: int | None = None) -> list[dict[str, Any]]:
    """The progress lines of a run folder, oldest first (only the ``last`` ones when given,
    read from the end of the file). A last line without its newline (being written) and
    lines not in the format are skipped. [] when there is no progress file."""
    path = Path(run_dir) / PROGRESS_FILE
    try:
        with open(path, "rb") as fh:
            if last is not None:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - _PROGRESS_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    lines = data.split(b"\n")[:-1]  # the part after the last newline is not a whole line yet
    if last is not None and len(data) >= _PROGRESS_TAIL_BYTES:
        lines = lines[1:]  # the first line of a tail may be cut
    out = []
    for raw in lines:
        try:
            record = _progress_record(json.loads(raw))
        except ValueError:
            continue
        if record is not None:
            out.append(record)
    return out[-last:] if last is not None and last > 0 else out


__all__ += ["PROGRESS_FILE", "append_progress", "read_progress"]


# ---------------------------------------------------------------------------------------------
# Run events: DIR/events.jsonl, what an operator should be told about a run besides its rounds
# (issue 14 item 7). Appended by the ServerApp, read by `restwise server run` / `runs show`
# (server/progress.py), the service's API (`events` of GET /api/v1/runs/{id}) and the dashboard.
#
#     {"v": 1, "at": 1733312345.12, "round": 9, "kind": "loss-rising", "level": "warning",
#      "message": "training loss rising over rounds 3-9: ...", "details": {...}}
#
#   kind      [a-z][a-z0-9-]{0,39} (loss-rising: server/loss_trend.py)
#   level     info | warning
#   message   one line for people
#   details   numbers behind it (released aggregates only: never a device's value)
EVENTS_FILE = "events.jsonl"
EVENTS_VERSION = 1
EVENT_LEVELS = ("info", "warning")


def append_event(run_dir: str | os.PathLike, kind: str, *, rnd: int, level: str, message: str,
                 details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append one event to ``run_dir/events.jsonl`` and return it (ValueError for a kind or
    level outside the format, OSError when the file cannot be written)."""
    if not _progress_stage(kind):
        raise ValueError(f"event kind must be [a-z][a-z0-9-]{{0,39}}, got {kind!r}")
    if level not in EVENT_LEVELS:
        raise ValueError(f"event level must be one of {', '.join(EVENT_LEVELS)}")
    record = {"v": EVENTS_VERSION, "at": round(time.time(), 3), "round": _progress_count("round", rnd), "kind": kind,
              "level": level, "message": str(message)[:500], "details": dict(details or {})}
    _append_line(Path(run_dir) / EVENTS_FILE, record)
    return record


def read_events(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's events, oldest first ([] without an events file; lines not in the format, or
    a last line still being written, are skipped)."""
    try:
        data = (Path(run_dir) / EVENTS_FILE).read_bytes()
    except OSError:
        return []
    out = []
    for raw in data.split(b"\n")[:-1]:
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if (isinstance(item, dict) and item.get("v") == EVENTS_VERSION and _progress_stage(item.get("kind"))
                and item.get("level") in EVENT_LEVELS and isinstance(item.get("message"), str)
                and isinstance(item.get("round"), int) and not isinstance(item.get("round"), bool)):
            out.append({"at": item.get("at"), "round": item["round"], "kind": item["kind"], "level": item["level"],
                        "message": item["message"],
                        "details": item["details"] if isinstance(item.get("details"), dict) else {}})
    return out


__all__ += ["EVENTS_FILE", "EVENT_LEVELS", "append_event", "read_events"]
