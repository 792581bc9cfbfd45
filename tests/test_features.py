"""Beyond the seed (issue 5): priority, delayed and scheduled jobs, per-job retry policy,
dependencies, cancel, logs, show, stats, and the JSON forms of every option.

Where processes matter (claim order, timing, killing a running job) real workers run as
subprocesses and the ledger is the witness. Where they don't (retry delays, stats figures)
the library builds the ledger under a fake clock, so every figure can be computed by hand.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import events_of, spawn, wait_for

from queuectl import claims, clock, decisions, ledger, reads, records
from queuectl import events as ev

WAIT = 60.0  # generous ceiling for anything that should take a few seconds
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


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
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass


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


# -- priority -------------------------------------------------------------------------------


def test_single_worker_runs_by_priority_then_oldest(run, conn, tmp_path):
    order = tmp_path / "order.txt"
    for job_id, priority in (("a", "0"), ("b", "5"), ("c", "-2"), ("d", "9"), ("e", "5")):
        added(run, "--id", job_id, "-p", priority, "-c", f"echo {job_id} >> {order}")
    assert [job(conn, j).priority for j in "abcde"] == [0, 5, -2, 9, 5]

    with workers() as start:
        burst(start)

    expected = ["d", "b", "e", "a", "c"]  # priority desc; b and e tie, b is older
    assert [r["job_id"] for r in rows(conn, "claimed")] == expected
    assert [r["job_id"] for r in rows(conn, "completed")] == expected
    assert order.read_text().split() == expected
    # One worker did it all, one job at a time: each run starts after the previous one
    # completed. A run starts at its claim, or, for a job claimed ahead of its worker's
    # current one (--ahead), at its started event.
    assert len({r["worker_id"] for r in rows(conn, "claimed")}) == 1
    ahead = {r["job_id"] for r in rows(conn, "started")}
    starts = [r["seq"] for r in rows(conn, "claimed") if r["job_id"] not in ahead]
    starts += [r["seq"] for r in rows(conn, "started")]
    ends = [r["seq"] for r in rows(conn, "completed")]
    assert ["start" if s in starts else "end" for s in sorted(starts + ends)] == \
        ["start", "end"] * 5
    assert ahead == set()  # no worker claims ahead unless asked to


@pytest.mark.slow
def test_retried_job_keeps_its_priority(run, conn, tmp_path):
    order = tmp_path / "order.txt"
    marker = tmp_path / "failed-once"
    # Two older jobs of priority 0; then r (priority 5) fails its first run and waits 1 s.
    added(run, "--id", "long", "-c", f"echo long >> {order}; sleep 1.6")
    added(run, "--id", "short", "-c", f"echo short >> {order}")
    added(run, "--id", "r", "-p", "5", "--backoff-base", "1", "--max-retries", "1", "-c",
          f"echo r >> {order}; test -f {marker} || {{ touch {marker}; exit 1; }}")

    with workers() as start:
        burst(start)

    # r first (priority); while it waits out its backoff, the oldest job runs; once r is
    # eligible again it still beats the older `short`: it kept its priority.
    ran = sorted(rows(conn, "failed") + rows(conn, "completed"), key=lambda r: r["seq"])
    assert [r["job_id"] for r in ran] == ["r", "long", "r", "short"]
    assert order.read_text().split() == ["r", "long", "r", "short"]
    retry = rows(conn, "scheduled-retry", "r")
    assert len(retry) == 1 and retry[0]["delay"] == 1
    assert job(conn, "r").priority == 5
    assert (state(conn, "r"), job(conn, "r").attempts) == ("completed", 2)


def test_retried_job_keeps_its_priority_exactly(run, conn, monkeypatch):
    """The same rule under a fake clock: no timing margins at all."""
    fake = FakeClock(monkeypatch)
    added(run, "--id", "old1", "-c", "true")
    added(run, "--id", "old2", "-c", "true")
    added(run, "--id", "r", "-p", "5", "--backoff-base", "2", "--max-retries", "1", "-c", "x")
    c = claim(conn, "w1", "r")
    fake.set(1)
    fail(conn, c, "w1")  # retry at t=3
    assert (state(conn, "r"), job(conn, "r").priority) == ("failed", 5)
    fake.set(2)
    complete(conn, claim(conn, "w1", "old1"), "w1", 0.1)  # r not eligible yet
    fake.set(3)
    claim(conn, "w1", "r")  # eligible: priority 5 beats the older old2


# -- delayed and scheduled jobs ---------------------------------------------------------------


@pytest.mark.slow
def test_delayed_job_is_not_run_early_and_runs_within_100ms(run, conn, tmp_path):
    with workers() as start:
        worker = start("-s", "30")  # idle long-poll: only its own timer can wake it on time
        wait_for(lambda: rows(conn, "worker-started"), what="the worker to start")
        job_id = added(run, "--delay", "1.5", "-c", f"echo ran > {tmp_path}/ran")
        enqueued = rows(conn, "enqueued", job_id)[0]
        run_at = enqueued["run_at"]
        # The delay counts from the request (a moment before its write committed).
        assert 1.0 < clock.seconds_between(enqueued["at"], run_at) <= 1.5
        assert state(conn, job_id) == "scheduled"
        assert job(conn, job_id).run_at == run_at
        listed = ok(run, "list")
        assert "scheduled" in table_row(listed, job_id)
        assert any(t in table_row(listed, job_id) for t in shown_time(run_at)), listed
        assert json.loads(ok(run, "list", "--json"))[0]["run_at"] == run_at
        assert json.loads(ok(run, "status", "--json"))["jobs"]["scheduled"] == 1

        wait_for(lambda: "completed" in events_of(conn, job_id), what="the delayed job")
        assert worker.poll() is None  # the same long-running worker did it
    (claimed,) = rows(conn, "claimed", job_id)
    late = clock.seconds_between(run_at, claimed["at"])
    assert 0 <= late <= 0.100, f"claimed {late:.3f}s after its run_at"
    assert claimed["eligible_at"] == run_at
    assert (tmp_path / "ran").read_text() == "ran\n"


def test_run_at_with_and_without_zone_is_stored_in_utc(run, conn):
    added(run, "--id", "zoned", "--run-at", "2030-01-01T02:00:00+02:00", "-c", "true")
    added(run, "--id", "naive", "--run-at", "2030-01-01T00:00:00", "-c", "true")
    added(run, "--id", "zulu", "--run-at", "2030-01-01T00:00:00Z", "-c", "true")
    ok(run, "enqueue", '{"id":"json","command":"true","run_at":"2029-12-31T19:00:00-05:00"}')
    for job_id in ("zoned", "naive", "zulu", "json"):
        assert job(conn, job_id).run_at == "2030-01-01T00:00:00.000000Z", job_id
        assert state(conn, job_id) == "scheduled"
        assert rows(conn, "enqueued", job_id)[0]["run_at"] == "2030-01-01T00:00:00.000000Z"
    listed = ok(run, "list")
    for job_id in ("zoned", "naive", "zulu", "json"):
        assert "2030-01-01 00:00" in table_row(listed, job_id)
    assert "2030-01-01 00:00" in ok(run, "list", "-s", "scheduled")
    assert json.loads(ok(run, "status", "--json"))["jobs"]["scheduled"] == 4
    # A time already past is no schedule at all: the job is pending at once.
    added(run, "--id", "past", "--run-at", "2020-01-01T00:00:00", "-c", "true")
    assert state(conn, "past") == "pending"


def test_scheduled_job_is_not_claimable_before_its_time(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "later", "--delay", "10", "-c", "true")
    added(run, "--id", "at", "--run-at", T(5), "-c", "true")
    assert job(conn, "later").run_at == T(10)
    assert (state(conn, "later"), state(conn, "at")) == ("scheduled", "scheduled")
    fake.set(4.999999)
    claim(conn, "w", None)
    fake.set(5)
    claim(conn, "w", "at")
    fake.set(9.9)
    claim(conn, "w", None)
    assert state(conn, "later") == "scheduled"
    fake.set(10)
    claim(conn, "w", "later")
    assert rows(conn, "claimed", "later")[0]["at"] == T(10)


# -- dependencies -----------------------------------------------------------------------------


def test_chain_runs_in_dependency_order(run, conn, tmp_path):
    order = tmp_path / "order.txt"  # jobs run in the worker's directory: this test's
    added(run, "--id", "A", "-c", "sleep 0.2; echo A >> order.txt")
    # Priorities that would run the chain backwards if dependencies were ignored.
    added(run, "--id", "B", "--after", "A", "-p", "5", "-c", "echo B >> order.txt")
    added(run, "--id", "C", "--after", "B", "-p", "9", "-c", "echo C >> order.txt")
    assert [state(conn, j) for j in "ABC"] == ["pending", "waiting", "waiting"]
    assert job(conn, "C").after == ["B"]
    counts = json.loads(ok(run, "status", "--json"))["jobs"]
    assert (counts["pending"], counts["waiting"]) == (1, 2)
    listed = ok(run, "list")
    assert "A" in table_row(listed, "B").split()[1:] and "B" in table_row(listed, "C").split()[1:]

    with workers() as start:
        burst(start)

    assert order.read_text().split() == ["A", "B", "C"]
    claimed = {r["job_id"]: r["seq"] for r in rows(conn, "claimed")}
    completed = {r["job_id"]: r for r in rows(conn, "completed")}
    assert claimed["A"] < completed["A"]["seq"] < claimed["B"] < completed["B"]["seq"] < claimed["C"]
    unblocked = {r["job_id"]: r for r in rows(conn, "unblocked")}
    assert unblocked["B"]["completed"] == "A" and unblocked["C"]["completed"] == "B"
    # Released in the very transaction that recorded its dependency's completion.
    assert unblocked["B"]["at"] == completed["A"]["at"]
    assert unblocked["C"]["at"] == completed["B"]["at"]
    assert events_of(conn, "C") == ["enqueued", "unblocked", "claimed", "completed"]


def test_dead_dependency_holds_its_dependents_until_a_dlq_retry_succeeds(run, conn, tmp_path):
    marker = tmp_path / "fixed"
    added(run, "--id", "A", "--max-retries", "0", "-c", f"test -f {marker}")
    added(run, "--id", "B", "--after", "A", "-c", "echo B")
    added(run, "--id", "C", "--after", "B", "-c", "echo C")

    with workers() as start:
        burst(start)  # A dies; the burst worker must not wait for B forever
        assert [state(conn, j) for j in "ABC"] == ["dead", "waiting", "waiting"]
        assert events_of(conn, "B") == ["enqueued"] and events_of(conn, "C") == ["enqueued"]
        shown = json.loads(ok(run, "show", "B", "--json"))
        assert (shown["after"], shown["dependencies"]) == (["A"], [{"id": "A", "state": "dead"}])

        marker.touch()
        assert ok(run, "dlq", "retry", "A") == "Job A has been requeued with max_retries = 0\n"
        assert state(conn, "B") == "waiting"
        burst(start)

    assert [state(conn, j) for j in "ABC"] == ["completed"] * 3
    assert events_of(conn, "A") == ["enqueued", "claimed", "failed", "dead", "requeued",
                                    "claimed", "completed"]
    assert events_of(conn, "B") == ["enqueued", "unblocked", "claimed", "completed"]
    assert events_of(conn, "C") == ["enqueued", "unblocked", "claimed", "completed"]
    assert rows(conn, "unblocked", "B")[0]["completed"] == "A"
    assert rows(conn, "unblocked", "C")[0]["completed"] == "B"


def test_dependency_on_a_completed_job_is_ready_at_once(run, conn):
    added(run, "--id", "done", "-c", "true")
    complete(conn, claim(conn, "w", "done"), "w", 0.1)
    added(run, "--id", "next", "--after", "done", "-c", "true")
    assert state(conn, "next") == "pending"


def test_file_may_list_a_job_before_the_job_it_depends_on(run, conn, tmp_path):
    path = tmp_path / "chain.jsonl"
    path.write_text(
        '{"id":"z","command":"true","after":["y"]}\n'
        '{"id":"y","command":"true","after":["x"]}\n'
        '{"id":"x","command":"true"}\n'
    )
    assert ok(run, "enqueue", "--file", str(path)) == "3 jobs added successfully.\n"
    assert [r["job_id"] for r in rows(conn, "enqueued")] == ["x", "y", "z"]  # dependencies first
    assert [state(conn, j) for j in "xyz"] == ["pending", "waiting", "waiting"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["enqueue", "-c", "true", "--after", "nope"], "dependency 'nope' is not a known job"),
        (["enqueue", "-c", "true", "--after", "p1", "--after", "nope"], "'nope'"),
        (["enqueue", '{"command":"true","after":["nope"]}'], "'nope'"),
        (["enqueue", "--id", "self", "-c", "true", "--after", "self"],
         "job self cannot depend on itself"),
        (["enqueue", '{"id":"self","command":"true","after":["self"]}'], "itself"),
        (["enqueue", "-c", "true", "--after", "gone"], "dependency 'gone' is cancelled"),
    ],
    ids=["unknown", "unknown-among-known", "unknown-json", "self", "self-json", "cancelled"],
)
def test_bad_dependencies_are_refused(run, conn, args, message):
    added(run, "--id", "p1", "-c", "true")
    added(run, "--id", "gone", "-c", "true")
    ok(run, "cancel", "gone")
    before = snapshot(conn)
    one_error(run(*args), message)
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id":"a","command":"true","after":["b"]}', '{"id":"b","command":"true","after":["a"]}'],
         "dependency cycle"),
        (['{"id":"a","command":"true","after":["c"]}', '{"id":"b","command":"true","after":["a"]}',
          '{"id":"c","command":"true","after":["b"]}'], "dependency cycle"),
        (['{"id":"a","command":"true"}', '{"id":"b","command":"true","after":["b"]}'],
         "job b cannot depend on itself"),
        (['{"id":"a","command":"true"}', '{"id":"b","command":"true","after":["a","zz"]}'],
         "dependency 'zz' is not a known job"),
    ],
    ids=["two-cycle", "three-cycle", "self", "unknown"],
)
def test_bad_dependencies_in_a_file_refuse_the_whole_file(run, conn, tmp_path, lines, message):
    added(run, "--id", "p1", "-c", "true")
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = snapshot(conn)
    line = one_error(run("enqueue", "--file", str(path)), message)
    assert snapshot(conn) == before
    if "cycle" in message:
        names = line.split("dependency cycle: ")[1].split(" -> ")
        assert names[0] == names[-1] and len(names) == len(lines) + 1


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


def test_a_file_is_written_whole_or_not_at_all(run, conn, db, tmp_path, monkeypatch):
    """A duplicate id that appears while a big file is being written refuses the whole file
    (it used to commit every batch before the clash)."""
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"id": f"j{n}", "command": "true"}) + "\n"
                            for n in range(6000)))
    _meanwhile(monkeypatch, db, lambda other: decisions.enqueue(
        other, [decisions.JobSpec(command="echo elsewhere", id="j5999")]))
    one_error(run("enqueue", "--file", str(path)), "Job with ID 'j5999' already exists")
    assert conn.execute("SELECT id FROM jobs").fetchall() == [("j5999",)]


def test_a_dependency_cancelled_while_a_file_is_read_refuses_the_file(
        run, conn, db, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "BATCH", 100)  # the file spans several id queries
    added(run, "--id", "parent", "-c", "true")
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{n}", "command": "true", "after": ["parent"]})
                            + "\n" for n in range(300)))
    _meanwhile(monkeypatch, db, lambda other: decisions.cancel(other, "parent"))
    one_error(run("enqueue", "--file", str(path)), "dependency 'parent' is cancelled")
    assert conn.execute("SELECT id, state FROM jobs").fetchall() == [("parent", "cancelled")]


def test_a_dependency_in_the_same_file_cancelled_later_cancels_its_dependents(
        run, conn, tmp_path, monkeypatch):
    """Jobs of one file that depend on each other are written together, so no cancel can
    fall between them; cancelling the parent afterwards cancels every dependent."""
    monkeypatch.setattr(decisions, "BATCH", 100)  # the file spans several id queries
    path = tmp_path / "jobs.jsonl"
    lines = [{"id": "parent", "command": "true", "delay": 3600}]
    lines += [{"id": f"c{n}", "command": "true", "after": ["parent"]} for n in range(450)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert ok(run, "enqueue", "--file", str(path)) == "451 jobs added successfully.\n"
    assert ok(run, "cancel", "parent") == "Job parent cancelled.\n"
    assert dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")) == {
        "cancelled": 451}


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_pending_scheduled_waiting_and_failed_jobs(run, conn):
    added(run, "--id", "fails", "--backoff-base", "100", "-c", "false")
    fail(conn, claim(conn, "w", "fails"), "w")
    added(run, "--id", "pend", "-c", "true")
    added(run, "--id", "sched", "--delay", "3600", "-c", "true")
    added(run, "--id", "wait", "--after", "pend", "-c", "true")
    assert [state(conn, j) for j in ("pend", "sched", "wait", "fails")] == \
        ["pending", "scheduled", "waiting", "failed"]

    for job_id in ("sched", "wait", "fails", "pend"):
        assert ok(run, "cancel", job_id) == f"Job {job_id} cancelled.\n"
        assert state(conn, job_id) == "cancelled"
        (cancelled,) = rows(conn, "cancelled", job_id)
        assert cancelled["reason"] == "cancelled by user"
        assert cancelled.get("worker_id") is None
        assert job(conn, job_id).last_error == "cancelled by user"
    counts = json.loads(ok(run, "status", "--json"))["jobs"]
    assert counts["cancelled"] == 4 and sum(counts.values()) == 4
    assert [j["id"] for j in json.loads(ok(run, "list", "-s", "cancelled", "--json"))] == \
        ["fails", "pend", "sched", "wait"]
    # Nothing cancelled is ever claimed.
    claim(conn, "w", None)


def test_cancel_cascades_to_waiting_dependents(run, conn):
    added(run, "--id", "A", "-c", "true")
    added(run, "--id", "B", "--after", "A", "-c", "true")
    added(run, "--id", "C", "--after", "B", "-c", "true")
    added(run, "--id", "D", "-c", "true")
    assert ok(run, "cancel", "A") == "Job A cancelled.\n"
    assert [state(conn, j) for j in "ABCD"] == ["cancelled", "cancelled", "cancelled", "pending"]
    assert rows(conn, "cancelled", "B")[0]["reason"] == "dependency A was cancelled"
    assert rows(conn, "cancelled", "C")[0]["reason"] == "dependency B was cancelled"
    # All three in one transaction.
    assert len({r["at"] for r in rows(conn, "cancelled")}) == 1
    assert json.loads(ok(run, "show", "C", "--json"))["last_error"] == "dependency B was cancelled"


def test_cancelling_a_finished_job_is_an_error(run, conn):
    added(run, "--id", "done", "-c", "true")
    complete(conn, claim(conn, "w", "done"), "w", 0.1)
    added(run, "--id", "dead", "--max-retries", "0", "-c", "false")
    fail(conn, claim(conn, "w", "dead"), "w")
    added(run, "--id", "gone", "-c", "true")
    ok(run, "cancel", "gone")
    for job_id, was in (("done", "completed"), ("dead", "dead"), ("gone", "cancelled")):
        before = snapshot(conn)
        result = run("cancel", job_id)
        assert result.exit_code == 1
        one_error(result, f"Job {job_id} is {was}")
        assert snapshot(conn) == before
        assert state(conn, job_id) == was


def test_cancel_running_job_kills_its_process_group(run, conn):
    unique = "30.4817"  # sleep arguments no other process on this machine uses
    other = "30.4818"
    try:
        with workers() as start:
            worker = start("-s", "30")
            added(run, "--id", "long", "-c", f"sleep {unique} & sleep {other}; wait")
            added(run, "--id", "dep", "--after", "long", "-c", "true")
            added(run, "--id", "dep2", "--after", "dep", "-c", "true")
            wait_for(lambda: len(pids_of(f"sleep {unique}")) >= 1 and pids_of(f"sleep {other}"),
                     10, "the job's processes")
            (claimed,) = rows(conn, "claimed", "long")
            assert state(conn, "long") == "processing"

            asked = time.monotonic()
            assert ok(run, "cancel", "long") == \
                "Cancel requested for running job long; its worker will stop it.\n"
            assert json.loads(ok(run, "show", "long", "--json"))["cancel_requested"] is True
            wait_for(lambda: not pids_of(f"sleep {unique}") and not pids_of(f"sleep {other}"),
                     5, "the whole process group to end")
            gone_after = time.monotonic() - asked
            wait_for(lambda: state(conn, "long") == "cancelled", 5, "the cancelled event")
            assert worker.poll() is None  # the worker itself goes on

            # The worker keeps working after a cancel.
            added(run, "--id", "after", "-c", "true")
            wait_for(lambda: state(conn, "after") == "completed", 10, "the next job")
    finally:
        kill_leftovers(f"sleep {unique}")
        kill_leftovers(f"sleep {other}")

    assert gone_after < 2.0
    (requested,) = rows(conn, "cancel-requested", "long")
    (cancelled,) = rows(conn, "cancelled", "long")
    assert cancelled["worker_id"] == claimed["worker_id"]
    assert cancelled["attempt"] == 1
    assert cancelled["reason"] == "cancelled by user while running"
    assert clock.seconds_between(requested["at"], cancelled["at"]) < 2.0
    assert events_of(conn, "long") == ["enqueued", "claimed", "cancel-requested", "cancelled"]
    assert [state(conn, j) for j in ("dep", "dep2")] == ["cancelled", "cancelled"]
    assert rows(conn, "cancelled", "dep")[0]["reason"] == "dependency long was cancelled"
    assert rows(conn, "cancelled", "dep2")[0]["reason"] == "dependency dep was cancelled"
    assert rows(conn, "cancelled", "dep")[0]["at"] == cancelled["at"]
    (run_row,) = json.loads(ok(run, "logs", "long", "--json"))
    assert run_row["outcome"] == "cancelled"


# -- per-job retry policy ---------------------------------------------------------------------


def _fail_until_dead(conn: sqlite3.Connection, fake: FakeClock, job_id: str) -> list[dict[str, Any]]:
    """Run a job under the fake clock, failing every run at once, until it is dead; returns
    its scheduled-retry events."""
    c = claim(conn, "w", job_id)
    while True:
        fail(conn, c, "w")
        if state(conn, job_id) == "dead":
            return rows(conn, "scheduled-retry", job_id)
        run_at = job(conn, job_id).run_at
        fake.set(clock.seconds_between(T(0), run_at))
        c = claim(conn, "w", job_id)


def test_per_job_backoff_base_and_max_retries(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "j", "--backoff-base", "3", "--max-retries", "1", "-c", "false")
    assert (job(conn, "j").backoff_base, job(conn, "j").max_retries) == (3, 1)
    c = claim(conn, "w", "j")
    fake.set(1)
    fail(conn, c, "w")
    (retry,) = rows(conn, "scheduled-retry", "j")
    assert (retry["attempt"], retry["delay"], retry["run_at"]) == (1, 3, T(4))
    assert (state(conn, "j"), job(conn, "j").run_at) == ("failed", T(4))
    fake.set(3.99)
    claim(conn, "w", None)
    fake.set(4)
    c = claim(conn, "w", "j")
    fail(conn, c, "w")
    (dead,) = rows(conn, "dead", "j")
    assert dead["attempts"] == 2 and state(conn, "j") == "dead"


def test_default_policy_without_jitter_is_exactly_base_to_the_k(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "j", "-c", "false")  # config defaults: 3 retries, base 2, no jitter
    retries = _fail_until_dead(conn, fake, "j")
    assert [r["delay"] for r in retries] == [2, 4, 8]
    assert all(r["run_at"] == clock.after(r["at"], r["delay"]) for r in retries)


def test_backoff_max_caps_each_delay(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "before", "--backoff-base", "10", "--max-retries", "1", "-c", "false")
    assert ok(run, "config", "set", "backoff-max", "2") == \
        "Configuration updated: backoff-max = 2\nRetry delays will be capped at 2s\n"
    added(run, "--id", "capped", "--backoff-base", "10", "--max-retries", "2", "-c", "false")
    assert job(conn, "capped").backoff_max == 2
    assert [r["delay"] for r in _fail_until_dead(conn, fake, "before")] == [10]
    assert [r["delay"] for r in _fail_until_dead(conn, fake, "capped")] == [2, 2]
    assert ok(run, "config", "set", "backoff-max", "0") == \
        "Configuration updated: backoff-max = 0\nRetry delays will not be capped\n"


def test_backoff_jitter_is_recorded_and_replay_reuses_it(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    ok(run, "config", "set", "backoff-jitter", "0.5")
    ids = [added(run, "--id", f"j{i}", "--max-retries", "3", "-c", "false") for i in range(10)]
    retries = [r for job_id in ids for r in _fail_until_dead(conn, fake, job_id)]
    assert len(retries) == 30
    for r in retries:
        k = r["attempt"]
        assert 2**k * 0.5 <= r["delay"] <= 2**k, r
        # The gap the job actually waited is exactly the recorded delay.
        assert r["run_at"] == clock.after(r["at"], r["delay"])
        assert clock.seconds_between(r["at"], r["run_at"]) == pytest.approx(r["delay"], abs=1e-6)
        claimed = [c for c in rows(conn, "claimed", r["job_id"]) if c["attempt"] == k + 1]
        assert claimed[0]["at"] == r["run_at"]  # the fake clock jumped right to it
    assert len({r["delay"] for r in retries if r["attempt"] == 1}) > 1  # really random

    # The failed state's run_at comes from the event; replay must never draw again.
    added(run, "--id", "waiting-out", "--max-retries", "3", "-c", "false")
    fail(conn, claim(conn, "w", "waiting-out"), "w")
    recorded = rows(conn, "scheduled-retry", "waiting-out")[0]["run_at"]
    assert job(conn, "waiting-out").run_at == recorded
    before = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()

    def no_random() -> float:
        raise AssertionError("replay drew a random number")

    monkeypatch.setattr(random, "random", no_random)
    ledger.rebuild(conn)
    assert conn.execute("SELECT * FROM jobs ORDER BY id").fetchall() == before
    assert job(conn, "waiting-out").run_at == recorded


# -- logs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logs_show_every_attempt(run, conn, tmp_path):
    counter = tmp_path / "count"
    command = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
        f"sleep 0.$n; echo \"run $n\"; test $n -ge 3 || exit $((40+n))"
    )
    job_id = added(run, "--backoff-base", "1", "--max-retries", "3", "-c", command)
    with workers() as start:
        burst(start)
    assert state(conn, job_id) == "completed"

    runs = json.loads(ok(run, "logs", job_id, "--json"))
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert [r["run"] for r in runs] == [1, 2, 3]
    assert [r["outcome"] for r in runs] == ["failed", "failed", "completed"]
    assert [r["exit_code"] for r in runs] == [41, 42, 0]
    assert [r["output"] for r in runs] == ["run 1\n", "run 2\n", "run 3\n"]
    assert [r["error"] for r in runs] == ["exit status 41", "exit status 42", None]
    assert set(runs[0]) == {"run", "attempt", "worker_id", "started_at", "finished_at",
                            "outcome", "exit_code", "duration", "output", "truncated", "error"}
    # Durations are the ones the worker recorded, and at least each run's sleep.
    recorded = [r["duration"] for r in rows(conn, "failed", job_id) + rows(conn, "completed", job_id)]
    assert [r["duration"] for r in runs] == recorded
    for n, r in enumerate(runs, 1):
        assert 0.1 * n <= r["duration"] < 0.1 * n + 10
        assert r["started_at"] <= r["finished_at"] and r["truncated"] is False
    workers_seen = {r["worker_id"] for r in rows(conn, "claimed", job_id)}
    assert {r["worker_id"] for r in runs} == workers_seen

    text = ok(run, "logs", job_id)
    headers = [line for line in text.splitlines() if line.startswith("=== attempt")]
    assert len(headers) == 3
    for n, (header, r) in enumerate(zip(headers, runs, strict=True), 1):
        assert header.startswith(f"=== attempt {n} on worker {r['worker_id']} at ")
        assert header.endswith(f", {r['duration']:.3f}s ===")
    assert "failed: exit status 41" in headers[0] and "failed: exit status 42" in headers[1]
    assert "completed" in headers[2]
    lines = text.splitlines()
    assert [lines[lines.index(h) + 1] for h in headers] == ["run 1", "run 2", "run 3"]

    only = ok(run, "logs", job_id, "--attempt", "2")
    assert [line for line in only.splitlines() if line.startswith("===")] == [headers[1]]
    assert "run 2" in only and "run 1" not in only and "run 3" not in only
    assert json.loads(ok(run, "logs", job_id, "--attempt", "2", "--json")) == [runs[1]]
    one_error(run("logs", job_id, "--attempt", "4"), f"Job {job_id} has no attempt 4")


def test_logs_escape_control_characters(run, conn):
    job_id = added(run, "-c", r"printf 'bell\007 esc\033[31mred\n'")
    with workers() as start:
        burst(start)
    (done,) = rows(conn, "completed", job_id)
    assert done["output"] == "bell\x07 esc\x1b[31mred\n"  # stored as it was
    text = ok(run, "logs", job_id)
    assert "bell\\x07 esc\\x1b[31mred" in text
    assert "\x1b" not in text and "\x07" not in text
    assert json.loads(ok(run, "logs", job_id, "--json"))[0]["output"] == "bell\x07 esc\x1b[31mred\n"


def test_logs_of_a_job_that_has_not_run(run, conn):
    job_id = added(run, "-c", "true")
    assert ok(run, "logs", job_id) == f"Job {job_id} has not run yet\n"
    assert json.loads(ok(run, "logs", job_id, "--json")) == []


# -- show -------------------------------------------------------------------------------------


def _field(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}:\s+(.*)$", text, re.MULTILINE)
    assert match, f"no {key!r} line in:\n{text}"
    return match.group(1)


def test_show_text_and_json(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    ok(run, "config", "set", "backoff-max", "30")
    ok(run, "config", "set", "backoff-jitter", "0.25")
    added(run, "--id", "dep1", "-c", "true")
    added(run, "--id", "dep2", "-c", "true")
    complete(conn, claim(conn, "w", "dep1"), "w", 0.1)
    added(run, "--id", "J", "-p", "7", "--max-retries", "2", "--backoff-base", "3",
          "--timeout", "4", "--after", "dep1", "--after", "dep2", "-c", "make report")

    text = ok(run, "show", "J")
    assert _field(text, "ID") == "J"
    assert _field(text, "Command") == "make report"
    assert _field(text, "State") == "waiting"
    assert _field(text, "Priority") == "7"
    policy = _field(text, "Retry policy")
    for part in ("max_retries 2", "backoff_base 3", "backoff_max 30", "backoff_jitter 0.25"):
        assert part in policy
    assert _field(text, "Timeout") == "4s"
    assert _field(text, "After") == "dep1 (completed), dep2 (pending)"
    assert _field(text, "Last error") == "-"
    assert _field(text, "Next run") == "after its dependencies complete"

    data = json.loads(ok(run, "show", "J", "--json"))
    assert data == {
        "id": "J", "command": "make report", "queue": "default", "state": "waiting",
        "priority": 7, "attempts": 0,
        "max_retries": 2, "backoff_base": 3.0, "backoff_max": 30.0, "backoff_jitter": 0.25,
        "timeout": 4.0, "run_at": None, "after": ["dep1", "dep2"], "unique_key": None,
        "dependencies": [{"id": "dep1", "state": "completed"}, {"id": "dep2", "state": "pending"}],
        "exit_code": None, "last_error": None, "created_at": T(0), "updated_at": T(0),
        "worker_id": None, "cancel_requested": False,
        "next_run": "after its dependencies complete", "runs": 0,
    }

    fake.set(2)
    complete(conn, claim(conn, "w", "dep2"), "w", 0.1)  # releases J
    assert json.loads(ok(run, "show", "J", "--json"))["next_run"] == "now (waiting for a worker)"
    fake.set(3)
    c = claim(conn, "w", "J")
    processing = json.loads(ok(run, "show", "J", "--json"))
    assert (processing["state"], processing["worker_id"]) == ("processing", "w")
    fake.set(4)
    fail(conn, c, "w", code=3)
    (retry,) = rows(conn, "scheduled-retry", "J")
    assert 3 * 0.75 <= retry["delay"] <= 3

    data = json.loads(ok(run, "show", "J", "--json"))
    assert data["state"] == "failed"
    assert data["after"] == ["dep1", "dep2"]  # a list, as in list --json
    assert data["dependencies"] == [{"id": "dep1", "state": "completed"},
                                    {"id": "dep2", "state": "completed"}]
    assert (data["last_error"], data["exit_code"]) == ("exit status 3", 3)
    assert data["run_at"] == data["next_run"] == retry["run_at"]
    assert (data["attempts"], data["runs"], data["worker_id"]) == (1, 1, None)
    text = ok(run, "show", "J")
    assert _field(text, "State") == "failed"
    assert _field(text, "Last error") == "exit status 3"
    assert _field(text, "Exit code") == "3"
    assert _field(text, "Next run") == retry["run_at"]
    assert _field(text, "After") == "dep1 (completed), dep2 (completed)"
    assert _field(text, "Runs") == "1"


def test_show_unknown_job(run, conn):
    before = snapshot(conn)
    one_error(run("show", "nope"), "'nope' not found")
    one_error(run("show", "nope", "--json"), "'nope' not found")
    assert snapshot(conn) == before


# -- stats ------------------------------------------------------------------------------------


def _stats_ledger(conn: sqlite3.Connection, run, fake: FakeClock) -> None:  # type: ignore[no-untyped-def]
    """A ledger whose every time and duration is known (see the timeline below).

    t=0   enqueue c01..c20, f (max_retries 1), to (timeout 4, max_retries 0), x, p
    t=i   claim c_i (wait i), complete at i + d_i with duration d_i = 0.05*i   (i = 1..20)
    t=21  claim f (wait 21); t=24 f fails, duration 3.0 -> retry in 2 s (run_at 26)
    t=25  claim to (wait 25: f is not eligible yet); t=29 timed out, duration 4.0 -> dead
    t=30  claim f (wait 30 - 26 = 4); t=30.5 fails, duration 0.5 -> dead
    t=31  claim x (wait 31); t=31.5 cancel requested; t=32 cancelled by its worker
    p is never claimed.
    """
    fake.set(0)
    for i in range(1, 21):
        added(run, "--id", f"c{i:02d}", "-c", "true")
    added(run, "--id", "f", "--max-retries", "1", "--backoff-base", "2", "-c", "false")
    added(run, "--id", "to", "--max-retries", "0", "--timeout", "4", "-c", "sleep 9")
    added(run, "--id", "x", "-c", "sleep 9")
    added(run, "--id", "p", "-c", "true")
    claims.worker_started(conn, 1, "host", worker_id="w")
    for i in range(1, 21):
        fake.set(i)
        c = claim(conn, "w", f"c{i:02d}")
        d = round(0.05 * i, 2)
        fake.set(i + d)
        complete(conn, c, "w", d)
    fake.set(21)
    c = claim(conn, "w", "f")
    fake.set(24)
    fail(conn, c, "w", 3.0)
    assert rows(conn, "scheduled-retry", "f")[0]["run_at"] == T(26)
    fake.set(25)
    c = claim(conn, "w", "to")
    fake.set(29)
    claims.finish(conn, c, ev.TimedOut(job_id="to", worker_id="w", attempt=1, timeout=4,
                                      duration=4.0))
    fake.set(30)
    c = claim(conn, "w", "f")
    fake.set(30.5)
    fail(conn, c, "w", 0.5)
    fake.set(31)
    c = claim(conn, "w", "x")
    fake.set(31.5)
    assert decisions.cancel(conn, "x") == "requested"
    fake.set(32)
    claims.finish(conn, c, ev.Cancelled(job_id="x", worker_id="w", attempt=1,
                                       reason="cancelled by user while running", duration=1.0))
    assert [state(conn, j) for j in ("c20", "f", "to", "x", "p")] == \
        ["completed", "dead", "dead", "cancelled", "pending"]


def test_stats_all_time_match_the_hand_computed_figures(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    _stats_ledger(conn, run, fake)
    fake.set(40)
    figures = json.loads(ok(run, "stats", "--json"))
    # Timed runs (23): c durations 0.05..1.0, f 3.0 and 0.5, to 4.0. Sorted, 0.5 appears
    # twice (c10 and f), so index 11 holds c11's 0.55; nearest rank: p50 -> ceil(11.5)-1 = 11,
    # p95 -> ceil(21.85)-1 = 21 -> 3.0 (index 22 is the max, 4.0).
    # Claims (24): waits 1..20, 21, 25, 4, 31 -> sorted 1,2,3,4,4,5,...,20,21,25,31:
    # p50 -> ceil(12)-1 = 11 -> 11; p95 -> ceil(22.8)-1 = 22 -> 25.
    # Success: 20 completed of 23 finished runs -> 0.8696. Throughput: 20 completed over the
    # span from the first claim (t=1) to the last finished run (t=32): 31 s -> 38.71/min.
    assert figures == {
        "since": None,
        "completed": 20,
        "failed": 3,
        "dead": 2,
        "success_rate": 0.8696,
        "throughput_per_min": 38.71,
        "throughput_over_seconds": 31.0,
        "run_time": {"p50": 0.55, "p95": 3.0, "max": 4.0},
        "queue_wait": {"p50": 11.0, "p95": 25.0},
    }
    text = ok(run, "stats")
    assert re.search(r"^Completed:\s+20$", text, re.MULTILINE), text
    assert re.search(r"^Failed runs:\s+3$", text, re.MULTILINE), text
    assert re.search(r"^Dead:\s+2$", text, re.MULTILINE), text
    assert "87.0%" in text
    # All time's throughput says what it is taken over: not the last hour, not forever.
    assert "Throughput:    38.71 jobs/min (over 31s, first claim to last end)" in text
    assert "p50 0.550s" in text and "p95 3.000s" in text and "max 4.000s" in text
    assert "p50 11.000s" in text and "p95 25.000s" in text


def test_stats_since_counts_only_the_window(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    _stats_ledger(conn, run, fake)
    fake.set(40)
    # A window holds the runs that finished in it; every figure is taken over those runs.
    # Last 14 s: since t=26. Finished since: to (29, timed out; claimed at 25 with wait 25),
    # f's 2nd run (30.5, wait 4), x (32, cancelled: a wait but no run time).
    # Run times 0.5, 4.0: p50 -> ceil(1)-1 = 0 -> 0.5, p95 -> ceil(1.9)-1 = 1 -> 4.0.
    # Waits 4, 25, 31: p50 -> ceil(1.5)-1 = 1 -> 25, p95 -> ceil(2.85)-1 = 2 -> 31.
    # No completions: rate 0, throughput 0 over 14 s.
    assert json.loads(ok(run, "stats", "--since", "14s", "--json")) == {
        "since": T(26),
        "completed": 0,
        "failed": 2,
        "dead": 2,
        "success_rate": 0.0,
        "throughput_per_min": 0.0,
        "throughput_over_seconds": 14.0,
        "run_time": {"p50": 0.5, "p95": 4.0, "max": 4.0},
        "queue_wait": {"p50": 25.0, "p95": 31.0},
    }
    # Last 30 s: since t=10. Finished since: c10..c20 (c10 at 10.5), f (24), to, f, x.
    # Run times (14): 0.5 (c10), 0.5 (f), 0.55..1.0, 3.0, 4.0 -> p50 index 6 -> 0.75,
    # p95 index ceil(13.3)-1 = 13 -> 4.0. Their waits (15): 10..20, 21, 25, 4, 31 ->
    # sorted 4,10,...,20,21,25,31: p50 index ceil(7.5)-1 = 7 -> 16, p95 index 14 -> 31.
    # Rate 11/14 = 0.7857; throughput 11 per half minute -> 22.0.
    half = json.loads(ok(run, "stats", "--since", "30s", "--json"))
    assert half == {
        "since": T(10),
        "completed": 11,
        "failed": 3,
        "dead": 2,
        "success_rate": 0.7857,
        "throughput_per_min": 22.0,
        "throughput_over_seconds": 30.0,
        "run_time": {"p50": 0.75, "p95": 4.0, "max": 4.0},
        "queue_wait": {"p50": 16.0, "p95": 31.0},
    }
    # Units: 1m is 60 s and covers everything; 1d too.
    everything = json.loads(ok(run, "stats", "--since", "1m", "--json"))
    assert (everything["since"], everything["completed"], everything["failed"]) == (T(-20), 20, 3)
    assert everything["run_time"] == {"p50": 0.55, "p95": 3.0, "max": 4.0}
    assert everything["queue_wait"] == {"p50": 11.0, "p95": 25.0}
    assert json.loads(ok(run, "stats", "--since", "1d", "--json"))["completed"] == 20
    assert json.loads(ok(run, "stats", "--since", "0.5m", "--json")) == half
    assert "last 30s" in ok(run, "stats", "--since", "30s")
    assert "Throughput:    22 jobs/min (over the last 30s)" in ok(run, "stats", "--since", "30s")


def test_stats_of_an_empty_queue(run, conn):
    assert json.loads(ok(run, "stats", "--json")) == {
        "since": None, "completed": 0, "failed": 0, "dead": 0, "success_rate": None,
        "throughput_per_min": None, "throughput_over_seconds": None,
        "run_time": {"p50": None, "p95": None, "max": None},
        "queue_wait": {"p50": None, "p95": None},
    }
    assert re.search(r"^Completed:\s+0$", ok(run, "stats"), re.MULTILINE)


# -- JSON forms and bad values ----------------------------------------------------------------

STORED = ("command", "state", "priority", "attempts", "max_retries", "backoff_base",
          "backoff_max", "backoff_jitter", "timeout", "run_at", "created_at", "after")


def _stored(conn: sqlite3.Connection, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's row (minus its id) and its enqueued event body (minus its id)."""
    row = {k: getattr(job(conn, job_id), k) for k in STORED}
    body = {k: v for k, v in rows(conn, "enqueued", job_id)[0].items()
            if k not in ("seq", "job_id")}
    return row, body


