"""Garmin FIT files (activity, monitoring and sleep files), read with ``fitdecode``.

One file, a folder of them, or a zip. Every member that starts with a FIT header is read;
the CRCs of header and file are checked, so a damaged or truncated file is refused whole
(MalformedInputError) rather than half imported. What is mapped:

=====================  ==============================================================
``hrv`` messages       one ``hrv_rmssd`` (ms) per file, from the beat-to-beat intervals
                       (see *RMSSD* below), dated at the session start
``session``            ``workout_duration`` interval (timer minutes over the elapsed
                       span), ``workout_energy``, ``workout_distance``,
                       ``training_load`` and a Session (see *Load* below)
``monitoring``         ``heart_rate`` samples; the daily summaries (``duration_min`` =
                       1440) give ``steps``, ``active_minutes`` (active time) and
                       ``active_energy`` for the day, summed over activity types
``monitoring_hr_data`` ``resting_heart_rate`` (``current_day_resting_heart_rate``)
``sleep_level``        ``sleep_awake/light/deep/rem`` intervals, each lasting until the
                       next level message
``sleep_assessment``   ``sleep_score`` (``overall_sleep_score``)
=====================  ==============================================================

Time: FIT times are UTC. The person's offset comes from the file itself
(``activity.local_timestamp`` or ``monitoring_info.local_timestamp`` minus the UTC time);
when the file has neither, from ``ImportOptions.tz``, else 0.

RMSSD: intervals outside 300-2000 ms (30-200 bpm) are dropped as artefacts, and a
successive difference is used only when both beats are kept and the second differs from
the first by at most 20 % (a missed or extra beat shows up as a jump of ~50-100 %). RMSSD is
the root mean square of the remaining successive differences; with fewer than
``MIN_RMSSD_PAIRS`` of them the file's HRV is skipped (counted) rather than stored noisy.

Load: Garmin's own ``training_load_peak`` when the session has it; otherwise Banister's
TRIMP (Banister 1991) from the session's average heart rate, using the resting and maximum
heart rate the *file itself* records (``user_profile``, ``zones_target``,
``time_in_zone``): minutes x HRr x a x exp(b x HRr) with HRr = (avg - rest) / (max - rest),
a = 0.64, b = 1.92 for men and a = 0.86, b = 1.67 for women (the mean of both when the
profile has no gender). Without those numbers there is no load, and no Session.
"""

from __future__ import annotations

import datetime as dt
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import fitdecode

from restwise.client.errors import ImportFailedError, MalformedInputError
from restwise.client.importers.base import (
    UTC_DAYS_ASSUMED,
    ImportOptions,
    InputSource,
    Notice,
    Record,
    Skip,
)
from restwise.client.importers.fitbit import ARCHIVE_ERRORS, read_head, zone_of
from restwise.client.store import HR_LOAD, Observation, Session, local_day, record_key

SOURCE = "garmin_fit"
FIT_EPOCH = 631065600  # 1989-12-31T00:00:00Z, FIT's time zero, in Unix seconds

RR_MIN_MS, RR_MAX_MS = 300.0, 2000.0
MAX_SUCCESSIVE_CHANGE = 0.20
MIN_RMSSD_PAIRS = 20

BANISTER = {"male": (0.64, 1.92), "female": (0.86, 1.67)}
SLEEP_LEVELS = {"awake": "sleep_awake", "light": "sleep_light", "deep": "sleep_deep",
                "rem": "sleep_rem"}

# What fitdecode raises on damaged content that still passes the CRC (found by the mutation
# tests): besides its own FitError, plain struct/lookup errors, and AssertionError from its
# internal consistency checks (e.g. a record running past the declared data size).
PARSE_ERRORS = (fitdecode.FitError, struct.error, ValueError, TypeError, KeyError, IndexError,
                AttributeError, OverflowError, UnicodeDecodeError, EOFError, AssertionError,
                *ARCHIVE_ERRORS)


