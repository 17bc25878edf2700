"""A cohort folder of real-shaped exports (one sub-folder per person, files exactly as the
sources wrote them) goes through `restwise evaluate --cohort` with every person evaluated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from typer.testing import CliRunner

from restwise.cli import app
from restwise.client.cohort import import_cohort
from restwise.simulation.evaluate_cli import import_cohort_days, run_evaluation
from restwise.client.keys import FileKeystore
from restwise.models.evaluation import LastValue, PersonMean

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("export_shapes", FIXTURES / "export_shapes.py")
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)

DAYS = 100


def build_cohort(root: Path) -> None:
    # alice: the team app's two files, as the app wrote them
    shapes.write_team_app(root / "alice", seed=21, days=DAYS)
    # bob: the team app with its columns in another order, and a Fitbit dump beside it
    shapes.write_team_app(root / "bob", seed=22, days=DAYS, wellness_order=[
        "readiness", "stress", "effective_time_frame", "sleep_duration_h", "soreness_area",
        "mood", "fatigue", "sleep_quality", "soreness"],
        srpe_order=["perceived_exertion", "duration_min", "activity_names", "end_date_time"])
    shapes.write_fitbit_dump(root / "bob", seed=22, days=DAYS)
    # carol: a Fitbit dump in a sub-folder, the team app's files in the cohort's shared (hidden)
    # raw folder, linked from hers, and a damaged file among them
    shapes.write_fitbit_dump(root / "carol" / "fitbit", seed=23, days=DAYS)
    shapes.write_team_app(root / ".raw" / "carol", seed=23, days=DAYS)
    for name in ("wellness.csv", "srpe.csv"):
        (root / "carol" / name).symlink_to(root / ".raw" / "carol" / name)
    (root / "carol" / "fitbit" / "sleep.json").write_text('[{"logId": 1, "dateOfSleep": "2024-')
    # dave: another app's check-in CSVs, read through per-file column maps
    dave = root / "dave"
    person = shapes.write_team_app(root / "tmp-dave", seed=24, days=DAYS)
    dave.mkdir()
    mood = ["Datum;Bereitschaft (1-5);Stimmung"]
    train = ["When,RPE,Minutes"]
    for d in person:
        if d.readiness is not None:
            mood.append(f"{d.day[8:10]}.{d.day[5:7]}.{d.day[:4]};{1 + round(d.readiness * 4 / 10)};{int(d.mood)}")
        if d.session_minutes > 0:
            train.append(f"{d.day},{max(1, round(d.session_rpe))},{round(d.session_minutes)}")
    (dave / "Wellbeing Export.csv").write_text("\n".join(mood) + "\n")
    (dave / "training-2024.csv").write_text("\n".join(train) + "\n")
    (dave / "column-map.json").write_text(json.dumps({"files": {
        "wellbeing*.csv": {"date": "Datum", "readiness": {"column": "Bereitschaft (1-5)", "scale": "1-5"},
                           "mood": "Stimmung"},
        "training*.csv": {"date": "When", "rpe": "RPE", "minutes": "Minutes"},
    }}))
    (root / "tmp-dave").rename(root / ".unused-dave")  # hidden: not a person


def test_every_person_of_a_real_shaped_cohort_is_imported_and_evaluated(tmp_path):
    root = tmp_path / "cohort"
    build_cohort(root)

    people = import_cohort("folder", root, tmp_path / "stores", keystore=FileKeystore(tmp_path / "keys"))
    assert [p.person for p in people] == ["alice", "bob", "carol", "dave"]
    by_person = {p.person: p for p in people}
    for p in people:
        stored = {k for r in p.reports for k, v in r.inserted.items() if v}
        assert {"checkin", "session"} <= stored, (p.person, stored, p.failures)
    assert {"resting_heart_rate", "sleep_score", "hrv_rmssd"} <= set(by_person["bob"].reports[0].inserted)
    assert by_person["alice"].failures == ()
    carol = by_person["carol"]
    assert carol.failures == ("fitbit/README.md: not a format Restwise reads",
                              "fitbit/lightly_active_minutes.json: not a format Restwise reads",
                              "fitbit/sleep.json: not valid JSON")
    assert "hrv_rmssd" in carol.reports[0].inserted  # the rest of her dump imported

    result = run_evaluation(
        "folder", root, tmp_path / "out", workdir=tmp_path / "work",
        methods={"person mean": PersonMean(), "last value": LastValue()},
    )
    assert sorted(p["person"] for p in result.persons) == ["alice", "bob", "carol", "dave"]
    assert result.excluded == {}
    assert all(p["n_train"] >= 28 and p["n_test"] >= 7 for p in result.persons)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["n_persons"] == 4


def test_evaluate_tz_places_utc_timestamps_on_the_cohorts_local_days(tmp_path):
    # 23:30 UTC on 1 March is already 2 March in Tokyo: with --tz the check-in moves a day.
    person = tmp_path / "cohort" / "p1"
    person.mkdir(parents=True)
    (person / "wellness.csv").write_text(
        "effective_time_frame,fatigue,mood,readiness,sleep_duration_h,sleep_quality,soreness,soreness_area,stress\n"
        '2021-03-01T23:30:00.000Z,5,5,3,7,5,4,"[1]",5\n'
        '2021-03-03T07:47:05.145Z,1,5,10,6,5,4,"[1]",4\n'
    )
    utc, _ = import_cohort_days("folder", tmp_path / "cohort", tmp_path / "utc", log=lambda _m: None)
    tokyo, _ = import_cohort_days("folder", tmp_path / "cohort", tmp_path / "tokyo", log=lambda _m: None,
                                  tz="Asia/Tokyo")
    assert utc["p1"].days[0] == "2021-03-01"
    assert tokyo["p1"].days[0] == "2021-03-02"
    assert tokyo["p1"].days[-1] == "2021-03-03"


def test_evaluate_refuses_an_unknown_time_zone(tmp_path):
    (tmp_path / "cohort" / "p1").mkdir(parents=True)
    result = CliRunner().invoke(app, ["evaluate", "--cohort", str(tmp_path / "cohort"), "--tz", "Not/AZone",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown time zone 'Not/AZone'" in result.output
    assert not (tmp_path / "out").exists()
