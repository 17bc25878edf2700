"""Apple Health: the ``export.zip`` (or its ``export.xml``, or the unzipped folder) that the
Health app writes under *Profile → Export All Health Data*.

How it is read:

* **Streaming, bounded memory.** lxml's *target* parser (SAX-like: callbacks, no tree is
  built) is fed 256 KiB chunks straight from the zip member; records are handed on per chunk,
  so memory does not grow with the file. Multi-GB exports import on a phone-sized budget.
* **The DOCTYPE is cut out before parsing.** Exports from iOS 16 on (``HealthKit Export
  Version: 12``) carry a broken internal DTD (an ``ATTLIST`` that is never closed, with the
  ``RightEye``/``LeftEye`` declarations inside it, a stray ``>`` before ``]>``) that every
  strict parser rejects. Restwise never needs the DTD, so a streaming filter replaces the
  whole ``<!DOCTYPE ...>`` block with as many newlines as it spanned (line numbers in error
  messages stay right). Without a DTD no entity can be declared, so there is no XXE and no
  "billion laughs"; the parser is also told never to load DTDs, resolve entities or use
  the network.
* **Malformed XML refuses the whole file** (:class:`MalformedInputError`, naming the line,
  never the content); :func:`~restwise.client.importers.base.run_import` then rolls the
  store back.

What is mapped (everything else is skipped and counted):

==============================================  =====================  ==================
Apple type                                      Restwise metric        unit conversions
==============================================  =====================  ==================
HKQuantityTypeIdentifierHeartRate               heart_rate             count/min, count/s
HKQuantityTypeIdentifierRestingHeartRate        resting_heart_rate     count/min, count/s
HKQuantityTypeIdentifierHeartRateVariabilitySDNN hrv_sdnn (never RMSSD) ms, s
HKQuantityTypeIdentifierRespiratoryRate         respiratory_rate       count/min, count/s
HKQuantityTypeIdentifierVO2Max                  vo2max                 mL/min·kg
HKQuantityTypeIdentifierStepCount               steps (interval)       count
HKQuantityTypeIdentifierActiveEnergyBurned      active_energy          kcal, Cal, kJ, cal, J
HKCategoryTypeIdentifierSleepAnalysis           sleep_* (minutes)      from start/end
Workout                                         workout_duration,      min, s, hr; kcal,
                                                workout_energy,        kJ, ...; m, km,
                                                workout_distance       mi, ft, yd
==============================================  =====================  ==================

Workouts give observations only, no :class:`~restwise.client.store.Session`: a session
needs a load, and Apple exports carry no RPE; inventing a load from heart rate would need
the person's maximal and resting heart rate, which the export does not reliably give. The
session load comes from the person's check-in (sRPE × minutes), which the features join to
``workout_duration`` by day.

Times: Apple writes ``2023-01-05 07:31:02 +0100``. Each observation keeps the UTC epoch
(``ts``) *and* the offset (``tz_offset_min``), so its ``local_day`` is the person's day.
Idempotency: ``record_key("apple_health", type, sourceName, startDate, endDate, value)``
with the strings exactly as written in the file, so a re-import inserts nothing.

Privacy: ``sourceName`` (e.g. "Jane's Apple Watch") is stored as the observation's
``device`` in the encrypted store, because the features need it to keep the watch's and the
phone's overlapping step counts apart; it is never printed. Skip reasons and errors name
metrics, unit kinds and line numbers, never a value, a type name or a device read from the
file.
"""

from __future__ import annotations

import datetime as dt
import re
import zlib
import zipfile
from collections.abc import Iterator
from hashlib import blake2b
from pathlib import PurePosixPath
from zoneinfo import ZoneInfo

from lxml import etree

from restwise.client.errors import MalformedInputError
from restwise.client.importers.base import ImportOptions, InputSource, Record, Skip
from restwise.client.store import Observation

SOURCE = "apple_health"
CHUNK = 256 * 1024  # measured: 1 MiB chunks cost ~8 MB more peak RSS and were no faster
# The prolog (XML declaration + DOCTYPE) of a real export is ~10 KB; allow far more, but
# refuse a "DOCTYPE" that never ends instead of buffering a whole file looking for its end.
MAX_PROLOG = 4 << 20
SNIFF_BYTES = 64 * 1024

