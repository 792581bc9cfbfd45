"""Jobs claimed ahead: a worker holds them behind the job it runs, and starts one only when
the store says, at that moment, that the worker still holds it, that it is not cancelled,
that its queue is neither paused nor at its limit, and that the worker is not stopping.
Otherwise the job goes back to the queue without counting an attempt."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
from conftest import rescued, spawn, wait_for

from queuectl import claims, decisions
from queuectl import events as ev

WAIT = 60.0
QUEUECTL = f"{shlex.quote(sys.executable)} -m queuectl"


# -- the store's side -------------------------------------------------------------------------


def _enqueue(conn, *ids: str, queue: str = "default") -> None:
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=i, queue=queue) for i in ids])


def _hold(conn, worker: str, n: int) -> list[claims.Claim]:
    """``n`` jobs claimed ahead for ``worker`` (started here if it is new)."""
    if conn.execute("SELECT 1 FROM workers WHERE id = ?", (worker,)).fetchone() is None:
        claims.worker_started(conn, 1, "host", worker_id=worker)
    _, held = claims.finish_and_claim_many(conn, [], [worker] * n, ahead=True)
    return [job for job in held if job is not None]


def _start(conn, worker: str, job: claims.Claim) -> list[ev.Event]:
    """What the store records when ``worker`` asks to start ``job``, held ahead."""
    started = ev.Started(job_id=job.job_id, worker_id=worker, attempt=job.attempt)
    return claims.finish_and_claim_many(conn, [(job, started)], [])[0][0]


def _job(conn, job_id: str) -> tuple[str, int, str | None]:
    return conn.execute("SELECT state, attempts, worker_id FROM jobs WHERE id = ?",
                        (job_id,)).fetchone()


def test_a_job_held_ahead_starts_when_nothing_stands_in_its_way(conn):
    _enqueue(conn, "a")
    [job] = _hold(conn, "w1", 1)
    assert [e.type for e in _start(conn, "w1", job)] == ["started"]
    assert _job(conn, "a") == ("processing", 1, "w1")
    assert _start(conn, "w1", job) == []  # a start is recorded once


def test_a_cancelled_job_held_ahead_is_cancelled_at_once_and_never_starts(conn):
    _enqueue(conn, "a")
    [job] = _hold(conn, "w1", 1)
    assert decisions.cancel(conn, "a") == "cancelled"
    assert _job(conn, "a") == ("cancelled", 0, None)
    assert _start(conn, "w1", job) == []


def test_a_cancel_request_found_at_the_start_cancels_instead(conn):
    """A cancel asked for while the job was held (recorded by an older version as a request
    for a running job) is carried out at the start: the job never runs."""
    _enqueue(conn, "a")
    [job] = _hold(conn, "w1", 1)
    from queuectl.ledger import append, write

    with write(conn):
        append(conn, ev.CancelRequested(job_id="a"))
    assert [e.type for e in _start(conn, "w1", job)] == ["released", "cancelled"]
    assert _job(conn, "a") == ("cancelled", 0, None)


@pytest.mark.parametrize("why", ["paused", "stopping", "over its limit"])
def test_a_job_held_ahead_goes_back_when_it_may_not_start(conn, why):
    _enqueue(conn, "running", "held")
    claims.worker_started(conn, 1, "host", worker_id="w2")
    running = claims.claim(conn, "w2")
    assert running is not None and running.job_id == "running"
    [job] = _hold(conn, "w1", 1)
    if why == "paused":
        decisions.pause_queue(conn, "default")
    elif why == "stopping":
        decisions.request_stop(conn)
    else:
        decisions.limit_queue(conn, "default", 1)
    events = _start(conn, "w1", job)
    assert [e.type for e in events] == ["released"]
    assert events[0].ahead and why.split()[-1] in events[0].reason
    assert _job(conn, "held") == ("pending", 0, None)  # no attempt counted


def test_jobs_held_ahead_count_against_no_limit(conn):
    """A queue at limit 2 with one job running and one held ahead has room for one more."""
    _enqueue(conn, "a", "b", "c", queue="q")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    claims.worker_started(conn, 1, "host", worker_id="w2")
    assert claims.claim(conn, "w1").job_id == "a"
    assert [j.job_id for j in _hold(conn, "w1", 1)] == ["b"]
    decisions.limit_queue(conn, "q", 2)
    following = claims.claim(conn, "w2")
    assert following is not None and following.job_id == "c"


def test_jobs_of_a_limited_queue_are_not_claimed_ahead(conn):
    """Held ahead, they could not start while the queue is full, and would keep other
    workers from them: a limited queue's jobs are claimed only to start at once."""
    _enqueue(conn, "a", queue="q")
    _enqueue(conn, "b")
    decisions.limit_queue(conn, "q", 5)
    assert [j.job_id for j in _hold(conn, "w1", 2)] == ["b"]
    claims.worker_started(conn, 1, "host", worker_id="w2")
    assert claims.claim(conn, "w2").job_id == "a"


