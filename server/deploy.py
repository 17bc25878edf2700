"""Deployment plumbing: a SuperLink and SuperNodes as real processes, with TLS and node auth.

What Flower 1.42 actually does (read from its source and measured here, not assumed):

* One SuperLink port serves everything: the Fleet API (SuperNodes), the Control API (`flwr`
  CLI: runs, node registration) and the Runtime API (the ServerApp process) are all
  protobuf-over-HTTP (FastAPI/uvicorn) on ``--host``/``--port`` (default 127.0.0.1:8000).
  The old gRPC ports 9091/9092/9093 are not opened unless internal env flags ask for them.
  TLS is uvicorn's: ``--ssl-certfile``/``--ssl-keyfile`` (plus ``--ssl-ca-certfile``, which
  the SuperLink's own SuperExec uses to verify the Runtime API).
* SuperNode authentication: ``flower-superlink --enable-supernode-auth`` (refused by Flower
  together with ``--insecure``); each node's *public* key (OpenSSH format, NIST EC curve) is
  registered through the Control API (``flwr supernode register KEY.pub CONNECTION``); the
  SuperNode signs its requests with the *private* key (OpenSSH PEM) given by
  ``--auth-supernode-private-key``. An unregistered key is refused at ``RegisterNode``.
* A SuperNode opens its own Runtime HTTP API (``--port``, default 9094) for the ClientApp
  process it spawns: several SuperNodes on one host each need their own port.
* The ``flwr`` CLI reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink.NAME] address/root-certificates/insecure``), and ``flwr run APP_DIR`` runs a
  config migration that may rewrite ``APP_DIR/pyproject.toml``. So Restwise never points
  ``flwr`` at the repository: :func:`write_app_dir` writes a throw-away app directory whose
  ``pyproject.toml`` only names the installed components (``restwise.server.app:app``,
  ``restwise.client.app:app``), and :func:`flwr_env` gives every ``flwr`` call a private
  ``FLWR_HOME``.
* ``flwr run`` exits 0 once the run is *submitted*, whatever happens to it later; the run's
  fate is read back with ``flwr list --run-id N --format json`` (:func:`wait_for_run`).
* Runtime dependency installation (``uv sync`` of the app's dependencies for every run) is
  switched off (``--disable-runtime-dependency-installation`` on the SuperLink,
  ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` in every environment): Restwise and its
  pinned dependencies are already installed on the machine.
* Flower's console log level comes from ``FLWR_LOG_LEVEL`` (``flwr/supercore/logger.py``; it
  also sets the level of the SuperLink's uvicorn). :func:`flower_log_env` sets ``WARNING``
  unless the operator asks for ``--verbose``: warnings and errors still show, the INFO
  stream does not (``--log-file`` keeps everything).
* ``flwr supernode register --name`` stores the name with the node, and the Control API's
  ``ListNodes`` returns it (``NodeInfo.name``), but ``flwr supernode list --format json``
  leaves it out. :func:`list_nodes` therefore asks the Control API itself, through Flower's
  own client, in a child process with the private ``FLWR_HOME``.

Everything here is plain functions over explicit, frozen configuration objects; the CLIs
(``restwise server ...``, ``restwise device join``) and the tests call them.

Errors: the ``DeploymentError`` branch of the one error tree (``server/errors.py``; a
``RuntimeError`` too) - DeploymentConfigError, CertificateError, FlowerCommandError,
ProcessStartError, RunFailedError.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from restwise.common.fsutil import atomic_write_bytes
from restwise.server.errors import (
    CertificateError,
    DeploymentConfigError,
    DeploymentError,
    FlowerCommandError,
    ProcessStartError,
    RunFailedError,
)
from restwise.server.runstatus import TERMINAL_STATUSES
# --------------------------------------------------------------------------------------------
# Certificates and keys (cryptography only)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEFAULT_SANS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """The files of a trial PKI: a local CA and the SuperLink's server certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: Path | None = None  # only for a trial PKI made here; never needed to run

    @classmethod
    def in_dir(cls, folder: Path) -> "TlsFiles":
        folder = Path(folder)
        return cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY, ca_key=folder / CA_KEY)

    def check(self) -> None:
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise CertificateError(path, "no such file (make trial certificates with `restwise server certs`)")


