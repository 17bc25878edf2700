"""`restwise device join` / `restwise device join-key`: this device joins a federation.

``join`` wraps ``flower-supernode`` with the flags that matter (see
``restwise.server.deploy`` for what Flower 1.42 does with each):

* ``--root-cert CA``: TLS, and the SuperLink's certificate must be signed by this CA (a
  device never talks to an impostor SuperLink, and nobody on the path reads the traffic).
  Plaintext only with an explicit ``--insecure``.
* ``--auth-key KEY``: the device's own EC private key (made on the device by ``join-key``;
  only the ``.pub`` half goes to the operator, who registers it). The SuperLink refuses
  nodes whose key it does not know.
* ``--store`` / ``--keystore``: passed to the ClientApp as node configuration
  (``store=... keystore=...``). They stay on the device: the server never learns the paths'
  contents nor the key. The store is test-opened before joining so a wrong keystore fails
  here, with a clear message, not in the middle of a round.

How the ClientApp processes (one per Flower message) get the store's key:

* the store has a keystore slot (`restwise device keystore add`) whose keystore is here:
  they unwrap the key from it themselves; ``join`` then becomes ``flower-supernode`` (exec);
* otherwise (the passphrase store `restwise device init` made): ``join`` asks for the
  passphrase once (prompt, ``--passphrase-file``), unwraps the key, and stays the parent of
  the SuperNode as its key agent (:mod:`restwise.client.key_agent`): the key lives in this
  process's memory only and is handed over a private Unix socket to the SuperNode's own
  ClientApp processes. Nothing is written to disk; stopping ``join`` stops the SuperNode.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from restwise.client import cli_support as device_cli
from restwise.client.errors import KeystoreNotFoundError, RestwiseDeviceError, StoreNotFoundError
from restwise.client.key_agent import KeyAgent, agent_supported
from restwise.client.keys import read_keyslots
from restwise.client.store import DeviceStore
from restwise.client.unlock import open_with_keystore
from restwise.common.cli_errors import exit_with
from restwise.common.exit_codes import ExitCode
from restwise.common.fsutil import atomic_write_bytes


# The device side never imports the server package (ARCHITECTURE.md), so the few lines that
# build Flower's command and key format are here too; tests/test_deployment.py checks they
# agree with restwise.server.deploy.


class JoinConfigError(RestwiseDeviceError, ValueError):
    """Bad or unsafe `restwise device join` options."""


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o600)


def make_join_key(private_path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """EC P-384 key pair in the OpenSSH formats Flower reads: PATH (private, 0600), PATH.pub."""
    public_path = private_path.with_name(private_path.name + ".pub")
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise JoinConfigError(f"{path} already exists (pass --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_secret(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    _write_secret(public_path, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path


def check_join_key(path: Path) -> None:

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise JoinConfigError(f"{path}: cannot read the key ({exc.strerror})") from None
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise JoinConfigError(f"{path}: not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinConfigError(f"{path}: not an EC private key (make one with `restwise device join-key`)")


# Flower's settings for the SuperNode and what it starts (its SuperExec, the ClientApps): the
# same as restwise.server.deploy.FLOWER_SETTINGS / flower_env (tests/test_deployment.py checks).
# No runtime `uv sync`; no telemetry events or update checks sent to Flower from the device;
# the SuperExec looks for a message to run every 0.25 s instead of 1 s (about 2 % of a core
# while idle; an FLWR_SUPEREXEC_TASK_POLL_INTERVAL the person set is kept).
FLOWER_SETTINGS = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
SUPEREXEC_TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_TASK_POLL_S = 0.25


def supernode_join_env(base: dict[str, str]) -> dict[str, str]:
    """The SuperNode's environment: ``base`` with the Flower settings, this interpreter's bin
    folder first on PATH, and never the store's passphrase."""
    env = dict(base)
    env.update(FLOWER_SETTINGS)
    env.setdefault(SUPEREXEC_TASK_POLL_ENV, str(SUPEREXEC_TASK_POLL_S))
    env["PATH"] = _venv_path(env.get("PATH", ""))
    env.pop("RESTWISE_PASSPHRASE", None)  # never handed on to the SuperNode and its apps
    return env


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _venv_path(path: str) -> str:
    here = str(Path(sys.executable).parent)
    return os.pathsep.join([here, *[p for p in path.split(os.pathsep) if p and p != here]])


