#!/usr/bin/env python3
"""queuectl's benchmark suite: every figure of the performance issue, against its target.

    python tools/bench.py [--backend sqlite|postgres] [--quick] [--runs N] [--json]
                          [--only NAME,...] [--save FILE] [--strict]

Scenarios (``--only`` takes these names):

  worker   worker throughput: ``queuectl worker -c 2 --burst`` on N ``true`` jobs, start to exit,
           against 2 threads running ``subprocess.run(["sh", "-c", "true"])`` (and huey's
           SqliteHuey consumer with 2 process workers, when huey is installed)
  cycle    ledger cycle: claim + finish(Completed) through the library, no process spawned
  latency  pickup latency: enqueue commit -> job process start, after the worker idled
  startup  CLI start-up: ``queuectl enqueue -c true`` against ``python -c "import click,
           msgspec, sqlite3"``; and whether rich / sqlite_utils load on that path; and a
           shell completion of job ids (``queuectl show <Tab>``), wall time
  bulk     bulk enqueue: ``queuectl enqueue --file`` with N JSON lines, end to end
  replay   replay: ``ledger.rebuild`` of a ledger holding N jobs' worth of events
  reads    reads at scale: ``status --json`` and ``list -s pending --limit 20`` on that ledger,
           wall time over the CLI floor
  memory   peak RSS of ``queuectl worker -c 4 --burst`` running N ``true`` jobs
  api      ``Queue.enqueue`` from Python, one durable job a call, against huey's task enqueue
           on SqliteHuey and a bare one-row durable commit of the same store
  prune    retention: ``queuectl prune --before 0s`` on 10 x N finished jobs and a day of two
           idle workers' heartbeats: ledger bytes a completed job before and after, and its rate
  dashboard  ``queuectl dashboard`` on the replay ledger, in process: the server time
           (its Server-Timing header) of the overview, the first jobs page, the first pending
           page, a command search that finds nothing and an unchanged poll (304); and the
           overview again with the clock set just after the ledger's last run, so that its
           last hour holds every run (needs the dashboard extra and httpx)

Every figure is the median of several runs (``--runs``, default 5; ``--quick``: 2 runs and
small sizes, under a minute). Ratios are taken against a baseline measured in the same run,
interleaved with the figure itself, because the machine is shared and noisy. Every scenario
uses its own fresh temporary database; the big replay ledger is built once and cached under
``$QUEUECTL_BENCH_CACHE`` (default ``/tmp/queuectl-bench-cache``), keyed by its size and by the
event/ledger code that shapes its rows.

``--backend postgres`` runs worker, cycle, latency, bulk, reads, prune, api and dashboard on
PostgreSQL instead
(startup, replay and memory give one n/a row each): each run gets a fresh database
``queuectl_bench_<random>`` on the server ``--pg-admin`` (or ``$QUEUECTL_BENCH_PG``) names,
dropped afterwards. Its worker is compared with the SQLite worker, run beside it, and with
procrastinate (a PostgreSQL job queue, ``pip install .[bench]``). The reads ledger is the replay
ledger imported once and kept on the server as a template database, keyed like the SQLite one.

Output: a markdown table on stdout (``--json``: one JSON document instead); progress on stderr.
Exit status 1 when a scenario could not run (or, with ``--strict``, when a target is missed).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bench the checkout this file lives in

from queuectl import claims, decisions, ledger, reads  # noqa: E402
from queuectl import events as ev  # noqa: E402
from queuectl.store import is_postgres  # noqa: E402
from queuectl.store import sqlite as sqlite_store  # noqa: E402
from queuectl.store.postgres import without_password  # noqa: E402

try:  # the worker's own connection setup and waker thread, where this version has them
    from queuectl.store.sqlite import Waker  # noqa: E402
except ImportError:
    Waker = None  # type: ignore[assignment,misc]

SCENARIOS = ("worker", "cycle", "latency", "startup", "bulk", "replay", "reads", "dashboard",
             "memory", "prune", "api")
FLOOR_CODE = "import click, msgspec, sqlite3"
CACHE_FORMAT = "2"  # bump when build_ledger() changes the rows it writes
BACKENDS = ("sqlite", "postgres")
PG_ADMIN = "postgresql://root@127.0.0.1:5432/postgres"
PG_PREFIX = "queuectl_bench_"
# A replay ledger this big takes over a minute to import: keep it on the server, copy it.
PG_CACHE_MIN_JOBS = 100_000
# What a postgres run leaves out, and why: one n/a row each.
PG_SKIPPED = {
    "startup": "`enqueue -c true` start-up against the import floor",
    "replay": "`ledger.rebuild` of the replay ledger",
    "memory": "worker peak RSS, `-c 4`",
}


# -- sizes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    worker_jobs: int
    cycle_jobs: int
    idle: tuple[float, ...]  # seconds a worker idles before each pickup sample
    short_idle_samples: int  # samples per idle time under 1 s (longer ones: one per run)
    cli_reps_per_run: int
    bulk_jobs: int
    replay_jobs: int
    reads_reps_per_run: int
    memory_jobs: int


FULL = Sizes(
    worker_jobs=2_000,
    cycle_jobs=5_000,
    idle=(0.1, 5.0, 30.0),
    short_idle_samples=20,
    cli_reps_per_run=4,
    bulk_jobs=100_000,
    replay_jobs=1_000_000,
    reads_reps_per_run=4,
    memory_jobs=1_000,
)
QUICK = Sizes(
    worker_jobs=200,
    cycle_jobs=500,
    idle=(0.1, 1.0),
    short_idle_samples=6,
    cli_reps_per_run=3,
    bulk_jobs=5_000,
    replay_jobs=20_000,
    reads_reps_per_run=3,
    memory_jobs=100,
)


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    on: str  # "value" or "ratio"
    op: str  # ">=" or "<="
    limit: float

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = value if self.on == "value" else ratio
        if x is None or not math.isfinite(x):
            return None
        return x >= self.limit if self.op == ">=" else x <= self.limit


@dataclass
class Row:
    scenario: str
    key: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    target: str = ""
    status: str = "info"  # pass | fail | info | n/a | error
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class ScenarioResult:
    name: str
    ok: bool = False
    seconds: float = 0.0
    error: str | None = None
    details: dict[str, object] = field(default_factory=dict)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def paired_ratio(values: Sequence[float], baselines: Sequence[float]) -> float:
    """Median of the per-run ratios: each figure is compared with the baseline run next to it."""
    return median([v / b for v, b in zip(values, baselines, strict=True)])


def make_row(
    scenario: str,
    key: str,
    figure: str,
    samples: Sequence[float],
    unit: str,
    target: Target | None = None,
    *,
    value: float | None = None,
    baseline_samples: Sequence[float] = (),
    baseline_label: str = "",
    ratio: float | None = None,
    note: str = "",
) -> Row:
    if value is None:
        value = median(samples)
    baseline = median(baseline_samples) if baseline_samples else None
    if ratio is None and baseline_samples:
        ratio = paired_ratio(samples, baseline_samples)
    met = target.met(value, ratio) if target else None
    status = "info" if target is None else ("error" if met is None else ("pass" if met else "fail"))
    return Row(
        scenario=scenario,
        key=key,
        figure=figure,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_label=baseline_label,
        ratio=ratio,
        target=target.text if target else "",
        status=status,
        samples=[round(x, 6) for x in samples],
        baseline_samples=[round(x, 6) for x in baseline_samples],
        note=note,
    )


# -- the run's context: temp dirs, child processes, logging -------------------------------


class Context:
    def __init__(self, sizes: Sizes, runs: int, cache_dir: Path, quiet: bool,
                 backend: str = "sqlite", pg_admin: str = PG_ADMIN) -> None:
        self.sizes = sizes
        self.runs = runs
        self.cache_dir = cache_dir
        self.quiet = quiet
        self.backend = backend
        self.pg_admin = pg_admin
        self.pg_databases: list[str] = []  # made by this run and not dropped yet
        self.tmp = Path(tempfile.mkdtemp(prefix="queuectl-bench-"))
        self.started = time.monotonic()
        self.children: list[subprocess.Popen[bytes]] = []
        self.floor_ms: list[float] = []  # CLI floor samples from `startup`, reused by `reads`
        self.replay_db: Path | None = None  # the replay scenario's copy, reused by `reads`
        self._n = 0
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        )
        self.env = env

    def log(self, text: str) -> None:
        if not self.quiet:
            print(f"[bench {time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr,
                  flush=True)

    def fresh_dir(self, label: str) -> Path:
        self._n += 1
        path = self.tmp / f"{self._n:03d}-{label}"
        path.mkdir()
        return path

    @contextmanager
    def fresh_db(self, label: str) -> Iterator[Path]:
        """A path for a brand-new database in its own directory, removed afterwards."""
        directory = self.fresh_dir(label)
        try:
            yield directory / "queue.db"
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def fresh_target(self, label: str, store: str | None = None
                     ) -> AbstractContextManager[Path | str]:
        """A brand-new database of ``store`` (default: this run's backend), removed
        afterwards: a SQLite path, or a PostgreSQL URL."""
        if (store or self.backend) == "postgres":
            return self.fresh_pg()
        return self.fresh_db(label)

    @contextmanager
    def fresh_pg(self, template: str | None = None) -> Iterator[str]:
        """The URL of a brand-new PostgreSQL database (a copy of ``template``, if given),
        dropped afterwards."""
        name = self.create_pg(template)
        try:
            yield pg_url(self.pg_admin, name)
        finally:
            self.drop_pg(name)

    def create_pg(self, template: str | None = None) -> str:
        name = f"{PG_PREFIX}{secrets.token_hex(6)}"
        # FILE_COPY: a big template is copied file by file, without writing it all to the WAL.
        copy = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        self.pg_databases.append(name)
        pg_execute(self.pg_admin, f"CREATE DATABASE {name}{copy}")
        return name

    def drop_pg(self, name: str) -> None:
        # FORCE: a worker this run started (or killed) may still hold a session there.
        pg_execute(self.pg_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if name in self.pg_databases:
            self.pg_databases.remove(name)

    def env_for(self, db: Path | str | None = None, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        if db is not None:
            env["QUEUECTL_DB"] = str(db)
        env.update(extra)
        return env

    def queuectl(self, db: Path | str, *args: str) -> list[str]:
        return [sys.executable, "-m", "queuectl", "--db", str(db), *args]

    def popen(self, cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Stop a child this run started (its own process group), politely then firmly."""
        if proc.returncode is None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                proc.wait()
        if proc in self.children:
            self.children.remove(proc)

    def close(self, keep: bool = False) -> None:
        for proc in list(self.children):
            self.stop(proc)
        for name in list(self.pg_databases):  # left by an interrupted scenario
            try:
                self.drop_pg(name)
            except Exception as exc:
                self.log(f"could not drop database {name}: {exc}")
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_timed(ctx: Context, cmd: list[str], db: Path | str | None = None,
              env: dict[str, str] | None = None, **kwargs: object) -> float:
    """Wall seconds of one command, which must succeed."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env or ctx.env_for(db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        **kwargs,
    )  # type: ignore[call-overload]
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}"
        )
    return seconds


# A child's ru_maxrss also counts the memory of the process it was forked from (Linux records
# the pre-exec high-water mark), so a big benchmark process would inflate it. A tiny launcher
# (``python -S``, a few MiB) forks the command and reports the command's own peak.
RSS_LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)
"""


def peak_rss(ctx: Context, cmd: list[str], db: Path | None = None) -> tuple[int, float]:
    """Run ``cmd`` to its end: its exit code and its peak RSS in MiB."""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", RSS_LAUNCHER, *cmd],
        env=ctx.env_for(db), capture_output=True, text=True,
    )
    try:
        code, kib = proc.stdout.split()[-2:]
    except ValueError:
        raise RuntimeError(f"rss launcher failed: {proc.stderr[-500:]}") from None
    return int(code), int(kib) / 1024  # Linux reports KiB


