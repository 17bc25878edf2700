"""Device CPU to compute the linear head's statistics for one person-year (issue 12).

Target: <= 0.1 s of CPU per person-year. Timed with ``time.process_time`` (CPU, not wall: the
machine is shared), median of the repeats, one thread.

    python benchmarks/linear_head.py            # 365 generated days, 20 repeats
    python benchmarks/linear_head.py --quick    # 3 repeats

Two numbers:

* **statistics**: what the linear head adds on the device — the 7-day windows and the
  56-day answer history of every example, the person's scale, the bounded feature rows, the
  targets and the packed statistics vector with its sensitivity check
  (``linear_head.device_statistics``), from the person's model-feature frame;
* **features + statistics**: the same plus ``features.compute_features`` for the 365 days
  (which the device computes anyway for the coach; the network's round needs it too).

With ``--soccermon DIR`` it also times every SoccerMon player's whole record (per person-year).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from restwise.client.cohort import import_cohort
from restwise.client.keys import FileKeystore
from restwise.models import linear_head as lh
from restwise.models.evaluation import windowed_examples
from restwise.models.features import DailyData, compute_features
from restwise.models.linear_head_architecture import ARCHITECTURE as LINEAR_HEAD
from restwise.models.synthetic import synthetic_person
from restwise.simulation.evaluate_cli import load_cohort_days

TARGET_SECONDS_PER_PERSON_YEAR = 0.1


def person_year(seed: int = 7) -> DailyData:
    days = synthetic_person(seed, days=365)
    nan = float("nan")

    def col(key):
        return [nan if getattr(d, key) is None else getattr(d, key) for d in days]

    return DailyData.from_columns(
        [d.day for d in days], rmssd_ms=col("rmssd_ms"), resting_hr=col("resting_hr"),
        sleep_minutes=col("sleep_minutes"), load=[d.session_minutes * d.session_rpe for d in days],
        readiness=col("readiness"), fatigue=col("fatigue"), soreness=col("soreness"), stress=col("stress"),
        mood=col("mood"), sleep_quality=col("sleep_quality"))


def statistics_from_frame(frame, data: DailyData, target: str = "readiness") -> np.ndarray:
    ex = windowed_examples(frame, data.series[target], lh.WINDOW, lh.HISTORY_DAYS)
    personal = lh.PersonalScale.fit(ex.y)
    return LINEAR_HEAD.device_statistics(ex.X, ex.history, ex.y, personal)


def cpu(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--soccermon", default=None, help="also time every SoccerMon player (folder)")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    data = person_year()
    frame = compute_features(data)
    v = statistics_from_frame(frame, data)
    assert v.shape == (lh.STATISTICS_LENGTH,) and np.linalg.norm(v) <= lh.SENSITIVITY
    stats_only = cpu(lambda: statistics_from_frame(frame, data), repeats)
    full = cpu(lambda: statistics_from_frame(compute_features(data), data), repeats)
    out = {
        "days": len(data), "repeats": repeats, "statistics_length": lh.STATISTICS_LENGTH,
        "cpu_s_statistics_per_person_year": round(stats_only, 4),
        "cpu_s_features_and_statistics_per_person_year": round(full, 4),
        "target_s": TARGET_SECONDS_PER_PERSON_YEAR,
        "met": full <= TARGET_SECONDS_PER_PERSON_YEAR,
    }
    if args.soccermon:
        with tempfile.TemporaryDirectory() as tmp:
            ks = FileKeystore(Path(tmp) / "keys")
            cohort = load_cohort_days(import_cohort("soccermon", args.soccermon, Path(tmp) / "s", keystore=ks), ks)
        per_year = []
        for d in cohort.values():
            try:
                t = cpu(lambda d=d: statistics_from_frame(compute_features(d), d), 3)
            except lh.NotEnoughDataError:
                continue
            per_year.append(t * 365.0 / len(d))
        out["soccermon_players"] = len(per_year)
        out["soccermon_cpu_s_per_person_year_median"] = round(statistics.median(per_year), 4)
        out["soccermon_cpu_s_per_person_year_max"] = round(max(per_year), 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