def test_json_forms_store_the_same_job_as_the_flags(run, conn, tmp_path, monkeypatch):
    FakeClock(monkeypatch, start=100)
    added(run, "--id", "a", "-c", "true")
    added(run, "--id", "flags", "-c", "x", "-p", "2", "--delay", "5", "--after", "a",
          "--backoff-base", "3", "--timeout", "4", "--max-retries", "1")
    ok(run, "enqueue", '{"id":"json","command":"x","priority":2,"delay":5,"after":["a"],'
       '"backoff_base":3,"timeout":4,"max_retries":1}')
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"id":"line","command":"x","priority":2,"delay":5,"after":["a"],"backoff_base":3,'
        '"timeout":4,"max_retries":1}\n'
        '{"id":"line-run-at","command":"x","priority":2,"run_at":"'
        + T(105)[:19] + '","after":["a"],"backoff_base":3,"timeout":4,"max_retries":1}\n'
    )
    assert ok(run, "enqueue", "--file", str(path)) == "2 jobs added successfully.\n"
    added(run, "--id", "flags-run-at", "-c", "x", "-p", "2", "--run-at", T(105), "--after", "a",
          "--backoff-base", "3", "--timeout", "4", "--max-retries", "1")

    reference = _stored(conn, "flags")
    assert reference[0]["priority"] == 2 and reference[0]["run_at"] == T(105)
    assert reference[0]["after"] == ["a"] and reference[0]["state"] == "waiting"
    assert reference[1].items() >= {
        "at": T(100), "type": "enqueued", "command": "x", "max_retries": 1,
        "backoff_base": 3.0, "timeout": 4.0, "priority": 2, "run_at": T(105), "after": ["a"],
    }.items()
    for job_id in ("json", "line", "line-run-at", "flags-run-at"):
        assert _stored(conn, job_id) == reference, job_id


