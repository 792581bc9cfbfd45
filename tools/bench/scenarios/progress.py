"""progress: what the progress bar costs. ``queuectl rebuild`` of the replay ledger and
``queuectl enqueue --file`` of N JSON lines, each timed with its standard error on a
pseudo-terminal (the bar drawn) and on a pipe (no bar), in alternating order within each
run, and compared run by run."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from ..context import Context
from ..ledgers import copy_of_replay_ledger, pg_replay_ledger
from ..measure import run_timed
from ..rows import Row, ScenarioResult, Target, make_row

TARGET = Target("<= 1.02x without the bar", "ratio", "<=", 1.02)


def run_on_terminal(ctx: Context, cmd: list[str], db: Path | str) -> float:
    """Wall seconds of one command whose standard error is a terminal, drained as a
    terminal would be (the drawing is the cost measured); it must succeed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    drawn = bytearray()

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            drawn.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    env = {**ctx.env_for(db), "TERM": "xterm-256color"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    reader.start()
    proc.wait()
    seconds = time.perf_counter() - start
    reader.join(5)
    os.close(master)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {bytes(drawn[-500:])!r}")
    if b"/" not in drawn:  # no done/total: the bar was not drawn, nothing was measured
        raise RuntimeError(f"{cmd} drew no progress bar on a terminal")
    return seconds


def paired(ctx: Context, name: str, cmd: Callable[[Path | str], list[str]],
           target: Callable[[], AbstractContextManager[Path | str]]
           ) -> tuple[list[float], list[float]]:
    """Seconds with the bar and without, one of each a run, the order alternating."""
    shown: list[float] = []
    plain: list[float] = []
    for r in range(ctx.runs):
        for drawn in ((True, False) if r % 2 else (False, True)):
            with target() as db:
                if drawn:
                    shown.append(run_on_terminal(ctx, cmd(db), db))
                else:
                    plain.append(run_timed(ctx, cmd(db), db))
        ctx.log(f"progress {name} run {r + 1}/{ctx.runs}: {shown[-1]:.2f} s with the bar, "
                f"{plain[-1]:.2f} s without ({shown[-1] / plain[-1]:.3f}x)")
    return shown, plain


def bench_progress(ctx: Context, result: ScenarioResult) -> list[Row]:
    from contextlib import contextmanager

    @contextmanager
    def replay_ledger():  # type: ignore[no-untyped-def]
        if ctx.backend == "postgres":
            with pg_replay_ledger(ctx) as url:
                yield url
        else:
            path = copy_of_replay_ledger(ctx)
            yield path
            shutil.rmtree(path.parent, ignore_errors=True)

    n = ctx.sizes.bulk_jobs
    directory = ctx.fresh_dir("progress-input")
    jobs_file = directory / "jobs.jsonl"
    jobs_file.write_text('{"command":"true"}\n' * n)
    try:
        rebuild = paired(ctx, "rebuild", lambda db: ctx.queuectl(db, "rebuild"), replay_ledger)
        enqueue = paired(ctx, "enqueue --file",
                         lambda db: ctx.queuectl(db, "enqueue", "--file", str(jobs_file)),
                         lambda: ctx.fresh_target("progress"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    jobs = ctx.sizes.replay_jobs
    return [
        make_row("progress", "progress_rebuild",
                 f"`queuectl rebuild`, {jobs:,} jobs' ledger, stderr a terminal (bar drawn)",
                 rebuild[0], "s", TARGET, baseline_samples=rebuild[1],
                 baseline_label="stderr a pipe"),
        make_row("progress", "progress_enqueue_file",
                 f"`queuectl enqueue --file`, {n:,} JSON lines, stderr a terminal (bar drawn)",
                 enqueue[0], "s", TARGET, baseline_samples=enqueue[1],
                 baseline_label="stderr a pipe"),
    ]
