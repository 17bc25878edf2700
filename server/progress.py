"""A run's progress in the operator's terminal: per round and per stage, never silent for more
than a few seconds, and one line for the outcome.

What a run exposes is its folder (``server/rundir.py``: ``state.json``, ``rounds.jsonl`` and
the round's own ``progress.jsonl``) or, through the service, ``GET /api/v1/runs/{id}`` (the
same, mirrored, with the last progress line as ``progress``). Both become a :class:`RunView`;
a :class:`ProgressReporter` turns successive views into lines on a rich console:

* one line when the run starts, one per stage of a round (``round 2/3: collect-masked, 3 of
  4 replies``), one per finished round (``round 2/3 released: 4 sampled, 4 survived,
  ε = 1.23``);
* on a terminal, a spinner with the current stage, its counts and the seconds spent in it,
  redrawn continuously; elsewhere (a log file, a pipe) a heartbeat line whenever nothing was
  printed for ``heartbeat_s`` seconds;
* one line per run event (``events.jsonl``, e.g. the ``loss-rising`` warning), when it appears;
* :func:`outcome_line`: the final outcome in one line.

Used by ``restwise server run`` (deployment), ``restwise server runs show --watch`` (the
service) and reusable by any runner that has a run folder: :func:`watch_run_dir`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from restwise.server.errors import RunFilesError
from restwise.server.rundir import RunFiles, read_events, read_progress
from restwise.server.runstatus import TERMINAL_STATUSES

HEARTBEAT_S = 5.0
RELEASED = ("completed", "released")


@dataclass(frozen=True)
class RunView:
    """What is known about a run at one moment.

    status          pending | running | completed | failed | stopped | refused, or None when
                    the run has written nothing yet
    reason          the run's reason (a failure, or a note such as "preparing devices")
    planned_rounds  the rounds the run plans, when known
    rounds          one dict per finished round (rounds.jsonl): round, status, sampled,
                    survived, dropped, epsilon, delta, reason, seconds
    stage           the last progress line (``rundir.read_progress``), or None
    events          the run's events (``rundir.read_events``): round, kind, level, message
    """

    status: str | None = None
    reason: str | None = None
    planned_rounds: int | None = None
    rounds: tuple[Mapping[str, Any], ...] = ()
    stage: Mapping[str, Any] | None = None
    events: tuple[Mapping[str, Any], ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def released(self) -> list[Mapping[str, Any]]:
        return [r for r in self.rounds if r.get("status") in RELEASED]

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, *, planned_rounds: int | None = None) -> "RunView":
        """From a run folder (files that are absent or being written count as not there yet)."""
        files = RunFiles(Path(run_dir))
        state: Mapping[str, Any] = {}
        if files.state.exists():
            try:
                state = files.read_state()
            except RunFilesError:
                state = {}  # caught mid-replace: read again on the next poll
        if planned_rounds is None and files.config.exists():
            try:
                planned_rounds = files.read_config().rounds
            except Exception:  # noqa: BLE001 - an unreadable config shows no round count
                planned_rounds = None
        latest = read_progress(run_dir, last=1)
        return cls(
            status=state.get("status") if files.state.exists() else None,
            reason=state.get("reason"),
            planned_rounds=planned_rounds,
            rounds=tuple(files.round_lines()),
            stage=latest[-1] if latest else None,
            events=tuple(read_events(run_dir)),
        )

    @classmethod
    def from_api(cls, run: Mapping[str, Any]) -> "RunView":
        """From the service's ``GET /api/v1/runs/{id}`` answer (status "created" = not started)."""
        status = run.get("status")
        return cls(
            status=None if status == "created" else status,
            reason=run.get("reason"),
            planned_rounds=run.get("planned_rounds"),
            rounds=tuple(run.get("rounds") or ()),
            stage=run.get("progress"),
            events=tuple(run.get("events") or ()),
        )


