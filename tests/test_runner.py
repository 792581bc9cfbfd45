"""One run and what it leaves behind: the run ends when its shell does, whatever still
holds its output pipe; leftovers are killed; a dead worker's runs are found by their mark
and stopped before their jobs run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import events_of, spawn, wait_for

from queuectl import ledger, runner

# Each test's sleeps last a number no other test uses, ended by this process's id: the same
# test on the other store, running at once in another process, sleeps for another.
TAG = f"{os.getpid() % 10000:04d}"


def running(pattern: str) -> list[int]:
    """Pids whose command line contains ``pattern`` (a number no other test uses)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if pattern.encode() in cmdline and b"pytest" not in cmdline:
                found.append(int(name))
    return found


def body(conn, type_: str, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    (text,) = conn.execute("SELECT body FROM events WHERE type = ? AND job_id = ?",
                           (type_, job_id)).fetchone()
    return json.loads(text)


def ok(run, *args: str) -> str:  # type: ignore[no-untyped-def]
    result = run(*args)
    assert result.exit_code == 0, result.output
    return str(result.stdout)


# -- a run ends with its shell ---------------------------------------------------------------


@pytest.mark.parametrize("command", [
    f"sleep 12.3401{TAG} & echo started",
    f"nohup sleep 12.3401{TAG} & echo started",
    f"sh -c 'sleep 12.3401{TAG}; echo late' & echo started",
], ids=["background", "nohup", "subshell"])
def test_a_job_that_leaves_a_process_behind_ends_with_its_shell(run, conn, command):
    """The shell exits at once; its background child still holds the output pipe. The run
    must end there, not wait for the pipe to close (sending no heartbeats and ignoring its
    timeout meanwhile), and what the shell left in its group is killed."""
    ok(run, "enqueue", "--id", "bg", "-c", command, "--timeout", "2")
    start = time.monotonic()
    ok(run, "worker", "--burst")
    assert time.monotonic() - start < 5
    assert events_of(conn, "bg") == ["enqueued", "claimed", "completed"]
    assert body(conn, "completed", "bg")["output"].startswith("started")
    wait_for(lambda: not running(f"12.3401{TAG}"), 5, "the leftover sleep to be killed")


def test_a_leftover_that_ignores_sigterm_is_killed_after_the_grace(run, conn):
    ok(run, "config", "set", "heartbeat-interval", "0.2")
    ok(run, "enqueue", "--id", "stubborn", "-c",
       f"sh -c 'trap \"\" TERM; sleep 23.4561{TAG}' & sleep 0.2; echo started")
    proc = spawn("worker", "-s", "0.1", start_new_session=True)
    try:
        wait_for(lambda: "completed" in events_of(conn, "stubborn"), 20)
        finished = time.monotonic()
        assert running(f"23.4561{TAG}")  # it ignored SIGTERM ...
        wait_for(lambda: not running(f"23.4561{TAG}"), runner.KILL_GRACE + 5)
        waited = time.monotonic() - finished
        assert runner.KILL_GRACE - 0.5 < waited < runner.KILL_GRACE + 5  # ... until SIGKILL
        assert proc.poll() is None  # and the worker went on meanwhile
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_timeout_and_cancel_work_while_a_child_holds_the_pipe(run, conn):
    ok(run, "enqueue", "--id", "slow", "-c", f"sleep 31.0023{TAG} & sleep 32.0023{TAG}",
       "--timeout", "1", "--max-retries", "0")
    start = time.monotonic()
    ok(run, "worker", "--burst")
    assert time.monotonic() - start < 6
    assert events_of(conn, "slow")[-2:] == ["timed-out", "dead"]
    wait_for(lambda: not running(f"31.0023{TAG}") and not running(f"32.0023{TAG}"), 5)


def test_every_process_of_a_run_carries_its_mark(run, conn):
    ok(run, "enqueue", "--id", "env", "-c",
       "echo $QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $QUEUECTL_WORKER_ID")
    ok(run, "worker", "--burst")
    (worker_id,) = conn.execute("SELECT worker_id FROM runs WHERE job_id = 'env'").fetchone()
    assert body(conn, "completed", "env")["output"] == f"env 1 {worker_id}\n"


# -- a dead worker's runs ------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_workers_run_is_stopped_before_its_job_runs_again(run, conn):
    """kill -9 of a worker leaves its job's shell running. The next worker on this host
    finds the run by its mark and stops it before the rescue lets the job run again."""
    ok(run, "config", "set", "heartbeat-interval", "0.2")
    ok(run, "config", "set", "lease-timeout", "1")
    ok(run, "enqueue", "--id", "orphan", "-c",
       f"if [ $QUEUECTL_ATTEMPT = 1 ]; then sleep 45.6781{TAG}; fi; echo run $QUEUECTL_ATTEMPT",
       "--max-retries", "1")
    first = spawn("worker", "-s", "0.1", start_new_session=True)
    wait_for(lambda: running(f"45.6781{TAG}"), 20, "the first run to start")
    os.kill(first.pid, signal.SIGKILL)  # the worker alone: its job's session lives on
    first.wait()
    (dead,) = conn.execute("SELECT worker_id FROM runs WHERE job_id = 'orphan'").fetchone()
    assert runner.marked_processes(runner.worker_mark(dead, conn.identity))
    second = spawn("worker", "-s", "0.1", "--burst", start_new_session=True)
    try:
        wait_for(lambda: "lease-expired" in events_of(conn, "orphan"), 20)
        # The moment the job is released for its next run, nothing of its last run is left.
        assert not runner.marked_processes(runner.worker_mark(dead, conn.identity))
        assert not running(f"45.6781{TAG}")
        second.communicate(timeout=30)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    assert events_of(conn, "orphan") == [
        "enqueued", "claimed", "lease-expired", "scheduled-retry", "claimed", "completed"]
    assert body(conn, "lease-expired", "orphan")["killed"] >= 1
    assert body(conn, "completed", "orphan")["output"] == "run 2\n"
    history = ok(run, "history", "orphan")
    assert "of its run stopped on this host" in " ".join(history.split())


@pytest.mark.stores("sqlite")  # no store involved
def test_stop_marked_never_touches_an_unmarked_process_or_another_stores(tmp_path):
    """Worker ids repeat from one database to another (``w3`` in each): a run is marked
    with its store too, and only its own store's rescuer stops it."""
    plain = subprocess.Popen(["sleep", "30.9991"])
    marked = subprocess.Popen(["sleep", "30.9992"], env={
        **os.environ, "QUEUECTL_WORKER_ID": "zz", "QUEUECTL_STORE_ID": "mine"})
    other = subprocess.Popen(["sleep", "30.9993"], env={
        **os.environ, "QUEUECTL_WORKER_ID": "zz", "QUEUECTL_STORE_ID": "another"})
    try:
        assert runner.stop_marked(runner.worker_mark("zz", "mine"), grace=2) == 1
        assert marked.wait(timeout=5) == -signal.SIGTERM
        assert plain.poll() is None and other.poll() is None
        assert runner.stop_marked(runner.worker_mark("zz", "mine")) == 0
    finally:
        for proc in (plain, other):
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_rescue_in_one_queue_leaves_another_queues_runs_alone(run, conn, db, tmp_path):
    """Two databases on one host, each with a worker of the same id running a job. The
    first worker is killed and its queue's next worker rescues its job: the other queue's
    run, marked with the same worker id, goes on."""
    other_db = tmp_path / "other.db"  # a second queue; this test's own may be either store
    ok(run, "config", "set", "heartbeat-interval", "0.2")
    ok(run, "config", "set", "lease-timeout", "1")
    # No retry: once rescued, the job is dead, not run for another 45 s by the rescuer.
    ok(run, "enqueue", "--id", "mine", "-c", f"sleep 45.6782{TAG}", "--max-retries", "0")
    # The same events before its worker starts as this queue's: the same worker id.
    for args in (("config", "set", "heartbeat-interval", "0.2"),
                 ("config", "set", "lease-timeout", "1"),
                 ("enqueue", "--id", "theirs", "-c", f"sleep 6.4561{TAG}; echo done",
                  "--max-retries", "0")):
        assert spawn("--db", str(other_db), *args).wait(timeout=30) == 0
    first = spawn("worker", "-s", "0.1", start_new_session=True)
    neighbour = spawn("--db", str(other_db), "worker", "-s", "0.1", "--burst",
                      start_new_session=True)
    try:
        wait_for(lambda: running(f"45.6782{TAG}") and running(f"6.4561{TAG}"), 20, "both runs")
        (dead,) = conn.execute("SELECT worker_id FROM runs WHERE job_id = 'mine'").fetchone()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        rescuer = spawn("worker", "-s", "0.1", "--burst", start_new_session=True)
        rescuer.communicate(timeout=60)
        out, err = neighbour.communicate(timeout=60)
        assert neighbour.returncode == 0, err
    finally:
        for proc in (first, neighbour):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert "lease-expired" in events_of(conn, "mine")
    assert conn.execute("SELECT state FROM jobs WHERE id = 'mine'").fetchone() == ("dead",)
    other = ledger.connect(other_db)
    try:
        worker_ids = {r[0] for r in other.execute("SELECT id FROM workers")}
        assert dead in worker_ids  # the same id in both queues
        assert other.execute("SELECT state, exit_code FROM jobs WHERE id = 'theirs'"
                             ).fetchone() == ("completed", 0)
    finally:
        other.close()
