"""metrics: one scrape of ``queuectl metrics`` / ``/metrics`` on the replay ledger, in
process: the collector reading the projections and the text format it makes (the server
time of a scrape, without HTTP). Idle: the ledger's runs ended long ago, so the recent
window is empty; busy: the scrape's time just after the last run, so the window holds its
newest runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from queuectl import clock, ledger, metrics

from ..context import Context
from ..ledgers import copy_of_replay_ledger, pg_replay_ledger
from ..rows import Row, ScenarioResult, Target, make_row, median

TARGET = Target("<= 20 ms", "value", "<=", 20)
SCRAPES = 10  # a run's scrapes, of which the median is the run's figure


def bench_metrics(ctx: Context, result: ScenarioResult) -> list[Row]:
    if ctx.backend == "postgres":
        with pg_replay_ledger(ctx) as url:
            return metrics_rows(ctx, result, url)
    return metrics_rows(ctx, result, ctx.replay_db or copy_of_replay_ledger(ctx))


def scrape_ms(conn: ledger.Db, now: Callable[[], str | None]) -> float:
    def read(build: Callable[..., metrics.Figures]) -> metrics.Figures:
        with conn.snapshot():
            return metrics.gather(conn, now())

    start = time.perf_counter()
    text = metrics.exposition(read)
    seconds = time.perf_counter() - start
    assert b"queuectl_jobs" in text
    return seconds * 1000


def metrics_rows(ctx: Context, result: ScenarioResult, db: Path | str) -> list[Row]:
    conn = ledger.connect(db, create=False)
    try:
        (end,) = conn.execute("SELECT max(finished_at) FROM runs").fetchone()
        after = clock.after(end, 1)
        windows = {"idle": lambda: None, "busy": lambda: after}
        times: dict[str, list[float]] = {key: [] for key in windows}
        for key, now in windows.items():
            scrape_ms(conn, now)  # warm up: the first scrape reads the pages in
            for _ in range(ctx.runs):
                times[key].append(median([scrape_ms(conn, now) for _ in range(SCRAPES)]))
    finally:
        conn.close()
    ctx.log("metrics, scrape ms: " + ", ".join(
        f"{key} {median(values):.2f}" for key, values in times.items()))
    result.details["scrape_ms"] = {key: median(values) for key, values in times.items()}
    jobs = f"{ctx.sizes.replay_jobs:,} jobs"
    return [
        make_row("metrics", "scrape_ms", f"one metrics scrape at {jobs}, server time",
                 times["idle"], "ms", TARGET, note="collector + text format; recent window empty"),
        make_row("metrics", "busy_scrape_ms", f"one metrics scrape at {jobs}, window full",
                 times["busy"], "ms", TARGET,
                 note=f"summaries over the newest {metrics.WINDOW_RUNS:,} runs"),
    ]
