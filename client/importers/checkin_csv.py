"""Daily check-in CSV: one row per day (or per session) with the person's own answers.

Columns (header names are matched case-insensitively; spaces and hyphens count as ``_``)::

    date, readiness, fatigue, soreness, stress, mood, sleep_quality, sleep_hours, rpe, minutes

``date`` is required and written ``YYYY-MM-DD`` or ``dd.mm.yyyy``; every other column is
optional and an empty cell means "not answered". ``rpe`` (CR-10) and ``minutes`` on the same
row make a training session with Foster's session load ``rpe x minutes``.

Another app's file is read through a *column map* (``ImportOptions.column_map``, or a JSON file
read with :func:`load_column_map`)::

    {
      "date":      "Day",
      "readiness": {"column": "Readiness (1-5)", "scale": "1-5"},
      "fatigue":   {"column": "Tiredness", "scale": "1-10", "higher_is_worse": true},
      "sleep_hours": {"column": "Sleep (min)", "unit": "min"}
    }

A string value names the column; an object may add ``scale`` (the source's answer range,
``"lo-hi"`` or ``[lo, hi]``), ``higher_is_worse`` (the source counts the other way round) and,
for ``sleep_hours`` / ``minutes``, ``unit`` (``"h"`` or ``"min"``). Answers are converted
linearly onto the canonical scales of :mod:`restwise.models.metrics` (readiness 0-10, the five
wellness items 1-5 with higher = better, CR-10 RPE 0-10). The full specification is in
``docs/importers.md``.

A folder whose CSV files come from different apps takes one map per file, keyed by a file-name
pattern (``fnmatch``, case-insensitive, matched against the file's name; the first matching
pattern wins; a file matching none is read by our own column names)::

    {"files": {"*wellness*.csv": {"date": "Day", ...}, "*session*.csv": {"date": "When", ...}}}

The date column holds a day (``YYYY-MM-DD``, ``dd.mm.yyyy``) or an ISO 8601 timestamp
(``2024-05-01T06:12:00Z``, ``...+02:00``; read with :meth:`datetime.datetime.fromisoformat`):
a timestamp with an offset is turned into the person's local day with ``--tz`` (without it, in
UTC, and the import says so once); one without an offset is a local wall-clock time already.
"""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from zoneinfo import ZoneInfo

from restwise.client.errors import MalformedInputError
from restwise.client.importers.base import (
    UTC_DAYS_ASSUMED,
    CheckinRecord,
    ImportOptions,
    InputSource,
    Notice,
    Record,
    Skip,
)
from restwise.client.importers.fitbit import ARCHIVE_ERRORS, read_head, zone_of
from restwise.client.store import Session, record_key
from restwise.models.metrics import CHECKIN_FIELDS, SESSION_MINUTES_RANGE, SESSION_RPE_RANGE

SOURCE = "checkin_csv"
SESSION_FIELDS = ("rpe", "minutes")
FIELDS = ("date", *CHECKIN_FIELDS, *SESSION_FIELDS)

# Canonical scale of each answer (what the store holds). sleep_hours and minutes are
# quantities, not scales: they take a unit instead.
CANONICAL_SCALE: dict[str, tuple[float, float]] = {
    **{k: v for k, v in CHECKIN_FIELDS.items() if k != "sleep_hours"},
    "rpe": SESSION_RPE_RANGE,
}
QUANTITIES = {"sleep_hours": "h", "minutes": "min"}
UNIT_FACTORS = {"sleep_hours": {"h": 1.0, "min": 1 / 60}, "minutes": {"min": 1.0, "h": 60.0}}

# Common spellings of our field names in other apps' headers (after normalisation).
ALIASES = {
    "day": "date",
    "sleep": "sleep_quality",
    "sleepquality": "sleep_quality",
    "sleephours": "sleep_hours",
    "session_rpe": "rpe",
    "srpe": "rpe",
    "duration": "minutes",
    "duration_min": "minutes",
    "session_minutes": "minutes",
}

ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DOTTED_DATE = re.compile(r"^(\d{1,2})\.(\d{1,2})\.(\d{4})$")
MAX_HEADER_BYTES = 8192


@dataclass(frozen=True)
class ColumnSpec:
    """How one of our fields is read from the source file."""

    field: str
    column: str
    scale: tuple[float, float] | None = None  # the source's answer range
    higher_is_worse: bool = False
    unit: str | None = None  # sleep_hours / minutes only

    def convert(self, raw: float) -> float | None:
        """Source value -> canonical value; None when outside the declared source scale."""
        if self.field in QUANTITIES:
            return raw * UNIT_FACTORS[self.field][self.unit or QUANTITIES[self.field]]
        lo, hi = self.scale or CANONICAL_SCALE[self.field]
        if not lo <= raw <= hi:
            return None
        clo, chi = CANONICAL_SCALE[self.field]
        value = clo + (raw - lo) * (chi - clo) / (hi - lo)
        if self.higher_is_worse:
            value = clo + chi - value
        return round(value, 6)


