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
* a folder or zip is planned file by file (:func:`plan_import`): each file goes to the
  importer that recognises its *content*; a file nobody recognises, a damaged file or a link
  leading out of the folder is skipped and listed with its reason while the rest imports in
  the same transaction (``strict=True``: one format for everything, any damage refuses all);
* an import that stores nothing raises :class:`NothingImportedError` (exit 9) with the
  reasons, and leaves the store unchanged;
* messages never include a value read from the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import os
import queue
import sys
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from restwise.client.errors import (
    ArchiveRefusedError,
    ImportFailedError,
    MalformedInputError,
    NothingImportedError,
    UnknownFormatError,
)
from restwise.client.importers.registry import (
    available_formats,
    candidate_importers,
    detect_format,
    sniffs,
)
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
    """A day's check-in answers on the canonical scales of ``models.metrics``.
    ``is_override`` and ``updated_at`` come back from a restored export only."""

    day: str
    values: dict
    source: str
    is_override: bool = False
    updated_at: int | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    """A source record that was not stored, and why (no values in the reason)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the person should be told once about this import (e.g. that times without
    an offset were taken as UTC). No values from the file."""

    text: str


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """The first line of a Restwise export: the import is a restore of a whole store."""

    version: int


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """A row of the device's own history from a restored export: ``egress_log``,
    ``consent`` or ``imports``."""

    table: str
    row: dict


HISTORY_TABLES = ("egress_log", "consent", "imports", "run_keys", "ledger_entries", "spends", "run_alarms",
                  "owner_settings")

#: Said once when local times without an offset were read as UTC.
UTC_ASSUMED = (
    "times without a UTC offset were taken as UTC (pass --tz with your time zone, e.g. "
    "--tz Europe/Oslo, to place them in your local time)"
)
#: Said once when timestamps with an offset became days in UTC for lack of --tz.
UTC_DAYS_ASSUMED = (
    "timestamps were turned into days in UTC (pass --tz with your time zone, e.g. "
    "--tz Europe/Oslo, so they fall on your own local days)"
)


