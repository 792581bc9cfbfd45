"""output: what keeping every run's whole output costs.

- A job writing 100 MB as fast as it can (``yes | head -c``), run by ``worker -c 2 --burst``
  beside N short jobs: the worker's peak RSS (target: under 60 MiB), the pace of the other
  jobs meanwhile (on the one worker left) against one worker's pace after it (target: at
  least half), and how much of its output the store kept (``log-limit``, 10 MiB, and at
  most one chunk more).
- ``worker -c 2 --burst`` on N ``true`` jobs with the output store on (the default)
  against the same with it off (``log-limit 0``), runs interleaved: the throughput kept
  (target: at least 97%).
"""

from __future__ import annotations

import time

from ..context import Context
from ..measure import peak_rss, run_timed
from ..rows import Row, ScenarioResult, Target, make_row
from ..stores import enqueue_true, job_counts, parse_at, reading

BIG = 100_000_000  # bytes the big job writes
BIG_COMMAND = f"yes 'queuectl output bench line' | head -c {BIG}"


def bench_output(ctx: Context, result: ScenarioResult) -> list[Row]:
    rows = _big_writer(ctx, result)
    return rows + _throughput(ctx)


def _big_writer(ctx: Context, result: ScenarioResult) -> list[Row]:
    others = ctx.sizes.worker_jobs // 4
    rss, seconds, kept, during, after = [], [], [], [], []
    for r in range(ctx.runs):
        with ctx.fresh_target("output-big") as db:
            enqueue_true(db, 1, BIG_COMMAND)
            enqueue_true(db, others, "sleep 0.01")
            start = time.perf_counter()
            code, peak = peak_rss(ctx, ctx.queuectl(db, "worker", "-c", "2", "--burst"), db)
            seconds.append(time.perf_counter() - start)
            counts = job_counts(db)
            if code != 0 or counts.get("completed") != others + 1:
                raise RuntimeError(f"worker -c 2 exited {code} leaving {counts}")
            with reading(db) as conn:
                (stored,) = conn.execute("SELECT coalesce(sum(size), 0) FROM output").fetchone()
                (began, ended), = conn.execute(
                    "SELECT min(e.at), max(j.updated_at) FROM jobs j JOIN events e "
                    "ON e.job_id = j.id AND e.type = 'claimed' WHERE j.command = ?",
                    (BIG_COMMAND,)).fetchall()
                ends = sorted(parse_at(row[0]) for row in conn.execute(
                    "SELECT updated_at FROM jobs WHERE command != ?", (BIG_COMMAND,)))
        rss.append(peak)
        kept.append(int(stored) / 2**20)
        big = (parse_at(began), parse_at(ended))
        within = sum(big[0] <= t <= big[1] for t in ends)
        later = [t for t in ends if t > big[1]]
        during.append(within / (big[1] - big[0]))
        # After it, both workers run them; while it ran, one did: half the pace after it is
        # what the other jobs would get if the 100 MB job cost nothing.
        after.append(len(later) / (later[-1] - big[1]) / 2 if len(later) > 1 else during[-1])
        ctx.log(f"output run {r + 1}/{ctx.runs}: 100 MB job ({big[1] - big[0]:.1f}s) beside "
                f"{others} others: worker peak {peak:.1f} MiB, {kept[-1]:.1f} MiB kept, others "
                f"{during[-1]:.0f} jobs/s while it ran, {after[-1]:.0f} a worker after")
    result.details["big_job_seconds"] = seconds
    return [
        make_row("output", "output_big_rss",
                 f"worker peak RSS, `-c 2`, a job writing 100 MB beside {others} others",
                 rss, "MiB", Target("< 60 MiB", "value", "<=", 60)),
        make_row("output", "output_big_others",
                 "the other jobs' throughput while the 100 MB job ran (on one worker), "
                 "against one worker's after it", during, "jobs/s",
                 Target(">= 0.5x", "ratio", ">=", 0.5),
                 baseline_samples=after, baseline_label="a worker's, after it ended"),
        make_row("output", "output_big_kept", "output kept of the 100 MB run (log-limit 10 MiB)",
                 kept, "MiB", Target("<= 10.25 MiB", "value", "<=", 10.25)),
    ]


def _throughput(ctx: Context) -> list[Row]:
    n = ctx.sizes.worker_jobs
    on, off = [], []
    for r in range(ctx.runs):
        order = ((off, "0"), (on, None))
        for samples, limit in order if r % 2 else reversed(order):
            with ctx.fresh_target("output-true") as db:
                if limit is not None:
                    run_timed(ctx, ctx.queuectl(db, "config", "set", "log-limit", limit), db)
                enqueue_true(db, n)
                seconds = run_timed(ctx, ctx.queuectl(db, "worker", "-c", "2", "--burst"), db)
            samples.append(n / seconds)
        ctx.log(f"output run {r + 1}/{ctx.runs}: {n} true jobs: {on[-1]:.0f} jobs/s with the "
                f"output store, {off[-1]:.0f} without")
    return [make_row("output", "output_true_vs_off",
                     f"worker throughput, {n:,} `true` jobs, `-c 2`, output store on vs off",
                     on, "jobs/s", Target(">= 0.97x", "ratio", ">=", 0.97),
                     baseline_samples=off, baseline_label="log-limit 0 (no output store)")]
