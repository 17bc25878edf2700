"""A real deployment on 127.0.0.1: one SuperLink and four SuperNodes as separate processes.

One scenario (module fixture ``deployment``), several tests asserting on what it produced:

* SuperLink with TLS (trial CA from ``make_trial_pki``) and SuperNode authentication; four
  devices, each a SuperNode with its own SQLCipher store of a generated person (imported with
  the real importer); their public keys registered through the Control API; Restwise's
  ServerApp (secure aggregation + distributed DP + ledger) and ClientApp (egress guard, SecAgg
  mod, DP mod) - the installed components, submitted with ``flwr run`` from a throw-away app
  folder. Devices 0 and 3 are simulated devices with a ``FileKeystore``. Device 1 is set up
  as a person would, with the commands only: `device init` (a passphrase store) -> `device
  import` -> `device join --passphrase-file` (unlocked once; its ClientApps get the key from
  the join's key agent). Device 2 the same, plus `device keystore add --backend file`, and
  joins without its passphrase. Afterwards `device history` on their stores shows what they
  sent.
* First, a run of the linear head (issue 12): ONE release of the devices' bounded statistics
  through secure aggregation with distributed noise shares, solved on the server toward the
  shipped prior, then delivered to every device (`restwise server run` with its planner check).
* Then the network (forced: the planner refuses DP-FedAvg of 17,732 numbers on 4 devices).
  One secure-aggregation session: round 1 is its setup round, everyone takes part. Device 3 is
  SIGKILLed (with its ClientApp process) right after its round-1 unmask reply: it dealt its
  round-2 key shares with its round-1 masked input, so it is a participant of the fast round
  2 that never sends its masked input: the survivors' aggregate must be unmasked from shares
  (its round-2 mask key reconstructed). Round 3: the run continues without it.
* While the run goes on, three intruders try to join: a node whose key was never
  registered, a node that speaks plaintext to the TLS port, and a node that trusts another
  CA. None of them may get work.
* Device 0's SuperNode runs with a capture hook (a ``sitecustomize`` wrapping Flower's
  protobuf-over-HTTP client): every Fleet API request body it hands to the TLS connection is
  recorded. The wire-level test decodes those requests with Flower's own protobuf classes,
  rebuilds every message the device sent, and checks record names against the egress
  allow-list, for any float in the clear, and the bytes against the device's stored values, over
  both runs. (Flower 1.42's Fleet API is protobuf over HTTP/1.1, not gRPC.)

Bounded everywhere (timeouts on every wait); every process is killed in the fixture's
finaliser, also on failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

N_DEVICES = 4
ROUNDS = 3
CAPTURED = 0  # device whose traffic is recorded
VICTIM = 3  # device killed mid-round
KILL_ROUND = 2
PASSPHRASE_DEVICE = 1  # `device init` store, joined with its passphrase (key agent)
KEYSTORE_DEVICE = 2  # `device init` store + `device keystore add`, joined without passphrase
PASSPHRASE = "amber quartz migrates seven willow kites"
RUN_TIMEOUT_S = 420.0


# -- capturing what one device sends ---------------------------------------------------------
# A sitecustomize on the captured SuperNode's PYTHONPATH wraps Flower's protobuf-over-HTTP
# client (the one the SuperNode's Fleet connection uses) and appends every request body it
# hands to httpx - exactly the bytes that go into TLS - to a dump file. The network path, TLS
# and node authentication stay as they are for every other device.
SITECUSTOMIZE = r"""
import os, struct
_dump = os.environ.get("RESTWISE_WIRE_DUMP")
if _dump:
    import flwr.supercore.protobuf.client as _c
    _orig_send = _c.ProtobufClient._send

    def _send(self, context, *args, **kwargs):
        path = context.request.url.path
        if path.startswith("/v1/fleet/"):
            body = bytes(context.request.content)
            with open(_dump, "ab") as fh:
                p = path.encode()
                fh.write(struct.pack(">IQ", len(p), len(body)) + p + body)
        return _orig_send(self, context, *args, **kwargs)

    _c.ProtobufClient._send = _send