def test_a_silent_workers_jobs_held_ahead_go_back_without_an_attempt(conn):
    _enqueue(conn, "running", "held")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    assert claims.claim(conn, "w1").job_id == "running"
    _hold(conn, "w1", 1)
    events = rescued(conn)
    assert [(e.type, e.job_id) for e in events if hasattr(e, "job_id")] == [
        ("lease-expired", "running"), ("scheduled-retry", "running"), ("released", "held")]
    assert _job(conn, "running")[:2] == ("failed", 1)
    assert _job(conn, "held") == ("pending", 0, None)


def test_a_silent_worker_holding_only_jobs_ahead_is_declared_lost(conn):
    _enqueue(conn, "held")
    _hold(conn, "w1", 1)
    assert [e.type for e in rescued(conn)] == ["released", "worker-lost"]
    assert _job(conn, "held") == ("pending", 0, None)
    assert conn.execute("SELECT state FROM workers WHERE id = 'w1'").fetchone() == ("gone",)


# -- real workers --------------------------------------------------------------------------
# The first job is quick, so the worker claims the next ones ahead with its result; the
# second (the gate) does something to the jobs held behind it while it runs, from inside
# the run: no race with the worker's timing.


def _queue_with_gate(run, gate: str, n: int = 4, command: str = "echo $QUEUECTL_JOB_ID >> runs.txt"
                     ) -> list[str]:
    assert run("enqueue", "--id", "quick", "-c", "true").exit_code == 0
    assert run("enqueue", "--id", "gate", "-c", gate).exit_code == 0
    held = [f"a{n}" for n in range(1, n + 1)]
    for job_id in held:
        assert run("enqueue", "--id", job_id, "-c", command).exit_code == 0
    return held


def _runs() -> list[str]:
    path = Path("runs.txt")
    return path.read_text().split() if path.exists() else []


def _worker(*flags: str) -> tuple[int, str, str]:
    proc = spawn("worker", "--ahead", "4", *flags)
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def _events(conn, type_: str) -> list[tuple[str, dict]]:
    return [(job_id, json.loads(body)) for job_id, body in conn.execute(
        "SELECT job_id, body FROM events WHERE type = ? ORDER BY seq", (type_,))]


def _claims_ahead(conn) -> set[str]:
    return {job_id for job_id, body in _events(conn, "claimed") if body.get("ahead")}


@pytest.mark.slow
def test_a_job_held_ahead_and_cancelled_never_runs(run, conn):
    held = _queue_with_gate(run, f"{QUEUECTL} cancel a1")
    code, out, err = _worker("--burst")
    assert code == 0, err
    assert {"gate", "a1"} <= _claims_ahead(conn)
    assert _runs() == held[1:]
    assert _job(conn, "a1") == ("cancelled", 0, None)
    assert "a1" not in {job_id for job_id, _ in _events(conn, "started")}


