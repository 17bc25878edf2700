"""`restwise device today` / `checkin` through the real CLI on a real encrypted store filled
with the demo generator."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from restwise.cli import app
from restwise.client.importers import run_import
from restwise.client.store import DeviceStore
from restwise.simulation.fleet import write_demo_export
from restwise.models.coach import RECOMMENDATIONS

PASS = "correct horse"


@pytest.fixture
def demo_store(tmp_path, fast_argon2):
    export = write_demo_export(2, tmp_path / "export.jsonl", days=90)
    folder = tmp_path / "store"
    with DeviceStore.create(folder, PASS, argon2=fast_argon2) as s:
        run_import(s, export)
    passfile = tmp_path / "pass.txt"
    passfile.write_text(PASS + "\n")
    return folder, passfile


def run(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def today_json(folder, passfile, *extra):
    r = run("device", "today", "--store", str(folder), "--passphrase-file", str(passfile),
            "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_device_today_prints_advice_for_the_last_data_day(demo_store):
    folder, passfile = demo_store
    advice = today_json(folder, passfile)
    assert advice["day"] == "2024-03-30"  # 90 demo days from 2024-01-01; data ends in the past
    assert "latest data is from 2024-03-30" in advice["note"]
    assert 0 <= advice["readiness"] <= 100
    expected_band = "green" if advice["readiness"] >= 65 else "yellow" if advice["readiness"] >= 45 else "red"
    assert advice["band"] == expected_band
    assert advice["recommendation"] in RECOMMENDATIONS
    assert 1 <= len(advice["reasons"]) <= 3
    assert 50 <= advice["baseline_days"] <= 60 and advice["rules_only"] is True
    assert advice["model"] == "none"
    text = run("device", "today", "--store", str(folder), "--passphrase-file", str(passfile))
    assert text.exit_code == 0
    assert f"{advice['readiness']} / 100" in text.stdout and advice["recommendation"] in text.stdout


def test_train_local_then_the_stored_model_is_blended(demo_store):
    folder, passfile = demo_store
    trained = today_json(folder, passfile, "--train-local")
    assert trained["rules_only"] is False and trained["model_readiness"] is not None
    assert trained["model"].startswith("trained on this device")
    again = today_json(folder, passfile)
    assert again["model"] == "stored (local): recovery-mlp"
    assert again["model_readiness"] == trained["model_readiness"]


def test_checkin_override_is_stored_as_a_label_and_sets_the_number(demo_store):
    folder, passfile = demo_store
    before = today_json(folder, passfile, "--day", "2024-03-29")
    r = run("device", "checkin", "--store", str(folder), "--passphrase-file", str(passfile),
            "--day", "2024-03-29", "--readiness", "1", "--fatigue", "2", "--override")
    assert r.exit_code == 0, r.output
    with DeviceStore.open(folder, PASS) as s:
        row = next(c for c in s.checkins() if c["day"] == "2024-03-29")
    assert row["readiness"] == 1 and row["fatigue"] == 2 and row["is_override"] == 1
    after = today_json(folder, passfile, "--day", "2024-03-29")
    assert after["reasons"][0].startswith("you corrected the coach")
    assert after["readiness"] < before["readiness"] and after["band"] in ("yellow", "red")


def test_checkin_bad_input_exit_codes(demo_store):
    folder, passfile = demo_store
    base = ["device", "checkin", "--store", str(folder), "--passphrase-file", str(passfile)]
    assert run(*base, "--readiness", "11").exit_code == 2
    assert run(*base, "--override", "--mood", "3").exit_code == 2
    assert run(*base).exit_code == 2
    assert run(*base, "--readiness", "5", "--day", "29.03.2024").exit_code == 2
    early = run("device", "today", "--store", str(folder), "--passphrase-file", str(passfile),
                "--day", "2020-01-01")
    assert early.exit_code == 1 and "before the first day" in early.output
    wrong = folder.parent / "wrong.txt"
    wrong.write_text("not the passphrase\n")
    r = run("device", "today", "--store", str(folder), "--passphrase-file", str(wrong))
    assert r.exit_code == 3


def test_today_on_an_empty_store_says_so(tmp_path, fast_argon2):
    folder = tmp_path / "empty"
    DeviceStore.create(folder, PASS, argon2=fast_argon2).close()
    passfile = tmp_path / "p.txt"
    passfile.write_text(PASS)
    r = run("device", "today", "--store", str(folder), "--passphrase-file", str(passfile))
    assert r.exit_code == 1
    assert "no days with data" in r.output


# ------------------------------------------------------------------ store -> DailyData bridge
def test_daily_data_picks_the_nights_values_sleep_stages_and_rest_days(new_store):
    import datetime as dt

    import numpy as np

    from restwise.client.dataset import NoDataError, daily_data
    from restwise.client.store import Observation, Session, record_key

    tz = 120  # UTC+2

    def ts(day, hour, minute=0):
        d = dt.date.fromisoformat(day)
        local = dt.datetime(d.year, d.month, d.day, hour, minute, tzinfo=dt.timezone(dt.timedelta(minutes=tz)))
        return int(local.timestamp())

    def obs(metric, t, value, end=None):
        return Observation(metric=metric, ts=t, value=value, unit="x", source="test",
                           record_key=record_key(metric, t, end), end_ts=end, tz_offset_min=tz)

    with pytest.raises(NoDataError):
        daily_data(new_store)
    new_store.add_observations([
        # day 1: a night reading at 04:00 and a daytime one at 15:00 -> the night's counts
        obs("hrv_rmssd", ts("2024-05-01", 4), 61.0),
        obs("hrv_rmssd", ts("2024-05-01", 15), 30.0),
        # day 2: only a daytime reading -> the day's last
        obs("hrv_rmssd", ts("2024-05-02", 13), 44.0),
        obs("hrv_rmssd", ts("2024-05-02", 18), 45.0),
        obs("resting_heart_rate", ts("2024-05-01", 8), 50.0),
        obs("resting_heart_rate", ts("2024-05-01", 20), 51.0),
        # night into day 2 (00:30 local UTC+2 is still the previous UTC day): stages summed
        # on the local day they end
        obs("sleep_light", ts("2024-05-01", 23), 200.0, end=ts("2024-05-02", 2)),
        obs("sleep_deep", ts("2024-05-02", 2), 90.0, end=ts("2024-05-02", 4)),
        obs("sleep_rem", ts("2024-05-02", 4), 110.0, end=ts("2024-05-02", 6)),
        obs("sleep_awake", ts("2024-05-02", 6), 20.0, end=ts("2024-05-02", 6, 20)),
        # day 4: the device's own total and efficiency win
        obs("sleep_duration", ts("2024-05-04", 7), 430.0),
        obs("sleep_efficiency", ts("2024-05-04", 7), 91.0),
    ])
    new_store.add_sessions([
        Session(day="2024-05-01", minutes=60, load=300.0, source="t", record_key=b"a"),
        Session(day="2024-05-01", minutes=30, load=120.0, source="t", record_key=b"b"),
        Session(day="2024-05-03", minutes=45, load=270.0, source="t", record_key=b"c"),
    ])
    new_store.upsert_checkin("2024-05-05", {"readiness": 7, "mood": 4}, source="t")
    d = daily_data(new_store)
    assert d.days == ["2024-05-01", "2024-05-02", "2024-05-03", "2024-05-04", "2024-05-05"]
    assert d["rmssd_ms"][:2].tolist() == [61.0, 45.0]
    assert d["resting_hr"][0] == 51.0
    assert d["sleep_minutes"][1] == 400.0
    assert d["sleep_efficiency"][1] == pytest.approx(100 * 400 / 420)
    assert d["sleep_minutes"][3] == 430.0 and d["sleep_efficiency"][3] == 91.0
    # 2 is a rest day inside the known span; 4 and 5 lie after the last session: unknown
    assert d["load"][:3].tolist() == [420.0, 0.0, 270.0]
    assert np.isnan(d["load"][3]) and np.isnan(d["load"][4])
    assert d["readiness"][4] == 7 and d["mood"][4] == 4 and np.isnan(d["readiness"][0])
    part = daily_data(new_store, start="2024-05-02", end="2024-05-07")
    assert part.days[0] == "2024-05-02" and len(part) == 6
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        daily_data(new_store, start="May 2")


def test_heart_rate_load_falls_back_to_trimp_from_heart_rate_zones(new_store):
    from restwise.client.dataset import daily_data
    from restwise.client.store import Observation, record_key

    t0 = 1714550400  # 2024-05-01 08:00 UTC
    zones = [("fat_burn", 30.0), ("cardio", 20.0), ("peak", 5.0), ("out_of_range", 600.0)]
    new_store.add_observations([
        Observation(metric="hr_zone_minutes", ts=t0, value=m, unit="min",
                    source=f"fitbit:{zone}", record_key=record_key(zone))
        for zone, m in zones
    ])
    d = daily_data(new_store)
    assert d.days == ["2024-05-01"]
    assert d["hr_load"][0] == 30 * 2 + 20 * 3 + 5 * 5
    assert d["load"][0] != d["load"][0]  # NaN: heart-rate TRIMP is never session-RPE load
