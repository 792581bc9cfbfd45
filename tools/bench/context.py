"""A run's context: its sizes, its temporary databases (SQLite files, PostgreSQL
databases) and child processes, its progress log."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import ROOT

PG_ADMIN = "postgresql://root@127.0.0.1:5432/postgres"
PG_PREFIX = "queuectl_bench_"


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
    scaling_jobs: int


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
    scaling_jobs=2_000,
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
    scaling_jobs=200,
)


# What pip writes for a console script (here, ``queuectl = "queuectl.cli_root:main"``),
# after its ``#!`` line.
CONSOLE_SCRIPT = """\
# -*- coding: utf-8 -*-
import re
import sys
from queuectl.cli_root import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


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

    def console_script(self, db: Path | str, *args: str) -> list[str]:
        """``queuectl`` as a user types it: the script pip writes for the ``queuectl`` entry
        point, word for word, run on this checkout's code (``python -m`` also loads runpy
        and importlib.util, which the installed command never does)."""
        script = self.tmp / "queuectl"
        if not script.exists():
            script.write_text(f"#!{sys.executable}\n{CONSOLE_SCRIPT}")
            script.chmod(0o755)
        return [str(script), "--db", str(db), *args]

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