def _fmt_eps(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _of(rnd: Any, planned: int | None) -> str:
    return f"{rnd}/{planned}" if planned else f"{rnd}"


def round_line(rec: Mapping[str, Any], planned: int | None) -> str:
    """One finished round, in one line."""
    status = rec.get("status")
    head = f"round {_of(rec.get('round'), planned)}"
    took = f" ({rec['seconds']:.1f} s)" if isinstance(rec.get("seconds"), (int, float)) and rec["seconds"] > 0 else ""
    if status in RELEASED:
        loss, std = rec.get("train_loss"), rec.get("train_loss_std")
        shown = ""
        if isinstance(loss, (int, float)):  # the survivors' mean, a DP release (loss slot)
            shown = f", training loss {loss:.3g}" + (f" ± {std:.2g}" if isinstance(std, (int, float)) and std > 0 else "")
        return (f"{head} released: {rec.get('sampled')} sampled, {rec.get('survived')} survived, "
                f"ε = {_fmt_eps(rec.get('epsilon'))}{shown}{took}")
    reason = f": {rec['reason']}" if rec.get("reason") else ""
    return f"{head} {status or 'ended'}{reason}{took}"


def event_line(event: Mapping[str, Any], planned: int | None) -> str:
    """One run event: ``warning (round 9/20): training loss rising over rounds 3-9: ...``."""
    return f"{event.get('level', 'info')} (round {_of(event.get('round'), planned)}): {event.get('message')}"


def stage_text(stage: Mapping[str, Any], planned: int | None) -> str:
    """Where a round is: ``round 2/3: collect-masked, 3 of 4 replies, 1 dropped``."""
    rnd = stage.get("round") or 0
    where = f"round {_of(rnd, planned)}" if rnd else "before the first round"
    parts = [f"{where}: {stage.get('stage')}"]
    expected, received = stage.get("expected"), stage.get("received")
    if received is not None and expected is not None:
        parts.append(f"{received} of {expected} replies")
    elif expected is not None:
        parts.append(f"waiting for {expected}")
    elif received is not None:
        parts.append(f"{received} so far")
    if stage.get("dropped"):
        parts.append(f"{stage['dropped']} dropped")
    return ", ".join(parts)


def outcome_line(view: RunView, elapsed_s: float | None = None, *, name: str | None = None) -> str:
    """The run's outcome in one line, e.g. ``completed: 3 of 3 rounds released, ε = 2.31 at
    δ = 1e-05, in 3 min 04 s``; a run that did not complete says which rounds failed and why."""
    released = view.released
    planned = view.planned_rounds
    parts = [f"{view.status or 'not started'}{f' ({name})' if name else ''}: "
             f"{len(released)}{f' of {planned}' if planned else ''} round{'s' if (planned or len(released)) != 1 else ''} released"]
    failed = [r.get("round") for r in view.rounds if r.get("status") not in RELEASED]
    if failed:
        parts.append(f"round{'s' if len(failed) > 1 else ''} {', '.join(str(r) for r in failed)} not released")
    if released:
        last = released[-1]
        delta = last.get("delta")
        parts.append(f"ε = {_fmt_eps(last.get('epsilon'))}" + (f" at δ = {delta:g}" if isinstance(delta, (int, float)) else ""))
    line = ", ".join(parts)
    if elapsed_s is not None:
        line += f", in {_duration(elapsed_s)}"
    if view.status != "completed" and view.reason:
        line += f" ({view.reason})"
    warnings = [e for e in view.events if e.get("level") == "warning"]
    if warnings:
        line += f"; {len(warnings)} warning{'s' if len(warnings) > 1 else ''}: " + "; ".join(
            str(e.get("kind")) for e in warnings)
    return line


@dataclass
class ProgressReporter:
    """Prints a run's progress from successive :class:`RunView` s (see the module docstring).

    ``console``: where (a rich Console; on a terminal it gets a live spinner line).
    ``heartbeat_s``: without a terminal, the longest silence. ``clock``: monotonic seconds."""

    console: Console
    heartbeat_s: float = HEARTBEAT_S
    clock: Callable[[], float] = time.monotonic
    live: bool | None = None  # default: whether the console is a terminal
    _started: float = field(init=False)
    _last_print: float = field(init=False)
    _stage_key: tuple | None = field(init=False, default=None)
    _stage_since: float = field(init=False)
    _rounds_seen: int = field(init=False, default=0)
    _events_seen: int = field(init=False, default=0)
    _status: str | None = field(init=False, default=None)
    _view: RunView = field(init=False, default_factory=RunView)
    _spinner: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        now = self.clock()
        self._started = self._last_print = self._stage_since = now
        if self.live is None:
            self.live = self.console.is_terminal

    # -- output --------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Print one line (plain text: never read as markup)."""
        self.console.print(escape(text), highlight=False, soft_wrap=True)
        self._last_print = self.clock()

    def _status_text(self) -> str:
        now = self.clock()
        view = self._view
        if view.stage is not None and not view.finished:
            return f"{stage_text(view.stage, view.planned_rounds)} ({_duration(now - self._stage_since)} in this stage)"
        if view.status in (None, "pending"):
            return f"waiting for the run to start ({_duration(now - self._started)})"
        done = len(view.rounds)
        nxt = done + 1 if not view.planned_rounds or done < view.planned_rounds else done
        return f"round {_of(nxt, view.planned_rounds)} running ({_duration(now - self._stage_since)})"

    # -- input ---------------------------------------------------------------------------
    def update(self, view: RunView) -> None:
        """Show what changed since the last view; keep the terminal line (or the heartbeat)
        going when nothing did."""
        now = self.clock()
        if view.status != self._status and view.status is not None:
            if self._status is None and not view.finished:
                self.say(f"the run is {view.status}" + (f": {view.reason}" if view.reason else ""))
            self._status = view.status
        for rec in view.rounds[self._rounds_seen:]:
            self.say(round_line(rec, view.planned_rounds))
            self._stage_since = now
        self._rounds_seen = max(self._rounds_seen, len(view.rounds))
        for event in view.events[self._events_seen:]:
            self.say(event_line(event, view.planned_rounds))
        self._events_seen = max(self._events_seen, len(view.events))
        stage = view.stage
        key = (stage.get("round"), stage.get("attempt"), stage.get("stage")) if stage else None
        if key is not None and key != self._stage_key and not view.finished:
            self._stage_key = key
            self._stage_since = now
            self._view = view
            self.say(stage_text(stage, view.planned_rounds))
        self._view = view
        self._tick(now)

    def _tick(self, now: float) -> None:
        if view_done := self._view.finished:
            self._stop_spinner()
        if self.live:
            if view_done:
                return
            if self._spinner is None:
                self._spinner = self.console.status(escape(self._status_text()))
                self._spinner.start()
            else:
                self._spinner.update(escape(self._status_text()))
        elif not view_done and now - self._last_print >= self.heartbeat_s:
            self.say(f"… {self._status_text()}")

    def _stop_spinner(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def close(self) -> None:
        self._stop_spinner()

    def elapsed_s(self) -> float:
        return self.clock() - self._started


def watch_run_dir(
    run_dir: str | Path,
    reporter: ProgressReporter,
    *,
    until: Callable[[], bool] = lambda: False,
    poll_s: float = 0.5,
    planned_rounds: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RunView:
    """Report ``run_dir``'s progress until its state is terminal or ``until()`` is true;
    returns the last view. For a runner in another thread or process (the demo: call it while
    the simulation runs, with ``until`` set when the simulation returns)."""
    while True:
        view = RunView.from_run_dir(run_dir, planned_rounds=planned_rounds)
        reporter.update(view)
        if view.finished or until():
            view = RunView.from_run_dir(run_dir, planned_rounds=planned_rounds)  # what the end wrote
            reporter.update(view)
            reporter.close()
            return view
        sleep(poll_s)


__all__ = [
    "RunView", "ProgressReporter", "watch_run_dir", "outcome_line", "round_line", "stage_text", "event_line",
    "HEARTBEAT_S",
]
