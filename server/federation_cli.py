"""`restwise server certs | superlink | register-node | nodes | run`: a real deployment.

Thin commands over :mod:`restwise.server.deploy` (which documents what Flower 1.42 does and
why each flag is there). Plaintext is refused unless ``--insecure`` is given explicitly;
``run`` waits for the run and checks how it ended, because ``flwr run`` exits 0 as soon as a
run is *submitted*, and shows its progress round by round and stage by stage meanwhile
(``server/progress.py``), ending with the outcome in one line. Every ``flwr`` call uses a
private, throw-away ``FLWR_HOME`` (the operator's own ``~/.flwr`` is never read or
rewritten). Flower's INFO log stays out of the terminal unless ``--verbose``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from restwise.common.cli_errors import cli_errors, emit_json, fail
from restwise.common.errors import UsageError
from restwise.common.exit_codes import ExitCode
from restwise.server import deploy as D
from restwise.server.errors import EpsilonCapError, PlanError, RunFilesError


def _connection(home: Path, superlink: str, root_cert: Optional[Path], insecure: bool, verbose: bool = False) -> D.FlwrConnection:
    if root_cert is not None and not Path(root_cert).is_file():
        raise D.CertificateError(root_cert, "no such file")
    return D.FlwrConnection(home, superlink, root_cert=root_cert, insecure=insecure, verbose=verbose)


SUPERLINK_HELP = "The SuperLink's address HOST:PORT (one port serves nodes, operators and the ServerApp)."
ROOT_CERT_HELP = "The CA certificate that signed the SuperLink's TLS certificate (ca.crt from `restwise server certs`)."
INSECURE_HELP = "Allow plaintext (no TLS). Anyone on the path can read and alter the traffic: trials on loopback only."
VERBOSE_HELP = "Also show Flower's own log (INFO lines) on stderr."


def register(app: typer.Typer) -> None:
    @app.command("certs")
    def certs(
        out: Path = typer.Option(..., "--out", help="Folder for the trial CA, server certificate and node keys."),
        san: List[str] = typer.Option(
            ["127.0.0.1", "localhost"], "--san",
            help="A name or IP address SuperNodes dial (repeat). Default: 127.0.0.1 and localhost.",
        ),
        node: List[str] = typer.Option(
            [], "--node", help="Also make an authentication key pair for a SuperNode of this name (repeat)."
        ),
        days: int = typer.Option(30, "--days", min=1, max=825, help="Certificate lifetime."),
        force: bool = typer.Option(False, "--force", help="Replace existing files."),
    ) -> None:
        """Make a local CA, a SuperLink TLS certificate and SuperNode key pairs for a TRIAL.

        All files are created mode 0600. The CA key is kept next to the certificates: fine for
        a trial, not for production (use your organisation's CA)."""
        with cli_errors():
            files = D.make_trial_pki(out, sans=san, days=days, overwrite=force)
            keys = [D.make_node_keys(Path(out) / "nodes", n, overwrite=force) for n in node]
        typer.echo(f"CA certificate       {files.ca_cert}   (give to every SuperNode: --root-cert)")
        typer.echo(f"CA key               {files.ca_key}   (keep private; trials only)")
        typer.echo(f"SuperLink cert/key   {files.server_cert}, {files.server_key}  (SANs: {', '.join(san)})")
        for k in keys:
            typer.echo(f"SuperNode key pair   {k.private_key} (device keeps), {k.public_key} (operator registers)")

    @app.command("superlink")
    def superlink(
        certs_dir: Optional[Path] = typer.Option(
            None, "--certs", help="Folder made by `restwise server certs` (ca.crt, server.crt, server.key)."
        ),
        ssl_ca_certfile: Optional[Path] = typer.Option(None, "--ssl-ca-certfile", help="CA certificate (instead of --certs)."),
        ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="Server certificate (instead of --certs)."),
        ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="Server private key (instead of --certs)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for all interfaces)."),
        port: int = typer.Option(9093, "--port", min=1, max=65535, help="The one port for nodes, operators and the ServerApp."),
        database: Optional[Path] = typer.Option(
            None, "--database", help="SQLite file for the SuperLink's state (registered nodes survive a restart)."
        ),
        no_node_auth: bool = typer.Option(
            False, "--no-node-auth", help="Accept ANY SuperNode (no registered keys). Only with --insecure trials."
        ),
        insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
        log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also write the SuperLink's log here."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the flower-superlink command instead of running it."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's INFO log (default: warnings and errors only)."),
    ) -> None:
        """Start a SuperLink with TLS and SuperNode authentication (runs in the foreground)."""
        with cli_errors():
            tls = None
            if certs_dir is not None:
                if any((ssl_ca_certfile, ssl_certfile, ssl_keyfile)):
                    raise D.DeploymentConfigError("give either --certs or the three --ssl-* files, not both")
                tls = D.TlsFiles.in_dir(certs_dir)
            elif any((ssl_ca_certfile, ssl_certfile, ssl_keyfile)):
                if not all((ssl_ca_certfile, ssl_certfile, ssl_keyfile)):
                    raise D.DeploymentConfigError("give all three of --ssl-ca-certfile, --ssl-certfile, --ssl-keyfile")
                tls = D.TlsFiles(Path(ssl_ca_certfile), Path(ssl_certfile), Path(ssl_keyfile))
            cfg = D.SuperLinkConfig(
                host=host, port=port, tls=tls, insecure=insecure, node_auth=not no_node_auth,
                database=database, log_file=log_file,
            )
            if tls is not None:
                tls.check()
        cmd = D.superlink_command(cfg)
        env = D.flower_env(D.flower_log_env(os.environ, verbose=verbose))
        level = env.get("FLWR_LOG_LEVEL")
        if dry_run:
            settings = {"FLWR_LOG_LEVEL": level, **D.FLOWER_SETTINGS, D.SUPEREXEC_TASK_POLL_ENV: env[D.SUPEREXEC_TASK_POLL_ENV]}
            typer.echo(" ".join([f"{k}={v}" for k, v in settings.items() if v] + cmd))
            return
        security = "plaintext, NO node authentication" if insecure else ("TLS, " + ("SuperNode authentication" if cfg.node_auth else "NO node authentication"))
        typer.echo(
            f"SuperLink on {host}:{port} ({security}); Ctrl-C stops it. "
            + ("Flower's log follows." if verbose else f"Flower's log: {level or 'its own level'} and above (--verbose for all)."),
            err=True,
        )
        os.execvpe(cmd[0], cmd, env)  # the SuperLink replaces this process: signals reach it directly

    @app.command("register-node")
    def register_node(
        public_key: Path = typer.Argument(..., help="The SuperNode's public key (OpenSSH EC, the NAME.pub file)."),
        superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help=SUPERLINK_HELP),
        root_cert: Optional[Path] = typer.Option(None, "--root-cert", help=ROOT_CERT_HELP),
        insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
        name: Optional[str] = typer.Option(
            None, "--name", help="A name for the node, kept by the SuperLink and shown by `restwise server nodes`."
        ),
        verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    ) -> None:
        """Register a SuperNode's public key: only registered nodes may join the federation."""
        if name is not None and not (1 <= len(name) <= 100 and name.isprintable()):
            raise typer.BadParameter("a node name must be 1-100 printable characters", param_hint="--name")
        with tempfile.TemporaryDirectory(prefix="restwise-flwr-") as home, cli_errors():
            conn = _connection(Path(home), superlink, root_cert, insecure, verbose)
            node_id = D.register_node(conn, public_key, name=name)
        typer.echo(f"registered SuperNode {node_id}" + (f" ({name})" if name else ""))

    @app.command("nodes")
    def nodes(
        superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help=SUPERLINK_HELP),
        root_cert: Optional[Path] = typer.Option(None, "--root-cert", help=ROOT_CERT_HELP),
        insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per node) instead of a table."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    ) -> None:
        """List the registered SuperNodes: id, the name given at registration, status and since when."""
        with tempfile.TemporaryDirectory(prefix="restwise-flwr-") as home, cli_errors():
            found = D.list_nodes(_connection(Path(home), superlink, root_cert, insecure, verbose))
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        if not found:
            typer.echo("No SuperNode is registered.")
            return
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("node id", "name", "status", "since"):
            table.add_column(column, no_wrap=True)
        since_field = {"online": "online-at", "offline": "offline-at", "unregistered": "unregistered-at"}
        for node in found:
            since = node.get(since_field.get(node.get("status"), "registered-at")) or node.get("registered-at") or "—"
            table.add_row(str(node["node-id"]), node.get("name") or "—", str(node.get("status")), str(since))
        Console(highlight=False, width=200).print(table)

    @app.command("run")
    def run(
        run_dir: Path = typer.Option(..., "--run-dir", help="The run's folder (config.json; ledger, checkpoints and state are written here)."),
        config: Optional[Path] = typer.Option(
            None, "--config", help="A run configuration (JSON, RunConfig fields) to write into the run folder first."
        ),
        superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help=SUPERLINK_HELP),
        root_cert: Optional[Path] = typer.Option(None, "--root-cert", help=ROOT_CERT_HELP),
        insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
        timeout: float = typer.Option(3600.0, "--timeout", min=1.0, help="Seconds to wait for the run to finish."),
        as_json: bool = typer.Option(False, "--json", help="Print the outcome as one JSON line on stdout (progress stays on stderr)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
        force: bool = typer.Option(
            False, "--force", help="Run a plan the planner refuses (e.g. the network under DP on a small cohort); "
            "recorded in the run's ledger."),
        max_epsilon: Optional[float] = typer.Option(
            None, "--max-epsilon", min=0.0, help="The run's epsilon cap (default 10, or the config's max_epsilon): a "
            "run whose projected epsilon against the server exceeds it is refused (exit 7). Raising it above the "
            "default is recorded in the run's config and ledger; --force does not lift it."),
    ) -> None:
        """Submit a Restwise run to a SuperLink, follow it round by round and stage by stage, and
        say how it ended in one line.

        First the run's epsilon cap: a run whose projected epsilon after all its rounds -
        against the server, which draws each cohort, so with no amplification by sampling
        claimed - exceeds max_epsilon (default 10) is refused (exit 7, the numbers printed)
        unless the cap is raised (--max-epsilon). Then the planner's check (as `restwise
        privacy plan`): a DP run whose noise is expected to swamp what it learns is refused
        (exit 1, the numbers printed) unless --force. Exit 0 only if Flower reports the run finished:completed AND the run folder's
        state is completed; otherwise 1 (the reason is in the line). The ServerApp runs on the
        SuperLink's machine, so --run-dir is a path on that machine (progress is read from it)."""
        # The progress renderer reads the run directory (Flower's run-directory contract, about
        # 0.4 s): loaded by `run` only.
        from restwise.server.progress import ProgressReporter, RunView, outcome_line

        run_dir = Path(run_dir).resolve()
        with cli_errors():
            planned, plan_message = _prepare_run_dir(run_dir, config, force=force, max_epsilon=max_epsilon)
        reporter = ProgressReporter(Console(stderr=True, highlight=False))
        try:
            reporter.say(plan_message)
            with tempfile.TemporaryDirectory(prefix="restwise-flwr-") as home, cli_errors():
                conn = _connection(Path(home), superlink, root_cert, insecure, verbose)
                app_dir = D.write_app_dir(Path(home) / "app")
                reporter.say(f"submitting the run in {run_dir} to the SuperLink at {superlink}")
                run_id = D.submit_run(conn, app_dir, {"run-dir": str(run_dir)})
                reporter.say(f"submitted Flower run {run_id}; following it (up to {timeout:.0f} s)")
                status = D.wait_for_run(
                    conn, run_id, timeout_s=timeout, poll_s=30.0, wake=D.run_dir_finished(run_dir),
                    on_poll=lambda: reporter.update(RunView.from_run_dir(run_dir, planned_rounds=planned)),
                )
            view = RunView.from_run_dir(run_dir, planned_rounds=planned)
            reporter.update(view)
        finally:
            reporter.close()
        outcome = check_run_outcome(status, run_dir)
        line = outcome_line(view, reporter.elapsed_s(), name=f"Flower run {run_id}")
        if outcome["reason"] and outcome["reason"].startswith("Flower status"):
            line += f" ({outcome['reason']})"
        outcome["summary"] = line
        if as_json:
            emit_json(outcome)
        if not outcome["ok"]:
            raise fail(line, ExitCode.FAILURE)
        if not as_json:
            typer.echo(line)


