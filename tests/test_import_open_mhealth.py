"""Open mHealth importer: hand-written data points (header/body and bare bodies, a list, JSON
lines), time offsets, skips, malformed JSON, and the real public schema samples."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from restwise.client.errors import MalformedInputError, NothingImportedError
from restwise.client.importers import ImportOptions, get_importer, run_import

FIXTURES = Path(__file__).parent / "fixtures" / "open_mhealth"


def utc(*args) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp())


def rows(store, metric):
    return store.observations(metric)


def test_list_of_data_points(new_store):
    report = run_import(new_store, FIXTURES / "datapoints.json")
    assert report.format == "open_mhealth"
    assert dict(report.inserted) == {
        "heart_rate": 2, "rr_interval": 1, "sleep_in_bed": 1, "sleep_duration": 2,
        "sleep_efficiency": 1, "steps": 2, "workout_duration": 1, "workout_distance": 1,
        "workout_energy": 1,
    }
    assert report.skipped == {"data point of a schema that is not imported": 1}
    assert rows(new_store, "heart_rate") == [(utc(2024, 4, 1, 5, 30), 58.0, None, 120),
                                             (utc(2024, 4, 1, 8), 64.0, utc(2024, 4, 1, 8, 5), 120)]
    assert rows(new_store, "rr_interval")[0][1] == 850.0
    assert rows(new_store, "sleep_in_bed") == [(utc(2024, 3, 31, 21), 480.0, utc(2024, 4, 1, 5), 120)]
    # night summaries are dated at wake-up
    assert [(d, v) for d, v, *_ in new_store.daily_observations("sleep_duration")] == [
        ("2024-04-01", 450.0), ("2024-04-02", 450.0)]
    assert rows(new_store, "sleep_efficiency")[0][1] == 93.75
    assert rows(new_store, "steps") == [
        (utc(2024, 4, 1, 6), 4200.0, utc(2024, 4, 1, 7), 120),       # 2.0: start + duration
        (utc(2024, 4, 1, 10), 1200.0, utc(2024, 4, 1, 10, 30), 120),  # 1.0: plain number
    ]
    assert rows(new_store, "workout_duration")[0][1:3] == (45.0, utc(2024, 4, 1, 16, 45))
    assert rows(new_store, "workout_distance")[0][1] == 5000.0
    assert rows(new_store, "workout_energy")[0][1] == 300.0


def test_reimport_adds_nothing(new_store):
    first = run_import(new_store, FIXTURES / "datapoints.json")
    again = run_import(new_store, FIXTURES / "datapoints.json")
    assert again.total_inserted == 0 and again.duplicates == first.total_inserted


def test_json_lines_and_times_without_offset(new_store):
    report = run_import(new_store, FIXTURES / "heart-rate.jsonl",
                        options=ImportOptions(tz="America/New_York"))
    assert dict(report.inserted) == {"heart_rate": 3}
    got = rows(new_store, "heart_rate")
    assert got[0] == (utc(2024, 4, 3, 6), 55.0, None, 0)          # 'Z' kept as given
    assert got[1] == (utc(2024, 4, 4, 3, 30), 57.0, None, -240)   # naive: read in --tz (EDT)
    assert got[2] == (utc(2024, 4, 4, 11), 59.0, None, -300)      # its own offset wins
    assert [d for d, *_ in new_store.daily_observations("heart_rate")] == [
        "2024-04-03", "2024-04-03", "2024-04-04"]


def test_bad_json_line_is_refused_with_its_line_number(new_store, tmp_path):
    lines = (FIXTURES / "heart-rate.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-3]
    path = tmp_path / "hr.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedInputError, match="line 2 is not valid JSON"):
        run_import(new_store, path)
    assert new_store.summary()["observations"] == {}


def test_folder_of_data_points(new_store):
    report = run_import(new_store, FIXTURES)
    assert report.format == "open_mhealth"
    assert report.inserted["heart_rate"] == 5


def test_values_of_the_wrong_shape_are_counted_skips(new_store, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([
        {"heart_rate": {"value": "fast", "unit": "beats/min"},
         "effective_time_frame": {"date_time": "2024-04-01T07:30:00Z"}},
        {"heart_rate": {"value": 60, "unit": "furlongs"},
         "effective_time_frame": {"date_time": "2024-04-01T07:30:00Z"}},
        {"heart_rate": {"value": 60, "unit": "beats/min"},
         "effective_time_frame": {"date_time": "yesterday"}},
        {"step_count": 10, "effective_time_frame": {"time_interval": {"start_date_time": "2024-04-01T07:30:00Z"}}},
        17,
    ]))
    with pytest.raises(NothingImportedError) as info:
        run_import(new_store, path)
    report = info.value.report
    assert report.total_inserted == 0
    assert report.skipped == {
        "heart-rate: heart rate: missing or malformed value": 1,
        "heart-rate: heart rate: unit not recognised": 1,
        "heart-rate: time frame: malformed date-time": 1,
        "step-count: time frame: interval without an end or duration": 1,
        "not an Open mHealth data point": 1,
    }


@pytest.mark.parametrize("text", ['[{"heart_rate": {"value": 60,', '{"heart_rate": 1} x', '"just a string"'])
def test_malformed_json_is_refused(new_store, tmp_path, text):
    run_import(new_store, FIXTURES / "datapoints.json")
    before = new_store.summary()
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(MalformedInputError):
        run_import(new_store, path, get_importer("open_mhealth"))
    assert new_store.summary() == before


def test_real_open_mhealth_samples(new_store, shared_data):
    folder = shared_data / "formats" / "open_mhealth"
    if not folder.is_dir():
        pytest.skip("no Open mHealth samples")
    report = run_import(new_store, folder)
    assert report.format == "open_mhealth"
    # sleep-episode-1.1: 21:35Z + 9 h in bed, 8.5 h asleep, 94.4 %
    assert dict(report.inserted) == {"sleep_in_bed": 1, "sleep_duration": 1, "sleep_efficiency": 1}
    assert rows(new_store, "sleep_in_bed") == [(utc(2016, 2, 5, 21, 35), 540.0, utc(2016, 2, 6, 6, 35), 0)]
    assert rows(new_store, "sleep_duration")[0][1] == 510.0
    assert rows(new_store, "sleep_efficiency")[0][1] == 94.4
    # the others cannot be placed in time or are a daily minimum: counted, explained skips
    assert report.skipped == {
        "heart-rate: a minimum/maximum heart rate is not imported": 1,
        "physical-activity: time frame given only as a date or part of day": 1,
        "rr-interval: data point without a time frame": 1,
    }
