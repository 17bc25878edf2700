"""Deployment plumbing without starting Flower: certificates, keys, command lines, the CLIs.

Real parts where it matters: the trial PKI is checked with a real TLS handshake on
127.0.0.1, node keys with Flower's own loaders, node config and connection files with
Flower's own parsers. The live deployment is tests/test_deployment_live.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restwise.server import deploy as D


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- certificates ---------------------------------------------------------------------------
def test_trial_pki_files_are_private_and_the_chain_verifies(tmp_path):
    from cryptography import x509

    files = D.make_trial_pki(tmp_path / "pki")
    for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key):
        assert path.is_file() and mode(path) == 0o600, path
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_trial_pki_refuses_to_overwrite_and_checks_its_input(tmp_path):
    D.make_trial_pki(tmp_path / "pki")
    before = (tmp_path / "pki" / "ca.crt").read_bytes()
    with pytest.raises(D.CertificateError, match="already exists"):
        D.make_trial_pki(tmp_path / "pki")
    assert (tmp_path / "pki" / "ca.crt").read_bytes() == before
    D.make_trial_pki(tmp_path / "pki", overwrite=True)
    assert (tmp_path / "pki" / "ca.crt").read_bytes() != before
    with pytest.raises(D.DeploymentConfigError):
        D.make_trial_pki(tmp_path / "x", sans=[])
    with pytest.raises(D.DeploymentConfigError):
        D.make_trial_pki(tmp_path / "y", days=0)
    with pytest.raises(D.DeploymentConfigError):
        D.make_trial_pki(tmp_path / "z", sans=["not a host"])


def _tls_server(files: D.TlsFiles):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.server_cert), str(files.server_key))
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(10)

    def serve():
        for _ in range(3):
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock, t


def test_trial_certificate_passes_a_real_tls_handshake_and_a_foreign_ca_fails(tmp_path):
    files = D.make_trial_pki(tmp_path / "pki")
    other = D.make_trial_pki(tmp_path / "other")
    sock, thread = _tls_server(files)
    port = sock.getsockname()[1]
    try:
        for host in ("127.0.0.1", "localhost"):  # both SANs, hostname checking on
            ctx = ssl.create_default_context(cafile=str(files.ca_cert))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as tls:
                    assert tls.recv(2) == b"ok"
        ctx = ssl.create_default_context(cafile=str(other.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        sock.close()
        thread.join(5)


def test_node_keys_load_with_flowers_own_loaders(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    keys = D.make_node_keys(tmp_path / "keys", "device-1")
    assert mode(keys.private_key) == 0o600 and mode(keys.public_key) == 0o600
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    registered = try_load_public_key(keys.public_key)  # what `flwr supernode register` sends
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert registered == public_key_to_bytes(private.public_key())
    D.check_node_public_key(keys.public_key)
    D.check_node_private_key(keys.private_key)
    with pytest.raises(D.CertificateError, match="not an OpenSSH public key"):
        D.check_node_public_key(keys.private_key)
    with pytest.raises(D.CertificateError, match="private key"):
        D.check_node_private_key(keys.public_key)
    with pytest.raises(D.CertificateError, match="already exists"):
        D.make_node_keys(tmp_path / "keys", "device-1")
    with pytest.raises(D.DeploymentConfigError):
        D.make_node_keys(tmp_path / "keys", "../escape")


# -- command lines ---------------------------------------------------------------------------
def test_superlink_refuses_plaintext_unless_insecure_is_explicit(tmp_path):
    with pytest.raises(D.DeploymentConfigError, match="without TLS"):
        D.SuperLinkConfig(port=9093)
    with pytest.raises(D.DeploymentConfigError, match="authentication needs TLS"):
        D.SuperLinkConfig(port=9093, insecure=True)
    tls = D.TlsFiles.in_dir(tmp_path)
    with pytest.raises(D.DeploymentConfigError, match="contradictory"):
        D.SuperLinkConfig(port=9093, tls=tls, insecure=True)
    plain = D.superlink_command(D.SuperLinkConfig(port=9093, insecure=True, node_auth=False))
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain and "--ssl-certfile" not in plain


def test_superlink_command_has_tls_node_auth_and_no_runtime_installs(tmp_path):
    tls = D.TlsFiles.in_dir(tmp_path)
    cmd = D.superlink_command(D.SuperLinkConfig(host="127.0.0.1", port=9444, tls=tls, database=tmp_path / "s.db"))
    assert Path(cmd[0]).name == "flower-superlink"
    args = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(tls.ca_cert)
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tls.server_cert)
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(tls.server_key)
    assert cmd[cmd.index("--port") + 1] == "9444" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "s.db")
    assert args  # sanity: flags come in pairs where they take values

    # Flower's own parser accepts exactly this command line.
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    parsed = _parse_args_run_superlink().parse_args(cmd[1:])
    assert parsed.enable_supernode_auth and not parsed.insecure and parsed.port == 9444
    assert parsed.runtime_dependency_install is False


def test_supernode_command_requires_tls_or_explicit_insecure(tmp_path):
    with pytest.raises(D.DeploymentConfigError, match="without TLS"):
        D.SuperNodeConfig("127.0.0.1:9093")
    with pytest.raises(D.DeploymentConfigError, match="contradictory"):
        D.SuperNodeConfig("127.0.0.1:9093", root_cert=tmp_path / "ca.crt", insecure=True)
    with pytest.raises(D.DeploymentConfigError, match="HOST:PORT"):
        D.SuperNodeConfig("127.0.0.1", root_cert=tmp_path / "ca.crt")
    cfg = D.SuperNodeConfig(
        "127.0.0.1:9093", root_cert=tmp_path / "ca.crt", auth_key=tmp_path / "key",
        node_config={"store": "/data/my store", "keystore": "/data/keystore"}, runtime_port=9555,
    )
    cmd = D.supernode_command(cfg)
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    assert "--insecure" not in cmd and cmd[cmd.index("--port") + 1] == "9555"

    # The ClientApp will see exactly these node config values (Flower's own parser).
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node_config == {"store": "/data/my store", "keystore": "/data/keystore"}


def test_node_config_refuses_values_that_would_break_quoting():
    with pytest.raises(D.DeploymentConfigError):
        D.node_config_arg({"store": '/tmp/a" b="c'})
    with pytest.raises(D.DeploymentConfigError):
        D.node_config_arg({"store": "C:\\Users\\x"})  # a TOML escape would change the path
    with pytest.raises(D.DeploymentConfigError):
        D.node_config_arg({"bad key": "x"})
    from flwr.common.config import parse_config_args

    assert parse_config_args([D.node_config_arg({"store": "/a b/c d=e", "keystore": "/k"})]) == {
        "store": "/a b/c d=e", "keystore": "/k",
    }
    assert D.node_config_arg({"a": 1, "b": True, "c": "x"}) == 'a=1 b=true c="x"'


def test_device_join_command_matches_the_server_side_builder(tmp_path):
    from restwise.client.join_cli import supernode_join_command

    kwargs = dict(root_cert=tmp_path / "ca.crt", auth_key=tmp_path / "key", insecure=False,
                  store=tmp_path / "store", keystore=tmp_path / "ks", runtime_port=9777, max_wait_s=30.0)
    device = supernode_join_command("10.0.0.5:9093", **kwargs)
    server = D.supernode_command(D.SuperNodeConfig(
        "10.0.0.5:9093", root_cert=kwargs["root_cert"], auth_key=kwargs["auth_key"],
        node_config={"store": str(kwargs["store"]), "keystore": str(kwargs["keystore"])},
        runtime_port=9777, max_wait_time_s=30.0,
    ))
    assert device == server


def test_flower_settings_are_the_same_for_the_operator_and_the_device(monkeypatch):
    """Every Flower process Restwise starts gets the same Flower settings (the SuperLink's,
    the benchmark's and `device join`'s SuperNodes): no runtime installs, no telemetry or
    update check sent to Flower, the SuperExec task poll - read by Flower itself."""
    from flwr.supercore.superexec import run_superexec

    from restwise.client import join_cli

    device = join_cli.supernode_join_env({"PATH": "/usr/bin", "RESTWISE_PASSPHRASE": "p"})
    server = D.flower_env({"PATH": "/usr/bin"})
    keys = (*D.FLOWER_SETTINGS, D.SUPEREXEC_TASK_POLL_ENV, "PATH")
    assert {k: device[k] for k in keys} == {k: server[k] for k in keys}
    assert "RESTWISE_PASSPHRASE" not in device
    assert server["FLWR_TELEMETRY_ENABLED"] == "0" and server["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    monkeypatch.setenv(D.SUPEREXEC_TASK_POLL_ENV, server[D.SUPEREXEC_TASK_POLL_ENV])
    assert run_superexec._get_task_poll_interval() == D.SUPEREXEC_TASK_POLL_S  # Flower accepts the value
    # an operator's own choice is kept
    assert D.flower_env({D.SUPEREXEC_TASK_POLL_ENV: "2.5"})[D.SUPEREXEC_TASK_POLL_ENV] == "2.5"
    assert join_cli.supernode_join_env({D.SUPEREXEC_TASK_POLL_ENV: "2.5"})[D.SUPEREXEC_TASK_POLL_ENV] == "2.5"


def test_flwr_connection_file_is_read_back_by_flower(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    conn = D.FlwrConnection(tmp_path / "home", "127.0.0.1:9093", root_cert=tmp_path / "ca.crt")
    conn.write()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    parsed = read_superlink_connection(None)  # the default connection
    assert parsed.name == "restwise" and parsed.address == "127.0.0.1:9093"
    assert parsed.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert parsed.insecure is False
    env = D.flwr_env(conn, {"PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str((tmp_path / "home").resolve())
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    with pytest.raises(D.DeploymentConfigError):
        D.FlwrConnection(tmp_path, "127.0.0.1:9093")


def test_app_dir_names_the_installed_components_and_passes_flowers_validation(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    app_dir = D.write_app_dir(tmp_path / "app")
    config, warnings = load_and_validate(app_dir / "pyproject.toml")
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "restwise.server.app:app", "clientapp": "restwise.client.app:app"}
    assert "run-dir" in config["tool"]["flwr"]["app"]["config"]
    with pytest.raises(D.DeploymentConfigError):
        D.write_app_dir(tmp_path / "bad", serverapp="no-colon")
    # the benchmark's apps come from the same template: another name and config keys
    bench = D.write_app_dir(tmp_path / "bench", name="restwise-bench-plain",
                            config={"bench-nodes": 4, "bench-result": "", "bench-wait-s": 120.0},
                            extra_files={"deployment_apps.py": "x = 1\n"})
    config, _ = load_and_validate(bench / "pyproject.toml")
    assert config["project"]["name"] == "restwise-bench-plain"
    assert config["tool"]["flwr"]["app"]["config"] == {"bench-nodes": 4, "bench-result": "", "bench-wait-s": 120.0}
    assert (bench / "deployment_apps.py").read_text() == "x = 1\n"
    for bad in ({"name": "1bad"}, {"config": {"a b": 1}}, {"config": {"k": 'say "hi"'}}):
        with pytest.raises(D.DeploymentConfigError):
            D.app_pyproject(**bad)


def test_run_outcome_needs_both_flower_and_the_run_state(tmp_path):
    from restwise.server.federation_cli import check_run_outcome

    ok = D.RunStatus(7, "finished:completed")
    failed = D.RunStatus(7, "finished:failed")
    assert not check_run_outcome(ok, tmp_path)["ok"]  # no state.json: the ServerApp never ran
    (tmp_path / "state.json").write_text(json.dumps({"status": "failed", "reason": "no round could be released"}))
    out = check_run_outcome(ok, tmp_path)
    assert not out["ok"] and "no round could be released" in out["reason"]
    (tmp_path / "state.json").write_text(json.dumps({"status": "completed", "completed_rounds": 3}))
    (tmp_path / "rounds.jsonl").write_text(
        '{"round": 1, "status": "completed"}\n{"round": 2, "status": "failed"}\n{"round": 3, "status": "released"}\n{"round": 4, "sta'
    )
    assert check_run_outcome(ok, tmp_path) == {
        "ok": True, "reason": None, "flower_run_id": 7, "flower_status": "finished:completed",
        "status": "completed", "completed_rounds": 3, "released_rounds": [1, 3], "failed_rounds": [2],
        "run_dir": str(tmp_path),
    }
    out = check_run_outcome(failed, tmp_path)
    assert not out["ok"] and out["reason"] == "Flower status finished:failed"
    assert D.run_dir_finished(tmp_path)() is True
    (tmp_path / "state.json").write_text(json.dumps({"status": "running"}))
    assert D.run_dir_finished(tmp_path)() is False


def test_stop_kills_grandchildren_started_in_new_sessions(tmp_path):
    """Flower starts its helpers detached (new sessions): stop() must still reach them."""
    import sys
    import time

    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    proc = D.start_process("tree", [sys.executable, "-c", script], tmp_path / "tree.log")
    try:
        deadline = time.monotonic() + 10
        while not proc.descendants() and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = proc.descendants()
        assert len(kids) == 1
    finally:
        proc.stop(timeout_s=2)
    assert not proc.alive()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1] == b"Z"
        except OSError:
            return True

    deadline = time.monotonic() + 5
    while not all(gone(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(k) for k in kids)


# -- CLIs ---------------------------------------------------------------------------------
@pytest.fixture
def cli():
    from restwise.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_cli_certs_makes_private_files_and_node_keys(cli, tmp_path):
    res = cli("server", "certs", "--out", str(tmp_path / "pki"), "--node", "alice", "--node", "bob")
    assert res.exit_code == 0, res.output
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "nodes/alice", "nodes/alice.pub", "nodes/bob.pub"):
        assert mode(tmp_path / "pki" / name) == 0o600
    res = cli("server", "certs", "--out", str(tmp_path / "pki"))
    assert res.exit_code == 1 and "already exists" in res.output


def test_cli_superlink_refuses_plaintext_and_prints_the_tls_command(cli, tmp_path):
    res = cli("server", "superlink", "--dry-run")
    assert res.exit_code == 2 and "without TLS" in res.output
    res = cli("server", "superlink", "--insecure", "--dry-run")
    assert res.exit_code == 2 and "needs TLS" in res.output
    res = cli("server", "superlink", "--insecure", "--no-node-auth", "--dry-run")
    assert res.exit_code == 0 and "--insecure" in res.output
    res = cli("server", "superlink", "--certs", str(tmp_path / "missing"), "--dry-run")
    assert res.exit_code == 1 and "no such file" in res.output
    cli("server", "certs", "--out", str(tmp_path / "pki"))
    res = cli("server", "superlink", "--certs", str(tmp_path / "pki"), "--port", "9555", "--dry-run")
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert "--enable-supernode-auth" in line and "--ssl-certfile" in line and "--insecure" not in line


def test_cli_register_node_rejects_a_bad_key_before_calling_flower(cli, tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAA not-a-key\n")
    res = cli("server", "register-node", str(tmp_path / "key.pub"), "--root-cert", str(tmp_path / "ca.crt"))
    assert res.exit_code == 1 and "OpenSSH public key" in res.output
    res = cli("server", "register-node", str(tmp_path / "key.pub"))
    assert res.exit_code == 2 and "--root-cert" in res.output


def test_cli_run_validates_the_run_config_before_submitting(cli, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "rounds": 0, "population": 3}))
    res = cli("server", "run", "--run-dir", str(tmp_path / "run"), "--config", str(tmp_path / "bad.json"),
              "--insecure")
    assert res.exit_code == 2 and "rounds" in res.output
    res = cli("server", "run", "--run-dir", str(tmp_path / "empty"), "--insecure")
    assert res.exit_code == 2 and "config.json" in res.output
    # The planner before submitting (issue 12): the network under DP on 8 devices is refused
    # with its numbers (exit 1, nothing written); a one-release linear head is planned and
    # allowed (it then fails only for want of a SuperLink here).
    network = {"name": "net", "rounds": 3, "population": 8, "sampling_rate": 1.0, "target_epsilon": 8.0}
    (tmp_path / "net.json").write_text(json.dumps(network))
    res = cli("server", "run", "--run-dir", str(tmp_path / "net"), "--config", str(tmp_path / "net.json"), "--insecure")
    assert res.exit_code == 1 and "noise-to-signal" in res.output and "--force" in res.output
    assert not (tmp_path / "net" / "config.json").exists()
    head = {"name": "head", "model": "linear-head", "rounds": 1, "population": 8, "sampling_rate": 1.0,
            "target_epsilon": 4.0}
    (tmp_path / "head.json").write_text(json.dumps(head))
    res = cli("server", "run", "--run-dir", str(tmp_path / "head"), "--config", str(tmp_path / "head.json"),
              "--insecure", "--superlink", "127.0.0.1:9", "--timeout", "5")
    assert "plan: linear-head: one statistics release from 8 devices" in res.output
    assert json.loads((tmp_path / "head" / "config.json").read_text())["model"] == "linear-head"


def test_device_join_refuses_plaintext_and_checks_the_store(tmp_path, fast_argon2):
    import typer

    from restwise.client.join_cli import register
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    run = lambda *a: runner.invoke(app, list(a))  # noqa: E731

    res = run("join-key", "--out", str(tmp_path / "node-key"))
    assert res.exit_code == 0, res.output
    assert mode(tmp_path / "node-key") == 0o600
    D.check_node_private_key(tmp_path / "node-key")  # the server side reads it too
    D.check_node_public_key(tmp_path / "node-key.pub")

    base = ["join", "--superlink", "127.0.0.1:9093", "--auth-key", str(tmp_path / "node-key"),
            "--store", str(tmp_path / "store")]
    res = run(*base, "--dry-run")
    assert res.exit_code == 2 and "without TLS" in res.output
    res = run(*base, "--insecure", "--dry-run")
    assert res.exit_code == 0 and "--insecure" in res.output
    assert "FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1" in res.output  # the device's Flower settings
    (tmp_path / "ca.crt").write_text("x")
    res = run(*base, "--root-cert", str(tmp_path / "ca.crt"))  # no store there
    assert res.exit_code == 4 and "no Restwise store" in res.output
    DeviceStore.create(tmp_path / "store", keystore=FileKeystore(tmp_path / "keystore")).close()
    res = run(*base, "--root-cert", str(tmp_path / "ca.crt"), "--keystore", str(tmp_path / "wrong-ks"))
    assert res.exit_code == 3, res.output  # the keystore does not open this store
    res = run(*base, "--root-cert", str(tmp_path / "ca.crt"), "--dry-run")
    assert res.exit_code == 0
    assert f'store="{(tmp_path / "store").resolve()}"' in res.output
    assert f'keystore="{(tmp_path / "keystore").resolve()}"' in res.output
    res = run("join", "--superlink", "127.0.0.1:9093", "--root-cert", str(tmp_path / "ca.crt"),
              "--store", str(tmp_path / "store"), "--dry-run")
    assert res.exit_code == 2 and "--auth-key" in res.output


def test_flower_log_is_quiet_unless_verbose(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    res = cli("server", "superlink", "--insecure", "--no-node-auth", "--dry-run")
    assert res.exit_code == 0 and res.output.startswith("FLWR_LOG_LEVEL=WARNING ")
    assert "FLWR_TELEMETRY_ENABLED=0 " in res.output and "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=" in res.output
    res = cli("server", "superlink", "--insecure", "--no-node-auth", "--dry-run", "--verbose")
    assert res.exit_code == 0 and "FLWR_LOG_LEVEL" not in res.output
    assert D.flower_log_env({"FLWR_LOG_LEVEL": "DEBUG"}) == {"FLWR_LOG_LEVEL": "DEBUG"}  # an explicit choice is kept
    assert D.flower_log_env({}, verbose=True) == {}
