"""reads: reads at scale, ``status --json`` and ``list -s pending --limit 20`` on the replay
ledger, wall time over the CLI floor; and ``history`` of a job with many events."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from queuectl import claims, decisions, ledger
from queuectl import events as ev
from queuectl.store import is_postgres

from ..context import Context
from ..ledgers import copy_ledger, copy_of_replay_ledger, pg_replay_ledger
from ..measure import FLOOR_CODE, PG_FLOOR_CODE, measure_floor, run_timed
from ..rows import Row, ScenarioResult, Target, make_row, median, paired_ratio
from ..stores import job_counts


def bench_reads(ctx: Context, result: ScenarioResult) -> list[Row]:
    if ctx.backend == "postgres":
        with pg_replay_ledger(ctx) as url:
            return reads_rows(ctx, result, url)
    return reads_rows(ctx, result, ctx.replay_db or copy_of_replay_ledger(ctx))


def reads_rows(ctx: Context, result: ScenarioResult, db: Path | str) -> list[Row]:
    status_cmd = ctx.queuectl(db, "status", "--json")
    list_cmd = ctx.queuectl(db, "list", "-s", "pending", "--limit", "20")
    for cmd in (status_cmd, list_cmd):
        run_timed(ctx, cmd, db)  # warm up (and open the copied database once)
    floor, status, listing = [], [], []
    floor_code = PG_FLOOR_CODE if is_postgres(db) else FLOOR_CODE
    for _ in range(ctx.runs * ctx.sizes.reads_reps_per_run):
        floor.append(measure_floor(ctx, floor_code))
        status.append(run_timed(ctx, status_cmd, db) * 1000)
        listing.append(run_timed(ctx, list_cmd, db) * 1000)
    history_ms = history_times(ctx)
    counts = job_counts(db)
    ctx.log(f"reads on {sum(counts.values()):,} jobs: status {median(status):.1f} ms, list "
            f"{median(listing):.1f} ms, floor {median(floor):.1f} ms")
    result.details["jobs"] = counts
    label = f'`python -c "{floor_code}"`'
    over = [s - f for s, f in zip(status, floor, strict=True)]
    over_list = [s - f for s, f in zip(listing, floor, strict=True)]
    jobs = f"{ctx.sizes.replay_jobs:,} jobs"
    driver = "; the floor imports the driver too" if is_postgres(db) else ""
    return [
        make_row("reads", "status_over_floor", f"`status --json` at {jobs}, over floor", over,
                 "ms", Target("<= 100 ms over floor", "value", "<=", 100),
                 baseline_samples=floor, baseline_label=label,
                 ratio=paired_ratio(status, floor), note=f"wall {median(status):.1f} ms{driver}"),
        make_row("reads", "list_over_floor", f"`list -s pending --limit 20` at {jobs}, over floor",
                 over_list, "ms", None, baseline_samples=floor, baseline_label=label,
                 ratio=paired_ratio(listing, floor),
                 note=f"wall {median(listing):.1f} ms; no target of its own{driver}"),
        make_row("reads", "history_10k", "`history` of a job with 10,000 events, wall",
                 history_ms, "ms", None,
                 note="over 500 rows a table is written row by row instead of by rich"),
    ]


def history_times(ctx: Context, events: int = 10_000) -> list[float]:
    """Wall milliseconds of ``queuectl history`` for one job retried until it has
    ``events`` events (enqueued, then claimed, failed, scheduled-retry over and over)."""
    with ctx.fresh_db("history") as db:
        conn = ledger.connect(db)
        try:
            decisions.enqueue(conn, [decisions.JobSpec(command="exit 1", id="big", max_retries=10**6)])
            wid = claims.worker_started(conn, os.getpid(), socket.gethostname())
            with ledger.write(conn):
                for attempt in range(1, (events - 1) // 3 + 1):
                    ledger.append(conn, ev.Claimed(job_id="big", worker_id=wid, attempt=attempt))
                    ledger.append(
                        conn,
                        ev.Failed(job_id="big", worker_id=wid, attempt=attempt, exit_code=1,
                                  error="exit status 1", output="some output\n"),
                        ev.ScheduledRetry(job_id="big", attempt=attempt, delay=1.0,
                                          run_at="2030-01-01T00:00:00.000000Z"))
        finally:
            conn.close()
        if ctx.backend != "postgres":
            samples = time_history(ctx, db)
        else:  # written in SQLite and imported: appended one by one it would take seconds
            with ctx.fresh_pg() as url:
                copy_ledger(db, url)
                samples = time_history(ctx, url)
    ctx.log(f"history of a {events:,}-event job: {median(samples):.0f} ms")
    return samples


def time_history(ctx: Context, db: Path | str) -> list[float]:
    cmd = ctx.queuectl(db, "history", "big")
    run_timed(ctx, cmd, db)
    return [run_timed(ctx, cmd, db) * 1000 for _ in range(ctx.runs)]