Record = Observation | Session | CheckinRecord | Skip | Notice | ExportHeader | HistoryRecord


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
    skipped_files: list = field(default_factory=list)  # (file, reason): not imported
    damaged_files: list = field(default_factory=list)  # (file, reason): the subset found damaged
    notes: list = field(default_factory=list)  # said once to the person
    restored: bool = False  # the input was a whole-store export (history restored too)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: "ImportReport") -> None:
        """Add a planned group's report (see :func:`run_import`)."""
        self.inserted.update(other.inserted)
        self.duplicates += other.duplicates
        self.skipped.update(other.skipped)
        self.records_seen += other.records_seen
        for day in (other.first_day, other.last_day):
            if day is not None:
                self.note_day(day)
        for text in other.notes:
            self.note(text)
        self.restored = self.restored or other.restored

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
            "skipped_files": [list(x) for x in self.skipped_files],
            "notes": list(self.notes),
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
            raise ArchiveRefusedError(
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

    In a folder, links to regular files *inside the folder the person named* are followed;
    a link leading outside it, to a folder, or to nothing, and anything that is not a regular
    file, is not read and is listed in :attr:`skipped` with the reason. In a zip, a member
    whose path leaves the archive (``../``, absolute) is listed the same way. ``exclude``
    names members (relative paths) that are not part of the import at all (a cohort's
    ``column-map.json``).
    """

    def __init__(self, path: Path | str, on_bytes: Callable[[int], None] | None = None,
                 exclude: Iterable[str] = (), link_root: Path | str | None = None):
        self.path = Path(path)
        self._on_bytes = on_bytes
        self._exclude = frozenset(exclude)
        # Links may lead anywhere inside this folder (the one the person named; a cohort's
        # person folder is read with the cohort folder as its boundary).
        self._link_root = Path(link_root) if link_root is not None else self.path
        self.skipped: list[tuple[str, str]] = []
        self._members: list[str] | None = None
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
                    raise ArchiveRefusedError(
                        f"{self.path.name}: member {info.filename!r} would expand to "
                        f"{info.file_size} bytes (zip bomb?); refused"
                    )

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    @property
    def is_single_file(self) -> bool:
        return self._zip is None and not self.path.is_dir()

    @property
    def total_bytes(self) -> int:
        if self.path.is_dir():
            return sum(self.member_size(m) for m in self.members())
        return self.path.stat().st_size

    def members(self) -> list[str]:
        if self._members is None:
            self._members = self._list_members()
        return list(self._members)

    def _list_members(self) -> list[str]:
        if self._zip is not None:
            names = []
            for info in self._zip.infolist():
                if info.is_dir() or info.filename in self._exclude:
                    continue
                p = PurePosixPath(info.filename)
                if p.is_absolute() or ".." in p.parts:
                    # path tricks are never followed
                    self.skipped.append((info.filename, "a path leading out of the archive: not read"))
                    continue
                names.append(info.filename)
            return names
        if self.path.is_dir():
            return self._walk_folder()
        return [self.path.name]

    def _walk_folder(self) -> list[str]:
        root = self.path
        root_real = self._link_root.resolve()
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            dirnames.sort()
            for d in list(dirnames):
                if (here / d).is_symlink():
                    dirnames.remove(d)  # os.walk would not descend into it either
                    rel = (here / d).relative_to(root).as_posix()
                    if rel not in self._exclude:
                        self.skipped.append((rel, "a link to a folder: not followed"))
            for name in sorted(filenames):
                p = here / name
                rel = p.relative_to(root).as_posix()
                if rel in self._exclude:
                    continue
                if p.is_symlink():
                    target = p.resolve()
                    if not target.exists():
                        self.skipped.append((rel, "a link to nothing (broken link)"))
                    elif target != root_real and root_real not in target.parents:
                        self.skipped.append(
                            (rel, "a link to a file outside the folder you named: not followed"))
                    elif not target.is_file():
                        self.skipped.append((rel, "a link to something that is not a regular file"))
                    else:
                        out.append(rel)
                elif p.is_file():
                    out.append(rel)
                else:
                    self.skipped.append((rel, "not a regular file"))
        return sorted(out)

    def member_size(self, name: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(name).file_size
        if self.path.is_dir():
            return self._folder_member(name).stat().st_size
        return self.path.stat().st_size

    def _folder_member(self, name: str) -> Path:
        target = (self.path / name).resolve()
        if self._link_root.resolve() not in target.parents:
            raise ImportFailedError(f"{name!r} is outside the import folder")
        return target

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
            return CountingReader(open(self._folder_member(name), "rb"), self._on_bytes)
        return CountingReader(open(self.path, "rb"), self._on_bytes)

    def head(self, name: str, n: int = 4096) -> bytes:
        if self._zip is not None:
            with self._zip.open(name) as fh:
                return fh.read(n)
        path = self._folder_member(name) if self.path.is_dir() else self.path
        with open(path, "rb") as fh:
            return fh.read(n)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


class MemberView:
    """Some members of an :class:`InputSource`, seen as a source of their own (what one
    importer gets of a planned folder). Remembers the member read last, so a parse error
    can be blamed on the right file."""

    def __init__(self, source: InputSource, members: Iterable[str]):
        self._source = source
        self._members = list(members)
        self.path = source.path
        self.current: str | None = None

    @property
    def is_zip(self) -> bool:
        return self._source.is_zip

    @property
    def total_bytes(self) -> int:
        return sum(self._source.member_size(m) for m in self._members)

    def members(self) -> list[str]:
        return list(self._members)

    def member_size(self, name: str) -> int:
        return self._source.member_size(name)

    def open(self, name: str) -> CountingReader:
        self.current = name
        return self._source.open(name)

    def head(self, name: str, n: int = 4096) -> bytes:
        self.current = name
        return self._source.head(name, n)

    def close(self) -> None:
        """The underlying source is closed by its owner."""


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
    gives local times without an offset (check-in CSVs, some Fitbit files) and to turn
    timestamps into the person's local days. ``column_map``: a check-in CSV column map, or
    per-file maps ``{"files": {"wellness*.csv": {...}, ...}}`` (see
    :mod:`restwise.client.importers.checkin_csv`)."""

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
        history_seen: Counter = Counter()  # identical history rows so far (see restore_egress)
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
                elif kind == "checkin":
                    store.upsert_checkin(payload.day, payload.values, source=payload.source,
                                         conn=conn, is_override=payload.is_override,
                                         updated_at=payload.updated_at)
                    report.inserted["checkin"] += 1
                    continue
                else:  # "history": a restored export's own log rows
                    restore = {"egress_log": store.restore_egress, "consent": store.restore_consent,
                               "imports": store.restore_import_log,
                               "owner_settings": store.restore_owner_setting}.get(payload.table)
                    if restore is None:  # receipts, spends, keys, alarms
                        restore = functools.partial(store.restore_receipt_row, payload.table)
                    identity = (payload.table, tuple(sorted(payload.row.items())))
                    history_seen[identity] += 1
                    if restore(payload.row, conn=conn, occurrence=history_seen[identity]):
                        report.inserted[payload.table] += 1
                    else:
                        report.duplicates += 1
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


@dataclass
class ImportPlan:
    """Which importer reads which files of a source, and which files are not read (why)."""

    groups: list  # [(importer, MemberView | InputSource)]
    skipped_files: list  # [(member, reason)]
    whole: bool  # one importer reads the whole source (a single file, --strict, a dataset)


NOT_RECOGNISED = "not a format Restwise reads"


def plan_import(
    source: InputSource,
    importer: Importer | None = None,
    options: ImportOptions | None = None,
    *,
    strict: bool = False,
) -> ImportPlan:
    """Plan an import of ``source``.

    A single file, or ``strict``: one importer for the whole source (given, or detected), as
    all-or-nothing as before. A folder or zip: formats that read a whole tree (research
    datasets) first; otherwise every file goes to the first importer that recognises *its*
    content; files nobody recognises (or whose content cannot be read) are listed with the
    reason. Raises UnknownFormatError when no file at all is recognised."""
    options = options or ImportOptions()
    members = source.members()  # fills source.skipped (links out of the folder, ...)
    if isinstance(source, InputSource) and (source.is_single_file or strict):
        if strict and source.skipped:
            name, why = source.skipped[0]
            raise MalformedInputError(f"{name}: {why} (--strict: nothing was imported)")
        if importer is None:
            importer = detect_format(source, options)
        elif not sniffs(importer, source):
            raise MalformedInputError(f"{source.path.name} does not look like a {importer.name} export")
        return ImportPlan([(importer, source)], [], whole=True)
    candidates = [importer] if importer is not None else candidate_importers(options)
    for imp in candidates:
        if getattr(imp, "whole_source", False) and sniffs(imp, source):
            return ImportPlan([(imp, source)], list(source.skipped), whole=True)
    per_file = [imp for imp in candidates if not getattr(imp, "whole_source", False)]
    claimed: dict[str, tuple[Importer, list[str]]] = {}
    skipped: list[tuple[str, str]] = list(source.skipped)
    for member in members:
        view = MemberView(source, [member])
        reason = NOT_RECOGNISED if importer is None else f"not a {importer.name} file"
        owner = None
        for imp in per_file:
            try:
                if sniffs(imp, view):
                    owner = imp
                    break
            except MalformedInputError as exc:  # damaged inside the archive, ...
                reason = _file_reason(exc, member)
                break
            except ImportFailedError:
                continue
        if owner is None:
            skipped.append((member, reason))
        elif getattr(owner, "single_file", False):
            claimed[f"{owner.name}:{member}"] = (owner, [member])
        else:
            claimed.setdefault(owner.name, (owner, []))[1].append(member)
    if not claimed:
        detail = "; ".join(f"{m}: {why}" for m, why in skipped[:5])
        if importer is not None:
            raise MalformedInputError(
                f"{source.path.name} does not look like a {importer.name} export"
                + (f" ({detail}{', ...' if len(skipped) > 5 else ''})" if detail else "")
            )
        raise UnknownFormatError(
            f"{source.path.name}: no file in it is a format Restwise can import"
            + (f" ({detail}{', ...' if len(skipped) > 5 else ''})" if detail else "")
            + f" (known: {', '.join(available_formats())})"
        )
    groups = [(imp, MemberView(source, ms)) for imp, ms in claimed.values()]
    return ImportPlan(groups, skipped, whole=False)


def run_import(
    store: DeviceStore,
    path: Path | str,
    importer: Importer | None = None,
    *,
    options: ImportOptions | None = None,
    progress: Progress | None = None,
    strict: bool = False,
    exclude: Iterable[str] = (),
    link_root: Path | str | None = None,
) -> ImportReport:
    """Import ``path`` into ``store`` in one transaction and return what happened.

    ``path`` is planned with :func:`plan_import`. Each planned group is parsed in the calling
    thread while a second thread inserts (see :class:`_StoreWriter`), inside a savepoint: when
    a file of a folder turns out to be damaged, its group is rolled back and read again
    without it, and the file is listed in ``report.skipped_files`` (``strict``: the whole
    import is refused instead). An import that would store nothing at all raises
    :class:`NothingImportedError` (the store is unchanged; ``exc.report`` has the reasons).
    ``exclude``: relative member paths left out of the import. ``link_root``: links inside a
    folder are followed to files inside this folder (default: ``path`` itself).
    """
    options = options or ImportOptions()
    progress = progress or NullProgress()
    source = InputSource(path, on_bytes=progress.advance, exclude=exclude, link_root=link_root)
    try:
        plan = plan_import(source, importer, options, strict=strict)
        report = ImportReport(
            format="+".join(dict.fromkeys(imp.name for imp, _ in plan.groups)),
            source_name=Path(path).name,
        )
        report.skipped_files.extend(plan.skipped_files)
        started = int(time.time())
        progress.start(source.total_bytes)
        cache_before = store.conn.execute("PRAGMA cache_size").fetchone()[0]
        if IMPORT_CACHE_KIB is not None:
            store.conn.execute(f"PRAGMA cache_size = {int(IMPORT_CACHE_KIB)}")
        with contextlib.ExitStack() as restore, store.transaction() as conn:
            restore.callback(conn.execute, f"PRAGMA cache_size = {int(cache_before)}")
            for imp, members in plan.groups:
                _import_group(store, conn, imp, source, members, options, report, progress,
                              tolerant=not plan.whole)
            if report.total_inserted == 0 and report.duplicates == 0:
                if report.damaged_files and report.records_seen == 0:
                    # Every file that could have been imported was damaged: a refusal.
                    member, why = report.damaged_files[0]
                    more = len(report.damaged_files) - 1
                    raise MalformedInputError(
                        f"{member}: {why}" + (f" (and {more} more damaged file(s))" if more else "")
                        + "; nothing was imported"
                    )
                raise NothingImportedError(_nothing_message(report), report=report)
            if report.restored:
                store.note_restore(report.source_name, report.total_inserted, conn=conn)
            else:
                store.log_import(
                    report.format, report.source_name, started, report.total_inserted,
                    report.duplicates, report.total_skipped, report.as_dict(), conn=conn,
                )
        return report
    finally:
        progress.stop()
        source.close()


def _nothing_message(report: ImportReport) -> str:
    parts = []
    if report.skipped:
        top = ", ".join(f"{why} ({n})" for why, n in report.skipped.most_common(3))
        more = ", ..." if len(report.skipped) > 3 else ""
        parts.append(f"{report.total_skipped} record(s) skipped: {top}{more}")
    if report.skipped_files:
        top = ", ".join(f"{m} ({why})" for m, why in report.skipped_files[:3])
        more = ", ..." if len(report.skipped_files) > 3 else ""
        parts.append(f"{len(report.skipped_files)} file(s) not imported: {top}{more}")
    if not parts:
        parts.append("it holds no records")
    return f"nothing was imported from {report.source_name}: " + "; ".join(parts) + \
        "; the store is unchanged"


_GROUP_SAVEPOINT = "restwise_import_group"


def _import_group(store, conn, importer, source: InputSource, members, options: ImportOptions,
                  report: ImportReport, progress: Progress, *, tolerant: bool) -> None:
    """Import one planned group inside a savepoint. ``tolerant``: a damaged file is dropped
    from the group (listed with the reason) and the group read again without it."""
    names = members.members()
    while names:
        view = members if not tolerant else MemberView(source, names)
        part = ImportReport(format=importer.name, source_name=report.source_name)
        conn.execute(f"SAVEPOINT {_GROUP_SAVEPOINT}")
        try:
            _feed(store, conn, importer, view, options, part, progress)
        except MalformedInputError as exc:
            conn.execute(f"ROLLBACK TO {_GROUP_SAVEPOINT}")
            conn.execute(f"RELEASE {_GROUP_SAVEPOINT}")
            if not tolerant or isinstance(exc, ArchiveRefusedError):
                raise
            culprit = getattr(view, "current", None)
            if culprit is None or culprit not in names:
                report.skipped_files.extend((m, str(exc)) for m in names)
                report.damaged_files.extend((m, str(exc)) for m in names)
                return
            report.skipped_files.append((culprit, _file_reason(exc, culprit)))
            report.damaged_files.append((culprit, _file_reason(exc, culprit)))
            names = [m for m in names if m != culprit]
            continue
        except BaseException:
            conn.execute(f"ROLLBACK TO {_GROUP_SAVEPOINT}")
            conn.execute(f"RELEASE {_GROUP_SAVEPOINT}")
            raise
        conn.execute(f"RELEASE {_GROUP_SAVEPOINT}")
        report.merge(part)
        return


def _file_reason(exc: MalformedInputError, member: str) -> str:
    """The refusal's message without the file name (it is listed beside it)."""
    text = str(exc)
    for prefix in (f"{member}: ", f"{PurePosixPath(member).name}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _feed(store, conn, importer, source, options: ImportOptions, report: ImportReport,
          progress: Progress) -> None:
    """Parse ``source`` with ``importer`` into the open transaction (validation, batching,
    the writer thread); fills ``report``. Raises MalformedInputError on unreadable content."""
    now = int(time.time())
    latest_ts = now + 2 * 86400
    accept = _accept_table()
    obs_batch: list[Observation] = []
    # Local-time extremes of stored observations (seconds), turned into days at the end:
    # cheaper than formatting a day per record on the hot path.
    lo_local, hi_local = 2**62, -(2**62)
    seen = 0
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
            elif isinstance(rec, Notice):
                report.note(rec.text)
            elif isinstance(rec, ExportHeader):
                report.restored = True
            elif isinstance(rec, HistoryRecord):
                if rec.table not in HISTORY_TABLES:
                    skipped[f"table {rec.table} is not imported"] += 1
                    continue
                writer.put("history", rec)
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
        # A parser tripped over the content: refuse the file, name the problem by type only
        # (the exception text may quote personal values).
        report.records_seen = seen
        where = getattr(source, "current", None) or Path(source.path).name
        raise MalformedInputError(
            f"{where}: the {importer.name} file is malformed "
            f"({type(exc).__name__} after {report.records_seen} records); nothing was imported"
        ) from None
    finally:
        # On any failure the writer must be idle before the savepoint rolls back.
        writer.abort()
    progress.records(report.records_seen)


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
