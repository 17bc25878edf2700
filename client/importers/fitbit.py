"""Fitbit account export ("Download your data" / Google Takeout), from the zip or its folder.

Files are recognised by name *and* content, wherever they sit in the tree (the export's
layout has changed over the years: ``MyFitbitData/<Name>/Sleep/sleep-2020-01-01.json``,
``Takeout/Fitbit/Global Export Data/...``). What is mapped:

=====================================  ===================================================
``resting_heart_rate-*.json``          ``resting_heart_rate`` (bpm), one per day
``sleep-*.json``                       ``sleep_deep/light/rem/awake`` intervals from
                                       ``levels.data`` (classic logs: ``asleep`` ->
                                       ``sleep_asleep``, ``restless``/``awake`` ->
                                       ``sleep_awake``, as Fitbit counts them);
                                       ``sleep_in_bed`` per log; ``sleep_duration``
                                       (minutesAsleep) and ``sleep_efficiency`` of the
                                       main sleep only, dated at wake-up
``sleep_score.csv``                    ``sleep_score`` (overall_score)
``sedentary_minutes-*.json``           ``sedentary_minutes`` per day
``moderately/very_active_minutes-*``   ``active_minutes`` per day = moderately + very
                                       active (Fitbit's "active zone" definition; lightly
                                       active minutes are not counted)
``time_in_heart_rate_zones-*.json``    ``hr_zone_minutes`` per zone; the zone is in the
                                       record's source (``fitbit:fat_burn`` ...)
``exercise-*.json``                    ``workout_duration`` interval, ``workout_energy``,
                                       ``workout_distance``; with heart-rate zones also
                                       ``training_load`` (Edwards TRIMP) and a Session
``heart_rate-*.json``                  ``heart_rate`` (bpm) per sample
``steps-*.json``                       ``steps`` per minute (minutes with 0 steps are not
                                       stored: the daily sum is unchanged)
Daily HRV summary CSV                  ``hrv_rmssd`` (ms) per night
(``timestamp,rmssd,nremhr,entropy``)
``hrv-*.json`` (Web API layout)        ``hrv_rmssd`` from ``dailyRmssd``
=====================================  ===================================================

Time zones: Fitbit writes local wall-clock times without an offset. They are read in
``ImportOptions.tz`` (``--tz Europe/Oslo``); when no zone is given they are taken as UTC
(offset 0) for every record, so days stay the wall-clock days Fitbit showed. Nothing is guessed
per record.

Session load: Fitbit does not export a training load. When an exercise has heart-rate zone
minutes, load = Edwards' TRIMP (Edwards 1993): minutes in each zone x a weight 1-5 for the
10 %-of-HRmax band (50-60 % -> 1 ... 90-100 % -> 5, below 50 % -> 0) that holds the zone's
middle heart rate. HRmax is the top of Fitbit's Peak zone, which Fitbit sets from the
person's age or their own setting; zones without bpm bounds use the weights Fitbit's default
zones get for a typical adult (out of range 0, fat burn 2, cardio 3, peak 5).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from restwise.client.errors import ImportFailedError, MalformedInputError
from restwise.client.importers.base import (
    UTC_ASSUMED,
    ImportOptions,
    InputSource,
    Notice,
    Record,
    Skip,
)
from restwise.client.store import HR_LOAD, Observation, Session, local_day, record_key

SOURCE = "fitbit"
MAX_DOCUMENT_BYTES = 512 * 1024**2

SLEEP_LEVELS = {
    "deep": "sleep_deep", "light": "sleep_light", "rem": "sleep_rem", "wake": "sleep_awake",
    "asleep": "sleep_asleep", "restless": "sleep_awake", "awake": "sleep_awake",
}
ZONE_NAMES = {
    "BELOW_DEFAULT_ZONE_1": "out_of_range", "IN_DEFAULT_ZONE_1": "fat_burn",
    "IN_DEFAULT_ZONE_2": "cardio", "IN_DEFAULT_ZONE_3": "peak",
    "BELOW_CUSTOM_ZONE": "below_custom", "IN_CUSTOM_ZONE": "custom",
    "ABOVE_CUSTOM_ZONE": "above_custom",
}
EXERCISE_ZONE_WEIGHTS = {"out of range": 0, "fat burn": 2, "cardio": 3, "peak": 5}
DISTANCE_METRES = {"kilometer": 1000.0, "mile": 1609.344, "meter": 1.0}


ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


def read_head(source: InputSource, member: str, n: int) -> bytes:
    """The first bytes of a member; a damaged archive member is a clear refusal (it may
    be asked during sniffing, before the import's own error handling is in place)."""
    try:
        return source.head(member, n)
    except ARCHIVE_ERRORS:
        raise MalformedInputError(f"{member}: damaged inside the archive") from None


def read_member(source: InputSource, member: str) -> bytes:
    try:
        with source.open(member) as raw:
            return raw.read()
    except ARCHIVE_ERRORS:
        raise MalformedInputError(f"{member}: damaged inside the archive") from None


def zone_of(options: ImportOptions) -> ZoneInfo | None:
    """The person's time zone from the options; a name zoneinfo does not know is refused."""
    if not options.tz:
        return None
    try:
        return ZoneInfo(options.tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ImportFailedError(f"unknown time zone {options.tz!r} (use an IANA name such as Europe/Oslo)") from None


class _Clock:
    """Local wall-clock times -> (UTC epoch seconds, UTC offset minutes) in one zone."""

    def __init__(self, tz: ZoneInfo | None):
        self.tz = tz or dt.UTC
        self._zone_given = tz is not None
        self.assumed_utc = False  # a naive time was read as UTC for lack of a zone

    def local(self, when: dt.datetime) -> tuple[int, int]:
        """A naive time is wall-clock time in the zone; an aware one keeps its instant and
        takes the zone's offset at that instant."""
        if when.tzinfo is None:
            if not self._zone_given:
                self.assumed_utc = True
            aware = when.replace(tzinfo=self.tz)
        else:
            aware = when.astimezone(self.tz)
        off = aware.utcoffset()
        return int(aware.timestamp()), int(off.total_seconds() // 60) if off else 0

    def day_start(self, day: dt.date) -> tuple[int, int]:
        return self.local(dt.datetime(day.year, day.month, day.day))


US_TIME = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{2})(?: (\d{1,2}):(\d{2}):(\d{2}))?")


def parse_time(text: object) -> dt.datetime:
    """Fitbit's ``MM/DD/YY HH:MM:SS`` or ISO ``2020-01-01T22:36:00.000`` (naive, local).

    The US form is parsed by hand (strptime took a third of the import time of a heart-rate
    file); two-digit years follow strptime's rule: 69-99 -> 19xx, 00-68 -> 20xx."""
    if not isinstance(text, str):
        raise ValueError("not a time")
    text = text.strip()
    if "/" in text:
        m = US_TIME.fullmatch(text)
        if m is None:
            raise ValueError("not a Fitbit time")
        month, day, yy, hh, mm, ss = m.groups()
        year = int(yy) + (1900 if int(yy) >= 69 else 2000)
        return dt.datetime(year, int(month), int(day), int(hh or 0), int(mm or 0), int(ss or 0))
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("boolean")
    out = float(value)  # Fitbit writes many numbers as strings ("12")
    if out != out:
        raise ValueError("nan")
    return out


# --- file kinds ---------------------------------------------------------------------
# A file's kind is decided by its *content*: the shape of its entries (JSON) or the columns
# of its header (CSV), in any order. Only files holding a plain {"dateTime", "value": N}
# series look alike whatever they measure; for those the file name says which series it is,
# with or without the export's date suffix ("steps-2020-01-01.json", "steps.json").

def _base(member: str) -> str:
    return PurePosixPath(member).name.lower()


# Name stem of a per-day/per-minute series file -> what it holds. Names must match exactly:
# an export holds other series (calories, altitude, ...) that are not ours to read (they are
# recognised and reported as unused), and near-miss names must not be taken for data.
SCALAR_KINDS = {
    "sedentary_minutes": "sedentary_minutes",
    "moderately_active_minutes": "active_minutes",
    "very_active_minutes": "active_minutes",
    "steps": "steps",
}
_STEM = re.compile(r"^(?P<stem>[a-z_ ]+?)(?:[ _-]*(?:\(\d+\)|-[^/]*|\d{4}[^/]*))?\.(?:json|csv)$")


def name_stem(member: str) -> str | None:
    """``steps-2020-01-01.json`` / ``steps.json`` / ``Steps (1).json`` -> ``steps``."""
    match = _STEM.match(_base(member))
    return match.group("stem").strip().replace(" ", "_") if match else None


JSON_HEAD_BYTES = 16 * 1024
_NESTED_VALUE = re.compile(rb'"value"\s*:\s*\{')
_SCALAR_VALUE = re.compile(rb'"value"\s*:\s*(?:"[-0-9.]*"|-?[0-9])')
# A header column -> all spellings normalised: lower case, spaces and hyphens as "_".
CSV_KIND_COLUMNS = {
    "sleep_score": {"timestamp", "overall_score"},
    # the nightly summary; the 5-minute "Heart Rate Variability Details" (timestamp, rmssd,
    # coverage, ...) are not nightly values and are not read
    "hrv_csv": {"timestamp", "rmssd", "nremhr"},
}


def _csv_columns(head: bytes) -> set[str]:
    text = head.decode("utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    return {re.sub(r"[\s\-]+", "_", c.strip().strip('"').lower()) for c in first.split(",")}


def file_kind(source: InputSource, member: str) -> str | None:
    """The Fitbit kind of ``member`` from its content (see above), ``"unused"`` for a Fitbit
    series Restwise does not read, None when it is not a Fitbit data file."""
    name = _base(member)
    if name.endswith(".csv"):
        cols = _csv_columns(read_head(source, member, 4096))
        for kind, needed in CSV_KIND_COLUMNS.items():
            if needed <= cols:
                return kind
        return None
    if not name.endswith(".json"):
        return None
    head = read_head(source, member, JSON_HEAD_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return None
    body = head[1:].lstrip()
    stem = name_stem(member)
    if body.startswith(b"]"):  # an empty list: the name is all there is
        return SCALAR_KINDS.get(stem or "") or _named_kind(stem)
    if not body.startswith(b"{"):
        return None
    # Entries of Fitbit's shape whose own fields do not say which series they are (cut
    # short, or missing a field) are taken by the file's name, and the parser then says
    # what is wrong with them.
    if b'"logId"' in head:
        if b'"dateOfSleep"' in head or b'"minutesAsleep"' in head:
            return "sleep"
        if b'"activityName"' in head or b'"activeDuration"' in head:
            return "exercise"
        return _named_kind(stem)
    if b'"dateTime"' not in head:
        return None
    if _NESTED_VALUE.search(head):
        if b'"bpm"' in head:
            return "heart_rate"
        if b'"valuesInZones"' in head:
            return "hr_zones"
        if b'"dailyRmssd"' in head:
            return "hrv_json"
        if b'"error"' in head and b'"date"' in head:
            return "resting_heart_rate"
        return _named_kind(stem)
    if _SCALAR_VALUE.search(head):
        if stem in SCALAR_KINDS:
            return SCALAR_KINDS[stem]
        return "unused"
    return SCALAR_KINDS.get(stem or "") or _named_kind(stem)


def _named_kind(stem: str | None) -> str | None:
    """Kinds an *empty* file can only be told by its name."""
    named = {
        "resting_heart_rate": "resting_heart_rate", "sleep": "sleep", "exercise": "exercise",
        "heart_rate": "heart_rate", "time_in_heart_rate_zones": "hr_zones",
        "heart_rate_zones": "hr_zones", "hrv": "hrv_json", "daily_heart_rate_variability": "hrv_json",
    }
    return named.get(stem or "")


CSV_KINDS = tuple(CSV_KIND_COLUMNS)


class FitbitImporter:
    name = "fitbit"
    description = "Fitbit account export or per-metric data dump (zip or folder; JSON and CSV files)"

    def sniff(self, source: InputSource) -> bool:
        """At least one member is a Fitbit data file by its content (see :func:`file_kind`),
        and every JSON/CSV member named like one is one (a random JSON called sleep.json is
        not enough)."""
        checked = 0
        for member in source.members():
            kind = file_kind(source, member)
            if kind == "unused":
                continue  # a Fitbit series Restwise does not read: not a reason to claim it
            if kind is None:
                stem = name_stem(member)
                if stem in SCALAR_KINDS or _named_kind(stem) is not None:
                    return False
                continue
            checked += 1
            if checked >= 8:
                break
        return checked > 0

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        clock = _Clock(zone_of(options))
        active_by_day: dict[dt.date, float] = defaultdict(float)
        active_files: dict[dt.date, set[str]] = defaultdict(set)
        for member in source.members():
            kind = file_kind(source, member)
            if kind is None:
                continue
            if kind == "unused":
                yield Skip(f"Fitbit {name_stem(member) or 'series'}: not used by Restwise")
                continue
            if kind in CSV_KINDS:
                yield from self._csv(source, member, kind, clock)
                continue
            entries = self._json_list(source, member)
            if kind == "active_minutes":
                which = "very" if _base(member).startswith("very") else "moderately"
                for entry in entries:
                    try:
                        day = parse_time(entry["dateTime"]).date()
                        active_by_day[day] += _number(entry["value"])
                        active_files[day].add(which)
                    except (KeyError, TypeError, ValueError, OverflowError):
                        yield Skip("active_minutes: malformed entry")
                continue
            handler = self._handlers()[kind]
            for entry in entries:
                try:
                    yield from handler(entry, clock)
                except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
                    yield Skip(f"{kind}: malformed entry")
        for day, minutes in sorted(active_by_day.items()):
            ts, off = clock.day_start(day)
            yield Observation(
                metric="active_minutes", ts=ts, tz_offset_min=off, value=minutes, unit="min",
                source=SOURCE, record_key=record_key(SOURCE, "active_minutes", day.isoformat(),
                                                     tuple(sorted(active_files[day]))),
            )
        if clock.assumed_utc:
            yield Notice(UTC_ASSUMED)

    def _handlers(self) -> dict[str, Callable[[object, _Clock], Iterator[Record]]]:
        return {
            "resting_heart_rate": self._resting_hr,
            "sleep": self._sleep,
            "sedentary_minutes": self._sedentary,
            "hr_zones": self._hr_zones,
            "exercise": self._exercise,
            "heart_rate": self._heart_rate,
            "steps": self._steps,
            "hrv_json": self._hrv_json,
        }

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _json_list(source: InputSource, member: str) -> list:
        if source.member_size(member) > MAX_DOCUMENT_BYTES:
            raise MalformedInputError(f"{member}: larger than any Fitbit export file; refused")
        data = read_member(source, member)
        try:
            doc = json.loads(data.decode("utf-8-sig"))
        except (json.JSONDecodeError, RecursionError):
            raise MalformedInputError(f"{member}: not valid JSON") from None
        if not isinstance(doc, list):
            raise MalformedInputError(f"{member}: expected a JSON list of Fitbit entries")
        return doc

    def _csv(self, source: InputSource, member: str, kind: str, clock: _Clock) -> Iterator[Record]:
        with source.open(member) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.reader(text, strict=True)
            try:
                header = [h.strip().lower() for h in next(reader)]
                col = {h: i for i, h in enumerate(header)}
                for row in reader:
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise MalformedInputError(f"{member}: a row has the wrong number of columns")
                    try:
                        if kind == "sleep_score":
                            yield from self._sleep_score_row(row, col, clock)
                        else:
                            yield from self._hrv_csv_row(row, col, clock)
                    except (KeyError, ValueError, OverflowError):
                        yield Skip(f"{kind}: malformed row")
            except StopIteration:
                raise MalformedInputError(f"{member}: the file is empty") from None
            except csv.Error:
                raise MalformedInputError(f"{member}: not valid CSV") from None
            except ARCHIVE_ERRORS:
                raise MalformedInputError(f"{member}: damaged inside the archive") from None

    # ------------------------------------------------------------------ mappers
    @staticmethod
    def _obs(metric: str, unit: str, value: float, ts: int, off: int, key: tuple,
             end_ts: int | None = None, source: str = SOURCE) -> Observation:
        return Observation(metric=metric, ts=ts, end_ts=end_ts, tz_offset_min=off, value=value,
                           unit=unit, source=source, record_key=record_key(SOURCE, metric, *key))

    def _resting_hr(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        inner = entry["value"]
        bpm = _number(inner["value"])
        if bpm == 0:  # Fitbit writes 0 on days without enough wear
            yield Skip("resting_heart_rate: no measurement that day")
            return
        day = parse_time(inner.get("date") or entry["dateTime"]).date()
        ts, off = clock.day_start(day)
        yield self._obs("resting_heart_rate", "bpm", bpm, ts, off, (day.isoformat(),))

    def _sleep(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        log_id = entry["logId"]
        start, off = clock.local(parse_time(entry["startTime"]))
        end, _ = clock.local(parse_time(entry["endTime"]))
        yield self._obs("sleep_in_bed", "min", (end - start) / 60, start, off, (log_id,), end)
        if entry.get("mainSleep") is True:
            # A night's summary is dated at wake-up, so it lands on the morning's local day
            # (Fitbit's dateOfSleep), the day whose readiness it explains.
            end_off = clock.local(parse_time(entry["endTime"]))[1]
            yield self._obs("sleep_duration", "min", _number(entry["minutesAsleep"]), end,
                            end_off, (log_id,))
            if entry.get("efficiency") is not None:
                yield self._obs("sleep_efficiency", "%", _number(entry["efficiency"]), end,
                                end_off, (log_id,))
        levels = entry.get("levels") or {}
        for segment in levels.get("data") or ():
            metric = SLEEP_LEVELS.get(segment.get("level"))
            if metric is None:
                yield Skip("sleep: unknown stage")
                continue
            seg_start, seg_off = clock.local(parse_time(segment["dateTime"]))
            seconds = _number(segment["seconds"])
            yield self._obs(metric, "min", seconds / 60, seg_start, seg_off, (log_id, seg_start),
                            seg_start + int(seconds))

    def _sleep_score_row(self, row: list[str], col: dict[str, int], clock: _Clock) -> Iterator[Record]:
        when = parse_time(row[col["timestamp"]])
        ts, off = clock.local(when)
        score = _number(row[col["overall_score"]])
        yield self._obs("sleep_score", "score", score, ts, off, (row[col["sleep_log_entry_id"]],))

    def _hrv_csv_row(self, row: list[str], col: dict[str, int], clock: _Clock) -> Iterator[Record]:
        day = parse_time(row[col["timestamp"]]).date()
        ts, off = clock.day_start(day)
        yield self._obs("hrv_rmssd", "ms", _number(row[col["rmssd"]]), ts, off, (day.isoformat(),))

    def _hrv_json(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        day = parse_time(entry["dateTime"]).date()
        ts, off = clock.day_start(day)
        yield self._obs("hrv_rmssd", "ms", _number(entry["value"]["dailyRmssd"]), ts, off,
                        (day.isoformat(),))

    def _sedentary(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        day = parse_time(entry["dateTime"]).date()
        ts, off = clock.day_start(day)
        yield self._obs("sedentary_minutes", "min", _number(entry["value"]), ts, off,
                        (day.isoformat(),))

    def _hr_zones(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        day = parse_time(entry["dateTime"]).date()
        ts, off = clock.day_start(day)
        for key, minutes in sorted(entry["value"]["valuesInZones"].items()):
            zone = ZONE_NAMES.get(key)
            if zone is None:
                yield Skip("hr zones: unknown zone")
                continue
            yield self._obs("hr_zone_minutes", "min", _number(minutes), ts, off,
                            (day.isoformat(), zone), source=f"{SOURCE}:{zone}")

    def _heart_rate(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        ts, off = clock.local(parse_time(entry["dateTime"]))
        yield self._obs("heart_rate", "bpm", _number(entry["value"]["bpm"]), ts, off, (ts,))

    def _steps(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        steps = _number(entry["value"])
        if steps == 0:
            return
        ts, off = clock.local(parse_time(entry["dateTime"]))
        yield self._obs("steps", "count", steps, ts, off, (ts,), ts + 60)

    def _exercise(self, entry: dict, clock: _Clock) -> Iterator[Record]:
        log_id = entry["logId"]
        start, off = clock.local(parse_time(entry["startTime"]))
        active_ms = entry.get("activeDuration", entry.get("duration"))
        minutes = _number(active_ms) / 60000
        elapsed = _number(entry.get("duration", active_ms)) / 1000
        end = start + max(int(elapsed), 0)
        yield self._obs("workout_duration", "min", minutes, start, off, (log_id,), end)
        if entry.get("calories") is not None:
            yield self._obs("workout_energy", "kcal", _number(entry["calories"]), start, off,
                            (log_id,), end)
        if entry.get("distance") is not None:
            factor = DISTANCE_METRES.get(str(entry.get("distanceUnit", "")).lower())
            if factor is None:
                yield Skip("exercise: distance unit not recognised")
            else:
                yield self._obs("workout_distance", "m", _number(entry["distance"]) * factor,
                                start, off, (log_id,), end)
        load = edwards_trimp(entry.get("heartRateZones"))
        if load is None:
            return
        yield self._obs("training_load", "AU", load, start, off, (log_id,))
        kind = entry.get("activityName")
        yield Session(
            day=local_day(start, off), minutes=minutes, load=load, start_ts=start,
            kind=kind if isinstance(kind, str) else None, source=SOURCE,
            record_key=record_key(SOURCE, "session", log_id), load_kind=HR_LOAD,
        )


def edwards_trimp(zones: object) -> float | None:
    """Edwards' TRIMP from Fitbit exercise zones, or None without zone minutes.

    Each zone's minutes are weighted by the 10 %-of-HRmax band of the zone's middle heart
    rate (50-60 % -> 1, ..., 90-100 % -> 5, below 50 % -> 0). HRmax = the highest zone bound.
    """
    if not isinstance(zones, list) or not zones:
        return None
    bounds = [(z.get("min"), z.get("max")) for z in zones if isinstance(z, dict)]
    hr_max = max((hi for _, hi in bounds if isinstance(hi, (int, float)) and hi > 0), default=None)
    total = 0.0
    seen = False
    for zone in zones:
        if not isinstance(zone, dict) or zone.get("minutes") is None:
            continue
        minutes = _number(zone["minutes"])
        lo, hi = zone.get("min"), zone.get("max")
        if hr_max and isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            fraction = (lo + hi) / 2 / hr_max
            weight = 0 if fraction < 0.5 else min(5, int(fraction * 10) - 4)
        else:
            weight = EXERCISE_ZONE_WEIGHTS.get(str(zone.get("name", "")).lower())
            if weight is None:
                continue
        total += minutes * weight
        seen = True
    return round(total, 3) if seen else None
