"""The simulated fleet: many devices, each one person with their own encrypted store, in one
folder of a run directory (``DIR/fleet/``).

* generated persons (``dataset`` "demo"/"synthetic"): each is written as a Restwise JSON-lines
  export (:func:`write_demo_export`), imported by the real importer into their own store, and
  the plain export deleted - data flows as on a real device;
* a research cohort (SoccerMon, LifeSnaps from the shared data folder, or a cohort folder of
  exports): ``client.cohort.import_cohort`` imports one store per person.

Keys live in ``fleet/keystore`` (a ``FileKeystore``: the simulation's stand-in for each phone's
platform keystore). Only simulations and the demo create stores; a deployment's devices bring
their own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from restwise.client.app import SIM_KEYSTORE_DIR, device_folder_name
from restwise.client.cohort import import_cohort
from restwise.client.importers import run_import
from restwise.client.keys import FileKeystore
from restwise.client.store import DeviceStore
from restwise.common.fsutil import atomic_write_bytes
from restwise.models.synthetic import synthetic_person
from restwise.server.runconfig import RunConfig

FLEET_DIR = "fleet"
DEMO_DAYS = 120
GENERATED_DATASETS = ("demo", "synthetic")
RESEARCH_DATASETS = ("soccermon", "lifesnaps")
# Generated person i of a run with seed s: synthetic_person(s * PERSON_SEED_STRIDE + i + 1).
PERSON_SEED_STRIDE = 100_003

DEMO_TZ_OFFSET_MIN = 60  # the demo persons live in UTC+1


def write_demo_export(seed: int, path: Path, days: int = 180) -> Path:
    """Write one generated person as a Restwise JSON-lines export file (atomically)."""
    records: list[dict] = []
    for d in synthetic_person(seed, days=days):
        day = dt.date.fromisoformat(d.day)
        # Night measurements are taken at 06:00 local time on the morning of `day`.
        morning = int(dt.datetime(day.year, day.month, day.day, 6, tzinfo=dt.timezone(
            dt.timedelta(minutes=DEMO_TZ_OFFSET_MIN))).timestamp())
        if d.rmssd_ms is not None:
            for metric, value, unit in (("hrv_rmssd", d.rmssd_ms, "ms"), ("resting_heart_rate", d.resting_hr, "bpm"),
                                        ("sleep_duration", d.sleep_minutes, "min")):
                records.append({
                    "table": "observations", "metric": metric, "ts": morning, "end_ts": None,
                    "tz_offset_min": DEMO_TZ_OFFSET_MIN, "value": round(value, 2), "unit": unit,
                    "source": "restwise_demo", "device": "demo-watch",
                })
        if d.session_minutes > 0:
            records.append({
                "table": "sessions", "day": d.day, "minutes": round(d.session_minutes, 1),
                "rpe": round(d.session_rpe, 1), "load": round(d.session_minutes * d.session_rpe, 1),
                "kind": "training", "source": "restwise_demo",
            })
        if d.readiness is not None:
            records.append({
                "table": "checkins", "day": d.day, "readiness": d.readiness, "fatigue": d.fatigue,
                "soreness": d.soreness, "stress": d.stress, "mood": d.mood,
                "sleep_quality": d.sleep_quality, "source": "restwise_demo",
            })
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return path


def shared_data_dir() -> Path:
    """The public datasets: ``$RESTWISE_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("RESTWISE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def prepare_fleet(fleet_dir: Path, config: RunConfig, *, demo_days: int = DEMO_DAYS) -> int:
    """One encrypted store per person under ``fleet_dir`` (``device-NNNNN``), keys in
    ``fleet_dir/keystore``. Idempotent: existing stores are kept. Returns the number of devices."""
    fleet_dir = Path(fleet_dir)
    fleet_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keystore = FileKeystore(fleet_dir / SIM_KEYSTORE_DIR)
    n = config.device_count
    if config.dataset in GENERATED_DATASETS:
        exports = fleet_dir / "exports"
        for i in range(n):
            folder = fleet_dir / device_folder_name(i)
            if DeviceStore.exists(folder):
                continue
            seed = int(config.seed) * PERSON_SEED_STRIDE + i + 1
            export = write_demo_export(seed, exports / f"person-{i:05d}.jsonl", days=demo_days)
            with DeviceStore.create(folder, keystore=keystore) as store:
                run_import(store, export)
            export.unlink()  # the plain export is not needed once imported
        return n
    if config.dataset in RESEARCH_DATASETS:
        kind, source = config.dataset, shared_data_dir() / config.dataset
    else:
        kind, source = "folder", Path(config.dataset)
    stores = import_cohort(kind, source, fleet_dir / "persons", keystore=keystore, persons=n)
    if len(stores) < n:
        raise ValueError(f"population: the dataset has {len(stores)} persons, fewer than the population ({n})")
    for i, person in enumerate(stores[:n]):
        link = fleet_dir / device_folder_name(i)
        if not link.exists():
            link.symlink_to(person.folder.resolve(), target_is_directory=True)
    return n


__all__ = ["FLEET_DIR", "DEMO_DAYS", "write_demo_export", "prepare_fleet", "shared_data_dir"]
