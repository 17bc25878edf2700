"""Service unit tests (in-process): tokens, sessions, migrations, roles, problem details,
validation messages, limits, CORS. The real-server tests are in test_service_live.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from restwise.server import auth, db
from restwise.server.service import Settings, create_app

VALID_RUN = {
    "name": "pilot",
    "model": "recovery-mlp",
    "rounds": 2,
    "population": 4,
    "sampling": "poisson",
    "sampling_rate": 0.5,
    "noise_multiplier": 1.0,
    "delta": 1e-5,
    "secagg_num_neighbours": 3,
    "secagg_threshold": 2,
    "persons": 4,
    "force": True,  # the network under DP on 4 devices: the planner refuses it unless forced (tested below)
}


@pytest.fixture
def service(tmp_path):
    settings = Settings(data_dir=tmp_path / "srv")
    app = create_app(settings)
    ctx = app.state.ctx
    _, op = ctx.tokens.create("operator", "olga")
    _, au = ctx.tokens.create("auditor", "arne")
    with TestClient(app) as client:
        yield client, ctx, {"Authorization": f"Bearer {op}"}, {"Authorization": f"Bearer {au}"}


# -- database and migrations --------------------------------------------------------------
def test_migrations_apply_in_order_and_are_recorded(tmp_path):
    url = db.default_database_url(tmp_path)
    database = db.Database.open(url)
    assert database.current_version() == db.SCHEMA_VERSION
    with database.engine.connect() as conn:
        versions = conn.execute(sa.select(db.schema_migrations.c.version)).scalars().all()
        cols = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    assert versions == [m.version for m in db.MIGRATIONS]
    assert "projected_epsilon" in cols
    # Reopening applies nothing more.
    assert db.Database.open(url, migrate=False).migrate() == []


def test_old_database_is_upgraded_step_by_step(tmp_path):
    url = db.default_database_url(tmp_path)
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a database left at version 1 by an older Restwise
        db._schema_migrations_table(sa.MetaData()).create(conn)
        db.MIGRATIONS[0].apply(conn)
        conn.execute(db.schema_migrations.insert().values(version=1, description="x", applied_at="t"))
        conn.execute(sa.text("INSERT INTO tokens (id, name, role, token_hash, created_at) VALUES ('abcd', 'n', 'auditor', 'h', 't')"))
        conn.execute(sa.text("INSERT INTO audit_log (at, actor_token_id, actor_role, action, outcome) "
                             "VALUES ('t', 'abcd', 'operator', 'run.create', 'ok')"))
    engine.dispose()
    database = db.Database.open(url, migrate=False)
    assert database.migrate() == [2, 3, 4, 5, 6]
    with database.engine.connect() as conn:
        assert conn.execute(sa.select(db.tokens.c.name)).scalar() == "n"  # data kept
        # Migration 4: every existing audit row stood for one request.
        assert conn.execute(sa.select(db.audit_log.c.action, db.audit_log.c.attempts)).all() == [("run.create", 1)]


def test_newer_database_is_refused(tmp_path):
    url = db.default_database_url(tmp_path)
    database = db.Database.open(url)
    with database.engine.begin() as conn:
        conn.execute(db.schema_migrations.insert().values(version=99, description="future", applied_at="t"))
    with pytest.raises(db.DatabaseError, match="newer"):
        db.Database.open(url)


def test_schema_compiles_for_postgresql():
    """The same Core tables and migration DDL are valid PostgreSQL (no SQLite-only types)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    dialect = postgresql.dialect()
    for table in db.metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=dialect))
        assert ddl.startswith("\nCREATE TABLE")
    assert "SERIAL" in str(CreateTable(db.audit_log).compile(dialect=dialect))


