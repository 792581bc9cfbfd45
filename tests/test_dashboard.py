"""``queuectl dashboard``'s routes, through Starlette's TestClient, on both stores: pages,
filters and pages of jobs, the 304 of an unchanged poll, actions as ledger events, bad
input as clean 4xx pages, and the checks every request passes (Host, token, POST origin,
CSP, read-only)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PG_ADMIN, by_hand
from helpers import added, ok

from queuectl import reads

pytest.importorskip("starlette", reason="pip install -e '.[test]' (the dashboard extra)")
with warnings.catch_warnings():  # Starlette would rather drive httpx2: either works
    warnings.filterwarnings("ignore", "Using `httpx`")
    from starlette.testclient import TestClient  # noqa: E402

from queuectl.dashboard.app import CSP, create_app  # noqa: E402

BASE = "http://127.0.0.1:8765"
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


@pytest.fixture
def client(db: Any) -> Iterator[TestClient]:
    with TestClient(create_app(str(db)), base_url=BASE) as c:
        yield c


def post(client: TestClient, action: str, **form: str) -> Any:
    return client.post(f"/actions/{action}", data=form, headers=SAME_ORIGIN,
                       follow_redirects=False)


def dead_job(run: Any, command: str = "exit 3", *args: str) -> str:
    job_id = added(run, "-c", command, "--max-retries", "0", *args)
    ok(run, "worker", "--burst")
    return job_id


def types_of(db: Any, job_id: str) -> list[str]:
    with by_hand(db) as conn:
        return [r[0] for r in conn.execute(
            "SELECT type FROM events WHERE job_id = ? ORDER BY seq", (job_id,))]


# -- pages ------------------------------------------------------------------------------------


def test_overview_shows_counts_queues_and_charts(run: Any, client: TestClient) -> None:
    for n in range(3):
        added(run, "-c", f"echo {n}")
    added(run, "-c", "true", "-q", "media")
    dead_job(run)
    page = client.get("/")
    assert page.status_code == 200
    assert re.search(r'id="count-completed">4<', page.text)
    assert re.search(r'id="count-dead">1<', page.text)
    assert re.search(r'id="count-total">5<', page.text)
    assert 'href="/jobs?queue=media"' in page.text
    assert page.text.count("<svg") == 3
    assert "<script>" not in page.text and 'src="/static/dashboard.js"' in page.text


def test_every_page_answers_with_the_security_headers(run: Any, client: TestClient) -> None:
    job_id = dead_job(run)
    ok(run, "schedule", "add", "nightly", "--cron", "0 2 * * *", "-c", "backup.sh")
    for path in ("/", "/jobs", f"/jobs/{job_id}", "/dlq", "/queues", "/schedules", "/workers",
                 "/static/dashboard.js", "/nowhere"):
        page = client.get(path)
        assert page.status_code == (404 if path == "/nowhere" else 200), path
        assert page.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "object-src 'none'" in CSP
        assert "frame-ancestors 'none'" in CSP
        assert page.headers["x-frame-options"] == "DENY"
    assert "backup.sh" in client.get("/schedules").text


def test_user_text_is_escaped_everywhere(run: Any, client: TestClient) -> None:
    evil = "<script>alert(1)</script>&\"'"
    job_id = dead_job(run, f"echo '{evil}'; exit 1")
    for path in (f"/jobs/{job_id}", "/jobs", "/dlq", f"/jobs?q={evil[:8]}"):
        text = client.get(path).text
        assert "<script>alert" not in text, path
    detail = client.get(f"/jobs/{job_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in detail  # the command and its output
    assert detail.count("&lt;script&gt;") >= 2


def test_job_page_shows_fields_dependencies_timeline_and_output(run: Any,
                                                                  client: TestClient) -> None:
    first = added(run, "-c", "echo hello-from-the-job", "--id", "first")
    added(run, "-c", "true", "--id", "second/one", "--after", first)
    ok(run, "worker", "--burst")
    page = client.get("/jobs/second%2Fone")
    assert page.status_code == 200
    assert 'href="/jobs/first"' in page.text and "state-completed" in page.text
    detail = client.get("/jobs/first").text
    assert "hello-from-the-job" in detail  # the attempt's output
    timeline = re.findall(r'<li class="event event-([a-z-]+)"', detail)
    assert timeline[0] == "enqueued" and "claimed" in timeline and timeline[-1] == "completed"
    assert "Cancel job" not in detail and "Retry job" not in detail  # completed: no action


def queue_table(text: str) -> dict[str, dict[str, int]]:
    """The overview's jobs per queue and state, as its table shows them (``total`` too)."""
    table = text.split('<table class="queue-counts">')[1].split("</table>")[0]
    return {queue: {state: int(n.replace(",", "")) for state, n in re.findall(
                r'data-state="([a-z]+)">([\d,]+)<', row)}
            for queue, row in re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', table, re.S)}


def test_the_overviews_queue_table_counts_every_state(run: Any, conn: Any,
                                                      client: TestClient) -> None:
    dead_job(run, "exit 3", "-q", "other")
    first = added(run, "-c", "true", "-q", "media")
    added(run, "-c", "true", "--after", first, "-q", "media")  # waiting
    added(run, "-c", "true", "--delay", "3600")  # scheduled
    ok(run, "cancel", added(run, "-c", "true"))
    shown = queue_table(client.get("/").text)
    assert set(shown) == {"default", "media", "other"}
    for queue, per_state in shown.items():
        assert set(per_state) == {*reads.counts(conn), "total"}, queue
        assert sum(n for state, n in per_state.items() if state != "total") == \
            per_state["total"], queue
    assert {state: sum(q[state] for q in shown.values()) for state in reads.counts(conn)} == \
        reads.counts(conn)
    assert shown["media"]["waiting"] == 1 and shown["default"]["scheduled"] == 1
    assert shown["default"]["cancelled"] == 1


def test_the_overview_lists_the_newest_failures(run: Any, client: TestClient) -> None:
    added(run, "-c", "true")
    ok(run, "worker", "--burst")
    assert "No failed run among the newest." in client.get("/").text
    broken = dead_job(run, "exit 3", "-q", "media")
    failures = client.get("/").text.split('<table class="failures">')[1].split("</table>")[0]
    rows = re.findall(r'<tr data-job="([^"]+)">(.*?)</tr>', failures, re.S)
    assert [job for job, _ in rows] == [broken]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[0][1], re.S)
    assert cells[1:4] == ["media", "1", '<span class="outcome outcome-failed">failed</span>']
    assert cells[4].endswith(" ago</time>") and cells[5] == "exit status 3"


