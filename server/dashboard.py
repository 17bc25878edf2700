"""The web dashboard, served by the same app as the API.

Plain HTML from Jinja2 templates (autoescaped), one stylesheet, no script and no build step;
the ε-over-rounds chart is an SVG drawn here on the server, with a title, a description and
the same numbers in a table next to it for screen readers. Pages of a run that is still
going refresh themselves with a ``<meta http-equiv="refresh">``.

Sign-in: the person pastes an API token into ``/login``; the service opens a session (a
random id in an HttpOnly, SameSite=Strict cookie, stored hashed) tied to that token, so
revoking the token ends the session. The cookie authenticates reads only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote

import jinja2
from fastapi import Depends, FastAPI, Path as PathParam, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from restwise.server import auth as authm
from restwise.server.auth import SESSION_COOKIE
from restwise.server.errors import ProblemError
from restwise.server.rundir import read_events
from restwise.server.runs import RUN_ID_RE, read_jsonl
from restwise.server.runstatus import ACTIVE_STATUSES

HERE = Path(__file__).resolve().parent
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HERE / "templates")),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status)


# ---------------------------------------------------------------------------------------
# The chart
def _nice_step(span: float, target_ticks: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def epsilon_chart_svg(
    points: list[tuple[int, float]],
    budget: float | None,
    planned_rounds: int,
    *,
    width: int = 640,
    height: int = 300,
) -> str:
    """An SVG line chart of ε spent after each round, with the budget as a dashed line.

    ``points`` are (round, cumulative ε). Returns markup safe to embed (numbers only).
    """
    left, right, top, bottom = 56, 20, 20, 44
    pw, ph = width - left - right, height - top - bottom
    max_round = max([planned_rounds, 1] + [r for r, _ in points])
    y_top = max([budget or 0.0] + [e for _, e in points] + [1e-9]) * 1.12
    ystep = _nice_step(y_top)
    y_top = math.ceil(y_top / ystep) * ystep
    xstep = max(1, int(_nice_step(max_round, 8)))

    def sx(r: float) -> float:
        return left + pw * r / max_round

    def sy(e: float) -> float:
        return top + ph * (1 - e / y_top)

    desc = (
        "Cumulative privacy loss epsilon after each round"
        + (f", against the budget epsilon = {_fmt(budget)}" if budget is not None else "")
        + (f". After round {points[-1][0]}: epsilon = {_fmt(points[-1][1])}." if points else ". No round has completed yet.")
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="epsilon-chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="eps-title eps-desc">',
        '<title id="eps-title">Privacy spent (ε) over rounds</title>',
        f'<desc id="eps-desc">{desc}</desc>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-bg"/>',
    ]
    y = 0.0
    while y <= y_top + 1e-12:
        py = sy(y)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + pw}" y2="{py:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" class="tick" text-anchor="end">{_fmt(y)}</text>')
        y += ystep
    for r in range(0, max_round + 1, xstep):
        px = sx(r)
        parts.append(f'<text x="{px:.1f}" y="{top + ph + 16}" class="tick" text-anchor="middle">{r}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" class="axis-label" text-anchor="middle">round</text>')
    parts.append(
        f'<text x="14" y="{top + ph / 2:.1f}" class="axis-label" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2:.1f})">ε spent</text>'
    )
    if budget is not None:
        by = sy(budget)
        parts.append(f'<line x1="{left}" y1="{by:.1f}" x2="{left + pw}" y2="{by:.1f}" class="budget" id="budget-line"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{by - 6:.1f}" class="budget-label" text-anchor="end">budget ε = {_fmt(budget)}</text>')
    if points:
        coords = [(sx(0), sy(0.0))] + [(sx(r), sy(e)) for r, e in points]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline points="{path}" class="eps-line" id="epsilon-line"/>')
        for r, e in points:
            parts.append(
                f'<circle cx="{sx(r):.1f}" cy="{sy(e):.1f}" r="3.5" class="eps-point" data-round="{r}" data-epsilon="{e:.6g}">'
                f"<title>round {r}: ε = {_fmt(e)}</title></circle>"
            )
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" class="axis"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" class="axis"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def run_budget(run: dict[str, Any]) -> dict[str, Any]:
    """What the run may spend, every ε against the server (no amplification claimed): its
    target, the cap in force when it started (``epsilon_cap``, recorded by the service at
    start - never today's settings), the smaller of the two as its budget, and what remains of
    it after ``epsilon_spent``. A run not started yet shows its own cap (``max_epsilon``)."""
    config = run.get("config") or {}
    target = _number(config.get("target_epsilon"))
    recorded = _number(run.get("epsilon_cap"))
    cap = recorded if recorded is not None else _number(config.get("max_epsilon"))
    limits = [v for v in (target, cap) if v is not None]
    budget = min(limits) if limits else None
    spent = _number(run.get("epsilon_spent"))
    remaining = None if budget is None else max(0.0, budget - (spent or 0.0))
    return {"budget": budget, "target": target, "cap": cap, "cap_recorded_at_start": recorded is not None,
            "spent": spent, "remaining": remaining}


# ---------------------------------------------------------------------------------------
def _safe_next(value: str | None) -> str:
    # Only same-site absolute paths: no scheme, no host, no "//evil" or "/\\evil".
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 200:
        return "/"
    return value


def error_page(request: Request, ctx: Any, status: int, title: str, detail: str | None) -> HTMLResponse | None:
    """The HTML answer for an error on a dashboard path (API paths answer problem JSON)."""
    if request.url.path.startswith("/static/"):
        return None
    if status == 401:
        return render(
            "login.html",
            status=401,
            next=_safe_next(request.url.path if request.method == "GET" else "/"),
            error="Sign in with an API token to see this page." if request.url.path != "/login" else "That token is not valid.",
            who=None,
        )
    return render("error.html", status=status, status_code=status, title=title, detail=detail, who=getattr(request.state, "principal", None))


HEADLINE_KEYS = (
    # epsilon: against the server (schema 2); epsilon_amplified beside it, with its label.
    # A schema-1 report's epsilon_no_amplification is its value against the server.
    "run_id", "privacy_unit", "epsilon", "epsilon_amplified", "epsilon_amplified_label", "epsilon_no_amplification",
    "epsilon_rdp_bound", "delta", "adjacency", "adjacency_description", "amplification_claimed", "generated_at",
    "report_schema_version",
)


def _label(key: Any) -> str:
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list))


def _row(key: Any, value: Any) -> dict[str, Any]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and any(len(v) > 40 for v in value):
        return {"label": _label(key), "bullets": [_fmt_value(v) for v in value[:50]]}
    if isinstance(value, list):
        if all(_is_scalar(v) for v in value):
            return {"label": _label(key), "value": ", ".join(_fmt_value(v) for v in value[:50]) or "—"}
        return {"label": _label(key), "value": f"{len(value)} entries (see report.json)"}
    if isinstance(value, dict):
        parts = [f"{k}: {_fmt_value(v) if _is_scalar(v) else '…'}" for k, v in list(value.items())[:20]]
        return {"label": _label(key), "value": "; ".join(parts) or "—"}
    return {"label": _label(key), "value": _fmt_value(value)}


def _report_sections(report: Any) -> list[dict[str, Any]]:
    """A report (any JSON object) as titled sections of rows for a readable page: the headline
    numbers first, then one section per nested object or list of sentences."""
    if not isinstance(report, dict):
        return []
    headline = [_row(k, report[k]) for k in HEADLINE_KEYS if k in report]
    sections = [{"title": "Summary", "rows": headline}] if headline else []
    other_scalars = []
    for key, value in report.items():
        if key in HEADLINE_KEYS:
            continue
        if isinstance(value, dict):
            sections.append({"title": _label(key), "rows": [_row(k, v) for k, v in value.items()]})
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            sections.append({"title": _label(key), "rows": [{"label": "", "bullets": [_fmt_value(v) for v in value[:50]]}]})
        else:
            other_scalars.append(_row(key, value))
    if other_scalars:
        sections.append({"title": "Other fields", "rows": other_scalars})
    return sections


def _report_curve(report: Any) -> list[tuple[int, float]]:
    curve = report.get("epsilon_curve") if isinstance(report, dict) else None
    points = []
    for p in curve or []:
        if isinstance(p, dict) and isinstance(p.get("round"), int) and isinstance(p.get("epsilon"), (int, float)):
            points.append((p["round"], float(p["epsilon"])))
    return points


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if v is None:
        return "—"
    text = str(v)
    return text if len(text) <= 400 else text[:400] + "…"


def install(app: FastAPI, ctx: Any, principal: Callable) -> None:
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    RunId = PathParam(pattern=RUN_ID_RE.pattern, max_length=16)
    html_only = {"content": {"text/html": {}}}

    def common(request: Request, who: authm.Principal) -> dict[str, Any]:
        return {"who": who, "is_operator": who.role is authm.Role.operator, "path": request.url.path}

    @app.get("/login", response_class=HTMLResponse, tags=["dashboard"], responses={200: html_only})
    def login_page(next: str = "/") -> HTMLResponse:
        """The sign-in form (no token needed to see it)."""
        return render("login.html", next=_safe_next(next), error=None, who=None)

    @app.post(
        "/login",
        response_class=HTMLResponse,
        tags=["dashboard"],
        status_code=303,
        responses={401: html_only, 303: {"description": "signed in; redirect"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {"token": {"type": "string", "maxLength": 200}, "next": {"type": "string", "maxLength": 200}},
                            "required": ["token"],
                        }
                    }
                },
            }
        },
    )
    async def login_submit(request: Request) -> Response:
        """Exchange an API token for a dashboard session cookie."""
        raw = await request.body()
        try:
            form = parse_qs(raw.decode("utf-8"), max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            form = {}
        token = (form.get("token") or [""])[0].strip()
        target = _safe_next((form.get("next") or ["/"])[0])
        check = ctx.tokens.check(token)
        who = check.principal
        if who is None:
            ctx.audit.deny(check if token else None, route="POST /login", presented=token or None)
            return render("login.html", status=401, next=target, error="That token is not valid (or was revoked).", who=None)
        if not ctx.audit.admit(who, "POST /login"):
            return render("login.html", status=429, next=target, who=None,
                          error=f"Too many sign-ins with this token; try again in {ctx.audit.retry_after_s(who)} s.")
        session_id = ctx.tokens.open_session(who)
        ctx.audit.record(who, "dashboard.login", None, "ok", {})
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=int(authm.SESSION_LIFETIME.total_seconds()),
            httponly=True,
            samesite="strict",
            secure=ctx.settings.secure_cookies,
            path="/",
        )
        return response

    @app.post("/logout", tags=["dashboard"], status_code=303, responses={303: {"description": "signed out; redirect"}})
    def logout(request: Request) -> Response:
        """End the dashboard session."""
        cookie = request.cookies.get(SESSION_COOKIE)
        check = ctx.tokens.session_check(cookie) if cookie else None
        who = check.principal if check is not None else None
        if who is None:
            ctx.audit.deny(check, route="POST /logout", presented=cookie or None, kind="cookie")
            raise ProblemError(401, "Unauthorized", "not signed in")
        if not ctx.audit.admit(who, "POST /logout"):
            raise ProblemError(429, "Too Many Requests", f"try again in {ctx.audit.retry_after_s(who)} s")
        ctx.tokens.close_session(cookie)
        ctx.audit.record(who, "dashboard.logout", None, "ok", {})
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse, tags=["dashboard"], responses={200: html_only})
    def runs_page(request: Request, who: authm.Principal = Depends(principal)) -> HTMLResponse:
        """Dashboard: the list of runs."""
        runs = [{**r, "config": authm.public_run_config(r["config"])} for r in ctx.runs.list(limit=200)]
        spent = ctx.runs.latest_epsilons([r["id"] for r in runs])
        for r in runs:
            r["epsilon_spent"] = spent.get(r["id"])
            r["budget"] = run_budget(r)
        refresh = any(r["status"] in ACTIVE_STATUSES for r in runs)
        return render("runs.html", runs=runs, refresh=refresh, **common(request, who))

    @app.get("/runs/{run_id}", response_class=HTMLResponse, tags=["dashboard"], responses={200: html_only})
    def run_page(request: Request, run_id: str = RunId, who: authm.Principal = Depends(principal)) -> HTMLResponse:
        """Dashboard: one run, its rounds and the ε-over-rounds chart against the budget."""
        run = ctx.runs.get(run_id)
        run["config"] = authm.public_run_config(run["config"])  # no server paths on a page
        rounds = ctx.runs.rounds(run_id)
        points = [(r["round"], r["epsilon"]) for r in rounds if r["epsilon"] is not None]
        if run.get("epsilon_spent") is None and points:
            run["epsilon_spent"] = points[-1][1]
        budget = run_budget(run)
        chart = epsilon_chart_svg(points, budget["budget"], run["planned_rounds"])
        completed = [r for r in rounds if (r["status"] or "completed") in ("completed", "ok", "success")]
        run_dir = ctx.runs.run_dir(run_id)
        amplified = [line.get("epsilon_amplified") for line in read_jsonl(run_dir / "rounds.jsonl")
                     if line.get("epsilon") is not None]
        summary = {
            "rounds_completed": len(completed),
            "epsilon_spent": budget["spent"],
            "epsilon_amplified": amplified[-1] if amplified else None,
            "sampled": sum(r["sampled"] or 0 for r in rounds),
            "survived": sum(r["survived"] or 0 for r in rounds),
            "last_loss": next((r["train_loss"] for r in reversed(rounds) if r["train_loss"] is not None), None),
        }
        return render(
            "run.html",
            run=run,
            rounds=rounds,
            chart=chart,
            budget=budget,
            summary=summary,
            has_report=(run_dir / "report.json").is_file(),
            events=read_events(run_dir),
            refresh=run["status"] in ACTIVE_STATUSES,
            config_json=json.dumps(run["config"], indent=2, sort_keys=True),
            **common(request, who),
        )

    @app.get("/runs/{run_id}/report", response_class=HTMLResponse, tags=["dashboard"], responses={200: html_only})
    def report_page(request: Request, run_id: str = RunId, who: authm.Principal = Depends(principal)) -> HTMLResponse:
        """Dashboard: the run's privacy report and the verification bundle download."""
        run = ctx.runs.get(run_id)
        run["config"] = authm.public_run_config(run["config"])
        path = ctx.runs.run_dir(run_id) / "report.json"
        report = None
        if path.is_file():
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                report = None
        points = _report_curve(report)
        budget = run_budget(run)["budget"]
        return render(
            "report.html",
            run=run,
            report=report,
            sections=_report_sections(report) if report is not None else [],
            chart=epsilon_chart_svg(points, budget, max([run["planned_rounds"]] + [r for r, _ in points])) if points else None,
            bundle_url=f"/api/v1/runs/{quote(run_id)}/bundle",
            html_url=f"/api/v1/runs/{quote(run_id)}/files/report.html",
            **common(request, who),
        )