"""


def read_wire_dump(path: Path) -> list[tuple[str, bytes]]:
    """(path, body) of every Fleet API request the captured device made, in order."""
    data = path.read_bytes() if path.exists() else b""
    out, pos = [], 0
    while pos + 12 <= len(data):
        plen, blen = struct.unpack(">IQ", data[pos:pos + 12])
        pos += 12
        out.append((data[pos:pos + plen].decode(), data[pos + plen:pos + plen + blen]))
        pos += plen + blen
    return out


# The user-facing commands, as subprocesses (``restwise device join`` is loaded from
# client/join_cli.py directly so the test does not depend on client/cli.py wiring it in).
RESTWISE = [sys.executable, "-c", "import sys; from restwise.cli import main; sys.argv[0] = 'restwise'; main()"]
DEVICE_JOIN = [
    sys.executable, "-c",
    "import typer; from restwise.client.join_cli import register; app = typer.Typer(); register(app); app()",
    "join",
]


def restwise(*args: str, timeout_s: float = 120.0) -> str:
    proc = subprocess.run([*RESTWISE, *args], capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"restwise {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


# -- the scenario -------------------------------------------------------------------------
def make_device(folder: Path, keystore_dir: Path, seed: int) -> Path:
    from restwise.client.importers.base import run_import
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore
    from restwise.simulation.fleet import write_demo_export

    export = write_demo_export(seed, folder.parent / f"export-{seed}.jsonl", days=60)
    store = DeviceStore.create(folder, keystore=FileKeystore(keystore_dir))
    try:
        run_import(store, export)
    finally:
        store.close()
    export.unlink()  # the plain export is not left lying around; the store holds the data
    return folder


def make_device_with_the_cli(folder: Path, passfile: Path, seed: int, *, keystore: Path | None) -> Path:
    """A person's own device, set up with the commands only: `device init` (passphrase store),
    `device import` of their export, and (``keystore``) `device keystore add --backend file`."""
    from restwise.simulation.fleet import write_demo_export

    export = write_demo_export(seed, folder.parent / f"export-{seed}.jsonl", days=60)
    auth = ["--store", str(folder), "--passphrase-file", str(passfile)]
    restwise("device", "init", *auth)
    restwise("device", "import", str(export), *auth, "-q")
    if keystore is not None:
        restwise("device", "keystore", "add", *auth, "--backend", "file", "--keystore", str(keystore))
    export.unlink()
    return folder


def wait_until(predicate, timeout_s: float, what: str, step: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def sent_stage(log_text: str, rnd: int, stage: str) -> bool:
    """The SuperNode's own log says it sent its reply to round ``rnd``'s ``stage``."""
    marker = f"ROUND secagg-{rnd}-{stage}]"
    idx = [m.start() for m in re.finditer(re.escape(marker), log_text)]
    return any("Sent successfully" in log_text[i:i + 600] and "Sending:" in log_text[i:i + 600] for i in idx)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from restwise.server import deploy as D

    root = tmp_path_factory.mktemp("deployment")
    pki = D.make_trial_pki(root / "pki")
    other_ca = D.make_trial_pki(root / "other-pki")  # a CA the SuperLink's cert is not from
    keys = [D.make_node_keys(root / "keys", f"device-{i}") for i in range(N_DEVICES)]
    stranger = D.make_node_keys(root / "keys", "stranger")
    keystore = root / "keystore"
    passfile = root / "passphrase"
    passfile.write_text(PASSPHRASE + "\n")
    passfile.chmod(0o600)
    own_keystore = root / "keystore-of-device-2"
    devices = []
    for i in range(N_DEVICES):
        if i == PASSPHRASE_DEVICE:
            devices.append(make_device_with_the_cli(root / f"device-{i}", passfile, 500 + i, keystore=None))
        elif i == KEYSTORE_DEVICE:
            devices.append(make_device_with_the_cli(root / f"device-{i}", passfile, 500 + i, keystore=own_keystore))
        else:
            devices.append(make_device(root / f"device-{i}", keystore, seed=500 + i))

    procs: list[D.ManagedProcess] = []
    hook_dir = root / "wire-hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    wire_dump = root / "wire.bin"
    result: dict = {"root": root, "devices": devices, "keystore": keystore, "passfile": passfile,
                    "own_keystore": own_keystore}
    try:
        port = D.free_port()
        # `restwise server superlink` (TLS and node auth on by default) execs flower-superlink.
        link = D.start_process(
            "superlink", [*RESTWISE, "server", "superlink", "--certs", str(root / "pki"), "--port", str(port)],
            root / "superlink.log",
        )
        procs.append(link)
        D.wait_for_port("127.0.0.1", port, timeout_s=60, process=link)
        result["superlink"] = link
        assert "--enable-supernode-auth" in (Path(f"/proc/{link.pid}/cmdline").read_bytes().decode().replace("\0", " "))
        conn = D.FlwrConnection(root / "flwr-home", f"127.0.0.1:{port}", root_cert=pki.ca_cert)
        link_args = ["--superlink", f"127.0.0.1:{port}", "--root-cert", str(pki.ca_cert)]
        node_ids = []
        for i, k in enumerate(keys):
            out = restwise("server", "register-node", str(k.public_key), *link_args, "--name", f"device-{i}")
            node_ids.append(int(re.search(r"registered SuperNode (\d+)", out).group(1)))
        result["node_ids"] = node_ids

        nodes = []
        for i in range(N_DEVICES):
            # `restwise device join`: checks the store opens (with the keystore, or unlocks it
            # once with the passphrase and keeps the key in its key agent), then runs
            # flower-supernode with TLS, the node's key and the store in its node config.
            join = [
                "--superlink", f"127.0.0.1:{port}", "--root-cert", str(pki.ca_cert),
                "--auth-key", str(keys[i].private_key), "--store", str(devices[i]),
                "--runtime-port", str(D.free_port()),
            ]
            if i == PASSPHRASE_DEVICE:
                command = [*RESTWISE, "device", "join", *join, "--passphrase-file", str(passfile)]
            elif i == KEYSTORE_DEVICE:
                command = [*RESTWISE, "device", "join", *join, "--keystore", str(own_keystore)]
            else:
                command = [*DEVICE_JOIN, *join, "--keystore", str(keystore)]
            env = None
            if i == CAPTURED:
                env = dict(os.environ, RESTWISE_WIRE_DUMP=str(wire_dump),
                           PYTHONPATH=os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]))
            proc = D.start_process(f"device-{i}", command, root / f"device-{i}.log", env=env)
            procs.append(proc)
            nodes.append(proc)
        result["nodes"] = nodes

        wait_until(
            lambda: sum(n.get("status") == "online" for n in D.list_nodes(conn)) == N_DEVICES,
            90, "all four SuperNodes online", step=2.0,
        )

        # The linear head first: one statistics release, delivered to the four devices.
        head_dir = root / "run-linear-head"
        head_config = dict(
            name="deployment-linear-head", model="linear-head", rounds=1, population=N_DEVICES, sampling="poisson",
            sampling_rate=1.0, target_epsilon=4.0, secagg_num_neighbours=3, secagg_threshold=2,
            max_dropout_fraction=0.25, round_timeout_s=40.0, dataset="demo",
        )
        (root / "head.json").write_text(json.dumps(head_config), encoding="utf-8")
        head_started = time.monotonic()
        head_cli = D.start_process(
            "restwise-server-run-linear-head",
            [*RESTWISE, "server", "run", "--run-dir", str(head_dir), "--config", str(root / "head.json"),
             *link_args, "--timeout", str(RUN_TIMEOUT_S), "--json"],
            root / "run-linear-head-cli.out",
        )
        procs.append(head_cli)
        try:
            head_code = head_cli.popen.wait(timeout=RUN_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            raise AssertionError("`restwise server run` of the linear head did not return") from None
        head_text = head_cli.log_text()
        result["head"] = {"code": head_code, "output": head_text, "run_dir": head_dir, "config": head_config,
                          "seconds": time.monotonic() - head_started,
                          "outcome": json.loads([line for line in head_text.splitlines() if line.startswith("{")][-1])}

        run_dir = root / "run"
        run_dir.mkdir()
        config = dict(
            # Poisson with q = 1: everyone, every round (see docs/deployment-needs.md for why not
            # fixed-size sampling here yet).
            name="deployment-test", rounds=ROUNDS, population=N_DEVICES, sampling="poisson", sampling_rate=1.0,
            noise_multiplier=1.0, clip_norm=1.0, secagg_num_neighbours=3, secagg_threshold=2,
            max_dropout_fraction=0.25, round_timeout_s=40.0, dataset="demo",
            force=True,  # the planner refuses DP-FedAvg of the network on 4 devices: forced, and recorded
        )
        (root / "run.json").write_text(json.dumps(config), encoding="utf-8")
        started = time.monotonic()
        # The victim's log so far holds the linear head's run (its own round 1): look after it.
        victim_log_from = len(nodes[VICTIM].log_text())
        # `restwise server run`: writes config.json, submits, waits, checks the outcome.
        run_cli_out = root / "run-cli.out"
        run_cli = D.start_process(
            "restwise-server-run",
            [*RESTWISE, "server", "run", "--run-dir", str(run_dir), "--config", str(root / "run.json"),
             *link_args, "--timeout", str(RUN_TIMEOUT_S), "--json"],
            run_cli_out,
        )
        procs.append(run_cli)
        result.update(run_dir=run_dir, config=config)

        # Intruders, while the run is going on.
        intruders = {
            "unregistered": D.SuperNodeConfig(
                f"127.0.0.1:{port}", root_cert=pki.ca_cert, auth_key=stranger.private_key,
                node_config={"store": str(devices[1]), "keystore": str(keystore)},
                runtime_port=D.free_port(), max_wait_time_s=20,
            ),
            # (Flower's SuperNode itself refuses to send an auth key over plaintext, so this
            # intruder comes without one: a plain HTTP client at the TLS port.)
            "plaintext": D.SuperNodeConfig(
                f"127.0.0.1:{port}", insecure=True,
                runtime_port=D.free_port(), max_retries=3, max_wait_time_s=20,
            ),
            "wrong-ca": D.SuperNodeConfig(
                f"127.0.0.1:{port}", root_cert=other_ca.ca_cert, auth_key=keys[1].private_key,
                runtime_port=D.free_port(), max_retries=3, max_wait_time_s=20,
            ),
        }
        result["intruders"] = {}
        for name, cfg in intruders.items():
            proc = D.start_supernode(f"intruder-{name}", cfg, root / f"intruder-{name}.log")
            procs.append(proc)
            result["intruders"][name] = proc

        # Kill the victim between rounds: its key shares for round KILL_ROUND went out with its
        # masked input of the round before; it will never send round KILL_ROUND's masked input.
        victim = nodes[VICTIM]
        run_over = D.run_dir_finished(run_dir)
        wait_until(lambda: sent_stage(victim.log_text()[victim_log_from:], KILL_ROUND - 1, "unmask") or run_over()
                   or not run_cli.alive(),
                   RUN_TIMEOUT_S, f"device {VICTIM} to send its round-{KILL_ROUND - 1} unmask reply")
        if run_over() or not run_cli.alive():
            raise AssertionError(f"the run ended before round {KILL_ROUND - 1}'s unmask: {run_cli.log_text()[-3000:]}")
        victim.kill()  # SIGKILL: the SuperNode and the ClientApp process it runs
        result["killed_at"] = time.monotonic() - started

        for proc in result["intruders"].values():
            wait_until(lambda p=proc: not p.alive(), 60, f"{proc.name} to give up")
        result["nodes_during_run"] = D.list_nodes(conn)

        try:
            result["run_cli_code"] = run_cli.popen.wait(timeout=RUN_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            raise AssertionError("`restwise server run` did not return") from None
        text = run_cli.log_text()
        result["run_cli_output"] = text
        result["outcome"] = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
        result["nodes_cli"] = restwise("server", "nodes", *link_args)
        result["seconds"] = time.monotonic() - started
        result["wire"] = read_wire_dump(wire_dump)
        yield result
    finally:
        for proc in reversed(procs):
            proc.stop(timeout_s=5)


# -- 1. a completed run with Restwise's apps ------------------------------------------------
def test_run_completes_with_secure_aggregation_and_dp(deployment):
    from restwise.privacy.ledger import load_public_key, verify_ledger_file
    from restwise.privacy.release import plan_release
    from restwise.server.runconfig import RunConfig

    # `restwise server run` waited for the run and checked both Flower's verdict and the run's.
    outcome = deployment["outcome"]
    assert deployment["run_cli_code"] == 0, deployment["run_cli_output"][-2000:]
    assert outcome["ok"] is True and outcome["reason"] is None
    assert outcome["flower_status"] == "finished:completed"
    assert outcome["status"] == "completed" and outcome["completed_rounds"] == ROUNDS
    assert outcome["released_rounds"] == list(range(1, ROUNDS + 1)) and outcome["failed_rounds"] == []
    # What the operator saw while waiting: every round, then the outcome in one line; and no
    # Flower INFO lines (no --verbose).
    text = deployment["run_cli_output"]
    for rnd in range(1, ROUNDS + 1):
        assert f"round {rnd}/{ROUNDS} released: " in text
    assert outcome["summary"].startswith(f"completed (Flower run {outcome['flower_run_id']}): {ROUNDS} of {ROUNDS} rounds released, ε = ")
    assert "INFO" not in text
    run_dir = deployment["run_dir"]
    assert json.loads((run_dir / "config.json").read_text())["rounds"] == ROUNDS

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["status"] in ("released", "completed") for r in rounds), rounds
    first = rounds[0]
    assert (first["sampled"], first["participants"], first["survived"], first["dropped"]) == (4, 4, 4, 0)

    # The ledger: signed, hash-chained, one Gaussian release per round, and the epsilon each
    # round reports is what the accountant computes from the ledger's releases so far.
    entries, verification = verify_ledger_file(run_dir / "ledger.jsonl", load_public_key(run_dir / "public_key.pem"))
    releases = [e.event for e in entries if type(e.event).__name__ == "GaussianRoundEvent"]
    assert [e.round for e in releases] == list(range(1, ROUNDS + 1))
    plan = plan_release(RunConfig.from_dict(deployment["config"]).release_policy())
    for k, r in enumerate(rounds, start=1):
        expected = plan.accountant().epsilon(releases[:k], 1e-5).epsilon
        assert r["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert math.isfinite(r["epsilon"]) and r["epsilon"] > 0
    assert rounds[0]["epsilon"] < rounds[1]["epsilon"] < rounds[2]["epsilon"]
    for e, r in zip(releases, rounds):
        assert e.survivors == r["survived"]
        assert e.noise_std_total == pytest.approx(r["noise_std_total"])


def test_server_nodes_shows_the_names_given_at_registration(deployment):
    rows = {line.split()[0]: line.split()[1] for line in deployment["nodes_cli"].splitlines()[1:]}
    assert rows == {str(node_id): f"device-{i}" for i, node_id in enumerate(deployment["node_ids"])}


def test_the_deployment_run_folder_holds_no_store(deployment):
    """The deployed ServerApp never creates stores or persons: the devices bring their own
    (issue 13); only a simulation prepares a generated fleet."""
    from restwise.client.store import DB_NAME, KEYSLOTS_NAME, DeviceStore

    run_dir = deployment["run_dir"]
    paths = [run_dir, *run_dir.rglob("*")]
    assert not (run_dir / "fleet").exists()
    assert not [p for p in paths if p.name in (DB_NAME, KEYSLOTS_NAME)]
    assert not [p for p in paths if p.is_dir() and DeviceStore.exists(p)]
    # What it does hold: the run's own files.
    assert {"config.json", "state.json", "rounds.jsonl", "ledger.jsonl", "checkpoint"} <= {p.name for p in paths}


# -- 1b. the linear head: one release of statistics, delivered (issue 12) --------------------
def test_the_linear_head_is_released_once_and_delivered_to_every_device(deployment):
    import numpy as np

    from restwise.models.linear_head import SENSITIVITY
    from restwise.models.linear_head_architecture import STATE_NAME, HeadState
    from restwise.privacy.accountant import PrivacyAccountant
    from restwise.privacy.ledger import load_public_key, verify_ledger_file
    from restwise.server.rundir import Checkpoint

    head = deployment["head"]
    assert head["code"] == 0, head["output"][-2000:]
    assert "plan: linear-head: one statistics release from 4 devices" in head["output"]
    outcome, run_dir = head["outcome"], head["run_dir"]
    assert outcome["ok"] is True and outcome["released_rounds"] == [1] and outcome["failed_rounds"] == []
    entries, verification = verify_ledger_file(run_dir / "ledger.jsonl", load_public_key(run_dir / "public_key.pem"))
    (release,) = [e.event for e in entries if type(e.event).__name__ == "GaussianRoundEvent"]
    assert release.clip_norm == pytest.approx(SENSITIVITY) and release.survivors == N_DEVICES
    # Not forced; the release (written ahead of the unmasking), then the model built from it.
    applied = [e.event for e in entries if type(e.event).__name__ == "AuditEvent"]
    assert [a.action for a in applied] == ["release.applied"]
    model_hash = applied[0].details["model_hash"]
    (line,) = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
    assert line["epsilon"] == pytest.approx(PrivacyAccountant().epsilon([release], 1e-5).epsilon) and line["epsilon"] <= 4.0
    assert line["train_loss"] is None
    ckpt = Checkpoint.from_bytes((run_dir / "checkpoint").read_bytes())
    assert ckpt.model == "linear-head" and ckpt.model_hash() == model_hash
    state = json.loads((run_dir / "state.json").read_text())
    assert state["delivered"]["devices"] == N_DEVICES and state["delivered"]["model_hash"] == model_hash
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"]["released_model_hash"] == model_hash
    verify = subprocess.run([*RESTWISE, "audit", "verify", str(run_dir / "report.json"), "--public-key",
                             str(run_dir / "public_key.pem")], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    # Every device keeps the released weights beside its own personal part.
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore

    store = DeviceStore.open(deployment["devices"][CAPTURED], keystore=FileKeystore(deployment["keystore"]))
    try:
        blob, meta = store.load_model_state(STATE_NAME)
    finally:
        store.close()
    kept = HeadState.from_bytes(blob)
    np.testing.assert_array_equal(kept.weights, ckpt.arrays[0].astype(np.float64))
    assert kept.personal is not None and meta["model_hash"] == model_hash and meta["run_id"] == run_dir.name


# -- 2. a node killed mid-round -------------------------------------------------------------
def test_node_killed_mid_round_round_completes_from_survivors(deployment):
    run_dir = deployment["run_dir"]
    rounds = {r["round"]: r for r in map(json.loads, (run_dir / "rounds.jsonl").read_text().splitlines())}
    killed = rounds[KILL_ROUND]
    # The victim had dealt its round keys, so it was a participant; it never sent a masked input.
    assert killed["participants"] == N_DEVICES
    assert killed["survived"] == N_DEVICES - 1 and killed["dropped"] == 1
    assert killed["status"] in ("released", "completed")
    # Distributed noise under add/remove: each device adds a share sized for t_min - 1 = 2 (a
    # person's own share never counts), so with m survivors the other m - 1 shares carry
    # z*C*sqrt((m - 1) / 2): never less than the planned z*C = 1, even with a death.
    assert rounds[1]["noise_std_total"] == pytest.approx(math.sqrt(3 / 2))
    assert killed["noise_std_total"] == pytest.approx(1.0)
    # The run went on without the dead device.
    after = rounds[KILL_ROUND + 1]
    assert after["status"] in ("released", "completed")
    assert after["survived"] == N_DEVICES - 1
    victim = deployment["nodes"][VICTIM]
    assert not victim.alive() and victim.popen.returncode == -9
    # And the device that died does not appear in a later round's log as having sent anything.
    assert f"secagg-{KILL_ROUND + 1}-" not in victim.log_text()


# -- 3. intruders are refused ------------------------------------------------------------
def test_unregistered_plaintext_and_wrong_ca_nodes_are_refused(deployment):
    intruders = deployment["intruders"]
    for name, proc in intruders.items():
        log = proc.log_text()
        assert proc.popen.returncode not in (0, None), name
        assert "Receiving:" not in log and "Start `flwr-clientapp`" not in log, f"{name} got work"
        assert "SuperNode ID:" not in log, f"{name} was activated"
    assert "Failed to activate SuperNode" in intruders["unregistered"].log_text()
    # Plain HTTP at the TLS port: the SuperLink hangs up; Flower gives up (exit 305).
    assert "Server disconnected without sending a response" in intruders["plaintext"].log_text()
    assert "CERTIFICATE_VERIFY_FAILED" in intruders["wrong-ca"].log_text() or \
        "certificate verify failed" in intruders["wrong-ca"].log_text().lower()

    # The SuperLink knows exactly the four registered nodes, no fifth one appeared.
    ids = sorted(int(n["node-id"]) for n in deployment["nodes_during_run"])
    assert ids == sorted(deployment["node_ids"])
    # Every round's cohort was drawn from the four registered devices only.
    rounds = [json.loads(line) for line in (deployment["run_dir"] / "rounds.jsonl").read_text().splitlines()]
    assert max(r["sampled"] for r in rounds) <= N_DEVICES


# -- 4. what one device actually sent --------------------------------------------------------
def stored_values(store_dir: Path, keystore: Path) -> tuple[dict[str, list[float]], list[float]]:
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore
    from restwise.models.metrics import METRICS

    store = DeviceStore.open(store_dir, keystore=FileKeystore(keystore))
    try:
        series = {}
        for metric in METRICS:
            values = [float(v) for _, v, _, _ in store.observations(metric)]
            if values:
                series[metric] = values
        checkin_values = [
            float(v) for row in store.checkins() for k, v in row.items()
            if k not in ("day", "source", "is_override") and isinstance(v, (int, float)) and v is not None
        ]
    finally:
        store.close()
    return series, checkin_values


def needles(series: dict[str, list[float]], checkins: list[float]) -> list[tuple[str, bytes]]:
    """Byte patterns any leak of these values would contain. Single values as float64 (LE and
    BE: 8 bytes, no chance matches in a few MB); float32 only as runs of 3 consecutive values of
    a series (12 bytes; a lone 4-byte float32 would match random masked data by chance);
    decimal strings only when at least 5 characters long."""
    out: list[tuple[str, bytes]] = []
    singles = sorted({v for vs in series.values() for v in vs} | set(checkins))
    for v in singles:
        out += [(f"f64le {v}", struct.pack("<d", v)), (f"f64be {v}", struct.pack(">d", v))]
        for text in {repr(v), f"{v:.2f}", f"{v:.1f}", f"{v:g}"}:
            if len(text) >= 5:
                out.append((f"decimal {text}", text.encode()))
    for metric, vs in series.items():
        for i in range(len(vs) - 2):
            out += [(f"f32le {metric}[{i}:{i+3}]", struct.pack("<3f", *vs[i:i + 3])),
                    (f"f32be {metric}[{i}:{i+3}]", struct.pack(">3f", *vs[i:i + 3]))]
    for i in range(len(checkins) - 2):
        out.append((f"f32le checkins[{i}:{i+3}]", struct.pack("<3f", *checkins[i:i + 3])))
    return out


def decode_sent_messages(requests: list[tuple[str, bytes]]):
    """Rebuild every Message the device pushed from the captured request bodies, with
    Flower's own protobuf classes and object inflation."""
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    paths: dict[str, int] = {}
    objects: dict[str, bytes] = {}
    message_ids: list[str] = []
    for path, body in requests:
        paths[path] = paths.get(path, 0) + 1
        if path.endswith("/push-object"):
            req = PushObjectRequest.FromString(body)
            objects[req.object_id] = req.object_content
        elif path.endswith("/push-messages"):
            req = PushMessagesRequest.FromString(body)
            message_ids += [tree.object_id for tree in req.message_object_trees]
    # The SuperLink keeps one copy of identical objects: the empty reply to a delivered model is
    # the same object on every device, so only the first device to answer pushes it.
    from flwr.app import RecordDict

    empty = RecordDict()
    objects.setdefault(empty.object_id, empty.deflate())
    # Flower's Fleet client retries a request that timed out (a loaded machine): the capture
    # then holds the same push twice. A message id is its content's hash: one message each.
    message_ids = list(dict.fromkeys(message_ids))
    messages = [inflate_object_from_contents(mid, dict(objects), keep_object_contents=True) for mid in message_ids]
    return paths, messages