@pytest.mark.stores("sqlite")
def test_charts_have_a_value_scale_time_labels_and_a_line_for_one_slice() -> None:
    from queuectl.dashboard import charts

    starts = [f"2026-12-05T10:{m:02d}:00.000000Z" for m in range(0, 60, 5)]
    quiet = {"p50": None, "p95": None}
    slices = [{"start": s, "completed": 0, "failed": 0, "wait": quiet, "run_time": quiet}
              for s in starts]
    slices[4] = {**slices[4], "completed": 7, "failed": 2,
                 "wait": {"p50": 0.4, "p95": 1.3}, "run_time": {"p50": 0.02, "p95": 0.05}}
    hour = {"slices": slices, "until": "2026-12-05T11:00:00.000000Z"}
    bars = charts.bars(hour)
    assert [t["label"] for t in bars["times"]] == ["10:00", "10:15", "10:30", "10:45", "11:00"]
    assert [v["label"] for v in bars["levels"]] == ["0", "5", "10"]
    assert bars["levels"][0]["y"] == bars["bottom"] and bars["levels"][-1]["y"] == bars["top"]
    wait = charts.lines(hour, "wait")
    assert [v["label"] for v in wait["levels"]] == ["0", "500 ms", "1 s", "1.5 s"]
    for rank in ("p50", "p95"):
        (line,) = wait["series"][rank]
        (x0, y0), (x1, y1) = (map(float, p.split(",")) for p in line.split())
        assert x1 - x0 == pytest.approx((bars["right"] - bars["left"]) / 12) and y0 == y1
    assert [v["label"] for v in charts.lines(hour, "run_time")["levels"]] == \
        ["0", "20 ms", "40 ms", "60 ms"]


