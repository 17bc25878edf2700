"""The crash matrix on real parts: a real uvicorn service, the real simulation runner (Flower,
encrypted device stores, SecAgg+, DP, a signed ledger) killed with SIGKILL at named points by
the test-only hook (``$RESTWISE_TEST_CRASH_AT``, ``rundir.crash_point``), then continued
through the service - or outside it, by the CLI runner - and audited with the real
`restwise audit verify`.

Points covered: before-setup, report-written (between the report and its anchor),
report-anchored (between anchor and renames), report-renamed (between the renames and the
state), and inside a round (``rundir.ROUND_CRASH_POINTS``): after the setup, share-keys and
collect-masked-input stages, after the write-ahead ledger entry (no unmasking share asked for
yet), after the aggregate (model built, not stored), after the checkpoint (release.applied not
yet written).

For every point: the run ends (completed, stopped or refused by its budget, with its report),
the bundle verifies, and the service's ε for the run equals the ε its signed ledger gives. Inside
a round also: the ledger holds at least as many releases as any device took part in by its own
egress log, and the service's person spend equals the ledger's."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_service_support import LiveServer, cli, create_token  # noqa: E402

from restwise.privacy.accountant import PrivacyAccountant  # noqa: E402
from restwise.privacy.events import GaussianRoundEvent  # noqa: E402
from restwise.privacy.ledger import verify_ledger_file  # noqa: E402
from restwise.client.app import SIM_KEYSTORE_DIR, DeviceLocation, open_device_store  # noqa: E402
from restwise.privacy.secagg import records as SR  # noqa: E402
from restwise.server.rundir import CRASH_ENV, ROUND_CRASH_POINTS  # noqa: E402
from restwise.simulation.fleet import FLEET_DIR  # noqa: E402

pytestmark = pytest.mark.slow

RUN = {
    "name": "crash", "dataset": "demo", "rounds": 2, "population": 4, "persons": 4, "sampling": "poisson",
    "sampling_rate": 1.0, "target_epsilon": 3.0, "delta": 1e-5, "secagg_num_neighbours": 3, "secagg_threshold": 2,
    # DP-FedAvg on 4 devices: the planner refuses it as useless; here only the crashes matter.
    "force": True,
}
# The service launches this instead of the runner: it reads a one-shot crash point from
# DATA_DIR/crash_at (so each launch can crash somewhere else), then runs the real runner.
CRASHING_RUNNER = textwrap.dedent(
    f"""
    import os, sys
    from pathlib import Path
    run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
    flag = run_dir.parent.parent / "crash_at"
    try:
        point = flag.read_text().strip()
        flag.unlink()
    except FileNotFoundError:
        point = ""
    if point:
        os.environ[{CRASH_ENV!r}] = point
    from restwise.simulation.runner import main
    sys.exit(main(["run", "--run-dir", str(run_dir)]))
    """
)


def _service(root: Path, *extra: str):
    data_dir = root / "srv"
    data_dir.mkdir(parents=True)
    script = root / "crashing_runner.py"
    script.write_text(CRASHING_RUNNER)
    operator = create_token(data_dir, "operator", "olga")
    auditor = create_token(data_dir, "auditor", "arne")
    return LiveServer(data_dir, *extra, runner_command=(sys.executable, str(script))), operator, auditor


def _crash_next_launch(server: LiveServer, point: str) -> None:
    (server.data_dir / "crash_at").write_text(point)


def _wait(client, run_id: str, until, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.get(f"/api/v1/runs/{run_id}").json()
        if until(run):
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']} ({run['reason']})"
        time.sleep(0.5)


def _ended(run: dict) -> bool:
    return run["status"] in ("completed", "failed", "stopped", "refused", "interrupted")


def _ledger_releases(run_dir: Path, run_id: str) -> list[GaussianRoundEvent]:
    entries, _ = verify_ledger_file(run_dir / "ledger.jsonl")
    return [e.event for e in entries if e.kind == GaussianRoundEvent.kind and e.payload["run_id"] == run_id]


def _verified_bundle(server: LiveServer, token: str, run_id: str, tmp_path: Path) -> dict:
    """Fetch the bundle as an auditor, run the real `restwise audit verify` on it with the
    service's published key; return the report."""
    with server.client(token) as au:
        r = au.get(f"/api/v1/runs/{run_id}/bundle")
        assert r.status_code == 200, r.text
        key = au.get("/api/v1/public-key").content
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        zf.extractall(tmp_path)
    folder = tmp_path / run_id
    (tmp_path / "pinned.pem").write_bytes(key)
    out = cli("audit", "verify", str(folder / "report.json"), "--ledger", str(folder / "ledger.jsonl"),
              "--public-key", str(tmp_path / "pinned.pem"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list(folder.glob(".partial-*"))
    return json.loads((folder / "report.json").read_text())


def test_crashes_before_setup_and_inside_the_report_end_in_a_verifiable_bundle(tmp_path):
    server, operator, auditor = _service(tmp_path)
    try:
        with server.client(operator) as op:
            # 1. before-setup: the runner dies at once; the run is interrupted, saying how.
            _crash_next_launch(server, "before-setup")
            a = op.post("/api/v1/runs", json=RUN).json()["id"]
            assert op.post(f"/api/v1/runs/{a}/start").status_code == 200
            run = _wait(op, a, _ended, 60)
            assert run["status"] == "interrupted" and "killed by SIGKILL" in run["reason"], run["reason"]
            a_dir = server.data_dir / "runs" / a
            assert json.loads((a_dir / "state.json").read_text())["status"] == "interrupted"
            assert op.get(f"/api/v1/runs/{a}/bundle").status_code == 409
            # 2. resumed through the service's CLI; killed between its report and the anchor:
            #    the service finishes it (report rebuilt from the ledger and anchored).
            _crash_next_launch(server, "report-written")
            out = cli("server", "runs", "resume", a, "--url", server.base, env={"RESTWISE_API_TOKEN": operator})
            assert out.returncode == 0, out.stdout + out.stderr
            run = _wait(op, a, lambda r: r["status"] in ("completed", "failed", "stopped"))
            assert run["status"] == "completed", (run["reason"], (a_dir / "runner.log").read_text()[-2000:])
            assert "killed" not in (run["reason"] or "")
            releases = _ledger_releases(a_dir, a)
            assert [e.round for e in releases] == [1, 2] and run["releases"] == 2
            true_eps = PrivacyAccountant().epsilon(releases, RUN["delta"]).epsilon
            assert run["epsilon_spent"] == pytest.approx(true_eps, rel=1e-9)
            report = _verified_bundle(server, auditor, a, tmp_path / "a")
            assert report["epsilon"] == pytest.approx(true_eps, rel=1e-9)

            # 3. report-renamed, on a run stopped mid-way through the API: stopped, with a
            #    report and bundle over exactly the released rounds (issue 14 item 6).
            _crash_next_launch(server, "report-renamed")
            b = op.post("/api/v1/runs", json={**RUN, "rounds": 8, "target_epsilon": 8.0}).json()["id"]
            assert op.post(f"/api/v1/runs/{b}/start").status_code == 200
            _wait(op, b, lambda r: r["current_round"] >= 1 or _ended(r))
            assert op.post(f"/api/v1/runs/{b}/stop").status_code == 200
            run = _wait(op, b, lambda r: r["status"] in ("completed", "failed", "stopped"))
            assert run["status"] == "stopped", run["reason"]
            b_dir = server.data_dir / "runs" / b
            released = [r for r in op.get(f"/api/v1/runs/{b}/rounds").json() if r["status"] == "completed"]
            releases = _ledger_releases(b_dir, b)
            assert 1 <= len(releases) == len(released) == run["releases"] < 8
            report = _verified_bundle(server, auditor, b, tmp_path / "b")
            assert len(report["releases"]) == len(releases)
            assert report["epsilon"] == pytest.approx(PrivacyAccountant().epsilon(releases, RUN["delta"]).epsilon, rel=1e-9)
            assert run["epsilon_spent"] == pytest.approx(report["epsilon"], rel=1e-9)
    finally:
        server.stop()


def test_a_run_resumed_outside_the_service_counts_in_the_person_budget(tmp_path):
    """Run C is interrupted in the service, then resumed and finished by the CLI runner (killed
    after anchoring its report; the service renames the anchored files). Run D, within its own
    budget, is refused: with C's releases each person would exceed the person budget."""
    cap = 4.0
    server, operator, auditor = _service(tmp_path, "--person-epsilon-cap", str(cap))
    try:
        with server.client(operator) as op:
            _crash_next_launch(server, "before-setup")
            c = op.post("/api/v1/runs", json=RUN).json()["id"]
            assert op.post(f"/api/v1/runs/{c}/start").status_code == 200
            run = _wait(op, c, _ended, 60)
            assert run["status"] == "interrupted" and run["releases"] in (None, 0)
            c_dir = server.data_dir / "runs" / c
            out = subprocess.run(
                [sys.executable, "-m", "restwise.simulation.runner", "run", "--run-dir", str(c_dir)],
                capture_output=True, text=True, timeout=600, env={**os.environ, CRASH_ENV: "report-anchored"},
            )
            assert out.returncode == -9, out.stdout + out.stderr[-3000:]  # SIGKILL after the anchor
            run = _wait(op, c, lambda r: r["status"] in ("completed", "failed", "stopped"))
            assert run["status"] == "completed", run["reason"]
            releases = _ledger_releases(c_dir, c)
            assert len(releases) == 2 == run["releases"]
            _verified_bundle(server, auditor, c, tmp_path / "c")

            d = op.post("/api/v1/runs", json=RUN).json()["id"]
            r = op.post(f"/api/v1/runs/{d}/start")
            assert r.status_code == 409, r.text
            problem = r.json()
            spent = PrivacyAccountant().epsilon(releases, RUN["delta"]).epsilon
            assert problem["person_spent_epsilon"] == pytest.approx(spent, rel=1e-6)
            assert problem["projected_epsilon"] <= RUN["target_epsilon"] < cap < problem["person_projected_epsilon"]
    finally:
        server.stop()


def _device_releases(fleet: Path, run_id: str) -> int:
    """The most releases any one device of the run took part in, from the devices' own egress
    logs (their encrypted stores): a device's masked input of round r counts once per attempt of
    r whose unmasking some device answered (a masked input nobody unmasked reveals nothing)."""
    collects: list[Counter] = []
    unmasks: Counter = Counter()
    for folder in sorted(fleet.glob("device-*")):
        with open_device_store(DeviceLocation(folder, fleet / SIM_KEYSTORE_DIR)) as store:
            rows = [h for h in store.egress_history() if h["run_id"] == run_id]
        collects.append(Counter(h["round"] for h in rows if h["message_type"].endswith(SR.STAGE_COLLECT)))
        for rnd, n in Counter(h["round"] for h in rows if h["message_type"].endswith(SR.STAGE_UNMASK)).items():
            unmasks[rnd] = max(unmasks[rnd], n)
    return max((sum(min(n, unmasks[rnd]) for rnd, n in c.items()) for c in collects), default=0)


def test_the_stage_crash_points_name_real_stages():
    stages = [p.removeprefix("after-stage-") for p in ROUND_CRASH_POINTS if p.startswith("after-stage-")]
    assert stages == [SR.STAGE_SETUP, SR.STAGE_SHARE_KEYS, SR.STAGE_COLLECT]
    assert sorted(STAGE_POINTS + SPENDING_POINTS) == sorted(ROUND_CRASH_POINTS)


# Two runs, each crashed at several points inside its rounds (one point per launch, resumed
# through the service after each), so the two tests share the CI's two workers. The points that
# spend a release without applying it share the second run: each such crash adds a release
# (written ahead, then release.not-applied), and after two of them the run's budget - planned for
# its 2 rounds - refuses the third attempt: the run ends refused, with its bundle.
# (after-stage-setup opens the second run only to balance the two runs' launches.)
STAGE_POINTS = ("after-stage-share-keys", "after-stage-collect-masked-input", "after-checkpoint")
SPENDING_POINTS = ("after-stage-setup", "after-write-ahead", "after-aggregate")


@pytest.mark.parametrize("points", [STAGE_POINTS, SPENDING_POINTS], ids=["not-spending", "spending"])
def test_crashes_inside_a_round_never_under_count(tmp_path, points):
    cap = 4.0
    server, operator, auditor = _service(tmp_path, "--person-epsilon-cap", str(cap))
    try:
        with server.client(operator) as op:
            _crash_next_launch(server, points[0])
            a = op.post("/api/v1/runs", json=RUN).json()["id"]
            assert op.post(f"/api/v1/runs/{a}/start").status_code == 200
            a_dir = server.data_dir / "runs" / a
            for i, point in enumerate(points):
                run = _wait(op, a, _ended)
                log = (a_dir / "runner.log").read_text()[-2000:]
                assert run["status"] == "interrupted" and "killed by SIGKILL" in run["reason"], (point, run, log)
                releases = _ledger_releases(a_dir, a)
                assert run["releases"] in (None, len(releases)), (point, run["releases"], len(releases))
                assert len(releases) >= _device_releases(a_dir / FLEET_DIR, a), point
                if i + 1 < len(points):
                    _crash_next_launch(server, points[i + 1])
                assert op.post(f"/api/v1/runs/{a}/resume").status_code == 200, point
            run = _wait(op, a, lambda r: r["status"] in ("completed", "failed", "stopped", "refused"))
            releases = _ledger_releases(a_dir, a)
            took_part = _device_releases(a_dir / FLEET_DIR, a)
            if points == STAGE_POINTS:  # nothing spent twice: the run completes with its 2 releases
                assert run["status"] == "completed" and len(releases) == 2 == took_part, run
            else:  # each crash left one release spent, not applied; the third attempt is refused
                assert run["status"] == "refused" and "budget" in run["reason"], run
                assert [e.round for e in releases] == [1, 1] and took_part == 1, (releases, took_part)
            accountant = PrivacyAccountant()
            true_eps = accountant.epsilon(releases, RUN["delta"]).epsilon
            # the releases are alike (every device sampled and surviving): the devices' ε is that
            # of their count of releases
            assert true_eps >= accountant.epsilon(releases[:took_part], RUN["delta"]).epsilon
            assert run["epsilon_spent"] == pytest.approx(true_eps, rel=1e-9) and run["releases"] == len(releases)
            report = _verified_bundle(server, auditor, a, tmp_path / "bundle")
            assert report["epsilon"] == pytest.approx(true_eps, rel=1e-9)
            print(f"{points}: {len(releases)} releases in the ledger, devices took part in {took_part}; "
                  f"status {run['status']}; epsilon {true_eps:.4f}")

            # the person-budget check reads what the ledgers hold
            d = op.post("/api/v1/runs", json=RUN).json()["id"]
            r = op.post(f"/api/v1/runs/{d}/start")
            assert r.status_code == 409, r.text
            assert r.json()["person_spent_epsilon"] == pytest.approx(true_eps, rel=1e-6)
    finally:
        server.stop()
