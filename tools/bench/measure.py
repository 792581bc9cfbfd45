"""How a command is timed: its wall time, its peak memory, and the interpreter's own
start-up that CLI figures are held against (the floor)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .context import Context

FLOOR_CODE = "import click, msgspec, sqlite3"
# A command on PostgreSQL imports its driver too, and psycopg is slow to import.
PG_FLOOR_CODE = "import click, msgspec, psycopg"


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
# (``python -S``, no site packages) forks the command and reports the command's own peak.
RSS_LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)
"""


def peak_rss(ctx: Context, cmd: list[str], db: Path | str | None = None) -> tuple[int, float]:
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


def peak_memory(ctx: Context, cmd: list[str], db: Path | str | None = None
                ) -> tuple[int, float, float]:
    """Run ``cmd`` to its end: its exit code, the peak RSS of its largest process, and the
    peak of its processes' proportional set sizes added up (every 20 ms; the forked worker
    processes of ``worker -c N`` share their parent's pages until they write them, which
    PSS counts once), in MiB. Its jobs' shells (``sh``) are not counted."""
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", RSS_LAUNCHER, *cmd],
        env=ctx.env_for(db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    total = 0
    while proc.poll() is None:
        total = max(total, sum(_pss(pid) for pid in _tree(proc.pid)))
        time.sleep(0.02)
    out, err = proc.communicate()
    try:
        code, kib = out.split()[-2:]
    except ValueError:
        raise RuntimeError(f"rss launcher failed: {err[-500:]}") from None
    return int(code), int(kib) / 1024, total / 1024


def _tree(launcher: int) -> list[int]:
    """The processes under ``launcher`` (not itself), but for shells."""
    found, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as listed:
                children = [int(child) for child in listed.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/comm") as comm:
                    if comm.read().strip() == "sh":
                        continue
            except OSError:
                continue
            found.append(child)
            todo.append(child)
    return found


def _pss(pid: int) -> int:
    """A process's proportional set size in KiB (0 once gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


WARM_CHUNK = 50  # calls between two looks at the WAL's size
WARM_MOST = 20_000  # calls at most, should a WAL never stop growing


def until_wal_wraps(call: Callable[[], object], db: Path | str) -> int:
    """Call ``call`` until the WAL of the SQLite database ``db`` has wrapped, and return how
    many calls that took; on PostgreSQL, whose WAL segments are recycled, none.

    A fresh WAL file grows with every commit until its first checkpoint (at 1,000 pages),
    and from then on its commits overwrite it. A durable commit that makes the file longer
    costs about twice one that does not (a bare one-row commit, in blocks of 500: 210-290
    us, then 116-151 us), so a rate timed from a fresh file measures that phase as much as
    the code, and favours whichever side writes more pages a call: it leaves that phase
    sooner. A queue, a peer or a bare connection open for a while is past it; each rate
    that compares durable commits is timed there. The WAL has wrapped once ``WARM_CHUNK``
    calls in a row left its file no longer."""
    if str(db).startswith(("postgres://", "postgresql://")):
        return 0
    wal = Path(f"{db}-wal")
    calls, size = 0, -1
    while calls < WARM_MOST:
        for _ in range(WARM_CHUNK):
            call()
        calls += WARM_CHUNK
        now = wal.stat().st_size if wal.exists() else 0
        if now and now == size:
            return calls
        size = now
    raise RuntimeError(f"the WAL of {db} still grew after {calls:,} calls")


def measure_floor(ctx: Context, code: str = FLOOR_CODE) -> float:
    return run_timed(ctx, [sys.executable, "-c", code]) * 1000


def instructions(ctx: Context, cmd: list[str], db: Path | str | None = None) -> float | None:
    """Millions of instructions one run of ``cmd`` executes (valgrind's callgrind: the same
    count whatever else the machine does, so a change of 1% shows where wall times, which
    move by several percent from run to run, cannot), or None without valgrind. The hash
    seed is fixed: Python's string hashing moves the count a little from run to run."""
    if shutil.which("valgrind") is None:
        return None
    out = ctx.fresh_dir("callgrind") / "callgrind.out"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        env={**ctx.env_for(db), "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind of {shlex.join(cmd)} failed: {proc.stderr[-500:]}")
    return int(found.group(1)) / 1e6