def normalise_header(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return ALIASES.get(key, key)


def _parse_scale(field: str, scale: object) -> tuple[float, float]:
    if isinstance(scale, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*", scale)
        if not m:
            raise MalformedInputError(f"column map: the scale of {field} must look like \"1-5\"")
        lo, hi = float(m.group(1)), float(m.group(2))
    elif isinstance(scale, (list, tuple)) and len(scale) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale
    ):
        lo, hi = float(scale[0]), float(scale[1])
    else:
        raise MalformedInputError(f"column map: the scale of {field} must be \"lo-hi\" or [lo, hi]")
    if not lo < hi:
        raise MalformedInputError(f"column map: the scale of {field} must have lo < hi")
    return lo, hi


def parse_column_map(mapping: dict) -> dict[str, ColumnSpec]:
    """Validate a column map (see the module docstring) into :class:`ColumnSpec` objects."""
    if not isinstance(mapping, dict):
        raise MalformedInputError("column map: must be a JSON object {\"our_field\": \"their column\"}")
    specs: dict[str, ColumnSpec] = {}
    for field, entry in mapping.items():
        if field not in FIELDS:
            raise MalformedInputError(
                f"column map: unknown field {field!r} (known: {', '.join(FIELDS)})"
            )
        if isinstance(entry, str):
            specs[field] = ColumnSpec(field, entry)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("column"), str):
            raise MalformedInputError(f"column map: {field} needs a column name")
        unknown = set(entry) - {"column", "scale", "higher_is_worse", "unit"}
        if unknown:
            raise MalformedInputError(
                f"column map: {field} has unknown keys {', '.join(sorted(unknown))}"
            )
        scale = None
        if entry.get("scale") is not None:
            if field not in CANONICAL_SCALE:
                raise MalformedInputError(f"column map: {field} takes a unit, not a scale")
            scale = _parse_scale(field, entry["scale"])
        unit = entry.get("unit")
        if unit is not None and (field not in QUANTITIES or unit not in UNIT_FACTORS[field]):
            raise MalformedInputError(
                f"column map: {field} cannot take a unit"
                if field not in QUANTITIES
                else f"column map: the unit of {field} must be one of {', '.join(UNIT_FACTORS[field])}"
            )
        inverted = entry.get("higher_is_worse", False)
        if not isinstance(inverted, bool):
            raise MalformedInputError(f"column map: higher_is_worse of {field} must be true or false")
        if inverted and field not in CANONICAL_SCALE:
            raise MalformedInputError(f"column map: {field} is a quantity and cannot be inverted")
        specs[field] = ColumnSpec(field, entry["column"], scale, inverted, unit)
    if "date" not in specs:
        specs["date"] = ColumnSpec("date", "date")
    return specs


@dataclass(frozen=True)
class ColumnMaps:
    """Column maps by file: one map for every file (``default``), or maps keyed by
    file-name pattern (``by_pattern``, in the order written; the first match wins)."""

    default: dict[str, ColumnSpec] | None = None
    by_pattern: tuple[tuple[str, dict[str, ColumnSpec]], ...] = ()

    def for_member(self, member: str) -> dict[str, ColumnSpec] | None:
        """The map for ``member`` (a relative path), None: read with our own column names."""
        name = PurePosixPath(member).name.lower()
        for pattern, specs in self.by_pattern:
            if fnmatch.fnmatchcase(name, pattern.lower()):
                return specs
        return self.default


FILES_KEY = "files"


def parse_column_maps(mapping: object) -> ColumnMaps:
    """Validate a column map, or per-file maps ``{"files": {pattern: map, ...}}``."""
    if isinstance(mapping, dict) and FILES_KEY in mapping:
        if set(mapping) != {FILES_KEY}:
            raise MalformedInputError(
                'column map: with "files" (maps per file-name pattern) nothing else may be given'
            )
        files = mapping[FILES_KEY]
        if not isinstance(files, dict) or not files:
            raise MalformedInputError(
                'column map: "files" must map file-name patterns to column maps, '
                'e.g. {"files": {"wellness*.csv": {"date": "Day"}}}'
            )
        out = []
        for pattern, entry in files.items():
            if not isinstance(pattern, str) or not pattern.strip() or "/" in pattern:
                raise MalformedInputError("column map: a file-name pattern must be a file name such as \"wellness*.csv\"")
            try:
                out.append((pattern.strip(), parse_column_map(entry)))
            except MalformedInputError as exc:
                raise MalformedInputError(f"{exc} (in the map for {pattern!r})") from None
        return ColumnMaps(by_pattern=tuple(out))
    return ColumnMaps(default=parse_column_map(mapping))


