"""Workers as real processes: sharing a queue, retrying with backoff, recording results,
surviving restarts, stopping on request or on signals, and waking for new work at once."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import events_of, needs, queuectl_cmd, spawn, wait_for
from helpers import write_lock_held

from queuectl import claims, decisions, ledger, reads
from queuectl import worker as worker_module
from queuectl.store import sqlite as sqlite_store

WAIT = 60.0  # generous ceiling for anything that should take a few seconds


# -- helpers --------------------------------------------------------------------------------


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Collects spawned processes; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass


def worker(procs: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = spawn("worker", *args, env={"PYTHONUNBUFFERED": "1"})
    procs.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = WAIT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err




def cli_ok(*args: str) -> str:
    """Run ``queuectl ARGS`` in a fresh process; it must succeed."""
    proc = spawn(*args)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return out


def enqueue(run, *commands: str, **flags: str) -> list[str]:
    ids = []
    for command in commands:
        extra = [x for key, value in flags.items() for x in (f"--{key.replace('_', '-')}", value)]
        result = run("enqueue", "-c", command, *extra)
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.split("ID: ")[1].strip())
    return ids


def state(conn: sqlite3.Connection, job_id: str) -> str:
    return conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def bodies(conn: sqlite3.Connection, type_: str, job_id: str | None = None) -> list[dict]:
    sql = "SELECT body FROM events WHERE type = ?" + (" AND job_id = ?" if job_id else "")
    params = (type_, job_id) if job_id else (type_,)
    return [json.loads(b) for (b,) in conn.execute(sql + " ORDER BY seq", params)]


def started_workers(conn: sqlite3.Connection) -> list[str]:
    return [b["worker_id"] for b in bodies(conn, "worker-started")]


def when(at: str) -> datetime:
    return datetime.fromisoformat(at.replace("Z", "+00:00"))


def alive_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still exist and are not zombies."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def job_group(worker_pid: int) -> int:
    """The process group of the job a worker process is running (it leads its own group)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, pgrp = int(fields[1]), int(fields[2])
        if ppid == worker_pid and pgrp == int(entry.name):
            return pgrp
    return 0


# -- sharing one queue ----------------------------------------------------------------------


@pytest.mark.slow
def test_two_worker_processes_run_each_job_exactly_once(run, conn, tmp_path):
    out = tmp_path / "out.txt"
    ids = [f"job{i:02d}" for i in range(40)]
    lines = "".join(
        json.dumps({"id": i, "command": f"sleep 0.1; echo {i} >> {out}"}) + "\n" for i in ids
    )
    result = run("enqueue", "--file", "-", input=lines)
    assert result.exit_code == 0 and result.stdout == "40 jobs added successfully.\n"

    with processes() as procs:
        a = worker(procs, "-c", "1", "--burst")
        b = worker(procs, "-c", "1", "--burst")
        for proc in (a, b):
            code, _, err = finish(proc)
            assert code == 0, err

    written = out.read_text().splitlines()
    assert len(written) == 40
    assert sorted(written) == ids
    claims = Counter(b["job_id"] for b in bodies(conn, "claimed"))
    assert claims == Counter(ids)  # exactly one claimed event per job
    assert dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")) == {
        "completed": 40
    }
    # Both processes shared the work (4 s of jobs for one alone; start-up is far shorter).
    holders = Counter(b["worker_id"] for b in bodies(conn, "claimed"))
    assert len(holders) == 2 and sum(holders.values()) == 40
    assert len(bodies(conn, "worker-stopped")) == 2


# -- failures, retries and what gets recorded -----------------------------------------------


