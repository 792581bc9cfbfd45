"""``queuectl dashboard`` in a real browser: Playwright drives Debian's Chromium against a
real ``queuectl dashboard`` process, on both stores. Jobs run in a real worker while the
overview's counts change without a reload; a job's timeline opens; a dead job is retried;
a form on another site that posts to the dashboard is refused. Each page is
photographed into the test's folder (the README's pictures come from here)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import by_hand, needs, spawn, wait_for
from test_features import added, workers

from queuectl import ledger

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    needs(CHROMIUM, "apt-get install -y chromium")
    if os.environ.get("QUEUECTL_CI"):
        from playwright.sync_api import sync_playwright
    else:
        sync_api = pytest.importorskip("playwright.sync_api",
                                       reason="pip install -e '.[test]' (playwright)")
        sync_playwright = sync_api.sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture
def dashboard(db: Any) -> Iterator[str]:
    """A ``queuectl dashboard`` process on the test's database (created empty): its
    address."""
    ledger.connect(db).close()
    port = free_port()
    proc = spawn("dashboard", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or answers(url + "/static/dashboard.css"), 30,
                 "the dashboard to answer")
        assert proc.poll() is None, proc.communicate()
        yield url
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def last_type(db: Any, job_id: str) -> str:
    with by_hand(db) as conn:
        return str(conn.execute("SELECT type FROM events WHERE job_id = ? ORDER BY seq DESC",
                                (job_id,)).fetchone()[0])


def test_counts_change_live_a_timeline_opens_and_a_dead_job_is_retried(
        run: Any, db: Any, browser: Any, dashboard: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    for n in range(3):
        added(run, "-c", f"echo job {n}", "-q", "reports" if n else "default")
    broken = added(run, "-c", "echo 'out <b>of</b> disk' >&2; exit 7", "--max-retries", "0",
                   "--id", "nightly-backup")
    for args in (("add", "hourly", "--cron", "@hourly", "-c", "make report"),
                 ("pause", "hourly")):  # shown, but firing no job while the worker runs
        assert run("schedule", *args).exit_code == 0
    shots = tmp_path / "screenshots"
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

    page.goto(dashboard + "/")
    page.select_option("#poll-interval", "1")
    expect(page.locator("#count-pending")).to_have_text("4")
    page.evaluate("window.notReloaded = true")
    with workers() as start:
        start("--burst", "-s", "0.2")
        expect(page.locator("#count-completed")).to_have_text("3", timeout=30_000)
        expect(page.locator("#count-dead")).to_have_text("1", timeout=30_000)
    assert page.evaluate("window.notReloaded") is True  # redrawn in place by the poll
    expect(page.locator("#count-pending")).to_have_text("0")
    page.screenshot(path=shots / "overview.png")

    page.reload()  # the interval chosen is kept
    assert page.locator("#poll-interval").input_value() == "1"

    page.goto(dashboard + "/dlq")
    expect(page.locator("#dead-count")).to_have_text("1 dead job.")
    page.screenshot(path=shots / "dlq.png")
    page.click("details.confirm summary")  # while a confirm step is open, nothing redraws
    expect(page.locator("#retry-all-count")).to_have_text("1")
    added(run, "-c", "exit 1", "--max-retries", "0", "--id", "another")
    assert run("worker", "--burst").exit_code == 0
    time.sleep(2.5)
    expect(page.locator("#dead-count")).to_have_text("1 dead job.")
    page.click("details.confirm summary")
    expect(page.locator("#dead-count")).to_have_text("2 dead jobs.", timeout=10_000)
    page.click(f'a.id:text-is("{broken}")')
    expect(page.locator("h1")).to_have_text(f"Job {broken}")
    expect(page.locator("li.event-enqueued")).to_have_count(1)
    expect(page.locator("li.event-dead")).to_have_count(1)
    expect(page.locator("pre.output")).to_have_text("out <b>of</b> disk\n")  # text, not markup
    page.screenshot(path=shots / "job.png", full_page=True)

    page.click("text=Retry job")
    expect(page.locator(".flash")).to_contain_text(f"Job {broken} requeued")
    expect(page.locator("li.event-requeued")).to_have_count(1)
    assert last_type(db, broken) == "requeued"

    for name in ("jobs", "queues", "schedules", "workers"):
        page.goto(f"{dashboard}/{name}")
        expect(page.locator("h1")).to_be_visible()
        page.screenshot(path=shots / f"{name}.png")
    page.goto(dashboard + "/jobs?q=backup")
    expect(page.locator("tr[data-job]")).to_have_count(1)
    assert problems == []
    page.close()


def test_a_form_on_another_site_cannot_post_to_the_dashboard(
        run: Any, db: Any, browser: Any, dashboard: str) -> None:
    job_id = added(run, "-c", "exit 1", "--max-retries", "0")
    assert run("worker", "--burst").exit_code == 0
    evil = ("<form method=post action='" + dashboard + "/actions/retry'>"
            f"<input name=job value='{job_id}'><button>win a prize</button></form>")
    page = browser.new_page()
    page.route("http://evil.example/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=evil))
    page.goto("http://evil.example/")
    with page.expect_response(dashboard + "/actions/retry") as answer:
        page.click("button")
    assert answer.value.status == 403
    assert "did not come from the dashboard" in page.content()
    time.sleep(0.2)
    assert last_type(db, job_id) == "dead"
    page.close()
