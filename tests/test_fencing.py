"""Self-fencing: a worker that cannot renew its lease stops its own run before the lease can
expire, records ``fenced`` once it can write again, and the job runs again after; the
fence itself, on real process groups; what ``fenced`` does to the job, whoever got there
first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import PG_ADMIN, by_hand, events_of, rescued, spawn, wait_for

from queuectl import claims, fence, runner
from queuectl import events as ev

LEASE = 2.0  # seconds: the fence's SIGTERM comes 1.4 s after a renewal, its SIGKILL 1.6 s
OUTAGE = 4.0  # seconds the store is kept from the worker: past the lease
WAIT = 60.0

# The job: its first run writes its pid, then the time, every 20 ms, until it is killed;
# the next run prints which run it is and ends.
BEAT = textwrap.dedent("""\
    import os, sys, time
    attempt = os.environ["QUEUECTL_ATTEMPT"]
    with open(f"pid-{attempt}", "w") as f:
        f.write(str(os.getpid()))
    if attempt != "1":
        print(f"run {attempt}")
        sys.exit(0)
    while True:
        with open("beats", "a") as f:
            f.write(f"{time.time():.6f}\\n")
        time.sleep(0.02)
""")


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _alive(pid: int) -> bool:
    """Whether the process runs still: a zombie (the worker reaps its run's shell only when
    its own thread comes back) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _last_beat(path: Path) -> float | None:
    lines = path.read_text().split() if path.exists() else []
    return float(lines[-1]) if lines else None


def _stopped_beating(path: Path) -> float | None:
    """The last beat, once none has come for half a second."""
    last = _last_beat(path)
    return last if last is not None and time.time() - last > 0.5 else None


# -- cutting the store off ------------------------------------------------------------------

_HOLD_SQLITE = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # the write lock: every writer waits behind it
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""

_REFUSE_POSTGRES = """
import sys, time, psycopg
admin, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with psycopg.connect(admin, autocommit=True) as conn:
    conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    end = time.monotonic() + seconds
    kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
    conn.execute(kill, (name,))
    print("held", flush=True)
    while time.monotonic() < end:
        time.sleep(0.2)
        conn.execute(kill, (name,))
    conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
"""


def cut_off(db: Any, seconds: float) -> subprocess.Popen[str]:
    """A process that keeps every worker from writing to ``db`` for ``seconds``: SQLite's
    write lock held, or a PostgreSQL database refusing connections with its sessions
    terminated. Returns once the store is cut off."""
    if str(db).startswith("postgresql://"):
        args = [_REFUSE_POSTGRES, PG_ADMIN, str(db).rsplit("/", 1)[1], str(seconds)]
    else:
        args = [_HOLD_SQLITE, str(db), str(seconds)]
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


@contextmanager
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)


def start_worker(procs: list[subprocess.Popen[str]], host: str) -> subprocess.Popen[str]:
    proc = spawn("worker", "-s", "0.2", "--host-name", host,
                 env={"PYTHONUNBUFFERED": "1"}, start_new_session=True)
    procs.append(proc)
    return proc


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    return proc.returncode, err


def ledger_rows(db: Any, job_id: str) -> list[tuple[str, str | None, float, dict[str, Any]]]:
    """(type, worker, at as a Unix time, body) of a job's events, on a fresh connection: the
    test's own may have been cut off with the workers'."""
    with by_hand(db) as conn:
        found = conn.execute("SELECT type, worker_id, at, body FROM events WHERE job_id = ? "
                             "ORDER BY seq", (job_id,)).fetchall()
        return [(t, w, _at(at), json.loads(body)) for t, w, at, body in found]


def renewals(db: Any, worker_id: str) -> list[float]:
    """When the worker's lease was renewed (its start, heartbeats, claims: every event that
    moves ``workers.last_heartbeat``), as Unix times."""
    with by_hand(db) as conn:
        return [_at(at) for (at,) in conn.execute(
            "SELECT at FROM events WHERE worker_id = ? AND type IN ('worker-started', "
            "'worker-heartbeat', 'claimed', 'started') ORDER BY seq", (worker_id,))]


