"""The import pipeline: parser and store writer in two threads, multi-row observation
inserts. Atomicity (a failure on either side leaves the store exactly as before, and no
writer thread is left behind), exact per-metric counts with duplicates, local days computed
by SQLite equal to :func:`local_day`, NULLs refused rather than silently skipped."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from restwise.client.errors import MalformedInputError
from restwise.client.importers import base, run_import
from restwise.client.importers.apple_health import AppleHealthImporter
from restwise.client.importers.base import Skip
from restwise.client.store import ROWS_PER_STATEMENT, Observation, local_day, record_key

T0 = 1_700_000_000  # 2023-11-14


def _obs(i: int, metric: str = "heart_rate", *, ts: int | None = None, off: int = 60,
         end: int | None = None) -> Observation:
    unit = {"heart_rate": "bpm", "steps": "count", "hrv_sdnn": "ms"}[metric]
    return Observation(metric, T0 + 60 * i if ts is None else ts, 40.0 + i % 100, unit,
                       "pipeline-test", record_key("pipeline-test", metric, i), end, off,
                       "watch")


def _snapshot(store) -> tuple:
    c = store.conn
    return (
        c.execute("SELECT count(*), total(value), min(id), max(id) FROM observations").fetchone(),
        c.execute("SELECT count(*) FROM imports").fetchone(),
        c.execute("SELECT count(*) FROM checkins").fetchone(),
    )


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "restwise-import-writer"]


class ListImporter:
    """A real (if trivial) importer: yields the records it was given, then optionally fails
    the way a parser does on damaged content."""

    name = "list"
    description = "records from a list"

    def __init__(self, records, fail_with: BaseException | None = None):
        self._records = records
        self._fail_with = fail_with

    def sniff(self, source) -> bool:
        return True

    def records(self, source, options):
        yield from self._records
        if self._fail_with is not None:
            raise self._fail_with


@pytest.fixture
def any_file(tmp_path) -> Path:
    p = tmp_path / "input.txt"
    p.write_text("records come from the importer\n")
    return p


# ------------------------------------------------------------------ store: multi-row inserts
@pytest.mark.parametrize("n", [1, 7, ROWS_PER_STATEMENT - 1, ROWS_PER_STATEMENT,
                               2 * ROWS_PER_STATEMENT + 13])
def test_every_row_lands_once_whatever_the_chunking(new_store, n):
    rows = [_obs(i, "heart_rate" if i % 3 else "steps") for i in range(n)]
    res = new_store.add_observations(iter(rows))  # a generator: consumed in chunks
    assert (res.inserted, res.duplicates) == (n, 0)
    stored = new_store.conn.execute(
        "SELECT metric, ts, value, unit, source, record_key, end_ts, tz_offset_min, device "
        "FROM observations ORDER BY id"
    ).fetchall()
    assert [Observation(*r) for r in stored] == rows  # order and every field kept
    again = new_store.add_observations(rows)
    assert (again.inserted, again.duplicates) == (0, n)


def test_local_day_from_sqlite_matches_python(new_store):
    # Day boundaries in UTC and local time, the extreme offsets, negative offsets.
    cases = []
    for k, off in enumerate((-840, -600, -1, 0, 1, 60, 330, 345, 840)):
        for j, delta in enumerate((-1, 0, 1, 3599, 86399)):
            ts = 1_704_067_200 - off * 60 + delta  # around local midnight 2024-01-01
            cases.append(Observation("heart_rate", ts, 60.0, "bpm", "t",
                                     record_key(k, j), None, off, None))
    new_store.add_observations(cases)
    got = new_store.conn.execute(
        "SELECT ts, tz_offset_min, local_day FROM observations ORDER BY id"
    ).fetchall()
    assert [d for _, _, d in got] == [local_day(o.ts, o.tz_offset_min) for o in cases]
    assert {d for _, _, d in got} == {"2023-12-31", "2024-01-01"}


def test_inserted_by_metric_is_exact_with_duplicates(new_store):
    first = [_obs(i, m) for i in range(0, 3000, 2) for m in ("heart_rate", "steps")]
    new_store.add_observations(first)
    # Half of these are already stored (even i), spread across both statements' chunks.
    mixed = [_obs(i, m) for i in range(3000) for m in ("heart_rate", "steps", "hrv_sdnn")]
    counts: Counter = Counter()
    res = new_store.add_observations(mixed, inserted_by_metric=counts)
    assert counts == {"heart_rate": 1500, "steps": 1500, "hrv_sdnn": 3000}
    assert (res.inserted, res.duplicates) == (6000, 3000)
    counts.clear()
    res = new_store.add_observations(mixed, inserted_by_metric=counts)
    assert sum(counts.values()) == 0 and res.duplicates == len(mixed)


def test_a_null_required_field_is_an_error_not_a_silent_skip(new_store):
    bad = _obs(1)._replace(tz_offset_min=None)  # no local day can be computed
    with pytest.raises(Exception, match="NOT NULL"):
        new_store.add_observations([_obs(0), bad])
    assert new_store.conn.execute("SELECT count(*) FROM observations").fetchone()[0] == 0


# ------------------------------------------------------------------ run_import: two threads
def test_pipeline_imports_many_batches_with_exact_report(new_store, any_file):
    n = 3 * base.BATCH + 17
    recs: list = []
    for i in range(n):
        recs.append(_obs(i, "heart_rate" if i % 4 else "steps"))
        if i % 1000 == 0:
            recs.append(Skip("record type not used by Restwise"))
            recs.append(_obs(i)._replace(value=900.0, record_key=record_key("absurd", i)))
    report = run_import(new_store, any_file, ListImporter(recs))
    assert report.inserted == {"heart_rate": n - (n + 3) // 4, "steps": (n + 3) // 4}
    assert report.records_seen == len(recs)
    assert report.skipped == {"record type not used by Restwise": n // 1000 + 1,
                              "heart_rate: implausible value": n // 1000 + 1}
    assert report.first_day == local_day(T0, 60) and report.last_day == local_day(
        T0 + 60 * (n - 1), 60)
    assert new_store.conn.execute("SELECT count(*) FROM observations").fetchone()[0] == n
    again = run_import(new_store, any_file, ListImporter(recs))
    assert again.total_inserted == 0 and again.duplicates == n
    assert not _writer_threads()


def test_parser_failure_after_several_batches_rolls_everything_back(new_store, any_file):
    new_store.add_observations([_obs(i) for i in range(10)])
    before = _snapshot(new_store)
    recs = [_obs(100 + i) for i in range(3 * base.BATCH + 5)]
    with pytest.raises(MalformedInputError, match=f"after {len(recs)} records"):
        run_import(new_store, any_file, ListImporter(recs, fail_with=ValueError("bad")))
    assert _snapshot(new_store) == before
    assert not _writer_threads()


def test_interrupt_in_the_parser_rolls_back_and_stops_the_writer(new_store, any_file):
    before = _snapshot(new_store)
    recs = [_obs(i) for i in range(2 * base.BATCH + 1)]
    with pytest.raises(KeyboardInterrupt):
        run_import(new_store, any_file, ListImporter(recs, fail_with=KeyboardInterrupt()))
    assert _snapshot(new_store) == before
    assert not _writer_threads()


def test_writer_failure_is_raised_and_rolls_back(new_store, any_file, monkeypatch):
    new_store.add_observations([_obs(i) for i in range(10)])
    before = _snapshot(new_store)
    real = type(new_store).add_observations
    calls = []

    def failing_second_batch(self, observations, **kw):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(self, observations, **kw)

    monkeypatch.setattr(type(new_store), "add_observations", failing_second_batch)
    recs = [_obs(100 + i) for i in range(6 * base.BATCH)]
    with pytest.raises(RuntimeError, match="disk full"):
        run_import(new_store, any_file, ListImporter(recs))
    assert calls[0] == "restwise-import-writer"  # the inserts did run in the writer thread
    assert len(calls) == 2  # nothing was written after the failure
    monkeypatch.undo()
    assert _snapshot(new_store) == before
    assert not _writer_threads()
    # The store is usable afterwards: the connection is not left inside a transaction.
    assert run_import(new_store, any_file, ListImporter(recs)).total_inserted == len(recs)


def test_truncated_apple_export_after_many_batches_leaves_store_unchanged(new_store, tmp_path):
    head = '<?xml version="1.0" encoding="UTF-8"?>\n<HealthData locale="en_GB">\n'
    rec = ('<Record type="HKQuantityTypeIdentifierHeartRate" sourceName="W" unit="count/min" '
           'startDate="{d} +0100" endDate="{d} +0100" value="{v}"/>\n')
    lines = [head]
    for i in range(2 * base.BATCH + 100):
        m = i % (24 * 60)
        d = f"2023-{1 + i // (28 * 24 * 60):02d}-{1 + (i // (24 * 60)) % 28:02d} {m // 60:02d}:{m % 60:02d}:00"
        lines.append(rec.format(d=d, v=50 + i % 60))
    full = "".join(lines)
    good = tmp_path / "export.xml"
    good.write_text(full + "</HealthData>\n")
    report = run_import(new_store, good, AppleHealthImporter())
    assert report.inserted == {"heart_rate": 2 * base.BATCH + 100}
    before = _snapshot(new_store)
    cut = tmp_path / "cut" / "export.xml"
    cut.parent.mkdir()
    cut.write_text(full[: len(full) - 40])  # mid-record, no closing root
    with pytest.raises(MalformedInputError, match="not well-formed"):
        run_import(new_store, cut, AppleHealthImporter())
    assert _snapshot(new_store) == before
    assert not _writer_threads()


def test_import_page_cache_is_restored_after_success_and_failure(new_store, any_file):
    before = new_store.conn.execute("PRAGMA cache_size").fetchone()[0]
    assert before != base.IMPORT_CACHE_KIB
    run_import(new_store, any_file, ListImporter([_obs(i) for i in range(10)]))
    assert new_store.conn.execute("PRAGMA cache_size").fetchone()[0] == before
    with pytest.raises(MalformedInputError):
        run_import(new_store, any_file, ListImporter([_obs(99)], fail_with=KeyError("x")))
    assert new_store.conn.execute("PRAGMA cache_size").fetchone()[0] == before