def _quoted(value: str) -> str:
    if any(c in value for c in "'\"\\\n\r"):  # read by Flower as TOML basic strings
        raise JoinConfigError("store and keystore paths must not contain quotes, backslashes or newlines")
    return f'"{value}"'


def supernode_join_command(
    superlink: str,
    *,
    root_cert: Path | None,
    auth_key: Path,
    insecure: bool,
    store: Path,
    keystore: Path,
    runtime_port: int = 9094,
    max_wait_s: float | None = None,
    key_agent: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command for this device (same as deploy.supernode_command;
    ``key_agent``: the socket of this join's key agent, for the ClientApp)."""
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JoinConfigError(f"--superlink: expected HOST:PORT, got {superlink!r}")
    if insecure and root_cert is not None:
        raise JoinConfigError("--insecure and --root-cert are contradictory: choose one")
    if not insecure and root_cert is None:
        raise JoinConfigError(
            "refusing to connect without TLS: give the CA certificate that signed the "
            "SuperLink's certificate (--root-cert), or pass --insecure explicitly"
        )
    cmd = [_bin("flower-supernode"), "--superlink", superlink]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(root_cert)]
    cmd += ["--auth-supernode-private-key", str(auth_key)]
    cmd += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(runtime_port)]
    node_config = f"store={_quoted(str(store))} keystore={_quoted(str(keystore))}"
    if key_agent is not None:
        node_config += f" key-agent={_quoted(str(key_agent))}"
    cmd += ["--node-config", node_config]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(float(max_wait_s))]
    return cmd


def keystore_opens(store: Path, keystore: Path, *, passphrase_given: bool) -> bool:
    """Will the ClientApp open the store through its keystore slot? Test-opens it (a wrong or
    missing keystore fails here, named as such). False when the store has no keystore slot,
    or the passphrase was given explicitly, or the keystore is missing but a passphrase slot
    can be used instead (the person is told)."""
    if not DeviceStore.exists(store):
        raise StoreNotFoundError()
    slots = read_keyslots(store)
    if not slots.keystore_providers():
        return False
    if passphrase_given and slots.has_kind("passphrase"):
        return False
    try:
        open_with_keystore(store, keystore).close()
    except KeystoreNotFoundError as exc:
        if not slots.has_kind("passphrase"):
            raise
        typer.secho(f"Note: {exc}; unlocking with the passphrase for this join instead",
                    fg=typer.colors.YELLOW, err=True)
        return False
    return True