HK_Q = "HKQuantityTypeIdentifier"
SLEEP_TYPE = "HKCategoryTypeIdentifierSleepAnalysis"

# --- unit conversion tables: source unit string -> factor to the Restwise unit ---------
_RATE = {"count/min": 1.0, "count/s": 60.0, "bpm": 1.0, "beats/min": 1.0, "breaths/min": 1.0}
_MS = {"ms": 1.0, "s": 1000.0}
_VO2 = {
    "mL/min·kg": 1.0, "ml/min·kg": 1.0, "mL/(kg·min)": 1.0, "ml/(kg·min)": 1.0,
    "mL/kg/min": 1.0, "ml/kg/min": 1.0, "mL/(kg*min)": 1.0, "ml/(kg*min)": 1.0,
}
_COUNT = {"count": 1.0}
# HealthKit writes "Cal" for kilocalories (food calories); "cal" is the small calorie.
_ENERGY = {"kcal": 1.0, "Cal": 1.0, "kJ": 1.0 / 4.184, "cal": 0.001, "J": 1.0 / 4184.0}
_DISTANCE = {"m": 1.0, "km": 1000.0, "cm": 0.01, "mi": 1609.344, "ft": 0.3048, "yd": 0.9144}
_DURATION = {"min": 1.0, "s": 1.0 / 60.0, "sec": 1.0 / 60.0, "hr": 60.0, "h": 60.0}

# Apple type -> (metric, Restwise unit, unit table, the unit kind named in a skip reason)
QUANTITY_TYPES: dict[str, tuple[str, str, dict[str, float], str]] = {
    HK_Q + "HeartRate": ("heart_rate", "bpm", _RATE, "rate"),
    HK_Q + "RestingHeartRate": ("resting_heart_rate", "bpm", _RATE, "rate"),
    HK_Q + "HeartRateVariabilitySDNN": ("hrv_sdnn", "ms", _MS, "time"),
    HK_Q + "RespiratoryRate": ("respiratory_rate", "breaths/min", _RATE, "rate"),
    HK_Q + "VO2Max": ("vo2max", "mL/kg/min", _VO2, "oxygen uptake"),
    HK_Q + "StepCount": ("steps", "count", _COUNT, "count"),
    HK_Q + "ActiveEnergyBurned": ("active_energy", "kcal", _ENERGY, "energy"),
}

_SLEEP_PREFIX = "HKCategoryValueSleepAnalysis"
SLEEP_STAGES: dict[str, str] = {
    _SLEEP_PREFIX + "InBed": "sleep_in_bed",
    _SLEEP_PREFIX + "Asleep": "sleep_asleep",  # before iOS 16: asleep, stage unknown
    _SLEEP_PREFIX + "AsleepUnspecified": "sleep_asleep",
    _SLEEP_PREFIX + "Awake": "sleep_awake",
    _SLEEP_PREFIX + "AsleepCore": "sleep_light",
    _SLEEP_PREFIX + "AsleepDeep": "sleep_deep",
    _SLEEP_PREFIX + "AsleepREM": "sleep_rem",
    # Very old exports wrote the enum's number.
    "0": "sleep_in_bed",
    "1": "sleep_asleep",
    "2": "sleep_awake",
}

# Workout statistics whose ``sum`` is the workout's distance (whatever the sport).
_DISTANCE_STATS = frozenset(
    HK_Q + t for t in (
        "DistanceWalkingRunning", "DistanceCycling", "DistanceSwimming", "DistanceWheelchair",
        "DistanceDownhillSnowSports", "DistanceRowing", "DistancePaddleSports",
        "DistanceCrossCountrySkiing", "DistanceSkatingSports",
    )
)
_ENERGY_STAT = HK_Q + "ActiveEnergyBurned"

_new_tuple = tuple.__new__
assert Observation._fields == ("metric", "ts", "value", "unit", "source", "record_key",
                               "end_ts", "tz_offset_min", "device")

# Skip markers are immutable: share one instance per reason instead of one per record.
SKIP_TYPE = Skip("record type not used by Restwise")
SKIP_SUMMARY = Skip("daily activity summary (totals come from the records)")
SKIP_DATE = Skip("unreadable date")
SKIP_SLEEP_STAGE = Skip("sleep: unknown stage")
_SKIP_UNIT: dict[str, Skip] = {}
_SKIP_VALUE: dict[str, Skip] = {}


