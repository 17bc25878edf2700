"""Dataset loaders (SoccerMon, LifeSnaps) and the cohort importer: each person lands in their
own real encrypted store. Hand-made miniature layouts with the real files' quirks, plus the
real datasets in ../shared/data when present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from restwise.client.cohort import import_cohort, store_folder_name
from restwise.client.errors import ImportFailedError, MalformedInputError
from restwise.client.importers import ImportOptions, run_import
from restwise.client.importers.lifesnaps import LifeSnapsImporter, sema_checkin
from restwise.client.importers.lifesnaps import list_persons as lifesnaps_persons
from restwise.client.importers.soccermon import SoccerMonImporter
from restwise.client.importers.soccermon import list_persons as soccermon_persons
from restwise.client.keys import FileKeystore
from restwise.client.store import DeviceStore

P1 = "TeamA-11111111-aaaa-bbbb-cccc-000000000001"
P2 = "TeamB-22222222-aaaa-bbbb-cccc-000000000002"


def _wide(path: Path, first_cell: str, rows: list[tuple[str, str, str]], trailing_empty=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = [first_cell, P1, P2] + ([""] if trailing_empty else [])
    lines = [",".join(header)]
    for day, a, b in rows:
        lines.append(",".join([day, a, b] + ([""] if trailing_empty else [])))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def mini_soccermon(tmp_path) -> Path:
    """Four days, two players. Quirks: header cell 'Readiness Data', a trailing empty column,
    0 on a 1-5 scale (= not answered), daily_load 0.0 on days without any report, a day whose
    daily_load exceeds its listed sessions, two identical sessions on one day."""
    root = tmp_path / "soccermon" / "subjective"
    days = ["01.03.2020", "02.03.2020", "03.03.2020", "04.03.2020"]
    _wide(root / "wellness/readiness.csv", "Readiness Data",
          [(days[0], "7.0", ""), (days[1], "", "5.0"), (days[2], "8.0", ""), (days[3], "", "")],
          trailing_empty=True)
    _wide(root / "wellness/fatigue.csv", "Fatigue Data",
          [(days[0], "3.0", ""), (days[1], "0.0", ""), (days[2], "4.0", "2.0"), (days[3], "", "")])
    for name in ("mood", "sleep_quality", "soreness"):
        _wide(root / f"wellness/{name}.csv", f"{name} Data",
              [(d, "", "") for d in days])
    _wide(root / "wellness/stress.csv", "Date",
          [(days[0], "4.0", ""), (days[1], "", ""), (days[2], "", ""), (days[3], "", "")])
    _wide(root / "wellness/sleep_duration.csv", "SleepDurH Data",
          [(days[0], "7.5", ""), (days[1], "", ""), (days[2], "", ""), (days[3], "", "")])
    # P1: day 1 two identical drills (80); day 2 no report, 0.0; day 3 listed 300 but total 420;
    # day 4 nothing at all.
    _wide(root / "training-load/daily_load.csv", "Date",
          [(days[0], "80.0", "0.0"), (days[1], "0.0", "0.0"), (days[2], "420.0", "0.0"),
           (days[3], "0.0", "0.0")], trailing_empty=True)
    sessions = {
        P1: [
            {"srpe": 40, "rpe": 2, "duration": 20, "date": days[0]},
            {"srpe": 40, "rpe": 2, "duration": 20, "date": days[0]},
            {"srpe": 300, "rpe": 5, "duration": 60, "date": days[2]},
        ],
        P2: [],
    }
    (root / "training-load/session.json").write_text(json.dumps(sessions), encoding="utf-8")
    return tmp_path / "soccermon"


def test_soccermon_one_player_into_one_store(mini_soccermon, new_store):
    assert soccermon_persons(mini_soccermon) == [P1, P2]
    report = run_import(new_store, mini_soccermon, SoccerMonImporter(),
                        options=ImportOptions(person=P1))
    assert report.format == "soccermon"
    checkins = {c["day"]: c for c in new_store.checkins()}
    # 2020-03-02: fatigue 0.0 means "not answered" -> no check-in that day at all.
    assert sorted(checkins) == ["2020-03-01", "2020-03-03"]
    d1 = checkins["2020-03-01"]
    assert (d1["readiness"], d1["fatigue"], d1["stress"], d1["sleep_hours"]) == (7.0, 3.0, 4.0, 7.5)
    assert d1["mood"] is None
    assert checkins["2020-03-03"]["fatigue"] == 4.0

    sessions = new_store.sessions()
    by_day: dict[str, list[dict]] = {}
    for s in sessions:
        by_day.setdefault(s["day"], []).append(s)
    # Two identical drills are two sessions; daily total matches the provider's daily_load.
    assert [s["load"] for s in by_day["2020-03-01"]] == [40.0, 40.0]
    assert sorted((s["kind"], s["load"]) for s in by_day["2020-03-03"]) == [
        ("training", 300.0), ("unitemized", 120.0)]
    # 0.0 load on days without any report: unknown, not rest.
    assert "2020-03-02" not in by_day and "2020-03-04" not in by_day
    # Nothing of the other player leaked in.
    assert len(sessions) == 4


def test_soccermon_reported_day_without_session_is_rest(mini_soccermon, new_store):
    run_import(new_store, mini_soccermon, SoccerMonImporter(), options=ImportOptions(person=P2))
    checkins = {c["day"]: c for c in new_store.checkins()}
    assert checkins["2020-03-02"]["readiness"] == 5.0
    assert checkins["2020-03-03"]["fatigue"] == 2.0
    assert [(s["day"], s["kind"], s["load"], s["minutes"]) for s in new_store.sessions()] == [
        ("2020-03-02", "rest", 0.0, 0.0), ("2020-03-03", "rest", 0.0, 0.0)]


def test_soccermon_reimport_adds_nothing(mini_soccermon, new_store):
    opts = ImportOptions(person=P1)
    run_import(new_store, mini_soccermon, SoccerMonImporter(), options=opts)
    again = run_import(new_store, mini_soccermon, SoccerMonImporter(), options=opts)
    assert again.inserted["session"] == 0 and again.duplicates == 4
    assert len(new_store.sessions()) == 4 and len(new_store.checkins()) == 2


def test_soccermon_needs_a_known_person(mini_soccermon, new_store):
    with pytest.raises(ImportFailedError, match="choose one"):
        run_import(new_store, mini_soccermon, SoccerMonImporter())
    with pytest.raises(ImportFailedError, match="not a player column"):
        run_import(new_store, mini_soccermon, SoccerMonImporter(),
                   options=ImportOptions(person="TeamC-nobody"))
    assert new_store.sessions() == [] and new_store.checkins() == []


def test_soccermon_bad_date_refuses_whole_file(mini_soccermon, new_store):
    f = mini_soccermon / "subjective/wellness/readiness.csv"
    f.write_text(f.read_text().replace("03.03.2020", "2020/03/33"))
    with pytest.raises(MalformedInputError, match="unreadable date") as exc:
        run_import(new_store, mini_soccermon, SoccerMonImporter(), options=ImportOptions(person=P1))
    assert "2020/03/33" not in str(exc.value)  # never quotes the file's content
    assert new_store.sessions() == [] and new_store.checkins() == []


LIFESNAPS_HEADER = (",id,date,rmssd,resting_hr,minutesAsleep,sleep_efficiency,"
                    "full_sleep_breathing_rate,steps,sedentary_minutes,moderately_active_minutes,"
                    "very_active_minutes,stress_score,ALERT,HAPPY,NEUTRAL,RESTED/RELAXED,SAD,"
                    "TENSE/ANXIOUS,TIRED")


@pytest.fixture
def mini_lifesnaps(tmp_path) -> Path:
    rows = [
        # idx,id,date,rmssd,rhr,asleep,eff,breath,steps,sed,mod,very,stress,A,H,N,R,S,T,TI
        "0,aa01,2021-05-24,45.5,58.0,420.0,93.0,14.8,8000.0,700,20,10,78.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0",
        "1,aa01,2021-05-25,0.0,59.5,,,,0.0,900,0,0,,,,,,,,",
        "2,aa01,2021-05-26,50.1,57.0,400.0,90.0,15.0,9000.0,650,5,5,,0.0,0.0,0.0,1.0,0.0,1.0,1.0",
        "3,aa01,2021-05-27,,,,,,,,,,,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
        "4,bb02,2021-05-24,30.0,70.0,380.0,85.0,16.0,5000.0,800,10,0,,,,,,,,",
    ]
    path = tmp_path / "lifesnaps" / "daily_fitbit_sema_df_unprocessed.csv"
    path.parent.mkdir(parents=True)
    path.write_text(LIFESNAPS_HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path.parent


def test_lifesnaps_one_person_into_one_store(mini_lifesnaps, new_store):
    assert lifesnaps_persons(mini_lifesnaps) == ["aa01", "bb02"]
    report = run_import(new_store, mini_lifesnaps, LifeSnapsImporter(),
                        options=ImportOptions(person="aa01"))
    obs = new_store.summary()["observations"]
    # rmssd 0.0 and steps 0.0 on 05-25 are "not measured": skipped and counted.
    assert obs["hrv_rmssd"]["count"] == 2
    assert obs["steps"]["count"] == 2
    assert obs["resting_heart_rate"]["count"] == 3
    assert obs["active_minutes"]["count"] == 3
    assert report.skipped["rmssd: 0 means not measured"] == 1
    assert report.skipped["steps: 0 means not measured"] == 1
    rows = new_store.conn.execute(
        "SELECT local_day, value FROM observations WHERE metric='hrv_rmssd' ORDER BY local_day"
    ).fetchall()
    assert rows == [("2021-05-24", 45.5), ("2021-05-26", 50.1)]
    active = new_store.conn.execute(
        "SELECT value FROM observations WHERE metric='active_minutes' AND local_day='2021-05-24'"
    ).fetchone()[0]
    assert active == 30.0
    checkins = {c["day"]: c for c in new_store.checkins()}
    # 05-24: HAPPY + TIRED; 05-26: RESTED + TENSE + TIRED; 05-27 answered but nothing ticked.
    assert sorted(checkins) == ["2021-05-24", "2021-05-26"]
    assert (checkins["2021-05-24"]["fatigue"], checkins["2021-05-24"]["mood"]) == (2.0, 4.0)
    assert checkins["2021-05-24"]["stress"] is None
    assert (checkins["2021-05-26"]["fatigue"], checkins["2021-05-26"]["stress"]) == (3.0, 3.0)
    assert all(c["readiness"] is None for c in checkins.values())  # never invented


def test_sema_mapping_table():
    assert sema_checkin({"TIRED": True}) == {"fatigue": 2.0}
    assert sema_checkin({"RESTED/RELAXED": True}) == {"fatigue": 4.0, "stress": 4.0}
    assert sema_checkin({"NEUTRAL": True}) == {"mood": 3.0}
    assert sema_checkin({"NEUTRAL": True, "SAD": True}) == {"mood": 2.0}
    assert sema_checkin({"ALERT": True}) == {}


def test_lifesnaps_unknown_person(mini_lifesnaps, new_store):
    with pytest.raises(ImportFailedError, match="does not appear"):
        run_import(new_store, mini_lifesnaps, LifeSnapsImporter(),
                   options=ImportOptions(person="zz99"))
    assert new_store.summary()["observations"] == {}


def _open(ps, ks):
    return DeviceStore.open(ps.folder, keystore=ks)


def test_import_cohort_soccermon_one_store_each(mini_soccermon, tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    people = import_cohort("soccermon", mini_soccermon, tmp_path / "stores", keystore=ks)
    assert [p.person for p in people] == [P1, P2]
    assert len({p.folder for p in people}) == 2
    ids = set()
    for p in people:
        assert p.folder.name == store_folder_name(p.person)
        raw = (p.folder / "restwise.db").read_bytes()
        assert b"SQLite format 3" not in raw[:16]  # encrypted on disk
        with _open(p, ks) as s:
            ids.add(s.store_id)
            n = len(s.sessions())
        assert n == (4 if p.person == P1 else 2)
    assert len(ids) == 2
    # Re-running is idempotent: same stores, nothing twice.
    again = import_cohort("soccermon", mini_soccermon, tmp_path / "stores", keystore=ks, persons=1)
    assert len(again) == 1
    with _open(again[0], ks) as s:
        assert len(s.sessions()) == 4


def test_import_cohort_lifesnaps(mini_lifesnaps, tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    people = import_cohort("lifesnaps", mini_lifesnaps, tmp_path / "stores", keystore=ks)
    assert [p.person for p in people] == ["aa01", "bb02"]
    with _open(people[1], ks) as s:
        assert s.summary()["observations"]["hrv_rmssd"]["count"] == 1


def test_import_cohort_folder(tmp_path):
    root = tmp_path / "cohort"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / ".hidden").mkdir()
    (root / "alice" / "checkins.csv").write_text(
        "date,readiness,fatigue,rpe,minutes\n2024-01-01,7,4,6,60\n2024-01-02,5,3,,\n")
    # Bob's app: other headers, readiness on 1-5, tiredness where higher is worse.
    (root / "bob" / "wellness.csv").write_text(
        "Day,Ready (1-5),Tiredness\n2024-02-01,5,1\n2024-02-02,1,5\n")
    (root / "bob" / "column-map.json").write_text(json.dumps({
        "date": "Day",
        "readiness": {"column": "Ready (1-5)", "scale": "1-5"},
        "fatigue": {"column": "Tiredness", "scale": "1-5", "higher_is_worse": True},
    }))
    (root / "bob" / "notes.txt").write_text("not an export\n")
    ks = FileKeystore(tmp_path / "keys")
    people = import_cohort("folder", root, tmp_path / "stores", keystore=ks)
    assert [p.person for p in people] == ["alice", "bob"]
    alice, bob = people
    assert alice.failures == ()
    with _open(alice, ks) as s:
        assert [c["readiness"] for c in s.checkins()] == [7.0, 5.0]
        assert [x["load"] for x in s.sessions()] == [360.0]
    # The unrecognised notes.txt is reported, the CSV still imported through the map.
    assert len(bob.failures) == 1 and bob.failures[0].startswith("notes.txt:")
    with _open(bob, ks) as s:
        got = [(c["day"], c["readiness"], c["fatigue"]) for c in s.checkins()]
    assert got == [("2024-02-01", 10.0, 5.0), ("2024-02-02", 0.0, 1.0)]


def test_import_cohort_rejects_bad_arguments(tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    with pytest.raises(ValueError, match="unknown cohort kind"):
        import_cohort("pmdata", tmp_path, tmp_path / "s", keystore=ks)
    with pytest.raises(ImportFailedError, match="does not exist"):
        import_cohort("soccermon", tmp_path / "missing", tmp_path / "s", keystore=ks)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportFailedError, match="no person folders"):
        import_cohort("folder", tmp_path / "empty", tmp_path / "s", keystore=ks)


# ----------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_soccermon_player(shared_data, new_store):
    path = shared_data / "soccermon"
    persons = soccermon_persons(path)
    assert len(persons) == 50
    report = run_import(new_store, path, SoccerMonImporter(), options=ImportOptions(person=persons[0]))
    assert report.total_skipped == 0
    checkins = new_store.checkins()
    assert len(checkins) > 300
    ready = [c["readiness"] for c in checkins if c["readiness"] is not None]
    assert 1 <= min(ready) and max(ready) <= 10
    for key in ("fatigue", "mood", "soreness", "stress", "sleep_quality"):
        vals = [c[key] for c in checkins if c[key] is not None]
        assert vals and 1 <= min(vals) and max(vals) <= 5
    # Per-day session totals equal the provider's daily_load on every day with any load.
    import csv

    rows = list(csv.reader(open(path / "subjective/training-load/daily_load.csv")))
    col = rows[0].index(persons[0])
    provider = {}
    for r in rows[1:]:
        d, m, y = r[0].split(".")
        if float(r[col]) > 0:
            provider[f"{y}-{m}-{d}"] = float(r[col])
    totals: dict[str, float] = {}
    for s in new_store.sessions():
        totals[s["day"]] = totals.get(s["day"], 0.0) + s["load"]
    assert {d: v for d, v in totals.items() if v > 0} == pytest.approx(provider)


@pytest.mark.realdata
def test_real_lifesnaps_person(shared_data, new_store):
    path = shared_data / "lifesnaps"
    persons = lifesnaps_persons(path)
    assert len(persons) == 71
    run_import(new_store, path, LifeSnapsImporter(), options=ImportOptions(person=persons[0]))
    obs = new_store.summary()["observations"]
    assert obs["hrv_rmssd"]["count"] > 30
    vals = [v for (v,) in new_store.conn.execute(
        "SELECT value FROM observations WHERE metric='hrv_rmssd'")]
    assert all(5 < v < 200 for v in vals) and math.isfinite(sum(vals))
