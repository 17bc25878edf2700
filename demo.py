"""The built-in demo: generated persons, each imported into their own encrypted store.

``restwise demo`` is the README's main command. Data flows as on real devices:
generated export (Restwise JSON lines) -> importer -> encrypted store -> summary.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from restwise.models.synthetic import synthetic_person

DEMO_TZ_OFFSET_MIN = 60  # the demo persons live in UTC+1


def write_demo_export(seed: int, path: Path, days: int = 180) -> Path:
    """Write one generated person as a Restwise JSON-lines export file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in synthetic_person(seed, days=days):
            day = dt.date.fromisoformat(d.day)
            # Night measurements are taken at 06:00 local time on the morning of `day`.
            morning = int(dt.datetime(day.year, day.month, day.day, 6, tzinfo=dt.timezone(
                dt.timedelta(minutes=DEMO_TZ_OFFSET_MIN))).timestamp())
            def obs(metric, value, unit, ts=morning, end_ts=None):
                fh.write(json.dumps({
                    "table": "observations", "metric": metric, "ts": ts, "end_ts": end_ts,
                    "tz_offset_min": DEMO_TZ_OFFSET_MIN, "value": round(value, 2), "unit": unit,
                    "source": "restwise_demo", "device": "demo-watch",
                }) + "\n")
            if d.rmssd_ms is not None:
                obs("hrv_rmssd", d.rmssd_ms, "ms")
                obs("resting_heart_rate", d.resting_hr, "bpm")
                obs("sleep_duration", d.sleep_minutes, "min")
            if d.session_minutes > 0:
                fh.write(json.dumps({
                    "table": "sessions", "day": d.day, "minutes": round(d.session_minutes, 1),
                    "rpe": round(d.session_rpe, 1), "load": round(d.session_minutes * d.session_rpe, 1),
                    "kind": "training", "source": "restwise_demo",
                }) + "\n")
            if d.readiness is not None:
                fh.write(json.dumps({
                    "table": "checkins", "day": d.day, "readiness": d.readiness, "fatigue": d.fatigue,
                    "soreness": d.soreness, "stress": d.stress, "mood": d.mood,
                    "sleep_quality": d.sleep_quality, "source": "restwise_demo",
                }) + "\n")
    tmp.replace(path)
    return path
