"""SoccerMon dataset loader (Midoglu et al., Sci Data 2024, CC BY 4.0): the subjective part.

Layout read (a folder, or a zip of it; the ``subjective/`` level is optional)::

    wellness/readiness.csv  fatigue.csv  mood.csv  sleep_quality.csv  soreness.csv
    wellness/stress.csv  sleep_duration.csv
    training-load/daily_load.csv  training-load/session.json

The wellness and load files are *wide* CSVs: one row per calendar day (``dd.mm.yyyy``), one
column per player (``TeamA-<uuid>``). One player column is one person: the loader yields that
person's records only (``ImportOptions.person``), so a simulated federation builds one encrypted
store per player, exactly as each player's own device would.

Mapping onto the store (canonical scales of ``models.metrics``):

* check-ins: readiness 1-10 as is; fatigue, mood, sleep quality, soreness, stress 1-5 as is
  (PMSys scales are already "higher = better"); self-reported sleep hours as ``sleep_hours``.
  A 0 on these scales means "not answered" (PMSys writes 0 for a skipped item) and is dropped.
* sessions: every entry of ``session.json`` becomes a :class:`Session` (minutes, RPE, sRPE
  load). Where the provider's ``daily_load`` exceeds the sum of that day's listed sessions
  (about 1% of days), the remainder is stored as one ``unitemized`` session (0 minutes, load =
  remainder), so the day's load matches the provider's total.
* ``daily_load`` is 0.0 both on rest days and on days the player reported nothing. A day with
  any wellness answer and no session is stored as a ``rest`` session (0 minutes, load 0): the
  player was there and did not train. A day with neither stays absent (load unknown).

Quirks handled: the first header cell is ``Readiness Data``/``Fatigue Data``/... instead of
``Date``; a trailing empty column may appear; empty cells are missing answers. Injury,
illness and game-performance files have no place in the store and are not read.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
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
from restwise.client.store import Session, record_key

SOURCE = "soccermon"

# check-in field -> wellness file; 0 on these scales means "not answered"
WELLNESS_FILES: dict[str, str] = {
    "readiness": "wellness/readiness.csv",
    "fatigue": "wellness/fatigue.csv",
    "mood": "wellness/mood.csv",
    "sleep_quality": "wellness/sleep_quality.csv",
    "soreness": "wellness/soreness.csv",
    "stress": "wellness/stress.csv",
    "sleep_hours": "wellness/sleep_duration.csv",
}
DAILY_LOAD_FILE = "training-load/daily_load.csv"
SESSIONS_FILE = "training-load/session.json"
REQUIRED = ("wellness/readiness.csv", DAILY_LOAD_FILE)

# A listed session total may differ from daily_load by float noise only.
LOAD_TOLERANCE = 1e-6


def _find_member(members: list[str], suffix: str) -> str | None:
    """The member whose path ends with ``suffix`` (shortest path wins: the dataset root)."""
    hits = [m for m in members if m == suffix or m.endswith("/" + suffix)]
    return min(hits, key=len) if hits else None


def _parse_day(text: str) -> str:
    """``dd.mm.yyyy`` -> ISO ``yyyy-mm-dd``; ValueError names no value."""
    try:
        return dt.datetime.strptime(text.strip(), "%d.%m.%Y").date().isoformat()
    except ValueError:
        raise ValueError("unreadable date cell") from None


def _read_wide_column(source: InputSource, member: str, person: str) -> dict[str, str]:
    """One player's column of a wide CSV as {ISO day: raw cell} (empty cells omitted)."""
    with source.open(member) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            raise MalformedInputError(f"{member}: empty file") from None
        # The first header cell is the date column whatever it is called ('Date',
        # 'Readiness Data', ...). A trailing empty header cell is an artefact of the export.
        names = [h.strip() for h in header]
        try:
            col = names.index(person)
        except ValueError:
            return {}
        if col == 0:
            raise MalformedInputError(f"{member}: the person names the date column")
        out: dict[str, str] = {}
        for lineno, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            try:
                day = _parse_day(row[0])
            except ValueError:
                raise MalformedInputError(f"{member}: line {lineno} has an unreadable date") from None
            cell = row[col].strip() if col < len(row) else ""
            if cell:
                out[day] = cell
        return out


def _header(source: InputSource, member: str) -> list[str]:
    with source.open(member) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        try:
            header = next(csv.reader(text))
        except StopIteration:
            raise MalformedInputError(f"{member}: empty file") from None
    return [h.strip() for h in header[1:] if h.strip()]