def _prepare_run_dir(run_dir: Path, config: Optional[Path], *, force: bool = False,
                     max_epsilon: Optional[float] = None) -> tuple[int, str]:
    """Write ``--config`` into the run folder (validated, capped, planned), or check the folder
    has one and check it. Returns the planned rounds and the cap's and planner's message.
    Raises UsageError naming the problem (exit 2), EpsilonCapError when the projected epsilon
    exceeds the run's cap (exit 7), PlanError when the planner refuses the run and ``force`` is
    not given (exit 1)."""
    # The run directory's contract brings Flower (about 0.4 s): loaded by `run` only.
    from restwise.server.rundir import RunFiles
    from restwise.server.runconfig import RunConfig

    files = RunFiles(run_dir)
    if config is not None:
        try:
            data = json.loads(Path(config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read {config}: {exc.strerror}") from None
        except json.JSONDecodeError:
            raise UsageError(f"{config} is not JSON") from None
        cfg = RunConfig.from_dict(data)  # RunConfigError names the bad field
    elif files.config.is_file():
        cfg = files.read_config()
    else:
        raise UsageError(f"{files.config} does not exist: give --config or create the run with the service")
    changed = config is not None
    if force and not cfg.force:
        cfg, changed = cfg.replace(force=True), True
    if max_epsilon is not None and max_epsilon != cfg.max_epsilon:
        cfg, changed = cfg.replace(max_epsilon=float(max_epsilon)), True
    cap = cfg.cap_check()
    if not cap.allowed:
        raise EpsilonCapError(f"{cap.message()}. Refused.")
    verdict = cfg.plan()
    if not verdict.allowed:
        raise PlanError(f"{verdict.message} Refused: give --force (or \"force\": true) to run it anyway.")
    if changed:
        files.write_config(cfg)
    raised = f" (RAISED above the default {cap.default_max_epsilon:g}: recorded in the run's ledger)" if cap.raised else ""
    return cfg.rounds, f"epsilon cap: {cap.message()}{raised}\nplan: " + verdict.message


def check_run_outcome(status, run_dir: Path) -> dict:
    """Combine Flower's verdict with the ServerApp's own (``state.json``): a ServerApp that
    returns normally after every round failed is still 'finished:completed' for Flower."""
    from restwise.server.rundir import RunFiles  # see _prepare_run_dir

    files = RunFiles(Path(run_dir))
    state: dict = {}
    if files.state.exists():
        try:
            state = files.read_state()
        except RunFilesError:
            state = {}
    released = [e.get("round") for e in files.round_lines() if e.get("status") in ("released", "completed")]
    failed = [e.get("round") for e in files.round_lines() if e.get("status") == "failed"]
    restwise_status = state.get("status")
    ok = status.succeeded and restwise_status == "completed"
    if not status.succeeded:
        reason = f"Flower status {status.status}"
    elif restwise_status != "completed":
        reason = f"run state {restwise_status or 'missing'}" + (f" ({state.get('reason')})" if state.get("reason") else "")
    else:
        reason = None
    return {
        "ok": ok, "reason": reason, "flower_run_id": status.run_id, "flower_status": status.status,
        "status": restwise_status, "completed_rounds": state.get("completed_rounds"),
        "released_rounds": released, "failed_rounds": failed, "run_dir": str(run_dir),
    }
