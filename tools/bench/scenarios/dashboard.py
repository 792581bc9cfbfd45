"""dashboard: ``queuectl dashboard`` on the replay ledger, in process: the server time (its
Server-Timing header) of the overview, the first jobs page, the first pending page, a
command search that finds nothing and an unchanged poll (304); and the overview again with
the clock set just after the ledger's last run, so that its last hour holds every run
(needs the dashboard extra and httpx)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from queuectl import ledger, reads

from ..context import Context
from ..ledgers import copy_of_replay_ledger, pg_replay_ledger
from ..rows import Row, ScenarioResult, Target, make_row, median


def bench_dashboard(ctx: Context, result: ScenarioResult) -> list[Row]:
    if ctx.backend == "postgres":
        with pg_replay_ledger(ctx) as url:
            return dashboard_rows(ctx, result, url)
    return dashboard_rows(ctx, result, ctx.replay_db or copy_of_replay_ledger(ctx))


DASHBOARD_PAGES = {"overview": "/", "jobs": "/jobs", "pending": "/jobs?state=pending",
                   "search": "/jobs?q=no-such-command"}


def server_ms(response: Any) -> float:
    """The server time a dashboard response reports in its Server-Timing header."""
    assert response.status_code in (200, 304), (response.status_code, response.text[:500])
    return float(response.headers["server-timing"].split("dur=")[1])


def dashboard_rows(ctx: Context, result: ScenarioResult, db: Path | str) -> list[Row]:
    import warnings

    from queuectl import clock
    from queuectl.dashboard.app import create_app

    with warnings.catch_warnings():  # Starlette would rather drive httpx2: either works
        warnings.filterwarnings("ignore", "Using `httpx`")
        from starlette.testclient import TestClient

    times: dict[str, list[float]] = {key: [] for key in [*DASHBOARD_PAGES, "poll", "busy"]}
    with TestClient(create_app(str(db)), base_url="http://127.0.0.1") as client:
        for path in DASHBOARD_PAGES.values():
            client.get(path)  # warm up: the first request opens the connection
        etag = client.get("/").headers["etag"]
        for _ in range(ctx.runs * ctx.sizes.reads_reps_per_run):
            for key, path in DASHBOARD_PAGES.items():
                times[key].append(server_ms(client.get(path)))
            times["poll"].append(server_ms(client.get(
                "/", headers={"X-Poll": "1", "If-None-Match": etag})))
        # The ledger's runs ended long ago; with the clock just after the last one, the
        # overview's last hour holds them all (its charts read the newest of them).
        last = ledger.connect(db, create=False)
        try:
            (end,) = last.execute("SELECT max(finished_at) FROM runs").fetchone()
        finally:
            last.close()
        saved = clock.now
        clock.now = lambda: clock.after(end, 1)  # type: ignore[assignment]
        try:
            client.get("/")
            for _ in range(ctx.runs * ctx.sizes.reads_reps_per_run):
                times["busy"].append(server_ms(client.get("/")))
        finally:
            clock.now = saved  # type: ignore[assignment]
    ctx.log("dashboard, server ms: " + ", ".join(
        f"{key} {median(values):.1f}" for key, values in times.items()))
    result.details["server_ms"] = {key: median(values) for key, values in times.items()}
    jobs = f"{ctx.sizes.replay_jobs:,} jobs"
    target = Target("<= 50 ms", "value", "<=", 50)
    return [
        make_row("dashboard", "overview_ms", f"overview at {jobs}, server time", times["overview"],
                 "ms", target, note="counts, queues, workers, last-hour charts"),
        make_row("dashboard", "jobs_ms", f"first jobs page at {jobs}, server time",
                 times["jobs"], "ms", target, note="50 jobs, newest first"),
        make_row("dashboard", "pending_ms", f"first pending page at {jobs}, server time",
                 times["pending"], "ms", None, note="in run order, through jobs_ready"),
        make_row("dashboard", "search_ms", f"command search finding nothing at {jobs}, server time",
                 times["search"], "ms", None,
                 note=f"walks {reads.SCAN:,} jobs, then offers to search older ones"),
        make_row("dashboard", "poll_304_ms", "unchanged poll (304), server time", times["poll"],
                 "ms", None, note="one read of the ledger's head"),
        make_row("dashboard", "busy_overview_ms",
                 f"overview, its last hour holding every run of {jobs}, server time",
                 times["busy"], "ms", None,
                 note=f"charts read the newest {reads.ACTIVITY_RUNS:,} runs of the hour"),
    ]
