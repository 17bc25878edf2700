"""Deterministic synthetic persons, for the demo's bundled data, scale tests and benchmarks.

Not a substitute for the real datasets in evaluation: it is a simple generative story so a
demo federation has plausible, personal-baseline data without shipping anyone's records.

Story per person: planned training load (sRPE) follows a weekly pattern with build and
recovery blocks; a Banister-style fatigue state (7-day decay) and fitness (42-day decay)
follow from it; nightly lnRMSSD falls and resting HR rises with fatigue around the person's
own baseline; sleep varies; the morning readiness check-in (0-10) tracks the next day's
freshness with noise. Baselines differ between persons, as in real cohorts.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticDay:
    day: str
    rmssd_ms: float | None
    resting_hr: float | None
    sleep_minutes: float | None
    session_minutes: float
    session_rpe: float
    readiness: float | None
    fatigue: float | None  # 1-5, higher = fresher
    soreness: float | None
    stress: float | None
    mood: float | None
    sleep_quality: float | None


def synthetic_person(seed: int, days: int = 180, start: dt.date = dt.date(2024, 1, 1)) -> list[SyntheticDay]:
    rng = np.random.default_rng(seed)
    base_ln = rng.normal(4.0, 0.35)  # ln RMSSD baseline (~55 ms)
    base_rhr = rng.normal(56, 6)
    base_ready = rng.uniform(4.0, 7.5)
    sens = rng.uniform(0.6, 1.4)  # how strongly this person reacts to load
    fatigue = 0.0
    fitness = 0.0
    out: list[SyntheticDay] = []
    for i in range(days):
        d = start + dt.timedelta(days=i)
        week_block = (i // 7) % 4  # 3 build weeks then a recovery week
        scale = 0.6 if week_block == 3 else 0.8 + 0.15 * week_block
        rest_day = d.weekday() in (0, 4) or rng.random() < 0.08
        minutes = 0.0 if rest_day else float(np.clip(rng.normal(60, 15), 20, 120))
        rpe = 0.0 if rest_day else float(np.clip(rng.normal(5.5 * scale + 1, 1.2), 1, 10))
        load = minutes * rpe
        fatigue = fatigue * math.exp(-1 / 7) + load
        fitness = fitness * math.exp(-1 / 42) + load
        strain = (fatigue / 7 - fitness / 42) / 100.0  # ~[-1, 2]
        ln = base_ln - 0.12 * sens * strain + rng.normal(0, 0.08)
        rhr = base_rhr + 2.5 * sens * strain + rng.normal(0, 1.5)
        sleep = float(np.clip(rng.normal(440 - 10 * strain, 40), 240, 600))
        ready = float(np.clip(base_ready - 1.2 * sens * strain + 0.004 * (sleep - 440) + rng.normal(0, 0.7), 0, 10))
        missing_wear = rng.random() < 0.07
        missing_checkin = rng.random() < 0.12

        def five(x: float) -> float:
            return float(np.clip(round(x), 1, 5))

        out.append(
            SyntheticDay(
                day=d.isoformat(),
                rmssd_ms=None if missing_wear else float(math.exp(ln)),
                resting_hr=None if missing_wear else float(rhr),
                sleep_minutes=None if missing_wear else sleep,
                session_minutes=minutes,
                session_rpe=rpe,
                readiness=None if missing_checkin else round(ready),
                fatigue=None if missing_checkin else five(3.3 - 0.9 * strain + rng.normal(0, 0.6)),
                soreness=None if missing_checkin else five(3.5 - 0.8 * strain + rng.normal(0, 0.6)),
                stress=None if missing_checkin else five(rng.normal(3.4, 0.7)),
                mood=None if missing_checkin else five(3.4 - 0.4 * strain + rng.normal(0, 0.6)),
                sleep_quality=None if missing_checkin else five(3 + (sleep - 440) / 60 + rng.normal(0, 0.6)),
            )
        )
    return out