def is_fit_header(head: bytes) -> bool:
    return len(head) >= 12 and head[0] in (12, 14) and head[8:12] == b".FIT"


def rmssd(intervals_ms: list[float]) -> tuple[float | None, int]:
    """RMSSD of beat intervals with artefact filtering; returns (value or None, pairs used)."""
    diffs = []
    for prev, cur in zip(intervals_ms, intervals_ms[1:]):
        if not (RR_MIN_MS <= prev <= RR_MAX_MS and RR_MIN_MS <= cur <= RR_MAX_MS):
            continue
        if abs(cur - prev) > MAX_SUCCESSIVE_CHANGE * prev:
            continue
        diffs.append(cur - prev)
    if len(diffs) < MIN_RMSSD_PAIRS:
        return None, len(diffs)
    return math.sqrt(sum(d * d for d in diffs) / len(diffs)), len(diffs)


def banister_trimp(minutes: float, avg_hr: float, rest_hr: float, max_hr: float,
                   gender: str | None) -> float | None:
    if not (max_hr > rest_hr > 0 and avg_hr > 0 and minutes >= 0):
        return None
    hrr = min(max((avg_hr - rest_hr) / (max_hr - rest_hr), 0.0), 1.0)
    if gender in BANISTER:
        a, b = BANISTER[gender]
        weight = a * math.exp(b * hrr)
    else:
        weight = sum(a * math.exp(b * hrr) for a, b in BANISTER.values()) / len(BANISTER)
    return round(minutes * hrr * weight, 3)


def _unix(value: object) -> int | None:
    return int(value.timestamp()) if isinstance(value, dt.datetime) else None


@dataclass
class _FileState:
    """What one FIT file says; records are built after the whole file has been read (its
    time-zone offset sits in a message near the end, and a file with a bad CRC must not
    contribute anything)."""

    serial: object = None
    created: int | None = None
    device: str | None = None
    offset_min: int | None = None
    rr_ms: list[float] = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)
    rest_hr: float | None = None
    max_hr: float | None = None
    gender: str | None = None
    last_fit_ts: int | None = None  # for compressed (timestamp_16) monitoring times
    monitoring_hr: list[tuple[int, float]] = field(default_factory=list)
    daily: dict[int, dict[str, float]] = field(default_factory=dict)  # end ts -> totals
    resting: list[tuple[int, float]] = field(default_factory=list)
    sleep_levels: list[tuple[int, str]] = field(default_factory=list)
    sleep_scores: list[float] = field(default_factory=list)


