"""``queuectl dashboard`` in a real browser: Playwright drives Debian's Chromium against a
real ``queuectl dashboard`` process, on both stores. Jobs run in a real worker while the
overview's counts change without a reload; a job's timeline opens; a dead job is retried;
a form on another site that posts to the dashboard is refused. Every page, with jobs in
every state, is photographed at 1400 and 420 px wide into the test's folder (the
dashboard guide's pictures come from here) and its layout checked: nothing wider than the window,
every job in a row of the overview's queue table, a header over every actions column."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import by_hand, needs, wait_for
from helpers import added, ok, serving, workers

from queuectl import claims, clock, decisions, ledger
from queuectl import events as ev

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
    with serving("dashboard") as port:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url + "/static/dashboard.css"), 30, "the dashboard to answer")
        yield url


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


# -- every page, wide and narrow --------------------------------------------------------------

WIDTHS = (1400, 420)


def an_hour_of_runs(db: Any) -> str:
    """Runs spread over the last hour, as a worker would have recorded them (the library's
    clock set back for each), so that the charts have something to draw in most slices;
    and a job that went to the DLQ twice, requeued in between. Returns that job's id."""
    start = clock.after(clock.now(), -3500)
    at = [start]

    def run_one(conn: Any, job_id: str, wait: float, duration: float, completed: bool) -> None:
        at[0] = clock.after(at[0], wait)
        got = claims.claim(conn, "w-earlier", ["reports", "default"])
        assert got is not None and got.job_id == job_id
        at[0] = clock.after(at[0], duration)
        result: ev.Event = ev.Completed(job_id=job_id, worker_id="w-earlier", attempt=got.attempt,
                                        duration=duration, output="done\n") if completed else \
            ev.Failed(job_id=job_id, worker_id="w-earlier", attempt=got.attempt, exit_code=7,
                      error="exit status 7", duration=duration, output="out of disk\n")
        claims.finish(conn, got, result)

    with pytest.MonkeyPatch.context() as patch, by_hand(db) as conn:
        patch.setattr(clock, "now", lambda: at[0])
        for n in range(40):
            at[0] = clock.after(start, n * 80)
            (job_id,) = decisions.enqueue(conn, [decisions.JobSpec(
                command=f"make report-{n}", queue="reports", max_retries=0)])
            run_one(conn, job_id, 0.2 + (n % 7) * 0.3, 0.05 + (n % 5) * 0.4, n % 9 != 4)
        at[0] = clock.after(start, 3300)
        (backup,) = decisions.enqueue(conn, [decisions.JobSpec(
            command="backup.sh --to /mnt/offsite", id="nightly-backup", max_retries=1,
            backoff_base=2)])
        for requeue in (True, False):
            for _ in range(2):
                run_one(conn, backup, 5, 1.5, False)
            if requeue:
                decisions.dlq_retry(conn, backup)
        (flaky,) = decisions.enqueue(conn, [decisions.JobSpec(
            command="flaky-sync", max_retries=3, backoff_base=1000)])
        run_one(conn, flaky, 30, 0.8, False)  # failed: its next run is minutes away
    return backup


def jobs_in_every_state(run: Any) -> None:
    """Jobs pending, scheduled, waiting and cancelled, and schedules, one paused."""
    first = added(run, "-c", "convert a.mp4 a.webm", "-q", "media", "-p", "5")
    added(run, "-c", "upload a.webm", "-q", "media", "--after", first)
    added(run, "-c", "send-digest --weekly", "--delay", "86400")
    ok(run, "cancel", added(run, "-c", "obsolete-task"))
    for args in (("add", "nightly", "--cron", "0 2 * * *", "-c", "backup.sh"),
                 ("add", "hourly", "--cron", "@hourly", "-c", "make report", "-q", "reports"),
                 ("pause", "hourly")):
        ok(run, "schedule", *args)


