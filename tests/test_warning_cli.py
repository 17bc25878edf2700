"""Early warning from the outside: the shipped warning prior (pinned, verified, with its
operating point), `restwise model show|prior --model early-warning`, the planner, the SoccerMon
report reader, and `restwise evaluate --task early-warning` end to end through encrypted
stores (a small generated cohort folder; the real datasets where present)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from restwise.cli import app
from restwise.models import prior as pr
from restwise.models import warning as wn
from restwise.models.synthetic import synthetic_person
from restwise.planning import plan_run
from restwise.simulation.warning_evaluate import read_soccermon_reports

from .conftest import REPO

runner = CliRunner()


def test_shipped_warning_prior_is_pinned_verified_and_carries_its_operating_point():
    prior = pr.load_prior(spec=wn.WARNING_PRIOR)
    assert prior.sha256 == wn.SHIPPED_WARNING_PRIOR_SHA256
    raw = json.loads((REPO / "models" / wn.SHIPPED_WARNING_PRIOR).read_text())
    assert raw["format"] == "restwise-early-warning-prior" and raw["feature_spec_sha256"] == wn.feature_spec_sha256()
    assert set(prior.targets) == {"readiness", "fatigue"}
    t = prior.target("readiness")
    assert t.persons == {"soccermon": 49} and t.weights.shape == (wn.N_FEATURES,)
    assert 0 < t.extra["operating_point"] < 1 and t.extra["validation"]["false_alarms_per_person_month"] <= 2
    assert all(d["licence"] == "CC BY 4.0" for d in prior.datasets)
    # more low days this week -> more risk; a higher 28-day level -> less
    assert t.weights[wn.FEATURE_NAMES.index("low_days_7d")] > 0 > t.weights[wn.FEATURE_NAMES.index("answer_28d")]


def test_a_prior_of_another_model_or_edited_is_refused(tmp_path):
    with pytest.raises(pr.PriorError, match="not a Restwise early-warning prior file"):
        pr.load_prior(REPO / "models" / pr.SHIPPED_PRIOR, spec=wn.WARNING_PRIOR)
    raw = json.loads((REPO / "models" / wn.SHIPPED_WARNING_PRIOR).read_text())
    raw["targets"]["readiness"]["extra"]["operating_point"] = 0.01  # warn far more often
    (tmp_path / "edited.json").write_text(json.dumps(raw))
    with pytest.raises(pr.PriorError, match="sha256 does not match"):
        pr.load_prior(tmp_path / "edited.json", spec=wn.WARNING_PRIOR)
    r = runner.invoke(app, ["model", "show", "--model", "early-warning", "--prior", str(tmp_path / "edited.json")])
    assert r.exit_code == 1 and "sha256 does not match" in r.output
    r = runner.invoke(app, ["model", "show", "--model", "early-warning"])
    assert r.exit_code == 0 and "operating point" in r.output
    assert runner.invoke(app, ["model", "show", "--model", "nonsense"]).exit_code == 2


def test_planner_knows_the_warning_model():
    verdict = plan_run("early-warning", 42, 4.0)
    assert verdict.mechanism == "statistics" and verdict.numbers["statistics_length"] == wn.STATISTICS_LENGTH
    assert verdict.allowed and "early-warning" in verdict.message
    small = plan_run("early-warning", 16, 4.0)
    assert small.noise_to_signal > verdict.noise_to_signal  # fewer devices, more noise per signal
    r = runner.invoke(app, ["privacy", "plan", "--cohort", "42", "--epsilon", "4", "--model", "early-warning"])
    assert r.exit_code == 0 and "350 numbers" in r.output


def test_report_reader_counts_every_row(tmp_path):
    (tmp_path / "subjective" / "injury").mkdir(parents=True)
    (tmp_path / "subjective" / "injury" / "injury.csv").write_text(
        'player_name,type,timestamp\nTeamA-x,"{""knee"":""minor""}",20.03.2020\nTeamA-x,"{}",21.03.2020\n'
        ',"{}",22.03.2020\nTeamA-y,"{}",not a date\n')
    rep = read_soccermon_reports(tmp_path)
    assert rep.days == {"TeamA-x": ["2020-03-20", "2020-03-21"]}
    assert rep.rows == {"injury": 2} and rep.unreadable == {"injury": 2}
    assert read_soccermon_reports(tmp_path / "subjective" / "injury") is None


def _cohort_folder(root, persons: int, days: int, seed: int = 800):
    header = ["date", "readiness", "fatigue", "soreness", "sleep_hours", "rpe", "minutes"]
    for k in range(persons):
        rows = [header]
        for r in synthetic_person(seed + k, days):
            if r.readiness is None:
                continue
            session = r.session_minutes > 0
            rows.append([r.day, f"{r.readiness:g}", f"{r.fatigue:g}", f"{r.soreness:g}",
                         f"{(r.sleep_minutes or 480) / 60:.1f}", f"{round(r.session_rpe):g}" if session else "",
                         f"{round(r.session_minutes):g}" if session else ""])
        (root / f"athlete{k}").mkdir(parents=True)
        (root / f"athlete{k}" / "checkins.csv").write_text("\n".join(",".join(x) for x in rows) + "\n")
    return root


def test_evaluate_early_warning_on_a_cohort_folder_end_to_end(tmp_path):
    cohort = _cohort_folder(tmp_path / "cohort", persons=4, days=200)
    out = tmp_path / "out"
    r = runner.invoke(app, ["evaluate", "--task", "early-warning", "--cohort", str(cohort), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "early-warning" and res["n_persons"] == 4
    rows = {m["name"]: m for m in res["methods"]}
    assert rows["HRV below baseline (SWC)"]["available"] is False  # check-ins only: says so
    assert "no HRV data" in rows["HRV below baseline (SWC)"]["reason"]
    private = rows["warning model, private (ε=4)"]
    assert 0 < private["epsilon"] <= 4 and private["auroc"] is not None and len(private["auroc_ci"]) == 2
    assert res["events"]["injury or illness report"]["available"] is False
    assert res["planner"]["decision"] in ("prior only", "prior + one DP release")
    assert res["coach_record"]["device_with_public_prior"]["sentence"].startswith("in past data")
    assert res["coach_record"]["planner_choice"]["row"] == res["planner"]["coach_row"]
    # a cohort folder is scored with the shipped warning prior and its operating point
    shipped = pr.load_prior(spec=wn.WARNING_PRIOR).target("readiness").extra["operating_point"]
    assert rows["warning model, public prior"]["operating_point"] == {"shipped": pytest.approx(shipped)}
    assert (out / "results.png").stat().st_size > 10_000 and "ΔAUROC vs best rule" in (out / "results.md").read_text()


def test_evaluate_early_warning_refuses_what_it_cannot_do(tmp_path):
    cohort = _cohort_folder(tmp_path / "few", persons=2, days=40)
    r = runner.invoke(app, ["evaluate", "--task", "early-warning", "--cohort", str(cohort), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "only 0 of 2 persons" in r.output and "too few days with a defined 7-day label" in r.output
    assert not (tmp_path / "o" / "results.json").exists()
    r = runner.invoke(app, ["evaluate", "--task", "nonsense", "--cohort", str(cohort)])
    assert r.exit_code == 2
    r = runner.invoke(app, ["evaluate", "--task", "early-warning", "--federated", "--cohort", str(cohort)])
    assert r.exit_code == 2 and "next-day" in r.output


@pytest.mark.realdata
def test_soccermon_reports_are_read_completely(shared_data):
    rep = read_soccermon_reports(shared_data / "soccermon")
    # 162 and 15 data rows (the data README's and the 161 / 14 miss each file's last
    # row, which has no trailing newline: `wc -l` minus the header)
    assert rep.rows == {"injury": 162, "illness": 15} and rep.unreadable == {"injury": 0, "illness": 0}
    assert all(p.startswith(("TeamA-", "TeamB-")) for p in rep.days)


def test_shipped_record_is_the_shipped_evaluations():
    """The coach's plain-words record is the one measured in docs/results, not invented."""
    import hashlib

    path = REPO / "docs" / "results" / "early-warning" / "soccermon" / "results.json"
    record = wn.load_record()
    assert record.results_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    res = json.loads(path.read_text())
    rows = {m["name"]: m for m in res["methods"]}
    op = rows[record.row]["at_operating_point"]
    assert record.row == "warning model, public prior"  # what a device runs: the shipped prior
    assert (record.true_alarms, record.alarms, record.detected, record.episodes) == (
        op["true_alarms"], op["alarms"], op["detected"], op["episodes"])
    assert res["coach_record"]["device_with_public_prior"]["true_alarms"] == record.true_alarms
    assert record.rules["ACWR > 1.5"]["auroc"] == rows["ACWR > 1.5"]["auroc"]
    assert f"{record.true_alarms} of {record.alarms} such warnings were followed by a low week" in record.sentence()


