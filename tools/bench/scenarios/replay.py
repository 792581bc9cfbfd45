"""replay: ``ledger.rebuild`` of a ledger holding N jobs' worth of events."""

from __future__ import annotations

import time

from queuectl import ledger

from ..context import Context
from ..ledgers import copy_of_replay_ledger
from ..rows import Row, ScenarioResult, Target, make_row


def bench_replay(ctx: Context, result: ScenarioResult) -> list[Row]:
    db = copy_of_replay_ledger(ctx)
    ctx.replay_db = db
    conn = ledger.connect(db)  # as `queuectl rebuild` opens it
    rates = []
    try:
        (n_events,) = conn.execute("SELECT count(*) FROM events").fetchone()
        for r in range(ctx.runs):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            start = time.perf_counter()
            ledger.rebuild(conn)
            seconds = time.perf_counter() - start
            rates.append(n_events / seconds)
            ctx.log(f"replay run {r + 1}/{ctx.runs}: {n_events:,} events in {seconds:.1f} s = "
                    f"{rates[-1]:.0f} events/s")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    result.details["events"] = n_events
    return [make_row(
        "replay", "replay", f"replay, {ctx.sizes.replay_jobs:,} jobs ({n_events:,} events)",
        rates, "events/s", Target(">= 150,000 events/s", "value", ">=", 150_000))]