def _skip_unit(metric: str, kind: str) -> Skip:
    s = _SKIP_UNIT.get(metric)
    if s is None:
        s = _SKIP_UNIT[metric] = Skip(f"{metric}: unrecognised {kind} unit")
    return s


def _skip_value(metric: str) -> Skip:
    s = _SKIP_VALUE.get(metric)
    if s is None:
        s = _SKIP_VALUE[metric] = Skip(f"{metric}: unreadable value")
    return s


# --- time ------------------------------------------------------------------------------
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HM_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_OFF_RE = re.compile(r"([+-])(\d{2})(\d{2})")
_SECONDS = {f"{s:02d}": s for s in range(61)}  # 60: a leap second, as HealthKit may write


class AppleTimeParser:
    """Parses ``YYYY-MM-DD HH:MM:SS +HHMM`` into ``(utc_epoch, offset_minutes)``.

    Hot path of the importer (two dates per record): every part is looked up in a small
    cache of already-validated pieces, so a date costs a few slices and dict lookups
    instead of ``strptime``. Anything that is not exactly this shape gives ``None``.
    """

    MAX_DAYS = 200_000  # bound the day cache (a hostile file could hold many distinct days)

    def __init__(self) -> None:
        self._days: dict[str, int] = {}
        self._hm: dict[str, int] = {}
        self._offsets: dict[str, int] = {}

    def __call__(self, s: str | None) -> tuple[int, int] | None:
        if s is None or len(s) != 25 or s[10] != " " or s[16] != ":" or s[19] != " ":
            return None
        day = self._days.get(s[:10])
        if day is None:
            day = self._day(s[:10])
            if day is None:
                return None
        hm = self._hm.get(s[11:16])
        if hm is None:
            m = _HM_RE.fullmatch(s[11:16])
            if m is None:
                return None
            hm = self._hm[s[11:16]] = int(m[1]) * 3600 + int(m[2]) * 60
        sec = _SECONDS.get(s[17:19])
        if sec is None:
            return None
        off = self._offsets.get(s[20:])
        if off is None:
            m = _OFF_RE.fullmatch(s[20:])
            if m is None or int(m[3]) > 59:
                return None
            off = (int(m[2]) * 60 + int(m[3])) * (-1 if m[1] == "-" else 1)
            self._offsets[s[20:]] = off
        return day + hm + sec - off * 60, off

    def _day(self, text: str) -> int | None:
        if _DAY_RE.fullmatch(text) is None:
            return None
        try:
            ordinal = dt.date.fromisoformat(text).toordinal()
        except ValueError:
            return None
        if len(self._days) >= self.MAX_DAYS:
            self._days.clear()
        value = self._days[text] = (ordinal - _EPOCH_ORDINAL) * 86400
        return value