@pytest.mark.slow
def test_failing_job_retries_with_exponential_backoff_then_dies(run, conn):
    assert run("config", "set", "backoff-base", "2").exit_code == 0
    (job,) = enqueue(run, "exit 1", max_retries="2")

    with processes() as procs:
        proc = worker(procs, "-v", "--burst")
        code, out, err = finish(proc)
    assert code == 0, err

    result = run("history", job, "--json")
    assert result.exit_code == 0
    history = json.loads(result.stdout)
    assert [e["type"] for e in history] == [
        "enqueued",
        "claimed", "failed", "scheduled-retry",
        "claimed", "failed", "scheduled-retry",
        "claimed", "failed", "dead",
    ]
    for e in history:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["at"]), e["at"]
    assert [e["attempt"] for e in history if e["type"] == "claimed"] == [1, 2, 3]
    assert [e["delay"] for e in history if e["type"] == "scheduled-retry"] == [2, 4]
    assert [e["exit_code"] for e in history if e["type"] == "failed"] == [1, 1, 1]
    assert history[-1]["attempts"] == 3

    failed_at = [when(e["at"]) for e in history if e["type"] == "failed"]
    claimed_at = [when(e["at"]) for e in history if e["type"] == "claimed"]
    gaps = [(claimed_at[i + 1] - failed_at[i]).total_seconds() for i in range(2)]
    assert 1.9 <= gaps[0] <= 3.0, gaps
    assert 3.9 <= gaps[1] <= 5.5, gaps

    expected = [
        f"Picked up NEW job: {job}",
        f"Job {job} FAILED (Attempt 1/3): exit status 1",
        f"Job {job} state: failed - Will retry in 2s",
        f"RETRYING job {job} (Attempt 2)",
        f"Job {job} FAILED (Attempt 2/3): exit status 1",
        f"Job {job} state: failed - Will retry in 4s",
        f"RETRYING job {job} (Attempt 3)",
        f"Job {job} FAILED (Attempt 3/3): exit status 1",
        f"Job {job} state: DEAD",
    ]
    position = 0
    for text in expected:  # each line present, in this order
        position = out.index(text, position) + len(text)
    assert run("dlq", "list", "--json").stdout.count(f'"{job}"') == 1


def test_exit_code_error_and_output_are_recorded(run, conn):
    three, missing, boom = enqueue(
        run, "exit 3", "no_such_command_queuectl_test", "echo boom; echo bang >&2; exit 1",
        max_retries="0",
    )
    with processes() as procs:
        code, _, err = finish(worker(procs, "--burst"))
    assert code == 0, err

    (failed,) = bodies(conn, "failed", three)
    assert failed["exit_code"] == 3 and failed["error"] == "exit status 3"

    (failed,) = bodies(conn, "failed", missing)
    assert failed["exit_code"] == 127
    assert "127" in failed["error"]
    assert "not found" in failed["output"]

    (failed,) = bodies(conn, "failed", boom)
    assert failed["exit_code"] == 1
    assert "boom" in failed["output"] and "bang" in failed["output"]

    jobs = {j["id"]: j for j in json.loads(run("list", "--json").stdout)}
    assert {j["state"] for j in jobs.values()} == {"dead"}
    assert [jobs[i]["exit_code"] for i in (three, missing, boom)] == [3, 127, 1]
    assert "127" in jobs[missing]["last_error"]


# One worker a process starts its runs with os.posix_spawn, several with subprocess.
@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_command_too_long_to_start_fails_the_run_not_the_worker(run, conn, concurrency):
    # Linux refuses exec of any single argument over 128 KiB (E2BIG): sh never starts.
    huge, after = enqueue(run, "true " + "x" * 200_000, "echo after", max_retries="0")
    with processes() as procs:
        code, _, err = finish(worker(procs, "--burst", "-c", concurrency))
    assert code == 0, err  # the worker went on to the next job and stopped as usual
    (failed,) = bodies(conn, "failed", huge)
    assert failed["exit_code"] == 126
    assert "cannot start sh" in failed["output"] and "too long" in failed["output"]
    assert state(conn, huge) == "dead"
    assert state(conn, after) == "completed"


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_job_shell_leads_its_own_session_with_default_signals(run, conn, concurrency):
    # The worker (Python) ignores SIGPIPE and SIGXFSZ; a job must start with the defaults,
    # as its own session and process group leader, reading nothing from the worker.
    (job,) = enqueue(run, "cat /proc/$$/stat; grep SigIgn /proc/$$/status; echo pid=$$; cat")
    with processes() as procs:
        code, _, err = finish(worker(procs, "--burst", "-c", concurrency))
    assert code == 0, err
    (done,) = bodies(conn, "completed", job)
    stat, ignored, pid = done["output"].splitlines()
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
    assert fields[2] == fields[3] == pid.removeprefix("pid=")
    mask = int(ignored.split()[1], 16)
    assert not mask & (1 << (signal.SIGPIPE - 1)) and not mask & (1 << (signal.SIGXFSZ - 1))


def test_completed_run_records_its_output(run, conn):
    (job,) = enqueue(run, "echo hello from the job")
    with processes() as procs:
        code, _, err = finish(worker(procs, "--burst"))
    assert code == 0, err
    (done,) = bodies(conn, "completed", job)
    assert done["output"] == "hello from the job\n"
    assert state(conn, job) == "completed"


# -- persistence and limits -----------------------------------------------------------------


