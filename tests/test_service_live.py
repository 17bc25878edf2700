"""The service as a real uvicorn process on 127.0.0.1: role and token checks for every route
(table-driven over the OpenAPI schema, so a route added without an entry here fails), and
schemathesis against the schema with valid tokens (no server errors)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_service_support import LiveServer, create_token  # noqa: E402

from restwise.server.service import Settings, create_app  # noqa: E402

pytestmark = pytest.mark.slow

VALID_RUN = {
    "name": "matrix",
    "rounds": 2,
    "population": 4,
    "sampling": "poisson",
    "sampling_rate": 0.5,
    "noise_multiplier": 1.0,
    "secagg_num_neighbours": 3,
    "secagg_threshold": 2,
    "force": True,  # the network under DP on 4 devices: the planner refuses it unless forced
}

# Who may call what. Every route of the app must be listed; "read" = operator and auditor.
ACCESS = {
    ("GET", "/api/v1/health"): "public",
    ("GET", "/login"): "public",
    ("POST", "/login"): "public",  # it takes a token in the form; a bad one gets 401
    ("POST", "/logout"): "session",
    ("GET", "/api/v1/openapi.json"): "read",
    ("GET", "/api/v1/whoami"): "read",
    ("GET", "/api/v1/runs"): "read",
    ("POST", "/api/v1/runs"): "operator",
    ("GET", "/api/v1/runs/{run_id}"): "read",
    ("POST", "/api/v1/runs/{run_id}/start"): "operator",
    ("POST", "/api/v1/runs/{run_id}/stop"): "operator",
    ("POST", "/api/v1/runs/{run_id}/resume"): "operator",
    ("GET", "/api/v1/runs/{run_id}/rounds"): "read",
    ("GET", "/api/v1/runs/{run_id}/ledger"): "read",
    ("GET", "/api/v1/runs/{run_id}/files/{name}"): "read",
    ("GET", "/api/v1/runs/{run_id}/bundle"): "read",
    ("GET", "/api/v1/audit-log"): "read",
    ("GET", "/api/v1/audit-log/ledger"): "read",
    ("GET", "/api/v1/public-key"): "read",
    ("GET", "/"): "read",
    ("GET", "/runs/{run_id}"): "read",
    ("GET", "/runs/{run_id}/report"): "read",
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("service-live")
    operator = create_token(data_dir, "operator", "olga")
    auditor = create_token(data_dir, "auditor", "arne")
    revoked = create_token(data_dir, "operator", "gone")
    server = LiveServer(data_dir)
    try:
        yield server, operator, auditor, revoked
    finally:
        server.stop()


def test_every_route_is_in_the_schema_and_in_the_access_table(tmp_path, live):
    server, operator, _, _ = live
    with server.client(operator) as c:
        schema = c.get("/api/v1/openapi.json").json()
    in_schema = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert in_schema == set(ACCESS), "a route was added or removed: give it an entry in ACCESS"
    # No route hides from the schema (and so from this test), except the static files mount.
    app = create_app(Settings(data_dir=tmp_path))
    in_app = {(m, r.path) for r in app.routes if hasattr(r, "methods") for m in r.methods if m != "HEAD"}
    assert in_app == set(ACCESS)
    assert {r.path for r in app.routes if not hasattr(r, "methods")} == {"/static"}
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def _fill(path: str, run_id: str) -> str:
    return path.replace("{run_id}", run_id).replace("{name}", "report.json")


def _call(client, method: str, path: str, body: dict | None = None):
    if method == "GET":
        return client.get(path)
    if path == "/login":
        return client.post(path, data={"token": "rw_bad"})
    return client.post(path, json=body) if body is not None else client.post(path)


def test_tokens_and_roles_on_every_route(live):
    server, operator, auditor, revoked = live
    with server.client(operator) as op:
        run_id = op.post("/api/v1/runs", json=VALID_RUN).json()["id"]
        # Stopped before it starts, so calling /start below never launches anything.
        assert op.post(f"/api/v1/runs/{run_id}/stop").json()["status"] == "stopped"
        revoked_id = revoked.split("_")[1]
    out = subprocess.run(
        [sys.executable, "-m", "restwise.cli", "server", "token", "revoke", revoked_id, "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    clients = {
        "none": server.client(),
        "garbage": server.client("not-a-token"),
        "forged": server.client("rw_" + revoked_id + "_" + "A" * 43),
        "revoked": server.client(revoked),
        "auditor": server.client(auditor),
        "operator": server.client(operator),
    }
    failures = []
    server_paths = (str(server.data_dir), "audit_key_path")  # shown to no role, on no route
    for (method, path), access in sorted(ACCESS.items()):
        url = _fill(path, run_id)
        body = VALID_RUN if (method, path) == ("POST", "/api/v1/runs") else None
        for who, client in clients.items():
            response = _call(client, method, url, body)
            status = response.status_code
            if path != "/api/v1/runs/{run_id}/bundle":  # a zip (its files are checked in test_service_flow)
                failures += [f"{who:8} {method} {path} shows {p!r}" for p in server_paths if p in response.text]
            if access == "public":
                ok = status != 403 and status < 500 and (path != "/login" or method == "GET" or status == 401)
            elif access == "session" or who in ("none", "garbage", "forged", "revoked"):
                ok = status == 401
            elif access == "operator" and who == "auditor":
                ok = status == 403
            else:
                ok = status not in (401, 403) and status < 500
            if not ok:
                failures.append(f"{who:8} {method} {path} -> {status} (expected {access})")
    for c in clients.values():
        c.close()
    assert not failures, "\n".join(failures)
    # Every denied attempt above is in the audit log: 401s with a token id or a label, 403s
    # with the auditor's id (within the default rate limit: a burst of 30 per key).
    with server.client(auditor) as au:
        denied = au.get("/api/v1/audit-log", params={"action": "auth.denied", "limit": 500}).json()
        coalesced = au.get("/api/v1/audit-log", params={"action": "audit.coalesced", "limit": 500}).json()
    forbidden = [e for e in denied if e["detail"]["status"] == 403]
    assert {e["actor_token_id"] for e in forbidden} == {auditor.split("_")[1]}
    assert {e["detail"]["route"] for e in forbidden} == {f"{m} {p}" for (m, p), a in ACCESS.items() if a == "operator"}
    by_actor = {e["actor_token_id"] for e in denied if e["detail"]["status"] == 401}
    assert revoked_id in by_actor and "anonymous" in by_actor
    assert {"revoked token", "wrong secret", "malformed token", "no credentials"} <= {e["detail"]["reason"] for e in denied}
    assert not any(t in json.dumps(denied + coalesced) for t in (operator, auditor, revoked, "not-a-token"))


def test_unknown_run_path_tricks_and_body_limit_on_the_wire(live):
    server, operator, auditor, _ = live
    with server.client(auditor) as c:
        assert c.get("/api/v1/runs/run-000000000000").status_code == 404
        for path in (
            "/api/v1/runs/run-000000000000/files/report.json",
            "/api/v1/runs/..%2F..%2Fetc/files/passwd",
            "/api/v1/runs/run-000000000000/files/..%2F..%2Frestwise-server.db",
            "/runs/run-000000000000",
        ):
            r = c.get(path)
            assert 400 <= r.status_code < 500, (path, r.status_code)
    with server.client(operator) as c:
        r = c.post("/api/v1/runs", content=b"x" * (2 * 1024 * 1024), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(200):
                yield b"x" * 1024

        r = c.post("/api/v1/runs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = c.post("/api/v1/runs", content=b'{"name": ', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "Traceback" not in r.text


def test_schemathesis_finds_no_server_errors(live, tmp_path):
    server, operator, _, _ = live
    with server.client(operator) as c:
        schema = c.get("/api/v1/openapi.json").json()
        # Test data: a real run id (stopped, so /start answers 409 and never launches a run)
        # next to an unknown one, so the per-run routes are exercised beyond their 404.
        run_id = c.post("/api/v1/runs", json={**VALID_RUN, "name": "fuzzed"}).json()["id"]
        c.post(f"/api/v1/runs/{run_id}/stop")
    for ops in schema["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "run_id":
                    param["schema"] = {"type": "string", "enum": [run_id, "run-000000000000"]}
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(schema))
    st = Path(sys.executable).with_name("st")
    out = subprocess.run(
        [
            str(st), "run", str(schema_file),
            "--url", server.base,
            "-H", f"Authorization: Bearer {operator}",
            "--checks", "not_a_server_error",
            "--max-examples", "15",
            "--seed", "20261125",
            "--workers", "1",
            "--max-time", "30",
            "--phases", "examples,coverage,fuzzing",
            "--request-timeout", "30",
            "--suppress-health-check", "all",
            "--report-dir", str(tmp_path / "st-report"),
        ],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout, tail
    print("\n".join(line for line in out.stdout.splitlines()[-40:] if line.strip()))  # the summary, with -s
    server_log = server.log.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
    # Without --verbose: one line saying where the service is, no uvicorn INFO lines.
    assert server_log.startswith(f"Restwise service on http://127.0.0.1:{server.port} ")
    assert "INFO" not in server_log, server_log[:2000]


def test_runs_cli_talks_to_the_service(live, tmp_path):
    from test_service_support import cli

    server, _, auditor, _ = live
    # A token of its own: the fuzzing above may have used up the other's audit rate limit.
    from restwise.server import auth, db

    _, operator = auth.TokenStore(db.Database.open(db.default_database_url(server.data_dir))).create("operator", "olga-cli")
    (tmp_path / "op.token").write_text(operator + "\n")
    (tmp_path / "au.token").write_text(auditor + "\n")
    (tmp_path / "run.json").write_text(json.dumps({**VALID_RUN, "name": "from-cli"}))
    out = cli("server", "runs", "create", str(tmp_path / "run.json"), "--url", server.base, "--token-file", str(tmp_path / "op.token"))
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split()[0]
    assert "from-cli" in out.stdout and "status=created" in out.stdout
    out = cli("server", "runs", "stop", run_id, "--url", server.base, "--token-file", str(tmp_path / "au.token"))
    assert out.returncode == 1 and "403" in out.stderr and "operator role" in out.stderr
    (tmp_path / "bad.json").write_text(json.dumps({**VALID_RUN, "secagg_threshold": 9, "rounds": 0, "noise_multiplier": None}))
    out = cli("server", "runs", "create", str(tmp_path / "bad.json"), "--url", server.base, "--token-file", str(tmp_path / "op.token"))
    assert out.returncode == 1 and "(422) Invalid run configuration: 3 problem(s)" in out.stderr
    listed = [line.strip() for line in out.stderr.splitlines() if line.startswith("  - ")]
    assert listed == [  # every problem at once, one a line
        "- rounds: Input should be greater than or equal to 1",
        "- secagg_threshold: threshold (9) is above the number of shares (secagg_num_neighbours = 3)",
        "- target_epsilon: give exactly one of target_epsilon and noise_multiplier",
    ]
    # The planner at creation: the network under DP on 4 devices is refused with the numbers,
    # unless the operator forces it (issue 12).
    (tmp_path / "net.json").write_text(json.dumps({**VALID_RUN, "name": "net-small", "force": False}))
    args = ("server", "runs", "create", str(tmp_path / "net.json"), "--url", server.base, "--token-file", str(tmp_path / "op.token"))
    out = cli(*args)
    assert out.returncode == 1 and "409" in out.stderr and "noise-to-signal" in out.stderr and "force" in out.stderr
    out = cli(*args, "--force")
    assert out.returncode == 0 and "net-small" in out.stdout, out.stderr


PROGRESS_CONTRACT_RUNNER = """
import json, os, signal, sys, time
from pathlib import Path
from restwise.server.rundir import append_progress
run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
rounds = json.loads((run_dir / "config.json").read_text())["rounds"]
stop = {"now": False}
signal.signal(signal.SIGTERM, lambda *a: stop.update(now=True))
def state(status, rnd):
    (run_dir / "state.tmp").write_text(json.dumps({"status": status, "current_round": rnd, "reason": None}))
    os.replace(run_dir / "state.tmp", run_dir / "state.json")