# -- the fence, with real processes ---------------------------------------------------------


@pytest.mark.slow
def test_a_run_outlives_no_lease_when_the_store_is_cut_off(run, db, tmp_path):
    """SQLite: another process holds the write lock; PostgreSQL: the database refuses every
    connection and its sessions are terminated. The worker's thread is stuck (blocked in a
    lock wait, or failing to reconnect), yet the run dies before 0.8 of the lease from the
    last renewal, no other run of the job starts before that, and once the store is back
    ``fenced`` is in the ledger and the job runs again."""
    assert run("config", "set", "heartbeat-interval", "0.3").exit_code == 0
    assert run("config", "set", "lease-timeout", str(LEASE)).exit_code == 0
    (tmp_path / "beat.py").write_text(BEAT)
    added = run("enqueue", "--id", "f", "--max-retries", "2", "-c",
                f"{sys.executable} beat.py")
    assert added.exit_code == 0, added.output
    beats = tmp_path / "beats"
    with workers() as procs:
        first = start_worker(procs, "host-a")
        wait_for(lambda: _last_beat(beats), WAIT, "the first run to beat")
        rescuer = start_worker(procs, "host-b")  # another host: it cannot stop host-a's runs
        time.sleep(0.5)  # a few renewals while it runs
        holder = cut_off(db, OUTAGE)
        cut_at = time.time()
        death = wait_for(lambda: _stopped_beating(beats), OUTAGE, "the run to die")
        assert holder.poll() is None  # the store is still cut off
        first_pid = int((tmp_path / "pid-1").read_text())
        assert not _alive(first_pid)
        holder.wait(timeout=WAIT)
        wait_for(lambda: "completed" in events_of_fresh(db, "f"), WAIT, "the second run")
        wait_for(lambda: "fenced" in events_of_fresh(db, "f"), WAIT, "fenced")
        for proc in (first, rescuer):
            code, err = stop(proc)
            assert code == 0, err

    rows = ledger_rows(db, "f")
    (claimed_1, claimed_2) = [r for r in rows if r[0] == "claimed"]
    (fenced,) = [r for r in rows if r[0] == "fenced"]
    worker_a = claimed_1[1]
    assert fenced[1] == worker_a and fenced[3]["attempt"] == 1
    body = fenced[3]
    assert body["lease_timeout"] == LEASE
    assert body["reason"] in (
        "a renewal did not commit in time: the database call was still waiting",  # SQLite
        ) or "not currently accepting connections" in body["reason"]  # PostgreSQL
    assert fence.TERM * LEASE <= body["silence"] < fence.KILL * LEASE
    last_renewal = max(t for t in renewals(db, worker_a) if t <= death)
    assert last_renewal < cut_at
    # The promise, measured from outside: dead before 0.8 of the lease after the last
    # renewal the ledger holds, and before any other run of the job began.
    assert death - last_renewal < fence.KILL * LEASE
    assert claimed_2[2] > death
    assert claimed_2[3]["attempt"] == 2
    completed = [r for r in rows if r[0] == "completed"]
    assert [r[3]["output"] for r in completed] == ["run 2\n"]
    types = [r[0] for r in rows if r[0] != "started"]
    assert types in (
        # the worker wrote first: it still held the job, so the fenced run is a failed one
        ["enqueued", "claimed", "fenced", "scheduled-retry", "claimed", "completed"],
        # a rescuer took the job back first: fenced only records what became of the run
        ["enqueued", "claimed", "lease-expired", "scheduled-retry", "fenced", "claimed",
         "completed"],
        ["enqueued", "claimed", "lease-expired", "scheduled-retry", "claimed", "fenced",
         "completed"],
        ["enqueued", "claimed", "lease-expired", "scheduled-retry", "claimed", "completed",
         "fenced"],
    ), types
    assert body.get("rescued", False) == ("lease-expired" in types)
    store = "postgres" if str(db).startswith("postgresql://") else "sqlite"
    print(f"\n{store}: the run died {death - last_renewal:.3f}s after the last renewal "
          f"(lease {LEASE:g}s, fence SIGTERM at {body['silence']:.3f}s by the worker's clock); "
          f"{' '.join(types)}")


