"""Daily check-in CSV importer: canonical columns, another app's file through a column map
(scales, inversion, units, dd.mm.yyyy, semicolons, decimal commas), skips and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from restwise.client.errors import MalformedInputError, NothingImportedError
from restwise.client.importers import ImportOptions, get_importer, run_import
from restwise.client.importers.checkin_csv import CheckinCsvImporter, ColumnSpec, load_column_map, parse_column_map

FIXTURES = Path(__file__).parent / "fixtures" / "checkin_csv"


def by_day(store) -> dict:
    return {c["day"]: c for c in store.checkins()}


def test_canonical_columns(new_store):
    report = run_import(new_store, FIXTURES / "checkins.csv")
    assert report.format == "checkin_csv"
    assert dict(report.inserted) == {"checkin": 3, "session": 3}
    assert report.skipped == {}
    days = by_day(new_store)
    assert sorted(days) == ["2024-05-01", "2024-05-02", "2024-05-04"]  # 05-03: sessions only
    assert {k: days["2024-05-01"][k] for k in ("readiness", "fatigue", "soreness", "stress",
                                                "mood", "sleep_quality", "sleep_hours")} == {
        "readiness": 7.0, "fatigue": 4.0, "soreness": 3.0, "stress": 4.0, "mood": 5.0,
        "sleep_quality": 4.0, "sleep_hours": 7.5}
    assert days["2024-05-02"]["readiness"] == 8.0  # dd.mm.yyyy
    assert days["2024-05-04"]["soreness"] is None  # empty cell = not answered
    sessions = [(s["day"], s["rpe"], s["minutes"], s["load"]) for s in new_store.sessions()]
    assert sessions == [("2024-05-01", 6.0, 60.0, 360.0), ("2024-05-03", 4.0, 45.0, 180.0),
                        ("2024-05-03", 7.0, 30.0, 210.0)]


def test_folder_with_a_readme(new_store, tmp_path):
    folder = tmp_path / "diary"
    folder.mkdir()
    (folder / "checkins.csv").write_bytes((FIXTURES / "checkins.csv").read_bytes())
    (folder / "README.txt").write_text("my diary, exported from a spreadsheet\n")
    report = run_import(new_store, folder)
    assert report.format == "checkin_csv" and report.inserted["checkin"] == 3


def test_reimport_adds_no_session_twice(new_store):
    run_import(new_store, FIXTURES / "checkins.csv")
    again = run_import(new_store, FIXTURES / "checkins.csv")
    assert again.inserted["session"] == 0 and again.duplicates == 3
    assert len(new_store.sessions()) == 3 and len(new_store.checkins()) == 3


def test_other_app_through_a_column_map(new_store):
    mapping = load_column_map(FIXTURES / "other_app_map.json")
    report = run_import(new_store, FIXTURES / "other_app.csv", CheckinCsvImporter(column_map=mapping))
    assert dict(report.inserted) == {"checkin": 3, "session": 2}
    days = by_day(new_store)
    first = days["2024-05-01"]
    assert first["readiness"] == pytest.approx(7.5)                 # 4 on 1-5 -> 0-10
    assert first["fatigue"] == pytest.approx(5 - (8 - 1) * 4 / 9)  # 8 of 10 tired -> 1.89 fresh
    assert first["soreness"] == pytest.approx(4.0)                  # pain 2 of 5 -> 4 (better)
    assert first["sleep_hours"] == pytest.approx(7.5)               # 450 min
    assert days["2024-05-02"]["sleep_hours"] == pytest.approx(480.5 / 60)  # decimal comma
    assert days["2024-05-02"]["fatigue"] == pytest.approx(5.0)      # least tired = freshest
    assert days["2024-05-03"]["fatigue"] == pytest.approx(1.0)
    assert [(s["day"], s["load"]) for s in new_store.sessions()] == [
        ("2024-05-01", 350.0), ("2024-05-03", 200.0)]


@pytest.mark.parametrize("scale,raw,inverted,expected", [
    ((1, 5), 3, False, 3.0), ((1, 10), 10, False, 5.0), ((0, 10), 0, False, 1.0),
    ((1, 10), 1, True, 5.0), ((1, 5), 5, True, 1.0), ((0, 10), 5, True, 3.0),
])
def test_scale_conversion_onto_wellness_1_to_5(scale, raw, inverted, expected):
    assert ColumnSpec("stress", "s", scale, inverted).convert(raw) == pytest.approx(expected)


def test_readiness_scales_and_out_of_scale_answers():
    assert ColumnSpec("readiness", "r", (1, 5)).convert(1) == 0.0
    assert ColumnSpec("readiness", "r", (1, 10)).convert(10) == 10.0
    assert ColumnSpec("readiness", "r", (1, 5)).convert(6) is None


@pytest.mark.parametrize("mapping,problem", [
    ({"vibe": "Vibe"}, "unknown field"),
    ({"mood": {"column": "Mood", "scale": "5"}}, "must look like"),
    ({"mood": {"column": "Mood", "scale": [5, 1]}}, "lo < hi"),
    ({"sleep_hours": {"column": "S", "higher_is_worse": True}}, "cannot be inverted"),
    ({"mood": {"column": "Mood", "unit": "min"}}, "cannot take a unit"),
    ({"minutes": {"column": "M", "unit": "fortnights"}}, "must be one of"),
    ({"mood": {"scale": "1-5"}}, "needs a column"),
    ({"mood": {"column": "Mood", "colour": "red"}}, "unknown keys"),
    (["date"], "must be a JSON object"),
])
def test_bad_column_maps_are_refused_with_the_reason(mapping, problem):
    with pytest.raises(MalformedInputError, match=problem):
        parse_column_map(mapping)


def test_load_column_map_refuses_non_json(tmp_path):
    path = tmp_path / "map.json"
    path.write_text("{date: Day}")
    with pytest.raises(MalformedInputError, match="not valid JSON"):
        load_column_map(path)


def test_importer_with_a_map_recognises_the_apps_headers(new_store, tmp_path):
    path = tmp_path / "daybook.csv"
    path.write_text("Tag,Laune\n2024-05-01,8\n")
    mapping = {"date": "Tag", "mood": {"column": "Laune", "scale": "0-10"}}
    with pytest.raises(MalformedInputError, match="does not look like"):
        run_import(new_store, path, get_importer("checkin_csv"))
    report = run_import(new_store, path, CheckinCsvImporter(column_map=mapping))
    assert report.inserted["checkin"] == 1
    assert by_day(new_store)["2024-05-01"]["mood"] == pytest.approx(4.2)


def test_mapped_column_missing_from_the_file(new_store):
    with pytest.raises(MalformedInputError, match="mapped to mood"):
        run_import(new_store, FIXTURES / "checkins.csv",
                   options=ImportOptions(column_map={"mood": "Stimmung"}))


def test_bad_cells_are_counted_skips(new_store, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(
        "date,readiness,mood,rpe,minutes\n"
        "2024-05-01,7,9,,\n"            # mood 9 is off the 1-5 scale: that answer skipped
        "31.02.2024,7,3,,\n"            # no such day
        "2024-05-02,lots,3,,\n"         # not a number
        "2024-05-03,,,6,\n"             # rpe without minutes
        "2099-01-01,5,3,,\n"            # in the future
    )
    report = run_import(new_store, path)
    assert report.skipped == {
        "check-in mood: outside its declared scale": 1, "unreadable date": 1,
        "check-in readiness: not a number": 1, "session: rpe and minutes must both be given": 1,
        "date before 2000 or in the future": 1,
    }
    assert sorted(by_day(new_store)) == ["2024-05-01", "2024-05-02"]
    assert by_day(new_store)["2024-05-01"]["mood"] is None


@pytest.mark.parametrize("text,problem", [
    ("date,readiness\n2024-05-01,7,8\n", "columns"),
    ('date,readiness\n2024-05-01,"7\n', "not valid CSV"),
    ("readiness,mood\n7,3\n", "does not look like a checkin_csv"),
    ("date,comment\n2024-05-01,fine\n", "does not look like a checkin_csv"),
    ("date,readiness\n", None),
])
def test_malformed_csv_is_refused_and_store_unchanged(new_store, tmp_path, text, problem):
    run_import(new_store, FIXTURES / "checkins.csv")
    before = (new_store.summary(), new_store.checkins(), new_store.sessions())
    path = tmp_path / "bad.csv"
    path.write_text(text)
    if problem is None:  # a header and no rows: nothing imported, said with exit 9
        with pytest.raises(NothingImportedError, match="holds no records"):
            run_import(new_store, path, get_importer("checkin_csv"))
    else:
        with pytest.raises(MalformedInputError, match=problem):
            run_import(new_store, path, get_importer("checkin_csv"))
    assert (new_store.summary()["observations"], new_store.checkins(), new_store.sessions()) == (
        before[0]["observations"], before[1], before[2])


def test_column_map_file_round_trips(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"date": "Tag", "mood": {"column": "Laune", "scale": "0-10"}}))
    specs = parse_column_map(load_column_map(path))
    assert specs["mood"] == ColumnSpec("mood", "Laune", (0.0, 10.0), False, None)


@pytest.mark.parametrize("header", [
    # a wide daily table with a date and one of our names among many others
    ",id,date,rmssd,stress_score,resting_hr,sleep_duration,steps,mood,bpm,calories\n",
    # SoccerMon-style wide file: a date column and one column per player
    "date,TeamA-1,TeamA-2,TeamA-3\n",
])
def test_other_csv_tables_are_not_taken_for_check_ins(tmp_path, header):
    from restwise.client.importers import InputSource

    path = tmp_path / "table.csv"
    path.write_text(header)
    assert not CheckinCsvImporter().sniff(InputSource(path))


def test_dataset_tables_are_not_taken_for_check_ins(shared_data):
    from restwise.client.importers import InputSource

    tables = [shared_data / "lifesnaps" / "daily_fitbit_sema_df_unprocessed.csv",
              *sorted((shared_data / "soccermon" / "subjective").glob("*/*.csv"))]
    tables = [t for t in tables if t.is_file()]
    if not tables:
        pytest.skip("no dataset tables")
    for table in tables:
        assert not CheckinCsvImporter().sniff(InputSource(table)), table.name