def test_jobs_persist_across_worker_restart(run, conn):
    ids = enqueue(run, *[f"echo {n}" for n in range(5)])
    with processes() as procs:
        code, _, err = finish(worker(procs, "-l", "2"))  # no --burst: the limit ends it
        assert code == 0, err

        listed = json.loads(cli_ok("list", "--json"))  # a fresh process reads the file
        assert [(j["id"], j["state"]) for j in listed] == [
            *[(i, "completed") for i in ids[:2]],
            *[(i, "pending") for i in ids[2:]],
        ]
        assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["job limit reached"]

        code, _, err = finish(worker(procs, "--burst"))
        assert code == 0, err

    listed = json.loads(cli_ok("list", "--json"))
    assert [(j["id"], j["state"]) for j in listed] == [(i, "completed") for i in ids]
    assert all(events_of(conn, i).count("claimed") == 1 for i in ids)
    first, second = started_workers(conn)
    claimers = [b["worker_id"] for b in bodies(conn, "claimed")]
    assert claimers == [first] * 2 + [second] * 3


def test_limit_caps_jobs_per_worker(run, conn):
    enqueue(run, *["true"] * 6)
    with processes() as procs:
        code, out, err = finish(worker(procs, "-c", "2", "-l", "2"))
    assert code == 0, err
    per_worker = Counter(b["worker_id"] for b in bodies(conn, "claimed"))
    assert sorted(per_worker.values()) == [2, 2]
    assert sorted(per_worker) == sorted(started_workers(conn))
    counts = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
    assert counts == {"completed": 4, "pending": 2}


@pytest.mark.slow
def test_burst_exits_zero_with_nothing_left(run, conn):
    enqueue(run, "true", "echo x", "true")
    (flaky,) = enqueue(run, "false", max_retries="1")  # waits 2 s in `failed`, then dies
    with processes() as procs:
        code, _, err = finish(worker(procs, "-c", "2", "--burst"))
    assert code == 0, err
    status = json.loads(run("status", "--json").stdout)
    assert {s: status["jobs"][s] for s in ("pending", "processing", "failed")} == {
        "pending": 0, "processing": 0, "failed": 0,
    }
    assert {s: n for s, n in status["jobs"].items() if n} == {"completed": 3, "dead": 1}
    assert events_of(conn, flaky).count("claimed") == 2  # burst waited out the backoff


def test_burst_on_empty_queue_exits_at_once(conn):
    with processes() as procs:
        started = time.monotonic()
        code, out, err = finish(worker(procs, "--burst"))
        elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 10
    assert re.fullmatch(r"Worker started: \S+\n", out)
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["burst: queue empty"]


def test_burst_sibling_exits_when_the_last_job_ends(run, conn):
    """A burst worker that found nothing to claim while its sibling ran the last job exits
    when that job ends, not at its next poll: results send no wake-up of their own."""
    run("config", "set", "lease-timeout", "600")
    run("config", "set", "heartbeat-interval", "300")
    enqueue(run, "sleep 0.5")
    with processes() as procs:
        started = time.monotonic()
        code, _, err = finish(worker(procs, "-c", "2", "--burst", "--poll", "60"))
        elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 30  # not at the end of its 60 s poll
    assert sorted(b["reason"] for b in bodies(conn, "worker-stopped")) == [
        "burst: queue empty", "burst: queue empty"]


def test_burst_worker_exits_soon_after_another_process_ends_the_last_job(run, conn):
    """Two burst processes: the one that found nothing to claim exits soon after the other
    one's last job ends, though that result wakes no one in another process."""
    run("config", "set", "lease-timeout", "600")
    run("config", "set", "heartbeat-interval", "300")
    enqueue(run, "sleep 1")
    with processes() as procs:
        started = time.monotonic()
        first = worker(procs, "--burst", "--poll", "60")
        wait_for(lambda: bodies(conn, "claimed"), what="the job's claim", timeout=30)
        code, _, err = finish(worker(procs, "--burst", "--poll", "60"))
        assert code == 0, err
        code, _, err = finish(first)
        elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 30  # the second process did not sleep out its 60 s poll
    assert sorted(b["reason"] for b in bodies(conn, "worker-stopped")) == [
        "burst: queue empty", "burst: queue empty"]


def test_concurrency_starts_distinct_workers(conn):
    with processes() as procs:
        code, out, err = finish(worker(procs, "-c", "3", "--processes", "1", "--burst"))
    assert code == 0, err
    started = re.findall(r"^Worker started: (\S+)$", out, re.M)
    assert len(started) == 3 and len(set(started)) == 3
    assert sorted(started) == sorted(started_workers(conn))
    pids = {b["pid"] for b in bodies(conn, "worker-started")}
    assert len(pids) == 1  # three workers, one process