def test_wire_capture_has_no_stored_values_and_only_allow_listed_records(deployment):
    from restwise.privacy import egress as E
    from restwise.privacy import wire
    from restwise.privacy.secagg import records as SR

    requests = deployment["wire"]
    captured = b"".join(body for _, body in requests)
    assert len(captured) > 10_000, "the capture recorded (almost) nothing"

    paths, messages = decode_sent_messages(requests)
    # one session for the network: 4 stages in round 1, then 2 per round; the linear head's
    # one-round session (4 stages) + the delivery's empty reply
    assert paths.get("/v1/fleet/push-messages", 0) >= 4 + 2 * (ROUNDS - 1) + 5
    assert len(messages) >= 4 + 2 * (ROUNDS - 1) + 5  # distinct messages (a retried push is sent twice)

    allowed: dict[str, tuple[str, tuple[str, ...]]] = {wire.CONSENT_RECORD: ("config", ("participate",))}
    for stage_records in SR.CLIENT_REPLY_RECORDS.values():
        allowed.update(stage_records)
    metric_keys = set(E.EgressPolicy().metric_keys)
    kinds = {"ConfigRecord": "config", "ArrayRecord": "array", "MetricRecord": "metric"}
    seen_names = set()
    masked_lengths = []
    empty_replies = 0
    for msg in messages:
        assert not msg.has_error(), f"device sent an error reply: code {msg.error.code}"
        empty_replies += not list(msg.content.keys())
        for name, record in msg.content.items():
            seen_names.add(name)
            assert name in allowed, f"record {name!r} is not on the egress allow-list"
            kind, keys = allowed[name]
            assert kinds[type(record).__name__] == kind, name
            # No clear float, no metric at all (issue 15): a coarsened loss can equal a stored answer.
            assert kind != "metric", f"a metric record {name!r} left the device: {sorted(record.keys())}"
            assert set(record.keys()) <= set(keys), (name, sorted(record.keys()))
            if kind == "config":
                for key, value in record.items():
                    values = value if isinstance(value, list) else [value]
                    assert not any(isinstance(v, float) for v in values), f"a float in the clear: {name}/{key}"
            if kind == "array":
                arr = record[SR.MASKED_ARRAY]
                assert arr.dtype == "uint64", f"a float array in the clear: {name}"
                masked_lengths.append(arr.numpy().size)
    assert metric_keys == set()
    # Every stage of every round the device took part in is there, the masked update included.
    assert {SR.PUBLIC_KEYS, SR.SHARES, SR.MASKED_INPUT, SR.UNMASK_SHARES} <= seen_names
    # The network's three masked updates, and the linear head's one masked statistics vector (560).
    network = [n for n in masked_lengths if n != 560]
    assert sorted(masked_lengths).count(560) == 1 and len(network) == ROUNDS and len(set(network)) == 1
    # the replies to the delivered linear head and to the network run's final receipts message
    # (the run's last ledger entries) carry nothing
    assert empty_replies == 2
    assert SR.INNER_UPDATE not in seen_names  # no unmasked update ever left

    series, checkins = stored_values(deployment["devices"][CAPTURED], deployment["keystore"])
    assert sum(len(v) for v in series.values()) > 100 and len(checkins) > 50
    patterns = needles(series, checkins)
    # Positive control: the search finds a value planted the way a leak would carry it.
    planted = captured[:1000] + struct.pack("<d", series[next(iter(series))][7]) + captured[1000:]
    assert any(p in planted for _, p in patterns)
    leaks = [label for label, p in patterns if p in captured]
    assert leaks == [], f"stored values found in the device's traffic: {leaks[:10]}"