@dataclass(frozen=True)
class NodeKeyFiles:
    """One SuperNode's authentication key pair (EC P-384, OpenSSH formats, as Flower wants)."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file created 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Public material (certificates, public keys): also 0600, a trial PKI has no other readers."""
    _write_private(path, data)


def make_trial_pki(
    folder: Path,
    *,
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 30,
    overwrite: bool = False,
) -> TlsFiles:
    """A local CA (EC P-384) and a SuperLink server certificate signed by it.

    ``sans``: the names/addresses the SuperNodes will dial (IP addresses become IP SANs).
    For trials only: the CA key sits next to the certificates (0600). Refuses to overwrite
    existing files unless ``overwrite``."""
    if days < 1 or days > 825:
        raise DeploymentConfigError(f"certificate lifetime must be 1..825 days, got {days}")
    if not sans:
        raise DeploymentConfigError("give at least one subject alternative name (e.g. 127.0.0.1)")
    files = TlsFiles.in_dir(Path(folder))
    if not overwrite:
        for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key):
            if path.exists():
                raise CertificateError(path, "already exists (pass overwrite to replace the trial PKI)")

    alt_names: list[x509.GeneralName] = []
    for name in sans:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name):
                raise DeploymentConfigError(f"not a host name or IP address: {name!r}") from None
            alt_names.append(x509.DNSName(name))

    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(minutes=5)
    not_after = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Restwise trial CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write_public(files.ca_cert, ca_cert.public_bytes(pem))
    _write_private(files.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    _write_public(files.server_cert, server_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(pem, pkcs8, none))
    return files


def make_node_keys(folder: Path, name: str, *, overwrite: bool = False) -> NodeKeyFiles:
    """An EC P-384 key pair for SuperNode authentication: ``NAME`` (OpenSSH private key, 0600)
    and ``NAME.pub`` (OpenSSH public key, the one an operator registers)."""
    if not name or "/" in name or name.startswith("."):
        raise DeploymentConfigError(f"not a usable key name: {name!r}")
    files = NodeKeyFiles(Path(folder) / name, Path(folder) / f"{name}.pub")
    if not overwrite:
        for path in (files.private_key, files.public_key):
            if path.exists():
                raise CertificateError(path, "already exists")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    _write_public(
        files.public_key,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n",
    )
    return files


def check_node_public_key(path: Path) -> None:
    """Refuse anything Flower would refuse, before calling it: an OpenSSH NIST-curve EC key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(path, f"cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(path, "not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(path, "not an EC public key (SuperNode keys are EC P-256/384/521)")


def check_node_private_key(path: Path) -> None:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(path, f"cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise CertificateError(path, "not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(path, "not an EC private key")


# --------------------------------------------------------------------------------------------
# Command lines


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (tests: bind nothing to fixed ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """The Flower entry point next to this interpreter (the venv's), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def venv_path(path: str) -> str:
    """PATH with this interpreter's bin folder first: the SuperLink and SuperNode start
    `flower-superexec` and `flwr-serverapp`/`flwr-clientapp` by bare name."""
    here = str(Path(sys.executable).parent)
    parts = [p for p in path.split(os.pathsep) if p and p != here]
    return os.pathsep.join([here, *parts])


def _check_hostport(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentConfigError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class SuperLinkConfig:
    """How to start a SuperLink. ``tls`` None means plaintext, allowed only with ``insecure``."""

    host: str = "127.0.0.1"
    port: int = 9093
    tls: TlsFiles | None = None
    insecure: bool = False
    node_auth: bool = True
    database: Path | None = None  # None: in memory (state is lost when the SuperLink stops)
    log_file: Path | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise DeploymentConfigError(f"port must be 1..65535, got {self.port}")
        if self.tls is None and not self.insecure:
            raise DeploymentConfigError(
                "refusing to start a SuperLink without TLS: give certificates "
                "(make trial ones with `restwise server certs`) or pass --insecure explicitly"
            )
        if self.tls is not None and self.insecure:
            raise DeploymentConfigError("--insecure and TLS certificates are contradictory: choose one")
        if self.insecure and self.node_auth:
            raise DeploymentConfigError(
                "SuperNode authentication needs TLS (Flower refuses it in --insecure mode); "
                "pass --no-node-auth together with --insecure"
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def superlink_command(cfg: SuperLinkConfig) -> list[str]:
    """The exact ``flower-superlink`` command line for ``cfg``."""
    cmd = [_bin("flower-superlink"), "--host", cfg.host, "--port", str(cfg.port)]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        assert cfg.tls is not None
        cmd += [
            "--ssl-ca-certfile", str(cfg.tls.ca_cert),
            "--ssl-certfile", str(cfg.tls.server_cert),
            "--ssl-keyfile", str(cfg.tls.server_key),
        ]
    if cfg.node_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    if cfg.database is not None:
        cmd += ["--database", str(cfg.database)]
    if cfg.log_file is not None:
        cmd += ["--log-file", str(cfg.log_file)]
    return cmd


def _node_config_value(value: object) -> str:
    """One ``--node-config`` value as Flower parses it (TOML-ish): strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    # Flower reads the values as TOML basic strings: quotes, backslashes (escapes) and
    # newlines would change what the ClientApp sees, so they are refused, not escaped.
    if any(c in text for c in ("'", '"', "\\", "\n", "\r")):
        raise DeploymentConfigError("node config values must not contain quotes, backslashes or newlines")
    return f'"{text}"'


def node_config_arg(values: Mapping[str, object]) -> str:
    """``{"store": "/p", "keystore": "/k"}`` -> ``store="/p" keystore="/k"``."""
    parts = []
    for key, value in values.items():
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise DeploymentConfigError(f"not a node config key: {key!r}")
        parts.append(f"{key}={_node_config_value(value)}")
    return " ".join(parts)


@dataclass(frozen=True)
class SuperNodeConfig:
    """How to start one SuperNode (one device)."""

    superlink: str  # HOST:PORT of the SuperLink
    root_cert: Path | None = None
    auth_key: Path | None = None  # the node's OpenSSH EC private key
    insecure: bool = False
    node_config: Mapping[str, object] = field(default_factory=dict)
    runtime_port: int = 9094  # this SuperNode's own Runtime HTTP API (one per node on a host)
    max_retries: int | None = None
    max_wait_time_s: float | None = None

    def __post_init__(self) -> None:
        _check_hostport(self.superlink)
        if not 0 < self.runtime_port < 65536:
            raise DeploymentConfigError(f"runtime port must be 1..65535, got {self.runtime_port}")
        if self.insecure and self.root_cert is not None:
            raise DeploymentConfigError("--insecure and --root-cert are contradictory: choose one")
        if not self.insecure and self.root_cert is None:
            raise DeploymentConfigError(
                "refusing to connect without TLS: give the CA certificate that signed the "
                "SuperLink's certificate (--root-cert), or pass --insecure explicitly"
            )


def supernode_command(cfg: SuperNodeConfig) -> list[str]:
    """The exact ``flower-supernode`` command line for ``cfg``."""
    cmd = [_bin("flower-supernode"), "--superlink", cfg.superlink]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(cfg.root_cert)]
    if cfg.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(cfg.auth_key)]
    cmd += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(cfg.runtime_port)]
    if cfg.node_config:
        cmd += ["--node-config", node_config_arg(cfg.node_config)]
    if cfg.max_retries is not None:
        cmd += ["--max-retries", str(int(cfg.max_retries))]
    if cfg.max_wait_time_s is not None:
        cmd += ["--max-wait-time", str(float(cfg.max_wait_time_s))]
    return cmd


# --------------------------------------------------------------------------------------------
# The `flwr` CLI: a private FLWR_HOME with one named connection


@dataclass(frozen=True)
class FlwrConnection:
    """A SuperLink as the ``flwr`` CLI sees it, written into ``flwr_home/config.toml``."""

    flwr_home: Path
    address: str
    root_cert: Path | None = None
    insecure: bool = False
    name: str = "restwise"
    verbose: bool = False  # show what each `flwr` command printed (Flower's log) on stderr

    def __post_init__(self) -> None:
        _check_hostport(self.address)
        if not self.insecure and self.root_cert is None:
            raise DeploymentConfigError("give the CA certificate (--root-cert) or pass --insecure explicitly")
        if self.insecure and self.root_cert is not None:
            raise DeploymentConfigError("--insecure and --root-cert are contradictory: choose one")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise DeploymentConfigError(f"not a connection name: {self.name!r}")

    def write(self) -> Path:
        """(Re)write ``config.toml``; returns its path."""
        home = Path(self.flwr_home)
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.name}"', "", f"[superlink.{self.name}]", f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{Path(self.root_cert).resolve()}"')
        path = home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


FLOWER_QUIET_LEVEL = "WARNING"


def flower_log_env(env: Mapping[str, str], *, verbose: bool = False) -> dict[str, str]:
    """``env`` with Flower's console log at WARNING unless ``verbose`` (an ``FLWR_LOG_LEVEL``
    the operator set explicitly is kept)."""
    out = dict(env)
    if not verbose:
        out.setdefault("FLWR_LOG_LEVEL", FLOWER_QUIET_LEVEL)
    return out


# Flower's settings for every Flower process Restwise starts (SuperLink, SuperNode, `flwr`),
# inherited by the processes those start (SuperExec, ServerApp, ClientApp). Read from
# Flower 1.42's source; see docs/deployment.md "Flower settings and round time".
FLOWER_SETTINGS: Mapping[str, str] = {
    # Restwise and its pinned dependencies are installed: no `uv sync` of a submitted app.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # No usage events to Flower's telemetry server from any process (each one, ClientApps
    # included, posts one when it starts and waits up to 4 s for it at exit), and no update
    # check: a device or a SuperLink contacts nobody but the federation.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# How often the SuperExec (of a SuperNode: ClientApps; of the SuperLink: ServerApps) asks its
# Runtime API for a task to start, in seconds. Flower's default, 1.0 s, is paid on every
# message a device receives (a fresh ClientApp process each; a stage waits for the slowest of
# its devices: about 0.8 s of 1.0 with four). 0.25 s cuts that to about 0.2 s for about 2 % of
# a core per idle SuperNode (measured: 0.1 s costs 5 %, 1.0 s under 1 %). An
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL set by the operator is kept.
SUPEREXEC_TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_TASK_POLL_S = 0.25


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with Restwise's Flower settings
    (:data:`FLOWER_SETTINGS`, the SuperExec task poll) and this interpreter's bin folder
    first on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_SETTINGS)
    env.setdefault(SUPEREXEC_TASK_POLL_ENV, str(SUPEREXEC_TASK_POLL_S))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PATH"] = venv_path(env.get("PATH", ""))
    return env


def flwr_env(conn: FlwrConnection, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = flower_env(base)
    env["FLWR_HOME"] = str(Path(conn.flwr_home).resolve())
    # Rich tables must not wrap JSON output.
    env["COLUMNS"] = "200"
    return env


def _flwr(conn: FlwrConnection, args: Sequence[str], *, timeout_s: float = 60.0, cwd: Path | None = None) -> str:
    conn.write()
    cmd = [_bin("flwr"), *args]
    try:
        proc = subprocess.run(
            cmd, env=flwr_env(conn), capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        raise FlowerCommandError(args[0], -1, f"no answer within {timeout_s:.0f} s") from None
    _echo(conn, proc)
    if proc.returncode != 0:
        detail = _json_error(proc.stdout) or (proc.stderr.strip().splitlines() or [""])[-1]
        raise FlowerCommandError(" ".join(args[:2]), proc.returncode, detail[:500])
    return proc.stdout


def _echo(conn: FlwrConnection, proc: subprocess.CompletedProcess) -> None:
    """With ``conn.verbose``, what a Flower command printed goes to stderr (otherwise it is
    only read: its INFO lines are not the operator's business)."""
    if conn.verbose:
        for text in (proc.stderr, proc.stdout):
            if text:
                sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()


def _json_error(stdout: str) -> str:
    try:
        data = json.loads(_last_json(stdout))
    except (ValueError, TypeError):
        return ""
    return str(data.get("error-message") or data.get("error") or "") if isinstance(data, dict) else ""


def _last_json(stdout: str) -> str:
    """The JSON object ``flwr ... --format json`` prints (after any banner lines)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return stdout[start:]


def _flwr_json(conn: FlwrConnection, args: Sequence[str], **kw) -> dict:
    out = _flwr(conn, [*args, "--format", "json"], **kw)
    try:
        data = json.loads(_last_json(out))
    except ValueError:
        raise FlowerCommandError(" ".join(args[:2]), 0, "unreadable JSON output") from None
    if isinstance(data, dict) and data.get("success") is False:
        raise FlowerCommandError(" ".join(args[:2]), 1, str(data.get("error-message", "")))
    return data


def register_node(conn: FlwrConnection, public_key: Path, *, name: str | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink; returns Flower's node id."""
    check_node_public_key(public_key)
    args = ["supernode", "register", str(Path(public_key).resolve()), conn.name]
    if name:
        args += ["--name", name]
    data = _flwr_json(conn, args)
    return int(data["node-id"])


# Run in a child process with the connection's FLWR_HOME (Flower's client reads its
# connection, TLS root and account plugin from there): the Control API's ListNodes answer,
# with the fields `flwr supernode list --format json` leaves out (the node's name).
_LIST_NODES = """\
import json, sys
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest

client = init_http_client_from_connection(read_superlink_connection(sys.argv[1]))
try:
    answer = client.ListNodes(ListNodesRequest())
finally:
    client.close()

def opt(node, name):
    return getattr(node, name) if node.HasField(name) else None

print(json.dumps([
    {"node-id": str(n.node_id), "name": opt(n, "name"), "status": n.status, "registered-at": n.registered_at or None,
     "online-at": opt(n, "last_activated_at"), "offline-at": opt(n, "last_deactivated_at"),
     "unregistered-at": opt(n, "unregistered_at")}
    for n in sorted(answer.nodes_info, key=lambda n: n.registered_at)
]))
"""


def list_nodes(conn: FlwrConnection, *, timeout_s: float = 60.0) -> list[dict]:
    """The SuperLink's registered SuperNodes: ``node-id`` (a string: ids are unsigned 64-bit),
    ``name`` (given at registration, or None), ``status`` (registered, online, offline,
    unregistered) and when each of those began (ISO-8601, or None)."""
    conn.write()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LIST_NODES, conn.name], env=flwr_env(conn), capture_output=True, text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise FlowerCommandError("supernode list", -1, f"no answer within {timeout_s:.0f} s") from None
    _echo(conn, proc)
    if proc.returncode != 0:
        raise FlowerCommandError("supernode list", proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1][:500])
    try:
        nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise FlowerCommandError("supernode list", 0, "unreadable answer") from None
    return list(nodes)


APP_PYPROJECT = """\
# Written by restwise.server.deploy: a throw-away Flower app directory. `flwr run` may rewrite
# this file (config migration), which is why it is never the repository's pyproject.toml.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "0.1.0"
description = "{description}"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "restwise"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}"""

RESTWISE_SERVERAPP = "restwise.server.app:app"
RESTWISE_CLIENTAPP = "restwise.client.app:app"
RESTWISE_APP_NAME = "restwise-federation"
RESTWISE_APP_DESCRIPTION = "Restwise federated training (components come from the installed package)"
RESTWISE_APP_CONFIG: Mapping[str, object] = {"run-dir": ""}


def app_pyproject(
    *,
    name: str = RESTWISE_APP_NAME,
    description: str = RESTWISE_APP_DESCRIPTION,
    serverapp: str = RESTWISE_SERVERAPP,
    clientapp: str = RESTWISE_CLIENTAPP,
    config: Mapping[str, object] = RESTWISE_APP_CONFIG,
) -> str:
    """The ``pyproject.toml`` of a Flower app directory: its name, the installed components it
    runs (``module:attr``) and its run-config keys with their defaults (TOML values as
    ``--node-config`` writes them: strings quoted, numbers and booleans bare)."""
    if not name or not all(c.isalnum() or c == "-" for c in name) or not name[0].isalpha():
        raise DeploymentConfigError(f"not a Flower app name (letters, digits and '-'): {name!r}")
    if any(c in description for c in ('"', "\\", "\n", "\r")):
        raise DeploymentConfigError("an app description must not contain quotes, backslashes or newlines")
    for ref in (serverapp, clientapp):
        module, sep, attr = ref.partition(":")
        if not sep or not module or not attr:
            raise DeploymentConfigError(f"expected module:attribute, got {ref!r}")
    lines = []
    for key, value in config.items():
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise DeploymentConfigError(f"not a run config key: {key!r}")
        lines.append(f"{key} = {_node_config_value(value)}\n")
    return APP_PYPROJECT.format(name=name, description=description, serverapp=serverapp, clientapp=clientapp,
                                config="".join(lines))


def write_app_dir(
    folder: Path,
    *,
    name: str = RESTWISE_APP_NAME,
    description: str = RESTWISE_APP_DESCRIPTION,
    serverapp: str = RESTWISE_SERVERAPP,
    clientapp: str = RESTWISE_CLIENTAPP,
    config: Mapping[str, object] = RESTWISE_APP_CONFIG,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """A minimal Flower app directory (:func:`app_pyproject`) naming installed components
    (``module:attr``), plus ``extra_files`` (relative path -> text) shipped in its FAB."""
    text = app_pyproject(name=name, description=description, serverapp=serverapp, clientapp=clientapp, config=config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(text, encoding="utf-8")
    for rel, content in (extra_files or {}).items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    return folder


def _run_config_arg(values: Mapping[str, object]) -> str:
    return " ".join(f"{k}={_node_config_value(v)}" for k, v in values.items())


def submit_run(conn: FlwrConnection, app_dir: Path, run_config: Mapping[str, object] | None = None) -> int:
    """``flwr run APP_DIR CONNECTION`` -> the run id (the run is only *submitted*)."""
    args = ["run", str(Path(app_dir).resolve()), conn.name]
    if run_config:
        args += ["--run-config", _run_config_arg(run_config)]
    data = _flwr_json(conn, args, timeout_s=120.0)
    run_id = data.get("run-id")
    if run_id in (None, ""):
        raise FlowerCommandError("run", 0, "no run id in the answer")
    return int(run_id)


@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str  # Flower's "status:sub-status", e.g. "finished:completed"
    raw: Mapping[str, object] = field(default_factory=dict, compare=False)

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"  # Flower: finished:{completed,failed,stopped}


def run_status(conn: FlwrConnection, run_id: int) -> RunStatus:
    data = _flwr_json(conn, ["list", conn.name, "--run-id", str(int(run_id))])
    runs = data.get("runs") or []
    for run in runs:
        if int(run.get("run-id", -1)) == int(run_id):
            return RunStatus(int(run_id), str(run.get("status", "")), run)
    raise FlowerCommandError("list", 0, f"run {run_id} not in the SuperLink's answer")


def wait_for_run(
    conn: FlwrConnection,
    run_id: int,
    *,
    timeout_s: float = 600.0,
    poll_s: float = 10.0,
    wake: Callable[[], bool] | None = None,
    on_poll: Callable[[], None] | None = None,
) -> RunStatus:
    """Wait until the run is finished (any outcome) or ``timeout_s``; returns the final status.

    Each status check starts a ``flwr`` process (about a CPU-second), so it polls every
    ``poll_s`` only, and sooner when ``wake()`` says the run has probably ended (e.g. the
    run folder's state.json turned terminal). ``on_poll()`` is called about four times a
    second while waiting (progress display)."""
    deadline = time.monotonic() + timeout_s
    status = run_status(conn, run_id)
    next_check = time.monotonic() + poll_s
    while not status.finished:
        if on_poll is not None:
            on_poll()
        now = time.monotonic()
        if now > deadline:
            raise RunFailedError(run_id, status.status, f"still not finished after {timeout_s:.0f} s")
        if now >= next_check or (wake is not None and wake()):
            status = run_status(conn, run_id)
            next_check = time.monotonic() + poll_s
            if wake is not None and wake() and not status.finished:
                time.sleep(1.0)  # the ServerApp wrote its last state; Flower marks it finished next
        else:
            time.sleep(0.25)
    return status


def run_dir_finished(run_dir: Path) -> Callable[[], bool]:
    """A ``wake`` for :func:`wait_for_run`: the Restwise run folder reached a terminal state."""
    state = Path(run_dir) / "state.json"

    def finished() -> bool:
        try:
            return json.loads(state.read_text(encoding="utf-8")).get("status") in TERMINAL_STATUSES
        except (OSError, ValueError):
            return False

    return finished


def stop_run(conn: FlwrConnection, run_id: int) -> None:
    _flwr(conn, ["stop", str(int(run_id)), conn.name])


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class ManagedProcess:
    """A started Flower process with its own process group (so its children die with it)."""

    name: str
    command: list[str]
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def descendants(self) -> list[int]:
        """Pids of this process's children, grandchildren, ... Flower starts its SuperExec,
        ServerApp and ClientApp processes in *new sessions* (detached), so a process-group
        signal does not reach them: they are found through their parent pids instead."""
        return descendant_pids(self.popen.pid)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal this process, its process group and every descendant (as a device that
        loses power would: the SuperNode and the ClientApp it is running)."""
        pids = self.descendants()
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM everything, SIGKILL what is left after ``timeout_s``; reap."""
        pids = self.descendants()
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        pids += [p for p in descendant_pids(self.popen.pid) if p not in pids]
        self.kill(signal.SIGKILL)  # stragglers in the group, even if the leader is gone
        for pid in pids:  # detached descendants seen before the leader died
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


def descendant_pids(root: int) -> list[int]:
    """All live descendants of ``root`` (Linux: read from /proc; elsewhere: none found)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) >= 2:
            children.setdefault(int(rest[1]), []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


def start_process(
    name: str,
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = flower_env(env)
    with open(log_path, "ab") as log_fh:
        popen = subprocess.Popen(
            list(command),
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # own process group: kill() reaches the children
        )
    return ManagedProcess(name, list(command), popen, log_path)


def wait_for_port(host: str, port: int, *, timeout_s: float = 30.0, process: ManagedProcess | None = None) -> None:
    """Until something accepts TCP connections on host:port (the SuperLink is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise ProcessStartError(process.name, f"exited with code {process.popen.returncode}", process.log_path)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise ProcessStartError(process.name if process else f"{host}:{port}", f"not listening after {timeout_s:.0f} s",
                            process.log_path if process else None)


def start_superlink(cfg: SuperLinkConfig, log_path: Path, *, env: Mapping[str, str] | None = None,
                    ready_timeout_s: float = 60.0) -> ManagedProcess:
    """Start ``flower-superlink`` and wait until its port accepts connections."""
    if cfg.tls is not None:
        cfg.tls.check()
    proc = start_process("superlink", superlink_command(cfg), log_path, env=env)
    try:
        wait_for_port(cfg.host, cfg.port, timeout_s=ready_timeout_s, process=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_supernode(name: str, cfg: SuperNodeConfig, log_path: Path, *, env: Mapping[str, str] | None = None) -> ManagedProcess:
    if cfg.root_cert is not None and not Path(cfg.root_cert).is_file():
        raise CertificateError(cfg.root_cert, "no such file")
    if cfg.auth_key is not None:
        check_node_private_key(cfg.auth_key)
    return start_process(name, supernode_command(cfg), log_path, env=env)


__all__ = [
    "DeploymentError", "DeploymentConfigError", "CertificateError", "FlowerCommandError",
    "ProcessStartError", "RunFailedError",
    "TlsFiles", "NodeKeyFiles", "make_trial_pki", "make_node_keys", "check_node_public_key",
    "check_node_private_key", "free_port", "venv_path", "descendant_pids",
    "SuperLinkConfig", "superlink_command", "SuperNodeConfig", "supernode_command", "node_config_arg",
    "FlwrConnection", "flower_env", "FLOWER_SETTINGS", "SUPEREXEC_TASK_POLL_S", "flwr_env", "flower_log_env", "register_node", "list_nodes", "app_pyproject", "write_app_dir", "submit_run",
    "RunStatus", "run_status", "wait_for_run", "run_dir_finished", "stop_run",
    "ManagedProcess", "start_process", "wait_for_port", "start_superlink", "start_supernode",
    "RESTWISE_SERVERAPP", "RESTWISE_CLIENTAPP",
]
