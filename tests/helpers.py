"""What test files share beyond conftest's fixtures: worker processes, ledger rows, CLI
calls that must succeed or fail with one ``Error:`` line, and claims and outcomes made
through the library under a fake clock. No test file imports another: what two of them
need lives here (conftest.py has pytest rewrite its asserts, as in a test file)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import spawn, wait_for

from queuectl import claims, clock, decisions, ledger, reads, records
from queuectl import events as ev

WAIT = 60.0  # generous ceiling for anything that should take a few seconds
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


_HOLDER = """
import sys
from queuectl import ledger
conn = ledger.connect(sys.argv[1])
with conn.transaction():
    print("holding", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def write_lock_held(db: Any) -> Iterator[subprocess.Popen[str]]:
    """Another process inside a write transaction on the SQLite file ``db`` (SQLite's lock
    and the writers' queue both held) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        yield holder
    finally:
        if holder.returncode is None:
            holder.communicate("done\n", timeout=WAIT)


# -- helpers --------------------------------------------------------------------------------


def T(seconds: float) -> str:
    """The ledger's time ``seconds`` after the fake clock's epoch: ``2026-01-01T00:00:05.000000Z``."""
    return clock.iso(EPOCH + timedelta(seconds=seconds))


class FakeClock:
    """``queuectl.clock.now`` under the test's control (everything calls it via the module)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: float = 0.0) -> None:
        self.t = start
        monkeypatch.setattr(clock, "now", lambda: T(self.t))

    def set(self, seconds: float) -> None:
        self.t = seconds


@contextmanager
def workers() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start worker processes (each in its own session); every one still running at the end
    is killed with its process group."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = spawn("worker", *args, env={"PYTHONUNBUFFERED": "1"}, start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                # A job runs in a session of its own: killing its worker would leave it
                # running (a `sleep 600` outliving the test), so its group goes first.
                for group in (proc.pid, *_children(proc.pid)):
                    try:
                        os.killpg(group, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass


def _children(pid: int) -> list[int]:
    """The processes ``pid``'s threads started and that still run, and theirs (the worker
    processes of ``worker -c N`` and their jobs) (Linux's /proc)."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as listed:
                found += [int(child) for child in listed.read().split()]
        except OSError:
            pass
    return found + [grandchild for child in found for grandchild in _children(child)]


def burst(start: Callable[..., subprocess.Popen[str]], *args: str) -> str:
    """Run one ``worker --burst`` to its end; it must exit 0. Returns its stdout."""
    proc = start("--burst", "-s", "0.2", *args)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return out




def pids_of(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def kill_leftovers(pattern: str) -> None:
    for pid in pids_of(pattern):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rows(conn: sqlite3.Connection, type_: str, job_id: str | None = None) -> list[dict[str, Any]]:
    """Ledger rows of one event type (optionally of one job): seq, at and the decoded body."""
    sql = "SELECT seq, at, body FROM events WHERE type = ?" + (" AND job_id = ?" if job_id else "")
    params = (type_, job_id) if job_id else (type_,)
    return [
        {"seq": seq, "at": at, **json.loads(body)}
        for seq, at, body in conn.execute(sql + " ORDER BY seq", params)
    ]


def job(conn: sqlite3.Connection, job_id: str) -> records.Job:
    return reads.get_job(conn, job_id)


def state(conn: sqlite3.Connection, job_id: str) -> str:
    return str(job(conn, job_id).state)


def event_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def snapshot(conn: sqlite3.Connection) -> tuple[Any, ...]:
    """Everything a refused command must leave alone: the ledger and the jobs table."""
    return (
        event_count(conn),
        conn.execute("SELECT * FROM jobs ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM job_deps ORDER BY job_id, depends_on").fetchall(),
    )


def ok(run, *args: str, input: str | None = None) -> str:  # type: ignore[no-untyped-def]
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return str(result.stdout)


def one_error(result, message: str = "") -> str:  # type: ignore[no-untyped-def]
    """The command failed with exactly one ``Error: ...`` line on stderr and nothing else."""
    assert result.exit_code != 0, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return str(lines[0])


def added(run, *args: str) -> str:  # type: ignore[no-untyped-def]
    """Enqueue with flags; returns the new job's id."""
    out = ok(run, "enqueue", *args)
    assert out.startswith("Job added successfully with ID: "), out
    return out.split("ID: ")[1].strip()


# Library-level runs (no process): claim as a named worker and record an outcome.


def claim(conn: sqlite3.Connection, worker_id: str, expect: str | None) -> claims.Claim | None:
    got = claims.claim(conn, worker_id)
    assert (got.job_id if got else None) == expect
    return got


def complete(conn: sqlite3.Connection, c: claims.Claim, worker_id: str, duration: float,
             output: str = "") -> list[ev.Event]:
    return claims.finish(conn, c, ev.Completed(
        job_id=c.job_id, worker_id=worker_id, attempt=c.attempt, duration=duration, output=output))


def fail(conn: sqlite3.Connection, c: claims.Claim, worker_id: str, duration: float = 0.1,
         code: int = 1) -> list[ev.Event]:
    return claims.finish(conn, c, ev.Failed(
        job_id=c.job_id, worker_id=worker_id, attempt=c.attempt, exit_code=code,
        error=f"exit status {code}", duration=duration))


def shown_time(iso: str) -> tuple[str, str]:
    """The ways a table may show a time: ``HH:MM:SS`` (today) or ``YYYY-MM-DD HH:MM``."""
    return iso[11:19], iso[:16].replace("T", " ")


def table_row(output: str, job_id: str) -> str:
    for line in output.splitlines():
        if line.split()[:1] == [job_id]:
            return line
    raise AssertionError(f"no row for {job_id} in:\n{output}")


def _meanwhile(monkeypatch: pytest.MonkeyPatch, db: Any, action: Callable[[sqlite3.Connection], None]) -> None:
    """Run ``action`` on another connection after ``enqueue`` has read and checked its
    input but before it writes: a concurrent writer, at the worst moment."""
    real = decisions._dependency_order

    def then_meanwhile(specs):  # type: ignore[no-untyped-def]
        found = real(specs)
        monkeypatch.setattr(decisions, "_dependency_order", real)  # once
        other = ledger.connect(db)
        try:
            action(other)
        finally:
            other.close()
        return found

    monkeypatch.setattr(decisions, "_dependency_order", then_meanwhile)


# -- served processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def serving(command: str, *args: str) -> Iterator[int]:
    """A ``queuectl serve`` (or ``dashboard``) process on a free port of 127.0.0.1, once it
    accepts connections (uvicorn listens only after the app has started): its port. It is
    stopped on leaving, killed if it does not stop."""
    port = free_port()
    proc = spawn(command, "--port", str(port), *args)
    try:
        wait_for(lambda: proc.poll() is not None or _accepts(port), 30, f"{command} to answer")
        assert proc.poll() is None, proc.communicate()
        yield port
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
