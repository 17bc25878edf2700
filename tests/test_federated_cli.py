"""`restwise device history` and `restwise device consent` through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from restwise.client.keys import FAST_INSECURE_ARGON2
from restwise.client.store import DeviceStore

RESTWISE = [sys.executable, "-m", "restwise.cli"]


def run(args, passfile):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTWISE_")}
    env["RESTWISE_PASSPHRASE_FILE"] = str(passfile)
    env["COLUMNS"] = "250"  # rich wraps tables to the terminal width
    return subprocess.run(RESTWISE + ["device", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def device(tmp_path):
    passfile = tmp_path / "pass.txt"
    passfile.write_text("correct horse\n")
    store = tmp_path / "store"
    with DeviceStore.create(store, "correct horse", argon2=FAST_INSECURE_ARGON2) as s:
        s.log_egress("run-aaa", 1, "query.restwise_hello", [{"name": "restwise.consent", "kind": "config", "keys": ["participate"], "bytes": 40}], 40, "ab" * 32)
        s.log_egress("run-aaa", 1, "train:collect-masked-input", [{"name": "secagg.masked-input", "kind": "array", "keys": ["masked"], "bytes": 80123}], 80200, "cd" * 32)
        s.log_egress("run-bbb", 3, "train:setup", [{"name": "secagg.public-keys", "kind": "config", "keys": ["c_pk", "s_pk"], "bytes": 90}], 90, "ef" * 32)
    return store, passfile


def test_history_lists_what_was_sent_without_values(device):
    store, passfile = device
    r = run(["history", "--store", str(store)], passfile)
    assert r.returncode == 0, r.stderr
    assert "run-aaa" in r.stdout and "secagg.masked-input" in r.stdout and "80200" in r.stdout
    assert "3 messages" in r.stdout
    r = run(["history", "--store", str(store), "--json", "--run", "run-bbb"], passfile)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["run_id"], x["round"], x["message_type"]) for x in rows] == [("run-bbb", 3, "train:setup")]


def test_consent_per_run_and_for_all_training(device):
    store, passfile = device
    r = run(["consent", "--store", str(store), "--run", "run-aaa", "--deny", "--json"], passfile)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["may_train"] is False and out["choices"][0]["scope"] == "run-aaa"
    with DeviceStore.open(store, "correct horse") as s:
        assert not s.consents("run-aaa") and s.consents("run-bbb")
    # Refusing all training wins over a run's permission.
    assert run(["consent", "--store", str(store), "--run", "run-bbb", "--allow"], passfile).returncode == 0
    assert run(["consent", "--store", str(store), "--all", "--deny"], passfile).returncode == 0
    with DeviceStore.open(store, "correct horse") as s:
        assert not s.consents("run-bbb") and not s.consents("run-new")
    r = run(["consent", "--store", str(store), "--all", "--allow"], passfile)
    assert "Allowed: all training" in r.stdout
    with DeviceStore.open(store, "correct horse") as s:
        assert s.consents("run-bbb") and s.consents("run-new") and not s.consents("run-aaa")
    shown = run(["consent", "--store", str(store), "--run", "run-aaa"], passfile)
    assert "will not train in run run-aaa" in shown.stdout


@pytest.mark.parametrize(
    "args",
    [["--allow", "--deny", "--all"], ["--deny"], ["--run", "bad id!", "--deny"], ["--run", "r1", "--all", "--deny"]],
)
def test_consent_usage_errors_exit_2(device, args):
    store, passfile = device
    r = run(["consent", "--store", str(store), *args], passfile)
    assert r.returncode == 2