# -- tokens ---------------------------------------------------------------------------------
def test_token_is_stored_only_as_hash_and_authenticates(tmp_path):
    database = db.Database.open(db.default_database_url(tmp_path))
    store = auth.TokenStore(database)
    info, token = store.create("auditor", "arne")
    assert auth.TOKEN_RE.match(token)
    secret = token.split("_", 2)[2]
    with database.engine.connect() as conn:
        row = conn.execute(sa.select(db.tokens)).mappings().one()
    assert secret not in json.dumps(dict(row))
    assert row["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    who = store.authenticate(token)
    assert who == auth.Principal(info.id, "arne", auth.Role.auditor)
    # One changed character, another token's id, junk: all refused.
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert store.authenticate(flipped) is None
    assert store.authenticate(f"rw_{'0' * 16}_{secret}") is None
    assert store.authenticate("") is None and store.authenticate("Bearer x") is None


def test_revoked_token_and_its_sessions_stop_working(tmp_path):
    database = db.Database.open(db.default_database_url(tmp_path))
    store = auth.TokenStore(database)
    info, token = store.create("operator", "olga")
    who = store.authenticate(token)
    session = store.open_session(who)
    assert store.session_principal(session) == who
    store.revoke(info.id)
    assert store.authenticate(token) is None
    assert store.session_principal(session) is None
    assert store.get(info.id).revoked_at is not None
    with pytest.raises(auth.TokenError):
        store.revoke("nope")


def test_bad_token_names_refused(tmp_path):
    store = auth.TokenStore(db.Database.open(db.default_database_url(tmp_path)))
    for bad in ("", " ", "x" * 101, "a\nb"):
        with pytest.raises(auth.TokenError):
            store.create("operator", bad)
    for role in ("admin", "root"):
        with pytest.raises(ValueError):
            store.create(role, "x")


# -- roles and errors through the app -------------------------------------------------------
def test_roles_and_audit_trail(service):
    client, ctx, op, au = service
    r = client.post("/api/v1/runs", json=VALID_RUN, headers=au)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert "operator role" in r.json()["detail"]
    r = client.post("/api/v1/runs", json=VALID_RUN, headers=op)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    assert r.json()["status"] == "created" and r.json()["planned_rounds"] == 2
    for path in (f"/api/v1/runs/{run_id}/start", f"/api/v1/runs/{run_id}/stop"):
        assert client.post(path, headers=au).status_code == 403
    listed = client.get("/api/v1/runs", headers=au).json()
    assert [x["id"] for x in listed] == [run_id]
    r = client.post(f"/api/v1/runs/{run_id}/stop", headers=op)
    assert r.status_code == 200 and r.json()["status"] == "stopped"
    assert client.post(f"/api/v1/runs/{run_id}/stop", headers=op).status_code == 409
    log = client.get("/api/v1/audit-log", headers=au).json()
    actions = [(e["action"], e["outcome"], e["actor_role"]) for e in log]
    assert ("run.create", "ok", "operator") in actions and ("run.stop", "ok", "operator") in actions
    assert ("run.stop", "rejected", "operator") in actions
    op_token = op["Authorization"].split()[1]
    assert op_token not in json.dumps(log)  # who, never the token


def test_no_token_bad_token_and_unknown_run(service):
    client, _, op, _ = service
    assert client.get("/api/v1/health").status_code == 200
    r = client.get("/api/v1/runs")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["status"] == 401 and "traceback" not in r.text.lower()
    assert client.get("/api/v1/runs", headers={"Authorization": "Bearer rw_0000000000000000_" + "a" * 43}).status_code == 401
    assert client.get("/api/v1/runs", headers={"Authorization": "Basic b3A6b3A="}).status_code == 401
    r = client.get("/api/v1/runs/run-0123456789ab", headers=op)
    assert r.status_code == 404 and r.json()["title"] == "Not Found"
    assert client.get("/api/v1/runs/..%2F..%2Fetc", headers=op).status_code in (404, 422)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"target_epsilon": -1.0, "noise_multiplier": None}, "target_epsilon"),
        ({"secagg_threshold": 5, "secagg_num_neighbours": 3}, "secagg_threshold"),
        ({"sampling": "fixed", "sampling_rate": None, "cohort_size": 10}, "cohort_size"),
        ({"model": "gpt-7"}, "model"),
        ({"rounds": 0}, "rounds"),
        ({"surprise": 1}, "surprise"),
        ({"noise_multiplier": 0.1}, "noise_multiplier"),
    ],
)
def test_invalid_run_config_names_the_field(service, change, field):
    client, _, op, _ = service
    body = {**VALID_RUN, **change}
    r = client.post("/api/v1/runs", json=body, headers=op)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert field in [e["field"] for e in problem["errors"]], problem
    assert field in problem["detail"]


