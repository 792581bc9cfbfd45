"""worker: worker throughput, ``queuectl worker -c 2 --burst`` on N ``true`` jobs, start to
exit, against 2 threads running ``subprocess.run(["sh", "-c", "true"])`` (and huey's
SqliteHuey consumer with 2 process workers, when huey is installed).

On PostgreSQL: that worker against the SQLite one run beside it and procrastinate, and the
CPU a job costs on each store."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from queuectl import ledger
from queuectl.claims import Claim

from .. import trace
from ..context import Context
from ..measure import run_timed
from ..peers import huey_rate, installed_version, procrastinate_rate
from ..rows import LEAST_PYTHON, NO_PYTHON, Row, ScenarioResult, Target, make_row, median
from ..stores import claims_span, enqueue_true, job_counts
from .cycle import least_python, one_at_a_time, worker_connection


def spawn_baseline(n: int, threads: int = 2) -> float:
    """Jobs/s of ``threads`` Python threads running ``sh -c true`` with subprocess."""
    todo = iter(range(n))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            subprocess.run(["sh", "-c", "true"])

    return n / in_threads(work, threads)


def in_threads(work: Callable[[], None], threads: int) -> float:
    """Seconds ``threads`` threads running ``work`` took, from the first start to the last
    end."""
    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def statements_and_spawns_rate(ctx: Context, n: int, store: str = "sqlite",
                               processes: int = 2) -> float:
    """Jobs/s of ``processes`` processes that each run a job as the worker does (``sh -c
    true`` with ``os.posix_spawn``) and then write its cycle: one transaction of the
    statements ``finish_and_claim`` sent for a job, recorded on one store and replayed in
    order on its twin (``trace``), each process on a connection of its own set up as a
    worker's. A ``worker -c 2`` (two processes of one worker each) with no queuectl Python
    in it: its ceiling on this schema."""
    with ctx.fresh_target("worker", store) as db:
        enqueue_true(db, n)
        with trace.twin(ctx, db) as copy:
            with worker_connection(db) as conn, trace.recording(conn) as steps:
                one_at_a_time(conn, True)
            todo = trace.transactions(steps)
            seconds = _in_processes(copy, steps, todo, processes)
            if job_counts(copy).get("completed") != n:
                raise RuntimeError("the replayed worker did not complete every job")
    return n / seconds


SHELL = ["/bin/sh", "-c", "true"]


def _in_processes(db: Path | str, steps: trace.Trace, todo: list[trace.Trace],
                  processes: int) -> float:
    """Seconds ``processes`` forked processes took to replay ``todo`` in its order (the next
    transaction goes to whichever process is free, one at a time), each starting ``sh -c
    true`` after each of its transactions with ``os.posix_spawn``, as the worker does (not
    with subprocess, as the spawn baseline does: a ceiling takes the cheapest way): from
    all of them ready to the last end."""
    forked = multiprocessing.get_context("fork")
    lock, taken = forked.Lock(), forked.Value("i", 0, lock=False)

    def work(ready: Callable[[], None]) -> int:
        with worker_connection(db) as conn:
            trace.prepare_for_replay(conn, steps)
            ready()
            while True:
                with lock:  # the transactions in their order, one at a time
                    if taken.value >= len(todo):
                        return 0
                    step = todo[taken.value]
                    taken.value += 1
                    trace.replay(conn, step)
                # as the worker starts a job's shell: the cheapest way there is
                os.waitpid(os.posix_spawn(SHELL[0], SHELL, os.environ), 0)

    return together(work, processes)[0]


def together(work: Callable[[Callable[[], None]], int], processes: int
             ) -> tuple[float, list[int]]:
    """Seconds ``processes`` forked processes running ``work`` took, from all of them ready
    (each calls the function ``work`` is given once it is: it returns when all are) to the
    last end, and what each ``work`` returned. A ``trace.Unfit`` in one is raised here."""
    forked = multiprocessing.get_context("fork")
    ready, go = forked.Barrier(processes + 1), forked.Event()
    reports = forked.Queue()

    def started() -> None:
        ready.wait()
        go.wait()

    def child() -> None:
        try:
            reports.put(("done", work(started)))
        except BaseException as exc:
            reports.put(("unfit" if isinstance(exc, trace.Unfit) else "failed", repr(exc)))
            ready.abort()  # the others, and this process's parent, wait no more
            raise

    pool = [forked.Process(target=child) for _ in range(processes)]
    for proc in pool:
        proc.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass  # a process failed getting ready: its report says why
    start = time.perf_counter()
    go.set()
    got = [reports.get(timeout=600) for _ in pool]
    for proc in pool:
        proc.join()
    seconds = time.perf_counter() - start
    for kind, what in got:
        if kind == "unfit":
            raise trace.Unfit(what)
        if kind == "failed":
            raise RuntimeError(f"a forked process failed: {what}")
    if any(proc.exitcode for proc in pool):
        raise RuntimeError("a forked process failed")
    return seconds, [what for _, what in got]


def least_run(output_limit: int = 1024 * 1024) -> Callable[[Claim], tuple[float, str]]:
    """A job's run as the least Python a worker needs does it, for ``cycle.least_python``:
    its shell started the cheapest way (``os.posix_spawn``), in a session of its own, in
    the job's directory (the process enters it once), reading nothing, its output and
    errors into one pipe read to the end (its tail kept), its exit waited for: the run's
    seconds and output. Only for jobs that succeed (the bench's ``true``)."""
    files = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]

    def run(claim: Claim) -> tuple[float, str]:
        if claim.cwd is not None and claim.cwd != os.getcwd():
            os.chdir(claim.cwd)
        start = time.monotonic()
        out, into = os.pipe()
        pid = os.posix_spawn(SHELL[0], ["sh", "-c", claim.command], os.environ, setsid=True,
                             file_actions=[*files, (os.POSIX_SPAWN_DUP2, into, 1),
                                           (os.POSIX_SPAWN_DUP2, into, 2),
                                           (os.POSIX_SPAWN_CLOSE, out),
                                           (os.POSIX_SPAWN_CLOSE, into)])
        os.close(into)
        chunks = []
        while chunk := os.read(out, 65536):
            chunks.append(chunk)
        os.close(out)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"least_run: {claim.command!r} ended with status {status}")
        return (round(time.monotonic() - start, 6),
                b"".join(chunks)[-output_limit:].decode(errors="replace"))

    return run