def zone_offset_minutes(zone: str, ts: int, default: int) -> int:
    """UTC offset (minutes) of the IANA zone ``zone`` at ``ts``; ``default`` if the name is
    not a zone this system knows (the name came from a file: never trusted, never shown)."""
    try:
        off = dt.datetime.fromtimestamp(ts, ZoneInfo(zone)).utcoffset()
    except (KeyError, ValueError, OSError, UnicodeError, OverflowError):
        return default
    return default if off is None else int(off.total_seconds() // 60)


def apple_record_key(type_: str, source_name, start: str, end: str, value) -> bytes:
    """``store.record_key("apple_health", type_, source_name, start, end, value)``, computed
    in one hash call (same bytes: record_key hashes ``repr(part)`` + ``\\x1f`` per part)."""
    return blake2b(
        f"'apple_health'\x1f{type_!r}\x1f{source_name!r}\x1f{start!r}\x1f{end!r}\x1f{value!r}\x1f"
        .encode("utf-8", "surrogatepass"),
        digest_size=16,
    ).digest()


# --- the DOCTYPE filter ------------------------------------------------------------------
_ELEMENT_START = re.compile(rb"<[A-Za-z_]")
# Inside the internal subset: skip comments and quoted literals, stop at "]" + ">".
_DTD_SUBSET_TOKEN = re.compile(rb"<!--.*?-->|\"[^\"]*\"|'[^']*'|\]\s*>", re.DOTALL)
_QUOTED_OR_MARK = re.compile(rb"\"[^\"]*\"|'[^']*'|\[|>")


def _doctype_span(buf: bytes, start: int) -> int | None:
    """End offset (exclusive) of the ``<!DOCTYPE`` at ``start``, or None if not in ``buf`` yet.

    ``<!DOCTYPE name [SYSTEM "..."] [ [internal subset] ] >``. The internal subset of an
    iOS 16+ export is malformed, so its declarations are not parsed: it ends at the first
    ``]`` followed by ``>`` outside a comment or a quoted literal (the DTD grammar puts
    no ``]`` anywhere else in an internal subset).
    """
    pos = start + len(b"<!DOCTYPE")
    while True:
        m = _QUOTED_OR_MARK.search(buf, pos)
        if m is None:
            return None
        tok = m.group()
        if tok == b">":
            return m.end()
        if tok == b"[":
            pos = m.end()
            while True:
                t = _DTD_SUBSET_TOKEN.search(buf, pos)
                if t is None:
                    return None
                if t.group().startswith(b"]"):
                    return t.end()
                pos = t.end()
        pos = m.end()  # a quoted system/public id: skip over it


def _without_doctype(stream, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The bytes of ``stream`` with the prolog's DOCTYPE block blanked out, in chunks.

    Also drops U+000B (vertical tab): some exports carry it in device names and XML 1.0
    forbids it, so a strict parser would refuse an otherwise fine file.
    """
    head = b""
    while True:
        chunk = stream.read(chunk_size)
        head += chunk
        i = head.find(b"<!DOCTYPE")
        root = _ELEMENT_START.search(head)
        if i >= 0 and (root is None or root.start() > i):
            end = _doctype_span(head, i)
            if end is not None:
                blank = b"\n" * head.count(b"\n", i, end)
                yield (head[:i] + blank + head[end:]).replace(b"\x0b", b"")
                break
            if not chunk:
                raise MalformedInputError("the file's DOCTYPE declaration never ends")
            if len(head) > MAX_PROLOG:
                raise MalformedInputError("the file's DOCTYPE declaration is implausibly long")
            continue
        if root is not None or not chunk or len(head) > MAX_PROLOG:
            yield head.replace(b"\x0b", b"")
            break
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            return
        yield chunk.replace(b"\x0b", b"")


# --- the parser target -------------------------------------------------------------------
class _HealthDataTarget:
    """lxml parser target: turns start/end events into records in ``self.out``.

    Only ``start`` does work for records (their attributes are all there is); ``end`` is
    needed to finish a Workout (its statistics are child elements) and to know when a
    Correlation closes (Records nested in a Correlation are repeated at top level by Apple,
    so the nested copies are ignored).
    """

    def __init__(self) -> None:
        self.out: list[Record] = []
        self.parse_time = AppleTimeParser()
        self.in_correlation = 0
        self.workout: dict | None = None
        self.workout_stats: list[dict] = []
        self.workout_zone: str | None = None
        self.saw_root = False

    # lxml calls start(tag, attrib) for every element, in document order.
    def start(self, tag: str, a) -> None:
        if tag == "Record":
            if self.in_correlation:
                return
            type_ = a.get("type")
            spec = QUANTITY_TYPES.get(type_)
            if spec is not None:
                self._quantity(type_, spec, a)
            elif type_ == SLEEP_TYPE:
                self._sleep(a)
            else:
                self.out.append(SKIP_TYPE)
        elif tag == "MetadataEntry":  # the most frequent element: decided in one compare
            if self.workout is not None and a.get("key") == "HKTimeZone":
                self.workout_zone = a.get("value")
        elif tag == "WorkoutStatistics":
            if self.workout is not None:
                self.workout_stats.append(dict(a))
        elif tag == "Workout":
            self.workout = dict(a)
            self.workout_stats = []
            self.workout_zone = None
        elif tag == "Correlation":
            if not self.in_correlation:
                self.out.append(SKIP_TYPE)
            self.in_correlation += 1
        elif tag == "ActivitySummary":
            self.out.append(SKIP_SUMMARY)
        elif tag == "HealthData":
            self.saw_root = True

    def end(self, tag: str) -> None:
        if tag == "Workout":
            if self.workout is not None:
                self._workout(self.workout, self.workout_stats, self.workout_zone)
            self.workout = None
            self.workout_stats = []
        elif tag == "Correlation":
            self.in_correlation -= 1

    def close(self) -> None:
        return None

    # -- records
    def _quantity(self, type_: str, spec, a) -> None:
        metric, unit, factors, kind = spec
        factor = factors.get(a.get("unit"))
        if factor is None:
            self.out.append(_skip_unit(metric, kind))
            return
        raw = a.get("value")
        try:
            value = float(raw) * factor
        except (TypeError, ValueError):
            self.out.append(_skip_value(metric))
            return
        sd = a.get("startDate")
        ed = a.get("endDate")
        start = self.parse_time(sd)
        if start is None:
            self.out.append(SKIP_DATE)
            return
        if ed == sd:
            end_ts = None
        else:
            end = self.parse_time(ed)
            if end is None:
                self.out.append(SKIP_DATE)
                return
            end_ts = end[0]
        src = a.get("sourceName")
        # tuple.__new__ with the fields in Observation's order: the NamedTuple's generated
        # __new__ (a Python function) costs ~3x more, on the hottest line of an import.
        self.out.append(_new_tuple(Observation, (
            metric, start[0], value, unit, SOURCE,
            apple_record_key(type_, src, sd, ed, raw), end_ts, start[1], src,
        )))

    def _sleep(self, a) -> None:
        raw = a.get("value")
        metric = SLEEP_STAGES.get(raw)
        if metric is None:
            self.out.append(SKIP_SLEEP_STAGE)
            return
        sd = a.get("startDate")
        ed = a.get("endDate")
        start = self.parse_time(sd)
        end = self.parse_time(ed)
        if start is None or end is None:
            self.out.append(SKIP_DATE)
            return
        src = a.get("sourceName")
        self.out.append(_new_tuple(Observation, (
            metric, start[0], (end[0] - start[0]) / 60.0, "min", SOURCE,
            apple_record_key(SLEEP_TYPE, src, sd, ed, raw), end[0], start[1], src,
        )))

    def _workout(self, w: dict, stats: list[dict], zone: str | None) -> None:
        sd = w.get("startDate")
        ed = w.get("endDate")
        start = self.parse_time(sd)
        end = self.parse_time(ed)
        if start is None or end is None:
            self.out.append(SKIP_DATE)
            return
        kind = w.get("workoutActivityType")
        src = w.get("sourceName")
        ts, off = start
        end_ts = end[0]
        # The offsets in an export are those of the phone's time zone *at export time*;
        # Apple Watch workouts also record where they happened (HKTimeZone). Prefer it,
        # so a run done while travelling lands on the traveller's local day.
        if zone:
            off = zone_offset_minutes(zone, ts, off)

        def emit(what: str, metric: str, unit: str, raw, raw_unit, table, unit_kind) -> None:
            factor = table.get(raw_unit)
            if factor is None:
                self.out.append(_skip_unit(metric, unit_kind))
                return
            try:
                value = float(raw) * factor
            except (TypeError, ValueError):
                self.out.append(_skip_value(metric))
                return
            self.out.append(Observation(
                metric, ts, value, unit, SOURCE,
                apple_record_key(f"{kind}:{what}", src, sd, ed, raw), end_ts, off, src,
            ))

        # Duration: the attribute when present, else the span between start and end.
        if w.get("duration") is not None:
            emit("duration", "workout_duration", "min", w.get("duration"),
                 w.get("durationUnit") or "min", _DURATION, "duration")
        else:
            emit("duration", "workout_duration", "min", str(end_ts - ts), "s", _DURATION,
                 "duration")

        # iOS 16+ moved totals into <WorkoutStatistics> children; older exports have them
        # as attributes. Prefer the statistics (they are what current exports carry).
        energy = next((s for s in stats if s.get("type") == _ENERGY_STAT and s.get("sum")), None)
        distance = next(
            (s for s in stats if s.get("type") in _DISTANCE_STATS and s.get("sum")), None
        )
        if energy is not None:
            emit("energy", "workout_energy", "kcal", energy.get("sum"), energy.get("unit"),
                 _ENERGY, "energy")
        elif w.get("totalEnergyBurned") is not None:
            emit("energy", "workout_energy", "kcal", w.get("totalEnergyBurned"),
                 w.get("totalEnergyBurnedUnit"), _ENERGY, "energy")
        if distance is not None:
            emit("distance", "workout_distance", "m", distance.get("sum"), distance.get("unit"),
                 _DISTANCE, "distance")
        elif w.get("totalDistance") is not None:
            emit("distance", "workout_distance", "m", w.get("totalDistance"),
                 w.get("totalDistanceUnit"), _DISTANCE, "distance")


# --- finding the export in a source ---------------------------------------------------------
_FIRST_ELEMENT = re.compile(rb"<([A-Za-z_][\w.:-]*)")
_DOCTYPE_HEALTHDATA = re.compile(rb"<!DOCTYPE\s+HealthData[\s\[>]")


def looks_like_health_data(head: bytes) -> bool:
    """True if these first bytes open an Apple Health export (root element HealthData)."""
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    doctype = _DOCTYPE_HEALTHDATA.search(head)
    first = _FIRST_ELEMENT.search(head)
    if doctype is not None and (first is None or first.start() > doctype.start()):
        return True
    return first is not None and first.group(1) == b"HealthData"


def find_export_member(source: InputSource) -> str | None:
    """The member of ``source`` that holds the export: ``apple_health_export/export.xml``
    in a zip or folder (any ``*.xml`` whose root is HealthData: the file name is
    translated on some iPhones), or the file itself."""
    members = source.members()
    if len(members) == 1 and not source.is_zip and not source.path.is_dir():
        candidates = members
    else:
        candidates = []
        for m in members:
            p = PurePosixPath(m)
            name = p.name.lower()
            if (not name.endswith(".xml") or name.startswith("._") or name == "export_cda.xml"
                    or p.parts[0] == "__MACOSX"):
                continue
            candidates.append(m)
        candidates.sort(key=lambda m: (PurePosixPath(m).name.lower() != "export.xml",
                                       m.count("/"), m))
        candidates = candidates[:8]
    for m in candidates:
        if looks_like_health_data(source.head(m, SNIFF_BYTES)):
            return m
    return None


# What reading a member can raise besides our own errors: a damaged deflate stream
# (zlib.error, EOFError), a bad CRC or header (BadZipFile), an encrypted member
# (RuntimeError), a compression method zipfile lacks, e.g. Deflate64 (NotImplementedError).
_READ_ERRORS = (zlib.error, EOFError, zipfile.BadZipFile, OSError, RuntimeError,
                NotImplementedError)


class AppleHealthImporter:
    name = "apple_health"
    single_file = True  # one export.xml per import; a folder of several: each its own
    description = "Apple Health export (export.zip, export.xml or the unzipped folder)"

    def sniff(self, source: InputSource) -> bool:
        try:
            return find_export_member(source) is not None
        except _READ_ERRORS:
            # An unreadable member (encrypted, unsupported compression, damaged) is not
            # recognisably an Apple export; the caller reports the file as unrecognised.
            return False

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        member = find_export_member(source)
        if member is None:
            raise MalformedInputError(f"{source.path.name}: no Apple Health export.xml inside")
        label = PurePosixPath(member).name
        target = _HealthDataTarget()
        parser = etree.XMLParser(
            target=target, resolve_entities=False, no_network=True, load_dtd=False,
            dtd_validation=False, huge_tree=False, recover=False,
        )
        out = target.out
        try:
            with source.open(member) as raw:
                for chunk in _without_doctype(raw):
                    parser.feed(chunk)
                    if out:
                        yield from out
                        out.clear()
                parser.close()
            yield from out
            out.clear()
        except etree.XMLSyntaxError as exc:
            line = getattr(exc, "lineno", None)
            where = f" near line {line}" if line else ""
            raise MalformedInputError(
                f"{label}: not well-formed XML{where} (truncated or damaged?); "
                "nothing was imported"
            ) from None
        except _READ_ERRORS as exc:
            raise MalformedInputError(
                f"{label}: the file cannot be read to its end ({type(exc).__name__}: damaged, "
                "truncated, encrypted or unsupported archive); nothing was imported"
            ) from None
        if not target.saw_root:
            raise MalformedInputError(f"{label}: no HealthData element; nothing was imported")