def load_column_map(path: Path | str) -> dict:
    """Read and validate a column-map JSON file; returns the dict to pass as
    ``ImportOptions(column_map=...)``. Raises MalformedInputError naming the problem."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MalformedInputError(f"cannot read the column map {path.name}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MalformedInputError(f"the column map {path.name} is not valid JSON") from None
    parse_column_maps(mapping)  # validate now, so a bad map fails before any import starts
    return mapping


def parse_day(text: str, tz: ZoneInfo | None = None) -> tuple[str | None, bool]:
    """The day a date cell is about, and whether UTC stood in for a missing ``tz``.

    ``YYYY-MM-DD`` or ``dd.mm.yyyy``: that day. An ISO 8601 timestamp (standard library
    parser): with an offset (``Z``, ``+02:00``) its instant's day in ``tz`` (UTC without
    one: flagged); without an offset, its own wall-clock day. None when unreadable."""
    text = text.strip()
    try:
        if ISO_DATE.match(text):
            return dt.date.fromisoformat(text).isoformat(), False
        m = DOTTED_DATE.match(text)
        if m:
            return dt.date(int(m.group(3)), int(m.group(2)), int(m.group(1))).isoformat(), False
        if len(text) < 11 or not text[:4].isdigit():
            return None, False
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None, False
    if when.tzinfo is None:
        return when.date().isoformat(), False
    try:
        return when.astimezone(tz or dt.UTC).date().isoformat(), tz is None
    except (OverflowError, ValueError):
        return None, False


def _number(text: str) -> float:
    # Some apps write decimal commas ("7,5"); a CSV cell cannot hold a thousands separator here.
    value = float(text.strip().replace(",", "."))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return value


class CheckinCsvImporter:
    """``column_map`` (see :func:`load_column_map`) makes the importer recognise and read
    another app's headers; ``ImportOptions.column_map``, when given, takes precedence for
    reading. Without a map only our canonical header names are recognised."""

    name = "checkin_csv"
    description = "Daily check-in CSV (readiness, wellness answers, sleep, session RPE x minutes)"

    def __init__(self, column_map: dict | None = None):
        self.column_map = column_map
        self._maps = parse_column_maps(column_map) if column_map else ColumnMaps()

    def _csv_members(self, source: InputSource) -> list[str]:
        return [m for m in source.members() if m.lower().endswith((".csv", ".tsv"))] or (
            source.members() if not source.is_zip and source.path.is_file() else []
        )

    @staticmethod
    def _head_header(source: InputSource, member: str) -> list[str] | None:
        parsed = csv_header(source, member)
        return None if parsed is None else parsed[0]

    def sniff(self, source: InputSource) -> bool:
        """A CSV whose header has a date column and at least one check-in or session column,
        under our canonical names or, with a column map, under the mapped names."""
        members = self._csv_members(source)
        if not members or len(members) > 16:
            return False
        for member in members:
            header = self._head_header(source, member)
            if header is None:
                return False
            specs = self._maps.for_member(member)
            if specs is not None:
                # The person declared this file's columns: its date column and one other
                # mapped (or canonical) column are enough; reading then checks every mapped
                # column is there and names the one that is not.
                names = {h.strip().lower() for h in header}
                mapped = {spec.column.strip().lower() for spec in specs.values()}
                ours = {normalise_header(h) for h in header} & set(FIELDS)
                if specs["date"].column.strip().lower() not in names or (
                    len(names & mapped) < 2 and len(ours - {"date"}) < 1
                ):
                    return False
                continue
            names = [normalise_header(h) for h in header if h.strip()]
            ours = [n for n in names if n in FIELDS]
            # At least half the columns must be ours: a wide table that happens to have a
            # 'date' and a 'mood' column (a research dataset, a Fitbit daily table) is not
            # a check-in file.
            if "date" not in ours or len(set(ours)) < 2 or 2 * len(ours) < len(names):
                return False
        return True

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        maps = parse_column_maps(options.column_map) if options.column_map else self._maps
        tz = zone_of(options)
        assumed_utc = [False]
        for member in self._csv_members(source):
            yield from self._member_records(source, member, maps.for_member(member), tz, assumed_utc)
        if assumed_utc[0]:
            yield Notice(UTC_DAYS_ASSUMED)

    def _member_records(
        self, source: InputSource, member: str, specs: dict[str, ColumnSpec] | None,
        tz: ZoneInfo | None = None, assumed_utc: list | None = None,
    ) -> Iterator[Record]:
        header_line = self._head_header(source, member)
        if header_line is None:
            raise MalformedInputError(f"{member}: not a readable CSV file (no header line)")
        with source.open(member) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.reader(text, delimiter=_delimiter_of(source, member), strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise MalformedInputError(f"{member}: the file is empty") from None
            except csv.Error:
                raise MalformedInputError(f"{member}: the header line is not valid CSV") from None
            index = self._column_index(member, header, specs)
            sessions_per_day: Counter = Counter()
            line = 1
            try:
                for row in reader:
                    line += 1
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != len(header):
                        raise MalformedInputError(
                            f"{member}: line {line} has {len(row)} columns, the header has {len(header)}"
                        )
                    yield from self._row_records(row, index, sessions_per_day, tz, assumed_utc)
            except csv.Error:
                raise MalformedInputError(f"{member}: line {line} is not valid CSV") from None
            except ARCHIVE_ERRORS:
                raise MalformedInputError(f"{member}: damaged inside the archive") from None

    @staticmethod
    def _column_index(
        member: str, header: list[str], specs: dict[str, ColumnSpec] | None
    ) -> dict[str, tuple[int, ColumnSpec]]:
        if specs is None:
            index: dict[str, tuple[int, ColumnSpec]] = {}
            for i, name in enumerate(header):
                field = normalise_header(name)
                if field in FIELDS and field not in index:
                    index[field] = (i, ColumnSpec(field, name))
        else:
            by_name = {h.strip(): i for i, h in enumerate(header)}
            by_norm = {h.strip().lower(): i for i, h in enumerate(header)}
            index = {}
            for field, spec in specs.items():
                i = by_name.get(spec.column.strip(), by_norm.get(spec.column.strip().lower()))
                if i is None:
                    raise MalformedInputError(
                        f"{member}: the column mapped to {field} is not in the header"
                    )
                index[field] = (i, spec)
        if "date" not in index:
            raise MalformedInputError(f"{member}: no date column")
        if len(index) == 1:
            raise MalformedInputError(f"{member}: no check-in or session column")
        return index

    def _row_records(
        self, row: list[str], index: dict[str, tuple[int, ColumnSpec]], sessions_per_day: Counter,
        tz: ZoneInfo | None = None, assumed_utc: list | None = None,
    ) -> Iterator[Record]:
        day, utc_stood_in = parse_day(row[index["date"][0]], tz)
        if day is None:
            yield Skip("unreadable date")
            return
        if utc_stood_in and assumed_utc is not None:
            assumed_utc[0] = True
        values: dict[str, float] = {}
        session: dict[str, float] = {}
        for field, (i, spec) in index.items():
            if field == "date":
                continue
            cell = row[i].strip()
            if not cell:
                continue
            try:
                raw = _number(cell)
            except ValueError:
                yield Skip(f"check-in {field}: not a number")
                continue
            value = spec.convert(raw)
            if value is None:
                yield Skip(f"check-in {field}: outside its declared scale")
                continue
            (session if field in SESSION_FIELDS else values)[field] = value
        if values:
            yield CheckinRecord(day=day, values=values, source=SOURCE)
        if session:
            rpe, minutes = session.get("rpe"), session.get("minutes")
            if rpe is None or minutes is None:
                yield Skip("session: rpe and minutes must both be given")
                return
            if not SESSION_MINUTES_RANGE[0] <= minutes <= SESSION_MINUTES_RANGE[1]:
                yield Skip("session: implausible duration or load")
                return
            # Identity = the n-th session of that day in the file, so re-importing a file
            # that has grown by new days adds only the new sessions.
            n = sessions_per_day[day]
            sessions_per_day[day] += 1
            yield Session(
                day=day, minutes=minutes, load=round(rpe * minutes, 6), rpe=rpe,
                source=SOURCE, record_key=record_key(SOURCE, "session", day, n),
            )


def csv_header(source: InputSource, member: str) -> tuple[list[str], str] | None:
    """A CSV member's header cells and delimiter, None when it is not readable text with a
    header line (binary, not UTF-8, empty)."""
    head = read_head(source, member, MAX_HEADER_BYTES)
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    first = text.splitlines()[0] if text.strip() else ""
    if not first:
        return None
    delimiter = _sniff_delimiter(first)
    try:
        return next(csv.reader([first], delimiter=delimiter)), delimiter
    except (csv.Error, StopIteration):
        return None


def _sniff_delimiter(first_line: str) -> str:
    """Comma, semicolon (European spreadsheets) or tab: whichever the header line uses most."""
    counts = {d: first_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _delimiter_of(source: InputSource, member: str) -> str:
    head = read_head(source, member, MAX_HEADER_BYTES).decode("utf-8-sig", errors="replace")
    return _sniff_delimiter(head.splitlines()[0] if head.strip() else "")
