"""prune: retention, ``queuectl prune --before 0s`` on 10 x N finished jobs and a day of two
idle workers' heartbeats: ledger bytes a completed job before and after, and its rate."""

from __future__ import annotations

import os
from pathlib import Path

from queuectl import claims, ledger
from queuectl import events as ev
from queuectl.store import is_postgres

from ..context import Context
from ..measure import run_timed
from ..rows import Row, ScenarioResult, make_row
from ..stores import enqueue_true, job_counts, reading

PRUNE_HEARTBEATS = 8_640  # a day of one idle worker's heartbeats at the default 10 s


def ledger_bytes(db: Path | str) -> tuple[int, int]:
    """(events, bytes of their rows' values): the ledger's own size, on either store."""
    with reading(db) as conn:
        if is_postgres(db):
            sql = "SELECT count(*), coalesce(sum(pg_column_size(events.*)), 0) FROM events"
        else:
            sql = ("SELECT count(*), coalesce(sum(length(at) + length(type) + coalesce("
                   "length(job_id), 0) + coalesce(length(worker_id), 0) + length(body) + 8), 0) "
                   "FROM events")
        count, size = conn.execute(sql).fetchone()
    return int(count), int(size)


def build_prune_ledger(db: Path | str, n: int) -> None:
    """``n`` jobs run to completion through the library (as a worker records them, with a
    line of output each), and a day of heartbeats from each of two idle workers."""
    enqueue_true(db, n)
    conn = ledger.connect(db, durable=False)
    try:
        workers = [claims.worker_started(conn, os.getpid(), "bench") for _ in range(2)]
        claim = claims.claim(conn, workers[0])
        while claim is not None:
            result = ev.Completed(job_id=claim.job_id, worker_id=workers[0],
                                  attempt=claim.attempt, duration=0.002, output="ok\n")
            _, claim = claims.finish_and_claim(conn, claim, result, workers[0])
        for worker in workers:
            for start in range(0, PRUNE_HEARTBEATS, 1000):
                with ledger.write(conn):
                    beats = min(1000, PRUNE_HEARTBEATS - start)
                    ledger.append(conn, *[ev.WorkerHeartbeat(worker_id=worker)] * beats)
    finally:
        conn.close()


def bench_prune(ctx: Context, result: ScenarioResult) -> list[Row]:
    """``queuectl prune --before 0s`` on a ledger of finished jobs and idle heartbeats: the
    ledger's bytes per completed job before and after, and how fast it goes."""
    n = ctx.sizes.worker_jobs * 10
    rates, beat_rates, before, after = [], [], [], []
    for r in range(ctx.runs):
        with ctx.fresh_target("prune") as db:
            build_prune_ledger(db, n)
            events, size = ledger_bytes(db)
            seconds = run_timed(ctx, ctx.queuectl(db, "prune", "--before", "0s"), db)
            left, size_after = ledger_bytes(db)
            with reading(db) as conn:
                (marks,) = conn.execute(
                    "SELECT count(*) FROM events WHERE type = 'pruned'").fetchone()
            moved = events - (left - marks)
            if job_counts(db).get("completed", 0) or \
                    moved != n * 3 + 2 * (PRUNE_HEARTBEATS - 1):
                raise RuntimeError(f"prune moved {moved:,} of {events:,} events")
        before.append(size / n)
        after.append(size_after / n)
        rates.append(n / seconds)
        beat_rates.append(moved / seconds)
        ctx.log(f"prune run {r + 1}/{ctx.runs}: {n:,} jobs in {seconds:.2f} s "
                f"({rates[-1]:,.0f} jobs/s); ledger {events:,} events, {size / n:,.0f} B a job "
                f"-> {left:,} events, {size_after / n:,.1f} B a job")
    jobs = f"{n:,} completed jobs and {2 * PRUNE_HEARTBEATS:,} heartbeats"
    return [
        make_row("prune", "prune_bytes_before", f"ledger bytes a completed job, {jobs}",
                 before, "B"),
        make_row("prune", "prune_bytes_after", "the same after `prune --before 0s`", after, "B",
                 note="left: worker starts, heartbeats' latest, one pruned event a 1,000 jobs"),
        make_row("prune", "prune_rate", f"`queuectl prune --before 0s`, {jobs}, end to end",
                 rates, "jobs/s"),
        make_row("prune", "prune_event_rate", "the same, events moved to the archive",
                 beat_rates, "events/s"),
    ]
