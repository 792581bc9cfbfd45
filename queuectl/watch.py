"""``queuectl status --watch``: a live view of the queue, redrawn until Ctrl-C.

One snapshot is a handful of reads of the projections, each an index range or a LIMIT, in
one read transaction, so a frame costs the same at ten jobs and at millions. rich is
imported only when a frame is drawn.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

from queuectl import clock, reads, render
from queuectl.clock import age
from queuectl.records import FailedRun, WorkerAtWork
from queuectl.store import Db

BARS = "▁▂▃▄▅▆▇█"
MINUTES = 10  # the sparkline's span
FAILURES = 5  # failed runs listed
WORKERS = 20  # workers listed; the others are counted


def sparkline(values: list[int]) -> str:
    """One block character a value, scaled to the largest: ``▁`` is none at all, and any
    value above none is at least ``▂``, so that a slow minute never looks idle."""
    top = max(values, default=0)
    return "".join(BARS[0] if v <= 0 else BARS[-(-v * (len(BARS) - 1) // top)] for v in values)


@dataclass(frozen=True)
class Snapshot:
    """What one frame shows, read in one transaction."""

    now: str
    counts: dict[str, int]
    queues: dict[str, dict[str, int]]
    workers: list[WorkerAtWork]  # active ones, each ``state`` active or silent
    tally: dict[str, int]  # workers per state: active, silent, stopped, gone
    last_minute: dict[str, int]  # runs finished in the last minute, per outcome
    per_minute: list[int]  # runs finished in each of the last MINUTES minutes, oldest first
    failures: list[FailedRun]


def snapshot(conn: Db) -> Snapshot:
    """Read one frame's figures, from the projections only."""
    with conn.snapshot():
        now = conn.now()
        workers = reads.workers_at_work(conn)
        return Snapshot(
            now=now, counts=reads.counts(conn), queues=reads.queue_counts(conn),
            workers=workers, tally=reads.worker_tally(conn, workers),
            last_minute=reads.finished_since(conn, clock.after(now, -60), now),
            per_minute=reads.finished_per_minute(conn, now, MINUTES),
            failures=reads.newest_failures(conn, FAILURES),
        )


def _since(start: str | None, now: str) -> float | None:
    return None if start is None else clock.seconds_between(start, now)


def failure(run: FailedRun) -> str:
    """What went wrong in a failed run, in a few words."""
    if run.outcome == "timed-out":
        return "timed out"
    if run.outcome == "lease-expired":
        return f"worker {run.worker_id} stopped heartbeating"
    if run.outcome == "fenced":
        return f"worker {run.worker_id} lost the store and stopped it"
    return run.last_error or f"exit status {run.exit_code}"


def _ended(outcomes: dict[str, int]) -> str:
    """``6 runs ended in the last minute: 4 completed, 1 failed, 1 given back unstarted``
    (a job claimed ahead of its worker's current one is given back when that one runs
    long: its run ends without having started)."""
    n = {"completed": outcomes.get("completed", 0),
         "failed": sum(outcomes.get(o, 0) for o in reads.FAILED_RUNS),
         "cancelled": outcomes.get("cancelled", 0),
         "given back unstarted": outcomes.get("released", 0)}
    shown = [f"{n[k]} {k}" for k in n if n[k] or k in ("completed", "failed")]
    total = sum(outcomes.values())
    return f"{total} run{'s' if total != 1 else ''} ended in the last minute: {', '.join(shown)}"


def view(snap: Snapshot, every: float, target: str):  # type: ignore[no-untyped-def]
    """One frame, as a rich renderable."""
    from rich.console import Group
    from rich.text import Text

    now = snap.now
    parts: list[Any] = [
        Text(f"queuectl status --watch   {render.safe(target)}   every {every:g}s   "
             f"{clock.human(now)} UTC   Ctrl-C exits", style="bold"),
        Text(""),
        *(Text(line) for line in render.counts_lines(snap.counts, snap.queues)),
        Text(""),
    ]
    parts.append(Text(f"Throughput  {_ended(snap.last_minute)}"))
    parts.append(Text(f"Last {MINUTES} min  {sparkline(snap.per_minute)}  runs ended a minute, "
                      f"peak {max(snap.per_minute, default=0)}"))
    parts.append(Text(""))
    parts += _workers(snap)
    parts.append(Text(""))
    if not snap.failures:
        parts.append(Text("Newest failures: none"))
    else:
        rows = [[f.job_id, f.queue or "-", f.attempt, f.outcome,
                 age(_since(f.finished_at, now)) + " ago", failure(f)] for f in snap.failures]
        parts.append(render.table("Newest failures", ["Job", "Queue", "Attempt", "Outcome",
                                                      "When", "Error"], rows,
                                  wide=frozenset({"Error"})))
    return Group(*parts)


def _workers(snap: Snapshot) -> list[Any]:
    from rich.text import Text

    t = snap.tally
    ended = ", ".join(f"{t[k]} {k}" for k in ("stopped", "gone") if t[k])
    ended = f" ({ended}, not shown)" if ended else ""
    if not snap.workers:
        return [Text(f"Workers: none active{ended}")]
    shown = snap.workers[:WORKERS]
    more = len(snap.workers) - len(shown)
    rows = [[w.id, w.state, w.host, w.pid, w.current_job or "-",
             age(_since(w.job_since, snap.now)) if w.current_job else "-",
             w.jobs_done, age(_since(w.last_heartbeat, snap.now)) + " ago"]
            for w in shown]
    parts: list[Any] = [
        Text(f"Workers: {t['active']} active, {t['silent']} silent{ended}"),
        render.table(None, ["Worker", "State", "Host", "PID", "Job", "Running", "Done",
                            "Heartbeat"], rows),
    ]
    if more:
        parts.append(Text(f"... and {more} more"))
    return parts


def run(conn: Db, every: float, target: str) -> None:
    """Draw a frame every ``every`` seconds until Ctrl-C (or SIGTERM), which ends it
    normally. Any other error leaves the view first (the terminal restored), then
    propagates."""
    from rich.live import Live

    # Killed without a word, the view would leave its terminal on the alternate screen
    # with the cursor hidden. Ctrl-C is taken even where the parent ignored SIGINT (as a
    # shell does for what it starts in the background): a live view always stops on it.
    stops = (signal.SIGINT, signal.SIGTERM)
    before = [signal.signal(stop, signal.default_int_handler) for stop in stops]
    try:
        with Live(console=render.console(), screen=True, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                started = time.monotonic()
                live.update(view(snapshot(conn), every, target), refresh=True)
                time.sleep(max(0.0, every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        for stop, handler in zip(stops, before, strict=True):
            signal.signal(stop, handler)
