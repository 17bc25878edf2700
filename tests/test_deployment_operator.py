"""What an operator sees of a real SuperLink (TLS and node auth, on 127.0.0.1): node names
given at `register-node` kept and shown by `server nodes`, and no Flower INFO lines in the
terminal unless --verbose (the SuperLink's own output included)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from restwise.server import deploy as D

pytestmark = pytest.mark.slow

RESTWISE = [sys.executable, "-m", "restwise.cli"]


def restwise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RESTWISE, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    root = tmp_path_factory.mktemp("superlink")
    restwise("server", "certs", "--out", str(root / "pki"), "--node", "alice", "--node", "bob")
    port = D.free_port()
    proc = D.start_process("superlink", [*RESTWISE, "server", "superlink", "--certs", str(root / "pki"), "--port", str(port)],
                           root / "superlink.log")
    try:
        D.wait_for_port("127.0.0.1", port, timeout_s=60, process=proc)
        yield root, port, proc
    finally:
        proc.stop(timeout_s=5)


def test_node_names_are_kept_and_shown_and_flower_stays_quiet(superlink):
    root, port, proc = superlink
    link = ["--superlink", f"127.0.0.1:{port}", "--root-cert", str(root / "pki" / "ca.crt")]
    named = restwise("server", "register-node", str(root / "pki" / "nodes" / "alice.pub"), *link, "--name", "alice phone")
    assert named.returncode == 0, named.stderr
    alice = re.fullmatch(r"registered SuperNode (\d+) \(alice phone\)\n", named.stdout).group(1)
    assert named.stderr == ""  # nothing of Flower's without --verbose
    verbose = restwise("server", "register-node", str(root / "pki" / "nodes" / "bob.pub"), *link, "--verbose")
    assert verbose.returncode == 0 and "\"node-id\"" in verbose.stderr  # what `flwr` answered, asked for
    bob = re.search(r"registered SuperNode (\d+)", verbose.stdout).group(1)

    shown = restwise("server", "nodes", *link)
    assert shown.returncode == 0 and shown.stderr == ""
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()[1:]}
    assert re.match(rf"{alice}\s+alice phone\s+registered\s", rows[alice])
    assert re.match(rf"{bob}\s+—\s+registered\s", rows[bob])
    nodes = {n["node-id"]: n for n in D.list_nodes(D.FlwrConnection(root / "home", f"127.0.0.1:{port}", root_cert=root / "pki" / "ca.crt"))}
    assert (nodes[alice]["name"], nodes[bob]["name"]) == ("alice phone", None)
    assert nodes[alice]["status"] == "registered" and nodes[alice]["registered-at"]

    # The SuperLink ran without --verbose: its own line, Flower's warnings, no INFO stream.
    log = proc.log_text()
    assert log.startswith(f"SuperLink on 127.0.0.1:{port} (TLS, SuperNode authentication); Ctrl-C stops it.")
    assert "INFO" not in log, log[:3000]
