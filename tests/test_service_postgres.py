"""The same SQL layer on a real PostgreSQL server: a throwaway cluster (initdb + postgres on a
free loopback port), the service's migrations, tokens, runs and audit log through the API.
Skipped when the PostgreSQL server binaries or the psycopg driver are not installed."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg")
    initdb = shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb"
    server = shutil.which("postgres") or "/usr/lib/postgresql/15/bin/postgres"
    if not (Path(initdb).exists() and Path(server).exists()):
        pytest.skip("PostgreSQL server binaries are not installed")
    # Outside pytest's root-only temp tree, so the postgres account can reach it.
    folder = Path(tempfile.mkdtemp(prefix="restwise-pg-"))
    data = folder / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its own account
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' account")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "restwise", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    port = _free_port()
    proc = subprocess.Popen(
        [*prefix, server, "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1", "-k", str(folder), "-c", "fsync=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"postgresql+psycopg://restwise@127.0.0.1:{port}/postgres"
    import sqlalchemy as sa

    deadline = time.monotonic() + 30
    while True:
        try:
            engine = sa.create_engine(url)
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            engine.dispose()
            break
        except sa.exc.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.terminate()
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.3)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def test_service_runs_on_postgresql(postgres_url, tmp_path):
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from restwise.server import db
    from restwise.server.service import Settings, create_app

    app = create_app(Settings(data_dir=tmp_path, database_url=postgres_url))
    ctx = app.state.ctx
    assert ctx.db.engine.dialect.name == "postgresql"
    assert ctx.db.current_version() == db.SCHEMA_VERSION
    _, op = ctx.tokens.create("operator", "olga")
    _, au = ctx.tokens.create("auditor", "arne")
    body = {"name": "pg", "rounds": 2, "population": 4, "sampling": "poisson", "sampling_rate": 0.5,
            "noise_multiplier": 1.0, "secagg_num_neighbours": 3, "secagg_threshold": 2, "force": True}
    with TestClient(app) as client:
        created = client.post("/api/v1/runs", json=body, headers={"Authorization": f"Bearer {op}"})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        assert client.post(f"/api/v1/runs/{run_id}/stop", headers={"Authorization": f"Bearer {op}"}).json()["status"] == "stopped"
        listed = client.get("/api/v1/runs", headers={"Authorization": f"Bearer {au}"}).json()
        assert [r["id"] for r in listed] == [run_id] and listed[0]["config"]["rounds"] == 2
        log = client.get("/api/v1/audit-log", headers={"Authorization": f"Bearer {au}"}).json()
        assert [e["action"] for e in log] == ["run.stop", "run.create"]
        assert log[0]["seq"] > log[1]["seq"]  # SERIAL ids on PostgreSQL
    with ctx.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.tokens)).scalar() == 2
    # Reopening the migrated database applies nothing.
    assert db.Database.open(postgres_url).migrate() == []