def _store_with_lows(tmp_path, n: int = 150):
    """A real encrypted store: readiness answers with a low stretch every three weeks."""
    import datetime as dt

    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore

    rng = np.random.default_rng(11)
    ready = np.clip(np.round(rng.normal(7, 0.5, n)), 1, 10)
    for start in range(20, n, 21):
        ready[start : start + 4] = 3
    folder, keys = tmp_path / "store", tmp_path / "keys"
    with DeviceStore.create(folder, keystore=FileKeystore(keys)) as s:
        for i, r in enumerate(ready):
            s.upsert_checkin((dt.date(2024, 1, 1) + dt.timedelta(days=i)).isoformat(), {"readiness": float(r)},
                             source="test")
    return folder, keys


def test_device_today_shows_the_7_day_risk_and_trend_marks_past_warnings(tmp_path):
    from restwise.client.dataset import daily_data
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore
    from restwise.models.warning import past_warnings

    folder, keys = _store_with_lows(tmp_path)
    opts = ["--store", str(folder), "--keystore", str(keys)]
    r = runner.invoke(app, ["device", "today", *opts, "--json"])
    assert r.exit_code == 0, r.output
    w = json.loads(r.stdout)["warning"]
    assert 0 <= w["risk"] <= 1 and w["shown"] == (w["risk"] > w["operating_point"])
    text = runner.invoke(app, ["device", "today", *opts]).output
    assert ("Warning: risk of a low week" in text) == w["shown"] and "% (" in text
    r = runner.invoke(app, ["device", "trend", *opts, "--weeks", "8", "--json"])
    assert r.exit_code == 0, r.output
    events = json.loads(r.stdout)["events"]
    with DeviceStore.open(folder, keystore=FileKeystore(keys)) as s:
        data = daily_data(s)
    expected = past_warnings(data, data.days[-56], data.days[-1])
    assert events and [e["day"] for e in events] == [d for d, _ in expected]
    assert all(e["label"].startswith("warning ") for e in events)
    # at most one warning a week (a standing warning is issued again after 7 days)
    idx = [data.days.index(e["day"]) for e in events]
    assert all(b - a >= 7 for a, b in zip(idx, idx[1:]))
