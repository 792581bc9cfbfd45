"""bulk: bulk enqueue, ``queuectl enqueue --file`` with N JSON lines, end to end; and the
longest pause of busy workers while it writes."""

from __future__ import annotations

import itertools
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from projections.jobs import _ENQUEUED as _JOB_COLUMNS  # what an enqueue writes
from queuectl import ledger

from ..context import Context
from ..measure import run_timed
from ..rows import Row, ScenarioResult, Target, make_row
from ..stores import enqueue_true, job_counts, parse_at, reading


def bench_bulk(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.bulk_jobs
    directory = ctx.fresh_dir("bulk-input")
    jobs_file = directory / "jobs.jsonl"
    jobs_file.write_text('{"command":"true"}\n' * n)
    rates, floors = [], []
    try:
        for r in range(ctx.runs):
            with ctx.fresh_target("bulk") as db:
                seconds = run_timed(ctx, ctx.queuectl(db, "enqueue", "--file", str(jobs_file)), db)
                counts = job_counts(db)
                if counts.get("pending") != n:
                    raise RuntimeError(f"bulk enqueue left {counts}, expected {n} pending")
                floors.append(n / sql_floor(ctx, db))
            rates.append(n / seconds)
            ctx.log(f"bulk run {r + 1}/{ctx.runs}: {rates[-1]:.0f} jobs/s ({seconds:.2f} s); "
                    f"its rows alone: {floors[-1]:.0f} jobs/s")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    pauses = bulk_pauses(ctx, n)
    target = (Target(">= 30,000 jobs/s", "value", ">=", 30_000) if ctx.backend == "postgres"
              else Target(">= 50,000 jobs/s", "value", ">=", 50_000))
    return [make_row("bulk", "bulk_enqueue", f"bulk enqueue, {n:,} JSON lines, end to end",
                     rates, "jobs/s", target, ceiling_samples=floors,
                     ceiling_label="rows written by the store's bulk writers alone"),
            make_row("bulk", "bulk_floor",
                     f"the same {n:,} jobs' rows (events, jobs) written by the store's own "
                     "bulk writers in one transaction, no Python a job", floors, "jobs/s",
                     None, note="the ceiling of bulk enqueue on this schema and machine"),
            make_row("bulk", "bulk_worker_pause",
                     f"longest pause of 2 busy workers while {n:,} jobs are enqueued from a "
                     "file (one transaction)", pauses, "ms", None,
                     note="the gap between two claims, read from the ledger")]


def sql_floor(ctx: Context, source: Path | str) -> float:
    """Seconds to write the rows a bulk enqueue left in ``source`` (its events and jobs)
    into a fresh store of the same kind, each table in one call of the store's bulk writer
    (``copy_events``, ``insert_many``: executemany on SQLite, COPY on PostgreSQL) and one
    durable commit: what the bulk enqueue would cost with no Python per job."""
    with reading(source) as conn:
        events = conn.execute("SELECT seq, at, type, job_id, worker_id, body FROM events "
                              "ORDER BY seq").fetchall()
        jobs = conn.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs ORDER BY seq").fetchall()
    with ctx.fresh_target("bulk-floor") as db:
        conn = ledger.connect(db)
        try:
            start = time.perf_counter()
            with conn.bulk(), conn.transaction():  # as a long append has them
                conn.copy_events([tuple(row) for row in events])
                conn.insert_many("jobs", _JOB_COLUMNS, jobs)
            return time.perf_counter() - start
        finally:
            conn.close()


def bulk_pauses(ctx: Context, n: int) -> list[float]:
    """Milliseconds of the longest gap between two claims of a busy ``worker -c 2`` while a
    file of ``n`` jobs is enqueued beside it: a file is one transaction, so the workers wait
    for its write lock."""
    directory = ctx.fresh_dir("bulk-pause-input")
    jobs_file = directory / "jobs.jsonl"
    jobs_file.write_text('{"command":"true","priority":-1}\n' * n)
    pauses = []
    try:
        for r in range(ctx.runs):
            with ctx.fresh_target("bulk-pause") as db:
                enqueue_true(db, max(4_000, n // 5))  # work enough to stay busy throughout
                worker = ctx.popen(ctx.queuectl(db, "worker", "-c", "2"), env=ctx.env_for(db))
                time.sleep(1.0)
                started = _iso(time.time())
                run_timed(ctx, ctx.queuectl(db, "enqueue", "--file", str(jobs_file)), db)
                ended = _iso(time.time() + 0.5)  # the first claims after the commit count too
                time.sleep(0.5)
                ctx.stop(worker)
                with reading(db) as conn:
                    claims = [parse_at(at) for (at,) in conn.execute(
                        "SELECT at FROM events WHERE type = 'claimed' AND at BETWEEN ? AND ? "
                        "ORDER BY seq", (started, ended))]
            if len(claims) < 2:
                raise RuntimeError("the workers claimed nothing while the file was written")
            pauses.append(max(b - a for a, b in itertools.pairwise(claims)) * 1000)
            ctx.log(f"bulk pause run {r + 1}/{ctx.runs}: {pauses[-1]:.0f} ms")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return pauses


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
