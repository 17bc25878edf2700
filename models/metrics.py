"""The vocabulary of what a device stores: metric names, units, plausible ranges, check-in scales.

One place, read by the importers (which map vendor records onto these names), the store
(which validates units), the features (which read them back) and the auditor's report. HRV is
kept per kind: SDNN (Apple) and RMSSD (Fitbit, Oura, Garmin, Polar) measure different things
and are never mixed.

Timestamps are stored as UTC epoch seconds plus the UTC offset the person had at that moment,
so a "day" is always the person's *local* day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricSpec:
    """A named, bounded metric: a stored measurement (plausible range ``lo..hi``), or a coarse
    metric a device may send (``decimals`` set: clipped into ``lo..hi`` and rounded, so it says
    little; the egress guard allows nothing else)."""

    name: str
    unit: str
    lo: float  # smallest plausible (or sendable) value; below it a record is skipped as implausible
    hi: float  # largest plausible (or sendable) value
    interval: bool = False  # True: the record covers [ts, end_ts) (sleep stage, workout)
    description: str = ""
    decimals: int | None = None  # a coarse metric: rounded to this many decimals when sent

    def coarsen(self, value: float) -> float:
        """The value as a device sends it: clipped into range, rounded (NaN/inf: the top)."""
        if not math.isfinite(value):
            return self.hi
        return round(min(max(float(value), self.lo), self.hi), self.decimals or 0)

    def allows(self, value: Any) -> bool:
        """Is ``value`` a coarse value of this metric (in range, rounded)?"""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        value = float(value)
        return math.isfinite(value) and self.lo <= value <= self.hi and value == round(value, self.decimals or 0)


_SPECS = [
    MetricSpec("heart_rate", "bpm", 20, 250, description="instantaneous or averaged heart rate"),
    MetricSpec("resting_heart_rate", "bpm", 25, 150, description="daily resting heart rate"),
    MetricSpec("hrv_rmssd", "ms", 1, 400, description="RMSSD of beat intervals (nightly or session)"),
    MetricSpec("hrv_sdnn", "ms", 1, 400, description="SDNN of beat intervals (Apple Health)"),
    MetricSpec("rr_interval", "ms", 200, 2500, description="one beat-to-beat interval"),
    MetricSpec("respiratory_rate", "breaths/min", 4, 60),
    MetricSpec("vo2max", "mL/kg/min", 10, 95),
    MetricSpec("steps", "count", 0, 100_000, description="steps within [ts, end_ts) or a day"),
    MetricSpec("active_energy", "kcal", 0, 20_000),
    MetricSpec("active_minutes", "min", 0, 1440),
    MetricSpec("sedentary_minutes", "min", 0, 1440),
    MetricSpec("hr_zone_minutes", "min", 0, 1440, description="minutes in a heart-rate zone; zone in `source` detail"),
    # Sleep: one interval record per stage segment, value = minutes in the segment.
    MetricSpec("sleep_in_bed", "min", 0, 1440, interval=True),
    MetricSpec("sleep_asleep", "min", 0, 1440, interval=True, description="asleep, stage unknown"),
    MetricSpec("sleep_awake", "min", 0, 1440, interval=True),
    MetricSpec("sleep_light", "min", 0, 1440, interval=True, description="light / core sleep"),
    MetricSpec("sleep_deep", "min", 0, 1440, interval=True),
    MetricSpec("sleep_rem", "min", 0, 1440, interval=True),
    MetricSpec("sleep_duration", "min", 0, 1440, description="total sleep of the main night"),
    MetricSpec("sleep_efficiency", "%", 0, 100),
    MetricSpec("sleep_score", "score", 0, 100),
    # Training sessions: interval record, value = duration minutes; load in its own metric.
    MetricSpec("workout_duration", "min", 0, 1440, interval=True),
    MetricSpec("workout_energy", "kcal", 0, 20_000, interval=True),
    MetricSpec("workout_distance", "m", 0, 1_000_000, interval=True),
    MetricSpec("training_load", "AU", 0, 10_000, description="session load (sRPE x minutes or device TRIMP)"),
]

METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def is_plausible(metric: str, value: float) -> bool:
    spec = METRICS[metric]
    return spec.lo <= value <= spec.hi


# --- daily check-ins -------------------------------------------------------------------
# Canonical scales stored on the device. Importers convert from the source's scale.
#   readiness: 0-10, higher = more ready (SoccerMon's 1-10 maps as is)
#   fatigue, soreness, stress, mood, sleep_quality: 1-5, higher = BETTER
#       (SoccerMon convention: fatigue 5 = very fresh, stress 5 = very relaxed)
#   sleep_hours: hours
CHECKIN_FIELDS: dict[str, tuple[float, float]] = {
    "readiness": (0.0, 10.0),
    "fatigue": (1.0, 5.0),
    "soreness": (1.0, 5.0),
    "stress": (1.0, 5.0),
    "mood": (1.0, 5.0),
    "sleep_quality": (1.0, 5.0),
    "sleep_hours": (0.0, 24.0),
}

# Session RPE (CR-10 scale) x minutes = session load (Foster's sRPE, arbitrary units).
SESSION_RPE_RANGE = (0.0, 10.0)
SESSION_MINUTES_RANGE = (0.0, 24 * 60.0)