def test_malformed_huge_and_tricky_requests_are_4xx(service):
    client, ctx, op, au = service
    r = client.post("/api/v1/runs", content=b"{not json", headers={**op, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == "the request body is not valid JSON"
    big = b'{"name": "' + b"x" * (ctx.settings.max_body_bytes + 10) + b'"}'
    r = client.post("/api/v1/runs", content=big, headers={**op, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["status"] == 413
    r = client.post("/api/v1/runs", content=b"[1,2", headers={**op, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert client.post("/api/v1/runs", json=[1, 2], headers=op).status_code == 422
    run_id = client.post("/api/v1/runs", json=VALID_RUN, headers=op).json()["id"]
    (ctx.runs.runs_dir / run_id / "report.json").write_text('{"x": 1}')
    for name in ("..%2Fconfig.json", "config.json", "..%2F..%2Frestwise-server.db", "%2e%2e", "runner.log", "report.json%00"):
        r = client.get(f"/api/v1/runs/{run_id}/files/{name}", headers=au)
        assert 400 <= r.status_code < 500, (name, r.status_code)
    assert client.get(f"/api/v1/runs/{run_id}/files/report.json", headers=au).json() == {"x": 1}
    # No bundle until the run has ended (its report is anchored then): 409 with the reason.
    r = client.get(f"/api/v1/runs/{run_id}/bundle", headers=au)
    assert r.status_code == 409 and "is created; the bundle exists once the run has ended" in r.json()["detail"]


def test_cors_closed_by_default_and_security_headers(service):
    client, _, op, _ = service
    r = client.options(
        "/api/v1/runs",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/api/v1/runs", headers={**op, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_cors_opened_only_for_configured_origin(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, cors_origins=("https://ops.example",)))
    with TestClient(app) as client:
        ok = client.options("/api/v1/runs", headers={"Origin": "https://ops.example", "Access-Control-Request-Method": "GET"})
        bad = client.options("/api/v1/runs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert ok.headers.get("access-control-allow-origin") == "https://ops.example"
    assert "access-control-allow-origin" not in bad.headers


def test_cookie_session_reads_but_cannot_change_state(service):
    client, ctx, op, _ = service
    token = op["Authorization"].split()[1]
    r = client.post("/login", data={"token": token, "next": "//evil.example/x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and token not in cookie
    assert client.get("/api/v1/runs").status_code == 200  # cookie works for reads
    r = client.post("/api/v1/runs", json=VALID_RUN)  # but never for writes
    assert r.status_code == 401
    assert client.post("/login", data={"token": "rw_nope"}).status_code == 401
    r = client.post("/logout", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    client.cookies.clear()
    assert client.post("/logout").status_code == 401
    log = [(e["action"], e["outcome"], e["actor_token_id"], e["detail"].get("reason"), e["detail"].get("route"))
           for e in ctx.audit.entries()]
    op_id = token.split("_")[1]
    assert log == [
        ("auth.denied", "denied", "anonymous", "no credentials", "POST /logout"),
        ("dashboard.logout", "ok", op_id, None, None),
        ("auth.denied", "denied", ctx.audit.label("rw_nope"), "malformed token", "POST /login"),
        ("auth.denied", "denied", ctx.audit.label(cookie.split(";")[0].split("=", 1)[1], "cookie"),
         "a session cookie cannot authorize a change", "POST /api/v1/runs"),
        ("dashboard.login", "ok", op_id, None, None),
    ]


def test_dashboard_pages_need_a_session(service):
    client, _, _, _ = service
    r = client.get("/")
    assert r.status_code == 401 and "Sign in" in r.text and "<form" in r.text
    assert client.get("/login").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_start_refused_over_budget_with_the_numbers(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, epsilon_cap=2.0))
    ctx = app.state.ctx
    _, op = ctx.tokens.create("operator", "olga")
    headers = {"Authorization": f"Bearer {op}"}
    body = {**VALID_RUN, "rounds": 50, "sampling_rate": 1.0, "noise_multiplier": 1.0}
    with TestClient(app) as client:
        # Over the run's default cap (10) it is refused at creation; raised, the service cap decides.
        capped = client.post("/api/v1/runs", json=body, headers=headers)
        assert capped.status_code == 409 and capped.json()["type"] == "urn:restwise:problem:epsilon-cap"
        body["max_epsilon"] = 100.0
        run_id = client.post("/api/v1/runs", json=body, headers=headers).json()["id"]
        r = client.post(f"/api/v1/runs/{run_id}/start", headers=headers)
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["type"] == "urn:restwise:problem:budget-exceeded"
        assert problem["budget_epsilon"] == 2.0 and problem["rounds"] == 50
        # 50 full-participation Gaussian releases at z=1 compose to one Gaussian of z=1/sqrt(50):
        # epsilon is far above 2 (exact value from the accountant's closed form).
        assert problem["projected_epsilon"] > 20
        assert f"{problem['projected_epsilon']:.4g}" in problem["detail"]
        run = client.get(f"/api/v1/runs/{run_id}", headers=headers).json()
        assert run["status"] == "refused" and "budget" in run["reason"]
        log = client.get("/api/v1/audit-log", headers=headers).json()
        assert log[0]["action"] == "run.start" and log[0]["outcome"] == "refused"
        assert log[0]["detail"]["projected_epsilon"] == problem["projected_epsilon"]
        assert run["epsilon_cap"] == 2.0  # the cap in force at start: the service's, below the run's 100
        # A target epsilon calibrates the noise: its projection is within the target.
        ok = client.post("/api/v1/runs", json={**body, "noise_multiplier": None, "target_epsilon": 1.5}, headers=headers).json()
        decision = ctx.runs.check_budget(ok["id"])
        assert decision.allowed and 1.4 < decision.projected_epsilon <= 1.5
        assert decision.budget_epsilon == 1.5


def test_run_creation_uses_the_planner_and_records_a_forced_plan(service):
    """Issue 12: POST /runs asks the planner of `restwise privacy plan`; a DP run of the
    network on a cohort too small for it is refused with the numbers unless forced, and a
    forced plan is in the audit log."""
    client, ctx, op, au = service
    refused = client.post("/api/v1/runs", json={**VALID_RUN, "force": False}, headers=op)
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["type"] == "urn:restwise:problem:plan-refused"
    assert problem["noise_to_signal"] > 1 and problem["model"] == "recovery-mlp" and problem["refused"] is True
    assert "noise-to-signal" in problem["detail"] and '"force": true' in problem["detail"]
    assert client.get("/api/v1/runs", headers=au).json() == []  # nothing was created
    forced = client.post("/api/v1/runs", json=VALID_RUN, headers=op)
    assert forced.status_code == 201 and forced.json()["config"]["force"] is True
    head = {k: v for k, v in VALID_RUN.items() if k not in ("force", "noise_multiplier", "sampling_rate")}
    linear = client.post("/api/v1/runs", json={**head, "name": "head", "model": "linear-head", "rounds": 1,
                                               "sampling_rate": 1.0, "target_epsilon": 4.0}, headers=op)
    assert linear.status_code == 201, linear.text  # never refused: it stays near its prior at worst
    log = client.get("/api/v1/audit-log", headers=au).json()
    creates = [(e["outcome"], e["detail"]) for e in reversed(log) if e["action"] == "run.create"]
    assert [o for o, _ in creates] == ["refused", "ok", "ok"]
    assert creates[0][1]["plan"]["noise_to_signal"] == problem["noise_to_signal"]
    assert creates[1][1]["forced_plan"]["forced"] is True and "forced_plan" not in creates[2][1]


def test_state_changes_are_in_the_signed_audit_ledger(service, tmp_path):
    from restwise.privacy.ledger import load_public_key, verify_ledger_file

    client, ctx, op, au = service
    run_id = client.post("/api/v1/runs", json=VALID_RUN, headers=op).json()["id"]
    client.post(f"/api/v1/runs/{run_id}/stop", headers=op)
    client.post("/api/v1/runs", json=VALID_RUN, headers=au)  # refused (403): recorded as denied
    pem = client.get("/api/v1/public-key", headers=au).content
    raw = client.get("/api/v1/audit-log/ledger", headers=au).content
    ledger_file = tmp_path / "audit.jsonl"
    ledger_file.write_bytes(raw)
    entries, _ = verify_ledger_file(ledger_file, load_public_key(pem))
    actions = [(e.payload["action"], e.payload["target"], e.payload["details"]["outcome"]) for e in entries]
    assert actions == [("run.create", run_id, "ok"), ("run.stop", run_id, "ok"), ("auth.denied", None, "denied")]
    au_id = au["Authorization"].split("_")[1]
    assert entries[2].payload["actor"] == f"auditor:{au_id}"
    assert entries[2].payload["details"] == {"outcome": "denied", "status": 403, "reason": "needs the operator role",
                                             "route": "POST /api/v1/runs"}
    actor = entries[0].payload["actor"]
    assert actor.startswith("operator:") and op["Authorization"].split("_", 2)[2] not in raw.decode()
    tampered = raw.replace(b"run.stop", b"run.stap")
    ledger_file.write_bytes(tampered)
    with pytest.raises(Exception):
        verify_ledger_file(ledger_file, load_public_key(pem))


def _release_payload(run_id: str, rnd: int, z: float) -> dict:
    from restwise.privacy.events import GaussianRoundEvent

    return GaussianRoundEvent(
        run_id=run_id, round=rnd, noise_multiplier=z, clip_norm=1.0, sampling="poisson", sampling_rate=1.0,
        cohort_size=4, population=4, adjacency="add_remove", planned_clients=4, survivors=4,
        noise_std_total=z, model_hash="ab" * 16,
    ).to_dict()


def test_person_budget_composes_earlier_runs_on_the_same_dataset(tmp_path):
    from restwise.privacy.accountant import PrivacyAccountant
    from restwise.privacy.events import ReleaseSpec

    app = create_app(Settings(data_dir=tmp_path, person_epsilon_cap=6.0))
    ctx = app.state.ctx
    _, op = ctx.tokens.create("operator", "olga")
    headers = {"Authorization": f"Bearer {op}"}
    body = {**VALID_RUN, "rounds": 4, "sampling_rate": 1.0, "noise_multiplier": 2.0, "dataset": "demo"}
    with TestClient(app) as client:
        earlier = client.post("/api/v1/runs", json=body, headers=headers).json()["id"]
        with ctx.db.engine.begin() as conn:  # the earlier run's ledger, as mirrored from its folder
            for seq in range(4):
                entry = {"seq": seq + 1, "kind": "gaussian_round", "payload": _release_payload(earlier, seq + 1, 2.0)}
                conn.execute(db.ledger_entries.insert().values(run_id=earlier, seq=seq, entry_json=json.dumps(entry)))
        spec = ReleaseSpec.plan(noise_multiplier=2.0, sampling="full", adjacency="add_remove")
        alone = PrivacyAccountant().epsilon_for_rounds(spec, 4, 1e-5).epsilon
        both = PrivacyAccountant().epsilon_for_rounds(spec, 8, 1e-5).epsilon
        assert alone < 6.0 < both  # the setting that makes the person budget decide

        same = client.post("/api/v1/runs", json=body, headers=headers).json()["id"]
        r = client.post(f"/api/v1/runs/{same}/start", headers=headers)
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["person_budget_epsilon"] == 6.0
        assert problem["person_spent_epsilon"] == pytest.approx(alone, rel=1e-6)
        assert problem["person_projected_epsilon"] == pytest.approx(both, rel=1e-6)
        assert "person budget" in problem["detail"]
        other = client.post("/api/v1/runs", json={**body, "dataset": "soccermon"}, headers=headers).json()["id"]
        decision = ctx.runs.check_budget(other)
        assert decision.allowed and decision.person_spent_epsilon == 0.0


def test_report_page_renders_a_report_and_escapes_it(service):
    client, ctx, op, au = service
    run_id = client.post("/api/v1/runs", json=VALID_RUN, headers=op).json()["id"]
    report = {
        "run_id": run_id, "epsilon": 1.25, "delta": 1e-5, "privacy_unit": "person",
        "threat_model": ["The server is honest but curious and sees only the noised sum of clipped updates.", "<script>alert(1)</script> is shown as text"],
        "ledger": {"head_seq": 4, "public_key_fingerprint": "sha256:abcd"},
        "epsilon_curve": [{"round": 1, "epsilon": 0.7}, {"round": 2, "epsilon": 1.25}],
    }
    (ctx.runs.runs_dir / run_id / "report.json").write_text(json.dumps(report))
    token = au["Authorization"].split()[1]
    client.post("/login", data={"token": token}, follow_redirects=False)
    page = client.get(f"/runs/{run_id}/report")
    assert page.status_code == 200
    html = page.text
    assert "Threat model" in html and "honest but curious" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert 'data-epsilon="1.25"' in html and "sha256:abcd" in html
    assert f"/api/v1/runs/{run_id}/bundle" in html


@pytest.mark.slow  # five real CLI processes
def test_token_cli_creates_lists_revokes_and_audits(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from test_service_support import cli

    from restwise.privacy.ledger import verify_ledger_file

    out = cli("server", "token", "create", "--role", "auditor", "--name", "Arne", "--json", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    listed = cli("server", "token", "list", "--json", "--data-dir", str(tmp_path))
    assert created["token"] not in listed.stdout and created["token"].split("_", 2)[2] not in listed.stdout
    assert json.loads(listed.stdout)[0]["id"] == created["id"]
    assert cli("server", "token", "create", "--role", "admin", "--name", "x", "--data-dir", str(tmp_path)).returncode == 2
    assert cli("server", "token", "revoke", created["id"], "--data-dir", str(tmp_path)).returncode == 0
    assert cli("server", "token", "revoke", "nope", "--data-dir", str(tmp_path)).returncode == 1
    store = auth.TokenStore(db.Database.open(db.default_database_url(tmp_path)))
    assert store.authenticate(created["token"]) is None
    entries, _ = verify_ledger_file(tmp_path / "audit" / auth.AUDIT_LEDGER_FILE)
    assert [(e.payload["actor"], e.payload["action"]) for e in entries] == [
        ("admin:cli", "token.create"),
        ("admin:cli", "token.revoke"),
    ]
