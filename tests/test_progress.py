"""Run progress: the run folder's progress file (writer and reader), the terminal renderer
(per round and per stage, never silent for more than the heartbeat, one outcome line), and
following a real run folder while another thread writes it as a round would."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from rich.console import Console

from restwise.server.progress import ProgressReporter, RunView, outcome_line, watch_run_dir
from restwise.server.rundir import PROGRESS_FILE, RunFiles, append_progress, read_progress


def test_progress_lines_round_trip_and_refuse_anything_else(tmp_path):
    first = append_progress(tmp_path, "hello", rnd=1, expected=4)
    append_progress(tmp_path, "collect-masked", rnd=1, expected=4, received=3, dropped=1)
    assert set(first) == {"v", "at", "round", "attempt", "stage", "expected", "received", "dropped"}
    lines = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert json.loads(lines[1]) == {"v": 1, "at": json.loads(lines[1])["at"], "round": 1, "attempt": 0,
                                    "stage": "collect-masked", "expected": 4, "received": 3, "dropped": 1}
    got = read_progress(tmp_path)
    assert [(p["round"], p["stage"], p["expected"], p["received"], p["dropped"]) for p in got] == [
        (1, "hello", 4, None, None), (1, "collect-masked", 4, 3, 1)]
    for bad in ("Hello", "", "x" * 41, "a b", "loss=0.3"):
        with pytest.raises(ValueError):
            append_progress(tmp_path, bad, rnd=1)
    for kwargs in ({"rnd": -1}, {"rnd": 1, "expected": -2}, {"rnd": 1, "received": 1.5}, {"rnd": True}):
        with pytest.raises(ValueError):
            append_progress(tmp_path, "hello", **kwargs)
    # A line being written (no newline yet), another version and junk are skipped.
    with open(tmp_path / PROGRESS_FILE, "a") as fh:
        fh.write('{"v": 2, "at": 1, "round": 1, "stage": "x"}\nnot json\n{"v": 1, "at": 5, "round": 2, "sta')
    assert [p["stage"] for p in read_progress(tmp_path)] == ["hello", "collect-masked"]
    assert [p["stage"] for p in read_progress(tmp_path, last=1)] == ["collect-masked"]
    assert read_progress(tmp_path / "absent") == []


def test_tail_read_of_a_long_progress_file(tmp_path):
    for rnd in range(1, 1201):
        append_progress(tmp_path, "share-keys", rnd=rnd, expected=50, received=50)
    assert (tmp_path / PROGRESS_FILE).stat().st_size > 64 * 1024
    last = read_progress(tmp_path, last=2)
    assert [p["round"] for p in last] == [1199, 1200]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _reporter(clock):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    return ProgressReporter(console, clock=clock), out


def _stage(rnd, stage, expected=None, received=None, dropped=None):
    return {"at": 0.0, "round": rnd, "attempt": 0, "stage": stage, "expected": expected, "received": received, "dropped": dropped}


def _round(rnd, status="completed", eps=0.5, **kw):
    return {"round": rnd, "status": status, "sampled": 4, "survived": 4, "dropped": 0, "epsilon": eps, "delta": 1e-5,
            "seconds": 2.0, **kw}


def test_reporter_prints_rounds_and_stages_and_a_heartbeat_when_nothing_changes():
    clock = Clock()
    rep, out = _reporter(clock)
    rep.update(RunView(status=None, planned_rounds=2))
    clock.t = 4.9
    rep.update(RunView(status=None, planned_rounds=2))
    assert out.getvalue() == ""  # not yet 5 s of silence
    clock.t = 5.0
    rep.update(RunView(status=None, planned_rounds=2))
    clock.t = 6.0
    rep.update(RunView(status="running", planned_rounds=2, stage=_stage(1, "hello", expected=4)))
    clock.t = 7.0
    rep.update(RunView(status="running", planned_rounds=2, stage=_stage(1, "collect-masked", 4, 3, 1)))
    clock.t = 8.0
    # Counts changing inside a stage: no new line (the live line or the heartbeat shows them).
    rep.update(RunView(status="running", planned_rounds=2, stage=_stage(1, "collect-masked", 4, 4, 1)))
    clock.t = 13.0
    rep.update(RunView(status="running", planned_rounds=2, stage=_stage(1, "collect-masked", 4, 4, 1)))
    clock.t = 14.0
    rep.update(RunView(status="running", planned_rounds=2, rounds=(_round(1, eps=0.71),), stage=_stage(1, "checkpoint")))
    clock.t = 15.0
    done = RunView(status="completed", planned_rounds=2, rounds=(_round(1, eps=0.71), _round(2, eps=1.02)),
                   stage=_stage(2, "report"))
    rep.update(done)
    clock.t = 40.0
    rep.update(done)  # finished: no heartbeat any more
    assert out.getvalue().splitlines() == [
        "… waiting for the run to start (5 s)",
        "the run is running",
        "round 1/2: hello, waiting for 4",
        "round 1/2: collect-masked, 3 of 4 replies, 1 dropped",
        "… round 1/2: collect-masked, 4 of 4 replies, 1 dropped (6 s in this stage)",
        "round 1/2 released: 4 sampled, 4 survived, ε = 0.71 (2.0 s)",
        "round 1/2: checkpoint",
        "round 2/2 released: 4 sampled, 4 survived, ε = 1.02 (2.0 s)",
    ]
    assert outcome_line(done, 184.0) == "completed: 2 of 2 rounds released, ε = 1.02 at δ = 1e-05, in 3 min 04 s"


def test_outcome_line_of_a_run_that_did_not_complete():
    view = RunView(status="failed", reason="no round could be released", planned_rounds=3,
                   rounds=(_round(1, status="failed", reason="only 1 of 4 sampled devices can take part"),))
    assert outcome_line(view, 12.0, name="Flower run 7") == (
        "failed (Flower run 7): 0 of 3 rounds released, round 1 not released, in 12 s (no round could be released)")
    stopped = RunView(status="stopped", reason="stop requested", planned_rounds=5, rounds=(_round(1), _round(2, eps=0.9)))
    assert outcome_line(stopped) == "stopped: 2 of 5 rounds released, ε = 0.9 at δ = 1e-05 (stop requested)"


def test_watch_a_run_folder_written_by_another_thread(tmp_path):
    """A round as the ServerApp runs it (state, progress lines, the round's line), followed
    live: every stage and round is shown in order, and the watch ends with the run."""
    files = RunFiles(tmp_path)

    def run():
        files.write_state("running", current_round=0)
        for rnd in (1, 2):
            for stage in ("hello", "share-keys", "collect-masked", "unmask"):
                append_progress(tmp_path, stage, rnd=rnd, expected=3, received=0)
                time.sleep(0.15)
            files.append_round(_round(rnd, eps=0.4 * rnd))
            files.write_state("running", current_round=rnd)
        files.write_state("completed", current_round=2)

    writer = threading.Thread(target=run)
    out = io.StringIO()
    reporter = ProgressReporter(Console(file=out, force_terminal=False, width=200), heartbeat_s=5.0)
    writer.start()
    view = watch_run_dir(tmp_path, reporter, poll_s=0.03, planned_rounds=2)
    writer.join()
    lines = out.getvalue().splitlines()
    assert view.status == "completed" and len(view.rounds) == 2
    expected = [f"round {r}/2: {s}, 0 of 3 replies" for r in (1, 2) for s in ("hello", "share-keys", "collect-masked", "unmask")]
    stage_lines = [line for line in lines if ": " in line and "released" not in line]
    assert stage_lines == expected
    released = [line for line in lines if "released" in line]
    assert released == ["round 1/2 released: 4 sampled, 4 survived, ε = 0.4 (2.0 s)",
                        "round 2/2 released: 4 sampled, 4 survived, ε = 0.8 (2.0 s)"]
    assert lines.index(released[0]) < lines.index("round 2/2: hello, 0 of 3 replies")