@pytest.mark.slow
def test_a_paused_queue_starts_none_of_the_jobs_held_ahead(run, conn):
    held = _queue_with_gate(run, f"{QUEUECTL} queue pause default")
    code, out, err = _worker("--burst")
    assert code == 0, err
    assert set(held) <= _claims_ahead(conn)
    assert _runs() == []
    assert [_job(conn, j) for j in held] == [("pending", 0, None)] * 4
    assert all("paused" in body["reason"] for _, body in _events(conn, "released"))


@pytest.mark.slow
def test_a_worker_asked_to_stop_starts_none_of_the_jobs_held_ahead(run, conn):
    held = _queue_with_gate(run, f"{QUEUECTL} worker --stop")
    code, out, err = _worker()
    assert code == 0, err
    assert set(held) <= _claims_ahead(conn)
    assert _runs() == []
    assert [_job(conn, j) for j in held] == [("pending", 0, None)] * 4
    assert [body["reason"] for _, body in _events(conn, "worker-stopped")] == ["stop requested"]


@pytest.mark.slow
def test_a_queue_limit_holds_for_jobs_held_ahead(run, conn):
    """Two workers; the gate limits the queue to one running job while both hold jobs
    ahead. From then on the ledger never shows two runs at once."""
    assert run("enqueue", "--id", "quick2", "-c", "true").exit_code == 0
    held = _queue_with_gate(run, f"{QUEUECTL} queue limit default 1", n=6,
                            command="sleep 0.2; echo $QUEUECTL_JOB_ID >> runs.txt")
    code, out, err = _worker("-c", "2", "--burst")
    assert code == 0, err
    assert sorted(_runs()) == held
    limited = conn.execute("SELECT seq FROM events WHERE type = 'queue-limited'").fetchone()[0]
    ahead = _claims_ahead(conn)
    running: set[str] = set()
    most = 0
    for seq, type_, job_id, body in conn.execute(
            "SELECT seq, type, job_id, body FROM events ORDER BY seq"):
        body = json.loads(body)
        if type_ == "started" or (type_ == "claimed" and not body.get("ahead")):
            running.add(job_id)
        elif type_ in ("completed", "failed", "released") and job_id in running:
            running.discard(job_id)
        if seq > limited:
            most = max(most, len(running - {"gate"}))
    assert ahead & set(held)  # jobs were held ahead when the limit came
    assert most == 1


@pytest.mark.slow
def test_a_worker_resumed_after_its_lease_ran_out_starts_none_of_the_jobs_it_held(run, conn):
    """The gate stops its own worker (SIGSTOP) while it holds four jobs ahead; another
    worker takes them back after the lease and runs them. Resumed, the first worker runs
    none of them again: the store no longer says it holds them."""
    assert run("config", "set", "heartbeat-interval", "1").exit_code == 0
    assert run("config", "set", "lease-timeout", "2").exit_code == 0
    # The gate runs on after its kill: a stop lands some moments after it is sent, and one
    # that landed after the gate ended could catch the worker between a job's go-ahead and
    # its start, the pause the fence cannot cover (docs/guides/workers.md).
    held = _queue_with_gate(run, "[ -e stopped ] || { touch stopped; kill -STOP $PPID; sleep 1; }")
    first = spawn("worker", "--ahead", "4", "-s", "0.2")
    try:
        wait_for(lambda: Path("stopped").exists() and _stopped(first.pid), WAIT,
                 "the gate to stop its worker")
        assert set(held) <= _claims_ahead(conn)
        rescuer = spawn("worker", "--burst", "-s", "0.2")
        out, err = rescuer.communicate(timeout=WAIT)
        assert rescuer.returncode == 0, err
        assert sorted(_runs()) == held
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=WAIT)
        assert "declared lost" in out + err or first.returncode == 0, err
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert sorted(_runs()) == held  # each ran once
    assert [_job(conn, j)[:2] for j in held] == [("completed", 1)] * 4
    released = {job_id for job_id, body in _events(conn, "released") if body["ahead"]}
    assert set(held) <= released


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"
