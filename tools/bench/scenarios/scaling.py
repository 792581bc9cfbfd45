"""scaling: worker processes on one host, N ``true`` jobs each time: two ``worker -c 1
--burst`` processes started together on one store against one process of two workers
(``worker -c 2 --processes 1``, two threads) and against one ``worker -c 2`` (which forks
two processes of one), and eight ``-c 1`` processes against two, each timed from the first
start to the last exit (and, for what bounds it, from the first claim to the last result by
the ledger's times; and the start-up: from the launch to the first claim, beside as many
bare interpreters launched together). Beside them, the same jobs' shells and statements with
no queuectl Python at all, in 8 forked processes against 2: what the shells and the store's
write lock lose by themselves; and on SQLite the same jobs done by workers with the least
Python they need, written by hand (``worker.least_python_worker_rate``), in 8 forked
processes against 2: the 8-against-2 target's ceiling."""

from __future__ import annotations

import inspect
import marshal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .. import trace
from ..context import Context
from ..measure import FLOOR_CODE, PG_FLOOR_CODE
from ..rows import LEAST_PYTHON, Row, ScenarioResult, Target, make_row
from ..stores import claims_span, enqueue_true, first_claim_at, job_counts
from .cycle import Waker, one_at_a_time, worker_connection
from .worker import LEAST_WORKER, SHELL, least_python_worker_rate, statements_and_spawns_rate

# (commands, workers in each, processes each forks: None for its default, one a CPU): the
# shapes compared, run in turn in every run so that each ratio is taken between neighbours.
ONE_OF_TWO, FORKED, TWO_OF_ONE, EIGHT_OF_ONE = (1, 2, 1), (1, 2, None), (2, 1, 1), (8, 1, 1)
SHAPES = (ONE_OF_TWO, FORKED, TWO_OF_ONE, EIGHT_OF_ONE)
Shape = tuple[int, int, int | None]


def processes_rate(ctx: Context, n: int, processes: int, concurrency: int,
                   forks: int | None = 1) -> tuple[float, float, float]:
    """Jobs/s of ``processes`` ``worker -c concurrency --burst`` commands (of ``forks``
    processes each) started together on a store holding ``n`` jobs, from the first start to
    the last exit, and from the first claim to the last result; and the seconds from their
    start to the first claim. Every process must exit 0 and every job must be completed."""
    with ctx.fresh_target("scaling") as db, ExitStack() as stack:
        enqueue_true(db, n)
        cmd = ctx.queuectl(db, "worker", "-c", str(concurrency), "--burst",
                           *(("--processes", str(forks)) if forks and concurrency > 1 else ()))
        env = ctx.env_for(db)
        # Files, not pipes: a pipe nobody reads while the others run could fill and stall one.
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(processes)]
        launched, start = time.time(), time.perf_counter()
        procs = [ctx.popen(cmd, env=env, stderr=log) for log in logs]
        try:
            deadline = start + max(120.0, n / 5)
            for proc in procs:
                proc.wait(max(0.0, deadline - time.perf_counter()))
            seconds = time.perf_counter() - start
        finally:
            for proc in procs:
                ctx.stop(proc)  # forgets those that exited, kills any that hang
        for proc, log in zip(procs, logs, strict=True):
            if proc.returncode != 0:
                log.seek(0)
                raise RuntimeError(f"{' '.join(cmd[2:])} exited {proc.returncode}: "
                                   f"{log.read().decode(errors='replace')[-500:]}")
        counts = job_counts(db)
        if counts.get("completed") != n:
            raise RuntimeError(f"{processes} x `worker -c {concurrency}` left {counts} "
                               f"(expected {n} completed)")
        return n / seconds, n / claims_span(db), first_claim_at(db) - launched


