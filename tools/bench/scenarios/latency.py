"""latency: pickup latency, enqueue commit -> job process start, after the worker idled."""

from __future__ import annotations

import shlex
import time

from queuectl import decisions, ledger

from ..context import Context
from ..rows import Row, ScenarioResult, Target, make_row, median, percentile
from ..stores import parse_at


def latency_samples(ctx: Context, idle: float, count: int) -> tuple[list[float], list[float]]:
    """Enqueue-commit -> process-start (ms) and enqueue-commit -> claimed event (ms)."""
    starts: list[float] = []
    claims: list[float] = []
    with ctx.fresh_target("latency") as db:
        marks = ctx.fresh_dir("latency-marks")
        conn = ledger.connect(db)
        proc = ctx.popen(ctx.queuectl(db, "worker"), env=ctx.env_for(db))
        try:
            deadline = time.monotonic() + 30
            while not conn.execute("SELECT 1 FROM workers WHERE state = 'active'").fetchone():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the worker did not start")
                time.sleep(0.01)
            for i in range(count):
                time.sleep(idle)
                mark = marks / f"start-{i}"
                command = f"date +%s.%N > {shlex.quote(str(mark))}"
                (job_id,) = decisions.enqueue(conn, [decisions.JobSpec(command=command)])
                committed = time.time()
                deadline = time.monotonic() + 30
                while True:
                    state = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,))
                    if state.fetchone()[0] in ("completed", "failed", "dead"):
                        break
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"job {job_id} was not run within 30 s")
                    time.sleep(0.01)
                started = float(mark.read_text().strip())
                (claimed_at,) = conn.execute(
                    "SELECT at FROM events WHERE job_id = ? AND type = 'claimed'", (job_id,)
                ).fetchone()
                starts.append((started - committed) * 1000)
                claims.append((parse_at(claimed_at) - committed) * 1000)
        finally:
            conn.close()
            ctx.stop(proc)
    return starts, claims


def bench_latency(ctx: Context, result: ScenarioResult) -> list[Row]:
    rows = []
    for idle in ctx.sizes.idle:
        count = ctx.sizes.short_idle_samples if idle < 1 else max(ctx.runs, 2)
        starts, claims = latency_samples(ctx, idle, count)
        ctx.log(f"latency after {idle:g} s idle, {count} samples: p50 {median(starts):.1f} ms, "
                f"max {max(starts):.1f} ms (claim p50 {median(claims):.1f} ms)")
        note = (f"n={count}; commit -> `claimed` event p50 {median(claims):.1f} ms, "
                f"p99 {percentile(claims, 99):.1f} ms")
        result.details[f"idle_{idle:g}s_claim_ms"] = claims
        rows.append(make_row(
            "latency", f"pickup_p50_idle_{idle:g}s", f"pickup latency p50, idle {idle:g} s",
            starts, "ms", Target("<= 10 ms", "value", "<=", 10), note=note))
        rows.append(make_row(
            "latency", f"pickup_p99_idle_{idle:g}s", f"pickup latency p99, idle {idle:g} s",
            starts, "ms", Target("<= 50 ms", "value", "<=", 50),
            value=percentile(starts, 99), note=f"n={count}"))
    return rows