def list_persons(data_path: Path | str) -> list[str]:
    """The player columns of a SoccerMon folder, in file order."""
    source = InputSource(data_path)
    try:
        member = _find_member(source.members(), "wellness/readiness.csv")
        if member is None:
            raise ImportFailedError(f"{Path(data_path).name}: not a SoccerMon folder (no wellness/readiness.csv)")
        return _header(source, member)
    finally:
        source.close()


class SoccerMonImporter:
    name = "soccermon"
    whole_source = True  # one folder holds every person: never read file by file
    description = "SoccerMon dataset (subjective wellness + sRPE sessions), one player per store"

    def sniff(self, source: InputSource) -> bool:
        members = source.members()
        if not all(_find_member(members, s) for s in REQUIRED):
            return False
        head = source.head(_find_member(members, "wellness/readiness.csv"), 256)
        return b"TeamA-" in head or b"TeamB-" in head or b"Readiness" in head

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        person = options.person
        if not person:
            raise ImportFailedError(
                "SoccerMon holds many players: choose one (ImportOptions.person / --person)"
            )
        members = source.members()
        load_member = _find_member(members, DAILY_LOAD_FILE)
        if load_member is None:
            raise MalformedInputError(f"{source.path.name}: {DAILY_LOAD_FILE} is missing")
        if person not in _header(source, _find_member(members, "wellness/readiness.csv")):
            raise ImportFailedError("that person is not a player column of this SoccerMon folder")

        # --- check-ins: one record per day with any answer
        answers: dict[str, dict[str, float]] = {}
        for field, suffix in WELLNESS_FILES.items():
            member = _find_member(members, suffix)
            if member is None:
                continue  # a partial copy: that item is simply absent
            for day, cell in _read_wide_column(source, member, person).items():
                try:
                    value = float(cell)
                except ValueError:
                    yield Skip(f"{field}: not a number")
                    continue
                if value != value:
                    continue
                if value == 0:
                    continue  # PMSys writes 0 for "not answered"
                answers.setdefault(day, {})[field] = value
        for day in sorted(answers):
            yield CheckinRecord(day=day, values=answers[day], source=SOURCE)

        # --- sessions
        listed: dict[str, list[dict]] = {}
        sessions_member = _find_member(members, SESSIONS_FILE)
        if sessions_member is not None:
            with source.open(sessions_member) as raw:
                try:
                    all_sessions = json.load(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise MalformedInputError(f"{sessions_member}: not valid JSON") from None
            if not isinstance(all_sessions, dict):
                raise MalformedInputError(f"{sessions_member}: expected an object keyed by player")
            for entry in all_sessions.get(person) or []:
                try:
                    day = _parse_day(str(entry["date"]))
                    minutes = float(entry["duration"])
                    rpe = float(entry["rpe"])
                    load = float(entry["srpe"])
                except (KeyError, TypeError, ValueError):
                    yield Skip("session: missing or malformed fields")
                    continue
                listed.setdefault(day, []).append({"minutes": minutes, "rpe": rpe, "load": load})

        daily_load: dict[str, float] = {}
        for day, cell in _read_wide_column(source, load_member, person).items():
            try:
                daily_load[day] = float(cell)
            except ValueError:
                yield Skip("daily_load: not a number")

        for day in sorted(set(listed) | set(daily_load) | set(answers)):
            day_sessions = listed.get(day, [])
            # Identical sessions on one day are real (two 40-minute drills at RPE 3): the
            # position within the day keeps their identities apart.
            for i, s in enumerate(day_sessions):
                yield Session(
                    day=day, minutes=s["minutes"], load=s["load"], rpe=s["rpe"], kind="training",
                    source=SOURCE,
                    record_key=record_key(SOURCE, person, day, i, s["minutes"], s["rpe"], s["load"]),
                )
            listed_total = sum(s["load"] for s in day_sessions)
            total = daily_load.get(day, 0.0)
            if total > listed_total + LOAD_TOLERANCE:
                yield Session(
                    day=day, minutes=0.0, load=total - listed_total, kind="unitemized",
                    source=SOURCE, record_key=record_key(SOURCE, person, day, "unitemized"),
                )
            elif not day_sessions and total <= 0 and day in answers:
                yield Session(
                    day=day, minutes=0.0, load=0.0, kind="rest", source=SOURCE,
                    record_key=record_key(SOURCE, person, day, "rest"),
                )
