"""memory: peak RSS of ``queuectl worker -c 4 --burst`` running N ``true`` jobs."""

from __future__ import annotations

import sys

from ..context import Context
from ..measure import FLOOR_CODE, peak_rss
from ..rows import Row, ScenarioResult, Target, make_row
from ..stores import enqueue_true, job_counts


def bench_memory(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.memory_jobs
    rss, floor = [], []
    for r in range(ctx.runs):
        floor.append(peak_rss(ctx, [sys.executable, "-c", FLOOR_CODE])[1])
        with ctx.fresh_db("memory") as db:
            enqueue_true(db, n)
            code, peak = peak_rss(ctx, ctx.queuectl(db, "worker", "-c", "4", "--burst"), db)
            counts = job_counts(db)
            if code != 0 or counts.get("completed") != n:
                raise RuntimeError(f"worker -c 4 exited {code} leaving {counts}")
        rss.append(peak)
        ctx.log(f"memory run {r + 1}/{ctx.runs}: worker -c 4 peak {peak:.1f} MiB "
                f"(python floor {floor[-1]:.1f} MiB)")
    return [make_row(
        "memory", "worker_rss", f"worker peak RSS, `-c 4`, {n:,} jobs", rss, "MiB",
        Target("<= 40 MiB", "value", "<=", 40),
        baseline_samples=floor, baseline_label="python + click, msgspec, sqlite3")]