def test_the_overviews_charts_are_drawn_with_axes(run: Any, client: TestClient) -> None:
    added(run, "-c", "true")
    ok(run, "worker", "--burst")
    page = client.get("/").text
    assert page.count('<text class="time"') == 3 * 5 and page.count('<text class="level"') >= 6
    assert page.count("<polyline") == 2 * 2  # p50 and p95 of wait and of run time


def test_the_job_page_marks_a_requeue_between_the_runs(run: Any, client: TestClient) -> None:
    job_id = dead_job(run)
    assert post(client, "retry", job=job_id).status_code == 303
    ok(run, "worker", "--burst")
    runs = client.get(f"/jobs/{job_id}").text.split("<h2>Runs</h2>")[1]
    shown = re.findall(r'<h3>Attempt (\d+)|<p class="requeued"[^>]*>([^<]*)', runs)
    assert [attempt or "requeued" for attempt, _ in shown] == ["1", "requeued", "1"]
    assert shown[1][1].startswith("Requeued from the dead letter queue at ")
    assert "attempts count again from 1" in shown[1][1]


def _every_page(client: TestClient, query: str) -> list[str]:
    """The job ids of every page of ``/jobs?query``, following each page's next link."""
    ids: list[str] = []
    next_query: str | None = query
    while next_query is not None:
        page = client.get(f"/jobs?{next_query}")
        ids += re.findall(r'<tr data-job="([^"]+)"', page.text)
        older = re.search(r'<a href="\?([^"]+)" rel="next">', page.text)
        next_query = older.group(1).replace("&amp;", "&") if older else None
    return ids


def test_jobs_filter_by_state_queue_and_text(run: Any, client: TestClient) -> None:
    dead_job(run, "exit 5", "--id", "broken")
    added(run, "-c", "convert a.mp4", "-q", "media", "--id", "film")
    added(run, "-c", "echo report", "--id", "report")

    def ids(query: str) -> list[str]:
        page = client.get(f"/jobs?{query}")
        assert page.status_code == 200, page.text
        return re.findall(r'<tr data-job="([^"]+)"', page.text)

    assert ids("") == ["report", "film", "broken"]  # newest first
    assert ids("state=dead") == ["broken"]
    assert ids("queue=media") == ["film"]
    assert ids("q=convert") == ["film"]
    assert ids("q=epor") == ["report"]  # a substring of an id
    assert ids("q=CONVERT") == []  # case-sensitive on both stores
    assert ids("state=pending&queue=media") == ["film"]
    assert ids("state=dead&queue=media") == []
    assert 'Job <a class="id" href="/jobs/report">' in client.get("/jobs?q=report").text


def test_jobs_pages_follow_each_other_by_keyset(run: Any, conn: Any,
                                                 client: TestClient) -> None:
    ok(run, "enqueue", "--file", "-", input="".join(
        f'{{"id": "j{n:03d}", "command": "true", "priority": {n % 2}}}\n' for n in range(120)))
    seen = _every_page(client, "state=pending")
    assert len(seen) == 120 and len(set(seen)) == 120
    assert seen == [j.id for j in reads.list_jobs(conn, "pending")]  # in run order
    everything = _every_page(client, "")
    assert everything == [f"j{n:03d}" for n in reversed(range(120))]