# A worker with no queuectl in it: an interpreter that imports what every command imports
# (the floor), sets its connection up as a worker's, and then, job after job, writes the
# next recorded transaction under a lock on a file (as the writers' queue does on SQLite)
# and starts `sh -c true` as the worker does (os.posix_spawn). Only modules an interpreter
# has loaded already, or as small as fcntl and marshal, are added to the floor's.
_ALONE_LOOP = f"""
fd = os.open(sys.argv[3], os.O_RDWR)
shell = {SHELL!r}
while True:
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        n = int.from_bytes(os.pread(fd, 8, 0), "little")
        if n >= len(todo):
            break
        replay(todo[n])
        os.pwrite(fd, (n + 1).to_bytes(8, "little"), 0)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    os.waitpid(os.posix_spawn(shell[0], shell, os.environ), 0)
"""
# (trace's functions come with their annotations, which the future import leaves unread.)
ALONE_CHILD = "from __future__ import annotations\n" + FLOOR_CODE + """
import fcntl, marshal, os, sys
with open(sys.argv[1], "rb") as f:
    prepared, todo = marshal.load(f)
conn = sqlite3.connect(sys.argv[2], isolation_level=None, timeout=60)
for pragma in ("synchronous = NORMAL", "foreign_keys = ON", "wal_autocheckpoint = 0"):
    conn.execute("PRAGMA " + pragma)
""" + inspect.getsource(trace.send_steps) + """
def replay(steps):
    send_steps(conn, steps)
""" + _ALONE_LOOP
# On PostgreSQL: the session a worker's connection has (queuectl.store.postgres.connect
# and for_worker), its statements prepared as the recording's were, and each round trip
# sent as trace.replay sends it.
PG_ALONE_CHILD = "from __future__ import annotations\n" + PG_FLOOR_CODE + f"""
import fcntl, marshal, os, select, sys
_PIPELINE_SYNC = {trace._PIPELINE_SYNC}
""" + """
with open(sys.argv[1], "rb") as f:
    prepared, todo = marshal.load(f)
conn = psycopg.connect(sys.argv[2], autocommit=True, options=" ".join(
    "-c " + setting for setting in ("synchronous_commit=off", "TimeZone=UTC",
                                    "plan_cache_mode=force_generic_plan")))
conn.prepare_threshold = None
for text in prepared:
    conn.execute(text)
""" + inspect.getsource(trace.send_trips) + """
def replay(trips):
    send_trips(conn.pgconn, trips)
""" + _ALONE_LOOP


def _plain(value: Any) -> Any:
    """``value`` in the types marshal takes: str subclasses (the states' enums) as str,
    bytes-like values as bytes, tuple subclasses as tuples."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def launched_alone_rate(ctx: Context, n: int, processes: int) -> float:
    """Jobs/s of ``processes`` interpreters launched together (``ALONE_CHILD``, on
    PostgreSQL ``PG_ALONE_CHILD``), each importing the floor's modules and then running
    jobs as a worker would with no queuectl in it: each job its ``finish_and_claim``
    transaction, recorded by a worker and replayed in order, and a ``sh -c true``. From
    the first launch to the last exit, as ``processes_rate`` times the commands. On SQLite
    the WAL is checkpointed by a waker in this process, as each worker's is in its own."""
    on_pg = ctx.backend == "postgres"
    with ctx.fresh_target("scaling") as db:
        enqueue_true(db, n)
        with trace.twin(ctx, db) as copy:
            with worker_connection(db) as conn, trace.recording(conn) as steps:
                one_at_a_time(conn, True)
            todo = [_plain(part.steps) for part in trace.transactions(steps)]
            with tempfile.TemporaryDirectory(dir=ctx.tmp) as directory:
                work, counter = Path(directory) / "todo", Path(directory) / "counter"
                work.write_bytes(marshal.dumps((list(steps.prepared), todo)))
                counter.write_bytes(bytes(8))
                waker = Waker(str(copy)) if Waker is not None and not on_pg else None
                try:
                    start = time.perf_counter()
                    procs = [subprocess.Popen([sys.executable, "-c",
                                               PG_ALONE_CHILD if on_pg else ALONE_CHILD,
                                               str(work), str(copy), str(counter)])
                             for _ in range(processes)]
                    codes = [proc.wait(timeout=max(120.0, n / 5)) for proc in procs]
                    seconds = time.perf_counter() - start
                finally:
                    if waker:
                        waker.close()
            if any(codes):
                raise RuntimeError(f"a replaying interpreter exited {codes}")
            if job_counts(copy).get("completed") != n:
                raise RuntimeError("the replaying interpreters did not complete every job")
    return n / seconds