class GarminFitImporter:
    name = "garmin_fit"
    description = "Garmin FIT files (activities with beat-to-beat HRV, monitoring, sleep)"

    def _fit_members(self, source: InputSource) -> Iterator[tuple[str, bool]]:
        for member in source.members():
            yield member, is_fit_header(read_head(source, member, 14))

    def sniff(self, source: InputSource) -> bool:
        for n, (_, is_fit) in enumerate(self._fit_members(source)):
            if is_fit:
                return True
            if n >= 64:
                break
        return False

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        tz = zone_of(options)
        assumed_utc = False
        for member, is_fit in self._fit_members(source):
            if not is_fit:
                yield Skip("a file in the folder is not a FIT file")
                continue
            state = self._read(source, member)
            assumed_utc = assumed_utc or (state.offset_min is None and tz is None)
            yield from self._emit(state, tz)
        if assumed_utc:
            yield Notice(UTC_DAYS_ASSUMED)

    # ------------------------------------------------------------------ reading
    def _read(self, source: InputSource, member: str) -> _FileState:
        state = _FileState()
        try:
            with source.open(member) as raw:
                reader = fitdecode.FitReader(
                    raw, check_crc=fitdecode.CrcCheck.RAISE,
                    error_handling=fitdecode.ErrorHandling.RAISE,
                )
                for frame in reader:
                    if isinstance(frame, fitdecode.FitDataMessage):
                        self._message(state, frame)
        except ImportFailedError:
            raise
        except PARSE_ERRORS as exc:
            what = ("fails its CRC check" if isinstance(exc, fitdecode.FitCRCError)
                    else "is truncated" if isinstance(exc, (fitdecode.FitEOFError, EOFError))
                    else "is not a valid FIT file")
            raise MalformedInputError(f"{member} {what}; nothing was imported") from None
        return state

    @staticmethod
    def _message(state: _FileState, msg: fitdecode.FitDataMessage) -> None:
        values = {f.name: f.value for f in msg.fields}
        ts = _unix(values.get("timestamp"))
        if ts is not None:
            state.last_fit_ts = ts - FIT_EPOCH
        name = msg.name
        if name == "file_id":
            state.serial = values.get("serial_number")
            state.created = _unix(values.get("time_created"))
            maker = values.get("manufacturer")
            product = values.get("garmin_product") or values.get("product_name") or values.get("product")
            if isinstance(maker, str) and isinstance(product, str):
                state.device = f"{maker} {product}"
        elif name in ("activity", "monitoring_info"):
            local = values.get("local_timestamp")
            if isinstance(local, dt.datetime) and ts is not None:
                offset = round((local.replace(tzinfo=dt.UTC).timestamp() - ts) / 60)
                if -14 * 60 <= offset <= 14 * 60:
                    state.offset_min = offset
        elif name == "hrv":
            beats = values.get("time")
            beats = beats if isinstance(beats, tuple) else (beats,)
            state.rr_ms.extend(b * 1000.0 for b in beats if isinstance(b, (int, float)))
        elif name == "session":
            state.sessions.append(values)
        elif name in ("user_profile", "time_in_zone", "zones_target"):
            if isinstance(values.get("resting_heart_rate"), (int, float)):
                state.rest_hr = float(values["resting_heart_rate"])
            if isinstance(values.get("max_heart_rate"), (int, float)):
                state.max_hr = float(values["max_heart_rate"])
            if values.get("gender") in BANISTER:
                state.gender = values["gender"]
        elif name == "monitoring":
            GarminFitImporter._monitoring(state, values, ts)
        elif name == "monitoring_hr_data":
            rest = values.get("current_day_resting_heart_rate")
            if ts is not None and isinstance(rest, (int, float)):
                state.resting.append((ts, float(rest)))
        elif name == "sleep_level":
            level = values.get("sleep_level")
            if ts is not None and isinstance(level, str):
                state.sleep_levels.append((ts, level))
        elif name == "sleep_assessment":
            score = values.get("overall_sleep_score")
            if isinstance(score, (int, float)):
                state.sleep_scores.append(float(score))

    @staticmethod
    def _monitoring(state: _FileState, values: dict, ts: int | None) -> None:
        if ts is None and isinstance(values.get("timestamp_16"), int) and state.last_fit_ts is not None:
            # Compressed time: the low 16 bits of FIT time, relative to the last full one.
            last = state.last_fit_ts
            fit_ts = last + ((values["timestamp_16"] - (last & 0xFFFF)) & 0xFFFF)
            ts = fit_ts + FIT_EPOCH
        if ts is None:
            return
        if isinstance(values.get("heart_rate"), (int, float)):
            state.monitoring_hr.append((ts, float(values["heart_rate"])))
        if values.get("duration_min") == 1440 and "timestamp" in values:
            totals = state.daily.setdefault(ts, {})
            for key in ("steps", "active_time", "active_calories"):
                if isinstance(values.get(key), (int, float)):
                    totals[key] = totals.get(key, 0.0) + float(values[key])

    # ------------------------------------------------------------------ records
    def _emit(self, state: _FileState, tz) -> Iterator[Record]:
        identity = (state.serial, state.created)

        def offset_at(ts: int) -> int:
            if state.offset_min is not None:
                return state.offset_min
            if tz is not None:
                off = dt.datetime.fromtimestamp(ts, tz).utcoffset()
                return int(off.total_seconds() // 60) if off else 0
            return 0

        def obs(metric: str, unit: str, value: float, ts: int, end_ts: int | None = None) -> Observation:
            return Observation(
                metric=metric, ts=ts, end_ts=end_ts, tz_offset_min=offset_at(ts), value=value,
                unit=unit, source=SOURCE, device=state.device,
                record_key=record_key(SOURCE, metric, *identity, ts),
            )

        first_start = None
        for session in state.sessions:
            timer = session.get("total_timer_time")
            elapsed = session.get("total_elapsed_time")
            elapsed = elapsed if isinstance(elapsed, (int, float)) else timer
            start = _unix(session.get("start_time"))
            if start is None and isinstance(elapsed, (int, float)) and _unix(session.get("timestamp")):
                start = _unix(session["timestamp"]) - int(elapsed)  # a session is stamped at its end
            if start is None or not isinstance(timer, (int, float)):
                yield Skip("session: no start time or duration")
                continue
            first_start = start if first_start is None else min(first_start, start)
            end = start + int(elapsed)
            minutes = timer / 60
            yield obs("workout_duration", "min", minutes, start, end)
            if isinstance(session.get("total_calories"), (int, float)):
                yield obs("workout_energy", "kcal", float(session["total_calories"]), start, end)
            if isinstance(session.get("total_distance"), (int, float)):
                yield obs("workout_distance", "m", float(session["total_distance"]), start, end)
            load = session.get("training_load_peak")
            if not (isinstance(load, (int, float)) and load > 0):
                avg = session.get("avg_heart_rate")
                load = None
                if isinstance(avg, (int, float)) and state.rest_hr and state.max_hr:
                    load = banister_trimp(minutes, float(avg), state.rest_hr, state.max_hr,
                                          state.gender)
            if load is None:
                continue
            yield obs("training_load", "AU", float(load), start)
            sport = session.get("sport")
            yield Session(
                day=local_day(start, offset_at(start)), minutes=minutes, load=float(load),
                start_ts=start, kind=sport if isinstance(sport, str) else None, source=SOURCE,
                record_key=record_key(SOURCE, "session", *identity, start), load_kind=HR_LOAD,
            )

        if state.rr_ms:
            value, _pairs = rmssd(state.rr_ms)
            when = first_start or state.created
            if value is None:
                yield Skip("hrv: too few clean beat intervals for RMSSD")
            elif when is None:
                yield Skip("hrv: file has no time")
            else:
                yield obs("hrv_rmssd", "ms", round(value, 3), when)

        for ts, bpm in state.monitoring_hr:
            yield obs("heart_rate", "bpm", bpm, ts)
        for ts, bpm in state.resting:
            yield obs("resting_heart_rate", "bpm", bpm, ts)
        for end, totals in sorted(state.daily.items()):
            start = end - 86400  # a daily summary is stamped at the end of its day
            if "steps" in totals:
                yield obs("steps", "count", totals["steps"], start, end)
            if "active_time" in totals:
                yield obs("active_minutes", "min", round(totals["active_time"] / 60, 3), start)
            if "active_calories" in totals:
                yield obs("active_energy", "kcal", totals["active_calories"], start)

        levels = sorted(state.sleep_levels)
        for (ts, level), (next_ts, _) in zip(levels, levels[1:]):
            metric = SLEEP_LEVELS.get(level)
            if metric is None:
                continue  # 'unmeasurable': no stage to record
            yield obs(metric, "min", (next_ts - ts) / 60, ts, next_ts)
        if state.sleep_scores and levels:
            yield obs("sleep_score", "score", state.sleep_scores[-1], levels[-1][0])
        elif state.sleep_scores:
            yield Skip("sleep score without a time")
