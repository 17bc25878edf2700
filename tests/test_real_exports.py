"""Importers that survive real exports: the shapes an unseen cohort's sources really wrote
(team questionnaire app, Fitbit data dump), mixed folders, damaged and unknown files, links,
per-file column maps, time zones, and imports that store nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from restwise.client.errors import MalformedInputError, NothingImportedError
from restwise.client.importers import ImportOptions, get_importer, run_import
from restwise.client.importers.base import UTC_ASSUMED, UTC_DAYS_ASSUMED
from restwise.client.importers.checkin_csv import parse_day

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("export_shapes", FIXTURES / "export_shapes.py")
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)

SHUFFLED_WELLNESS = ["stress", "readiness", "soreness_area", "effective_time_frame", "mood",
                     "sleep_quality", "fatigue", "soreness", "sleep_duration_h"]
SHUFFLED_SRPE = ["duration_min", "perceived_exertion", "end_date_time", "activity_names"]


def by_day(store) -> dict[str, dict]:
    return {r["day"]: r for r in store.checkins()}


# ------------------------------------------------------------------ the team app's export
@pytest.mark.parametrize("order", [None, "shuffled"])
def test_team_app_wellness_and_srpe_in_any_column_order(new_store, tmp_path, order):
    person = shapes.write_team_app(
        tmp_path / "p", seed=3, days=21, late_answers=(5,),
        wellness_order=SHUFFLED_WELLNESS if order else None, srpe_order=SHUFFLED_SRPE if order else None,
    )
    report = run_import(new_store, tmp_path / "p", options=ImportOptions(tz="Europe/Oslo"))
    assert report.format == "team_app"
    answered = [d for d in person if d.readiness is not None]
    trained = [d for d in person if d.session_minutes > 0]
    assert report.inserted["checkin"] == len(answered)
    assert report.inserted["session"] == len(trained)
    assert report.skipped == {} and report.notes == []
    days = by_day(new_store)
    for d in answered:  # every answer on the person's own day, on the canonical scales
        row = days[d.day]
        assert (row["readiness"], row["fatigue"], row["mood"], row["stress"]) == (
            d.readiness, d.fatigue, d.mood, d.stress)
        assert row["source"] == "team_app"
    sessions = new_store.sessions()
    first = trained[0]
    s0 = next(s for s in sessions if s["day"] == first.day)
    assert s0["minutes"] == round(first.session_minutes)
    assert s0["load"] == s0["rpe"] * s0["minutes"] and s0["load_kind"] == "srpe"
    assert s0["kind"] == "team, football"


def test_team_app_timestamps_become_local_days_with_tz_and_utc_days_without(new_store, tmp_path, fast_argon2):
    from restwise.client.store import DeviceStore

    person = shapes.write_team_app(tmp_path / "p", seed=4, days=10, late_answers=(6,))
    late = person[6]
    assert late.readiness is not None
    with_tz = run_import(new_store, tmp_path / "p" / "wellness.csv", options=ImportOptions(tz="Europe/Oslo"))
    assert with_tz.notes == []
    assert late.day in by_day(new_store)  # 00:30 Oslo = 23:30 UTC the day before
    other = DeviceStore.create(tmp_path / "utc", "x", argon2=fast_argon2)
    try:
        without = run_import(other, tmp_path / "p" / "wellness.csv")
        assert without.notes == [UTC_DAYS_ASSUMED]  # said once, not per row
        days = by_day(other)
        # without --tz the late answer lands on the UTC day before, as the person was told
        assert late.day not in days
        assert days[person[5].day]["readiness"] == late.readiness
    finally:
        other.close()


def test_real_team_app_sample(new_store, shared_data):
    report = run_import(new_store, shared_data / "formats" / "team_app", options=ImportOptions(tz="Europe/Oslo"))
    assert report.format == "team_app"
    assert report.inserted["checkin"] >= 10 and report.inserted["session"] >= 5
    assert report.skipped_files == [("README.md", "not a format Restwise reads")]


# ------------------------------------------------------------------ the Fitbit data dump
def test_fitbit_dump_without_date_suffixes_and_reordered_columns(new_store, tmp_path):
    person = shapes.write_fitbit_dump(tmp_path / "dump", seed=5, days=20)
    report = run_import(new_store, tmp_path / "dump")
    assert report.format == "fitbit"
    worn = [d for d in person if d.resting_hr is not None]
    assert report.inserted["resting_heart_rate"] == len(worn)
    assert report.inserted["sleep_score"] == sum(d.sleep_minutes is not None for d in person)
    assert report.inserted["hrv_rmssd"] == sum(d.rmssd_ms is not None for d in person)
    assert report.inserted["active_minutes"] == 20
    assert report.skipped == {"resting_heart_rate: no measurement that day": 20 - len(worn)}
    assert sorted(report.skipped_files) == [
        ("README.md", "not a format Restwise reads"),
        ("lightly_active_minutes.json", "not a format Restwise reads"),
    ]
    assert report.notes == [UTC_ASSUMED]
    rmssd = dict((d, v) for d, v, *_ in new_store.daily_observations("hrv_rmssd"))
    first = next(d for d in person if d.rmssd_ms is not None)
    assert rmssd[first.day] == pytest.approx(first.rmssd_ms, abs=1e-3)


def test_real_fitbit_dump_sample(new_store, shared_data):
    report = run_import(new_store, shared_data / "formats" / "fitbit_dump")
    assert report.format == "fitbit"
    assert report.inserted["sleep_score"] >= 10 and report.inserted["resting_heart_rate"] >= 10
    assert report.inserted["active_minutes"] >= 10


def test_fitbit_files_are_recognised_by_content_not_name(new_store, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    (folder / "rhr export (1).json").write_text(json.dumps(
        [{"dateTime": "2024-03-01 00:00:00", "value": {"date": "03/01/24", "value": 51.0, "error": 6}}]))
    (folder / "scores.csv").write_text(
        "overall_score,timestamp,sleep_log_entry_id\n80,2024-03-02T06:30:00Z,7\n")
    report = run_import(new_store, folder)
    assert dict(report.inserted) == {"resting_heart_rate": 1, "sleep_score": 1}


# ------------------------------------------------------------------ mixed folders and zips
def test_mixed_folder_imports_each_file_with_its_own_importer(new_store, tmp_path):
    shapes.write_team_app(tmp_path / "p", seed=6, days=15)
    shapes.write_fitbit_dump(tmp_path / "p", seed=6, days=15)
    (tmp_path / "p" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    report = run_import(new_store, tmp_path / "p", options=ImportOptions(tz="Europe/Oslo"))
    assert set(report.format.split("+")) == {"team_app", "fitbit"}
    assert report.inserted["checkin"] > 0 and report.inserted["resting_heart_rate"] > 0
    assert ("photo.png", "not a format Restwise reads") in report.skipped_files
    assert new_store.summary()["imports"] == 1  # one import, one transaction


def test_damaged_file_in_a_zip_is_skipped_with_its_reason_strict_refuses(new_store, tmp_path):
    import zipfile

    shapes.write_team_app(tmp_path / "p", seed=7, days=12)
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tmp_path / "p" / "wellness.csv", "export/wellness.csv")
        z.writestr("export/srpe.csv", "end_date_time,activity_names,perceived_exertion,duration_min\n"
                                      '2024-01-02T18:00:00Z,"[\'team\']",5\n')  # a column short
        z.writestr("export/notes.txt", "free text")
    before = new_store.summary()
    with pytest.raises(MalformedInputError, match="srpe.csv"):
        run_import(new_store, archive, strict=True)
    assert new_store.summary() == before
    report = run_import(new_store, archive)
    assert report.inserted["checkin"] > 0 and "session" not in report.inserted
    assert report.skipped_files == [
        ("export/notes.txt", "not a format Restwise reads"),
        ("export/srpe.csv", "line 2 has 3 columns, the header has 4"),
    ]


def test_links_inside_the_folder_are_followed_never_outside(new_store, tmp_path):
    outside = tmp_path / "elsewhere"
    shapes.write_team_app(outside, seed=8, days=10)
    folder = tmp_path / "export"
    folder.mkdir()
    real = folder / "data"
    real.mkdir()
    shutil.copy(outside / "wellness.csv", real / "wellness-2024.csv")
    (folder / "wellness.csv").symlink_to(real / "wellness-2024.csv")  # inside: followed
    (folder / "srpe.csv").symlink_to(outside / "srpe.csv")  # outside: never read
    (folder / "more").symlink_to(outside, target_is_directory=True)  # a folder link: not followed
    report = run_import(new_store, folder)
    assert "session" not in report.inserted and report.inserted["checkin"] > 0
    assert sorted(report.skipped_files) == [
        ("more", "a link to a folder: not followed"),
        ("srpe.csv", "a link to a file outside the folder you named: not followed"),
    ]
    # the file is read through the link and directly (check-ins of a day are one answer each)
    rows = len((real / "wellness-2024.csv").read_text().splitlines()) - 1
    assert report.inserted["checkin"] == 2 * rows and len(new_store.checkins()) == rows


# ------------------------------------------------------------------ check-in CSV
@pytest.mark.parametrize("cell,tz,day,assumed", [
    ("2024-05-01", None, "2024-05-01", False),
    ("01.05.2024", None, "2024-05-01", False),
    ("2024-05-01T22:30:00Z", None, "2024-05-01", True),
    ("2024-05-01T22:30:00Z", "Europe/Oslo", "2024-05-02", False),
    ("2024-05-01T22:30:00.123+00:00", "America/New_York", "2024-05-01", False),
    ("2024-05-02T01:00:00+02:00", None, "2024-05-01", True),
    ("2024-05-01 23:59", "Asia/Tokyo", "2024-05-01", False),  # no offset: local already
    ("yesterday", None, None, False),
    ("2024-13-01T00:00:00Z", None, None, False),
])
def test_checkin_date_cells(cell, tz, day, assumed):
    from zoneinfo import ZoneInfo

    assert parse_day(cell, ZoneInfo(tz) if tz else None) == (day, assumed)


def test_iso_z_dates_in_a_checkin_csv_are_stored_not_dropped(new_store, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("date,readiness,mood\n2024-05-01T06:10:00Z,7,4\n2024-05-02T23:30:00Z,6,3\n")
    report = run_import(new_store, path, options=ImportOptions(tz="Europe/Oslo"))
    assert report.inserted["checkin"] == 2 and report.skipped == {}
    assert sorted(by_day(new_store)) == ["2024-05-01", "2024-05-03"]


def test_column_map_per_file_pattern(new_store, tmp_path):
    folder = tmp_path / "apps"
    folder.mkdir()
    (folder / "Wellness-2024.csv").write_text("Day,Bereit (1-5),Muskelkater\n2024-05-01,4,2\n")
    (folder / "training_log.csv").write_text("When,RPE,Minutes\n2024-05-01,6,45\n")
    (folder / "own.csv").write_text("date,readiness\n2024-05-02,8\n")
    mapping = {"files": {
        "wellness*.csv": {"date": "Day", "readiness": {"column": "Bereit (1-5)", "scale": "1-5"},
                          "soreness": {"column": "Muskelkater", "higher_is_worse": True}},
        "training*.csv": {"date": "When", "rpe": "RPE", "minutes": "Minutes"},
    }}
    report = run_import(new_store, folder, options=ImportOptions(column_map=mapping))
    assert report.skipped_files == [] and report.skipped == {}
    days = by_day(new_store)
    assert days["2024-05-01"]["readiness"] == 7.5 and days["2024-05-01"]["soreness"] == 4
    assert days["2024-05-02"]["readiness"] == 8  # no pattern matched: our own column names
    assert [(s["rpe"], s["minutes"], s["load"]) for s in new_store.sessions()] == [(6, 45, 270)]


def test_column_map_with_files_is_validated_before_reading(tmp_path):
    from restwise.client.importers.checkin_csv import load_column_map

    bad = tmp_path / "m.json"
    for content, problem in [
        ({"files": {"a*.csv": {"mood": "M"}}, "date": "D"}, "nothing else"),
        ({"files": []}, "file-name patterns"),
        ({"files": {"x.csv": {"moood": "M"}}}, "unknown field 'moood'.*x.csv"),
        ({"files": {"sub/x.csv": {"mood": "M"}}}, "file name"),
    ]:
        bad.write_text(json.dumps(content))
        with pytest.raises(MalformedInputError, match=problem):
            load_column_map(bad)


# ------------------------------------------------------------------ nothing stored: exit 9
RESTWISE = [sys.executable, "-m", "restwise.cli", "device"]


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTWISE_")}
    env["RESTWISE_PASSPHRASE_FILE"] = str(tmp_path / "pass")
    (tmp_path / "pass").write_text("orbit lantern quietly marble\n")
    return subprocess.run([*RESTWISE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_import_that_stores_nothing_exits_9_with_the_reasons(tmp_path):
    store = tmp_path / "s"
    assert _run(["init", "--store", str(store)], tmp_path).returncode == 0
    path = tmp_path / "all-bad.csv"
    path.write_text("date,readiness\nnot a day,7\nnever,6\n")
    r = _run(["import", str(path), "--store", str(store), "-q"], tmp_path)
    assert r.returncode == 9, r.stderr
    assert "unreadable date" in r.stderr and "nothing was imported" in r.stderr
    assert "Traceback" not in r.stderr
    status = _run(["status", "--store", str(store), "--json"], tmp_path)
    assert json.loads(status.stdout)["imports"] == 0  # the store is unchanged
    # a folder of the team app's files: imported, the README listed, the UTC note said once
    shapes.write_team_app(tmp_path / "team", seed=9, days=8)
    (tmp_path / "team" / "README.md").write_text("notes")
    r = _run(["import", str(tmp_path / "team"), "--store", str(store), "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "README.md" in r.stdout and "not a format Restwise reads" in r.stdout
    assert r.stderr.count("Note:") == 1 and "--tz" in r.stderr
    # importing it again adds nothing new but is not an error: the data is stored
    r = _run(["import", str(tmp_path / "team"), "--store", str(store), "-q", "--tz", "Europe/Oslo"], tmp_path)
    assert r.returncode == 0, r.stderr


def test_import_of_only_damaged_files_is_refused(new_store, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "srpe.csv").write_text("end_date_time,perceived_exertion,duration_min\n2024-01-01T10:00:00Z,5\n")
    with pytest.raises(MalformedInputError, match="srpe.csv: line 2"):
        run_import(new_store, folder, get_importer("team_app"))
    with pytest.raises(NothingImportedError):
        (folder / "srpe.csv").write_text("end_date_time,perceived_exertion,duration_min\n2024-01-01T10:00:00Z,15,60\n")
        run_import(new_store, folder)
