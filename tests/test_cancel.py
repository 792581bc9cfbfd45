"""``queuectl cancel``: a job that is not running is cancelled at once, with every job
waiting on it; a running job's worker kills its whole process group and goes on working;
a finished job cannot be cancelled."""

from __future__ import annotations

import json
import time

from conftest import events_of, wait_for
from helpers import (
    added,
    claim,
    complete,
    fail,
    job,
    kill_leftovers,
    ok,
    one_error,
    pids_of,
    rows,
    snapshot,
    state,
    workers,
)

from queuectl import clock


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
