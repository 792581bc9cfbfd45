"""memory: peak RSS of ``queuectl worker -c 4 --burst`` running N ``true`` jobs: of its
largest process, and of all its processes together (``worker -c N`` forks one a CPU)."""

from __future__ import annotations

import sys

from ..context import Context
from ..measure import FLOOR_CODE, peak_memory, peak_rss
from ..rows import Row, ScenarioResult, Target, make_row
from ..stores import enqueue_true, job_counts


def bench_memory(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.memory_jobs
    rss, together, floor = [], [], []
    for r in range(ctx.runs):
        floor.append(peak_rss(ctx, [sys.executable, "-c", FLOOR_CODE])[1])
        with ctx.fresh_db("memory") as db:
            enqueue_true(db, n)
            code, peak, pss = peak_memory(
                ctx, ctx.queuectl(db, "worker", "-c", "4", "--burst"), db)
            counts = job_counts(db)
            if code != 0 or counts.get("completed") != n:
                raise RuntimeError(f"worker -c 4 exited {code} leaving {counts}")
        rss.append(peak)
        together.append(pss)
        ctx.log(f"memory run {r + 1}/{ctx.runs}: worker -c 4 peak {peak:.1f} MiB, all its "
                f"processes {pss:.1f} MiB PSS (python floor {floor[-1]:.1f} MiB)")
    return [
        make_row("memory", "worker_rss",
                 f"worker peak RSS, `-c 4`, {n:,} jobs (its largest process)", rss, "MiB",
                 Target("<= 40 MiB", "value", "<=", 40),
                 baseline_samples=floor, baseline_label="python + click, msgspec, sqlite3"),
        make_row("memory", "worker_pss_together",
                 "the same, every process of the command together (peak of their PSS "
                 "added up)", together, "MiB", None, baseline_samples=floor,
                 baseline_label="python + click, msgspec, sqlite3"),
    ]
