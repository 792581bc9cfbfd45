"""Shared fixtures. Every test runs in its own directory with its own database, and every
queuectl database a test leaves behind must replay to exactly its live projections: that
check runs automatically at teardown, so no test can pass while breaking replay."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import projections
from queuectl import claims, ledger
from queuectl.cli import cli
from queuectl.errors import StoreError


def replay_problems(path: Path) -> list[str] | None:
    """Drift between a database's ledger and its projections; None if it isn't queuectl's."""
    try:
        conn = ledger.connect(path)
    except StoreError:
        return None
    try:
        return check_both_ways(conn)
    finally:
        conn.close()


def check_both_ways(conn: sqlite3.Connection) -> list[str]:
    """``ledger.check`` as a replay runs on a small ledger (rows held in memory to the end),
    then again writing rows back after every event, as a big replay does now and then: every
    row is then read back from the table for its next event."""
    problems = ledger.check(conn)
    saved = ledger.FLUSH_CHECK, projections.Rows.LIMIT
    ledger.FLUSH_CHECK, projections.Rows.LIMIT = 1, 1
    try:
        return problems + [f"(flushing) {p}" for p in ledger.check(conn)]
    finally:
        ledger.FLUSH_CHECK, projections.Rows.LIMIT = saved


def _queuectl_databases(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".db", ".sqlite", ".sqlite3"):
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as probe:
                    names = {r[0] for r in probe.execute("SELECT name FROM sqlite_master")}
            except sqlite3.Error:
                continue
            if {"events", "projection_meta"} <= names:
                found.append(path)
    return found


@pytest.fixture(autouse=True)
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Path]:
    """This test's database path (also in QUEUECTL_DB); checked for replay drift afterwards."""
    path = tmp_path / "queue.db"
    monkeypatch.setenv("QUEUECTL_DB", str(path))
    monkeypatch.chdir(tmp_path)
    yield path
    if request.node.get_closest_marker("corrupt_ledger"):
        return  # the test broke the ledger on purpose and asserts on that itself
    for found in _queuectl_databases(tmp_path):
        problems = replay_problems(found)
        assert not problems, f"{found} does not replay to its projections: {problems}"


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    connection = ledger.connect(db)
    yield connection
    connection.close()


@pytest.fixture
def run() -> Run:
    return Run()


class Run:
    """Invoke the CLI in-process, as a user would type it."""

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def queuectl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "queuectl", *args]


def spawn(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
    """Start ``queuectl ARGS`` as a real process (workers, crashes, concurrency)."""
    return subprocess.Popen(
        queuectl_cmd(*args),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[arg-type]
    )


def wait_for(condition: Any, timeout: float = 60.0, what: str = "", interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def events_of(conn: sqlite3.Connection, job_id: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT type FROM events WHERE job_id = ? ORDER BY seq", (job_id,))]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "corrupt_ledger: the test corrupts the ledger on purpose")


def rescued(conn: sqlite3.Connection, lease: float = 30, watched: float | None = None,
            meanwhile: Any = None) -> list[Any]:
    """What a rescuer takes back after watching the workers for ``watched`` seconds of its
    own clock (a little over the lease, unless given), while ``meanwhile`` ran: silence is
    judged by the watcher's own observation, never by heartbeat times against the wall
    clock."""

    t = [0.0]
    silence = claims.Silence(clock=lambda: t[0])
    claims.silent_workers(conn, lease, silence)
    if meanwhile is not None:
        meanwhile()
    t[0] = lease + 0.001 if watched is None else watched
    return claims.rescue(conn, claims.silent_workers(conn, lease, silence))


def needs(path: str, install: str) -> None:
    """Skip, saying why, when a system tool a test drives is missing; in CI (QUEUECTL_CI set
    by .ci/run, which installs them) a missing tool fails the test instead."""
    if Path(path).exists():
        return
    if os.environ.get("QUEUECTL_CI"):
        pytest.fail(f"{path} is missing in CI; .ci/run should have run: {install}")
    pytest.skip(f"{path} is not installed ({install})")
