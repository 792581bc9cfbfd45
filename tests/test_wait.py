"""Waiting for jobs to end: ``wait``, ``enqueue --wait`` and ``Queue.wait``, on both stores.

The waits run as real processes beside real workers; what they cost and how soon they
return is measured from outside them: their CPU time from /proc, their exit against the
time the ledger says the job ended.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from datetime import datetime
from typing import Any

import pytest
from conftest import queuectl_cmd, spawn, wait_for
from helpers import WAIT, added, burst, event_count, one_error, ok, rows, state, workers

from queuectl import InvalidInput, NotFound, Queue, QueueError, WaitTimeout
from queuectl.outcome import exit_code

# -- the exit-code rule -------------------------------------------------------------------


@pytest.mark.stores("sqlite")  # a pure function: no store
@pytest.mark.parametrize(("state", "outcome", "code", "expected"), [
    ("completed", "completed", 0, 0),
    ("dead", "failed", 3, 3),
    ("dead", "failed", 255, 255),
    ("dead", "failed", 256, 1),  # not an exit code a process can have
    ("dead", "failed", -9, 1),  # killed by a signal
    ("dead", "timed-out", None, 124),
    ("dead", "lease-expired", None, 1),
    ("dead", None, None, 1),  # never ran (its runs pruned)
    ("cancelled", "cancelled", None, 1),
    ("cancelled", None, None, 1),
    ("pending", None, None, None),
    ("processing", None, None, None),
    ("failed", "failed", 3, None),  # it will run again: not final
])
def test_exit_code_rule(state, outcome, code, expected):
    assert exit_code(state, outcome, code) == expected


# -- helpers ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used so far, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _waiting(proc: subprocess.Popen[str]) -> bool:
    """The process is inside its wait: its waker thread runs beside the main one."""
    return len(os.listdir(f"/proc/{proc.pid}/task")) >= 2


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline()


def _job_id(line: str) -> str:
    assert line.startswith("Job added successfully with ID: "), line
    return line.split("ID: ")[1].strip()


# -- wait ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_wait_sleeps_until_the_job_ends_then_returns_at_once(run, conn):
    job = added(run, "-c", "sleep 5")
    with workers() as start:
        waiter = spawn("wait", job)
        wait_for(lambda: _waiting(waiter), WAIT, "the wait to start waiting")
        worker = start("--burst", "-s", "0.2")
        wait_for(lambda: state(conn, job) == "processing", WAIT, "the job to start")
        time.sleep(1)
        assert waiter.poll() is None  # still waiting: the job sleeps on
        before, t0 = _cpu_seconds(waiter.pid), time.monotonic()
        time.sleep(3)
        spent, elapsed = _cpu_seconds(waiter.pid) - before, time.monotonic() - t0
        assert waiter.poll() is None
        out, err = waiter.communicate(timeout=WAIT)
        returned = time.time()
        worker.communicate(timeout=WAIT)
    assert (waiter.returncode, out, err) == (0, f"Job {job} completed\n", "")
    # Under 1% of a core while it waits; CPU time counts in 10 ms ticks: allow twice that.
    assert spent <= 0.02 * elapsed, f"{spent:.3f}s of CPU in {elapsed:.2f}s of waiting"
    ended = _at(rows(conn, "completed", job)[0]["at"])
    assert 0 <= returned - ended < 1.5, f"returned {returned - ended:.3f}s after the job ended"


@pytest.mark.slow
def test_wait_for_several_exits_1_when_any_did_not_complete(run, conn):
    ok_job = added(run, "-c", "true")
    bad = added(run, "-c", "exit 3", "--max-retries", "0")
    slow = added(run, "-c", "sleep 5", "--timeout", "0.3", "--max-retries", "0")
    gone = added(run, "-c", "true", "--delay", "3600")
    ok(run, "cancel", gone)
    with workers() as start:
        burst(start)
    result = run("wait", ok_job, bad, slow, gone)
    assert (result.exit_code, result.stdout) == (1, "4 jobs: 1 completed, 2 dead, 1 cancelled\n")
    assert result.stderr == ""
    assert run("wait", ok_job).stdout == f"Job {ok_job} completed\n"
    assert run("wait", bad).stdout == f"Job {bad} dead (exit code 3)\n"
    assert run("wait", slow).stdout == f"Job {slow} dead (exit code 124)\n"
    assert (run("wait", gone).exit_code, run("wait", gone).stdout) == (1, f"Job {gone} cancelled\n")
    assert run("wait", ok_job, ok_job).stdout == f"Job {ok_job} completed\n"  # once each

    found = json.loads(ok_or(run, 1, "wait", ok_job, bad, slow, gone, "--json"))
    assert found == {
        "jobs": [{"id": ok_job, "state": "completed", "exit_code": 0},
                 {"id": bad, "state": "dead", "exit_code": 3},
                 {"id": slow, "state": "dead", "exit_code": 124},
                 {"id": gone, "state": "cancelled", "exit_code": 1}],
        "total": 4, "completed": 1, "dead": 2, "cancelled": 1, "unfinished": 0,
        "timed_out": False, "exit_code": 1}


def ok_or(run: Any, code: int, *args: str) -> str:
    result = run(*args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return str(result.stdout)


def test_wait_timeout_exits_124_and_leaves_the_jobs(run, conn):
    first = added(run, "-c", "true")
    second = added(run, "-c", "true")
    events = event_count(conn)
    started = time.monotonic()
    result = run("wait", first, second, "--timeout", "0.4")
    assert time.monotonic() - started >= 0.4
    assert (result.exit_code, result.stdout) == (124, "2 jobs: 0 completed, 2 unfinished after 0.4s\n")
    assert run("wait", first, "--timeout", "0").stdout == f"Job {first} still pending after 0s\n"
    found = json.loads(ok_or(run, 124, "wait", first, "--timeout", "0", "--json"))
    assert found == {"jobs": [{"id": first, "state": "pending", "exit_code": None}],
                     "total": 1, "completed": 0, "dead": 0, "cancelled": 0, "unfinished": 1,
                     "timed_out": True, "exit_code": 124}
    assert event_count(conn) == events and state(conn, first) == "pending"


def test_wait_refuses_what_names_no_job(run, conn):
    job = added(run, "-c", "true")
    events = event_count(conn)
    assert one_error(run("wait", job, "nosuch"), "Job 'nosuch' not found")
    assert run("wait", job, "nosuch").exit_code == 1  # as show, logs, cancel... of an unknown id
    usage = run("wait")
    assert usage.exit_code == 2
    one_error(usage, "name the jobs to wait for: job IDs, -q QUEUE or --all")
    assert run("wait", "--all", job).exit_code == 2
    assert run("wait", "--all", "-q", "media").exit_code == 2
    assert run("wait", "-q", "bad name").exit_code == 2
    one_error(run("wait", job, "--timeout", "-1"), "expected a number from 0")
    one_error(run("wait", job, "--timeout", "nan"))
    assert event_count(conn) == events


def test_wait_on_a_database_that_does_not_exist_is_an_error(run, tmp_path):
    one_error(run("--db", str(tmp_path / "typo.db"), "wait", "--all"))
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.slow
def test_wait_for_queues_and_all_takes_the_jobs_there_when_it_starts(run, conn):
    a = added(run, "-c", "true", "-q", "one")
    b = added(run, "-c", "true", "-q", "two")
    done = added(run, "-c", "true", "-q", "one")
    with workers() as start:
        burst(start, "-q", "one")  # a, done: completed; b waits in queue two
    assert run("wait", "-q", "one").stdout == "2 jobs: 2 completed\n"
    assert run("wait", "-q", "nothing-there").stdout == "0 jobs: 0 completed\n"
    c = added(run, "-c", "true", "-q", "one")
    queue_waiter = spawn("wait", "-q", "two", "-q", "one")
    every_waiter = spawn("wait", "--all")
    for waiter in (queue_waiter, every_waiter):
        wait_for(lambda w=waiter: _waiting(w), WAIT, "the waits to start waiting")
    later = added(run, "-c", "sleep 600", "-q", "three")  # after they started: not waited for
    with workers() as start:
        burst(start, "-q", "one", "-q", "two")
    for waiter in (queue_waiter, every_waiter):
        out, err = waiter.communicate(timeout=WAIT)
        assert (waiter.returncode, out, err) == (0, "4 jobs: 4 completed\n", "")
    assert {state(conn, j) for j in (a, b, c, done)} == {"completed"}
    assert state(conn, later) == "pending"


@pytest.mark.slow
def test_ctrl_c_stops_waiting_and_leaves_the_job_alone(run, conn):
    job = added(run, "-c", "true")
    events = event_count(conn)
    for args in (("wait", job), ("wait", "--all", "--json")):
        waiter = spawn(*args)
        wait_for(lambda w=waiter: _waiting(w), WAIT, "the wait to start waiting")
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=WAIT)
        assert (waiter.returncode, out) == (130, "")
        assert err == "Stopped waiting; the jobs are left as they are.\n"
    assert state(conn, job) == "pending" and event_count(conn) == events


@pytest.mark.slow
def test_a_terminal_sees_a_progress_bar_a_pipe_one_line(run, conn):
    for command in ("true", "true", "exit 3"):
        added(run, "-c", command, "--max-retries", "0")
    main, side = pty.openpty()
    waiter = subprocess.Popen(queuectl_cmd("wait", "--all"), stdout=subprocess.PIPE,
                              stderr=side, env={**os.environ, "COLUMNS": "100"}, text=True)
    os.close(side)
    wait_for(lambda: _waiting(waiter), WAIT, "the wait to start waiting")
    with workers() as start:
        burst(start)
    out, _ = waiter.communicate(timeout=WAIT)
    drawn = b""
    while select.select([main], [], [], 0.5)[0]:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        drawn += chunk
    os.close(main)
    assert (waiter.returncode, out) == (1, "3 jobs: 2 completed, 1 dead\n")
    text = drawn.decode()
    assert "Waiting" in text and "3/3" in text and "1 failed" in text, text

    piped = spawn("wait", "--all")
    out, err = piped.communicate(timeout=WAIT)
    assert (piped.returncode, out, err) == (1, "3 jobs: 2 completed, 1 dead\n", "")


# -- enqueue --wait -----------------------------------------------------------------------


def _enqueue_and_wait(*args: str, then: Any = None) -> tuple[str, int, str, str]:
    """``enqueue ARGS --wait`` as a process, with ``then(job_id)`` run once it is waiting
    (by default a burst worker): the job's id, the exit code, stdout after its first line,
    and stderr."""
    waiter = spawn("enqueue", *args, "--wait")
    line = _first_line(waiter)
    wait_for(lambda: _waiting(waiter), WAIT, "enqueue --wait to start waiting")
    if then is None:
        with workers() as start:
            burst(start)
    else:
        then(line)
    out, err = waiter.communicate(timeout=WAIT)
    return line, waiter.returncode, out, err


@pytest.mark.slow
def test_enqueue_wait_exits_with_the_jobs_own_code(run, conn):
    line, code, out, err = _enqueue_and_wait("-c", "echo hi")
    job = _job_id(line)
    assert (code, out, err) == (0, f"Job {job} completed\n", "")

    line, code, out, err = _enqueue_and_wait("-c", "exit 7", "--max-retries", "0")
    assert (code, out, err) == (7, f"Job {_job_id(line)} dead (exit code 7)\n", "")

    line, code, out, _ = _enqueue_and_wait("-c", "sleep 5", "--timeout", "0.3",
                                           "--max-retries", "0")
    assert (code, out) == (124, f"Job {_job_id(line)} dead (exit code 124)\n")

    line, code, out, _ = _enqueue_and_wait("-c", "kill -9 $$", "--max-retries", "0")
    assert (code, out) == (1, f"Job {_job_id(line)} dead (exit code 1)\n")  # a signal: 1

    line, code, out, _ = _enqueue_and_wait(
        "-c", "true", then=lambda line: ok(run, "cancel", _job_id(line)))
    assert (code, out) == (1, f"Job {_job_id(line)} cancelled\n")


@pytest.mark.slow
def test_enqueue_file_wait_waits_for_every_job(run, conn, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"command": "true"}\n{"command": "exit 5", "max_retries": 0}\n'
                    '{"command": "true"}\n')
    line, code, out, err = _enqueue_and_wait("--file", str(jobs))
    assert line == "3 jobs added successfully.\n"
    assert (code, out, err) == (1, "3 jobs: 2 completed, 1 dead\n", "")
    jobs.write_text('{"command": "true"}\n')
    line, code, out, _ = _enqueue_and_wait("--file", str(jobs))
    assert (line, code) == ("1 job added successfully.\n", 0)
    assert out.startswith("Job ") and out.endswith(" completed\n")  # one job: by its id


@pytest.mark.slow
def test_enqueue_wait_with_a_held_unique_key_waits_for_the_holder(run, conn):
    holder = added(run, "-c", "exit 4", "--max-retries", "0", "--unique-key", "k")
    line, code, out, _ = _enqueue_and_wait("-c", "true", "--unique-key", "k")
    assert line == f"Job already queued with ID: {holder} (unique key 'k')\n"
    assert (code, out) == (4, f"Job {holder} dead (exit code 4)\n")


@pytest.mark.slow
def test_ctrl_c_stops_enqueue_wait_and_leaves_the_job(run, conn):
    waiter = spawn("enqueue", "-c", "true", "--wait")
    job = _job_id(_first_line(waiter))
    wait_for(lambda: _waiting(waiter), WAIT, "enqueue --wait to start waiting")
    waiter.send_signal(signal.SIGINT)
    out, err = waiter.communicate(timeout=WAIT)
    assert (waiter.returncode, out, err) == (
        130, "", "Stopped waiting; the jobs are left as they are.\n")
    assert state(conn, job) == "pending"


def test_enqueue_wait_refused_enqueues_nothing(run, conn):
    events = event_count(conn)
    one_error(run("enqueue", "-c", "true", "--wait", "--priority", "x"))
    one_error(run("enqueue", "--wait"))
    assert event_count(conn) == events


# -- Queue.wait ---------------------------------------------------------------------------


@pytest.mark.slow
def test_queue_wait_returns_final_states_or_raises_on_timeout(db, run, conn):
    good = added(run, "-c", "true")
    bad = added(run, "-c", "exit 2", "--max-retries", "0")
    with Queue(db) as queue:
        with pytest.raises(WaitTimeout) as timed_out:
            queue.wait([good, bad], timeout=0.2)
        assert isinstance(timed_out.value, TimeoutError)
        assert isinstance(timed_out.value, QueueError)
        assert timed_out.value.states == {good: "pending", bad: "pending"}
        assert str(timed_out.value) == f"2 of 2 jobs not final after 0.2s: {good}, {bad}"
        with workers() as start:
            burst(start)
        assert queue.wait([good, bad]) == {good: "completed", bad: "dead"}
        assert queue.wait(good, timeout=0) == {good: "completed"}  # one id on its own
        assert queue.wait([]) == {}
        with pytest.raises(NotFound, match="Job 'nope' not found"):
            queue.wait([good, "nope"])
        for bad_timeout in (-1, float("nan"), "5", True):
            with pytest.raises(InvalidInput, match="timeout: expected"):
                queue.wait(good, timeout=bad_timeout)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="ids: expected"):
            queue.wait(42)  # type: ignore[arg-type]


@pytest.mark.slow
def test_queue_wait_wakes_when_a_worker_elsewhere_ends_the_job(db, run, conn):
    job = added(run, "-c", "sleep 1")
    with Queue(db) as queue, workers() as start:
        worker = start("--burst", "-s", "0.2")
        assert queue.wait(job, timeout=WAIT) == {job: "completed"}
        returned = time.time()
        worker.communicate(timeout=WAIT)
    assert returned - _at(rows(conn, "completed", job)[0]["at"]) < 1.5