def interpreters_together(ctx: Context, processes: int) -> float:
    """Seconds for ``processes`` bare interpreters importing what every command imports
    (the start-up floor), launched together, to all exit: what that many start-ups cost
    the machine's cores before any of queuectl's code runs."""
    code = PG_FLOOR_CODE if ctx.backend == "postgres" else FLOOR_CODE
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    if any(proc.wait() for proc in procs):
        raise RuntimeError(f"python -c {code!r} failed")
    return time.perf_counter() - start


def bench_scaling(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.scaling_jobs
    whole: dict[Shape, list[float]] = {shape: [] for shape in SHAPES}
    steady: dict[Shape, list[float]] = {shape: [] for shape in SHAPES}
    first: dict[Shape, list[float]] = {shape: [] for shape in SHAPES}
    floors: dict[int, list[float]] = {2: [], 8: []}
    alone: dict[int, list[float]] = {2: [], 8: []}  # the shells and statements alone
    launched: dict[int, list[float]] = {2: [], 8: []}  # the same in launched interpreters
    least: dict[int, list[float]] = {2: [], 8: []}  # workers with the least Python, forked
    by_hand = ctx.backend == "sqlite"  # written for SQLite's statements (cycle.least_python)
    for r in range(ctx.runs):
        for shape in SHAPES:
            rate, between, to_first = processes_rate(ctx, n, *shape)
            whole[shape].append(rate)
            steady[shape].append(between)
            first[shape].append(to_first * 1000)
        for count, times in floors.items():
            times.append(interpreters_together(ctx, count) * 1000)
        for count, rates in alone.items():
            rates.append(statements_and_spawns_rate(ctx, n, ctx.backend, processes=count))
            launched[count].append(launched_alone_rate(ctx, n, count))
        for count, rates in least.items():
            if by_hand:
                by_hand = trace.by_hand(ctx, "scaling", lambda count=count: (
                    least_python_worker_rate(ctx, n, processes=count)), rates)
        ctx.log(f"scaling run {r + 1}/{ctx.runs}: " + ", ".join(
            f"{p} x `-c {c}{'' if f is None or c == 1 else f' --processes {f}'}` "
            f"{whole[(p, c, f)][-1]:.0f} jobs/s (first claim to last result "
            f"{steady[(p, c, f)][-1]:.0f}/s)" for p, c, f in SHAPES)
            + f"; the shells and statements alone in 8 processes {alone[8][-1]:.0f}/s, in 2 "
            f"{alone[2][-1]:.0f}/s; in 8 launched interpreters {launched[8][-1]:.0f}/s, in 2 "
            f"{launched[2][-1]:.0f}/s"
            + (f"; workers written by hand in 8 {least[8][-1]:.0f}/s, in 2 {least[2][-1]:.0f}/s"
               if by_hand else ""))
    # Where they ran, the workers written by hand are the tighter ceiling: the shells and
    # statements alone leave out even the Python any worker needs to run a job and decide
    # its result (as for the worker's own targets).
    if by_hand:
        ceiling, ceiling_base = least[8], least[2]
        ceiling_label, means = f"{LEAST_WORKER}, in 8 processes against 2", LEAST_PYTHON
    else:
        ceiling, ceiling_base = launched[8], launched[2]
        ceiling_label, means = "shells and statements alone, in 8 interpreters against 2", ""
    ledger_note = "without the processes' start-up and exit"
    floor = PG_FLOOR_CODE if ctx.backend == "postgres" else FLOOR_CODE
    return [
        make_row("scaling", "scaling_two_vs_one",
                 f"2 `worker -c 1 --burst` processes together, {n:,} `true` jobs",
                 whole[TWO_OF_ONE], "jobs/s",
                 Target(">= 1.0 x one `-c 2` process", "ratio", ">=", 1.0),
                 baseline_samples=whole[ONE_OF_TWO],
                 baseline_label="one process of two workers, `worker -c 2 --processes 1`"),
        make_row("scaling", "scaling_two_vs_one_steady",
                 "the same, first claim to last result (ledger times)", steady[TWO_OF_ONE],
                 "jobs/s", None, baseline_samples=steady[ONE_OF_TWO],
                 baseline_label="one process of two workers, first claim to last result",
                 note=ledger_note),
        make_row("scaling", "scaling_two_vs_forked",
                 "the same 2 processes against one `worker -c 2`, which forks two "
                 "processes of one worker itself", whole[TWO_OF_ONE], "jobs/s", None,
                 baseline_samples=whole[FORKED], baseline_label="one `worker -c 2 --burst`",
                 note="the same shape both ways: what is left between them is the second "
                      "interpreter's start-up"),
        make_row("scaling", "scaling_eight_vs_two",
                 f"8 `worker -c 1 --burst` processes together, {n:,} `true` jobs",
                 whole[EIGHT_OF_ONE], "jobs/s",
                 Target(">= 0.85 x two `-c 1` processes", "ratio", ">=", 0.85),
                 baseline_samples=whole[TWO_OF_ONE],
                 baseline_label="2 `worker -c 1 --burst` processes",
                 ceiling_samples=ceiling, ceiling_baseline_samples=ceiling_base,
                 ceiling_label=ceiling_label, ceiling_means=means),
        make_row("scaling", "scaling_eight_vs_two_steady",
                 "the same, first claim to last result (ledger times)", steady[EIGHT_OF_ONE],
                 "jobs/s", None, baseline_samples=steady[TWO_OF_ONE],
                 baseline_label="2 `-c 1`, first claim to last result", note=ledger_note),
        make_row("scaling", "scaling_eight_alone",
                 "the same jobs' shells and statements alone (no queuectl Python), in 8 "
                 "processes", alone[8], "jobs/s", None, baseline_samples=alone[2],
                 baseline_label="the same in 2 processes",
                 note="each job a `sh -c true` and its `finish_and_claim` transaction, "
                      "recorded and replayed in order: what 8 processes lose against 2 "
                      "with none of queuectl's Python or start-up"),
        make_row("scaling", "scaling_eight_launched_alone",
                 "the same, each of 8 interpreters launched together importing what every "
                 "command imports, then running them", launched[8], "jobs/s", None,
                 baseline_samples=launched[2], baseline_label="the same in 2 interpreters",
                 note="the 8 commands with no queuectl in them, start-up included: the "
                      "target's ceiling where no worker written by hand runs"),
        *([] if not by_hand else [make_row(
            "scaling", "scaling_eight_least_python",
            "the same jobs, 8 forked processes each a worker with the least Python it needs, "
            "written by hand", least[8], "jobs/s", None, baseline_samples=least[2],
            baseline_label="the same in 2 processes",
            note="each job's shell spawned, its output read and its result written with the "
                 "cycle's statements, locks and encoded events, and no ledger, projection, "
                 "decision or worker code between them (least_python_worker_rate in "
                 "tools/bench/scenarios/worker.py); what they leave replays exactly; from "
                 "ready to the last end, without the commands' start-up: the target's "
                 "ceiling")]),
        make_row("scaling", "scaling_eight_first_claim",
                 "the same 8 processes, from their start to the first claim",
                 first[EIGHT_OF_ONE], "ms", None, baseline_samples=first[TWO_OF_ONE],
                 baseline_label="2 `-c 1`, start to first claim",
                 note="the ledger's time of the first claim against the launch's"),
        make_row("scaling", "scaling_eight_floors",
                 f"8 bare interpreters (`python -c \"{floor}\"`) started together, to "
                 "the last exit", floors[8], "ms", None, baseline_samples=floors[2],
                 baseline_label="2 of them",
                 note="what eight start-ups cost the cores before any of queuectl's code "
                      "runs"),
    ]