def test_a_search_walks_a_bounded_number_of_jobs(run: Any, conn: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ok(run, "enqueue", "--file", "-", input="".join(
        f'{{"command": "{"needle" if n == 3 else "hay"}"}}\n' for n in range(40)))
    monkeypatch.setattr(reads, "SCAN", 10)
    found, cursor, walked = reads.find_jobs(conn, text="needle")
    assert (found, walked) == ([], 10) and cursor is not None  # the newest 10 hold none
    for _ in range(3):
        found, cursor, walked = reads.find_jobs(conn, text="needle", cursor=cursor)
    assert [j.command for j in found] == ["needle"]


def test_charts_count_the_last_hours_runs_and_say_when_they_read_only_the_newest(
        run: Any, conn: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(3):
        added(run, "-c", "true")
    dead_job(run)
    hour = reads.activity(conn)
    assert sum(s["completed"] for s in hour["slices"]) == 3
    assert sum(s["failed"] for s in hour["slices"]) == 1
    assert hour["slices"][-1]["run_time"]["p95"] is not None and not hour["capped"]
    monkeypatch.setattr(reads, "ACTIVITY_RUNS", 2)
    assert reads.activity(conn)["capped"] and reads.activity(conn)["runs"] == 2
    assert "The charts show the newest 2 runs of the last hour" in client.get("/").text


def test_bad_input_gets_a_clean_4xx_page(client: TestClient, run: Any) -> None:
    added(run, "-c", "true")
    for path, status, text in (
        ("/jobs?state=bogus", 400, "unknown state"),
        ("/jobs?queue=a%20b", 400, "queue"),
        ("/jobs?after=12x", 400, "bad page cursor"),
        ("/jobs?after=%C2%B2", 400, "bad page cursor"),  # ², a digit int() refuses
        ("/jobs?after=%D9%A1%D9%A2", 400, "bad page cursor"),  # ١٢, one int() reads as 12
        ("/jobs?after=1_0", 400, "bad page cursor"),
        ("/dlq?after=%C2%B2", 400, "bad page cursor"),
        ("/jobs?state=dead&after=%C2%B2", 400, "bad page cursor"),
        ("/jobs?state=pending&after=%D9%A1:2", 400, "bad page cursor"),
        ("/jobs?state=pending&after=1_0:2", 400, "bad page cursor"),
        ("/jobs?state=pending&after=0:%D9%A1", 400, "bad page cursor"),
        ("/jobs?state=pending&after=1:2:3", 400, "bad page cursor"),
        ("/jobs?state=pending&after=99999999999:1", 400, "bad page cursor"),
        ("/jobs?q=" + "x" * 201, 400, "at most 200"),
        ("/jobs/no-such-job", 404, "not found"),
        ("/dlq?queue=%00", 400, "queue"),
    ):
        page = client.get(path)
        assert page.status_code == status, (path, page.text)
        assert text in page.text, path
        assert "Traceback" not in page.text
    assert client.post("/actions/retry", data={}, headers=SAME_ORIGIN).status_code == 400
    assert client.post("/actions/nothing", data={"job": "x"},
                       headers=SAME_ORIGIN).status_code == 404
    assert client.post("/actions/limit", data={"queue": "q", "limit": "-1"},
                       headers=SAME_ORIGIN).status_code == 400


PAGES = ("/", "/jobs", "/jobs/{job}", "/dlq", "/queues", "/schedules", "/workers")


def pg_admin() -> Any:
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True)


def kill_dashboard_backend(db: Any) -> None:
    """Terminate the dashboard's connection, as a server restart would: the only client of
    the test's database."""
    with pg_admin() as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s", (str(db).rsplit("/", 1)[1],)).fetchone()[0]
    assert killed == 1


@pytest.mark.stores("postgres")
def test_every_page_reconnects_after_its_connection_is_killed(run: Any, db: Any,
                                                            client: TestClient) -> None:
    job_id = dead_job(run)
    for path in (p.format(job=job_id) for p in PAGES):
        assert client.get(path).status_code == 200, path
        kill_dashboard_backend(db)
        page = client.get(path)
        assert page.status_code == 200, (path, page.text)  # read again on a new connection
        assert client.get(path, headers={"X-Poll": "1"}).status_code == 200, path
    kill_dashboard_backend(db)
    assert client.get("/", headers={"X-Poll": "1", "If-None-Match": page.headers["etag"]}
                      ).status_code == 304


@pytest.mark.stores("postgres")
def test_a_store_that_stays_away_answers_503_once_then_the_page_again(
        run: Any, db: Any, client: TestClient) -> None:
    job_id = dead_job(run)
    name = str(db).rsplit("/", 1)[1]
    for path in (p.format(job=job_id) for p in PAGES):
        assert client.get(path).status_code == 200, path
        with pg_admin() as admin:
            admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
            try:
                kill_dashboard_backend(db)
                away = client.get(path)
            finally:
                admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        assert away.status_code == 503, (path, away.text)
        assert "Store unavailable" in away.text and "Traceback" not in away.text
        assert client.get(path).status_code == 200, path


@pytest.mark.stores("postgres")
def test_an_action_on_a_lost_connection_answers_503_and_the_next_one_works(
        run: Any, db: Any, client: TestClient) -> None:
    added(run, "-c", "true", "-q", "media")
    assert client.get("/queues").status_code == 200
    kill_dashboard_backend(db)
    lost = post(client, "pause", queue="media")
    assert lost.status_code == 503 and "lost the connection" in lost.text
    assert post(client, "pause", queue="media").status_code == 303
    with by_hand(db) as conn:
        assert [r[0] for r in conn.execute(
            "SELECT type FROM events WHERE type LIKE 'queue-%'")] == ["queue-paused"]


# -- live updates -----------------------------------------------------------------------------


def test_an_unchanged_poll_answers_304_and_a_change_the_fragment(run: Any,
                                                                client: TestClient) -> None:
    added(run, "-c", "true")
    page = client.get("/")
    etag = page.headers["etag"]
    assert f'data-etag="{etag.replace(chr(34), "&#34;")}"' in page.text or \
        f'data-etag="&quot;{etag.strip(chr(34))}&quot;"' in page.text
    poll = {"X-Poll": "1", "If-None-Match": etag}
    unchanged = client.get("/", headers=poll)
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert client.get("/", headers={"If-None-Match": etag}).status_code == 200  # not a poll
    added(run, "-c", "true")
    changed = client.get("/", headers=poll)
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert "<html" not in changed.text and re.search(r'id="count-pending">2<', changed.text)


# -- actions ----------------------------------------------------------------------------------


def test_retry_a_dead_job_is_a_requeued_event(run: Any, db: Any, client: TestClient) -> None:
    job_id = dead_job(run)
    assert "Retry job" in client.get(f"/jobs/{job_id}").text
    done = post(client, "retry", job=job_id)
    assert done.status_code == 303 and done.headers["location"] == f"/jobs/{job_id}"
    assert types_of(db, job_id)[-1] == "requeued"
    page = client.get(f"/jobs/{job_id}")
    assert f"Job {job_id} requeued with max_retries = 0." in page.text  # the flash, once
    assert "requeued" not in client.get(f"/jobs/{job_id}").text.split("<h1>")[0]
    again = post(client, "retry", job=job_id)
    assert again.status_code == 409 and "not in the dead letter queue" in again.text


def test_retry_all_shows_the_count_then_requeues_the_filtered_dead(run: Any, db: Any,
                                                                  client: TestClient) -> None:
    media = [dead_job(run, "exit 1", "-q", "media") for _ in range(2)]
    other = dead_job(run)
    page = client.get("/dlq?queue=media")
    assert re.search(r'id="retry-all-count">2<', page.text)
    assert re.search(r'id="retry-all-count">3<', client.get("/dlq").text)
    assert post(client, "retry-all", queue="media").status_code == 303
    assert all(types_of(db, j)[-1] == "requeued" for j in media)
    assert types_of(db, other)[-1] == "dead"
    assert "Requeued 2 jobs from the dead letter queue." in client.get("/dlq").text


def test_cancel_and_queue_actions_are_ledger_events(run: Any, db: Any,
                                                   client: TestClient) -> None:
    job_id = added(run, "-c", "true", "-q", "media")
    assert post(client, "cancel", job=job_id).status_code == 303
    assert types_of(db, job_id)[-1] == "cancelled"
    assert post(client, "pause", queue="media").status_code == 303
    assert 'data-queue="media"' in (page := client.get("/queues").text)
    assert re.search(r'data-queue="media">.*?<td class="status">paused<', page, re.S)
    assert post(client, "limit", queue="media", limit="3").status_code == 303
    assert post(client, "resume", queue="media").status_code == 303
    with by_hand(db) as conn:
        assert [r[0] for r in conn.execute(
            "SELECT type FROM events WHERE type LIKE 'queue-%' ORDER BY seq")] == \
            ["queue-paused", "queue-limited", "queue-resumed"]
        # who did it: the dashboard, for each action of its pages
        actors = [json.loads(body)["by"] for (body,) in conn.execute(
            "SELECT body FROM events WHERE type LIKE 'queue-%' OR type = 'cancelled'")]
        assert actors == ["dashboard"] * 4
    assert "Queue &#39;media&#39; resumed." in client.get("/queues").text  # escaped


def found(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.S)
    assert match, pattern
    return match.group(1)


def schedule_row(page: str, name: str) -> str:
    return found(rf'<tr data-schedule="{name}">(.*?)</tr>', page)


def test_schedules_pause_and_resume_from_the_page(run: Any, db: Any,
                                                  client: TestClient) -> None:
    ok(run, "schedule", "add", "nightly", "--cron", "0 2 * * *", "-c", "backup.sh")
    row = schedule_row(client.get("/schedules").text, "nightly")
    assert re.search(r'class="next">\d{4}-\d\d-\d\d 02:00:00<', row) and ">Pause<" in row
    done = post(client, "schedule-pause", schedule="nightly")
    assert done.status_code == 303 and done.headers["location"] == "/schedules"
    page = client.get("/schedules").text
    assert "Schedule &#39;nightly&#39; paused." in page
    row = schedule_row(page, "nightly")
    assert 'class="next"><span class="muted">paused</span><' in row and ">Resume<" in row
    assert post(client, "schedule-pause", schedule="nightly").status_code == 303  # no event
    assert "was paused already" in client.get("/schedules").text
    assert post(client, "schedule-resume", schedule="nightly").status_code == 303
    assert ">Pause<" in schedule_row(client.get("/schedules").text, "nightly")
    missing = post(client, "schedule-pause", schedule="nope")
    assert missing.status_code == 404 and "not found" in missing.text
    assert post(client, "schedule-pause").status_code == 400
    with by_hand(db) as conn:
        assert [r[0] for r in conn.execute(
            "SELECT type FROM events WHERE type LIKE 'schedule-%' ORDER BY seq")] == \
            ["schedule-added", "schedule-paused", "schedule-resumed"]


def test_every_actions_column_has_a_header(run: Any, client: TestClient) -> None:
    dead_job(run)
    ok(run, "schedule", "add", "nightly", "--cron", "0 2 * * *", "-c", "backup.sh")
    for path in ("/queues", "/dlq", "/schedules"):
        page = client.get(path).text
        heads = re.findall(r"<th[^>]*>([^<]*)</th>", page)
        row = found(r"<tbody>\s*<tr[^>]*>(.*?)</tr>", page)
        cells = re.findall(r'<td( class="[^"]*")?', row)
        assert len(heads) == len(cells), (path, heads)
        assert heads[-1] == "Actions" and cells[-1] == ' class="actions"', path


# -- the checks every request passes ----------------------------------------------------------


def test_a_cross_site_post_is_refused(run: Any, db: Any, client: TestClient) -> None:
    job_id = dead_job(run)
    for headers in ({}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"},
                    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:9999"}):
        refused = client.post("/actions/retry", data={"job": job_id}, headers=headers)
        assert refused.status_code == 403, headers
    assert types_of(db, job_id)[-1] == "dead"
    by_origin = client.post("/actions/retry", data={"job": job_id},
                            headers={"Origin": BASE}, follow_redirects=False)
    assert by_origin.status_code == 303


def test_only_known_host_names_are_answered(run: Any, db: Any) -> None:
    added(run, "-c", "true")
    with TestClient(create_app(str(db)), base_url=BASE) as client:
        assert client.get("/").status_code == 200
        for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example"):
            assert client.get("/", headers={"Host": host}).status_code == 400, host
        assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    app = create_app(str(db), hosts=("127.0.0.1", "queue.lan"))
    with TestClient(app, base_url="http://queue.lan") as client:
        assert client.get("/").status_code == 200


def test_a_token_is_checked_on_every_request(run: Any, db: Any) -> None:
    added(run, "-c", "true")
    app = create_app(str(db), token="s3cret", hosts=("127.0.0.1", "10.0.0.5"))
    with TestClient(app, base_url="http://10.0.0.5:8765") as client:
        for path in ("/", "/jobs", "/static/dashboard.js"):
            assert client.get(path).status_code == 401, path
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        entry = client.get("/jobs?state=dead&token=s3cret", follow_redirects=False)
        assert entry.status_code == 303 and entry.headers["location"] == "/jobs?state=dead"
        assert "HttpOnly" in entry.headers["set-cookie"]
        assert client.get("/jobs").status_code == 200  # the cookie
        refused = client.post("/actions/pause", data={"queue": "q"})
        assert refused.status_code == 403  # a token does not stand in for the origin check


def test_read_only_shows_no_action_and_refuses_them(run: Any, db: Any) -> None:
    job_id = dead_job(run)
    ok(run, "schedule", "add", "s", "--cron", "0 2 * * *", "-c", "backup.sh")
    with TestClient(create_app(str(db), read_only=True), base_url=BASE) as client:
        for path in (f"/jobs/{job_id}", "/dlq", "/queues", "/schedules"):
            assert "<form method=\"post\"" not in client.get(path).text, path
            assert "<th>Actions</th>" not in client.get(path).text, path
        for action, form in (("retry", {"job": job_id}), ("schedule-pause", {"schedule": "s"})):
            refused = post(client, action, **form)
            assert refused.status_code == 403 and "read-only" in refused.text
    assert types_of(db, job_id)[-1] == "dead"


# -- the command ------------------------------------------------------------------------------


@pytest.mark.stores("sqlite")
def test_beyond_loopback_the_command_needs_a_token(run: Any) -> None:
    added(run, "-c", "true")
    result = run("dashboard", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--token" in result.stderr


@pytest.mark.stores("sqlite")
def test_without_the_extra_the_command_says_what_to_install(run: Any) -> None:
    added(run, "-c", "true")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['uvicorn'] = None; "
         "from queuectl.cli import main; sys.argv[1:] = ['dashboard']; main()"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == ("Error: the dashboard needs Starlette, uvicorn and "
                             "Jinja2: from queuectl's clone, pip install '.[dashboard]'\n")


@pytest.mark.stores("sqlite")
def test_the_cli_does_not_load_the_web_stack() -> None:
    code = ("import sys, queuectl.cli; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
    assert found.stdout.strip() == "[]", found.stderr
