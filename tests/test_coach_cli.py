"""`restwise device today` / `checkin` through the real CLI on a real encrypted store filled
with the demo generator."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from restwise.cli import app
from restwise.client.importers import run_import
from restwise.client.store import DeviceStore
from restwise.demo import write_demo_export
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
    assert again["model"] == "stored (local)"
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