# -- stopping -------------------------------------------------------------------------------


@pytest.mark.slow
def test_stop_request_lets_running_job_finish(run, conn):
    (job,) = enqueue(run, "sleep 2")
    with processes() as procs:
        first = worker(procs, "-s", "30")
        wait_for(lambda: state(conn, job) == "processing", what="the job to start")

        assert cli_ok("worker", "--stop") == "Stop signal sent to all workers.\n"
        code, out, err = finish(first)
        assert code == 0, err
        assert state(conn, job) == "completed"
        (first_id,) = started_workers(conn)
        stopped = bodies(conn, "worker-stopped")
        assert [(b["worker_id"], b["reason"]) for b in stopped] == [(first_id, "stop requested")]
        assert events_of(conn, job) == ["enqueued", "claimed", "completed"]

        # A worker started after the request is not affected: it keeps taking jobs.
        second = worker(procs, "-s", "30")
        wait_for(lambda: len(started_workers(conn)) == 2, what="the second worker")
        (later,) = enqueue(run, "true")
        wait_for(lambda: state(conn, later) == "completed", what="the new job")
        time.sleep(0.5)
        assert second.poll() is None
        assert len(bodies(conn, "worker-stopped")) == 1

        assert run("worker", "stop").stdout == "Stop signal sent to all workers.\n"
        code, _, err = finish(second, timeout=20)
        assert code == 0, err
    second_id = started_workers(conn)[1]
    assert [(b["worker_id"], b["reason"]) for b in bodies(conn, "worker-stopped")] == [
        (first_id, "stop requested"),
        (second_id, "stop requested"),
    ]


def test_worker_started_after_stop_request_runs_burst(run, conn):
    assert run("worker", "--stop").exit_code == 0
    (job,) = enqueue(run, "true")
    with processes() as procs:
        code, _, err = finish(worker(procs, "--burst"))
    assert code == 0, err
    assert state(conn, job) == "completed"
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["burst: queue empty"]


def test_idle_worker_picks_up_new_job_at_once(run, conn):
    with processes() as procs:
        proc = worker(procs, "-s", "30")
        wait_for(lambda: started_workers(conn), what="the worker to start")
        time.sleep(1.0)  # let it settle into its idle wait (30 s poll, 10 s heartbeat)

        sent = time.monotonic()
        (job,) = enqueue(run, "true")
        wait_for(lambda: state(conn, job) == "completed", timeout=10, what="the job")
        elapsed = time.monotonic() - sent
        assert elapsed < 2.0, elapsed
        assert proc.poll() is None

        at = {e["type"]: when(e["at"]) for e in json.loads(run("history", job, "--json").stdout)}
        assert (at["claimed"] - at["enqueued"]).total_seconds() < 1.0

        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=20)
        assert code == 0, err


# -- the waker ------------------------------------------------------------------------------


@pytest.mark.stores("sqlite")  # the SQLite store's waker
def test_waker_sets_up_inotify_only_once_workers_have_waited_a_while(conn, db, monkeypatch):
    monkeypatch.setattr(sqlite_store, "WATCH_AFTER", 0.2)
    waker = sqlite_store.Waker(db)
    try:
        waker.wait(waker.generation, 0.05)  # a short wait, as at the end of a burst
        assert not waker.watching

        waited = time.monotonic()
        while not waker.watching and time.monotonic() - waited < WAIT:
            waker.wait(waker.generation, 0.05)
        assert waker.watching or sys.platform != "linux"
        assert time.monotonic() - waited >= 0.2 - 0.06

        # Watching or not, a commit by another connection wakes a waiting worker.
        def commit() -> None:
            other = ledger.connect(db)
            decisions.enqueue(other, [decisions.JobSpec(command="true")])
            other.close()

        seen = waker.generation
        later = threading.Timer(0.1, commit)
        later.start()
        sent = time.monotonic()
        waker.wait(seen, 10.0)
        later.join()
        assert waker.generation != seen
        assert time.monotonic() - sent < 5.0
    finally:
        waker.close()


