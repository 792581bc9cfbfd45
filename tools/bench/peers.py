"""The peers a figure is compared with, each set up as its own users would: huey's
SqliteHuey and procrastinate on PostgreSQL, each driven from an app module written into a
fresh directory, imported here to enqueue and run by its own consumer; and the one-call
command-line queues task-spooler (``tsp``) and nq, each given a queue of its own."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .context import Context, pg_execute
from .measure import run_timed, until_wal_wraps


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


def huey_enqueue_rate(ctx: Context, n: int) -> float:
    """Calls/s of a huey task's enqueue on SqliteHuey (its default: each commit synced),
    timed once its WAL has wrapped (``until_wal_wraps``)."""
    directory = ctx.fresh_dir("huey-enqueue")
    try:
        module_name = f"qbench_huey_{directory.name.replace('-', '_')}"
        module = load_app(directory, module_name,
                          HUEY_APP.format(filename=str(directory / "huey.db")))
        until_wal_wraps(lambda: module.run("true"), directory / "huey.db")
        start = time.perf_counter()
        for _ in range(n):
            module.run("true")
        seconds = time.perf_counter() - start
        module.huey.storage.close()
        return n / seconds
    finally:
        shutil.rmtree(directory, ignore_errors=True)


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


@contextmanager
def task_spooler(ctx: Context) -> Iterator[dict[str, str] | None]:
    """The environment of a task-spooler queue of this run's own (its socket and its jobs'
    output files in a fresh directory, so a user's queue is never touched), its server
    killed afterwards; None where ``tsp`` is not installed."""
    if shutil.which("tsp") is None:
        yield None
        return
    directory = ctx.fresh_dir("tsp")
    env = ctx.env_for(TS_SOCKET=str(directory / "socket"), TMPDIR=str(directory))
    try:
        yield env
    finally:
        # Its first call forked a server that outlives every call: only -K on the same
        # socket ends it.
        subprocess.run(["tsp", "-K"], env=env, capture_output=True, timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def nq_queue(ctx: Context) -> Iterator[dict[str, str] | None]:
    """The environment of an nq queue of this run's own (``NQDIR``, a fresh directory);
    None where ``nq`` is not installed."""
    if shutil.which("nq") is None:
        yield None
        return
    directory = ctx.fresh_dir("nq")
    try:
        yield ctx.env_for(NQDIR=str(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
