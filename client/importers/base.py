"""What every importer shares: input sources (file, folder, zip), the record types an importer
yields, validation, batching into one store transaction, progress and the final report.

An importer is a small class with a ``name``, a ``sniff`` that recognises its format from
content, and ``records`` that streams :class:`~restwise.client.store.Observation`,
:class:`~restwise.client.store.Session` and :class:`CheckinRecord` objects (or
:class:`Skip` markers with a reason) from an :class:`InputSource`. :func:`run_import` does the
rest, so each importer stays a pure parser:

* everything from one import lands in **one** transaction: a malformed file, a crash or
  ``kill -9`` leaves the store exactly as before;
* implausible values (``models.metrics`` ranges), dates before 2000 or in the future and
  unknown metrics are *skipped and counted with a reason*, never stored;
* messages never include a value read from the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import queue
import sys
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from restwise.client.errors import ImportFailedError, MalformedInputError
from restwise.client.store import DeviceStore, Observation, Session, local_day
from restwise.models.metrics import CHECKIN_FIELDS, METRICS

# Dates outside this window are refused as implausible (a device clock reset gives 1970,
# a typo gives 2100).
EARLIEST_TS = int(dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp())

# Zip-bomb guards: a member may not claim or produce more than this many bytes, nor
# decompress more than MAX_RATIO times its compressed size.
MAX_MEMBER_BYTES = 16 * 1024**3
MAX_RATIO = 200
# Observations per hand-over to the store's writer thread (a multiple of the store's
# ROWS_PER_STATEMENT), and how many such batches may wait: together they bound the memory
# an import holds beyond the parser's own (at most 4 batches in flight: ~7 MB).
BATCH = 5_000
PIPELINE_DEPTH = 2
# The store's page cache during an import (KiB, negative as in PRAGMA cache_size; None
# keeps the store's). An import appends: pages are written once and rarely read back, so a
# big cache only defers their encryption to COMMIT and costs RSS.
IMPORT_CACHE_KIB: int | None = -8192


@dataclass(frozen=True, slots=True)
class CheckinRecord:
    """A day's check-in answers on the canonical scales of ``models.metrics``."""

    day: str
    values: dict
    source: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A source record that was not stored, and why (no values in the reason)."""

    reason: str


Record = Observation | Session | CheckinRecord | Skip


@dataclass
class ImportReport:
    format: str
    source_name: str
    inserted: Counter = field(default_factory=Counter)  # metric (or 'checkin'/'session') -> n
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> n
    first_day: str | None = None
    last_day: str | None = None
    records_seen: int = 0

    def note_day(self, day: str) -> None:
        if self.first_day is None or day < self.first_day:
            self.first_day = day
        if self.last_day is None or day > self.last_day:
            self.last_day = day

    @property
    def total_inserted(self) -> int:
        return sum(self.inserted.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "source": self.source_name,
            "inserted": dict(sorted(self.inserted.items())),
            "duplicates": self.duplicates,
            "skipped": dict(sorted(self.skipped.items())),
            "first_day": self.first_day,
            "last_day": self.last_day,
            "records_seen": self.records_seen,
        }


class CountingReader(io.RawIOBase):
    """Wraps a binary stream and counts bytes read, for progress in bytes."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None] | None = None,
                 limit: int | None = None):
        self._raw = raw
        self._on_bytes = on_bytes
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        if self._limit is not None and self.count > self._limit:
            raise MalformedInputError(
                "a compressed member expands far beyond its stated size (zip bomb?); refused"
            )
        if self._on_bytes is not None and n:
            self._on_bytes(n)
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while True:
                chunk = self.read(1 << 20)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class InputSource:
    """A file, a folder or a zip archive, seen as a set of named members.

    ``members()`` lists relative POSIX names; ``open(name)`` returns a counting binary
    stream. Progress is reported in *compressed* bytes read from disk, so the bar reaches
    100% at the end of the file whatever its compression.
    """

    def __init__(self, path: Path | str, on_bytes: Callable[[int], None] | None = None):
        self.path = Path(path)
        self._on_bytes = on_bytes
        if not self.path.exists():
            raise ImportFailedError(f"{self.path} does not exist")
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_file() and zipfile.is_zipfile(self.path):
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise MalformedInputError(f"{self.path.name} is not a readable zip file") from exc
            for info in self._zip.infolist():
                if info.file_size > MAX_MEMBER_BYTES or (
                    info.compress_size > 0 and info.file_size / info.compress_size > MAX_RATIO
                    and info.file_size > 64 * 1024**2
                ):
                    raise MalformedInputError(
                        f"{self.path.name}: member {info.filename!r} would expand to "
                        f"{info.file_size} bytes (zip bomb?); refused"
                    )

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    @property
    def total_bytes(self) -> int:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size

    def members(self) -> list[str]:
        if self._zip is not None:
            names = []
            for info in self._zip.infolist():
                if info.is_dir():
                    continue
                p = PurePosixPath(info.filename)
                if p.is_absolute() or ".." in p.parts:
                    continue  # path tricks are never followed
                names.append(info.filename)
            return names
        if self.path.is_dir():
            return sorted(
                p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()
            )
        return [self.path.name]

    def member_size(self, name: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(name).file_size
        if self.path.is_dir():
            return (self.path / name).stat().st_size
        return self.path.stat().st_size

    def open(self, name: str) -> CountingReader:
        if self._zip is not None:
            info = self._zip.getinfo(name)
            inner = self._zip.open(info)
            # Count compressed bytes for progress by scaling; guard on real expansion.
            ratio = (info.compress_size / info.file_size) if info.file_size else 1.0
            on_bytes = None
            if self._on_bytes is not None:
                cb = self._on_bytes
                on_bytes = lambda n: cb(int(n * ratio))  # noqa: E731
            return CountingReader(inner, on_bytes, limit=info.file_size + 1)
        if self.path.is_dir():
            target = (self.path / name).resolve()
            if self.path.resolve() not in target.parents:
                raise ImportFailedError(f"{name!r} is outside the import folder")
            return CountingReader(open(target, "rb"), self._on_bytes)
        return CountingReader(open(self.path, "rb"), self._on_bytes)

    def head(self, name: str, n: int = 4096) -> bytes:
        if self._zip is not None:
            with self._zip.open(name) as fh:
                return fh.read(n)
        path = self.path / name if self.path.is_dir() else self.path
        with open(path, "rb") as fh:
            return fh.read(n)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


class Importer(Protocol):
    name: str
    description: str

    def sniff(self, source: InputSource) -> bool:
        """True when ``source`` is this importer's format (decided from content)."""

    def records(self, source: InputSource, options: "ImportOptions") -> Iterator[Record]:
        """Stream the records. Raise MalformedInputError on input that cannot be read."""


@dataclass(frozen=True)
class ImportOptions:
    """Options an importer may use. ``tz`` is the person's time zone, used when a source
    gives local times without an offset (check-in CSVs, some Fitbit files)."""

    tz: str | None = None
    column_map: dict | None = None
    person: str | None = None  # dataset loaders: which person's data


class Progress(Protocol):
    def start(self, total_bytes: int) -> None: ...
    def advance(self, n_bytes: int) -> None: ...
    def records(self, n: int) -> None: ...
    def stop(self) -> None: ...


class NullProgress:
    def start(self, total_bytes: int) -> None: ...
    def advance(self, n_bytes: int) -> None: ...
    def records(self, n: int) -> None: ...
    def stop(self) -> None: ...


def _validate(obs: Observation, now: int) -> str | None:
    spec = METRICS.get(obs.metric)
    if spec is None:
        return f"unknown metric {obs.metric}"
    if obs.unit != spec.unit:
        return f"{obs.metric}: unit is not {spec.unit}"
    v = obs.value
    if v != v or v in (float("inf"), float("-inf")):
        return f"{obs.metric}: not a number"
    if not (spec.lo <= v <= spec.hi):
        return f"{obs.metric}: implausible value"
    if obs.ts < EARLIEST_TS or obs.ts > now + 2 * 86400:
        return "date before 2000 or in the future"
    if obs.end_ts is not None and obs.end_ts < obs.ts:
        return f"{obs.metric}: ends before it starts"
    if not -14 * 60 <= obs.tz_offset_min <= 14 * 60:
        return "impossible UTC offset"
    return None


def _validate_day_str(day: str, now: int) -> str | None:
    try:
        d = dt.date.fromisoformat(day)
    except (TypeError, ValueError):
        return "unreadable date"
    if d < dt.date(2000, 1, 1) or d > dt.datetime.fromtimestamp(now + 2 * 86400, dt.UTC).date():
        return "date before 2000 or in the future"
    return None


class _StoreWriter:
    """The store's side of an import, run in a second thread: parsing (Python, holds the
    GIL) and inserting (SQLCipher: b-tree work and page encryption, GIL released) overlap.

    The parser hands over whole batches through a bounded queue, so at most
    ``PIPELINE_DEPTH`` batches wait in memory however far the parser runs ahead. The writer
    only ever touches the connection between :meth:`start` and :meth:`finish`/:meth:`abort`;
    the caller's transaction is begun before and committed or rolled back after, in the
    calling thread, so atomicity is exactly that of a single-threaded import. An error in
    the writer is re-raised in the calling thread at its next hand-over (or at ``finish``);
    an error in the parser aborts the writer before the rollback.
    """

    _DONE = object()

    def __init__(self, store: DeviceStore, conn, report: "ImportReport"):
        self._store = store
        self._conn = conn
        self._report = report
        self._queue: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="restwise-import-writer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        report, store, conn = self._report, self._store, self._conn
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is not None or self._cancelled:
                continue  # keep draining so the parser never blocks on a full queue
            kind, payload = item
            try:
                if kind == "obs":
                    res = store.add_observations(payload, conn=conn,
                                                 inserted_by_metric=report.inserted)
                elif kind == "session":
                    res = store.add_sessions([payload], conn=conn)
                    report.inserted["session"] += res.inserted
                else:  # "checkin"
                    store.upsert_checkin(payload.day, payload.values, source=payload.source,
                                         conn=conn)
                    report.inserted["checkin"] += 1
                    continue
                report.duplicates += res.duplicates
            except BaseException as exc:  # handed to the parser's thread, never lost
                self._error = exc

    def put(self, kind: str, payload) -> None:
        """Hand work over; raises the writer's error if it has failed."""
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put((kind, payload), timeout=0.05)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until everything handed over is in the transaction; raise a writer error."""
        self._queue.put(self._DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop without writing what is still queued; returns once the writer is idle."""
        if self._thread.is_alive():
            self._cancelled = True
            self._queue.put(self._DONE)
            self._thread.join()


def _accept_table() -> dict[str, tuple[str, float, float]]:
    """metric -> (unit, lo, hi) for the fast acceptance test in :func:`run_import`. Bounds
    are clamped to finite floats so ``lo <= v <= hi`` also refuses NaN and infinities,
    exactly like :func:`_validate`."""
    return {
        name: (spec.unit, max(float(spec.lo), -sys.float_info.max),
               min(float(spec.hi), sys.float_info.max))
        for name, spec in METRICS.items()
    }


def run_import(
    store: DeviceStore,
    path: Path | str,
    importer: Importer | None = None,
    *,
    options: ImportOptions | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import ``path`` into ``store`` in one transaction and return what happened.

    The importer parses in the calling thread while a second thread inserts (see
    :class:`_StoreWriter`); either failing rolls the whole import back.
    """
    from restwise.client.importers import detect_format  # late: the registry imports us

    options = options or ImportOptions()
    progress = progress or NullProgress()
    source = InputSource(path, on_bytes=progress.advance)
    try:
        if importer is None:
            importer = detect_format(source)
        else:
            try:
                recognised = importer.sniff(source)
            except ImportFailedError:
                raise
            except Exception:  # a damaged file can trip a sniffer; it is still the file's fault
                recognised = False
            if not recognised:
                raise MalformedInputError(
                    f"{Path(path).name} does not look like a {importer.name} export"
                )
        report = ImportReport(format=importer.name, source_name=Path(path).name)
        started = int(time.time())
        now = int(time.time())
        latest_ts = now + 2 * 86400
        accept = _accept_table()
        progress.start(source.total_bytes)
        obs_batch: list[Observation] = []
        # Local-time extremes of stored observations (seconds), turned into days at the end:
        # cheaper than formatting a day per record on the hot path.
        lo_local, hi_local = 2**62, -(2**62)
        seen = 0
        cache_before = store.conn.execute("PRAGMA cache_size").fetchone()[0]
        if IMPORT_CACHE_KIB is not None:
            store.conn.execute(f"PRAGMA cache_size = {int(IMPORT_CACHE_KIB)}")
        with contextlib.ExitStack() as restore, store.transaction() as conn:
            restore.callback(conn.execute, f"PRAGMA cache_size = {int(cache_before)}")
            writer = _StoreWriter(store, conn, report)
            writer.start()
            try:
                skipped = report.skipped
                for seen, rec in enumerate(importer.records(source, options), 1):  # noqa: B007
                    if type(rec) is Observation:
                        # The common case inline: every check of _validate, which is only
                        # called to name the reason when one fails.
                        metric, ts, value, unit, _, _, end_ts, tz_min, _ = rec
                        spec = accept.get(metric)
                        if (spec is None or unit != spec[0] or not spec[1] <= value <= spec[2]
                                or not EARLIEST_TS <= ts <= latest_ts
                                or (end_ts is not None and end_ts < ts)
                                or not -840 <= tz_min <= 840):
                            why = _validate(rec, now)
                            if why:
                                skipped[why] += 1
                                continue
                        local = ts + tz_min * 60
                        if local < lo_local:
                            lo_local = local
                        if local > hi_local:
                            hi_local = local
                        obs_batch.append(rec)
                        if len(obs_batch) >= BATCH:
                            writer.put("obs", obs_batch)
                            obs_batch = []
                            progress.records(seen)
                    elif isinstance(rec, Skip):
                        skipped[rec.reason] += 1
                    elif isinstance(rec, Observation):  # a subclass: the general path
                        why = _validate(rec, now)
                        if why:
                            skipped[why] += 1
                            continue
                        local = rec.ts + rec.tz_offset_min * 60
                        lo_local = min(lo_local, local)
                        hi_local = max(hi_local, local)
                        obs_batch.append(rec)
                        if len(obs_batch) >= BATCH:
                            writer.put("obs", obs_batch)
                            obs_batch = []
                    elif isinstance(rec, Session):
                        why = _validate_day_str(rec.day, now)
                        if why is None and not (0 <= rec.minutes <= 1440 and rec.load >= 0):
                            why = "session: implausible duration or load"
                        if why:
                            skipped[why] += 1
                            continue
                        writer.put("session", rec)
                        report.note_day(rec.day)
                    elif isinstance(rec, CheckinRecord):
                        why = _validate_day_str(rec.day, now)
                        if why is None:
                            for k, v in rec.values.items():
                                lo, hi = CHECKIN_FIELDS.get(k, (None, None))
                                if lo is None:
                                    why = f"check-in: unknown field {k}"
                                elif v is not None and not (lo <= v <= hi):
                                    why = f"check-in {k}: outside its scale"
                        if why:
                            skipped[why] += 1
                            continue
                        writer.put("checkin", rec)
                        report.note_day(rec.day)
                    else:  # pragma: no cover - programming error in an importer
                        raise TypeError(f"importer yielded {type(rec).__name__}")
                report.records_seen = seen
                if obs_batch:
                    writer.put("obs", obs_batch)
                    obs_batch = []
                writer.finish()
                if hi_local >= lo_local:
                    report.note_day(local_day(lo_local, 0))
                    report.note_day(local_day(hi_local, 0))
            except ImportFailedError:
                raise
            except (ValueError, KeyError, IndexError, UnicodeDecodeError, OSError, EOFError,
                    zipfile.BadZipFile, zlib.error) as exc:
                # A parser tripped over the content: refuse the whole file, name the problem
                # by type only (the exception text may quote personal values).
                report.records_seen = seen
                raise MalformedInputError(
                    f"{Path(path).name}: the {importer.name} file is malformed "
                    f"({type(exc).__name__} after {report.records_seen} records); "
                    "nothing was imported"
                ) from None
            finally:
                # On any failure the writer must be idle before the transaction rolls back.
                writer.abort()
            progress.records(report.records_seen)
            store.log_import(
                importer.name, report.source_name, started, report.total_inserted,
                report.duplicates, report.total_skipped, report.as_dict(), conn=conn,
            )
        return report
    finally:
        progress.stop()
        source.close()


def utc_ts(d: dt.datetime) -> int:
    """Epoch seconds of an aware datetime."""
    if d.tzinfo is None:
        raise ValueError("naive datetime")
    return int(d.timestamp())


def offset_minutes(d: dt.datetime) -> int:
    off = d.utcoffset()
    return 0 if off is None else int(off.total_seconds() // 60)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
