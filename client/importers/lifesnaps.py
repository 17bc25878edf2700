"""LifeSnaps dataset loader (Yfantidou et al., Sci Data 2022, CC BY 4.0): the daily table.

Reads ``daily_fitbit_sema_df_unprocessed.csv`` (a file, a folder holding it, or a zip): one row
per person-day, keyed by ``id`` and ``date``. One ``id`` is one person: the loader yields that
person's records only (``ImportOptions.person``), so each simulated person gets their own
encrypted store, as their own phone would.

Observations (one per person-day, stamped at local noon of ``date`` with UTC offset 0, so the
store's local day is the table's day; Fitbit assigns a night to the day it ends):

    rmssd                      -> hrv_rmssd (ms)             0.0 = not measured, skipped
    resting_hr                 -> resting_heart_rate (bpm)
    minutesAsleep              -> sleep_duration (min)       only on days with a sleep log
    sleep_efficiency           -> sleep_efficiency (%)
    full_sleep_breathing_rate  -> respiratory_rate (breaths/min)
    steps                      -> steps (count)              0 = watch not worn, skipped
    moderately + very active   -> active_minutes (min)       (Fitbit's "active minutes")
    sedentary_minutes          -> sedentary_minutes (min)

Check-ins from the momentary mood question (SEMA, multi-select: "how do you feel right now?"),
only where the mapping onto the canonical 1-5 "higher = better" scales is defensible:

    fatigue: TIRED only -> 2, RESTED/RELAXED only -> 4, both -> 3
    stress:  TENSE/ANXIOUS only -> 2, RESTED/RELAXED only -> 4, both -> 3
    mood:    SAD only -> 2, HAPPY only -> 4, both -> 3, NEUTRAL alone -> 3

An unticked box on an answered day is no evidence of the opposite feeling, so a field stays
unset when none of its answers was ticked. ``readiness`` is never set: LifeSnaps never asked
it, and a readiness derived from mood ticks would be a label we invented. Device-derived
scores (Fitbit stress score, sleep points) are not imported as check-ins.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path

from restwise.client.errors import ImportFailedError, MalformedInputError
from restwise.client.importers.base import (
    CheckinRecord,
    ImportOptions,
    InputSource,
    Record,
    Skip,
)
from restwise.client.store import Observation, record_key

SOURCE = "lifesnaps"
TABLE_NAME = "daily_fitbit_sema_df_unprocessed.csv"
KEY_COLUMNS = ("id", "date")

# column -> (metric, unit, zero means missing)
OBSERVATION_COLUMNS: dict[str, tuple[str, str, bool]] = {
    "rmssd": ("hrv_rmssd", "ms", True),
    "resting_hr": ("resting_heart_rate", "bpm", True),
    "minutesAsleep": ("sleep_duration", "min", True),
    "sleep_efficiency": ("sleep_efficiency", "%", True),
    "full_sleep_breathing_rate": ("respiratory_rate", "breaths/min", True),
    "steps": ("steps", "count", True),
    "sedentary_minutes": ("sedentary_minutes", "min", False),
}
ACTIVE_COLUMNS = ("moderately_active_minutes", "very_active_minutes")
SEMA_COLUMNS = ("ALERT", "HAPPY", "NEUTRAL", "RESTED/RELAXED", "SAD", "TENSE/ANXIOUS", "TIRED")


def _find_table(source: InputSource) -> str:
    members = source.members()
    named = [m for m in members if m.rsplit("/", 1)[-1] == TABLE_NAME]
    if named:
        return min(named, key=len)
    csvs = [m for m in members if m.lower().endswith(".csv")]
    for m in csvs:
        if _looks_like_table(source.head(m, 4096)):
            return m
    raise MalformedInputError(f"{source.path.name}: no LifeSnaps daily table found")


def _looks_like_table(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
    cols = {c.strip() for c in first.split(",")}
    return {"id", "date", "rmssd", "resting_hr"} <= cols and "TIRED" in cols


def _rows(source: InputSource, member: str) -> Iterator[tuple[int, dict[str, str]]]:
    with source.open(member) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text)
        if reader.fieldnames is None or not set(KEY_COLUMNS) <= set(reader.fieldnames):
            raise MalformedInputError(f"{member}: header lacks the id and date columns")
        for lineno, row in enumerate(reader, start=2):
            yield lineno, row


def list_persons(data_path: Path | str) -> list[str]:
    """The person ids of a LifeSnaps table, in order of first appearance."""
    source = InputSource(data_path)
    try:
        member = _find_table(source)
        seen: dict[str, None] = {}
        for _, row in _rows(source, member):
            pid = (row.get("id") or "").strip()
            if pid:
                seen.setdefault(pid, None)
        return list(seen)
    finally:
        source.close()


def _num(cell: str | None) -> float | None:
    if cell is None:
        return None
    cell = cell.strip()
    if not cell:
        return None
    value = float(cell)  # ValueError -> counted skip by the caller
    return None if value != value else value


def sema_checkin(ticks: dict[str, bool]) -> dict[str, float]:
    """Check-in values (canonical 1-5 scales) from one day's ticked SEMA mood answers."""

    def pair(bad: bool, good: bool) -> float | None:
        if bad and good:
            return 3.0
        if bad:
            return 2.0
        if good:
            return 4.0
        return None

    values: dict[str, float] = {}
    fatigue = pair(ticks.get("TIRED", False), ticks.get("RESTED/RELAXED", False))
    stress = pair(ticks.get("TENSE/ANXIOUS", False), ticks.get("RESTED/RELAXED", False))
    mood = pair(ticks.get("SAD", False), ticks.get("HAPPY", False))
    if mood is None and ticks.get("NEUTRAL", False):
        mood = 3.0
    for name, v in (("fatigue", fatigue), ("stress", stress), ("mood", mood)):
        if v is not None:
            values[name] = v
    return values


