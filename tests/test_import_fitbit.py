"""Fitbit account export importer: a hand-written export folder (tests/fixtures/fitbit), the
same as a zip, time zones, Edwards TRIMP, idempotency, and the real public samples."""

from __future__ import annotations

import datetime as dt
import shutil
import zipfile
from pathlib import Path

import pytest

from restwise.client.errors import ImportFailedError, MalformedInputError
from restwise.client.importers import ImportOptions, get_importer, run_import
from restwise.client.importers.fitbit import edwards_trimp, parse_time

EXPORT = Path(__file__).parent / "fixtures" / "fitbit" / "MyFitbitData"

EXPECTED = {
    "hr_zone_minutes": 4, "resting_heart_rate": 1, "heart_rate": 2, "steps": 2,
    "sleep_in_bed": 2, "sleep_duration": 1, "sleep_efficiency": 1, "sleep_score": 1,
    "sleep_awake": 2, "sleep_light": 2, "sleep_deep": 1, "sleep_rem": 1, "sleep_asleep": 1,
    "sedentary_minutes": 2, "active_minutes": 2, "hrv_rmssd": 2,
    "workout_duration": 2, "workout_energy": 2, "workout_distance": 1, "training_load": 1,
    "session": 1,
}


def utc(*args) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp())


def values(store, metric):
    return [v for _ts, v, _end, _off in store.observations(metric)]


def test_export_folder_maps_every_file_kind(new_store):
    report = run_import(new_store, EXPORT)
    assert report.format == "fitbit"
    assert dict(report.inserted) == EXPECTED
    assert report.skipped == {"resting_heart_rate: no measurement that day": 1}
    assert (report.first_day, report.last_day) == ("2024-03-01", "2024-03-02")

    assert values(new_store, "resting_heart_rate") == [52.5]
    assert values(new_store, "heart_rate") == [61.0, 63.0]
    assert values(new_store, "steps") == [85.0, 112.0]  # the 0-step minute is not stored
    assert values(new_store, "hrv_rmssd") == [48.2, 51.7]
    assert values(new_store, "sedentary_minutes") == [700.0, 650.0]
    assert values(new_store, "active_minutes") == [35.0, 0.0]  # moderately + very, not lightly
    assert values(new_store, "sleep_score") == [81.0]
    zones = new_store.conn.execute(
        "SELECT source, value FROM observations WHERE metric='hr_zone_minutes' ORDER BY source"
    ).fetchall()
    assert zones == [("fitbit:cardio", 20.0), ("fitbit:fat_burn", 45.0),
                     ("fitbit:out_of_range", 1200.0), ("fitbit:peak", 5.0)]


def test_sleep_stages_and_summary(new_store):
    run_import(new_store, EXPORT)
    assert values(new_store, "sleep_light") == [60.0, 290.0]
    assert values(new_store, "sleep_deep") == [90.0]
    assert values(new_store, "sleep_rem") == [30.0]
    assert values(new_store, "sleep_awake") == [10.0, 10.0]  # a wake segment; a nap's 'restless'
    assert values(new_store, "sleep_asleep") == [30.0]
    stage_minutes = sum(sum(values(new_store, m)) for m in
                        ("sleep_light", "sleep_deep", "sleep_rem")) + 10
    assert stage_minutes == 480  # the main night's segments tile its time in bed
    assert values(new_store, "sleep_in_bed") == [480.0, 40.0]
    # Only the main sleep has a duration/efficiency, dated at wake-up (Fitbit's dateOfSleep).
    ((ts, minutes, _e, _o),) = new_store.observations("sleep_duration")
    assert (ts, minutes) == (utc(2024, 3, 2, 6, 30), 420.0)
    assert new_store.daily_observations("sleep_efficiency")[0][:2] == ("2024-03-02", 88.0)


