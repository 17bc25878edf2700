"""Open mHealth JSON data points (https://www.openmhealth.org/documentation/#/schema-docs).

A file holds one data point, a JSON list of them, or JSON lines (one per line; streamed, so
a JSON-lines file may be of any size, while one JSON document is parsed whole and limited to
``MAX_DOCUMENT_BYTES``). A data point
is either the full form ``{"header": {"id", "schema_id": {"name", ...}, ...}, "body": {...}}``
or a bare body. The schema is taken from ``header.schema_id.name`` when present, otherwise
recognised from the body's keys.

Mapped schemas (everything else is a counted skip):

==================  ==========================================================
heart-rate          ``heart_rate`` (bpm); a descriptive statistic other than a
                    mean/median (e.g. a daily minimum) is skipped, not guessed
rr-interval         ``rr_interval`` (ms)
sleep-episode       ``sleep_in_bed`` interval; ``sleep_duration`` (total sleep
                    time) and ``sleep_efficiency`` of a main sleep, dated at
                    the episode's end (the morning's local day)
sleep-duration      ``sleep_duration`` (min), dated at the end of its interval
step-count          ``steps`` over the time interval
physical-activity   ``workout_duration`` interval, ``workout_distance``,
                    ``workout_energy``
==================  ==========================================================

Times are RFC 3339 with an offset, which gives the person's local day directly. A time
without an offset uses ``ImportOptions.tz`` (or UTC when none is given, see docs).
A time frame given only as a date and part of day is too vague for a measurement and skipped.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator
from zoneinfo import ZoneInfo

from restwise.client.errors import MalformedInputError
from restwise.client.importers.base import ImportOptions, InputSource, Record, Skip
from restwise.client.importers.fitbit import ARCHIVE_ERRORS, read_head, read_member, zone_of
from restwise.client.store import Observation, record_key

SOURCE = "open_mhealth"
MAX_DOCUMENT_BYTES = 256 * 1024**2  # one JSON document is parsed whole; JSON lines stream

SNIFF_MARKERS = (b'"effective_time_frame"', b'"schema_id"', b'"rr_interval"', b'"heart_rate"',
                 b'"step_count"', b'"total_sleep_time"', b'"sleep_duration"')

DURATION_SECONDS = {"ms": 0.001, "sec": 1.0, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0,
                    "wk": 604800.0}
LENGTH_METRES = {"m": 1.0, "km": 1000.0, "mi": 1609.344, "ft": 0.3048, "yd": 0.9144,
                 "cm": 0.01, "mm": 0.001, "in": 0.0254}
ENERGY_KCAL = {"kcal": 1.0, "Cal": 1.0, "kJ": 1 / 4.184, "J": 1 / 4184.0}
AVERAGE_STATISTICS = {"average", "mean", "median"}

BODY_KEYS = (  # body key -> schema, for data points without a header
    ("heart_rate", "heart-rate"),
    ("rr_interval", "rr-interval"),
    ("step_count", "step-count"),
    ("total_sleep_time", "sleep-episode"),
    ("sleep_duration", "sleep-duration"),
    ("activity_name", "physical-activity"),
)


class _Bad(Exception):
    """A data point that cannot be used; carries the skip reason."""


def _quantity(obj: object, units: dict[str, float], what: str) -> float:
    """``{"value": v, "unit": u}`` -> v converted by ``units``."""
    if not isinstance(obj, dict):
        raise _Bad(f"{what}: missing or malformed value")
    value, unit = obj.get("value"), obj.get("unit")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{what}: missing or malformed value")
    if unit not in units:
        raise _Bad(f"{what}: unit not recognised")
    return float(value) * units[unit]


class _Clock:
    def __init__(self, tz: ZoneInfo | None):
        self.tz = tz

    def parse(self, text: object) -> tuple[int, int]:
        """RFC 3339 date-time -> (UTC epoch seconds, UTC offset minutes)."""
        if not isinstance(text, str):
            raise _Bad("time frame: malformed date-time")
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise _Bad("time frame: malformed date-time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=self.tz or dt.UTC)
        off = when.utcoffset()
        return int(when.timestamp()), int(off.total_seconds() // 60) if off else 0

    def frame(self, body: dict) -> tuple[int, int | None, int]:
        """effective_time_frame -> (start ts, end ts or None, offset minutes)."""
        frame = body.get("effective_time_frame")
        if not isinstance(frame, dict):
            raise _Bad("data point without a time frame")
        if "date_time" in frame:
            ts, off = self.parse(frame["date_time"])
            return ts, None, off
        interval = frame.get("time_interval")
        if not isinstance(interval, dict):
            raise _Bad("data point without a time frame")
        if "start_date_time" not in interval and "end_date_time" not in interval:
            raise _Bad("time frame given only as a date or part of day")
        duration = None
        if "duration" in interval:
            duration = _quantity(interval["duration"], DURATION_SECONDS, "time frame duration")
        if "start_date_time" in interval:
            start, off = self.parse(interval["start_date_time"])
            if "end_date_time" in interval:
                end, _ = self.parse(interval["end_date_time"])
            elif duration is not None:
                end = start + round(duration)
            else:
                raise _Bad("time frame: interval without an end or duration")
        else:
            end, off = self.parse(interval["end_date_time"])
            if duration is None:
                raise _Bad("time frame: interval without a start or duration")
            start = end - round(duration)
        return start, end, off


class OpenMHealthImporter:
    name = "open_mhealth"
    description = "Open mHealth JSON data points (heart rate, RR intervals, sleep, steps, activity)"

    @staticmethod
    def _json_members(source: InputSource) -> list[str]:
        members = source.members()
        if len(members) == 1 and not source.is_zip and source.path.is_file():
            return members
        return [m for m in members if m.lower().endswith((".json", ".jsonl", ".ndjson"))]

    def sniff(self, source: InputSource) -> bool:
        members = self._json_members(source)
        if not members:
            return False
        for member in members[:32]:
            head = read_head(source, member, 4096).lstrip()
            if head[:1] not in (b"{", b"[") or head.startswith(b'{"table"'):
                return False
            if not any(marker in head for marker in SNIFF_MARKERS):
                return False
            if b'"dateTime"' in head or b'"logId"' in head:  # Fitbit's own JSON
                return False
        return True

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        clock = _Clock(zone_of(options))
        for member in self._json_members(source):
            for point in self._data_points(source, member):
                yield from self._point_records(point, clock)

    def _data_points(self, source: InputSource, member: str) -> Iterator[object]:
        if self._is_json_lines(source, member):
            yield from self._json_lines(source, member)
            return
        if source.member_size(member) > MAX_DOCUMENT_BYTES:
            raise MalformedInputError(
                f"{member}: larger than {MAX_DOCUMENT_BYTES // 1024**2} MB; "
                "split it or write it as JSON lines"
            )
        text = read_member(source, member).decode("utf-8-sig")
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise MalformedInputError(f"{member}: not valid JSON") from None
        if isinstance(doc, list):
            yield from doc
        elif isinstance(doc, dict):
            yield doc
        else:
            raise MalformedInputError(f"{member}: not an Open mHealth data point or list")

    @staticmethod
    def _is_json_lines(source: InputSource, member: str) -> bool:
        """JSON lines when the first line is a whole JSON object and more follows."""
        head = read_head(source, member, 1 << 16).decode("utf-8-sig", errors="replace")
        first, sep, rest = head.lstrip().partition("\n")
        if not sep or not rest.strip():
            return False
        try:
            return isinstance(json.loads(first), dict)
        except (json.JSONDecodeError, RecursionError):
            return False

    @staticmethod
    def _json_lines(source: InputSource, member: str) -> Iterator[object]:
        """Streamed line by line: memory stays bounded whatever the file's size."""
        with source.open(member) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig")
            try:
                for lineno, line in enumerate(text, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except (json.JSONDecodeError, RecursionError):
                        raise MalformedInputError(f"{member}: line {lineno} is not valid JSON") from None
            except ARCHIVE_ERRORS:
                raise MalformedInputError(f"{member}: damaged inside the archive") from None

    def _point_records(self, point: object, clock: _Clock) -> Iterator[Record]:
        if not isinstance(point, dict):
            yield Skip("not an Open mHealth data point")
            return
        header = point.get("header") if isinstance(point.get("header"), dict) else None
        body = point.get("body") if header is not None else point
        if not isinstance(body, dict):
            yield Skip("data point without a body")
            return
        schema = None
        point_id = None
        if header is not None:
            schema_id = header.get("schema_id")
            if isinstance(schema_id, dict) and isinstance(schema_id.get("name"), str):
                schema = schema_id["name"]
            if isinstance(header.get("id"), str):
                point_id = header["id"]
        if schema is None:
            schema = next((s for key, s in BODY_KEYS if key in body), None)
        mapper = MAPPERS.get(schema or "")
        if mapper is None:
            yield Skip("data point of a schema that is not imported")
            return
        try:
            produced = list(mapper(body, clock))
        except _Bad as bad:
            yield Skip(f"{schema}: {bad}")
            return
        except (TypeError, ValueError, OverflowError, OSError):
            yield Skip(f"{schema}: malformed data point")
            return
        for metric, unit, value, ts, end_ts, off in produced:
            yield Observation(
                metric=metric, ts=ts, end_ts=end_ts, tz_offset_min=off, value=value, unit=unit,
                source=SOURCE,
                record_key=record_key(SOURCE, metric, point_id, ts, end_ts if point_id is None else None),
            )


Produced = tuple[str, str, float, int, int | None, int]


def _heart_rate(body: dict, clock: _Clock) -> Iterator[Produced]:
    stat = body.get("descriptive_statistic")
    if stat is not None and stat not in AVERAGE_STATISTICS:
        raise _Bad("a minimum/maximum heart rate is not imported")
    bpm = _quantity(body.get("heart_rate"), {"beats/min": 1.0, "bpm": 1.0}, "heart rate")
    ts, end, off = clock.frame(body)
    yield "heart_rate", "bpm", bpm, ts, end, off


def _rr_interval(body: dict, clock: _Clock) -> Iterator[Produced]:
    ms = _quantity(body.get("rr_interval"), {"ms": 1.0, "sec": 1000.0, "s": 1000.0}, "rr interval")
    ts, end, off = clock.frame(body)
    yield "rr_interval", "ms", ms, ts, end, off


def _sleep_episode(body: dict, clock: _Clock) -> Iterator[Produced]:
    ts, end, off = clock.frame(body)
    if end is None:
        raise _Bad("sleep episode without an interval")
    yield "sleep_in_bed", "min", (end - ts) / 60, ts, end, off
    main = body.get("is_main_sleep", True) is not False
    # A night's summary is dated at wake-up: it belongs to the morning's local day.
    if "total_sleep_time" in body and main:
        yield ("sleep_duration", "min",
               _quantity(body["total_sleep_time"], DURATION_SECONDS, "total sleep time") / 60,
               end, None, off)
    if "sleep_maintenance_efficiency_percentage" in body and main:
        yield ("sleep_efficiency", "%",
               _quantity(body["sleep_maintenance_efficiency_percentage"], {"%": 1.0}, "efficiency"),
               end, None, off)


def _sleep_duration(body: dict, clock: _Clock) -> Iterator[Produced]:
    ts, end, off = clock.frame(body)
    minutes = _quantity(body.get("sleep_duration"), DURATION_SECONDS, "sleep duration") / 60
    yield "sleep_duration", "min", minutes, ts if end is None else end, None, off


def _step_count(body: dict, clock: _Clock) -> Iterator[Produced]:
    raw = body.get("step_count")
    if isinstance(raw, dict):  # step-count 2.0: {"value": n, "unit": "steps"}
        steps = _quantity(raw, {"steps": 1.0}, "step count")
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):  # step-count 1.0
        steps = float(raw)
    else:
        raise _Bad("step count: missing or malformed value")
    ts, end, off = clock.frame(body)
    yield "steps", "count", steps, ts, end, off


def _physical_activity(body: dict, clock: _Clock) -> Iterator[Produced]:
    ts, end, off = clock.frame(body)
    if end is None:
        raise _Bad("activity without an interval")
    yield "workout_duration", "min", (end - ts) / 60, ts, end, off
    if "distance" in body:
        yield ("workout_distance", "m", _quantity(body["distance"], LENGTH_METRES, "distance"),
               ts, end, off)
    if "kcal_burned" in body:
        yield ("workout_energy", "kcal", _quantity(body["kcal_burned"], ENERGY_KCAL, "energy"),
               ts, end, off)


MAPPERS = {
    "heart-rate": _heart_rate,
    "rr-interval": _rr_interval,
    "sleep-episode": _sleep_episode,
    "sleep-duration": _sleep_duration,
    "step-count": _step_count,
    "physical-activity": _physical_activity,
}