def least_python_worker_rate(ctx: Context, n: int, processes: int = 2) -> float:
    """Jobs/s of ``processes`` forked processes, each a worker with the least Python it
    needs (``cycle.least_python`` running each job with ``least_run``): a ``worker -c 2``
    (two processes of one worker each) written by hand, from all of them ready to the last
    end. What they leave must replay to exactly its live tables (``ledger.check``), as the
    worker's own does: the same work."""
    with ctx.fresh_target("worker") as db:
        enqueue_true(db, n)

        def work(ready: Callable[[], None]) -> int:
            with worker_connection(db) as conn:
                run = least_run()
                ready()
                return least_python(conn, run)

        seconds, done = together(work, processes)
        conn = ledger.connect(db)
        try:
            problems = ledger.check(conn)
        finally:
            conn.close()
        if sum(done) != n or job_counts(db).get("completed") != n or problems:
            raise RuntimeError(f"least_python worker: {done} jobs of {n}; {problems[:3]}")
    return n / seconds


class CpuUse:
    """The CPU a command used, read around it: its own and its children's (the worker and
    its shells), the PostgreSQL server's (its live processes, and those it reaped), and how
    busy the whole machine was. Says whether a run was bound by CPU or by waiting."""

    def __init__(self) -> None:
        self.client = self.server = self.busy = 0.0

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        idle = ticks[3] + ticks[4]
        return sum(ticks[:8]) - idle, idle

    @staticmethod
    def _server() -> float:
        """CPU seconds of every process named postgres, with what its children used."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    name, _, rest = f.read().partition(" (")[2].partition(") ")
            except OSError:
                continue
            if name == "postgres":
                fields = rest.split()
                total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return total / os.sysconf("SC_CLK_TCK")

    @contextmanager
    def measuring(self) -> Iterator[CpuUse]:
        machine, server = self._machine(), self._server()
        own = os.times()
        yield self
        after = os.times()
        self.client = (after.children_user + after.children_system
                       - own.children_user - own.children_system)
        self.server = self._server() - server
        busy, idle = (b - a for a, b in zip(machine, self._machine(), strict=True))
        self.busy = busy / max(1, busy + idle)


def queuectl_worker_rate(ctx: Context, n: int, concurrency: int, store: str = "sqlite",
                         cpu: CpuUse | None = None) -> tuple[float, float]:
    """Jobs/s of the whole ``worker --burst`` command, and between its first claim and its
    last result by the ledger's own times (no interpreter start-up, no closing checkpoint)."""
    with ctx.fresh_target("worker", store) as db:
        enqueue_true(db, n)
        with (cpu or CpuUse()).measuring():
            seconds = run_timed(
                ctx, ctx.queuectl(db, "worker", "-c", str(concurrency), "--burst"), db)
        counts = job_counts(db)
        if counts.get("completed") != n:
            raise RuntimeError(f"worker left {counts} (expected {n} completed)")
        return n / seconds, n / claims_span(db)


SPAWNS_ALONE = "shells and statements alone"
LEAST_WORKER = "worker written by hand"


