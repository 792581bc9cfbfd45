"""``worker -c N`` over several processes (``queuectl.processes``): how the workers are
spread, and how signals, a dead child and a dead first process are handled."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import events_of, wait_for
from helpers import _children, workers

from queuectl import processes

WAIT = 60.0
# A job both workers must be seen running at once: long enough that the second one's claim,
# on a loaded machine, comes before the first one's end.
SHORT = "sleep 3"


@contextmanager
def started(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``queuectl worker ARGS`` in a session of its own (``helpers.workers``), killed with
    everything it started if still running at the end."""
    with workers() as start:
        yield start(*args)


def descendants(pid: int) -> list[int]:
    return _children(pid) if os.path.exists(f"/proc/{pid}") else []


def worker_processes(pid: int) -> list[int]:
    """The worker processes ``pid`` forked (its children; their jobs are theirs)."""
    return _direct(pid)


def _direct(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listed:
            return [int(child) for child in listed.read().split()]
    except OSError:
        return []


def bodies(conn, type_: str) -> list[dict]:
    return [json.loads(b) for (b,) in conn.execute(
        "SELECT body FROM events WHERE type = ? ORDER BY seq", (type_,))]


def enqueue(run, *commands: str) -> list[str]:
    ids = []
    for command in commands:
        result = run("enqueue", "-c", command)
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.split("ID: ")[1].strip())
    return ids


def states(conn, ids: list[str]) -> list[str]:
    found = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    return [found[i] for i in ids]


def running(conn, ids: list[str]) -> bool:
    return states(conn, ids) == ["processing"] * len(ids)


# -- how the workers are spread ---------------------------------------------------------------


def test_shares_are_as_even_as_they_go():
    assert processes.shares(5, 2) == [3, 2]
    assert processes.shares(2, 2) == [1, 1]
    assert processes.shares(7, 3) == [3, 2, 2]
    assert processes.shares(1, 1) == [1]


def test_the_childrens_reports_are_read_back_whole():
    assert processes._reports(b"12\tboom\x0034\ta\nb\x00") == [(12, "boom"), (34, "a\nb")]
    assert processes._reports(b"") == []


def test_count_is_one_per_cpu_and_never_more_than_the_workers():
    cpus = len(os.sched_getaffinity(0))
    assert processes.count(1, None) == 1
    assert processes.count(64, None) == min(64, cpus)
    assert processes.count(8, 3) == 3
    assert processes.count(2, 1) == 1


def test_workers_are_spread_over_the_processes_asked_for(run, conn):
    enqueue(run, *["true"] * 6)
    with started("-c", "3", "--processes", "2", "--burst") as proc:
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    said = re.findall(r"^Worker started: (\S+)$", out, re.M)
    rows = bodies(conn, "worker-started")
    assert sorted(said) == sorted(b["worker_id"] for b in rows)
    per_process = Counter(b["pid"] for b in rows)
    assert sorted(per_process.values()) == [1, 2]
    assert proc.pid not in per_process  # the first process runs none itself
    assert dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")) == {
        "completed": 6}
    assert sorted(b["reason"] for b in bodies(conn, "worker-stopped")) == [
        "burst: queue empty"] * 3


def test_by_default_one_process_per_cpu(conn):
    with started("-c", "3", "--burst") as proc:
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    pids = {b["pid"] for b in bodies(conn, "worker-started")}
    assert len(pids) == min(3, len(os.sched_getaffinity(0)))


def test_a_fork_that_fails_stops_the_forked_workers_and_keeps_no_descriptor(
        conn, db, monkeypatch):
    """The second fork fails (no processes left): the first child is stopped and reaped,
    the error goes up to the command (one ``Error:`` line there), and the pipe the
    children report on is closed on this side."""
    from queuectl import worker as worker_module

    real_fork, forks = os.fork, []

    def fork() -> int:
        if forks:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        forks.append(real_fork())
        return forks[0]

    worker_module.prepare(db)  # the store made: the descriptors before are all it keeps
    before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", fork)
    with pytest.raises(BlockingIOError):
        processes.run_workers(db, worker_module.Options(concurrency=2, burst=True), 2,
                              echo=lambda text: None)
    monkeypatch.undo()
    assert len(forks) == 1
    assert sorted(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ChildProcessError):  # the child forked was reaped
        os.waitpid(forks[0], os.WNOHANG)


@pytest.mark.parametrize("args, message", [
    (("-c", "2", "--processes", "3"), "3 processes for 2 workers"),
    (("--processes", "0"), "processes"),
    (("-c", "2", "--processes", "x"), "processes"),
])
def test_a_process_count_out_of_range_is_refused(run, conn, args, message):
    result = run("worker", *args, "--burst")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], lines
    assert bodies(conn, "worker-started") == []


def test_output_closed_early_stops_no_worker(run, conn):
    """`worker -v -c 2 | head -1`: the pipe closes under both processes; their lines are
    dropped and the jobs all run, and the command exits 0."""
    ids = enqueue(run, *["echo x"] * 20)
    with started("-v", "-c", "2", "--processes", "2", "--burst") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("Worker started: ")
        proc.stdout.close()
        assert proc.wait(timeout=WAIT) == 0, proc.stderr.read() if proc.stderr else ""
    assert states(conn, ids) == ["completed"] * 20
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["burst: queue empty"] * 2


