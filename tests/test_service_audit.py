"""The service's audit log (denied attempts, the per-token rate limit), what no response may
show (the audit key's server path), every validation error at once, and `token create --out`.
In-process (FastAPI's TestClient on the real app and a real SQLite file); the rate limit's
clock is injected, so its exact behaviour is asserted without waiting."""

from __future__ import annotations

import json
import stat

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from restwise.privacy.ledger import load_public_key, verify_ledger_file
from restwise.server import auth, db
from restwise.server.service import Settings, create_app

VALID_RUN = {
    "name": "pilot", "rounds": 2, "population": 4, "sampling": "poisson", "sampling_rate": 0.5,
    "noise_multiplier": 1.0, "secagg_num_neighbours": 3, "secagg_threshold": 2, "persons": 4,
    "force": True,  # the network under DP on 4 devices: the planner refuses it unless forced
}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(tmp_path):
    """A service whose audit limit is 3 writes at once, refilled at 6 a minute (one per 10 s)."""
    clock = FakeClock()
    app = create_app(Settings(data_dir=tmp_path / "srv", audit_burst=3, audit_per_minute=6.0), clock=clock)
    ctx = app.state.ctx
    _, op = ctx.tokens.create("operator", "olga")
    _, au = ctx.tokens.create("auditor", "arne")
    with TestClient(app) as client:
        yield client, ctx, clock, {"Authorization": f"Bearer {op}"}, {"Authorization": f"Bearer {au}"}


def _ledger(ctx, tmp_path):
    entries, _ = verify_ledger_file(ctx.settings.audit_dir / auth.AUDIT_LEDGER_FILE, load_public_key(ctx.public_key_pem))
    return entries


def _db_rows(ctx) -> list[dict]:
    return list(reversed(ctx.audit.entries(limit=500)))  # oldest first


def test_denied_attempts_carry_the_token_id_or_a_label_never_the_secret(limited, tmp_path):
    client, ctx, _, op, au = limited
    op_token = op["Authorization"].split()[1]
    op_id, op_secret = op_token.split("_")[1], op_token.split("_", 2)[2]
    au_id = au["Authorization"].split("_")[1]
    wrong_secret = f"rw_{op_id}_{'A' * 43}"
    unknown = f"rw_feedfacecafebeef_{op_secret}"  # a real secret under an id that does not exist
    assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {wrong_secret}"}).status_code == 401
    assert client.get("/api/v1/runs/run-0123456789ab", headers={"Authorization": f"Bearer {unknown}"}).status_code == 401
    assert client.post("/api/v1/runs", json=VALID_RUN, headers=au).status_code == 403
    rows = _db_rows(ctx)
    assert [(r["action"], r["outcome"], r["actor_token_id"], r["actor_role"], r["target"], r["detail"], r["attempts"])
            for r in rows] == [
        ("auth.denied", "denied", op_id, "unauthenticated", None,
         {"status": 401, "reason": "wrong secret", "route": "GET /api/v1/runs"}, 1),
        ("auth.denied", "denied", ctx.audit.label(f"Bearer {unknown}"), "unauthenticated", "run-0123456789ab",
         {"status": 401, "reason": "unknown token id", "route": "GET /api/v1/runs/{run_id}"}, 1),
        ("auth.denied", "denied", au_id, "auditor", None,
         {"status": 403, "reason": "needs the operator role", "route": "POST /api/v1/runs"}, 1),
    ]
    # The label is stable (same junk, same label), not the presented string, and the same in
    # a second service process over the same data folder (derived from the audit key).
    label = rows[1]["actor_token_id"]
    assert label.startswith("anon-") and len(label) == 21 and label == ctx.audit.label(f"Bearer {unknown}")
    assert create_app(Settings(data_dir=ctx.settings.data_dir)).state.ctx.audit.label(f"Bearer {unknown}") == label
    # No secret, and nothing of what was presented, in the database or the signed ledger.
    ledger_text = (ctx.settings.audit_dir / auth.AUDIT_LEDGER_FILE).read_text()
    with ctx.db.engine.connect() as conn:
        dump = json.dumps([dict(r) for r in conn.execute(sa.select(db.audit_log)).mappings()])
    for text in (ledger_text, dump):
        assert op_secret not in text and "A" * 43 not in text and "feedfacecafebeef" not in text
    entries = _ledger(ctx, tmp_path)
    assert [e.payload["actor"] for e in entries] == [f"unauthenticated:{op_id}", f"unauthenticated:{label}", f"auditor:{au_id}"]