def test_flags_beside_a_json_job_win(run, conn, monkeypatch):
    FakeClock(monkeypatch)
    ok(run, "enqueue", '{"id":"j","command":"x","priority":1,"delay":5}', "-p", "9",
       "--run-at", T(50))
    assert (job(conn, "j").priority, job(conn, "j").run_at) == (9, T(50))


BAD: dict[str, tuple[list[str], str]] = {
    "run-at-yesterday": (["enqueue", "-c", "x", "--run-at", "yesterday"], "yesterday"),
    "json-run-at-garbage": (["enqueue", '{"command":"x","run_at":"soon"}'], "soon"),
    "priority-high-json": (["enqueue", '{"command":"x","priority":"high"}'], "priority"),
    "priority-high-flag": (["enqueue", "-c", "x", "-p", "high"], "high"),
    "priority-fraction-json": (["enqueue", '{"command":"x","priority":1.5}'], "priority"),
    "negative-delay-flag": (["enqueue", "-c", "x", "--delay", "-1"], "--delay"),
    "negative-delay-json": (["enqueue", '{"command":"x","delay":-1}'], "delay"),
    "run-at-and-delay-json": (
        ["enqueue", '{"command":"x","delay":5,"run_at":"2030-01-01T00:00:00"}'], "not both"),
    "run-at-and-delay-flags": (
        ["enqueue", "-c", "x", "--delay", "5", "--run-at", "2030-01-01T00:00:00"], "not both"),
    "after-not-a-list": (["enqueue", '{"command":"x","after":"p1"}'], "after"),
    "after-bad-id": (["enqueue", "-c", "x", "--after", "not an id"], "'not an id'"),
    "backoff-base-below-one": (["enqueue", "-c", "x", "--backoff-base", "0.5"], "--backoff-base"),
    "backoff-base-below-one-json": (["enqueue", '{"command":"x","backoff_base":0.5}'],
                                    "backoff_base"),
    "negative-timeout-json": (["enqueue", '{"command":"x","timeout":-1}'], "timeout"),
    "since-bogus": (["stats", "--since", "bogus"], "bogus"),
    "since-zero": (["stats", "--since", "0"], "from 1ms to 100 years"),
    "since-negative": (["stats", "--since", "-5m"], "-5m"),
    "logs-unknown": (["logs", "nope"], "'nope' not found"),
    "logs-json-unknown": (["logs", "nope", "--json"], "'nope' not found"),
    "logs-attempt-not-run": (["logs", "p1", "--attempt", "1"], "no attempt 1"),
    "logs-attempt-zero": (["logs", "p1", "--attempt", "0"], "--attempt"),
    "cancel-unknown": (["cancel", "nope"], "'nope' not found"),
    "show-unknown": (["show", "nope"], "'nope' not found"),
    "jitter-above-one": (["config", "set", "backoff-jitter", "2"], "from 0 to 1, got '2'"),
    "jitter-negative": (["config", "set", "backoff-jitter", "-0.1"], "backoff-jitter"),
    "backoff-max-negative": (["config", "set", "backoff-max", "-1"], "backoff-max"),
    "backoff-max-word": (["config", "set", "backoff-max", "lots"], "'lots'"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_values_are_refused_with_one_line(run, conn, args, message):
    added(run, "--id", "p1", "-c", "true")
    before = snapshot(conn), conn.execute("SELECT * FROM config").fetchall()
    one_error(run(*args), message)
    assert (snapshot(conn), conn.execute("SELECT * FROM config").fetchall()) == before


def test_bad_line_in_a_file_of_new_fields_writes_nothing(run, conn, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"id":"ok1","command":"x","priority":3}\n'
        '{"id":"ok2","command":"x","after":["ok1"]}\n'
        '{"id":"bad","command":"x","delay":-2}\n'
    )
    before = snapshot(conn)
    one_error(run("enqueue", "--file", str(path)), "line 3")
    assert snapshot(conn) == before