class LifeSnapsImporter:
    name = "lifesnaps"
    whole_source = True  # one folder holds every person: never read file by file
    description = "LifeSnaps dataset (Fitbit daily table + mood answers), one person per store"

    def sniff(self, source: InputSource) -> bool:
        try:
            _find_table(source)
            return True
        except MalformedInputError:
            return False

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        person = options.person
        if not person:
            raise ImportFailedError(
                "LifeSnaps holds many persons: choose one (ImportOptions.person / --person)"
            )
        member = _find_table(source)
        found = False
        for lineno, row in _rows(source, member):
            if (row.get("id") or "").strip() != person:
                continue
            found = True
            try:
                day = dt.date.fromisoformat((row.get("date") or "").strip()[:10])
            except ValueError:
                yield Skip("row with an unreadable date")
                continue
            noon = dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC)
            ts = int(noon.timestamp())
            iso = day.isoformat()

            def obs(metric: str, unit: str, value: float) -> Observation:
                return Observation(
                    metric=metric, ts=ts, value=value, unit=unit, source=SOURCE,
                    record_key=record_key(SOURCE, person, iso, metric), tz_offset_min=0,
                    device="Fitbit Sense",
                )

            for column, (metric, unit, zero_missing) in OBSERVATION_COLUMNS.items():
                try:
                    value = _num(row.get(column))
                except ValueError:
                    yield Skip(f"{column}: not a number")
                    continue
                if value is None:
                    continue
                if zero_missing and value == 0:
                    yield Skip(f"{column}: 0 means not measured")
                    continue
                yield obs(metric, unit, value)
            try:
                active = [_num(row.get(c)) for c in ACTIVE_COLUMNS]
            except ValueError:
                yield Skip("active minutes: not a number")
            else:
                if all(a is not None for a in active):
                    yield obs("active_minutes", "min", float(sum(active)))

            try:
                sema = {c: _num(row.get(c)) for c in SEMA_COLUMNS}
            except ValueError:
                yield Skip("mood answers: not a number")
                continue
            if any(v is not None for v in sema.values()):
                values = sema_checkin({c: v == 1.0 for c, v in sema.items()})
                if values:
                    yield CheckinRecord(day=iso, values=values, source=SOURCE)
        if not found:
            raise ImportFailedError("that person id does not appear in this LifeSnaps table")