def test_revoked_malformed_and_missing_credentials(limited):
    client, ctx, _, op, _ = limited
    info, token = ctx.tokens.create("operator", "gone")
    ctx.tokens.revoke(info.id)
    assert client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert client.get("/api/v1/whoami", headers={"Authorization": "Basic b3A6b3A="}).status_code == 401
    assert client.get("/api/v1/whoami").status_code == 401
    got = [(r["actor_token_id"], r["detail"]["reason"]) for r in _db_rows(ctx)]
    assert got == [(info.id, "revoked token"), (ctx.audit.label("Basic b3A6b3A="), "not a bearer token"),
                   ("anonymous", "no credentials")]


def test_rate_limit_coalesces_a_flood_of_denied_attempts(limited, tmp_path):
    """Burst 3, one more every 10 s: 10 junk tokens at once give 3 entries; the other 7 are
    counted and written as one coalesced entry once the bucket has a write again."""
    client, ctx, clock, _, au = limited
    for i in range(10):  # varying the junk does not buy more entries: one shared bucket
        assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer junk-{i}"}).status_code == 401
    assert [r["action"] for r in _db_rows(ctx)] == ["auth.denied"] * 3
    assert ctx.audit.held_attempts() == 7
    clock.now += 9.9  # not yet a whole write: a read of the log writes nothing more
    assert len(client.get("/api/v1/audit-log", headers=au).json()) == 3
    clock.now += 0.1
    log = client.get("/api/v1/audit-log", headers=au).json()
    assert len(log) == 4
    coalesced = log[0]
    assert (coalesced["action"], coalesced["outcome"], coalesced["actor_token_id"], coalesced["actor_role"],
            coalesced["attempts"]) == ("audit.coalesced", "coalesced", "unauthenticated", "unauthenticated", 7)
    assert coalesced["detail"]["by_reason"] == {"malformed token": 7}
    assert coalesced["detail"]["by_route"] == {"GET /api/v1/runs": 7}
    assert coalesced["detail"]["rate_limit"] == {"burst": 3, "per_minute": 6.0}
    assert sum(e["attempts"] for e in log) == 10  # every attempt is accounted for
    # The next flood: the bucket is empty again, so nothing is written...
    for i in range(50):
        client.get("/api/v1/runs", headers={"Authorization": f"Bearer more-junk-{i}"})
    assert len(ctx.audit.entries(limit=500)) == 4 and ctx.audit.held_attempts() == 50
    # ... until a write is back: the held count, then the attempt that found the write.
    clock.now += 10.0
    client.get("/api/v1/runs", headers={"Authorization": "Bearer last-junk"})
    newest = ctx.audit.entries(limit=2)
    assert [(e["action"], e["attempts"]) for e in newest] == [("auth.denied", 1), ("audit.coalesced", 50)]
    assert len(_ledger(ctx, tmp_path)) == 6  # 61 denied requests, 6 signed entries


def test_rate_limit_refuses_changes_beyond_it_with_429_and_counts_them(limited):
    client, ctx, clock, op, _ = limited
    made = [client.post("/api/v1/runs", json={**VALID_RUN, "name": f"r{i}"}, headers=op) for i in range(3)]
    assert [r.status_code for r in made] == [201, 201, 201]
    refused = client.post("/api/v1/runs", json={**VALID_RUN, "name": "r3"}, headers=op)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
    assert refused.json()["title"] == "Too Many Requests"
    with ctx.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.runs)).scalar() == 3  # nothing was created
    # Reads are never limited.
    assert client.get("/api/v1/runs", headers=op).status_code == 200
    clock.now += 10.0
    assert client.post("/api/v1/runs", json={**VALID_RUN, "name": "r4"}, headers=op).status_code == 201
    rows = _db_rows(ctx)
    assert [(r["action"], r["outcome"], r["attempts"]) for r in rows] == [
        ("run.create", "ok", 1), ("run.create", "ok", 1), ("run.create", "ok", 1),
        ("audit.coalesced", "coalesced", 1), ("run.create", "ok", 1),
    ]
    assert rows[3]["detail"]["by_reason"] == {"rate limited": 1}
    assert rows[3]["detail"]["by_action"] == {"POST /api/v1/runs": 1}


def test_held_attempts_are_written_at_shutdown(tmp_path):
    clock = FakeClock()
    app = create_app(Settings(data_dir=tmp_path, audit_burst=1, audit_per_minute=1.0), clock=clock)
    ctx = app.state.ctx
    with TestClient(app) as client:
        for _ in range(4):
            client.get("/api/v1/runs")
    assert [(e["action"], e["attempts"]) for e in ctx.audit.entries()] == [("audit.coalesced", 3), ("auth.denied", 1)]