def queue_rows(page: Any) -> dict[str, dict[str, int]]:
    return page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll("table.queue-counts tr[data-queue]")].map(row => [
            row.dataset.queue, Object.fromEntries([...row.querySelectorAll("td[data-state]")]
                .map(td => [td.dataset.state, Number(td.textContent.replace(/,/g, ""))]))]))""")


def actions_column(page: Any) -> dict[str, Any]:
    """The header over the actions cells, how the first such cell lays out, and the gap
    between the controls of a queue's limit form (None where there is none)."""
    return page.evaluate("""() => {
        const cell = document.querySelector("td.actions");
        const head = document.querySelector("thead tr").children[cell.cellIndex];
        const input = cell.querySelector("input[type=number]");
        const button = input && input.parentElement.querySelector("button");
        return {header: head.textContent.trim(), display: getComputedStyle(cell).display,
                gap: input ? button.getBoundingClientRect().left
                             - input.getBoundingClientRect().right : null};
    }""")


def photograph(page: Any, url: str, shot: Path) -> None:
    """Open ``url``, photograph the whole page into ``shot``, and check that nothing on it
    is wider than the window (a wide table scrolls in its own box)."""
    page.goto(url)
    page.screenshot(path=shot, full_page=True)
    width = page.evaluate("window.innerWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width, shot.name
    header = page.evaluate("Math.max(...[...document.querySelectorAll('header *')]"
                           ".map(e => e.getBoundingClientRect().right))")
    assert header <= width, shot.name


def check_overview(page: Any, status: dict[str, int]) -> None:
    """Every job in one row of the queue table: each row adds up to its queue's total,
    each column to what ``status`` counts in that state."""
    rows = queue_rows(page)
    assert set(rows) == {"default", "media", "reports", "busy"}
    for queue, per_state in rows.items():
        assert sum(n for s, n in per_state.items() if s != "total") == per_state["total"], \
            queue
    assert {s: sum(r[s] for r in rows.values()) for s in status} == status
    assert page.locator("table.failures tr[data-job]").count() == 5
    assert page.locator("svg text.time").count() == 3 * 5


def check_actions_columns(page: Any, dashboard: str) -> None:
    for path in ("/queues", "/dlq", "/schedules"):
        page.goto(dashboard + path)
        column = actions_column(page)
        assert column["header"] == "Actions" and column["display"] == "table-cell", \
            (path, column)
        assert column["gap"] is None or column["gap"] >= 4, (path, column)


def test_every_page_fits_wide_and_narrow_and_its_tables_add_up(
        run: Any, db: Any, browser: Any, dashboard: str, tmp_path: Path) -> None:
    backup = an_hour_of_runs(db)
    jobs_in_every_state(run)
    busy = added(run, "-c", "sleep 600", "-q", "busy")
    pages = {"overview": "/", "jobs": "/jobs", "job": f"/jobs/{backup}", "dlq": "/dlq",
             "queues": "/queues", "schedules": "/schedules", "workers": "/workers",
             "not-found": "/jobs/no-such-job"}
    with workers() as start:
        start("-q", "busy")  # holds the busy job: processing, and a worker to show
        with by_hand(db) as conn:
            wait_for(lambda: conn.execute("SELECT state FROM jobs WHERE id = ?", (busy,)
                                          ).fetchone()[0] == "processing", 30, "the busy job")
        status = json.loads(ok(run, "status", "--json"))["jobs"]
        assert all(status.values()), status  # a job in every state
        for width in WIDTHS:
            page = browser.new_page(viewport={"width": width, "height": 900})
            for name, path in pages.items():
                photograph(page, dashboard + path, tmp_path / "screenshots" / f"{name}-{width}.png")
            page.goto(dashboard + "/")
            check_overview(page, status)
            check_actions_columns(page, dashboard)
            page.goto(f"{dashboard}/jobs/{backup}")
            runs = page.locator("section:has(h2:text-is('Runs')) > :is(article, p)")
            assert runs.evaluate_all("nodes => nodes.map(n => n.className)") == \
                ["run", "run", "requeued", "run", "run"]
            page.goto(dashboard + "/schedules")
            assert page.locator("tr[data-schedule=hourly] td.next").inner_text() == "paused"
            page.close()
