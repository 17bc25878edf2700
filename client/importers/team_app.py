"""The team questionnaire app's per-person export (PMSys and apps like it, as used by the teams
behind SoccerMon): a daily wellness CSV and a session-RPE CSV, recognised by their columns.

``wellness`` (one row per answered morning questionnaire)::

    effective_time_frame, fatigue, mood, readiness, sleep_duration_h, sleep_quality,
    soreness, soreness_area, stress

* ``effective_time_frame``: ISO 8601 timestamp (``2021-03-01T08:55:51.462Z``); the answer is
  about the person's local day of that instant (``--tz``; without it the UTC day, and the
  import says so once). A timestamp without an offset is already local wall-clock time.
* readiness 0-10; fatigue, mood, sleep_quality, soreness, stress 1-5 with higher = better
  (the app's own convention, the same as SoccerMon's): stored as they are. The app writes 0 on
  the 1-5 items for "not answered": such a cell is not an answer and is not stored.
* ``sleep_duration_h`` -> ``sleep_hours``; ``soreness_area`` (body-area codes) has no place in
  the store and is not read.

``srpe`` (one row per training session)::

    end_date_time, activity_names, perceived_exertion, duration_min

* a session of ``duration_min`` minutes ending at ``end_date_time``; its day is the local day
  it started; load = RPE (Borg CR-10) x minutes (Foster's session-RPE, arbitrary units),
  stored as session-RPE load; ``activity_names`` (a list such as ``['team', 'football']``)
  becomes the session's kind.

Columns may come in any order; other columns are ignored. A row with an unreadable time or an
answer outside its scale is skipped and counted with the reason (never with its value).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterator
from zoneinfo import ZoneInfo

from restwise.client.errors import MalformedInputError
from restwise.client.importers.base import (
    UTC_ASSUMED,
    UTC_DAYS_ASSUMED,
    CheckinRecord,
    ImportOptions,
    InputSource,
    Notice,
    Record,
    Skip,
)
from restwise.client.importers.checkin_csv import csv_header
from restwise.client.importers.fitbit import ARCHIVE_ERRORS, zone_of
from restwise.client.store import SRPE_LOAD, Session, record_key
from restwise.models.metrics import CHECKIN_FIELDS, SESSION_MINUTES_RANGE, SESSION_RPE_RANGE

SOURCE = "team_app"
WELLNESS_TIME = "effective_time_frame"
WELLNESS_ITEMS = ("readiness", "fatigue", "mood", "sleep_quality", "soreness", "stress")
SLEEP_HOURS_COLUMN = "sleep_duration_h"
FIVE_POINT = ("fatigue", "mood", "sleep_quality", "soreness", "stress")
SESSION_TIME_COLUMNS = ("end_date_time", "start_date_time")
SESSION_RPE = "perceived_exertion"
SESSION_MINUTES = ("duration_min", "duration")
SESSION_ACTIVITY = "activity_names"
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().strip('"').lower())


def _header(source: InputSource, member: str) -> tuple[list[str], str] | None:
    parsed = csv_header(source, member)
    return None if parsed is None else ([_norm(h) for h in parsed[0]], parsed[1])


def file_kind(columns: list[str]) -> str | None:
    """``wellness``, ``srpe`` or None, from a normalised header (any column order)."""
    cols = set(columns)
    if WELLNESS_TIME in cols and len(cols & set(WELLNESS_ITEMS)) >= 3:
        return "wellness"
    if SESSION_RPE in cols and cols & set(SESSION_MINUTES) and cols & set(SESSION_TIME_COLUMNS):
        return "srpe"
    return None


def _number(text: str) -> float:
    value = float(text.strip().replace(",", "."))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return value


class _Times:
    """ISO 8601 text -> aware instant in the person's zone, remembering what was assumed."""

    def __init__(self, tz: ZoneInfo | None):
        self.tz = tz
        self.days_in_utc = False  # an instant's day was taken in UTC for lack of --tz
        self.local_as_utc = False  # a wall-clock time was placed as UTC for lack of --tz

    def parse(self, text: str) -> dt.datetime | None:
        text = text.strip()
        if len(text) < 10 or not text[:4].isdigit():
            return None
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
        if when.tzinfo is None:  # local wall-clock time already
            if self.tz is None:
                self.local_as_utc = True
            return when.replace(tzinfo=self.tz or dt.UTC)
        if self.tz is None:
            self.days_in_utc = True
        try:
            return when.astimezone(self.tz or dt.UTC)
        except (OverflowError, ValueError):
            return None


