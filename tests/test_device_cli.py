"""`restwise device ...` through the real command line (subprocesses), with exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from restwise.simulation.fleet import write_demo_export

RESTWISE = [sys.executable, "-m", "restwise.cli"]


def run(args, env_extra=None, input=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTWISE_")}
    env.update(env_extra or {})
    return subprocess.run(RESTWISE + args, capture_output=True, text=True, env=env, input=input,
                          timeout=120)


@pytest.fixture
def passfile(tmp_path):
    p = tmp_path / "pass.txt"
    p.write_text("tr0ub4dor & 3\n")
    return p


def test_full_device_lifecycle(tmp_path, passfile):
    store = tmp_path / "store"
    export = write_demo_export(7, tmp_path / "person.jsonl", days=60)
    base = ["--store", str(store), "--passphrase-file", str(passfile)]

    r = run(["device", "init", *base])
    assert r.returncode == 0, r.stderr
    assert (store / "keyslots.json").exists()

    r = run(["device", "import", str(export), *base, "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "restwise_jsonl" in r.stdout
    # re-import adds nothing
    r = run(["device", "import", str(export), *base, "--quiet"])
    assert r.returncode == 0
    r = run(["device", "status", *base, "--json"])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    n_lines = sum(1 for line in export.read_text().splitlines()
                  if '"hrv_rmssd"' in line)
    assert summary["observations"]["hrv_rmssd"]["count"] == n_lines
    assert summary["imports"] == 2

    out = tmp_path / "mine.jsonl"
    r = run(["device", "export", str(out), *base])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(1 for x in rows if x["table"] == "observations" and x["metric"] == "hrv_rmssd") == n_lines
    assert oct(out.stat().st_mode & 0o777) == "0o600"

    # passphrase change: old one fails with exit 3, new one works
    newpass = tmp_path / "new.txt"
    newpass.write_text("n3w passphrase\n")
    r = run(["device", "passphrase", "change", *base, "--new-passphrase-file", str(newpass)])
    assert r.returncode == 0, r.stderr
    r = run(["device", "status", *base])
    assert r.returncode == 3
    assert "wrong passphrase or not a Restwise store" in r.stderr
    newbase = ["--store", str(store), "--passphrase-file", str(newpass)]

    r = run(["device", "rekey", *newbase])
    assert r.returncode == 0, r.stderr
    r = run(["device", "status", *newbase, "--json"])
    assert json.loads(r.stdout)["key_generation"] == 2
    assert json.loads(r.stdout)["observations"]["hrv_rmssd"]["count"] == n_lines

    r = run(["device", "erase", "--store", str(store), "--yes"])
    assert r.returncode == 0, r.stderr
    assert not store.exists()
    r = run(["device", "status", *newbase])
    assert r.returncode == 4


def test_environment_variables_for_store_and_passphrase(tmp_path, passfile):
    env = {"RESTWISE_STORE": str(tmp_path / "s"), "RESTWISE_PASSPHRASE_FILE": str(passfile)}
    assert run(["device", "init"], env).returncode == 0
    r = run(["device", "status", "--json"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["checkins"]["count"] == 0
    env2 = {"RESTWISE_STORE": str(tmp_path / "s"), "RESTWISE_PASSPHRASE": "tr0ub4dor & 3"}
    assert run(["device", "status"], env2).returncode == 0
    env3 = {"RESTWISE_STORE": str(tmp_path / "s"), "RESTWISE_PASSPHRASE": "nope"}
    assert run(["device", "status"], env3).returncode == 3


def test_no_passphrase_without_terminal_is_a_usage_error(tmp_path):
    r = run(["device", "init", "--store", str(tmp_path / "s")], input="")
    assert r.returncode == 2
    assert "passphrase" in r.stderr
    assert not (tmp_path / "s" / "keyslots.json").exists()


def test_bad_import_exits_6_and_leaks_no_values(tmp_path, passfile):
    base = ["--store", str(tmp_path / "s"), "--passphrase-file", str(passfile)]
    assert run(["device", "init", *base]).returncode == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"table": "observations", "metric": "hrv_rmssd", "ts": 1704067200, "value": 77.123}\n'
                   'this line is not json 98765.4321\n')
    r = run(["device", "import", str(bad), *base, "--quiet"])
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "98765" not in r.stderr + r.stdout and "77.123" not in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    r = run(["device", "status", *base, "--json"])
    assert json.loads(r.stdout)["observations"] == {}
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(2048))
    r = run(["device", "import", str(junk), *base, "--quiet"])
    assert r.returncode == 6 and "not a format Restwise can import" in r.stderr


def test_damaged_store_exits_5(tmp_path, passfile):
    base = ["--store", str(tmp_path / "s"), "--passphrase-file", str(passfile)]
    assert run(["device", "init", *base]).returncode == 0
    (tmp_path / "s" / "keyslots.json").write_text("garbage")
    r = run(["device", "status", *base])
    assert r.returncode == 5 and "damaged" in r.stderr


@pytest.mark.slow
def test_demo_command_runs_a_private_federation(tmp_path):
    """README's main command, on Flower's simulation engine with the real apps and stores:
    generated persons -> encrypted stores -> the linear head from ONE secure distributed-DP
    release of statistics -> delivered to every device -> the coach uses it where it beats
    "same as your last answer" (issue 12: K >= 4 of 6), in exactly one line."""
    import re

    r = run(["demo", "--workdir", str(tmp_path / "demo")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(linear-head): completed, 1 of 1 rounds, 6 devices" in r.stdout
    eps = float(re.search(r"epsilon = ([0-9.]+)", r.stdout).group(1))
    assert 0 < eps <= 4.0
    lines = [line for line in r.stdout.splitlines() if "learned model" in line]
    assert len(lines) == 1
    used = re.fullmatch(r"coach used the learned model for (\d+) of 6 persons", lines[0].strip())
    assert used is not None and int(used.group(1)) >= 4, lines[0]
    assert "The released model was delivered to 6 of 6 devices." in r.stdout
    assert "Readiness for" in r.stdout
    run_dir = tmp_path / "demo" / "run-demo"
    releases = [json.loads(line)["payload"] for line in (run_dir / "ledger.jsonl").read_text().splitlines()
                if '"gaussian_round"' in line]
    assert len(releases) == 1 and releases[0]["clip_norm"] == pytest.approx(2 ** 0.5)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "completed" and state["delivered"]["devices"] == 6
    # The verify command it prints pins the published key (kept outside the run folder) and the
    # devices' receipts (exported beside the run folder), and passes.
    command = re.search(r"restwise audit verify (\S+) --public-key (\S+) --receipts (\S+)", r.stdout.replace("\n", " "))
    assert command is not None, r.stdout
    report, key, receipts = command.group(1), command.group(2), command.group(3)
    assert run_dir.resolve() not in Path(key).resolve().parents
    assert len(list(Path(receipts).glob("receipts-run-demo-*.json"))) == 6
    verified = run(["audit", "verify", report, "--public-key", key, "--receipts", receipts])
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert "receipts: 6 device receipt file(s)" in verified.stdout