def test_exercise_sessions_and_edwards_trimp(new_store):
    run_import(new_store, EXPORT)
    # Zone midpoints / HRmax 190: 33 % -> 0, 60 % -> 2, 78 % -> 3, 93 % -> 5
    expected_load = 5 * 0 + 10 * 2 + 25 * 3 + 5 * 5
    (session,) = new_store.sessions()
    assert session == {"day": "2024-03-01", "start_ts": utc(2024, 3, 1, 17), "minutes": 45.0,
                       "rpe": None, "load": float(expected_load), "load_kind": "hr", "kind": "Run",
                       "source": "fitbit"}
    durations = new_store.observations("workout_duration")
    assert [(ts, v, end) for ts, v, end, _o in durations] == [
        (utc(2024, 3, 1, 17), 45.0, utc(2024, 3, 1, 17, 50)),  # active 45 of 50 elapsed minutes
        (utc(2024, 3, 2, 12), 30.0, utc(2024, 3, 2, 12, 30)),
    ]
    assert values(new_store, "workout_distance") == [8500.0]
    assert values(new_store, "training_load") == [float(expected_load)]


@pytest.mark.parametrize("text,expected", [
    ("01/02/18 00:00:00", dt.datetime(2018, 1, 2)),
    ("12/31/99", dt.datetime(1999, 12, 31)),
    ("3/7/68 7:05:09", dt.datetime(2068, 3, 7, 7, 5, 9)),
    ("2018-02-01T22:36:00.000", dt.datetime(2018, 2, 1, 22, 36)),
])
def test_fitbit_time_formats(text, expected):
    assert parse_time(text) == expected
    if "/" in text and " " in text:
        assert parse_time(text) == dt.datetime.strptime(text, "%m/%d/%y %H:%M:%S")