# -- signals ------------------------------------------------------------------------------------


def test_sigterm_to_the_first_process_lets_every_worker_finish_its_job(run, conn):
    ids = enqueue(run, SHORT, SHORT, "true")
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        wait_for(lambda: running(conn, ids[:2]), WAIT, "both jobs to start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert states(conn, ids) == ["completed", "completed", "pending"]
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["signal", "signal"]


def test_a_second_sigint_stops_every_worker_at_once(run, conn):
    ids = enqueue(run, "sleep 30", "sleep 30")
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        wait_for(lambda: running(conn, ids), WAIT, "both jobs to start")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None  # each finishing its job
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=WAIT)
        assert time.monotonic() - sent < 10
    assert proc.returncode == 0, err
    assert states(conn, ids) == ["pending", "pending"]
    assert all(events_of(conn, i) == ["enqueued", "claimed", "released"] for i in ids)


def test_the_worker_processes_lead_groups_of_their_own(conn):
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        children = wait_for(lambda: len(worker_processes(proc.pid)) == 2 and
                            worker_processes(proc.pid), WAIT, "the worker processes")
        wait_for(lambda: all(os.getpgid(c) == c for c in children), 10, "their groups")
        assert os.getpgid(proc.pid) == proc.pid
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err


def test_a_sigint_to_the_whole_group_counts_once(run, conn):
    """The terminal's Ctrl-C is a SIGINT to the foreground group: the first process gets
    it, the workers (in groups of their own, like the shells they start) get it from that
    one, once: one request to finish, not two (which would abandon the jobs)."""
    ids = enqueue(run, SHORT, SHORT)
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        wait_for(lambda: running(conn, ids), WAIT, "both jobs to start")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert states(conn, ids) == ["completed", "completed"]
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["signal", "signal"]


def test_idle_workers_stop_on_a_sigint_sent_to_each_process(conn):
    """Each idle worker process gets a SIGINT and, at once, the first process's SIGTERM:
    the second handler ran inside the first, which held the waker's lock, and hung."""
    for _ in range(3):
        with started("-c", "4", "--processes", "2", "-s", "5") as proc:
            wait_for(lambda: len(bodies(conn, "worker-started")) % 4 == 0 and
                     len(worker_processes(proc.pid)) == 2, WAIT, "the workers to start")
            time.sleep(0.5)
            for pid in (*worker_processes(proc.pid), proc.pid):
                os.kill(pid, signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err


def test_ctrl_z_pauses_every_worker_process_and_fg_continues_them(run, conn):
    """SIGTSTP (the terminal's Ctrl-Z) stops the workers and then the first process, as
    it stopped their one process before; SIGCONT (``fg``) continues them all."""
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        children = wait_for(lambda: len(worker_processes(proc.pid)) == 2 and
                            worker_processes(proc.pid), WAIT, "the worker processes")
        wait_for(lambda: len(bodies(conn, "worker-started")) == 2, WAIT, "both to start")
        proc.send_signal(signal.SIGTSTP)
        wait_for(lambda: all(_state(p) == "T" for p in (*children, proc.pid)), 10,
                 "every process to stop")
        proc.send_signal(signal.SIGCONT)
        wait_for(lambda: all(_state(p) not in ("T", "gone") for p in (*children, proc.pid)),
                 10, "every process to continue")
        (job,) = enqueue(run, "true")
        wait_for(lambda: states(conn, [job]) == ["completed"], WAIT, "a job to run")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err


# -- a process that dies ------------------------------------------------------------------------


def test_a_worker_process_killed_stops_the_others_and_the_command_fails(run, conn):
    ids = enqueue(run, SHORT, SHORT, "true", "true")
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        wait_for(lambda: running(conn, ids[:2]), WAIT, "both jobs to start")
        children = wait_for(lambda: worker_processes(proc.pid), 10, "the worker processes")
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1
    assert err.splitlines() == [
        f"Error: worker process {children[0]} was killed by signal SIGKILL"]
    # The other finished its job and stopped; the killed one's job waits for its lease.
    stopped = bodies(conn, "worker-stopped")
    assert len(stopped) == 1 and stopped[0]["reason"] == "signal"
    assert sorted(states(conn, ids[:2])) == ["completed", "processing"]


def test_the_workers_die_with_the_first_process(run, conn):
    """``kill -9`` of the command ends its workers at once, as when they were threads of
    one process: their jobs go back through their leases."""
    ids = enqueue(run, "sleep 3", "sleep 3")
    with started("-c", "2", "--processes", "2", "-s", "30") as proc:
        wait_for(lambda: running(conn, ids), WAIT, "both jobs to start")
        children = wait_for(lambda: worker_processes(proc.pid), 10, "the worker processes")
        proc.kill()
        proc.wait()
        wait_for(lambda: all(_state(c) in ("Z", "gone") for c in children), 10,
                 "the worker processes to die")
    assert bodies(conn, "worker-stopped") == []
    assert states(conn, ids) == ["processing", "processing"]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
