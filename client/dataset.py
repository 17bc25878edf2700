"""The bridge from the encrypted store to the feature pipeline: one :class:`DailyData` per
person, one row per local calendar day.

Which stored value becomes a day's value:

* HRV (``hrv_rmssd`` -> ``rmssd_ms``, ``hrv_sdnn`` -> ``sdnn_ms``): the *night's* reading —
  the last reading taken between 00:00 and 11:59 local time (nightly/morning measurements);
  when a day has none in that window, the day's last reading.
* ``resting_heart_rate``: the day's last value.
* sleep (``sleep_minutes``) belongs to the day the person woke up: ``sleep_duration`` of that
  day (the last one if several); otherwise the sum of asleep stage segments (asleep, light,
  deep, REM) that *end* on that local day. ``sleep_efficiency``: the stored value, otherwise
  asleep / (asleep + awake) x 100 from the stages, or asleep / in-bed x 100.
* two kinds of training load, never added together (different units, different physiology):

  - ``load``: session-RPE load (Foster: CR-10 RPE x minutes, arbitrary units), the sum of
    that day's sessions whose load kind is ``srpe`` (check-in CSVs, the team app, SoccerMon);
  - ``hr_load``: heart-rate load (TRIMP), the sum of that day's sessions whose load kind is
    ``hr`` (Fitbit exercises with heart-rate zones, Garmin activities). Without such sessions,
    ``training_load`` observations (only the wearable importers write them); without those, a
    daily Edwards TRIMP from the day's minutes in heart-rate zones (``hr_zone_minutes``; fat
    burn x2, cardio x3, peak x5, the weights the Fitbit importer uses for exercises).

  For each kind separately: days between its first and last known value without one are rest
  days (0), days outside that span are unknown (NaN).
* check-ins: the day's answers as stored (canonical scales of ``models.metrics``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict

import numpy as np

from restwise.client.errors import RestwiseDeviceError
from restwise.client.store import HR_LOAD
from restwise.models.features import CHECKIN_KEYS, LOAD_KEYS, DailyData, compute_features, make_examples
from restwise.models.recovery_mlp import STATE_NAME

NIGHT_END_HOUR = 12  # readings before local noon count as the night's
ASLEEP_STAGES = ("sleep_asleep", "sleep_light", "sleep_deep", "sleep_rem")
# Edwards' TRIMP weights per heart-rate zone (the zone is the suffix of the record's source).
HR_ZONE_WEIGHTS = {"out_of_range": 0.0, "fat_burn": 2.0, "cardio": 3.0, "peak": 5.0}


class NoDataError(RestwiseDeviceError):
    """The store holds no day with usable data in the requested range."""

    exit_code = 1
    default_message = "the store holds no days with data yet (import an export first)"


def _local(ts: int, tz_offset_min: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(ts) + int(tz_offset_min or 0) * 60, dt.UTC)


def _night_values(rows) -> dict[str, float]:
    """day -> the night's reading (last before noon, else the day's last)."""
    night: dict[str, float] = {}
    last: dict[str, float] = {}
    for ts, value, _end, tz in rows:  # ordered by ts
        t = _local(ts, tz)
        day = t.strftime("%Y-%m-%d")
        last[day] = float(value)
        if t.hour < NIGHT_END_HOUR:
            night[day] = float(value)
    return {d: night.get(d, v) for d, v in last.items()}


def _last_values(rows) -> dict[str, float]:
    out: dict[str, float] = {}
    for ts, value, _end, tz in rows:
        out[_local(ts, tz).strftime("%Y-%m-%d")] = float(value)
    return out


def _wake_day_sums(rows) -> dict[str, float]:
    """Sum of interval minutes per local day on which the interval ends."""
    out: dict[str, float] = defaultdict(float)
    for ts, value, end_ts, tz in rows:
        out[_local(end_ts if end_ts is not None else ts, tz).strftime("%Y-%m-%d")] += float(value)
    return dict(out)


def daily_data(store, *, start: str | None = None, end: str | None = None) -> DailyData:
    """The person's days from ``start`` to ``end`` (ISO days, inclusive; default: the first
    and last day with any data). Raises :class:`NoDataError` when there is nothing."""
    for name, value in (("start", start), ("end", end)):
        if value is not None:
            try:
                dt.date.fromisoformat(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a day written YYYY-MM-DD") from None

    per_day: dict[str, dict[str, float]] = defaultdict(dict)

    def put(key: str, values: dict[str, float]) -> None:
        for day, v in values.items():
            per_day[day][key] = v

    put("rmssd_ms", _night_values(store.observations("hrv_rmssd")))
    put("sdnn_ms", _night_values(store.observations("hrv_sdnn")))
    put("resting_hr", _last_values(store.observations("resting_heart_rate")))

    duration = _last_values(store.observations("sleep_duration"))
    stage_sums: dict[str, float] = defaultdict(float)
    for metric in ASLEEP_STAGES:
        for day, v in _wake_day_sums(store.observations(metric)).items():
            stage_sums[day] += v
    awake = _wake_day_sums(store.observations("sleep_awake"))
    in_bed = _wake_day_sums(store.observations("sleep_in_bed"))
    sleep = dict(stage_sums)
    sleep.update(duration)  # a device's own total beats our sum of its segments
    put("sleep_minutes", sleep)
    efficiency = {}
    for day, asleep in stage_sums.items():
        if day in awake and asleep + awake[day] > 0:
            efficiency[day] = 100.0 * asleep / (asleep + awake[day])
        elif in_bed.get(day, 0) > 0:
            efficiency[day] = min(100.0, 100.0 * asleep / in_bed[day])
    efficiency.update(_last_values(store.observations("sleep_efficiency")))
    put("sleep_efficiency", efficiency)

    srpe_load: dict[str, float] = defaultdict(float)
    hr_load: dict[str, float] = defaultdict(float)
    for s in store.sessions():
        (hr_load if s["load_kind"] == HR_LOAD else srpe_load)[s["day"]] += float(s["load"])
    if not hr_load:
        for day, v in _wake_day_sums(
            [(ts, v, None, tz) for ts, v, _e, tz in store.observations("training_load")]
        ).items():
            hr_load[day] += v
    if not hr_load:
        rows = store.conn.execute(
            "SELECT local_day, value, source FROM observations WHERE metric = 'hr_zone_minutes'"
        ).fetchall()
        for day, minutes, source in rows:
            weight = HR_ZONE_WEIGHTS.get(str(source).rsplit(":", 1)[-1])
            if weight is not None:
                hr_load[day] += weight * float(minutes)
    spans = {key: (min(values), max(values)) for key, values in
             (("load", srpe_load), ("hr_load", hr_load)) if values}
    put("load", dict(srpe_load))
    put("hr_load", dict(hr_load))

    for row in store.checkins():
        put_row = {k: row[k] for k in CHECKIN_KEYS if row.get(k) is not None}
        for k, v in put_row.items():
            per_day[row["day"]][k] = float(v)

    if not per_day and (start is None or end is None):
        raise NoDataError()
    first = start or min(per_day)
    last = end or max(per_day)
    d0, d1 = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    if d1 < d0:
        raise ValueError("the end day is before the start day")
    n = (d1 - d0).days + 1
    days = [(d0 + dt.timedelta(days=i)).isoformat() for i in range(n)]
    keys = ("rmssd_ms", "sdnn_ms", "resting_hr", "sleep_minutes", "sleep_efficiency", *LOAD_KEYS,
            *CHECKIN_KEYS)
    series = {k: np.full(n, np.nan) for k in keys}
    for i, day in enumerate(days):
        vals = per_day.get(day)
        if vals:
            for k, v in vals.items():
                series[k][i] = v
        for key, (lo, hi) in spans.items():
            if lo <= day <= hi and np.isnan(series[key][i]):
                series[key][i] = 0.0  # no load of this kind inside its known span = rest day
    return DailyData(days, series)


# ------------------------------------------------------------------------------ model state
MODEL_STATE_NAME = STATE_NAME  # the person's recovery network (shared + personal) in model_state


def save_model(store, model, meta: dict | None = None, *, name: str = MODEL_STATE_NAME) -> None:
    """Keep the person's model (both parts) in the encrypted store."""
    from restwise.models.network import model_to_bytes  # torch: only when a model is stored

    store.save_model_state(name, model_to_bytes(model), dict(meta or {}))