@pytest.mark.parametrize("text", ["13/01/18 00:00:00", "01/02/18 25:00:00", "01/02/2018", "x", 5])
def test_fitbit_time_refuses_nonsense(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_edwards_trimp_without_bpm_bounds_uses_default_zone_weights():
    zones = [{"name": "Out of Range", "minutes": 10}, {"name": "Fat Burn", "minutes": 10},
             {"name": "Cardio", "minutes": 10}, {"name": "Peak", "minutes": 10}]
    assert edwards_trimp(zones) == 10 * (0 + 2 + 3 + 5)
    assert edwards_trimp([]) is None and edwards_trimp(None) is None


def test_time_zone_option_shifts_local_times(new_store):
    run_import(new_store, EXPORT, options=ImportOptions(tz="Europe/Berlin"))
    ((ts, _v, _e, off),) = new_store.observations("sleep_duration")
    assert (ts, off) == (utc(2024, 3, 2, 5, 30), 60)  # 06:30 CET
    day_rows = new_store.daily_observations("resting_heart_rate")
    assert day_rows[0][0] == "2024-03-01" and day_rows[0][2] == utc(2024, 2, 29, 23)
    # sleep_score's timestamp carries its own 'Z': the instant is kept, the day is local
    ((ts, _v, _e, off),) = new_store.observations("sleep_score")
    assert (ts, off) == (utc(2024, 3, 2, 6, 30), 60)


def test_unknown_time_zone_is_refused(new_store):
    with pytest.raises(ImportFailedError, match="unknown time zone"):
        run_import(new_store, EXPORT, options=ImportOptions(tz="Mars/Olympus"))
    assert new_store.summary()["observations"] == {}


def test_zip_gives_the_same_result_and_reimport_adds_nothing(new_store, tmp_path):
    archive = tmp_path / "MyFitbitData.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(EXPORT.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(EXPORT.parent).as_posix())
    report = run_import(new_store, archive)
    assert dict(report.inserted) == EXPECTED
    again = run_import(new_store, EXPORT)  # the same data from the folder: all duplicates
    assert again.total_inserted == 0
    assert again.duplicates == sum(EXPECTED.values())


def test_other_export_files_are_ignored_not_misread(new_store, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(EXPORT, folder)
    (folder / "Alex" / "Physical Activity" / "steps_goal.json").write_text('{"goal": 10000}')
    (folder / "Alex" / "Personal & Account").mkdir()
    (folder / "Alex" / "Personal & Account" / "badge.json").write_text('{"badge": "x"}')
    report = run_import(new_store, folder)
    assert dict(report.inserted) == EXPECTED


def test_web_api_hrv_json_and_unknown_zone_names(new_store, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "hrv-2024-03-01.json").write_text(
        '[{"dateTime": "2024-03-01", "value": {"dailyRmssd": 41.5, "deepRmssd": 44.0}}]')
    (folder / "time_in_heart_rate_zones-2024-03-01.json").write_text(
        '[{"dateTime": "03/01/24 00:00:00", "value": {"valuesInZones": '
        '{"IN_CUSTOM_ZONE": 30.0, "IN_SOME_NEW_ZONE": 3.0}}}]')
    (folder / "Heart Rate Variability Details - 2024-03-(01).csv").write_text(
        "timestamp,rmssd,coverage,low_frequency,high_frequency\n2024-03-01T03:00:00,40,0.9,1,1\n")
    report = run_import(new_store, folder, options=ImportOptions(tz="Europe/Oslo"))
    assert dict(report.inserted) == {"hrv_rmssd": 1, "hr_zone_minutes": 1}
    assert report.skipped == {"hr zones: unknown zone": 1}
    assert new_store.daily_observations("hrv_rmssd")[0][:2] == ("2024-03-01", 41.5)


def test_single_file_is_recognised(new_store):
    path = EXPORT / "Alex" / "Physical Activity" / "resting_heart_rate-2024-03-01.json"
    report = run_import(new_store, path)
    assert report.format == "fitbit" and dict(report.inserted) == {"resting_heart_rate": 1}


def test_malformed_json_refuses_the_whole_export(new_store, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(EXPORT, folder)
    target = folder / "Alex" / "Physical Activity" / "steps-2024-03-02.json"
    target.write_text(target.read_text()[:-20])
    with pytest.raises(MalformedInputError, match="steps-2024-03-02.json"):
        run_import(new_store, folder, get_importer("fitbit"), strict=True)
    assert new_store.summary()["observations"] == {}
    assert new_store.sessions() == []


def test_a_damaged_file_is_skipped_and_listed_the_rest_imports(new_store, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(EXPORT, folder)
    target = folder / "Alex" / "Physical Activity" / "steps-2024-03-02.json"
    target.write_text(target.read_text()[:-20])
    report = run_import(new_store, folder)
    damaged = [(m, why) for m, why in report.skipped_files if m.endswith("steps-2024-03-02.json")]
    assert damaged == [("Alex/Physical Activity/steps-2024-03-02.json", "not valid JSON")]
    assert report.inserted["resting_heart_rate"] >= 1 and report.inserted["session"] >= 1
    summary = new_store.summary()
    assert summary["imports"] == 1
    # one transaction: the damaged file's day of steps is absent, everything else is there
    steps_days = {d for d, *_ in new_store.daily_observations("steps")}
    assert "2024-03-02" not in steps_days


def test_entries_of_the_wrong_shape_are_counted_skips(new_store, tmp_path):
    path = tmp_path / "heart_rate-2024-03-02.json"
    path.write_text('[{"dateTime": "03/02/24 07:00:00", "value": {"bpm": 61}},'
                    ' {"dateTime": "03/02/24 07:00:05", "value": "x"},'
                    ' {"dateTime": "13/45/24 07:00:05", "value": {"bpm": 61}}]')
    report = run_import(new_store, path)
    assert dict(report.inserted) == {"heart_rate": 1}
    assert report.skipped == {"heart_rate: malformed entry": 2}


def test_real_fitbit_samples(new_store, shared_data):
    folder = shared_data / "formats" / "fitbit"
    if not folder.is_dir():
        pytest.skip("no Fitbit samples")
    report = run_import(new_store, folder)
    assert report.format == "fitbit"
    assert dict(report.inserted) == {
        "hr_zone_minutes": 8, "resting_heart_rate": 2, "sleep_in_bed": 2, "sleep_duration": 2,
        "sleep_efficiency": 2, "sleep_score": 2,
    }
    assert report.skipped == {}
    assert values(new_store, "resting_heart_rate") == [pytest.approx(59.4208, abs=1e-3),
                                                       pytest.approx(58.2964, abs=1e-3)]
    assert sorted(values(new_store, "sleep_score")) == [75.0, 82.0]
    assert [d for d, *_ in new_store.daily_observations("sleep_duration")] == ["2018-02-02",
                                                                                "2018-02-03"]
    assert run_import(new_store, folder).total_inserted == 0
