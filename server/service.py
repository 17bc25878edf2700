"""The operator and auditor service: a FastAPI app (``create_app(settings)``) with its OpenAPI
schema, token auth with roles, problem-details errors, and the web dashboard.

Rules every route follows (tests walk every route of the app to check them):

* Every route needs a token (``Authorization: Bearer rw_...``) except ``GET /api/v1/health``
  and the dashboard's sign-in page (``GET``/``POST /login``) and its stylesheet
  (``/static/*``). Missing or bad token: 401. Wrong role: 403.
* The dashboard's session cookie authenticates only ``GET``/``HEAD`` requests, so a forged
  cross-site request can never change state (the cookie is also ``SameSite=Strict``).
* Errors are RFC 9457 problem details (``application/problem+json``) without stack traces;
  validation errors list every offending field by name.
* Request bodies are bounded (``Settings.max_body_bytes``, 413). CORS is off unless origins
  are configured.
* Every state change (create/start/stop run, sign-in) goes to the audit trail with the
  actor's token id and role, and so does every denied attempt (401/403: the token id, or a
  label for credentials that name no token; never a secret). Audit writes are rate-limited
  per token (``auth.AuditRateLimit``): a change beyond the limit is refused with 429 before
  anything happens, and what the limit keeps out of the log is counted in one coalesced
  entry.
* No response shows the service's own file paths (the audit key's location is stripped
  from every run configuration a token holder sees: ``auth.public_run_config``).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from http import HTTPStatus
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException as FastAPIHTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from restwise.common.errors import ModelError
from restwise.models.registry import DEFAULT_MODEL, ONE_RELEASE, get_architecture, known_models
from restwise.privacy.accountant import MIN_NOISE_MULTIPLIER
from restwise.privacy.errors import PrivacyError
from restwise.privacy.release import DEFAULT_MAX_EPSILON, NOISE_PLACEMENTS, SAMPLING_METHODS, CapCheck
from restwise.server import auth as authm
from restwise.server import dashboard
from restwise.server import db as dbm
from restwise.server import runs as runsm
from restwise.server.auth import SESSION_COOKIE
from restwise.privacy.utility import UtilityVerdict
from restwise.server.errors import (
    AccountingRefusedError,
    BudgetRefusedError,
    PlanError,
    ProblemError,
    RunConfigError,
    RunError,
    RunFilesError,
    RunNotFoundError,
    RunStateError,
)
from restwise.server.runconfig import KNOWN_DATASETS, RunConfig
from restwise.server.rundir import read_events, read_progress
from restwise.server.runstatus import STATUSES, TERMINAL_STATUSES

API = "/api/v1"
RUN_ID_PATTERN = runsm.RUN_ID_RE.pattern
PROBLEM_JSON = "application/problem+json"


# ---------------------------------------------------------------------------------------
# Settings
def default_data_dir() -> Path:
    env = os.environ.get("RESTWISE_SERVER_DIR")
    return Path(env).expanduser() if env else Path("~/.restwise/server").expanduser()


@dataclass(frozen=True)
class Settings:
    """Everything the service needs, passed in explicitly.

    data_dir         holds the SQLite database (default), run folders and the audit key
    database_url     SQLAlchemy URL; default ``sqlite:///<data_dir>/restwise-server.db``
    max_body_bytes   larger request bodies are refused with 413
    cors_origins     origins allowed by CORS; empty (the default) = no CORS headers at all
    secure_cookies   mark the session cookie ``Secure`` (set when served over HTTPS)
    epsilon_cap      optional service-wide ceiling on any run's projected ε
    person_epsilon_cap  optional ceiling on each person's ε across all runs over the same
                     dataset (earlier runs' ledgers compose with the planned run)
    poll_interval_s  how often the run watcher reads run folders
    runner_command   the command that executes a run, before ``--run-dir DIR``; default
                     ``python -m restwise.simulation.runner run`` (the local simulation engine)
    audit_burst, audit_per_minute   the audit trail's rate limit per token (auth.AuditRateLimit):
                     this many writes at once, refilled at this many a minute
    """

    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None
    max_body_bytes: int = 64 * 1024
    cors_origins: tuple[str, ...] = ()
    secure_cookies: bool = False
    epsilon_cap: float | None = None
    person_epsilon_cap: float | None = None
    poll_interval_s: float = 0.5
    runner_command: tuple[str, ...] = ()
    audit_burst: int = authm.AUDIT_BURST
    audit_per_minute: float = authm.AUDIT_PER_MINUTE

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        for name in ("epsilon_cap", "person_epsilon_cap"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or dbm.default_database_url(self.data_dir)

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def audit_dir(self) -> Path:
        return self.data_dir / "audit"


# ---------------------------------------------------------------------------------------
# API models
class RunConfigIn(BaseModel):
    """A run's configuration. Field-level checks here; the cross-field rules are checked in
    ``validate_run_config`` so every error names the field it is about."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=60)
    rounds: int = Field(ge=1, le=10_000)
    population: int = Field(ge=1, le=1_000_000, description="Number of persons who may be sampled.")
    sampling: Literal[SAMPLING_METHODS] = "poisson"
    sampling_rate: Optional[float] = Field(default=None, gt=0, le=1)
    cohort_size: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    target_epsilon: Optional[float] = Field(default=None, gt=0, le=1000, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1, allow_inf_nan=False)
    noise_multiplier: Optional[float] = Field(default=None, ge=MIN_NOISE_MULTIPLIER, le=100, allow_inf_nan=False)
    clip_norm: float = Field(default=1.0, gt=0, le=1000, allow_inf_nan=False)
    secagg_num_neighbours: int = Field(default=32, ge=2, le=1000)
    secagg_threshold: float = Field(
        default=0.6, gt=0, le=1000, allow_inf_nan=False, description="A count of shares, or a fraction of the neighbours when < 1."
    )
    max_dropout_fraction: float = Field(default=0.3, ge=0, lt=0.5, allow_inf_nan=False)
    local_epochs: int = Field(default=1, ge=1, le=100)
    learning_rate: float = Field(default=0.01, gt=0, le=10, allow_inf_nan=False)
    batch_size: int = Field(default=32, ge=1, le=100_000)
    round_timeout_s: float = Field(default=600, gt=0, le=86_400, allow_inf_nan=False)
    # Named datasets only: the API never takes a server-side path from a client.
    dataset: str = Field(default="demo", min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    persons: Optional[int] = Field(default=None, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    noise: Literal[NOISE_PLACEMENTS] = "distributed"
    secure_aggregation: bool = True
    max_epsilon: float = Field(
        default=DEFAULT_MAX_EPSILON, gt=0, le=1000, allow_inf_nan=False,
        description="The run's epsilon cap: a run whose planned releases would spend more (against the server, "
        "which draws each cohort: no amplification by sampling claimed) is refused with 409. Raising it above "
        f"the default {DEFAULT_MAX_EPSILON:g} is recorded in the audit log and the run's ledger; force does not lift it.",
    )
    force: bool = Field(
        default=False,
        description="Create the run even though the planner refuses it (a DP run whose noise is expected to "
        "swamp what it learns). Recorded in the audit log and the run's ledger.",
    )


class FieldProblem(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldProblem] | None = None


class RunOut(BaseModel):
    id: str
    name: str
    status: str
    reason: str | None
    current_round: int
    planned_rounds: int
    created_at: str
    created_by: str
    started_at: str | None
    finished_at: str | None
    projected_epsilon: float | None
    releases: int | None = Field(
        default=None, description="Releases the run's signed ledger records (reconciled from the run folder)."
    )
    epsilon_spent: float | None = Field(
        default=None, description="ε composed over every release in the run's signed ledger, against the server "
        "(no amplification by sampling claimed; null: none yet, or not accountable)."
    )
    epsilon_cap: float | None = Field(
        default=None, description="The ε cap in force when the run was started (the smaller of its max_epsilon and "
        "the service-wide cap then), recorded at start; null: not started by this service."
    )
    config: dict[str, Any]

    @field_validator("config")
    @classmethod
    def _no_server_paths(cls, config: dict[str, Any]) -> dict[str, Any]:
        return authm.public_run_config(config)


class RoundOut(BaseModel):
    round: int
    status: str | None
    sampled: int | None
    survived: int | None
    dropped: int | None
    train_loss: float | None
    epsilon: float | None
    delta: float | None
    noise_multiplier_effective: float | None


class ProgressOut(BaseModel):
    """Where the run's current round is (the last line of its progress file, written by the
    ServerApp's round: server/rundir.py). Counts only, never a personal value."""

    at: float
    round: int
    attempt: int
    stage: str
    expected: int | None
    received: int | None
    dropped: int | None


class RunEventOut(BaseModel):
    """Something an operator should know about the run (its events file, server/rundir.py),
    e.g. kind ``loss-rising``: the released training loss rises over several rounds."""

    at: float | None
    round: int
    kind: str
    level: str
    message: str
    details: dict[str, Any]


class RunDetailOut(RunOut):
    rounds: list[RoundOut]
    progress: ProgressOut | None = None
    events: list[RunEventOut] = []


class WhoAmI(BaseModel):
    token_id: str
    name: str
    role: str


class Health(BaseModel):
    status: Literal["ok"]
    schema_version: int


class AuditEntryOut(BaseModel):
    seq: int
    at: str
    actor_token_id: str
    actor_role: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]
    attempts: int = 1


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: an unbounded ε is reported as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        name = ".".join(loc) or "body"
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        out.append({"field": name, "message": msg})
    return out


def run_config_errors(body: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Every problem of a run configuration, at once: unknown fields, each field checked on its
    own against ``RunConfigIn``, then every cross-field rule whose fields are valid. Returns
    (the valid fields' values, with defaults for those not given; the problems)."""
    if not isinstance(body, Mapping):
        return {}, [{"field": "body", "message": "must be a JSON object (the run configuration)"}]
    fields = RunConfigIn.model_fields
    errors = [{"field": str(key)[:60], "message": "unknown field"} for key in body if key not in fields]
    values: dict[str, Any] = {}
    invalid: set[str] = set()
    defaults = RunConfigIn.model_construct()
    for name, info in fields.items():
        if name not in body:
            if info.is_required():
                invalid.add(name)
                errors.append({"field": name, "message": "required"})
            else:
                values[name] = getattr(defaults, name)
            continue
        try:
            checked = RunConfigIn.__pydantic_validator__.validate_assignment(RunConfigIn.model_construct(), name, body[name])
        except ValidationError as exc:
            invalid.add(name)
            errors.extend({"field": name, "message": e["message"]} for e in _field_errors(exc.errors()))
        else:
            values[name] = getattr(checked, name)
    errors.extend(_cross_field_errors(values, invalid))
    return values, errors


def _cross_field_errors(v: dict[str, Any], invalid: set[str]) -> list[dict[str, str]]:
    """The rules between fields (the same as ``RunConfig``'s), each checked when all the
    fields it reads are valid."""
    errs: list[dict[str, str]] = []

    def ok(*names: str) -> bool:
        return not invalid.intersection(names)

    def bad(name: str, message: str) -> None:
        errs.append({"field": name, "message": message})

    if ok("model") and v["model"] not in known_models():
        bad("model", f"unknown model; known models: {', '.join(sorted(known_models()))}")
    elif ok("model", "rounds") and v["rounds"] != 1:
        try:
            one_release = get_architecture(v["model"]).protocol == ONE_RELEASE
        except ModelError as exc:
            bad("model", str(exc))
        else:
            if one_release:
                bad("rounds", f"the {v['model']} model is learnt from one release of statistics: rounds must be 1")
    if ok("secagg_threshold"):
        threshold = v["secagg_threshold"]
        if threshold >= 1 and threshold != int(threshold):
            bad("secagg_threshold", "a count must be a whole number (a fraction of the neighbours must be < 1)")
        elif ok("secagg_num_neighbours") and threshold > v["secagg_num_neighbours"]:
            bad(
                "secagg_threshold",
                f"threshold ({threshold:g}) is above the number of shares "
                f"(secagg_num_neighbours = {v['secagg_num_neighbours']})",
            )
    if ok("sampling"):
        if v["sampling"] == "poisson":
            if ok("sampling_rate") and v["sampling_rate"] is None:
                bad("sampling_rate", "required with poisson sampling")
            elif ok("sampling_rate", "population") and v["sampling_rate"] * v["population"] < 1:
                bad("sampling_rate", "the expected cohort (rate x population) is below one device")
            if ok("cohort_size") and v["cohort_size"] is not None:
                bad("cohort_size", "not used with poisson sampling (give sampling_rate)")
        else:
            if ok("cohort_size") and v["cohort_size"] is None:
                bad("cohort_size", "required with fixed-size sampling")
            elif ok("cohort_size", "population") and v["cohort_size"] > v["population"]:
                bad("cohort_size", f"cohort ({v['cohort_size']}) is larger than the population ({v['population']})")
            if ok("sampling_rate") and v["sampling_rate"] is not None:
                bad("sampling_rate", "not used with fixed-size sampling (give cohort_size)")
    if ok("target_epsilon", "noise_multiplier") and (v["target_epsilon"] is None) == (v["noise_multiplier"] is None):
        bad("target_epsilon", "give exactly one of target_epsilon and noise_multiplier")
    if ok("persons", "population") and v["persons"] is not None and v["persons"] < v["population"]:
        bad("population", f"population ({v['population']}) exceeds the persons in the dataset ({v['persons']})")
    if ok("dataset") and v["dataset"] not in KNOWN_DATASETS:
        bad("dataset", f"unknown dataset; known datasets: {', '.join(KNOWN_DATASETS)}")
    if ok("noise", "secure_aggregation") and v["noise"] == "distributed" and not v["secure_aggregation"]:
        bad("secure_aggregation", "distributed noise needs secure aggregation; use noise=central")
    return errs


def invalid_run_config(errors: list[dict[str, str]]) -> ProblemError:
    """The 422 listing every problem."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ProblemError(422, "Invalid run configuration", detail, errors=errors)


def validate_run_config(cfg: RunConfigIn, audit_key_path: str) -> dict[str, Any]:
    """Every field and cross-field rule (``run_config_errors``), then the federated area's own
    ``RunConfig`` validation as a last check. Returns the canonical config dict the runner
    reads. Raises ProblemError(422) listing every problem, each naming its field."""
    data, errs = run_config_errors(cfg.model_dump())
    if errs:
        raise invalid_run_config(errs)
    data["audit_key_path"] = audit_key_path  # the service's key, never chosen by a client
    try:
        return RunConfig.from_dict(data).to_dict()
    except RunConfigError as exc:
        raise invalid_run_config([{"field": exc.field, "message": exc.message}]) from None


def cap_check_run_config(canonical: dict[str, Any]) -> CapCheck:
    """The run's projected epsilon (against the sampler) against its cap ``max_epsilon``.
    Raises ProblemError 409 (type ``epsilon-cap``, the numbers attached) when it exceeds the
    cap - ``force`` does not lift it -; 422 when the run cannot be accounted."""
    try:
        cap = RunConfig.from_dict(canonical).cap_check()
    except PrivacyError as exc:
        raise ProblemError(422, "The run cannot be accounted", str(exc)) from None
    if not cap.allowed:
        raise ProblemError(
            409, "The run's epsilon cap refuses this run", cap.message(),
            type_="urn:restwise:problem:epsilon-cap", extra=cap.to_dict(),
        )
    return cap


def plan_run_config(canonical: dict[str, Any]) -> UtilityVerdict:
    """The planner's verdict on a validated configuration (``RunConfig.plan``, the check of
    ``restwise privacy plan``). Raises ProblemError 409 (type ``plan-refused``, the numbers
    attached) when it refuses and the configuration does not say ``force``; 422 when no plan
    can be made."""
    try:
        verdict = RunConfig.from_dict(canonical).plan()
    except PlanError as exc:
        raise ProblemError(422, "The run cannot be planned", str(exc)) from None
    if not verdict.allowed:
        raise ProblemError(
            409, "The planner refuses this run", f"{verdict.message} Set \"force\": true to create it anyway.",
            type_="urn:restwise:problem:plan-refused", extra=plan_summary(verdict),
        )
    return verdict


def plan_summary(verdict: UtilityVerdict) -> dict[str, Any]:
    """The verdict's numbers for a problem detail or an audit entry."""
    return {"model": verdict.model, "mechanism": verdict.mechanism, "cohort": verdict.cohort,
            "epsilon": verdict.epsilon, "noise_multiplier": verdict.noise_multiplier,
            "noise_to_signal": verdict.noise_to_signal, "expected_to_beat_prior": verdict.expected_to_beat_prior,
            "refused": verdict.refused, "forced": verdict.forced, "message": verdict.message}


# ---------------------------------------------------------------------------------------
# Middleware
class BodyLimitMiddleware:
    """Refuses request bodies above a size, by Content-Length or while streaming (413)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                declared = value
        if declared is not None:
            if not declared.isdigit():
                return await _send_problem(send, 400, "Bad Request", "invalid Content-Length header")
            if int(declared) > self.max_bytes:
                return await _send_problem(send, 413, "Content Too Large", f"request bodies are limited to {self.max_bytes} bytes")
        seen = 0
        limit = self.max_bytes

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise FastAPIHTTPException(413, f"request bodies are limited to {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


async def _send_problem(send, status: int, title: str, detail: str) -> None:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    """Adds SECURITY_HEADERS to every response that does not set its own (pure ASGI, so the
    request body stream passes through untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.lower().encode() not in present:
                        headers.append((key.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # No script at all on the dashboard: charts are server-rendered SVG.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
}


def route_of(request: Request) -> str:
    """``METHOD /path/{template}`` of the matched route: what an audit entry names (never the
    raw path, which the client chose)."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', '(unmatched)')}"


def target_of(request: Request) -> str | None:
    """The run a request is about, when its path names a well-formed one."""
    run_id = request.path_params.get("run_id")
    return run_id if isinstance(run_id, str) and runsm.RUN_ID_RE.match(run_id) else None


# ---------------------------------------------------------------------------------------
@dataclass
class ServiceContext:
    settings: Settings
    db: dbm.Database
    tokens: authm.TokenStore
    audit: authm.AuditTrail
    runs: runsm.RunManager
    public_key_pem: bytes
    audit_key_path: str


def build_context(settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> ServiceContext:
    authm.ensure_private_dir(settings.data_dir)
    database = dbm.Database.open(settings.resolved_database_url)
    audit_ledger, public_key = authm.open_audit_ledger(settings.audit_dir)
    ctx = ServiceContext(
        settings=settings,
        db=database,
        tokens=authm.TokenStore(database),
        audit=authm.AuditTrail(
            database, audit_ledger, authm.AuditRateLimit(settings.audit_burst, settings.audit_per_minute, clock)
        ),
        runs=runsm.RunManager(
            database,
            settings.runs_dir,
            budget_check=runsm.BudgetCheck(settings.epsilon_cap, settings.person_epsilon_cap),
            poll_interval_s=settings.poll_interval_s,
            command=runsm.command_factory(settings.runner_command),
        ),
        public_key_pem=public_key,
        audit_key_path=str(settings.audit_dir / authm.AUDIT_KEY_FILE),
    )
    return ctx


def create_app(settings: Settings | None = None, *, clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The service. ``clock`` (monotonic seconds) drives the audit rate limit (tests)."""
    settings = settings or Settings()
    ctx = build_context(settings, clock=clock)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        ctx.runs.start_watching()
        try:
            yield
        finally:
            ctx.runs.shutdown()
            ctx.audit.flush(force=True)  # what the rate limit still holds is written, not lost
            ctx.db.dispose()

    app = FastAPI(
        title="Restwise operator and auditor service",
        version="1",
        description=(
            "Launch and watch federated training runs (operators); read runs, privacy ledgers and "
            "reports and download verification bundles (auditors). Every route needs a bearer "
            "token except the health check."
        ),
        openapi_url=None,  # served below, behind auth
        docs_url=None,  # Swagger/ReDoc pages load scripts from a CDN: not offered
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    bearer = HTTPBearer(auto_error=False, description="An API token: `restwise server token create`.")

    # -- errors -------------------------------------------------------------------------
    def problem_response(request: Request, exc: ProblemError) -> Response:
        body: dict[str, Any] = {
            "type": exc.type_,
            "title": exc.title,
            "status": exc.status,
            "instance": request.url.path,
        }
        if exc.detail:
            body["detail"] = exc.detail
        if exc.errors:
            body["errors"] = exc.errors
        body.update(_json_safe(exc.extra))
        if not request.url.path.startswith(API) and request.method in ("GET", "HEAD", "POST"):
            html = dashboard.error_page(request, ctx, exc.status, exc.title, exc.detail)
            if html is not None:
                return html
        return JSONResponse(body, status_code=exc.status, media_type=PROBLEM_JSON, headers=exc.headers)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return problem_response(request, ProblemError(exc.status_code, title, detail, headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return problem_response(request, ProblemError(400, "Bad Request", "the request body is not valid JSON"))
        if request.method == "POST" and request.url.path == f"{API}/runs":
            # A run configuration: every problem at once, not only the fields pydantic saw.
            _, problems = run_config_errors(exc.body)
            if problems:
                who = getattr(request.state, "principal", None)
                if who is not None:  # the operator was admitted: the attempt is recorded
                    ctx.audit.record(who, "run.create", None, "invalid", {"errors": problems})
                return problem_response(request, invalid_run_config(problems))
        fields = _field_errors(errors)
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return problem_response(request, ProblemError(422, "Invalid request", detail, errors=fields))

    @app.exception_handler(RunNotFoundError)
    async def _not_found(request: Request, exc: RunNotFoundError):
        return problem_response(request, ProblemError(404, "Not Found", str(exc)))

    @app.exception_handler(RunStateError)
    async def _state(request: Request, exc: RunStateError):
        return problem_response(request, ProblemError(409, "Conflict", str(exc), extra={"run_status": exc.status}))

    @app.exception_handler(BudgetRefusedError)
    async def _budget(request: Request, exc: BudgetRefusedError):
        return problem_response(
            request,
            ProblemError(
                409,
                "Privacy budget would be exceeded",
                str(exc),
                type_="urn:restwise:problem:budget-exceeded",
                extra=exc.decision.to_dict(),
            ),
        )

    @app.exception_handler(AccountingRefusedError)
    async def _accounting(request: Request, exc: AccountingRefusedError):
        return problem_response(
            request, ProblemError(409, "Configuration cannot be accounted", str(exc), type_="urn:restwise:problem:unaccountable")
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # never a stack trace to the client
        return JSONResponse(
            {"type": "about:blank", "title": "Internal Server Error", "status": 500, "instance": request.url.path},
            status_code=500,
            media_type=PROBLEM_JSON,
        )

    # -- middleware (last added = outermost) --------------------------------------------
    app.add_middleware(SecurityHeadersMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    # -- auth ---------------------------------------------------------------------------
    def principal(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> authm.Principal:
        header = request.headers.get("authorization")
        cookie = request.cookies.get(SESSION_COOKIE)
        check, presented, kind = None, None, "anon"
        if header:
            presented = header
            if credentials is not None and credentials.scheme.lower() == "bearer":
                check = ctx.tokens.check(credentials.credentials.strip())
            else:
                check = authm.AuthCheck(None, None, authm.NOT_BEARER)
        elif cookie:
            presented, kind = cookie, "cookie"
            if request.method in ("GET", "HEAD"):
                check = ctx.tokens.session_check(cookie)
            else:
                check = authm.AuthCheck(None, None, authm.COOKIE_WRITE)
        who = check.principal if check is not None else None
        if who is None:
            ctx.audit.deny(check, route=route_of(request), target=target_of(request), presented=presented, kind=kind)
            raise ProblemError(
                401,
                "Unauthorized",
                "a valid API token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="restwise"'},
            )
        request.state.principal = who
        return who

    def operator(request: Request, who: authm.Principal = Depends(principal)) -> authm.Principal:
        """The operator role, and a write left in the token's audit rate limit (checked before
        the change: a refused request changes nothing)."""
        if who.role is not authm.Role.operator:
            ctx.audit.forbid(who, route=route_of(request), target=target_of(request))
            raise ProblemError(403, "Forbidden", f"this action needs the operator role; your token has the {who.role.value} role")
        if not ctx.audit.admit(who, route_of(request)):
            wait = ctx.audit.retry_after_s(who)
            raise ProblemError(
                429,
                "Too Many Requests",
                f"this token has made more changes than the service records per minute "
                f"({ctx.settings.audit_burst} at once, {ctx.settings.audit_per_minute:g} a minute); try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        return who

    app.state.principal_dependency = principal
    app.state.operator_dependency = operator

    problems = {
        s: {"model": Problem, "content": {PROBLEM_JSON: {}}}
        for s in (400, 401, 403, 404, 409, 413, 422, 429)
    }
    read_problems = {s: problems[s] for s in (401, 404, 422)}
    write_problems = {s: problems[s] for s in (400, 401, 403, 404, 409, 413, 422, 429)}
    RunId = PathParam(pattern=RUN_ID_PATTERN, max_length=16, description="A run id, e.g. run-0123456789ab")

    # -- routes -------------------------------------------------------------------------
    @app.get(f"{API}/health", response_model=Health, tags=["service"])
    def health() -> Health:
        """Liveness check; the only route that answers without a token."""
        return Health(status="ok", schema_version=dbm.SCHEMA_VERSION)

    @app.get(f"{API}/openapi.json", tags=["service"], responses=read_problems)
    def openapi_schema(who: authm.Principal = Depends(principal)) -> JSONResponse:
        """This API's OpenAPI schema."""
        return JSONResponse(app.openapi())

    @app.get(f"{API}/whoami", response_model=WhoAmI, tags=["service"], responses=read_problems)
    def whoami(who: authm.Principal = Depends(principal)) -> WhoAmI:
        """The token's id, name and role."""
        return WhoAmI(token_id=who.token_id, name=who.name, role=who.role.value)

    @app.get(f"{API}/runs", response_model=list[RunOut], tags=["runs"], responses=read_problems)
    def list_runs(
        who: authm.Principal = Depends(principal),
        limit: int = Query(100, ge=1, le=500),
        offset: int = Query(0, ge=0, le=1_000_000),
        status: Optional[Literal[("created", *STATUSES)]] = None,
    ) -> list[dict]:
        """Runs, newest first."""
        return ctx.runs.list(limit=limit, offset=offset, status=status)

    @app.post(f"{API}/runs", response_model=RunOut, status_code=201, tags=["runs"], responses=write_problems)
    def create_run(config: RunConfigIn, who: authm.Principal = Depends(operator)) -> dict:
        """Create a run from a validated configuration (operators). It does not start."""
        try:
            canonical = validate_run_config(config, ctx.audit_key_path)
        except ProblemError as exc:
            ctx.audit.record(who, "run.create", None, "invalid", {"errors": exc.errors or []})
            raise
        try:
            cap = cap_check_run_config(canonical)
        except ProblemError as exc:
            ctx.audit.record(who, "run.create", None, "refused",
                             _json_safe({"name": config.name, "epsilon_cap": exc.extra or exc.detail}))
            raise
        try:
            verdict = plan_run_config(canonical)
        except ProblemError as exc:
            ctx.audit.record(who, "run.create", None, "refused", {"name": config.name, "plan": exc.extra or exc.detail})
            raise
        run = ctx.runs.create(config.name, canonical, who.token_id)
        detail: dict[str, Any] = {"name": config.name}
        if cap.raised:
            detail["raised_epsilon_cap"] = cap.to_dict()
        if verdict.refused and verdict.forced:
            detail["forced_plan"] = plan_summary(verdict)
        ctx.audit.record(who, "run.create", run["id"], "ok", _json_safe(detail))
        return run

    @app.get(f"{API}/runs/{{run_id}}", response_model=RunDetailOut, tags=["runs"], responses=read_problems)
    def get_run(run_id: str = RunId, who: authm.Principal = Depends(principal)) -> dict:
        """A run's status, configuration, per-round metrics and where its current round is."""
        run = ctx.runs.get(run_id)
        run["rounds"] = ctx.runs.rounds(run_id)
        latest = read_progress(ctx.runs.run_dir(run_id), last=1)
        run["progress"] = latest[-1] if latest and run["status"] in ("pending", "running") else None
        run["events"] = read_events(ctx.runs.run_dir(run_id))
        return run

    @app.post(f"{API}/runs/{{run_id}}/start", response_model=RunOut, tags=["runs"], responses=write_problems)
    def start_run(run_id: str = RunId, who: authm.Principal = Depends(operator)) -> dict:
        """Check the run's privacy budget for all planned rounds, then launch it (operators).
        Refused with 409 and the numbers if the projected ε exceeds the budget."""
        try:
            run = ctx.runs.start(run_id)
        except BudgetRefusedError as exc:
            ctx.audit.record(who, "run.start", run_id, "refused", exc.decision.to_dict())
            raise
        except RunError as exc:
            ctx.audit.record(who, "run.start", run_id, "rejected", {"reason": type(exc).__name__})
            raise
        ctx.audit.record(who, "run.start", run_id, "ok", {"projected_epsilon": run.get("projected_epsilon")})
        return run

    @app.post(f"{API}/runs/{{run_id}}/stop", response_model=RunOut, tags=["runs"], responses=write_problems)
    def stop_run(run_id: str = RunId, who: authm.Principal = Depends(operator)) -> dict:
        """Ask a run to stop after its current round (operators)."""
        try:
            run = ctx.runs.stop(run_id)
        except RunError as exc:
            ctx.audit.record(who, "run.stop", run_id, "rejected", {"reason": type(exc).__name__})
            raise
        ctx.audit.record(who, "run.stop", run_id, "ok", {})
        return run

    @app.post(f"{API}/runs/{{run_id}}/resume", response_model=RunOut, tags=["runs"], responses=write_problems)
    def resume_run(run_id: str = RunId, who: authm.Principal = Depends(operator)) -> dict:
        """Continue an interrupted or failed run from its last checkpoint (operators). Rounds
        already released are not run again; a round released but not checkpointed is re-run
        as a new, separately accounted attempt. The budget is checked again first (409)."""
        try:
            run = ctx.runs.resume(run_id)
        except BudgetRefusedError as exc:
            ctx.audit.record(who, "run.resume", run_id, "refused", exc.decision.to_dict())
            raise
        except (RunError, RunFilesError) as exc:
            ctx.audit.record(who, "run.resume", run_id, "rejected", {"reason": type(exc).__name__})
            if isinstance(exc, RunFilesError):
                raise ProblemError(409, "Conflict", f"run {run_id} cannot be resumed: {exc}") from None
            raise
        ctx.audit.record(who, "run.resume", run_id, "ok", {"reason": run.get("reason")})
        return run

    @app.get(f"{API}/runs/{{run_id}}/rounds", response_model=list[RoundOut], tags=["runs"], responses=read_problems)
    def get_rounds(run_id: str = RunId, who: authm.Principal = Depends(principal)) -> list[dict]:
        """Per-round metrics: sampled, survived, dropped, training loss, ε spent so far."""
        return ctx.runs.rounds(run_id)

    @app.get(f"{API}/runs/{{run_id}}/ledger", response_model=list[dict[str, Any]], tags=["audit"], responses=read_problems)
    def get_ledger(run_id: str = RunId, who: authm.Principal = Depends(principal)) -> list[dict]:
        """The run's signed privacy ledger entries, in order."""
        return ctx.runs.ledger(run_id)

    @app.get(
        f"{API}/runs/{{run_id}}/files/{{name}}",
        tags=["audit"],
        responses={**read_problems, 200: {"content": {m: {} for m in set(runsm.REPORT_FILES.values())}}},
        response_class=Response,
    )
    def get_run_file(
        run_id: str = RunId,
        name: str = PathParam(max_length=40, description="One of: " + ", ".join(runsm.REPORT_FILES)),
        who: authm.Principal = Depends(principal),
    ) -> Response:
        """One of the run's report files (report.json, report.html, ledger.jsonl, public_key.pem)."""
        found = ctx.runs.report_file(run_id, name)
        if found is None:
            raise ProblemError(404, "Not Found", f"run {run_id} has no file of that name (available: {', '.join(runsm.REPORT_FILES)})")
        path, media = found
        headers = {}
        if name.endswith(".html"):
            # The report page is shown as a document of its own, without scripts or forms.
            headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
        return FileResponse(path, media_type=media, headers=headers)

    @app.get(
        f"{API}/runs/{{run_id}}/bundle",
        tags=["audit"],
        responses={**read_problems, 409: problems[409], 200: {"content": {"application/zip": {}}}},
        response_class=Response,
    )
    def get_bundle(run_id: str = RunId, who: authm.Principal = Depends(principal)) -> Response:
        """The verification bundle (zip): report.json, report.html, ledger.jsonl, the public key
        and a README on running `restwise audit verify`."""
        data = build_bundle(ctx, run_id)
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{run_id}-verification.zip"'},
        )

    @app.get(f"{API}/audit-log", response_model=list[AuditEntryOut], tags=["audit"], responses=read_problems)
    def audit_log(
        who: authm.Principal = Depends(principal),
        limit: int = Query(100, ge=1, le=500),
        offset: int = Query(0, ge=0, le=1_000_000),
        action: Optional[str] = Query(None, max_length=40, pattern=r"^[a-z]+\.[a-z.]+$", description="e.g. auth.denied"),
        outcome: Optional[str] = Query(None, max_length=20, pattern=r"^[a-z]+$", description="e.g. denied"),
    ) -> list[dict]:
        """The service's own audit trail (who changed what, who was denied), newest first.
        Rows with ``attempts`` > 1 stand for requests the rate limit coalesced."""
        ctx.audit.flush()
        return ctx.audit.entries(limit=limit, offset=offset, action=action, outcome=outcome)

    @app.get(
        f"{API}/audit-log/ledger",
        tags=["audit"],
        responses={**read_problems, 200: {"content": {"application/x-ndjson": {}}}},
        response_class=Response,
    )
    def audit_ledger_file(who: authm.Principal = Depends(principal)) -> Response:
        """The service's signed, hash-chained audit ledger (verify it with the public key)."""
        ctx.audit.flush()
        path = ctx.settings.audit_dir / authm.AUDIT_LEDGER_FILE
        if not path.is_file():
            raise ProblemError(404, "Not Found", "this service keeps no signed audit ledger yet")
        return FileResponse(path, media_type="application/x-ndjson")

    @app.get(
        f"{API}/public-key",
        tags=["audit"],
        responses={**read_problems, 200: {"content": {"application/x-pem-file": {}}}},
        response_class=Response,
    )
    def public_key(who: authm.Principal = Depends(principal)) -> Response:
        """The service's Ed25519 audit public key (PEM), which signs run and audit ledgers.
        Compare its fingerprint with the one the operator publishes out of band."""
        return Response(ctx.public_key_pem, media_type="application/x-pem-file")

    dashboard.install(app, ctx, principal)

    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi
    return app


BUNDLE_README = """Restwise verification bundle for run {run_id}

Files
  report.json     the privacy report (machine-readable)
  report.html     the same report as a page you can open in a browser
  ledger.jsonl    the run's privacy ledger: one signed, hash-chained entry per release
  public_key.pem  the server's audit public key (Ed25519) that signed the ledger

Verify it yourself (no access to the server needed):

  pip install restwise            # or use an existing installation
  restwise audit verify report.json --ledger ledger.jsonl --public-key OPERATOR-KEY.pem

OPERATOR-KEY.pem is the audit public key the operator published out of band, not the copy
in this bundle: anyone can sign a forged ledger with a fresh key and ship that key. Without
--public-key, verify fails (exit 8). With --trust-shipped-key instead it checks against
public_key.pem here, warns, and prints that key's fingerprint; compare it with the published
one (`restwise audit fingerprint OPERATOR-KEY.pem` prints a key's fingerprint).

`verify` checks every signature and the hash chain of the ledger, recomputes ε from the
ledger's events alone and compares it with the report. Exit code 0 means everything
matches; 8 means a mismatch or tampering, or no pinned key (the message says which).
"""


def build_bundle(ctx: ServiceContext, run_id: str) -> bytes:
    run = ctx.runs.get(run_id)
    run_dir = ctx.runs.run_dir(run_id)
    if run["status"] not in TERMINAL_STATUSES:
        # Before the end, the folder may hold an older report than the ledger: never a bundle
        # that covers fewer rounds than the run will have released.
        raise ProblemError(
            409, "No report yet",
            f"run {run_id} is {run['status']}; the bundle exists once the run has ended (its report is anchored then)",
        )
    missing = [n for n in ("report.json", "ledger.jsonl") if not (run_dir / n).is_file()]
    if missing:
        raise ProblemError(
            409,
            "No report yet",
            f"run {run_id} (status {run['status']}) has no {' or '.join(missing)} yet; the bundle exists once the run has ended",
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("report.json", "report.html", "ledger.jsonl", "public_key.pem"):
            path = run_dir / name
            if path.is_file():
                zf.write(path, f"{run_id}/{name}")
        if not (run_dir / "public_key.pem").is_file():
            zf.writestr(f"{run_id}/public_key.pem", ctx.public_key_pem)
        zf.writestr(f"{run_id}/README.txt", BUNDLE_README.format(run_id=run_id))
    return buf.getvalue()