@pytest.mark.stores("sqlite")  # the SQLite store's waker
def test_busy_workers_keep_the_wal_small(conn, db, monkeypatch):
    """The waker's checkpoints catch up with busy workers, so the WAL starts over instead of
    growing by every page that every job writes."""
    n = 600
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(n)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.02)
    monkeypatch.setattr(sqlite_store, "LOCKED_SHARE", 0.5)  # each checkpoint ends locked
    wal_at_close = []
    close = sqlite_store.Waker.close

    def measured_close(self: sqlite_store.Waker) -> None:
        wal_at_close.append(Path(f"{db}-wal").stat().st_size)
        close(self)

    monkeypatch.setattr(sqlite_store.Waker, "close", measured_close)
    options = worker_module.Options(concurrency=2, burst=True)
    assert worker_module.run_workers(db, options, echo=lambda text: None) == []

    assert conn.execute("SELECT count(*) FROM jobs WHERE state = 'completed'").fetchone() == (n,)
    # Each job's commit writes some 16 pages; a WAL never started over would hold them all.
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    assert 0 < wal_at_close[0] < n * 4 * page, wal_at_close


@pytest.mark.stores("sqlite")  # the SQLite store's waker
def test_a_wakers_locked_pass_holds_back_the_writers_of_other_processes(conn, db, monkeypatch):
    """With ``worker -c 2`` as two processes, the locked pass of each one's waker must hold
    back the writers of every process (the writers' queue), not only its own: otherwise the
    other process commits throughout, the copy never catches up, and the WAL never starts
    over (it grew by 70 MB in 2,000 jobs, all of it copied again by the last close)."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 1000.0)  # only the test's calls
    decisions.enqueue(conn, [decisions.JobSpec(command="true")])
    wal = Path(f"{db}-wal")
    writing = time.monotonic() + 1.5
    pid = os.fork()
    if pid == 0:  # pragma: no cover - another process, as a forked worker is
        try:  # commits without a pause, each through the writers' queue
            other = ledger.connect(db)
            other.for_worker()
            while time.monotonic() < writing:
                decisions.enqueue(other, [decisions.JobSpec(command="true")])
        finally:
            os._exit(0)
    waker = sqlite_store.Waker(db)
    try:
        wait_for(lambda: wal.stat().st_size > 64 * 1024, what="the other process to write")
        restarts = wal.read_bytes()[12:16]  # the WAL's checkpoint sequence: +1 a restart
        for _ in range(5):
            waker._next_locked = 0.0  # the locked pass is due
            waker._checkpoint()
            time.sleep(0.05)
        assert wal.read_bytes()[12:16] != restarts
    finally:
        waker.close()
        os.waitpid(pid, 0)


@pytest.mark.stores("sqlite")  # the SQLite store's waker
def test_a_long_transaction_elsewhere_only_puts_off_the_locked_pass(conn, db, monkeypatch):
    """Another process keeps the writers' queue (a long bulk enqueue, say): the waker's
    locked pass waits for it LOCKED_WAIT, then goes on without it, due still, instead of
    holding this process's writers back for the lock timeout and then failing."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 1000.0)  # only the test's calls
    monkeypatch.setenv("QUEUECTL_LOCK_TIMEOUT", "30")
    decisions.enqueue(conn, [decisions.JobSpec(command="true")])
    waker = sqlite_store.Waker(db)
    try:
        with write_lock_held(db):
            waker._next_locked = 0.0  # the locked pass is due
            start = time.monotonic()
            waker._checkpoint()
            assert sqlite_store.LOCKED_WAIT <= time.monotonic() - start < 5
            assert waker._next_locked == 0.0  # due still: tried at the next checkpoint
            assert waker.error is None
    finally:
        waker.close()
    waker = sqlite_store.Waker(db)
    try:
        waker._next_locked = 0.0
        waker._checkpoint()  # the queue free: the locked pass is made, and put off
        assert waker._next_locked > time.monotonic()
    finally:
        waker.close()