class TeamAppImporter:
    name = "team_app"
    description = "Team questionnaire app export (PMSys-style wellness.csv and srpe.csv)"

    def _members(self, source: InputSource) -> list[tuple[str, str, list[str], str]]:
        out = []
        members = source.members()
        single = len(members) == 1 and not source.is_zip  # a file named anything
        for member in members:
            if not single and not member.lower().endswith((".csv", ".tsv", ".txt")):
                continue
            parsed = _header(source, member)
            if parsed is None:
                continue
            kind = file_kind(parsed[0])
            if kind is not None:
                out.append((member, kind, parsed[0], parsed[1]))
        return out

    def sniff(self, source: InputSource) -> bool:
        """Every CSV is a wellness or session-RPE export, by its columns."""
        csvs = [m for m in source.members() if m.lower().endswith((".csv", ".tsv"))]
        if not csvs and len(source.members()) == 1 and not source.is_zip:
            csvs = source.members()
        if not csvs or len(csvs) > 64:
            return False
        return len(self._members(source)) == len(csvs)

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        times = _Times(zone_of(options))
        for member, kind, columns, delimiter in self._members(source):
            yield from self._file(source, member, kind, columns, delimiter, times)
        if times.days_in_utc:
            yield Notice(UTC_DAYS_ASSUMED)
        if times.local_as_utc:
            yield Notice(UTC_ASSUMED)

    def _file(self, source, member, kind, columns, delimiter, times: _Times) -> Iterator[Record]:
        col = {}
        for i, name in enumerate(columns):
            col.setdefault(name, i)
        row_records = self._wellness_row if kind == "wellness" else self._session_row
        with source.open(member) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.reader(text, delimiter=delimiter, strict=True)
            line = 1
            try:
                next(reader)  # the header, parsed already
                for row in reader:
                    line += 1
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != len(columns):
                        raise MalformedInputError(
                            f"{member}: line {line} has {len(row)} columns, the header has {len(columns)}"
                        )
                    yield from row_records(row, col, times)
            except StopIteration:
                raise MalformedInputError(f"{member}: the file is empty") from None
            except csv.Error:
                raise MalformedInputError(f"{member}: line {line} is not valid CSV") from None
            except ARCHIVE_ERRORS:
                raise MalformedInputError(f"{member}: damaged inside the archive") from None

    @staticmethod
    def _wellness_row(row: list[str], col: dict[str, int], times: _Times) -> Iterator[Record]:
        when = times.parse(row[col[WELLNESS_TIME]])
        if when is None:
            yield Skip("team app wellness: unreadable time")
            return
        values: dict[str, float] = {}
        for field in WELLNESS_ITEMS:
            if field not in col:
                continue
            cell = row[col[field]].strip()
            if not cell:
                continue
            try:
                value = _number(cell)
            except ValueError:
                yield Skip(f"team app wellness {field}: not a number")
                continue
            if field in FIVE_POINT and value == 0:
                continue  # the app's "not answered"
            lo, hi = CHECKIN_FIELDS[field]
            if not lo <= value <= hi:
                yield Skip(f"team app wellness {field}: outside its scale")
                continue
            values[field] = value
        if SLEEP_HOURS_COLUMN in col and row[col[SLEEP_HOURS_COLUMN]].strip():
            try:
                hours = _number(row[col[SLEEP_HOURS_COLUMN]])
            except ValueError:
                yield Skip("team app wellness sleep_duration_h: not a number")
            else:
                lo, hi = CHECKIN_FIELDS["sleep_hours"]
                if lo <= hours <= hi:
                    values["sleep_hours"] = hours
                else:
                    yield Skip("team app wellness sleep_duration_h: outside its scale")
        if values:
            yield CheckinRecord(day=when.date().isoformat(), values=values, source=SOURCE)

    @staticmethod
    def _session_row(row: list[str], col: dict[str, int], times: _Times) -> Iterator[Record]:
        time_col = next(c for c in SESSION_TIME_COLUMNS if c in col)
        minutes_col = next(c for c in SESSION_MINUTES if c in col)
        stamp = row[col[time_col]].strip()
        when = times.parse(stamp)
        if when is None:
            yield Skip("team app session: unreadable time")
            return
        try:
            rpe = _number(row[col[SESSION_RPE]])
            minutes = _number(row[col[minutes_col]])
        except ValueError:
            yield Skip("team app session: RPE or duration is not a number")
            return
        if not SESSION_RPE_RANGE[0] <= rpe <= SESSION_RPE_RANGE[1]:
            yield Skip("team app session: RPE outside 0-10")
            return
        if not SESSION_MINUTES_RANGE[0] < minutes <= SESSION_MINUTES_RANGE[1]:
            yield Skip("team app session: implausible duration")
            return
        start = when - dt.timedelta(minutes=minutes) if time_col == "end_date_time" else when
        kind = None
        if SESSION_ACTIVITY in col:
            names = [a or b for a, b in _QUOTED.findall(row[col[SESSION_ACTIVITY]])]
            kind = ", ".join(n.strip() for n in names if n.strip())[:64] or None
        yield Session(
            day=start.date().isoformat(), minutes=minutes, load=round(rpe * minutes, 6), rpe=rpe,
            start_ts=int(start.timestamp()), kind=kind, source=SOURCE, load_kind=SRPE_LOAD,
            record_key=record_key(SOURCE, "session", time_col, stamp),
        )


__all__ = ["TeamAppImporter", "file_kind"]
