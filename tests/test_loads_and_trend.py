"""Loads kept apart (session-RPE load and heart-rate load: separate series, baselines,
features and coach reasons; never summed), the store migration that tells them apart, and
`device trend` (terminal picture, PNG, the events hook)."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from restwise.client.dataset import daily_data
from restwise.client.keys import FileKeystore
from restwise.client.store import DeviceStore, Session, record_key
from restwise.client.trend import TrendEvent, build_trend, render_png, render_terminal
from restwise.models.coach import coach_today
from restwise.models.features import DailyData, compute_raw_features

START = dt.date(2024, 1, 1)


def _days(n):
    return [(START + dt.timedelta(days=i)).isoformat() for i in range(n)]


def _session(day, load, kind, source, i):
    return Session(day=day, minutes=60, load=load, source=source, record_key=record_key(source, i),
                   rpe=load / 60 if kind == "srpe" else None, load_kind=kind)


def test_session_rpe_and_heart_rate_loads_are_separate_series(new_store):
    days = _days(3)
    new_store.add_sessions([
        _session(days[0], 300.0, "srpe", "team_app", 1),
        _session(days[0], 120.0, "hr", "fitbit", 2),
        _session(days[2], 90.0, "hr", "fitbit", 3),
    ])
    d = daily_data(new_store)
    assert d["load"].tolist()[:1] == [300.0] and np.isnan(d["load"][1]) and np.isnan(d["load"][2])
    assert d["hr_load"].tolist() == [120.0, 0.0, 90.0]  # its own span: the day between is rest


def test_features_and_coach_keep_the_loads_apart():
    n = 60
    rng = np.random.default_rng(0)
    srpe = np.tile([300, 0, 250, 300, 0, 250, 300], 9)[:n].astype(float)
    hr = np.tile([80, 0, 60, 80, 0, 60, 80], 9)[:n].astype(float)
    hr[-7:] *= 3  # a heart-rate load spike only
    data = DailyData.from_columns(
        _days(n), load=srpe, hr_load=hr, readiness=rng.integers(5, 8, n).astype(float),
        rmssd_ms=rng.normal(60, 3, n), resting_hr=rng.normal(50, 1, n),
    )
    raw = compute_raw_features(data)
    t = n - 1
    assert raw.column("acute_load")[t] == pytest.approx(srpe[-7:].mean())
    assert raw.column("hr_acute_load")[t] == pytest.approx(hr[-7:].mean())
    assert raw.column("hr_acwr")[t] == pytest.approx(hr[-7:].mean() / hr[-28:].mean())
    assert raw.column("acwr")[t] == pytest.approx(srpe[-7:].mean() / srpe[-28:].mean())
    advice = coach_today(data)
    hr_acwr = hr[-7:].mean() / hr[-28:].mean()
    assert f"acute heart-rate load (TRIMP) {hr_acwr:.1f}x your chronic heart-rate load (TRIMP)" in advice.reasons
    assert advice.components["load"] == pytest.approx(max(-3.0, -(hr_acwr - 1.3) / 0.2))
    # summing the two would have hidden the spike in a smaller ratio: the reason shows the
    # heart-rate load's own ratio, not one of a sum
    summed = (srpe + hr)[-7:].mean() / (srpe + hr)[-28:].mean()
    assert f"{summed:.1f}x" not in " ".join(advice.reasons)


def test_migration_tells_old_heart_rate_sessions_apart(tmp_path):
    ks = FileKeystore(tmp_path / "ks")
    folder = tmp_path / "s"
    with DeviceStore.create(folder, keystore=ks) as s:
        s.add_sessions([_session("2024-01-01", 100.0, "hr", "fitbit", 1),
                        _session("2024-01-01", 200.0, "hr", "garmin_fit", 2),
                        _session("2024-01-02", 300.0, "srpe", "checkin_csv", 3)])
        # back to schema 1, as a store written before the load kinds existed
        s.conn.execute("ALTER TABLE sessions DROP COLUMN load_kind")
        s.conn.execute("PRAGMA user_version = 1")
    with DeviceStore.open(folder, keystore=ks) as s:
        assert s.schema_version == 3
        assert [(x["source"], x["load_kind"]) for x in s.sessions()] == [
            ("fitbit", "hr"), ("garmin_fit", "hr"), ("checkin_csv", "srpe")]


# ------------------------------------------------------------------ trend
def _person(n=120):
    rng = np.random.default_rng(1)
    rmssd = rng.normal(60, 4, n)
    rmssd[::9] = np.nan
    return DailyData.from_columns(
        _days(n), rmssd_ms=rmssd, resting_hr=rng.normal(50, 1, n),
        sleep_minutes=rng.normal(450, 30, n), readiness=rng.integers(4, 9, n).astype(float),
        load=np.tile([300.0, 0, 250, 300, 0, 250, 300], 20)[:n],
    )


def test_trend_shows_each_series_against_its_own_baseline():
    data = _person()
    trend = build_trend(data, weeks=4, events=[TrendEvent(data.days[-3], "early warning"),
                                              TrendEvent(data.days[0], "too old")])
    assert trend.days == data.days[-28:]
    assert [p.key for p in trend.panels] == ["readiness", "hrv", "resting_hr", "sleep", "load"]
    assert trend.missing == ["Heart-rate load (TRIMP)"]
    assert [e.label for e in trend.events] == ["early warning"]
    panels = {p.key: p for p in trend.panels}
    t = len(data) - 1
    before = data["readiness"][t - 60:t]
    assert panels["readiness"].baseline[-1] == pytest.approx(np.nanmean(before))
    ln = np.log(data["rmssd_ms"][t - 60:t])
    assert panels["hrv"].baseline[-1] == pytest.approx(np.exp(np.nanmean(ln)))
    assert panels["sleep"].values[-1] == pytest.approx(data["sleep_minutes"][-1] / 60)
    assert panels["load"].baseline[-1] == pytest.approx(data["load"][-28:].mean())
    text = render_terminal(trend, width=100, colorless=True)
    for p in trend.panels:
        assert p.title in text
    assert data.days[-28][5:] in text and "●" in text


def test_trend_command_prints_and_writes_a_png(tmp_path):
    from restwise.cli import app
    from restwise.client.importers import run_import
    from restwise.simulation.fleet import write_demo_export

    store = tmp_path / "store"
    with DeviceStore.create(store, keystore=FileKeystore(tmp_path / "keystore")) as s:
        run_import(s, write_demo_export(4, tmp_path / "d.jsonl", days=70))
    env = {k: None for k in os.environ if k.startswith("RESTWISE_")}
    r = CliRunner().invoke(app, ["device", "trend", "--store", str(store), "--weeks", "3",
                                 "--png", str(tmp_path / "t.png")], env=env)
    assert r.exit_code == 0, r.output
    assert "HRV (RMSSD, ms)" in r.output and "Session-RPE load (AU)" in r.output
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, ["device", "trend", "--store", str(store), "--json"], env=env)
    summary = json.loads(r.stdout)
    assert {s["series"] for s in summary["series"]} == {"readiness", "hrv", "resting_hr", "sleep", "load"}
    assert summary["events"] == []


def test_png_marks_events(tmp_path):
    data = _person(40)
    trend = build_trend(data, weeks=2, events=[TrendEvent(data.days[-2], "warning")])
    render_png(trend, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