state("running", 0)
for rnd in range(1, rounds + 1):
    for stage in ("hello", "collect-masked"):
        if stop["now"] or (run_dir / "STOP").exists():
            state("stopped", rnd - 1); sys.exit(0)
        append_progress(run_dir, stage, rnd=rnd, expected=3, received=2)
        time.sleep(1.0)
    with open(run_dir / "rounds.jsonl", "a") as f:
        f.write(json.dumps({"round": rnd, "sampled": 3, "survived": 2, "dropped": 1, "epsilon": 0.1 * rnd,
                            "delta": 1e-5, "status": "completed"}) + "\\n")
    state("running", rnd)
state("completed", rounds)
"""


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory):
    """`--runner-command` swaps the executor for a small script that follows the runner's file
    contract, progress file included (written with the round's own helper)."""
    root = tmp_path_factory.mktemp("contract")
    script = root / "progress_runner.py"
    script.write_text(PROGRESS_CONTRACT_RUNNER)
    data_dir = root / "srv"
    operator = create_token(data_dir, "operator", "olga")
    server = LiveServer(data_dir, runner_command=(sys.executable, str(script)))
    try:
        yield server, operator
    finally:
        server.stop()


def test_operator_stops_a_running_run_on_the_wire(contract_server):
    """The service's stop reaches the running process."""
    server, operator = contract_server
    with server.client(operator) as op:
        # 999 rounds spend about 633 against the server: only with the run's cap raised explicitly.
        run_id = op.post("/api/v1/runs", json={**VALID_RUN, "rounds": 999, "max_epsilon": 1000}).json()["id"]
        assert op.post(f"/api/v1/runs/{run_id}/start").status_code == 200
        deadline = time.monotonic() + 60
        while op.get(f"/api/v1/runs/{run_id}").json()["current_round"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert op.post(f"/api/v1/runs/{run_id}/stop").status_code == 200
        while (run := op.get(f"/api/v1/runs/{run_id}").json())["status"] not in ("stopped", "failed", "completed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert run["status"] == "stopped"
        assert 1 <= run["current_round"] == len(run["rounds"]) < 999
        assert run["progress"] is None  # a run that ended has no current stage
        actions = [e["action"] for e in op.get("/api/v1/audit-log").json()]
        assert actions[:3] == ["run.stop", "run.start", "run.create"]


def test_runs_show_watch_follows_rounds_and_stages_to_one_outcome_line(contract_server, tmp_path):
    from test_service_support import cli

    server, operator = contract_server
    with server.client(operator) as op:
        run_id = op.post("/api/v1/runs", json={**VALID_RUN, "name": "watched", "rounds": 2}).json()["id"]
        assert op.post(f"/api/v1/runs/{run_id}/start").status_code == 200
        deadline = time.monotonic() + 30
        while (run := op.get(f"/api/v1/runs/{run_id}").json())["progress"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The API shows where the round is: counts and the stage name only.
        assert set(run["progress"]) == {"at", "round", "attempt", "stage", "expected", "received", "dropped"}
        assert (run["progress"]["round"], run["progress"]["stage"]) == (1, "hello")
    (tmp_path / "op.token").write_text(operator + "\n")
    out = cli("server", "runs", "show", run_id, "--watch", "--url", server.base, "--token-file", str(tmp_path / "op.token"),
              timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{run_id}  watched  2 rounds"
    assert lines[-1] == f"completed ({run_id}): 2 of 2 rounds released, ε = 0.2 at δ = 1e-05"
    released = [f"round {rnd}/2 released: 3 sampled, 2 survived, ε = {0.1 * rnd:.4g}" for rnd in (1, 2)]
    assert [line for line in lines if "released:" in line] == released
    # Stages as they were seen (each lasts about one poll of the watch; a loaded machine may
    # skip one): in order, each belonging before its round's line.
    stages = [line for line in lines if line.startswith("round ") and ": " in line and "released" not in line]
    order = [f"round {r}/2: {s}, 2 of 3 replies" for r in (1, 2) for s in ("hello", "collect-masked")]
    assert stages and stages == [line for line in order if line in stages]
    for line in stages:
        rnd = int(line.split()[1].split("/")[0])
        assert lines.index(line) < lines.index(released[rnd - 1])


def test_a_flood_of_junk_tokens_on_the_wire_adds_a_bounded_number_of_entries(tmp_path):
    """A real uvicorn service with a tiny audit limit (2 at once, practically no refill): 40
    requests with junk tokens give 2 entries while it runs, and one coalesced entry counting
    the other 38 when it shuts down; the signed ledger holds exactly those 3."""
    from restwise.privacy.ledger import load_public_key, verify_ledger_file
    from restwise.server import auth, db

    data_dir = tmp_path / "srv"
    server = LiveServer(data_dir, "--audit-burst", "2", "--audit-per-minute", "0.01")
    try:
        with server.client() as c:
            for i in range(40):
                assert c.get("/api/v1/runs", headers={"Authorization": f"Bearer junk-{i}"}).status_code == 401
        database = db.Database.open(db.default_database_url(data_dir))
        with database.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(db.audit_log)).scalar() == 2
    finally:
        server.stop()
    rows = auth.AuditTrail(database, auth.open_audit_ledger(data_dir / "audit")[0]).entries()
    assert [(r["action"], r["attempts"]) for r in rows] == [("audit.coalesced", 38), ("auth.denied", 1), ("auth.denied", 1)]
    assert rows[0]["detail"]["by_reason"] == {"malformed token": 38}
    assert all(f"junk-{i}" not in json.dumps(rows) for i in range(40))
    pem = (data_dir / "audit" / auth.AUDIT_PUBLIC_KEY_FILE).read_bytes()
    entries, _ = verify_ledger_file(data_dir / "audit" / auth.AUDIT_LEDGER_FILE, load_public_key(pem))
    assert [e.payload["action"] for e in entries] == ["auth.denied", "auth.denied", "audit.coalesced"]