def unlock_once(store: Path, passphrase: str) -> tuple[bytes, str]:
    """The store's data key and id, from the passphrase (a wrong one: exit 3, here). The
    store is opened once first so an interrupted rekey is completed or rolled back."""
    DeviceStore.open(store, passphrase).close()
    slots = read_keyslots(store)
    return slots.unwrap(passphrase), slots.store_id


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """PR_SET_PDEATHSIG: the SuperNode gets SIGTERM when the join (its key agent) dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def run_with_key_agent(cmd: list[str], env: dict, agent: KeyAgent) -> int:
    """Run the SuperNode as a child, serve the key to its descendants, forward SIGINT/SIGTERM/
    SIGHUP to it, and return its exit code. The key is wiped when the SuperNode ends."""
    child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    forwarded = {}

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        forwarded[sig] = signal.signal(sig, forward)
    try:
        agent.serve_descendants_of(child.pid)
        return child.wait()
    finally:
        agent.close()
        for sig, old in forwarded.items():
            signal.signal(sig, old)


def register(app: typer.Typer) -> None:
    @app.command("join-key")
    def join_key(
        out: Path = typer.Option(
            Path("~/.restwise/node-key"), "--out",
            help="Where to write the private key; the public key goes to OUT.pub (send that one to the operator).",
        ),
        force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
    ) -> None:
        """Make this device's SuperNode authentication key pair (EC P-384, files 0600)."""
        try:
            private, public = make_join_key(Path(out).expanduser(), overwrite=force)
        except JoinConfigError as exc:
            raise exit_with(exc) from None
        typer.echo(f"private key {private} (stays on this device)")
        typer.echo(f"public key  {public} (send to the operator: `restwise server register-node`)")

    @app.command("join")
    def join(
        superlink: str = typer.Option(..., "--superlink", help="The SuperLink's address HOST:PORT."),
        root_cert: Optional[Path] = typer.Option(
            None, "--root-cert", help="The CA certificate that signed the SuperLink's certificate (from the operator)."
        ),
        auth_key: Optional[Path] = typer.Option(
            None, "--auth-key", help="This device's private key (made with `restwise device join-key`)."
        ),
        store: Optional[Path] = typer.Option(None, "--store", "-s", help="Your encrypted store (default: RESTWISE_STORE or ~/.restwise/store)."),
        keystore: Optional[Path] = typer.Option(
            None, "--keystore", help="Folder of the file keystore that opens the store, if it has one (default: STORE/../keystore)."
        ),
        passphrase_file: Optional[Path] = typer.Option(
            None, "--passphrase-file", help="A store without a keystore slot is unlocked once, here: read the "
            "passphrase from the first line of this file (or RESTWISE_PASSPHRASE_FILE) instead of asking.",
        ),
        insecure: bool = typer.Option(
            False, "--insecure", help="Connect WITHOUT TLS: anyone on the path reads and alters the traffic. Loopback trials only."
        ),
        runtime_port: int = typer.Option(
            9094, "--runtime-port", min=1, max=65535,
            help="Local port for the SuperNode's own runtime API (one per SuperNode on a machine).",
        ),
        max_wait: Optional[float] = typer.Option(
            None, "--max-wait", min=1.0, help="Give up after this many seconds without reaching the SuperLink."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the flower-supernode command instead of running it."),
    ) -> None:
        """Join a federation: run a SuperNode that trains on your store when a run asks.
        A store with a keystore slot opens by itself; the passphrase store `device init` made
        is unlocked once, here, and its key kept in memory for as long as the join runs."""
        store_path = device_cli.resolve_store(store).resolve()
        keystore_path = device_cli.resolve_keystore(keystore, store_path).resolve()
        try:
            if auth_key is None:
                raise JoinConfigError(
                    "give this device's key (--auth-key; make one with `restwise device join-key`): "
                    "the SuperLink only accepts registered nodes"
                )
            root = Path(root_cert).expanduser().resolve() if root_cert else None
            key = Path(auth_key).expanduser().resolve()
            cmd = supernode_join_command(
                superlink, root_cert=root, auth_key=key, insecure=insecure, store=store_path,
                keystore=keystore_path, runtime_port=runtime_port, max_wait_s=max_wait,
            )
        except JoinConfigError as exc:
            raise exit_with(exc, code=ExitCode.USAGE) from None
        if dry_run:
            env = supernode_join_env(dict(os.environ))
            settings = [f"{k}={env[k]}" for k in (*FLOWER_SETTINGS, SUPEREXEC_TASK_POLL_ENV)]
            typer.echo(" ".join(settings + cmd))
            return
        agent = None
        try:
            if root is not None and not root.is_file():
                raise JoinConfigError(f"{root}: no such file (the CA certificate from the operator)")
            check_join_key(key)
            given = device_cli.passphrase_given(passphrase_file)
            if not keystore_opens(store_path, keystore_path, passphrase_given=given):
                problem = agent_supported()
                if problem is not None:
                    raise KeystoreNotFoundError(problem)
                data_key, store_id = unlock_once(store_path, device_cli.read_passphrase(passphrase_file))
                agent = KeyAgent(data_key, store_id)
                del data_key
                cmd = supernode_join_command(
                    superlink, root_cert=root, auth_key=key, insecure=insecure, store=store_path,
                    keystore=keystore_path, runtime_port=runtime_port, max_wait_s=max_wait,
                    key_agent=agent.path,
                )
        except RestwiseDeviceError as exc:
            raise exit_with(exc) from None
        env = supernode_join_env(dict(os.environ))
        if agent is None:
            os.execvpe(cmd[0], cmd, env)  # the SuperNode replaces this process
        typer.echo("Store unlocked for this join: its key stays in this process's memory (key agent); "
                   "stop the join (Ctrl-C) to stop the SuperNode and forget the key.", err=True)
        raise typer.Exit(code=run_with_key_agent(cmd, env, agent))