def events_of_fresh(db: Any, job_id: str) -> list[str]:
    with by_hand(db) as conn:
        return events_of(conn, job_id)


# -- the fence alone ------------------------------------------------------------------------


def _run_stuck(command: str, lease: float, stuck: float) -> tuple[runner.RunResult,
                                                                  fence.Watched | None]:
    """Run ``command`` under a fence of ``lease`` seconds, renewed as it starts, while its
    tick is stuck for ``stuck`` seconds (a database call that does not return)."""
    fences = fence.Fence()
    key = object()
    ended: list[fence.Watched | None] = []
    ticks = iter([True])

    def tick() -> bool:
        if next(ticks, False):
            time.sleep(stuck)
        return False

    # A job id of its own: the fence finds the run's processes by their mark.
    env = runner.run_env(runner.worker_env("test"), f"j{time.monotonic_ns()}", 1, "w")
    try:
        result = runner.run_command(
            command, timeout=0, output_limit=1024, tick=tick, env=env,
            started=lambda group: fences.watch(key, group, env, time.monotonic(), lease),
            ending=lambda: ended.append(fences.ended(key)))
        time.sleep(0.2)  # the fence's last sweep, by the processes' mark
    finally:
        fences.close()
    return result, ended[0]


@pytest.mark.stores("sqlite")  # no store involved
def test_the_fence_terms_the_group_while_the_worker_is_stuck():
    result, watched = _run_stuck("sleep 30 & sleep 30", lease=1.0, stuck=3.0)
    assert watched is not None and watched.fenced is not None
    assert fence.TERM <= watched.fenced < fence.KILL
    assert result.exit_code == -signal.SIGTERM


@pytest.mark.stores("sqlite")
def test_the_fence_kills_a_group_that_ignores_sigterm(tmp_path):
    pids = tmp_path / "pids"
    # A child in the group, and one that left it (setsid) but carries the run's mark.
    command = (f"trap '' TERM; sleep 30 & echo $! > {pids}; "
               f"setsid sleep 30 & echo $! >> {pids}; sleep 30")
    start = time.monotonic()
    result, watched = _run_stuck(command, lease=1.0, stuck=3.0)
    assert watched is not None and watched.killed
    assert result.exit_code == -signal.SIGKILL
    assert time.monotonic() - start >= 3.0  # the worker came back only after its stuck call
    in_group, escaped = (int(p) for p in pids.read_text().split())
    assert not _alive(in_group)  # died with its group
    assert not _alive(escaped)  # found by its mark


@pytest.mark.stores("sqlite")
def test_a_renewed_lease_keeps_the_run_and_a_finished_run_is_left_alone():
    fences = fence.Fence()
    key = object()
    try:
        renew = iter(range(30))

        def tick() -> bool:
            if next(renew, None) is not None:
                fences.renewed(key, time.monotonic(), 0.5)
            return False

        result = runner.run_command(
            "sleep 1", timeout=0, output_limit=1024, tick=tick,
            started=lambda group: fences.watch(key, group, {}, time.monotonic(), 0.5),
            ending=lambda: None)
        assert result.exit_code == 0  # renewed every tick: a whole second under a 0.5 s lease
        watched = fences.ended(key)
        assert watched is not None and watched.fenced is None
        # A run whose shell has ended by itself, unreaped, is not fenced when its time comes.
        result = runner.run_command(
            "true", timeout=0, output_limit=1024, tick=lambda: False,
            started=lambda group: fences.watch(key, group, {}, time.monotonic(), 1.0),
            ending=lambda: time.sleep(1.0))  # past the deadline, with the shell a zombie
        assert result.exit_code == 0
        watched = fences.ended(key)
        assert watched is None or watched.fenced is None
    finally:
        fences.close()


# -- what the ledger says, whoever writes first ---------------------------------------------


def _fenced(c: claims.Claim, worker_id: str) -> ev.Fenced:
    return ev.Fenced(job_id=c.job_id, worker_id=worker_id, attempt=c.attempt, silence=21.0,
                     lease_timeout=30.0, reason="database is locked", duration=22.5,
                     output="working\n")


