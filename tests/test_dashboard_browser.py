"""The dashboard in a real browser: Playwright drives Debian's Chromium (headless) against a
real uvicorn server. It signs in with a token, opens a finished run and checks that the ε
curve and the numbers on the page match the API. A screenshot is kept under artifacts/."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_service_support import LiveServer, create_token  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small real run (the Flower simulation runner), finished before the browser opens it."""
    data_dir = tmp_path_factory.mktemp("dashboard")
    operator = create_token(data_dir, "operator", "olga")
    auditor = create_token(data_dir, "auditor", "arne")
    server = LiveServer(data_dir)
    try:
        with server.client(operator) as c:
            run = c.post(
                "/api/v1/runs",
                json={"name": "browser-pilot", "dataset": "demo", "rounds": 3, "population": 4, "persons": 4,
                      "sampling": "poisson", "sampling_rate": 1.0, "target_epsilon": 6.0,
                      "secagg_num_neighbours": 3, "secagg_threshold": 2, "force": True},
            ).json()
            assert c.post(f"/api/v1/runs/{run['id']}/start").status_code == 200
            deadline = time.monotonic() + 420
            while c.get(f"/api/v1/runs/{run['id']}").json()["status"] not in ("completed", "failed", "stopped", "refused"):
                assert time.monotonic() < deadline, "the run did not finish"
                time.sleep(1)
            detail = c.get(f"/api/v1/runs/{run['id']}").json()
        yield server, operator, auditor, detail
    finally:
        server.stop()


def test_sign_in_open_finished_run_and_read_the_epsilon_curve(browser, finished_run):
    server, _, auditor, run = finished_run
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    try:
        response = page.goto(server.base + "/")
        assert response.status == 401  # no session: the sign-in form, nothing else
        page.get_by_label("API token").fill(auditor)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(server.base + "/")
        assert "arne" in page.inner_text("header")
        row = page.locator("table.runs tbody tr").first
        assert "completed" in row.inner_text() and f"{run['rounds'][-1]['epsilon']:.4g}" in row.inner_text()
        assert row.locator(".epsilon-cap").inner_text() == "10"
        assert row.locator(".epsilon-remaining").inner_text().startswith(f"{6 - run['epsilon_spent']:.4g} of 6")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-runs.png"), full_page=True)
        page.get_by_role("link", name="browser-pilot").click()
        page.wait_for_url(re.compile(r".*/runs/run-[0-9a-f]{12}$"))

        rounds = run["rounds"]
        assert run["status"] == "completed", run["reason"]
        n = run["planned_rounds"]
        assert len(rounds) == n == 3
        assert page.inner_text("#run-status") == "completed"
        assert page.locator("#run-reason").count() == 0  # no stale progress note
        assert page.inner_text("#rounds-completed") == "3 of 3"
        last_eps = rounds[-1]["epsilon"]
        assert page.inner_text("#epsilon-spent") == f"{last_eps:.4g}"
        assert page.inner_text("#epsilon-budget") == "6"
        # Full participation: nothing to amplify, the third-party value is the same number.
        assert page.inner_text("#epsilon-amplified") == f"{last_eps:.4g}"
        # What remains of the budget, and the cap in force when the run started (the default 10:
        # the service sets none), recorded at start.
        assert run["epsilon_cap"] == 10.0 and page.inner_text("#epsilon-cap") == "10"
        assert page.inner_text("#epsilon-remaining") == f"{6 - run['epsilon_spent']:.4g}"
        sampled = sum(r["sampled"] for r in rounds)
        survived = sum(r["survived"] for r in rounds)
        assert page.inner_text("#clients") == f"{sampled} / {survived}"

        chart = page.locator("svg#epsilon-chart")
        assert chart.is_visible()
        assert chart.get_attribute("role") == "img"
        points = page.locator("svg#epsilon-chart circle.eps-point")
        assert points.count() == n
        assert [float(points.nth(i).get_attribute("data-epsilon")) for i in range(n)] == pytest.approx(
            [r["epsilon"] for r in rounds], rel=1e-5
        )
        # The curve rises and the budget line sits above its end (smaller y = higher).
        ys = [float(points.nth(i).get_attribute("cy")) for i in range(n)]
        assert ys == sorted(ys, reverse=True)
        budget_y = float(page.locator("#budget-line").get_attribute("y1"))
        assert budget_y < ys[-1]
        assert "budget ε = 6" in chart.text_content()
        table = page.locator("#rounds-table tbody tr")
        assert table.count() == n
        # The survivors' mean loss released from the loss slot (no device's loss is sent).
        assert f"{rounds[1]['train_loss']:.4f}" in table.nth(1).inner_text()
        assert page.locator("#last-loss").inner_text() == f"{rounds[-1]['train_loss']:.4f}"

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)

        page.locator("#report-link").click()
        page.wait_for_url(re.compile(r".*/report$"))
        assert page.locator("#bundle-download").is_visible()
        with page.expect_download() as info:
            page.locator("#bundle-download").click()
        download = info.value
        assert download.suggested_filename == f"{run['id']}-verification.zip"
        page.screenshot(path=str(ARTIFACTS / "dashboard-report.png"), full_page=True)
    finally:
        page.close()