@pytest.mark.stores("sqlite")  # the SQLite store's waker
def test_waker_holds_the_process_lock_less_often_when_checkpoints_are_slow(conn, db,
                                                                          monkeypatch):
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 1000.0)  # only the test's calls
    monkeypatch.setattr(sqlite_store, "LOCKED_SHARE", 0.01)
    taken = []

    class CountingLock:
        def __init__(self) -> None:
            self.lock = threading.RLock()

        def __enter__(self) -> None:
            self.lock.acquire()
            taken.append(threading.current_thread().name)

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    class SlowSync:
        """A connection whose checkpoints take 50 ms, as on a disk that syncs slowly."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str) -> sqlite3.Cursor:
            if "checkpoint" in sql:
                time.sleep(0.05)
            return self.conn.execute(sql)

        def close(self) -> None:
            self.conn.close()

    monkeypatch.setattr(sqlite_store, "PROCESS_LOCK", CountingLock())
    waker = sqlite_store.Waker(db)
    try:
        waker._conn = SlowSync(waker._conn)  # type: ignore[assignment]
        waker._checkpoint()
        assert len(taken) == 1  # the first pass is locked...
        waker._checkpoint()
        assert len(taken) == 1  # ...the next not before 50 ms / 1% = 5 s later
    finally:
        waker.close()


@pytest.mark.stores("sqlite")  # the SQLite store's waker
def test_a_waker_leaves_the_checkpoint_to_another_process_that_just_made_one(conn, db,
                                                                            monkeypatch):
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 1000.0)  # only the test's calls
    ours, theirs = sqlite_store.Waker(db), sqlite_store.Waker(db)
    copies = []

    class Counted:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str) -> sqlite3.Cursor:
            if "checkpoint" in sql:
                copies.append(sql)
            return self.conn.execute(sql)

        def close(self) -> None:
            self.conn.close()

    try:
        ours._conn = Counted(ours._conn)  # type: ignore[assignment]
        decisions.enqueue(conn, [decisions.JobSpec(command="true")])
        ours._checkpoint()
        assert copies
        copies.clear()
        ours._checkpoint()  # the last copy was its own: it goes on with its schedule
        assert copies
        copies.clear()
        decisions.enqueue(conn, [decisions.JobSpec(command="true")])
        time.sleep(0.05)  # a file's mtime moves by the kernel's tick
        theirs._checkpoint()
        ours._checkpoint()
        assert copies == []
        monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.0)  # theirs is long ago
        ours._checkpoint()
        assert copies
    finally:
        ours.close()
        theirs.close()


# -- signals --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_current_job_then_exits(run, conn):
    (job,) = enqueue(run, "sleep 2")
    with processes() as procs:
        proc = worker(procs, "-s", "30")
        # Its process, not only its claim: a signal between the two gives the job back
        # unstarted (see test_a_signal_between_claim_and_start_gives_the_job_back).
        wait_for(lambda: job_group(proc.pid), timeout=10, what="the job's process")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still finishing the job
        code, _, err = finish(proc, timeout=30)
    assert code == 0, err
    assert state(conn, job) == "completed"
    assert events_of(conn, job) == ["enqueued", "claimed", "completed"]
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["signal"]
    assert conn.execute("SELECT state FROM workers").fetchall() == [("stopped",)]


def test_a_signal_between_claim_and_start_gives_the_job_back(run, conn, db, monkeypatch):
    """A signal that lands after the claim committed and before the job's process exists
    lets nothing start: the job goes back unstarted, with no attempt counted, and the
    worker stops for the signal."""
    (job,) = enqueue(run, "touch started")
    made: list[worker_module.Shutdown] = []

    class Caught(worker_module.Shutdown):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    real = claims.claim

    def claim_then_signal(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = real(*args, **kwargs)
        made[0].stop("signal")  # what the handler of SIGTERM does
        return found

    monkeypatch.setattr(worker_module, "Shutdown", Caught)
    monkeypatch.setattr(claims, "claim", claim_then_signal)
    errors = worker_module.run_workers(db, worker_module.Options(), echo=lambda _: None)
    assert errors == []
    assert events_of(conn, job) == ["enqueued", "claimed", "released"]
    assert [b["reason"] for b in bodies(conn, "released")] == [
        "worker shut down before the job started"]
    row = conn.execute("SELECT state, attempts, worker_id FROM jobs WHERE id = ?", (job,)).fetchone()
    assert row == ("pending", 0, None)
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["signal"]
    assert not Path("started").exists()


def test_double_sigint_abandons_job_and_releases_it(run, conn):
    # A background grandchild, and SIGTERM ignored: only killing the whole group works.
    (job,) = enqueue(run, "trap '' TERM; sleep 30 & sleep 30")
    with processes() as procs:
        proc = worker(procs, "-s", "30")
        wait_for(lambda: state(conn, job) == "processing", what="the job to start")
        pgid = wait_for(lambda: job_group(proc.pid), timeout=10, what="the job's process")
        wait_for(lambda: len(alive_in_group(pgid)) >= 3, timeout=10, what="sh and two sleeps")

        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code, _, err = finish(proc, timeout=20)
        assert time.monotonic() - sent < 5
    assert code == 0, err

    assert state(conn, job) == "pending"
    assert events_of(conn, job) == ["enqueued", "claimed", "released"]
    row = conn.execute("SELECT attempts, worker_id FROM jobs WHERE id = ?", (job,)).fetchone()
    assert row == (0, None)  # an abandoned run does not count as an attempt
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["signal"]
    wait_for(lambda: not alive_in_group(pgid), timeout=5, what="the job's process group to go")



# -- supervision: whatever ends a worker thread ------------------------------------------------


def test_a_worker_thread_that_dies_releases_its_job_and_says_why(run, conn, db, monkeypatch):
    """A failure inside the worker's own code (here: recording a result) must not leave a
    dead thread holding its job under a worker still listed active, which would cost the
    job an attempt when its lease expired. The job is released (no attempt counted),
    worker-stopped says why, and the process's other worker finishes and stops too. (The
    two workers' results may share the failing transaction: then both crash, each
    releasing its job.)"""
    enqueue(run, "true", "true", "true")
    real = claims.finish_and_claim_many
    calls = []

    def fails_once(conn, finished, claimers, *args, **kwargs):  # type: ignore[no-untyped-def]
        if finished:  # the first time a result is recorded
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
        return real(conn, finished, claimers, *args, **kwargs)

    monkeypatch.setattr(claims, "finish_and_claim_many", fails_once)
    errors = worker_module.run_workers(db, worker_module.Options(concurrency=2), echo=lambda _: None)
    assert errors and all(e.endswith(": boom") for e in errors), errors
    crashed = {e.split()[1].rstrip(":") for e in errors}
    stopped = {b["worker_id"]: b["reason"] for b in bodies(conn, "worker-stopped")}
    assert {w: r for w, r in stopped.items() if w in crashed} == dict.fromkeys(crashed, "crashed: boom")
    for other in set(stopped) - crashed:
        assert stopped[other] in {f"worker {w} of this process crashed" for w in crashed}
    assert conn.execute("SELECT count(*) FROM workers WHERE state = 'active'").fetchone() == (0,)
    releases = bodies(conn, "released")
    by_crash = [r for r in releases if r["reason"] == "worker stopped while holding it: crashed: boom"]
    assert len(by_crash) == len(crashed)
    assert all(r["reason"] in ("worker stopped while holding it: crashed: boom",
                               "worker shut down before the job started") for r in releases)
    for released in releases:
        job = reads.get_job(conn, released["job_id"])
        assert (job.state, job.attempts) == ("pending", 0)  # no attempt counted


@pytest.mark.parametrize("ahead", [None, "0", "2"])
def test_jobs_are_claimed_ahead_only_when_asked(conn, ahead):
    """On either store, a worker claims jobs ahead only with ``--ahead N``: each start
    waits for the store's word anyway, so holding jobs saves only the claims."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(6)])
    flags = ["--ahead", ahead] if ahead else []
    result = subprocess.run(queuectl_cmd("worker", "--burst", *flags), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    claims_ahead = conn.execute("SELECT count(*) FROM events WHERE type = 'claimed' "
                                """AND body LIKE '%"ahead":true%'""").fetchone()[0]
    started = conn.execute("SELECT count(*) FROM events WHERE type = 'started'").fetchone()[0]
    assert claims_ahead == started
    if ahead in (None, "0"):
        assert claims_ahead == 0
    else:
        assert claims_ahead >= 2
    assert conn.execute("SELECT count(*) FROM jobs WHERE state = 'completed'").fetchone() == (6,)


def test_a_waker_that_dies_stops_the_process(run, conn, db, monkeypatch):
    enqueue(run, "sleep 0.5")

    def broken(self):  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")

    from queuectl.store import postgres as postgres_store

    for waker in (sqlite_store.Waker, postgres_store.Waker):
        monkeypatch.setattr(waker, "_watch", broken)
    errors = worker_module.run_workers(db, worker_module.Options(), echo=lambda _: None)
    assert errors == ["waker: [Errno 5] Input/output error"]
    reasons = [b["reason"] for b in bodies(conn, "worker-stopped")]
    assert reasons == ["the process's waker thread crashed"]
    assert conn.execute("SELECT state FROM jobs").fetchall() in ([("completed",)], [("pending",)])


def test_output_that_cannot_be_written_never_stops_the_workers(run, conn):
    """``worker -v --burst | head -2``: the pipe closes after two lines; the workers go on
    silently to the end of the queue and exit 0."""
    ids = enqueue(run, *["true"] * 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "queuectl", "worker", "-v", "--burst"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its two lines
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert err == b""
    assert [state(conn, job_id) for job_id in ids] == ["completed"] * 20
    assert [b["reason"] for b in bodies(conn, "worker-stopped")] == ["burst: queue empty"]


# -- clocks ------------------------------------------------------------------------------------

FAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))),
                "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