def _claimed(run, conn, worker_id: str) -> claims.Claim:
    assert run("enqueue", "--id", "j", "--max-retries", "1", "--backoff-base", "1", "-c",
               "work").exit_code == 0
    claims.worker_started(conn, 1, "h", worker_id=worker_id)
    c = claims.claim(conn, worker_id)
    assert c is not None
    return c


def test_fenced_while_still_held_counts_as_a_failed_run(run, conn):
    c = _claimed(run, conn, "w1")
    events = claims.finish(conn, c, _fenced(c, "w1"))
    assert [e.type for e in events] == ["fenced", "scheduled-retry"]
    assert events[0] == msgspec.structs.replace(_fenced(c, "w1"), by="w1")  # rescued: False
    shown = json.loads(run("list", "--json").stdout)
    assert [(j["state"], j["attempts"]) for j in shown] == [("failed", 1)]
    (run_row,) = conn.execute("SELECT outcome, duration FROM runs").fetchall()
    assert run_row == ("fenced", 22.5)
    assert conn.execute("SELECT current_job, jobs_done FROM workers").fetchall() == [(None, 1)]
    (error,) = conn.execute("SELECT last_error FROM jobs").fetchone()
    assert error == ("fenced: worker w1 could not renew its lease for 21s and stopped the "
                     "run (database is locked)")
    # Its last allowed run: dead, with the reason.
    c2 = _retry(conn, "w1")
    events = claims.finish(conn, c2, _fenced(c2, "w1"))
    assert [e.type for e in events] == ["fenced", "dead"]
    assert events[1].reason == "fenced: lease not renewed"


def _retry(conn, worker_id: str) -> claims.Claim:
    """The job's next run, once its retry is due (a backoff base of 1: a second)."""
    found: claims.Claim = wait_for(lambda: claims.claim(conn, worker_id), 10, "the retry")
    return found


def test_fenced_after_a_rescue_only_records_the_run(run, conn):
    c = _claimed(run, conn, "w1")
    taken = rescued(conn)
    assert [e.type for e in taken] == ["lease-expired", "scheduled-retry"]
    before = conn.execute("SELECT * FROM jobs").fetchall()
    runs_before = conn.execute("SELECT * FROM runs").fetchall()
    workers_before = conn.execute("SELECT * FROM workers").fetchall()
    events = claims.finish(conn, c, _fenced(c, "w1"))
    assert [(e.type, e.rescued) for e in events] == [("fenced", True)]  # type: ignore[union-attr]
    assert conn.execute("SELECT * FROM jobs").fetchall() == before
    assert conn.execute("SELECT * FROM runs").fetchall() == runs_before
    assert conn.execute("SELECT * FROM workers").fetchall() == workers_before
    assert events_of(conn, "j") == ["enqueued", "claimed", "lease-expired", "scheduled-retry",
                                    "fenced"]
    # A late fenced never closes the run the job is on now.
    claims.worker_started(conn, 2, "h", worker_id="w2")
    assert _retry(conn, "w2").attempt == 2
    logs = json.loads(run("logs", "j", "--json").stdout)
    assert [(r["attempt"], r["outcome"]) for r in logs] == [
        (1, "lease-expired"), (2, "running")]


def test_history_and_the_worker_log_say_what_the_fence_did(run, conn):
    c = _claimed(run, conn, "w1")
    claims.finish(conn, c, _fenced(c, "w1"))
    shown = run("history", "j")
    assert shown.exit_code == 0
    assert ("attempt 1 stopped by its own worker 21s after its last renewal (lease 30s): "
            "database is locked") in shown.stdout
    found = json.loads(run("history", "j", "--json").stdout)
    (fenced,) = [e for e in found if e["type"] == "fenced"]
    assert fenced["silence"] == 21.0 and fenced["reason"] == "database is locked"
    from queuectl import render

    assert render.worker_line(_fenced(c, "w1"), 2) == (
        "Job j FENCED (Attempt 1/2): no lease renewal for 21s, run stopped")