def test_a_422_lists_every_problem_at_once(limited):
    client, ctx, _, op, _ = limited
    body = {**VALID_RUN, "rounds": 0, "secagg_threshold": 9, "sampling_rate": None, "target_epsilon": 2.0,
            "dataset": "nowhere", "surprise": 1}
    r = client.post("/api/v1/runs", json=body, headers=op)
    assert r.status_code == 422
    problem = r.json()
    assert sorted((e["field"], e["message"]) for e in problem["errors"]) == sorted([
        ("surprise", "unknown field"),
        ("rounds", "Input should be greater than or equal to 1"),
        ("secagg_threshold", "threshold (9) is above the number of shares (secagg_num_neighbours = 3)"),
        ("sampling_rate", "required with poisson sampling"),
        ("target_epsilon", "give exactly one of target_epsilon and noise_multiplier"),
        ("dataset", "unknown dataset; known datasets: demo, synthetic, soccermon, lifesnaps"),
    ])
    for e in problem["errors"]:
        assert f"{e['field']}: {e['message']}" in problem["detail"]
    # Field-level problems only (what pydantic alone would report) still come with the
    # cross-field ones of the fields that are valid.
    r = client.post("/api/v1/runs", json={**VALID_RUN, "rounds": "many", "cohort_size": 3}, headers=op)
    assert sorted(e["field"] for e in r.json()["errors"]) == ["cohort_size", "rounds"]
    assert client.post("/api/v1/runs", json=[1, 2], headers=op).json()["errors"] == [
        {"field": "body", "message": "must be a JSON object (the run configuration)"}]
    # Every invalid attempt by the operator is in the audit log, with all its problems.
    invalid = [r for r in _db_rows(ctx) if r["outcome"] == "invalid"]
    assert len(invalid) == 3 and len(invalid[0]["detail"]["errors"]) == 6


def test_no_response_shows_the_audit_keys_server_path(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "srv"))
    ctx = app.state.ctx
    _, op = ctx.tokens.create("operator", "olga")
    _, au = ctx.tokens.create("auditor", "arne")
    secret_paths = (str(ctx.settings.data_dir), "audit_key_path", "audit-key.pem")
    with TestClient(app) as client:
        run = client.post("/api/v1/runs", json=VALID_RUN, headers={"Authorization": f"Bearer {op}"})
        run_id = run.json()["id"]
        # The runner still gets the key's path: it is in config.json, never in an answer.
        on_disk = json.loads((ctx.runs.runs_dir / run_id / "config.json").read_text())
        assert on_disk["audit_key_path"] == str(ctx.settings.audit_dir / auth.AUDIT_KEY_FILE)
        bodies = [run.text]
        for token in (op, au):
            h = {"Authorization": f"Bearer {token}"}
            for path in ("/api/v1/runs", f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/rounds",
                         f"/api/v1/runs/{run_id}/ledger", "/api/v1/audit-log", "/api/v1/whoami", "/api/v1/openapi.json"):
                r = client.get(path, headers=h)
                assert r.status_code == 200, path
                bodies.append(r.text)
            client.post("/login", data={"token": token})
            for page in ("/", f"/runs/{run_id}", f"/runs/{run_id}/report"):
                r = client.get(page)
                assert r.status_code == 200, page
                bodies.append(r.text)
            client.cookies.clear()
        bodies.append(client.post(f"/api/v1/runs/{run_id}/stop", headers={"Authorization": f"Bearer {op}"}).text)
    for body in bodies:
        for secret in secret_paths:
            assert secret not in body


def test_token_create_out_writes_a_0600_file_and_prints_nothing_secret(tmp_path):
    from restwise.cli import app

    runner = CliRunner()
    out = tmp_path / "olga.token"
    args = ["server", "token", "create", "--role", "operator", "--name", "olga", "--data-dir", str(tmp_path / "srv")]
    r = runner.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    token = out.read_text().strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert auth.TOKEN_RE.match(token) and token.split("_", 2)[2] not in r.output and token not in r.output
    assert f"written to {out}" in r.output
    store = auth.TokenStore(db.Database.open(db.default_database_url(tmp_path / "srv")))
    assert store.authenticate(token).name == "olga"
    # An existing file is never overwritten, and no token is created for the refused call.
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert out.read_text().strip() == token and len(store.list()) == 1
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "link")]).exit_code == 2
    assert not (tmp_path / "elsewhere").exists()
    as_json = runner.invoke(app, [*args, "--out", str(tmp_path / "j.token"), "--json"])
    line = json.loads(as_json.stdout)
    assert as_json.exit_code == 0 and "token" not in line and line["file"] == str(tmp_path / "j.token")
    assert (tmp_path / "j.token").read_text().strip() not in as_json.output