# On PostgreSQL times come from the server, and libfaketime's step of CLOCK_MONOTONIC (which
# a real step of the clock never moves) stalls Python's timed waits there: the PostgreSQL
# waker, unlike SQLite's, has no 2 ms loop to end them. Its test is the skewed host below.
@pytest.mark.stores("sqlite")
@pytest.mark.slow
def test_a_clock_step_does_not_expire_a_live_workers_lease(run, conn, tmp_path):
    """libfaketime steps the worker process's clocks (wall and monotonic alike) 20 s ahead
    while one of its two workers runs a job: the other must not take it for silent, or
    the job would run twice."""
    needs(FAKETIME, "apt-get install faketime")
    run("config", "set", "heartbeat-interval", "0.5")
    run("config", "set", "lease-timeout", "3")
    (job_id,) = enqueue(run, "sleep 6")
    offset = tmp_path / "offset"
    offset.write_text("+0\n")
    proc = spawn("worker", "-c", "2", "--burst", env={
        "LD_PRELOAD": FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1"})
    try:
        wait_for(lambda: "claimed" in events_of(conn, job_id), WAIT)
        time.sleep(1.5)
        offset.write_text("+20\n")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert events_of(conn, job_id) == ["enqueued", "claimed", "completed"]
    kinds = {r[0] for r in conn.execute("SELECT type FROM events")}
    assert not kinds & {"lease-expired", "worker-lost"}
    stamps = [r[0] for r in conn.execute("SELECT at FROM events ORDER BY seq")]
    assert (when(stamps[-1]) - when(stamps[0])).total_seconds() > 20  # the step did happen


@pytest.mark.slow
def test_worker_ids_are_unique_when_many_processes_start_at_once(run, conn):
    """Many processes of many workers started at once never collide on workers.id: made
    ids name the seq of each worker-started event (``w`` and the seq)."""
    with processes() as procs:
        for _ in range(12):
            worker(procs, "-c", "8", "--burst")
        results = [finish(proc) for proc in procs]
    assert [code for code, _, _ in results] == [0] * 12, [err for _, _, err in results]
    ids = started_workers(conn)
    assert len(ids) == 96 and len(set(ids)) == 96
    seqs = [r[0] for r in conn.execute(
        "SELECT seq FROM events WHERE type = 'worker-started' ORDER BY seq")]
    assert ids == [f"w{seq}" for seq in seqs]  # each its own event's seq


@pytest.mark.stores("postgres")
@pytest.mark.slow
def test_a_host_whose_clock_is_minutes_off_keeps_to_the_servers_clock(run, conn, tmp_path):
    """One clock: a worker whose own clock runs 10 minutes ahead neither starts a job
    scheduled 20 s from now early, nor takes the job of a live worker whose heartbeats look
    10 minutes old to it; the times it writes are the server's."""
    needs(FAKETIME, "apt-get install faketime")
    run("config", "set", "heartbeat-interval", "0.3")
    run("config", "set", "lease-timeout", "1.5")
    (later,) = enqueue(run, "echo later", delay="20")
    (busy,) = enqueue(run, "sleep 4")
    with processes() as procs:
        honest = worker(procs, "-s", "0.2")
        wait_for(lambda: "claimed" in events_of(conn, busy), WAIT)
        # Its wall clock is off, not its monotonic one (no real clock error moves that; and
        # libfaketime's offset monotonic clock stalls Python's timed waits).
        ahead = spawn("worker", "-s", "0.2", env={
            "LD_PRELOAD": FAKETIME, "FAKETIME": "+10m", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "PYTHONUNBUFFERED": "1"})
        procs.append(ahead)
        wait_for(lambda: "completed" in events_of(conn, busy), WAIT)
        time.sleep(2)  # the skewed worker has had time to misjudge, were it going to
        assert events_of(conn, busy) == ["enqueued", "claimed", "completed"]
        assert events_of(conn, later) == ["enqueued"]  # not run 10 minutes early
        for proc in (honest, ahead):
            proc.send_signal(signal.SIGTERM)
        assert [finish(proc)[0] for proc in (honest, ahead)] == [0, 0]
    kinds = {r[0] for r in conn.execute("SELECT type FROM events")}
    assert not kinds & {"lease-expired", "worker-lost"}
    (started_at,) = conn.execute(
        "SELECT max(at) FROM events WHERE type = 'worker-started'").fetchone()
    skew = abs((datetime.now(UTC) - when(started_at)).total_seconds())
    assert skew < 30  # the server's time, not the worker's 10 minutes ahead