def pg_url(admin: str, name: str) -> str:
    """The admin URL with its database replaced by ``name``."""
    return urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))


def pg_execute(url: str, sql: str, params: Sequence[object] = ()) -> list[Any]:
    """One statement on the database ``url`` names, outside any transaction (as CREATE
    DATABASE must be); its rows, if any."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


@contextmanager
def reading(db: Path | str) -> Iterator[Any]:
    """A plain connection for the bench's own queries (``?`` placeholders) on either store."""
    conn: Any = ledger.connect(db, create=False) if is_postgres(db) else sqlite3.connect(db)
    try:
        yield conn
    finally:
        conn.close()


def enqueue_true(db: Path | str, n: int, command: str = "true") -> None:
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command=command) for _ in range(n)])
    finally:
        conn.close()


def job_counts(db: Path | str) -> dict[str, int]:
    with reading(db) as conn:
        return dict(conn.execute(
            "SELECT state, sum(n) FROM job_counts GROUP BY state HAVING sum(n) != 0").fetchall())


# -- 1. worker throughput -----------------------------------------------------------------


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

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return n / (time.perf_counter() - start)


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
        with reading(db) as conn:
            first, last = conn.execute(
                "SELECT min(at), max(at) FROM events WHERE type IN ('claimed', 'completed')"
            ).fetchone()
        steady = _parse_at(last) - _parse_at(first)
        return n / seconds, n / steady


def load_app(directory: Path, module_name: str, source: str) -> Any:
    """Write a peer queue's app module into ``directory`` and import it here too."""
    app = directory / f"{module_name}.py"
    app.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, app)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HUEY_APP = '''\
import subprocess
from huey import SqliteHuey

huey = SqliteHuey("bench", filename={filename!r})


@huey.task()
def run(command):
    subprocess.run(["sh", "-c", command])
    return 1
'''