def load_model(store, *, name: str = MODEL_STATE_NAME):
    """The stored model and its meta, or ``(None, None)`` when there is none.
    A stored blob that cannot be read raises :class:`~restwise.models.network.ModelError`."""
    from restwise.models.network import model_from_bytes  # torch: only when a model is read

    row = store.load_model_state(name)
    if row is None:
        return None, None
    blob, meta = row
    return model_from_bytes(blob), meta


MIN_TRAINING_EXAMPLES = 14


def train_local_model(store, *, seed: int = 0, epochs: int | None = None):
    """Train the person's model on this device only (no federation) and store it.

    Returns ``(model, n_examples)``. Raises :class:`NoDataError` with fewer than
    ``MIN_TRAINING_EXAMPLES`` days whose next-day readiness is known.
    """
    from restwise.models.training import DEFAULT_EPOCHS, train_person_model  # torch: only to train

    data = daily_data(store)
    examples = make_examples(compute_features(data), data)
    if len(examples) < MIN_TRAINING_EXAMPLES:
        raise NoDataError(
            f"not enough check-ins to train a model yet ({len(examples)} usable days, "
            f"{MIN_TRAINING_EXAMPLES} needed)"
        )
    model = train_person_model(examples, seed=seed, epochs=epochs or DEFAULT_EPOCHS)
    save_model(store, model, {"trained": "local", "n_examples": len(examples),
                              "last_day": examples.target_days[-1], "stored_at": int(time.time())})
    return model, len(examples)


__all__ = [
    "daily_data", "NoDataError", "MODEL_STATE_NAME", "save_model", "load_model",
    "train_local_model", "MIN_TRAINING_EXAMPLES",
]