def bench_worker(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.worker_jobs
    have_huey = importlib.util.find_spec("huey") is not None
    base, mine, steady, peer, ceiling = [], [], [], [], []
    least: list[float] = []  # the same worker with the least Python it needs
    by_hand = True
    for r in range(ctx.runs):
        base.append(spawn_baseline(n))
        whole, between = queuectl_worker_rate(ctx, n, 2)
        mine.append(whole)
        steady.append(between)
        ceiling.append(statements_and_spawns_rate(ctx, n))
        if by_hand:
            by_hand = trace.by_hand(ctx, "worker", lambda: least_python_worker_rate(ctx, n),
                                    least)
        if have_huey:
            peer.append(huey_rate(ctx, n))
        ctx.log(f"worker run {r + 1}/{ctx.runs}: queuectl {mine[-1]:.0f}/s (first claim to "
                f"last result {steady[-1]:.0f}/s), 2-thread spawn "
                f"{base[-1]:.0f}/s, its statements and spawns alone {ceiling[-1]:.0f}/s"
                + (f", with the least Python {least[-1]:.0f}/s" if by_hand else "")
                + (f", huey {peer[-1]:.0f}/s" if have_huey else ""))
    # Its shells and statements alone leave out even the Python any worker needs to run
    # a job and decide its result; where it was run, the worker with only that is the
    # tighter ceiling.
    tightest = least or ceiling
    tightest_label, means = (LEAST_WORKER, LEAST_PYTHON) if least else (SPAWNS_ALONE, NO_PYTHON)
    rows = [
        make_row("worker", "worker_vs_spawn", f"worker throughput, {n:,} `true` jobs, `-c 2`",
                 mine, "jobs/s", Target(">= 0.65 x spawn baseline", "ratio", ">=", 0.65),
                 baseline_samples=base, baseline_label="2 threads `sh -c true`",
                 ceiling_samples=tightest, ceiling_label=tightest_label, ceiling_means=means),
        make_row("worker", "worker_steady_vs_spawn",
                 f"the same, first claim to last result (ledger times), {n:,} jobs", steady,
                 "jobs/s", None, baseline_samples=base, baseline_label="2 threads `sh -c true`",
                 note="without the command's start-up and exit, which the baseline never pays"),
        make_row("worker", "worker_statements_vs_spawn",
                 f"2 processes, each job a `sh -c true` and then its cycle's statements "
                 f"(recorded, replayed in order on a copy of the store), {n:,} jobs", ceiling,
                 "jobs/s", None, baseline_samples=base, baseline_label="2 threads `sh -c true`",
                 note="a worker with no queuectl Python: its ceiling on this schema "
                      "(tools/bench/trace.py)"),
        *([] if not least else [make_row(
            "worker", "worker_least_python_vs_spawn",
            f"2 processes, each a worker with the least Python it needs, written by hand, "
            f"{n:,} jobs", least, "jobs/s", None, baseline_samples=base,
            baseline_label="2 threads `sh -c true`",
            note="each job's shell spawned, its output read and its result written with the "
                 "cycle's statements, locks and encoded events, and no ledger, projection, "
                 "decision or worker code between them (least_python_worker_rate in "
                 "tools/bench/scenarios/worker.py); what they leave replays exactly; from "
                 "ready to the last end, without a command's start-up or exit")]),
    ]
    huey_target = Target(">= 1.8 x huey", "ratio", ">=", 1.8)
    if have_huey:
        rows.append(make_row(
            "worker", "worker_vs_huey", f"worker throughput vs huey, {n:,} jobs", mine, "jobs/s",
            huey_target,
            baseline_samples=peer, baseline_label="huey SqliteHuey, 2 process workers",
            ceiling_samples=tightest, ceiling_label=tightest_label, ceiling_means=means))
    else:
        row = make_row("worker", "worker_vs_huey", f"worker throughput vs huey, {n:,} jobs",
                       mine, "jobs/s", None, note="n/a (pip install .[bench])")
        row.status, row.target, row.baseline_label = "n/a", huey_target.text, "huey not installed"
        rows.append(row)
    result.details["huey"] = have_huey
    return rows


def bench_pg_worker(ctx: Context, result: ScenarioResult) -> list[Row]:
    """The PostgreSQL worker against the SQLite one and procrastinate, each run in turn."""
    n = ctx.sizes.worker_jobs
    peer_version = installed_version("procrastinate")
    lite, lite_steady, mine, steady, peer, peer_steady = [], [], [], [], [], []
    alone: list[float] = []  # the PostgreSQL worker's statements and spawns alone
    use: dict[str, list[CpuUse]] = {"sqlite": [], "postgres": []}
    for r in range(ctx.runs):
        use["sqlite"].append(CpuUse())
        whole, between = queuectl_worker_rate(ctx, n, 2, "sqlite", use["sqlite"][-1])
        lite.append(whole)
        lite_steady.append(between)
        use["postgres"].append(CpuUse())
        whole, between = queuectl_worker_rate(ctx, n, 2, "postgres", use["postgres"][-1])
        mine.append(whole)
        steady.append(between)
        alone.append(statements_and_spawns_rate(ctx, n, "postgres"))
        if peer_version:
            whole, between = procrastinate_rate(ctx, n)
            peer.append(whole)
            peer_steady.append(between)
        ctx.log(f"worker run {r + 1}/{ctx.runs}: PostgreSQL {mine[-1]:.0f}/s (first claim to "
                f"last result {steady[-1]:.0f}/s), SQLite {lite[-1]:.0f}/s ({lite_steady[-1]:.0f}"
                f"/s), PostgreSQL statements and spawns alone {alone[-1]:.0f}/s"
                + (f", procrastinate {peer[-1]:.0f}/s ({peer_steady[-1]:.0f}/s)"
                         if peer_version else ""))
    result.details["procrastinate"] = peer_version
    sqlite_label = "SQLite `worker -c 2 --burst`"
    cpu = {store: {"client_ms": median([u.client / n * 1000 for u in uses]),
                   "server_ms": median([u.server / n * 1000 for u in uses]),
                   "busy": median([u.busy for u in uses])} for store, uses in use.items()}
    result.details["cpu_per_job"] = cpu
    cores = os.cpu_count() or 1
    ceiling = {store: cores / (c["client_ms"] + c["server_ms"]) * 1000 for store, c in cpu.items()}
    ctx.log("CPU a job: " + "; ".join(
        f"{store} {c['client_ms']:.2f} ms worker and shells + {c['server_ms']:.2f} ms server, "
        f"machine {c['busy']:.0%} busy" for store, c in cpu.items()))
    rows = [
        make_row("worker", "pg_worker_vs_sqlite",
                 f"PostgreSQL worker throughput, {n:,} `true` jobs, `-c 2`", mine, "jobs/s",
                 Target(">= 0.9 x SQLite worker", "ratio", ">=", 0.9),
                 baseline_samples=lite, baseline_label=sqlite_label,
                 ceiling_samples=alone, ceiling_label=SPAWNS_ALONE),
        make_row("worker", "pg_worker_steady_vs_sqlite",
                 f"the same, first claim to last result (ledger times), {n:,} jobs", steady,
                 "jobs/s", None, baseline_samples=lite_steady,
                 baseline_label="SQLite, first claim to last result"),
        make_row("worker", "pg_worker_statements_vs_sqlite",
                 f"2 processes, each job a `sh -c true` and then its PostgreSQL cycle's "
                 f"statements (recorded, replayed in order on a copy of the store), {n:,} jobs",
                 alone, "jobs/s", None, baseline_samples=lite, baseline_label=sqlite_label,
                 note="a PostgreSQL worker with no queuectl Python: its ceiling on this "
                      "schema (tools/bench/trace.py)"),
        make_row("worker", "pg_worker_cpu",
                 "CPU a job, PostgreSQL worker (worker + shells + server), `-c 2`",
                 [(u.client + u.server) / n * 1000 for u in use["postgres"]], "ms", None,
                 baseline_samples=[(u.client + u.server) / n * 1000 for u in use["sqlite"]],
                 baseline_label="SQLite worker + shells",
                 note=(f"server {cpu['postgres']['server_ms']:.2f} ms; machine busy "
                       f"{cpu['postgres']['busy']:.0%} (SQLite {cpu['sqlite']['busy']:.0%}); "
                       f"CPU-bound ceiling on {cores} cores: PostgreSQL "
                       f"{ceiling['postgres']:.0f} jobs/s, SQLite {ceiling['sqlite']:.0f}")),
    ]
    figure = f"PostgreSQL worker throughput vs procrastinate, {n:,} jobs"
    target = Target(">= 1.5 x procrastinate", "ratio", ">=", 1.5)
    if not peer_version:
        row = make_row("worker", "pg_worker_vs_procrastinate", figure, mine, "jobs/s", None,
                       note="n/a (pip install .[bench])")
        row.status, row.target = "n/a", target.text
        row.baseline_label = "procrastinate not installed"
        return [*rows, row]
    return [*rows, make_row(
        "worker", "pg_worker_vs_procrastinate", figure, mine, "jobs/s", target,
        baseline_samples=peer,
        baseline_label=f"procrastinate {peer_version}, `worker --concurrency 2 --one-shot`",
        note=f"procrastinate first start to last success {median(peer_steady):.0f} jobs/s")]