def huey_rate(ctx: Context, n: int, workers: int = 2) -> float:
    """Jobs/s of huey's SqliteHuey consumer (process workers), consumer start to last result."""
    directory = ctx.fresh_dir("huey")
    try:
        module_name = f"qbench_huey_{directory.name.replace('-', '_')}"
        module = load_app(directory, module_name,
                          HUEY_APP.format(filename=str(directory / "huey.db")))
        for _ in range(n):
            module.run("true")
        cmd = [
            sys.executable, "-c",
            "from huey.bin.huey_consumer import consumer_main; consumer_main()",
            f"{module_name}.huey", "-w", str(workers), "-k", "process", "-n", "-C", "-q",
        ]
        env = ctx.env_for(PYTHONPATH=os.pathsep.join([str(directory), ctx.env["PYTHONPATH"]]))
        log = directory / "consumer.log"
        with log.open("wb") as log_file:
            start = time.perf_counter()
            proc = ctx.popen(cmd, cwd=directory, env=env, stderr=log_file)
        deadline = start + max(120.0, n / 5)
        while module.huey.result_count() < n:
            if proc.poll() is not None:
                raise RuntimeError(f"huey consumer exited {proc.returncode}: "
                                   f"{log.read_text()[-500:]}")
            if time.perf_counter() > deadline:
                raise RuntimeError("huey consumer did not finish in time")
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        ctx.stop(proc)
        module.huey.storage.close()
        return n / seconds
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_worker(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.worker_jobs
    have_huey = importlib.util.find_spec("huey") is not None
    base, mine, steady, peer = [], [], [], []
    for r in range(ctx.runs):
        base.append(spawn_baseline(n))
        whole, between = queuectl_worker_rate(ctx, n, 2)
        mine.append(whole)
        steady.append(between)
        if have_huey:
            peer.append(huey_rate(ctx, n))
        ctx.log(f"worker run {r + 1}/{ctx.runs}: queuectl {mine[-1]:.0f}/s (first claim to "
                f"last result {steady[-1]:.0f}/s), 2-thread spawn "
                f"{base[-1]:.0f}/s" + (f", huey {peer[-1]:.0f}/s" if have_huey else ""))
    rows = [
        make_row("worker", "worker_vs_spawn", f"worker throughput, {n:,} `true` jobs, `-c 2`",
                 mine, "jobs/s", Target(">= 0.65 x spawn baseline", "ratio", ">=", 0.65),
                 baseline_samples=base, baseline_label="2 threads `sh -c true`"),
        make_row("worker", "worker_steady_vs_spawn",
                 f"the same, first claim to last result (ledger times), {n:,} jobs", steady,
                 "jobs/s", None, baseline_samples=base, baseline_label="2 threads `sh -c true`",
                 note="without the command's start-up and exit, which the baseline never pays"),
    ]
    if have_huey:
        rows.append(make_row(
            "worker", "worker_vs_huey", f"worker throughput vs huey, {n:,} jobs", mine, "jobs/s",
            Target(">= 2.5 x huey", "ratio", ">=", 2.5),
            baseline_samples=peer, baseline_label="huey SqliteHuey, 2 process workers"))
    else:
        row = make_row("worker", "worker_vs_huey", f"worker throughput vs huey, {n:,} jobs",
                       mine, "jobs/s", None, note="n/a (pip install .[bench])")
        row.status, row.target, row.baseline_label = "n/a", ">= 2.5 x huey", "huey not installed"
        rows.append(row)
    result.details["huey"] = have_huey
    return rows


def huey_enqueue_rate(ctx: Context, n: int) -> float:
    """Calls/s of a huey task's enqueue on SqliteHuey (its default: each commit synced)."""
    directory = ctx.fresh_dir("huey-enqueue")
    try:
        module_name = f"qbench_huey_{directory.name.replace('-', '_')}"
        module = load_app(directory, module_name,
                          HUEY_APP.format(filename=str(directory / "huey.db")))
        start = time.perf_counter()
        for _ in range(n):
            module.run("true")
        seconds = time.perf_counter() - start
        module.huey.storage.close()
        return n / seconds
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def api_enqueue_rate(ctx: Context, n: int) -> float:
    """Calls/s of ``Queue.enqueue`` on one ``Queue`` held open, each durable on return."""
    from queuectl.api import Queue

    with ctx.fresh_target("api") as db, Queue(db) as queue:
        start = time.perf_counter()
        for _ in range(n):
            queue.enqueue("true")
        seconds = time.perf_counter() - start
        if queue.status()["jobs"]["pending"] != n:
            raise RuntimeError("Queue.enqueue lost jobs")
    return n / seconds


def durable_commit_rate(ctx: Context, n: int) -> float:
    """Commits/s of a one-row INSERT, each durable when it returns, on this run's store: what
    any queue that promises that pays, whatever its own work (SQLite: WAL, synchronous=FULL,
    as queuectl's and huey's; PostgreSQL: synchronous_commit=on)."""
    if ctx.backend == "postgres":
        with ctx.fresh_pg() as url:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (x int)")
                start = time.perf_counter()
                for i in range(n):
                    conn.execute("INSERT INTO t VALUES (%s)", (i,))
                return n / (time.perf_counter() - start)
    with ctx.fresh_db("commit-floor") as path:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("CREATE TABLE t (x INTEGER)")
            start = time.perf_counter()
            for i in range(n):
                conn.execute("INSERT INTO t VALUES (?)", (i,))
            return n / (time.perf_counter() - start)
        finally:
            conn.close()


def bench_api(ctx: Context, result: ScenarioResult) -> list[Row]:
    """``from queuectl import Queue``: one job a call, each durable when it returns, against
    huey's task enqueue on SqliteHuey and the store's bare durable commit, run in turn."""
    n = ctx.sizes.worker_jobs
    have_huey = importlib.util.find_spec("huey") is not None
    mine, peer, floor = [], [], []
    for r in range(ctx.runs):
        if have_huey:
            peer.append(huey_enqueue_rate(ctx, n))
        mine.append(api_enqueue_rate(ctx, n))
        floor.append(durable_commit_rate(ctx, n))
        ctx.log(f"api run {r + 1}/{ctx.runs}: Queue.enqueue {mine[-1]:,.0f}/s, durable "
                f"one-row commit {floor[-1]:,.0f}/s"
                + (f", huey task enqueue {peer[-1]:,.0f}/s" if have_huey else ""))
    figure = f"`Queue.enqueue`, one job a call, each durable, {n:,} calls"
    target = Target(">= 1.5 x huey", "ratio", ">=", 1.5)
    if have_huey:
        first = make_row("api", "api_enqueue_vs_huey", figure, mine, "jobs/s", target,
                         baseline_samples=peer, baseline_label="huey task() on SqliteHuey")
    else:
        first = make_row("api", "api_enqueue_vs_huey", figure, mine, "jobs/s", None,
                         note="n/a (pip install .[bench])")
        first.status, first.target, first.baseline_label = "n/a", target.text, "huey not installed"
    result.details["huey"] = have_huey
    return [first, make_row(
        "api", "api_enqueue_vs_commit", "the same against a bare one-row durable commit", mine,
        "jobs/s", None, baseline_samples=floor,
        baseline_label="one-row INSERT, durable commit, same store",
        note="the bound: every durable enqueue pays at least one such commit")]


PROCRASTINATE_APP = '''\
import subprocess

import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo={url!r}))


@app.task(name="run")
def run(command):
    subprocess.run(["sh", "-c", command])
'''


def procrastinate_rate(ctx: Context, n: int, concurrency: int = 2) -> tuple[float, float]:
    """Jobs/s of procrastinate's whole ``worker --one-shot`` command on ``n`` jobs deferred
    before it starts, and between its first start and its last success by its own event
    times. Its tasks are sync, so it runs them in threads, ``concurrency`` at a time."""
    directory = ctx.fresh_dir("procrastinate")
    try:
        with ctx.fresh_pg() as url:
            module_name = f"qbench_procrastinate_{directory.name.replace('-', '_')}"
            module = load_app(directory, module_name, PROCRASTINATE_APP.format(url=url))
            with module.app.open():  # its own schema tooling, then all the jobs in one batch
                module.app.schema_manager.apply_schema()
                module.run.batch_defer(*[{"command": "true"}] * n)
            cmd = [sys.executable, "-m", "procrastinate", f"--app={module_name}.app",
                   "--log-level", "warning",  # its default logs two lines a job
                   "worker", "--concurrency", str(concurrency), "--one-shot"]
            env = ctx.env_for(PYTHONPATH=os.pathsep.join([str(directory), ctx.env["PYTHONPATH"]]))
            seconds = run_timed(ctx, cmd, env=env, cwd=directory)
            done = dict(pg_execute(
                url, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"))
            if done != {"succeeded": n}:
                raise RuntimeError(f"procrastinate left {done} (expected {n} succeeded)")
            ((steady,),) = pg_execute(url, """
                SELECT extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')
                                          - min(at) FILTER (WHERE type = 'started'))::float
                FROM procrastinate_events""")
        return n / seconds, n / steady
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_pg_worker(ctx: Context, result: ScenarioResult) -> list[Row]:
    """The PostgreSQL worker against the SQLite one and procrastinate, each run in turn."""
    n = ctx.sizes.worker_jobs
    peer_version = installed_version("procrastinate")
    lite, lite_steady, mine, steady, peer, peer_steady = [], [], [], [], [], []
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
        if peer_version:
            whole, between = procrastinate_rate(ctx, n)
            peer.append(whole)
            peer_steady.append(between)
        ctx.log(f"worker run {r + 1}/{ctx.runs}: PostgreSQL {mine[-1]:.0f}/s (first claim to "
                f"last result {steady[-1]:.0f}/s), SQLite {lite[-1]:.0f}/s ({lite_steady[-1]:.0f}"
                "/s)" + (f", procrastinate {peer[-1]:.0f}/s ({peer_steady[-1]:.0f}/s)"
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
                 Target(">= 0.8 x SQLite worker", "ratio", ">=", 0.8),
                 baseline_samples=lite, baseline_label=sqlite_label),
        make_row("worker", "pg_worker_steady_vs_sqlite",
                 f"the same, first claim to last result (ledger times), {n:,} jobs", steady,
                 "jobs/s", None, baseline_samples=lite_steady,
                 baseline_label="SQLite, first claim to last result"),
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


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- 2. ledger cycle ----------------------------------------------------------------------


def cycle_rate(ctx: Context, n: int, combined: bool) -> tuple[float, float, float]:
    """Jobs/s of claiming and completing ``n`` no-op jobs in one process, and the mean
    microseconds spent in the claim and finish calls. ``combined``: the worker's own path,
    ``finish_and_claim`` (each result committed with the next claim), where the queue has it."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        # As a worker runs: its connection, and its process's waker thread beside it
        # (which watches for new work, and on SQLite checkpoints the WAL).
        conn = ledger.connect(db, durable=False)
        conn.for_worker()
        if is_postgres(db):
            waker = conn.waker()
        else:
            waker = Waker(Path(db)) if Waker else None
        try:
            wid = claims.worker_started(conn, os.getpid(), socket.gethostname())
            t_claim = t_finish = 0.0
            done = 0
            start = time.perf_counter()
            claim = claims.claim(conn, wid)
            t_claim += time.perf_counter() - start
            while claim is not None:
                done += 1
                t0 = time.perf_counter()
                result = ev.Completed(job_id=claim.job_id, worker_id=wid, attempt=claim.attempt)
                if combined:
                    _, claim = claims.finish_and_claim(conn, claim, result, wid)
                    t_finish += time.perf_counter() - t0
                else:
                    claims.finish(conn, claim, result)
                    t1 = time.perf_counter()
                    t_finish += t1 - t0
                    claim = claims.claim(conn, wid)
                    t_claim += time.perf_counter() - t1
            seconds = time.perf_counter() - start
        finally:
            if waker:
                waker.close()
            conn.close()
    if done != n:
        raise RuntimeError(f"cycled {done} jobs, expected {n}")
    return n / seconds, t_claim / n * 1e6, t_finish / n * 1e6


def batched_cycle_rate(ctx: Context, n: int, slots: int) -> float:
    """Jobs/s of ``slots`` workers whose results always arrive together: each transaction
    records ``slots`` results and claims the next job for each (``finish_and_claim_many``,
    what a worker process's GroupCommit writes at best)."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        conn = ledger.connect(db, durable=False)
        conn.for_worker()
        try:
            ids = [claims.worker_started(conn, os.getpid(), socket.gethostname())
                   for _ in range(slots)]
            start = time.perf_counter()
            held = [(w, c) for w in ids if (c := claims.claim(conn, w)) is not None]
            done = 0
            while held:
                finished = [(c, ev.Completed(job_id=c.job_id, worker_id=w, attempt=c.attempt))
                            for w, c in held]
                _, following = claims.finish_and_claim_many(conn, finished, [w for w, _ in held])
                done += len(held)
                held = [(w, c) for (w, _), c in zip(held, following, strict=True) if c]
            seconds = time.perf_counter() - start
        finally:
            conn.close()
    if done != n:
        raise RuntimeError(f"cycled {done} jobs, expected {n}")
    return n / seconds


BATCH = 16  # results a transaction records in the batched cycle


def empty_transaction_rate(ctx: Context, n: int) -> float:
    """Write transactions a second that append nothing: the ledger's lock taken, one read
    answered, committed. No job cycle on this store can go faster than this, one job a
    transaction (on PostgreSQL: two round trips, the head row locked between them)."""
    with ctx.fresh_target("cycle") as db:
        conn = ledger.connect(db, durable=False)
        conn.for_worker()
        try:
            start = time.perf_counter()
            for _ in range(n):
                with ledger.write(conn):
                    conn.execute("SELECT 1 WHERE ? > 0", (1,)).fetchone()
            return n / (time.perf_counter() - start)
        finally:
            conn.close()


def bench_cycle(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.cycle_jobs
    combined = hasattr(claims, "finish_and_claim")
    batched = hasattr(claims, "finish_and_claim_many")
    split, split_claim, split_finish, joined, many, empty = [], [], [], [], [], []
    for r in range(ctx.runs):
        rate, c_us, f_us = cycle_rate(ctx, n, combined=False)
        split.append(rate)
        split_claim.append(c_us)
        split_finish.append(f_us)
        if combined:
            joined.append(cycle_rate(ctx, n, combined=True)[0])
        if batched:
            many.append(batched_cycle_rate(ctx, n, BATCH))
        empty.append(empty_transaction_rate(ctx, n))
        ctx.log(f"cycle run {r + 1}/{ctx.runs}: claim + finish {rate:.0f} jobs/s (claim "
                f"{c_us:.0f} us, finish {f_us:.0f} us)"
                + (f"; finish_and_claim {joined[-1]:.0f} jobs/s" if combined else "")
                + (f"; {BATCH} results a transaction {many[-1]:.0f} jobs/s" if batched else "")
                + f"; empty write transactions {empty[-1]:.0f}/s")
    result.details.update(claim_us=median(split_claim), finish_us=median(split_finish),
                          finish_and_claim=combined)
    target = (Target(">= 3,000 jobs/s", "value", ">=", 3000) if ctx.backend == "postgres"
              else Target(">= 8,000 jobs/s", "value", ">=", 8000))
    split_note = (f"claim {median(split_claim):.0f} us + finish {median(split_finish):.0f} us "
                  "per job")
    if not combined:
        return [make_row("cycle", "ledger_cycle",
                         f"ledger cycle (claim + finish, no spawn), {n:,} jobs", split,
                         "jobs/s", target, note=split_note)]
    rows = [make_row(
        "cycle", "empty_transaction", f"empty write transactions (lock, one read, commit), "
        f"{n:,}", empty, "tx/s", None,
        note="the ceiling of any cycle that commits once a job")]
    # A worker process writes the results its workers hand in together, each with its
    # worker's next claim, in one transaction (worker.Pipeline's group commit): on
    # PostgreSQL, where a commit costs round trips, the batched cycle is what the target
    # measures. A SQLite worker's commits take microseconds, one a job.
    batched_path = batched and ctx.backend == "postgres"
    rows += [] if not batched else [make_row(
        "cycle", "ledger_cycle_batched",
        f"ledger cycle, {BATCH} workers' results a transaction (`finish_and_claim_many`), "
        f"{n:,} jobs", many, "jobs/s", target if batched_path else None,
        note="a process's results written together, as its results thread does")]
    return [
        *rows,
        make_row("cycle", "ledger_cycle",
                 f"ledger cycle, one result a transaction (`finish_and_claim`, no spawn), "
                 f"{n:,} jobs", joined, "jobs/s", None if batched_path else target,
                 note="one commit per job, as a SQLite worker runs"),
        make_row("cycle", "ledger_cycle_split",
                 f"ledger cycle, separate `claim` + `finish` calls, {n:,} jobs", split,
                 "jobs/s", None, note=split_note + "; two commits per job"),
    ]


# -- 3. pickup latency --------------------------------------------------------------------


def _parse_at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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
                claims.append((_parse_at(claimed_at) - committed) * 1000)
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


# -- 4. CLI start-up ----------------------------------------------------------------------


# A command on PostgreSQL imports its driver too: psycopg alone takes about 100 ms here.
PG_FLOOR_CODE = "import click, msgspec, psycopg"


def measure_floor(ctx: Context, code: str = FLOOR_CODE) -> float:
    return run_timed(ctx, [sys.executable, "-c", code]) * 1000


def import_report(ctx: Context, db: Path) -> tuple[list[str], list[tuple[str, float]]]:
    """Heavy modules the enqueue path loads, and its slowest imports (cumulative ms)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *ctx.queuectl(db, "enqueue", "-c", "true")[1:]],
        env=ctx.env_for(db), capture_output=True, text=True, check=True,
    )
    loaded: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                loaded[name.strip()] = int(cumulative) / 1000
    heavy = sorted(
        {name.split(".")[0] for name in loaded} & {"rich", "sqlite_utils"}
    )
    top = sorted(loaded.items(), key=lambda kv: -kv[1])[:12]
    return heavy, top


def bench_startup(ctx: Context, result: ScenarioResult) -> list[Row]:
    floor, wall, completion = [], [], []
    with ctx.fresh_db("startup") as db:
        ledger.connect(db).close()
        enqueue_cmd = ctx.queuectl(db, "enqueue", "-c", "true")
        # What bash runs on a Tab after `queuectl show `: the ids come from the database.
        complete_cmd = [sys.executable, "-m", "queuectl"]
        complete_env = ctx.env_for(db, _QUEUECTL_COMPLETE="bash_complete",
                                   COMP_WORDS="queuectl show ", COMP_CWORD="2")
        measure_floor(ctx)  # warm the page cache for both
        run_timed(ctx, enqueue_cmd, db)
        for _ in range(ctx.runs * ctx.sizes.cli_reps_per_run):
            floor.append(measure_floor(ctx))
            wall.append(run_timed(ctx, enqueue_cmd, db) * 1000)
            completion.append(run_timed(ctx, complete_cmd, env=complete_env) * 1000)
        heavy, top = import_report(ctx, db)
    ctx.floor_ms.extend(floor)
    ctx.log(f"startup: enqueue {median(wall):.1f} ms, completion {median(completion):.1f} ms, "
            f"floor {median(floor):.1f} ms, heavy imports: {heavy or 'none'}")
    result.details["slowest_imports_ms"] = top
    heavy_row = make_row(
        "startup", "enqueue_heavy_imports", "rich / sqlite_utils imported by `enqueue`",
        [float(len(heavy))], "modules", Target("none", "value", "<=", 0),
        note=", ".join(heavy) if heavy else "neither is imported")
    return [
        make_row("startup", "enqueue_wall", "`queuectl enqueue -c true` wall", wall, "ms",
                 Target("<= 1.3 x import floor", "ratio", "<=", 1.3),
                 baseline_samples=floor, baseline_label=f'`python -c "{FLOOR_CODE}"`'),
        heavy_row,
        make_row("startup", "complete_wall", "`queuectl show <Tab>` (bash completion of job "
                 "ids) wall", completion, "ms", Target("<= 100 ms", "value", "<=", 100),
                 baseline_samples=floor, baseline_label=f'`python -c "{FLOOR_CODE}"`',
                 note="on PostgreSQL importing psycopg alone takes about 100 ms more"),
    ]


# -- 5. bulk enqueue ----------------------------------------------------------------------


def bench_bulk(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.bulk_jobs
    directory = ctx.fresh_dir("bulk-input")
    jobs_file = directory / "jobs.jsonl"
    jobs_file.write_text('{"command":"true"}\n' * n)
    rates = []
    try:
        for r in range(ctx.runs):
            with ctx.fresh_target("bulk") as db:
                seconds = run_timed(ctx, ctx.queuectl(db, "enqueue", "--file", str(jobs_file)), db)
                counts = job_counts(db)
                if counts.get("pending") != n:
                    raise RuntimeError(f"bulk enqueue left {counts}, expected {n} pending")
            rates.append(n / seconds)
            ctx.log(f"bulk run {r + 1}/{ctx.runs}: {rates[-1]:.0f} jobs/s ({seconds:.2f} s)")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    pauses = bulk_pauses(ctx, n)
    target = (Target(">= 30,000 jobs/s", "value", ">=", 30_000) if ctx.backend == "postgres"
              else Target(">= 50,000 jobs/s", "value", ">=", 50_000))
    return [make_row("bulk", "bulk_enqueue", f"bulk enqueue, {n:,} JSON lines, end to end",
                     rates, "jobs/s", target),
            make_row("bulk", "bulk_worker_pause",
                     f"longest pause of 2 busy workers while {n:,} jobs are enqueued from a "
                     "file (one transaction)", pauses, "ms", None,
                     note="the gap between two claims, read from the ledger")]


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
                    claims = [_parse_at(at) for (at,) in conn.execute(
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


# -- 6. replay ----------------------------------------------------------------------------


def _cache_key(jobs: int) -> str:
    """Keyed by size, by the code that shapes the ledger's rows, and by the projections'
    versions (a cached ledger with stale projections would be rebuilt on every open)."""
    from projections import REGISTRY

    versions = repr([(p.NAME, p.VERSION) for p in REGISTRY])
    digest = hashlib.sha256()
    page_size = repr(getattr(ledger, "PAGE_SIZE", None))  # fixed when a database is made
    for part in (CACHE_FORMAT, inspect.getsource(ev), repr(sqlite_store.LEDGER_DDL), versions,
                 page_size):
        digest.update(part.encode())
    return f"ledger-{jobs}-{digest.hexdigest()[:12]}.db"


def _at(seq: int) -> str:
    """A distinct, increasing ISO time per event: one millisecond apart."""
    seconds, ms = divmod(seq, 1000)
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"2026-01-{1 + days:02d}T{h:02d}:{m:02d}:{s:02d}.{ms:03d}000Z"


def ledger_rows(jobs: int, pending: int) -> Iterator[tuple[str, str, str | None, str | None, str]]:
    """The events of ``jobs`` jobs: blocks of 1,000 enqueued, then each claimed and completed by
    one of two workers; the last ``pending`` jobs are only enqueued."""
    seq = 0
    encode = ev.encode

    def row(event: ev.Event) -> tuple[str, str, str | None, str | None, str]:
        nonlocal seq
        seq += 1
        return (_at(seq), event.type, getattr(event, "job_id", None),
                getattr(event, "worker_id", None), encode(event))

    workers = ("benchw01", "benchw02")
    # Claims carry since-when the job was eligible where the vocabulary has it, as real ones do.
    eligible = "eligible_at" in getattr(ev.Claimed, "__struct_fields__", ())
    enqueued_at: dict[str, str] = {}
    for w in workers:
        yield row(ev.WorkerStarted(worker_id=w, pid=1, host="bench"))
    done = jobs - pending
    for block in range(0, jobs, 1000):
        ids = [f"j{i:07d}" for i in range(block, min(block + 1000, jobs))]
        for job_id in ids:
            yield row(ev.Enqueued(job_id=job_id, command="true", max_retries=3, backoff_base=2.0))
            enqueued_at[job_id] = _at(seq)
        for i, job_id in enumerate(ids, block):
            if i >= done:
                break
            w = workers[i & 1]
            since = {"eligible_at": enqueued_at.pop(job_id)} if eligible else {}
            yield row(ev.Claimed(job_id=job_id, worker_id=w, attempt=1, **since))
            yield row(ev.Completed(job_id=job_id, worker_id=w, attempt=1, duration=0.002))
        enqueued_at.clear()
    for w in workers:
        yield row(ev.WorkerStopped(worker_id=w, reason="burst: queue empty"))


def build_ledger(ctx: Context, path: Path, jobs: int) -> None:
    conn = ledger.connect(path, durable=False)
    try:
        conn.execute("PRAGMA cache_size = -262144")  # build faster; not part of any figure
        with ledger.write(conn):
            conn.executemany(
                "INSERT INTO events (at, type, job_id, worker_id, body) VALUES (?, ?, ?, ?, ?)",
                ledger_rows(jobs, pending=max(10, jobs // 100)),
            )
        ctx.log(f"replay: {jobs:,} jobs' events written; rebuilding projections once")
        ledger.rebuild(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def cached_ledger(ctx: Context, jobs: int) -> Path:
    """The cached replay ledger for ``jobs`` jobs, built on first use."""
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.cache_dir / _cache_key(jobs)
    if path.exists():
        ctx.log(f"replay: using cached ledger {path}")
        return path
    for stale in ctx.cache_dir.glob(f"ledger-{jobs}-*.db*"):
        stale.unlink()
    ctx.log(f"replay: building a ledger of {jobs:,} jobs in {path} (cached for later runs)")
    building = path.with_name(f"{path.stem}.building-{os.getpid()}.db")
    try:
        build_ledger(ctx, building, jobs)
        for suffix in ("-wal", "-shm"):
            Path(f"{building}{suffix}").unlink(missing_ok=True)
        building.rename(path)
    finally:
        for p in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
            p.unlink(missing_ok=True)
    return path


def copy_of_replay_ledger(ctx: Context) -> Path:
    source = cached_ledger(ctx, ctx.sizes.replay_jobs)
    target = ctx.fresh_dir("replay") / "queue.db"
    shutil.copyfile(source, target)
    return target


def _pg_cache_name(jobs: int) -> str:
    """The replay ledger kept on the PostgreSQL server: keyed as the SQLite one, and by what
    shapes its tables there (the store's schema, the projections' DDL, indexes, triggers)."""
    from projections import REGISTRY
    from queuectl.store import postgres as pg_store

    tables = [(p.NAME, p.VERSION, p.DDL, getattr(p, "INDEXES", ()), getattr(p, "TRIGGERS", {}))
              for p in REGISTRY]
    digest = hashlib.sha256()
    for part in (_cache_key(jobs), repr(pg_store.LEDGER_DDL), repr(pg_store.SCHEMA_VERSION),
                 repr(tables), inspect.getsource(pg_store.PgDialect)):
        digest.update(part.encode())
    return f"{PG_PREFIX}cache_{jobs}_{digest.hexdigest()[:12]}"


def import_replay_ledger(ctx: Context, url: str, jobs: int) -> int:
    """The replay ledger of ``jobs`` jobs exported from its SQLite cache and imported into
    the empty database at ``url``, as ``ledger export`` / ``ledger import`` would move it."""
    source = cached_ledger(ctx, jobs)
    ctx.log(f"reads: importing the {jobs:,}-job ledger into PostgreSQL")
    return copy_ledger(source, url)


def copy_ledger(source: Path, url: str) -> int:
    """The ledger of the SQLite file ``source`` exported and imported into the empty store
    at ``url``, as ``ledger export`` and ``ledger import`` move it; its event count."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)  # the source stays untouched
    try:
        db = ledger.connect(url)
        try:
            return ledger.import_(db, enumerate(ledger.export(reader), 1))  # type: ignore[arg-type]
        finally:
            db.close()
    finally:
        reader.close()


def cached_pg_ledger(ctx: Context, jobs: int) -> str:
    """The name of the server's copy of the replay ledger, imported on first use."""
    name = _pg_cache_name(jobs)
    kept = [row[0] for row in pg_execute(
        ctx.pg_admin, "SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
        (f"{PG_PREFIX}cache_{jobs}_",))]
    if name in kept:
        ctx.log(f"reads: using the cached PostgreSQL ledger {name}")
        return name
    for stale in kept:
        ctx.drop_pg(stale)
    building = ctx.create_pg()  # dropped by this run if it is interrupted
    try:
        import_replay_ledger(ctx, pg_url(ctx.pg_admin, building), jobs)
        pg_execute(ctx.pg_admin, f"ALTER DATABASE {building} RENAME TO {name}")
        ctx.log(f"reads: kept as {name} for later runs")
    finally:
        ctx.drop_pg(building)  # once renamed, nothing is left to drop
    return name


@contextmanager
def pg_replay_ledger(ctx: Context) -> Iterator[str]:
    """A fresh PostgreSQL database holding the replay ledger: a copy of the server's cached
    one, or (small ledgers, which import in seconds) imported anew."""
    jobs = ctx.sizes.replay_jobs
    if jobs < PG_CACHE_MIN_JOBS:
        with ctx.fresh_pg() as url:
            import_replay_ledger(ctx, url, jobs)
            yield url
        return
    with ctx.fresh_pg(template=cached_pg_ledger(ctx, jobs)) as url:
        yield url


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


# -- 7. reads at scale --------------------------------------------------------------------


def bench_reads(ctx: Context, result: ScenarioResult) -> list[Row]:
    if ctx.backend == "postgres":
        with pg_replay_ledger(ctx) as url:
            return reads_rows(ctx, result, url)
    return reads_rows(ctx, result, ctx.replay_db or copy_of_replay_ledger(ctx))


def reads_rows(ctx: Context, result: ScenarioResult, db: Path | str) -> list[Row]:
    status_cmd = ctx.queuectl(db, "status", "--json")
    list_cmd = ctx.queuectl(db, "list", "-s", "pending", "--limit", "20")
    for cmd in (status_cmd, list_cmd):
        run_timed(ctx, cmd, db)  # warm up (and open the copied database once)
    floor, status, listing = [], [], []
    floor_code = PG_FLOOR_CODE if is_postgres(db) else FLOOR_CODE
    for _ in range(ctx.runs * ctx.sizes.reads_reps_per_run):
        floor.append(measure_floor(ctx, floor_code))
        status.append(run_timed(ctx, status_cmd, db) * 1000)
        listing.append(run_timed(ctx, list_cmd, db) * 1000)
    history_ms = history_times(ctx)
    counts = job_counts(db)
    ctx.log(f"reads on {sum(counts.values()):,} jobs: status {median(status):.1f} ms, list "
            f"{median(listing):.1f} ms, floor {median(floor):.1f} ms")
    result.details["jobs"] = counts
    label = f'`python -c "{floor_code}"`'
    over = [s - f for s, f in zip(status, floor, strict=True)]
    over_list = [s - f for s, f in zip(listing, floor, strict=True)]
    jobs = f"{ctx.sizes.replay_jobs:,} jobs"
    driver = "; the floor imports the driver too" if is_postgres(db) else ""
    return [
        make_row("reads", "status_over_floor", f"`status --json` at {jobs}, over floor", over,
                 "ms", Target("<= 100 ms over floor", "value", "<=", 100),
                 baseline_samples=floor, baseline_label=label,
                 ratio=paired_ratio(status, floor), note=f"wall {median(status):.1f} ms{driver}"),
        make_row("reads", "list_over_floor", f"`list -s pending --limit 20` at {jobs}, over floor",
                 over_list, "ms", None, baseline_samples=floor, baseline_label=label,
                 ratio=paired_ratio(listing, floor),
                 note=f"wall {median(listing):.1f} ms; no target of its own{driver}"),
        make_row("reads", "history_10k", "`history` of a job with 10,000 events, wall",
                 history_ms, "ms", None,
                 note="over 500 rows a table is written row by row instead of by rich"),
    ]


# -- 7b. the dashboard at scale -----------------------------------------------------------


def bench_dashboard(ctx: Context, result: ScenarioResult) -> list[Row]:
    if ctx.backend == "postgres":
        with pg_replay_ledger(ctx) as url:
            return dashboard_rows(ctx, result, url)
    return dashboard_rows(ctx, result, ctx.replay_db or copy_of_replay_ledger(ctx))


DASHBOARD_PAGES = {"overview": "/", "jobs": "/jobs", "pending": "/jobs?state=pending",
                   "search": "/jobs?q=no-such-command"}


def server_ms(response: Any) -> float:
    """The server time a dashboard response reports in its Server-Timing header."""
    assert response.status_code in (200, 304), (response.status_code, response.text[:500])
    return float(response.headers["server-timing"].split("dur=")[1])


def dashboard_rows(ctx: Context, result: ScenarioResult, db: Path | str) -> list[Row]:
    import warnings

    from queuectl import clock
    from queuectl.dashboard.app import create_app

    with warnings.catch_warnings():  # Starlette would rather drive httpx2: either works
        warnings.filterwarnings("ignore", "Using `httpx`")
        from starlette.testclient import TestClient

    times: dict[str, list[float]] = {key: [] for key in [*DASHBOARD_PAGES, "poll", "busy"]}
    with TestClient(create_app(str(db)), base_url="http://127.0.0.1") as client:
        for path in DASHBOARD_PAGES.values():
            client.get(path)  # warm up: the first request opens the connection
        etag = client.get("/").headers["etag"]
        for _ in range(ctx.runs * ctx.sizes.reads_reps_per_run):
            for key, path in DASHBOARD_PAGES.items():
                times[key].append(server_ms(client.get(path)))
            times["poll"].append(server_ms(client.get(
                "/", headers={"X-Poll": "1", "If-None-Match": etag})))
        # The ledger's runs ended long ago; with the clock just after the last one, the
        # overview's last hour holds them all (its charts read the newest of them).
        last = ledger.connect(db, create=False)
        try:
            (end,) = last.execute("SELECT max(finished_at) FROM runs").fetchone()
        finally:
            last.close()
        saved = clock.now
        clock.now = lambda: clock.after(end, 1)  # type: ignore[assignment]
        try:
            client.get("/")
            for _ in range(ctx.runs * ctx.sizes.reads_reps_per_run):
                times["busy"].append(server_ms(client.get("/")))
        finally:
            clock.now = saved  # type: ignore[assignment]
    ctx.log("dashboard, server ms: " + ", ".join(
        f"{key} {median(values):.1f}" for key, values in times.items()))
    result.details["server_ms"] = {key: median(values) for key, values in times.items()}
    jobs = f"{ctx.sizes.replay_jobs:,} jobs"
    target = Target("<= 50 ms", "value", "<=", 50)
    return [
        make_row("dashboard", "overview_ms", f"overview at {jobs}, server time", times["overview"],
                 "ms", target, note="counts, queues, workers, last-hour charts"),
        make_row("dashboard", "jobs_ms", f"first jobs page at {jobs}, server time",
                 times["jobs"], "ms", target, note="50 jobs, newest first"),
        make_row("dashboard", "pending_ms", f"first pending page at {jobs}, server time",
                 times["pending"], "ms", None, note="in run order, through jobs_ready"),
        make_row("dashboard", "search_ms", f"command search finding nothing at {jobs}, server time",
                 times["search"], "ms", None,
                 note=f"walks {reads.SCAN:,} jobs, then offers to search older ones"),
        make_row("dashboard", "poll_304_ms", "unchanged poll (304), server time", times["poll"],
                 "ms", None, note="one read of the ledger's head"),
        make_row("dashboard", "busy_overview_ms",
                 f"overview, its last hour holding every run of {jobs}, server time",
                 times["busy"], "ms", None,
                 note=f"charts read the newest {reads.ACTIVITY_RUNS:,} runs of the hour"),
    ]


def history_times(ctx: Context, events: int = 10_000) -> list[float]:
    """Wall milliseconds of ``queuectl history`` for one job retried until it has
    ``events`` events (enqueued, then claimed, failed, scheduled-retry over and over)."""
    with ctx.fresh_db("history") as db:
        conn = ledger.connect(db)
        try:
            decisions.enqueue(conn, [decisions.JobSpec(command="exit 1", id="big", max_retries=10**6)])
            wid = claims.worker_started(conn, os.getpid(), socket.gethostname())
            with ledger.write(conn):
                for attempt in range(1, (events - 1) // 3 + 1):
                    ledger.append(conn, ev.Claimed(job_id="big", worker_id=wid, attempt=attempt))
                    ledger.append(
                        conn,
                        ev.Failed(job_id="big", worker_id=wid, attempt=attempt, exit_code=1,
                                  error="exit status 1", output="some output\n"),
                        ev.ScheduledRetry(job_id="big", attempt=attempt, delay=1.0,
                                          run_at="2030-01-01T00:00:00.000000Z"))
        finally:
            conn.close()
        if ctx.backend != "postgres":
            samples = time_history(ctx, db)
        else:  # written in SQLite and imported: appended one by one it would take seconds
            with ctx.fresh_pg() as url:
                copy_ledger(db, url)
                samples = time_history(ctx, url)
    ctx.log(f"history of a {events:,}-event job: {median(samples):.0f} ms")
    return samples


def time_history(ctx: Context, db: Path | str) -> list[float]:
    cmd = ctx.queuectl(db, "history", "big")
    run_timed(ctx, cmd, db)
    return [run_timed(ctx, cmd, db) * 1000 for _ in range(ctx.runs)]


# -- 8. memory ----------------------------------------------------------------------------


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


def skipped_on_pg(name: str) -> Callable[[Context, ScenarioResult], list[Row]]:
    def bench(ctx: Context, result: ScenarioResult) -> list[Row]:
        return [Row(scenario=name, key=f"{name}_skipped", figure=PG_SKIPPED[name], value=None,
                    unit="", status="n/a", note="n/a: measured on SQLite only")]

    return bench


BENCHES: dict[str, Callable[[Context, ScenarioResult], list[Row]]] = {
    "worker": bench_worker,
    "cycle": bench_cycle,
    "latency": bench_latency,
    "startup": bench_startup,
    "bulk": bench_bulk,
    "replay": bench_replay,
    "reads": bench_reads,
    "dashboard": bench_dashboard,
    "memory": bench_memory,
    "prune": bench_prune,
    "api": bench_api,
}
# cycle, latency, bulk, reads, dashboard, prune and api run the same code on either store
# (``ctx.backend``).
PG_BENCHES = {**BENCHES, "worker": bench_pg_worker,
              **{name: skipped_on_pg(name) for name in PG_SKIPPED}}


# -- output -------------------------------------------------------------------------------


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if unit in ("jobs/s", "events/s"):
        text = f"{x:,.0f}"
    elif abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 10:
        text = f"{x:.1f}"
    else:
        text = f"{x:.2f}"
    return f"{text} {unit}".strip()


def markdown(rows: list[Row], results: dict[str, ScenarioResult]) -> str:
    lines = [
        "| figure | value | baseline (same run) | ratio | target | pass/fail |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        unit = row.unit if row.unit != "modules" else ""
        if row.key == "enqueue_heavy_imports":
            value = row.note
        elif row.status == "n/a":
            value = row.note
        else:
            value = fmt(row.value, unit)
        baseline = (f"{fmt(row.baseline, row.unit)} ({row.baseline_label})"
                    if row.baseline is not None else (row.baseline_label or "-"))
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        verdict = {"pass": "pass", "fail": "**FAIL**", "info": "info", "n/a": "n/a",
                   "error": "error"}[row.status]
        lines.append(f"| {row.figure} | {value} | {baseline} | {ratio} | {row.target or '-'} "
                     f"| {verdict} |")
    for name, res in results.items():
        if not res.ok:
            lines.append(f"| {name} | error: {res.error} | - | - | - | error |")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def ensure_bytecode() -> None:
    """Compile queuectl's modules once, as ``pip install`` does for an installed package.

    An editable checkout run with PYTHONDONTWRITEBYTECODE=1 (this sandbox sets it) would
    otherwise recompile every module at every start-up, some 10 ms that no installed copy pays;
    the floor's own modules (click, msgspec) are precompiled by pip. Writes ``__pycache__``
    beside the sources (git ignores it).
    """
    import compileall

    for package in ("queuectl", "projections"):
        compileall.compile_dir(ROOT / package, quiet=2, maxlevels=0)


def code_fingerprint() -> str:
    """A hash of the queuectl and projections sources this run measures."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("queuectl/*.py"), *ROOT.glob("projections/*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "queuectl", "projections"],
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (uncommitted changes)' if dirty else ''}"


def pg_server(admin: str) -> str:
    """The server's version, or ``error: ...`` saying why it cannot be used."""
    shown = without_password(admin)
    try:
        ((version,),) = pg_execute(admin, "SHOW server_version")
    except ImportError:
        return "error: --backend postgres needs psycopg (pip install -e '.[postgres]')"
    except Exception as exc:
        return f"error: cannot reach PostgreSQL at {shown}: {' '.join(str(exc).split())}"
    return str(version).split()[0]


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind, so temporary databases and children are cleaned up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite",
                        help="the store the scenarios run on (default sqlite)")
    parser.add_argument("--pg-admin", metavar="URL",
                        default=os.environ.get("QUEUECTL_BENCH_PG", PG_ADMIN),
                        help="--backend postgres: a URL of the server, whose user may create "
                             "databases (default $QUEUECTL_BENCH_PG, else %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 2 runs: a smoke run under a minute")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, quick 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="also write the JSON document to FILE")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("QUEUECTL_BENCH_CACHE",
                                                    "/tmp/queuectl-bench-cache")),
                        help="where the big replay ledger is cached")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not precompile queuectl's bytecode first (measure cold compiles)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary databases")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    chosen = SCENARIOS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    runs = args.runs or (2 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    sizes = QUICK if args.quick else FULL
    server = pg_server(args.pg_admin) if args.backend == "postgres" else None
    if server and server.startswith("error: "):
        parser.exit(2, f"bench: {server[len('error: '):]}\n")
    signal.signal(signal.SIGTERM, _terminate)
    if not args.no_compile:
        ensure_bytecode()
    fingerprint = code_fingerprint()
    ctx = Context(sizes, runs, args.cache_dir, args.quiet, args.backend, args.pg_admin)
    benches = PG_BENCHES if args.backend == "postgres" else BENCHES
    rows: list[Row] = []
    results: dict[str, ScenarioResult] = {}
    started = time.perf_counter()
    try:
        for name in SCENARIOS:
            if name not in chosen:
                continue
            result = results[name] = ScenarioResult(name)
            ctx.log(f"scenario {name} ...")
            t0 = time.perf_counter()
            try:
                rows += benches[name](ctx, result)
                result.ok = True
            except Exception as exc:  # one broken scenario must not hide the others
                result.error = f"{type(exc).__name__}: {exc}"
                result.details["traceback"] = traceback.format_exc()
                ctx.log(f"scenario {name} FAILED: {result.error}")
            result.seconds = round(time.perf_counter() - t0, 2)
            ctx.log(f"scenario {name} took {result.seconds:.1f} s")
    finally:
        ctx.close(keep=args.keep_tmp)
    elapsed = time.perf_counter() - started
    changed = code_fingerprint() != fingerprint
    if changed:
        ctx.log("WARNING: queuectl's sources changed during the run; figures mix versions")

    command = shlex.join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {
        "command": command,
        "backend": args.backend,
        "code": {"root": str(ROOT), "git": git_describe(), "fingerprint": fingerprint,
                 "changed_during_run": changed},
        "bytecode": "cold (--no-compile)" if args.no_compile else "precompiled",
        "quick": args.quick,
        "runs": runs,
        "sizes": asdict(sizes),
        "seconds": round(elapsed, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": server,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    document = json.dumps({
        "meta": meta,
        "scenarios": {n: asdict(r) for n, r in results.items()},
        "rows": [asdict(r) for r in rows],
    }, indent=2, default=str)
    if args.save:
        args.save.write_text(document + "\n")
    if args.json:
        print(document)
    else:
        if server:
            print(f"Backend: PostgreSQL {server} (a fresh database per run on "
                  f"{without_password(args.pg_admin)}).")
            print()
        print(markdown(rows, results))
        print()
        stores = (f"PostgreSQL {server} (SQLite {meta['sqlite']} beside it)" if server
                  else f"SQLite {meta['sqlite']}")
        print(f"Medians of {runs} runs (latency: percentiles over all samples; start-up and "
              f"reads: {sizes.cli_reps_per_run} invocations per run); ratios are medians of "
              f"per-run ratios against the baseline run beside them. `{command}` took "
              f"{elapsed:.0f} s on {os.cpu_count()} CPUs, Python {meta['python']}, {stores}; "
              f"code {meta['code']['git']}, sources {fingerprint}, bytecode {meta['bytecode']}.")
        if changed:
            print("WARNING: queuectl's sources changed during this run: the figures mix code "
                  "versions; run again on a quiet tree.")
    failed = any(not r.ok for r in results.values())
    missed = any(r.status == "fail" for r in rows)
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
