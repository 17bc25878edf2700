"""`restwise server api`, `restwise server token ...` and `restwise server runs ...`: run the
operator/auditor service, manage its API tokens, and drive runs through its API.

The service stack (FastAPI, SQLAlchemy, uvicorn and, through the run manager, Flower) is
imported inside the commands that use it: `restwise --help` and every other command must not
load it (about 0.5 s)."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import List, Optional

import httpx
import typer

from restwise.common.cli_errors import cli_errors, emit_json, error_line, fail
from restwise.common.exit_codes import ExitCode
from restwise.server.errors import TokenError
from restwise.server.runstatus import TERMINAL_STATUSES

WATCH_POLL_S = 1.0  # `runs show --watch` asks the service this often

DATA_DIR_HELP = "The service's data folder (database, run folders, audit key). Also RESTWISE_SERVER_DIR. Default: ~/.restwise/server"
DB_URL_HELP = (
    "SQLAlchemy database URL (e.g. postgresql+psycopg://user@host/restwise). Also "
    "RESTWISE_DATABASE_URL. Default: an SQLite file in the data folder."
)


def _settings(data_dir: Optional[Path], database_url: Optional[str], **extra):
    from restwise.server.service import Settings, default_data_dir  # the service stack: see above

    return Settings(data_dir=data_dir or default_data_dir(), database_url=database_url or None, **extra)


def _token_store(data_dir: Optional[Path], database_url: Optional[str]):
    from restwise.server import auth, db  # the service stack: see above

    settings = _settings(data_dir, database_url)
    auth.ensure_private_dir(settings.data_dir)
    database = db.Database.open(settings.resolved_database_url)
    ledger, _ = auth.open_audit_ledger(settings.audit_dir)
    return auth.TokenStore(database), auth.AuditTrail(database, ledger)


class _ApiClient:
    """A thin client of the service's API for the `runs` commands."""

    def __init__(self, url: str, token_file: Optional[Path]):
        token = None
        if token_file is not None:
            try:
                token = token_file.expanduser().read_text(encoding="utf-8").strip().splitlines()[0]
            except (OSError, IndexError):
                raise typer.BadParameter(f"cannot read a token from {token_file}", param_hint="--token-file") from None
        else:
            token = os.environ.get("RESTWISE_API_TOKEN")
        if not token:
            raise typer.BadParameter("give --token-file or set RESTWISE_API_TOKEN", param_hint="--token-file")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kwargs):
        try:
            r = httpx.request(method, f"{self.url}/api/v1{path}", headers=self.headers, timeout=120, **kwargs)
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach the service at {self.url}: {exc}") from None
        if r.status_code >= 400:
            try:
                problem = r.json()
                message = problem.get("detail") or problem.get("title")
            except ValueError:
                problem, message = {}, r.reason_phrase
            budget = problem.get("type") in ("urn:restwise:problem:budget-exceeded", "urn:restwise:problem:epsilon-cap")
            errors = problem.get("errors") if isinstance(problem, dict) else None
            if isinstance(errors, list) and errors:
                # Every problem on a line of its own (a 422 lists them all at once).
                error_line(f"({r.status_code}) {problem.get('title') or 'invalid request'}: {len(errors)} problem(s)")
                for e in errors:
                    typer.echo(f"  - {e.get('field')}: {e.get('message')}", err=True)
                raise typer.Exit(code=int(ExitCode.FAILURE))
            raise fail(f"({r.status_code}) {message}", ExitCode.BUDGET_EXCEEDED if budget else ExitCode.FAILURE)
        return r


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` mode 0600 and write ``text``: never over an existing file or through a
    symlink (O_EXCL), never readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _print_run(run: dict) -> None:
    typer.echo(f"{run['id']}  {run['name']}  status={run['status']}  round {run['current_round']}/{run['planned_rounds']}")
    # Every ε here holds against the server, which draws each cohort (no amplification claimed).
    if run.get("projected_epsilon") is not None:
        typer.echo(f"  projected ε for all rounds (against the server): {run['projected_epsilon']:.4g}")
    config = run.get("config") or {}
    cap = run.get("epsilon_cap")
    if cap is not None:
        spent = run.get("epsilon_spent") or 0.0
        typer.echo(f"  ε cap in force when started: {cap:.4g}; spent {spent:.4g}, remaining {max(0.0, cap - spent):.4g}")
    elif config.get("max_epsilon") is not None:
        typer.echo(f"  ε cap (max_epsilon): {config['max_epsilon']:.4g}")
    if run.get("reason"):
        typer.echo(f"  reason: {run['reason']}")
    for rnd in run.get("rounds", []):
        eps = rnd.get("epsilon")
        loss = rnd.get("train_loss")
        typer.echo(
            f"  round {rnd['round']:>3}: sampled {rnd.get('sampled')}, survived {rnd.get('survived')}, "
            f"loss {'not collected' if loss is None else f'{loss:.4f}'}, ε against the server {'—' if eps is None else f'{eps:.4g}'}"
        )
    for event in run.get("events", []):
        typer.echo(f"  {event['level']} (round {event['round']}): {event['message']}")


def register(app: typer.Typer) -> None:
    token_app = typer.Typer(help="API tokens for operators and auditors (shown once, stored only as hashes).", no_args_is_help=True)
    app.add_typer(token_app, name="token")
    runs_app = typer.Typer(
        help="Create, start, watch and stop runs through a running service (`restwise server api`).",
        no_args_is_help=True,
    )
    app.add_typer(runs_app, name="runs")
    Url = typer.Option("http://127.0.0.1:8000", "--url", envvar="RESTWISE_API_URL", help="The service's address.")
    TokenFile = typer.Option(
        None, "--token-file", help="File whose first line is your API token. Or set RESTWISE_API_TOKEN.", show_default=False
    )

    @runs_app.command("create")
    def runs_create(
        config: Path = typer.Argument(..., help="A JSON file with the run configuration (see docs/service.md)."),
        start: bool = typer.Option(False, "--start", help="Start the run right after creating it."),
        force: bool = typer.Option(
            False, "--force", help="Create it even though the planner refuses it (recorded in the audit log)."),
        max_epsilon: Optional[float] = typer.Option(
            None, "--max-epsilon", min=0.0, help="The run's epsilon cap (default 10): a run whose projected epsilon "
            "against the server exceeds it is refused (exit 7). Raising it is recorded in the audit log and ledger."),
        url: str = Url,
        token_file: Optional[Path] = TokenFile,
    ) -> None:
        """Create a run from a JSON configuration (operators). The service plans it first (as
        `restwise privacy plan`): a DP run whose noise is expected to swamp what it learns is
        refused (exit 1, the numbers printed) unless --force; a run whose projected epsilon
        against the server exceeds its cap (max_epsilon, default 10) is refused (exit 7)
        unless the cap is raised (--max-epsilon)."""
        try:
            body = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot read a JSON configuration from {config}: {exc}") from None
        if not isinstance(body, dict):
            raise typer.BadParameter(f"{config} must hold a JSON object")
        if force:
            body["force"] = True
        if max_epsilon is not None:
            body["max_epsilon"] = max_epsilon
        client = _ApiClient(url, token_file)
        run = client.call("POST", "/runs", json=body).json()
        if start:
            run = client.call("POST", f"/runs/{run['id']}/start").json()
        _print_run(run)

    @runs_app.command("start")
    def runs_start(run_id: str, url: str = Url, token_file: Optional[Path] = TokenFile) -> None:
        """Check the budget and start a run (operators). Exit code 7 if the budget would be exceeded."""
        _print_run(_ApiClient(url, token_file).call("POST", f"/runs/{run_id}/start").json())

    @runs_app.command("stop")
    def runs_stop(run_id: str, url: str = Url, token_file: Optional[Path] = TokenFile) -> None:
        """Ask a run to stop (operators). An interrupted run (its runner is gone) is ended at
        once as stopped, with its report over the rounds it released."""
        _print_run(_ApiClient(url, token_file).call("POST", f"/runs/{run_id}/stop").json())

    @runs_app.command("resume")
    def runs_resume(run_id: str, url: str = Url, token_file: Optional[Path] = TokenFile) -> None:
        """Continue an interrupted or failed run from its last checkpoint (operators). Rounds
        already released are not run again; the budget is checked again first (exit 7)."""
        _print_run(_ApiClient(url, token_file).call("POST", f"/runs/{run_id}/resume").json())

    @runs_app.command("list")
    def runs_list(url: str = Url, token_file: Optional[Path] = TokenFile) -> None:
        """List runs, newest first."""
        for run in _ApiClient(url, token_file).call("GET", "/runs").json():
            _print_run(run)

    @runs_app.command("show")
    def runs_show(
        run_id: str,
        watch: bool = typer.Option(
            False, "--watch",
            help="Follow the run round by round and stage by stage until it ends; the last line is its outcome "
            "(exit 0 only if it completed).",
        ),
        url: str = Url,
        token_file: Optional[Path] = TokenFile,
    ) -> None:
        """A run's status and per-round metrics."""
        client = _ApiClient(url, token_file)
        run = client.call("GET", f"/runs/{run_id}").json()
        if not watch:
            _print_run(run)
            return
        # The progress renderer reads run folders too (Flower's run-directory contract, about
        # 0.4 s): loaded by --watch only.
        from rich.console import Console
        from restwise.server.progress import ProgressReporter, RunView, outcome_line

        console = Console(highlight=False)
        typer.echo(f"{run['id']}  {run['name']}  {run['planned_rounds']} rounds")
        reporter = ProgressReporter(console)
        try:
            while True:
                view = RunView.from_api(run)
                reporter.update(view)
                if run["status"] in TERMINAL_STATUSES or run["status"] == "interrupted":
                    break
                time.sleep(WATCH_POLL_S)
                run = client.call("GET", f"/runs/{run_id}").json()
        finally:
            reporter.close()
        line = outcome_line(view, name=run["id"])
        if run["status"] != "completed":
            raise fail(line)
        typer.echo(line)

    @runs_app.command("bundle")
    def runs_bundle(
        run_id: str,
        out: Path = typer.Option(None, "--out", help="Where to write the zip. Default: <run id>-verification.zip"),
        url: str = Url,
        token_file: Optional[Path] = TokenFile,
    ) -> None:
        """Download a finished run's verification bundle (zip)."""
        data = _ApiClient(url, token_file).call("GET", f"/runs/{run_id}/bundle").content
        target = out or Path(f"{run_id}-verification.zip")
        target.write_bytes(data)
        typer.echo(f"Wrote {target} ({len(data)} bytes). Unzip it and run `restwise audit verify` (see README.txt inside).")

    DataDir = typer.Option(None, "--data-dir", envvar="RESTWISE_SERVER_DIR", help=DATA_DIR_HELP, show_default=False)
    DbUrl = typer.Option(None, "--database-url", envvar="RESTWISE_DATABASE_URL", help=DB_URL_HELP, show_default=False)

    @app.command("api")
    def api(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
        data_dir: Optional[Path] = DataDir,
        database_url: Optional[str] = DbUrl,
        cors_origin: List[str] = typer.Option([], "--cors-origin", help="Allow this browser origin (repeatable). Default: CORS closed."),
        max_body_kib: int = typer.Option(64, "--max-body-kib", min=1, max=10_240, help="Largest accepted request body."),
        epsilon_cap: Optional[float] = typer.Option(None, "--epsilon-cap", help="Refuse any run whose projected ε exceeds this."),
        person_epsilon_cap: Optional[float] = typer.Option(
            None, "--person-epsilon-cap", help="Refuse a run that would bring any person's ε across runs on the same dataset above this."
        ),
        runner_command: Optional[str] = typer.Option(
            None,
            "--runner-command",
            help="Command that executes a run (it gets `--run-dir DIR` appended and must follow the runner's file "
            "contract). Default: `python -m restwise.simulation.runner run`, the local simulation engine.",
            show_default=False,
        ),
        tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate (PEM)."),
        tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Private key for --tls-cert."),
        audit_burst: int = typer.Option(
            30, "--audit-burst", min=1, max=100_000,
            help="Audit rate limit per token: this many recorded changes (or denied attempts) at once ...",
        ),
        audit_per_minute: float = typer.Option(
            30.0, "--audit-per-minute", min=0.01, max=100_000.0,
            help="... refilled at this many a minute. Beyond it, changes get 429 and denied attempts are counted in one coalesced entry.",
        ),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show uvicorn's log, one line per request."),
    ) -> None:
        """Run the operator/auditor API and dashboard (uvicorn)."""
        # the service stack: see the module docstring
        import uvicorn
        from restwise.server.service import create_app

        if (tls_cert is None) != (tls_key is None):
            raise typer.BadParameter("give both --tls-cert and --tls-key, or neither")
        with cli_errors(also=(ValueError,)):
            settings = _settings(
                data_dir,
                database_url,
                cors_origins=tuple(cors_origin),
                max_body_bytes=max_body_kib * 1024,
                epsilon_cap=epsilon_cap,
                person_epsilon_cap=person_epsilon_cap,
                runner_command=tuple(shlex.split(runner_command)) if runner_command else (),
                secure_cookies=tls_cert is not None,
                audit_burst=audit_burst,
                audit_per_minute=audit_per_minute,
            )
            application = create_app(settings)
        if host not in ("127.0.0.1", "localhost", "::1") and tls_cert is None:
            typer.echo("Warning: serving plain HTTP beyond this machine; tokens would travel in clear text. Use --tls-cert/--tls-key.", err=True)
        scheme = "https" if tls_cert is not None else "http"
        typer.echo(
            f"Restwise service on {scheme}://{host}:{port} (data folder {settings.data_dir}); Ctrl-C stops it"
            + ("." if verbose else "; --verbose shows each request."),
            err=True,
        )
        uvicorn.run(
            application,
            host=host,
            port=port,
            log_level="info" if verbose else "warning",
            access_log=verbose,
            server_header=False,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
        )

    @token_app.command("create")
    def token_create(
        role: str = typer.Option(..., "--role", help="operator or auditor"),
        name: str = typer.Option(..., "--name", help="Who holds this token (shown in the audit log)."),
        out: Optional[Path] = typer.Option(
            None, "--out",
            help="Write the token to this new file (mode 0600; an existing file is never overwritten) "
            "instead of printing it.",
            show_default=False,
        ),
        data_dir: Optional[Path] = DataDir,
        database_url: Optional[str] = DbUrl,
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line (with --out: without the token)."),
    ) -> None:
        """Create a token and print it once (or write it to --out). Only its hash is kept."""
        from restwise.server.auth import SYSTEM_PRINCIPAL, TOKEN_ROLES  # the service stack: see above

        if role not in {r.value for r in TOKEN_ROLES}:
            raise typer.BadParameter("role must be operator or auditor", param_hint="--role")
        if out is not None:
            out = out.expanduser()
            # Checked before the token exists, so a refusal leaves no token behind.
            if out.exists() or out.is_symlink():
                raise fail(f"{out} already exists; a token file is never overwritten (choose a new name)", ExitCode.USAGE)
            if not out.parent.is_dir():
                raise fail(f"{out.parent} is not a folder", ExitCode.USAGE)
        store, audit = _token_store(data_dir, database_url)
        try:
            info, token = store.create(role, name)
        except TokenError as exc:
            raise typer.BadParameter(str(exc), param_hint="--name") from None
        if out is not None:
            try:
                write_secret_file(out, token + "\n")
            except OSError as exc:
                store.revoke(info.id)  # the token was never handed to anyone: it must not stay valid
                audit.record(SYSTEM_PRINCIPAL, "token.create", info.id, "revoked", {"role": info.role.value, "reason": "token file not written"})
                raise fail(f"cannot write {out}: {exc.strerror}; the token was revoked") from None
        audit.record(SYSTEM_PRINCIPAL, "token.create", info.id, "ok", {"role": info.role.value})
        if out is not None:
            if as_json:
                emit_json({"id": info.id, "name": info.name, "role": info.role.value, "file": str(out)})
            else:
                typer.echo(f"Token {info.id} ({info.role.value}, {info.name}) written to {out} (mode 0600).")
        elif as_json:
            typer.echo(json.dumps({"id": info.id, "name": info.name, "role": info.role.value, "token": token}))
        else:
            typer.echo(f"Token {info.id} ({info.role.value}, {info.name}). Store it now; it is not shown again:")
            typer.echo(token)

    @token_app.command("list")
    def token_list(
        data_dir: Optional[Path] = DataDir,
        database_url: Optional[str] = DbUrl,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """List tokens (ids, names, roles, status; never the tokens)."""
        store, _ = _token_store(data_dir, database_url)
        items = store.list()
        if as_json:
            typer.echo(json.dumps([{"id": t.id, "name": t.name, "role": t.role.value, "created_at": t.created_at, "revoked_at": t.revoked_at, "last_used_at": t.last_used_at} for t in items]))
            return
        if not items:
            typer.echo("No tokens.")
        for t in items:
            state = f"revoked {t.revoked_at}" if t.revoked_at else "active"
            typer.echo(f"{t.id}  {t.role.value:8}  {state:34}  {t.name}")

    @token_app.command("revoke")
    def token_revoke(
        token_id: str = typer.Argument(..., help="The token's id (from `token list`)."),
        data_dir: Optional[Path] = DataDir,
        database_url: Optional[str] = DbUrl,
    ) -> None:
        """Revoke a token; it and its dashboard sessions stop working at once."""
        from restwise.server.auth import SYSTEM_PRINCIPAL  # the service stack: see above

        store, audit = _token_store(data_dir, database_url)
        with cli_errors():
            info = store.revoke(token_id)
        audit.record(SYSTEM_PRINCIPAL, "token.revoke", info.id, "ok", {"role": info.role.value})
        typer.echo(f"Revoked {info.id} ({info.role.value}, {info.name}).")