# -- 5. a person's own store: init -> import -> join -> a secure round -> history ---------
def test_device_history_shows_what_the_persons_own_stores_sent(deployment):
    from restwise.privacy import egress as E
    from restwise.privacy import wire
    from restwise.privacy.secagg import records as SR

    outcome = deployment["outcome"]
    assert outcome["ok"] is True and outcome["released_rounds"] == list(range(1, ROUNDS + 1))
    nodes = deployment["nodes"]
    log = nodes[PASSPHRASE_DEVICE].log_text()
    assert "Store unlocked for this join" in log and PASSPHRASE not in log
    assert nodes[PASSPHRASE_DEVICE].alive() and nodes[KEYSTORE_DEVICE].alive()
    allowed = {E.CONSENT_RECORD, *(n for stage in SR.CLIENT_REPLY_RECORDS.values() for n in stage)}
    for device, auth in (
        (PASSPHRASE_DEVICE, ["--passphrase-file", str(deployment["passfile"])]),
        (KEYSTORE_DEVICE, ["--keystore", str(deployment["own_keystore"])]),  # no passphrase
    ):
        out = restwise("device", "history", "--store", str(deployment["devices"][device]), *auth, "--json")
        everything = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert {r["run_id"] for r in everything} == {"run", "run-linear-head"}, everything
        head = [r for r in everything if r["run_id"] == "run-linear-head"]
        # the linear head: the four stages of a one-round session, the delivered model (reply: nothing)
        assert [r["message_type"] for r in head][0] == f"train:{SR.STAGE_SETUP}" and len(head) == 5
        assert head[-1]["message_type"] == wire.MODEL_MESSAGE_TYPE and head[-1]["records"] == []
        rows = [r for r in everything if r["run_id"] == "run"]
        # one session: a setup round (four stages), then two messages per round, each logged,
        # then the run's final receipts message (its reply: nothing)
        assert sorted({r["round"] for r in rows}) == list(range(1, ROUNDS + 1))
        assert len(rows) == 4 + 2 * (ROUNDS - 1) + 1, [(r["round"], r["message_type"]) for r in rows]
        assert rows[-1]["message_type"] == wire.RECEIPTS_MESSAGE_TYPE and rows[-1]["records"] == []
        names = {rec["name"] for r in rows for rec in r["records"]}
        assert SR.MASKED_INPUT in names and names <= allowed, names
        assert all(len(r["sha256"]) == 64 for r in rows)
        assert all(r["n_bytes"] > 0 for r in rows[:-1])  # the receipts reply is empty
    # the passphrase store has no keystore slot: its key was never put on disk by the join
    slots = json.loads((deployment["devices"][PASSPHRASE_DEVICE] / "keyslots.json").read_text())
    assert [s["kind"] for s in slots["slots"]] == ["passphrase"]
    assert not (deployment["root"] / "keystore-of-device-1").exists()
