"""`device export` then `device import` into a fresh store gives a byte-identical second
export: a property over 200 generated stores (real SQLCipher files, the real importer with
format auto-detection), plus the command line once."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from restwise.client.importers import run_import
from restwise.client.keys import FileKeystore
from restwise.client.store import LOAD_KINDS, DeviceStore, Observation, Session
from restwise.models.metrics import CHECKIN_FIELDS, METRICS

NOW = int(time.time())
TS = st.integers(int(dt.datetime(2000, 1, 2, tzinfo=dt.UTC).timestamp()), NOW - 86400)
DAYS = st.dates(dt.date(2000, 1, 2), dt.date.today() - dt.timedelta(days=1)).map(dt.date.isoformat)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
KEYS = st.binary(min_size=16, max_size=16)


@st.composite
def observations(draw):
    metric = draw(st.sampled_from(sorted(METRICS)))
    spec = METRICS[metric]
    ts = draw(TS)
    end = draw(st.none() | st.integers(ts, ts + 86400))
    return Observation(
        metric=metric, ts=ts, end_ts=end,
        value=draw(st.floats(spec.lo, spec.hi, allow_nan=False, allow_infinity=False)),
        unit=spec.unit, source=draw(TEXT), record_key=draw(KEYS),
        tz_offset_min=draw(st.integers(-840, 840)), device=draw(st.none() | TEXT),
    )


@st.composite
def checkins(draw):
    fields = draw(st.sets(st.sampled_from(sorted(CHECKIN_FIELDS))))
    values = {f: draw(st.floats(*CHECKIN_FIELDS[f], allow_nan=False)) for f in fields}
    return (draw(DAYS), values, draw(TEXT), draw(st.booleans()), draw(st.integers(0, NOW)))


@st.composite
def sessions(draw):
    return Session(
        day=draw(DAYS), minutes=draw(st.floats(0, 1440, allow_nan=False)),
        load=draw(st.floats(0, 1e5, allow_nan=False)), source=draw(TEXT), record_key=draw(KEYS),
        rpe=draw(st.none() | st.floats(0, 10, allow_nan=False)),
        start_ts=draw(st.none() | TS), kind=draw(st.none() | TEXT),
        load_kind=draw(st.sampled_from(LOAD_KINDS)),
    )


@st.composite
def stores(draw):
    return {
        "observations": draw(st.lists(observations(), max_size=12)),
        "checkins": draw(st.lists(checkins(), max_size=5, unique_by=lambda c: c[0])),
        "sessions": draw(st.lists(sessions(), max_size=5)),
        "egress": draw(st.lists(st.tuples(TEXT, st.none() | st.integers(0, 999), TEXT,
                                          st.integers(0, 10**6)), max_size=3)),
        "consent": draw(st.lists(st.tuples(TEXT, st.booleans()), max_size=3, unique_by=lambda c: c[0])),
        "imports": draw(st.lists(st.tuples(TEXT, TEXT, st.integers(0, 10**6)), max_size=2)),
    }


def fill(store: DeviceStore, content: dict) -> None:
    store.add_observations(content["observations"])
    for day, values, source, override, updated in content["checkins"]:
        store.upsert_checkin(day, values, source=source, is_override=override, updated_at=updated)
    store.add_sessions(content["sessions"])
    for run, rnd, kind, n in content["egress"]:
        store.log_egress(run, rnd, kind, [{"name": kind, "bytes": n}], n, f"{n:064x}")
    for scope, allowed in content["consent"]:
        store.set_consent(scope, allowed)
    with store.transaction() as conn:
        for fmt, name, n in content["imports"]:
            store.log_import(fmt, name, NOW - n, n, 0, 0, {"inserted": {fmt: n}}, conn=conn)


def has_rows(content: dict) -> bool:
    return any(content[k] for k in ("observations", "checkins", "sessions", "egress", "consent", "imports"))


_WORK = Path(tempfile.mkdtemp(prefix="restwise-roundtrip-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
_KEYSTORE = FileKeystore(_WORK / "keystore")  # raw-key opens: no Argon2 per generated store
_COUNTER = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _remove_work_folder():
    """Generated stores live in memory (/dev/shm) and go with their keys after the module."""
    yield
    shutil.rmtree(_WORK, ignore_errors=True)


def export_bytes(store: DeviceStore) -> bytes:
    return ("\n".join(store.export_lines()) + "\n").encode("utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stores())
def test_export_import_export_is_byte_identical(content):
    assume(has_rows(content))
    n = next(_COUNTER)
    first = DeviceStore.create(_WORK / f"a{n}", keystore=_KEYSTORE)
    try:
        fill(first, content)
        exported = export_bytes(first)
    finally:
        first.close()
    path = _WORK / f"export{n}.jsonl"
    path.write_bytes(exported)
    second = DeviceStore.create(_WORK / f"b{n}", keystore=_KEYSTORE)
    try:
        report = run_import(second, path)  # auto-detected
        assert report.format == "restwise_jsonl" and report.restored
        assert report.skipped == {} and report.duplicates == 0
        assert export_bytes(second) == exported
        assert second.summary()["imports"] == len(content["imports"])  # the restore is not one
        # importing the export again adds nothing twice
        again = run_import(second, path)
        assert again.total_inserted == sum(1 for _ in content["checkins"])  # check-ins upsert
        assert export_bytes(second) == exported
    finally:
        second.close()
        for p in (path, *(_WORK / f"{x}{n}" for x in "ab")):
            if p.is_dir():
                for f in p.iterdir():
                    f.unlink()
                p.rmdir()
            else:
                p.unlink(missing_ok=True)


def test_cli_export_import_export(tmp_path):
    """The same through the command line: export, import (auto-detected) into a new store,
    export again: identical bytes, and the import says it restored an export."""
    from restwise.simulation.fleet import write_demo_export

    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTWISE_")}
    env["RESTWISE_PASSPHRASE_FILE"] = str(tmp_path / "pass")
    (tmp_path / "pass").write_text("violet tractor sunrise pebble\n")
    cli = [sys.executable, "-m", "restwise.cli", "device"]

    def run(*args):
        r = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        return r

    demo = write_demo_export(5, tmp_path / "demo.jsonl", days=30)
    run("init", "--store", str(tmp_path / "a"))
    run("import", str(demo), "--store", str(tmp_path / "a"), "-q")
    run("export", str(tmp_path / "one.jsonl"), "--store", str(tmp_path / "a"))
    run("init", "--store", str(tmp_path / "b"))
    r = run("import", str(tmp_path / "one.jsonl"), "--store", str(tmp_path / "b"), "-q")
    assert "restored export" in r.stdout and "restwise_jsonl" in r.stdout
    run("export", str(tmp_path / "two.jsonl"), "--store", str(tmp_path / "b"))
    one, two = (tmp_path / "one.jsonl").read_bytes(), (tmp_path / "two.jsonl").read_bytes()
    assert one == two
    first = json.loads(one.splitlines()[0])
    assert first == {"table": "restwise_export", "version": 2}
    tables = {json.loads(line)["table"] for line in one.splitlines()[1:]}
    assert {"observations", "checkins", "sessions", "imports"} <= tables
