"""``queuectl restart``: a completed, dead or cancelled job runs again as a fresh series of
attempts, its history and runs kept; any other state is refused, and so is a restart that
would hold a unique key another unfinished job holds."""

from __future__ import annotations

import json

from conftest import wait_for
from helpers import (
    added,
    claim,
    complete,
    fail,
    job,
    ok,
    one_error,
    rows,
    snapshot,
    state,
)

from queuectl import Queue, claims
from queuectl import events as ev


def test_restarted_dead_job_runs_its_whole_budget_again(run, conn):
    added(run, "--id", "d", "--max-retries", "1", "--backoff-base", "1", "-c", "false")
    c = claim(conn, "w", "d")
    fail(conn, c, "w")
    assert state(conn, "d") == "failed"
    c2 = wait_for(lambda: claims.claim(conn, "w"), 5, "the retry, 1s later")
    assert (c2.job_id, c2.attempt) == ("d", 2)
    fail(conn, c2, "w")
    assert state(conn, "d") == "dead"

    assert ok(run, "restart", "d") == "Job d restarted with max_retries = 1\n"
    again = claim(conn, "w", "d")
    assert again.attempt == 1  # attempts count from 0 again: the retry rule's budget is fresh
    fail(conn, again, "w")
    assert state(conn, "d") == "failed"  # not dead: one retry left in this life

    # history keeps both lives; logs numbers runs over the whole life.
    types = [e["type"] for e in json.loads(ok(run, "history", "d", "--json"))]
    assert types == ["enqueued", "claimed", "failed", "scheduled-retry", "claimed", "failed",
                     "dead", "restarted", "claimed", "failed", "scheduled-retry"]
    logs = ok(run, "logs", "d")
    assert "=== attempt 1 on worker w" in logs
    assert "=== attempt 2 on worker w" in logs
    assert "=== run 3, attempt 1 on worker w" in logs
    runs = json.loads(ok(run, "logs", "d", "--json"))
    assert [(r["run"], r["attempt"]) for r in runs] == [(1, 1), (2, 2), (3, 1)]


def test_restart_of_a_completed_and_a_cancelled_job(run, conn):
    added(run, "--id", "done", "-c", "true")
    complete(conn, claim(conn, "w", "done"), "w", 0.1, output="one\n")
    added(run, "--id", "gone", "-c", "true")
    ok(run, "cancel", "gone")
    for job_id, was in (("done", "completed"), ("gone", "cancelled")):
        assert ok(run, "restart", job_id) == f"Job {job_id} restarted with max_retries = 3\n"
        assert (state(conn, job_id), job(conn, job_id).attempts) == ("pending", 0)
        (restarted,) = rows(conn, "restarted", job_id)
        assert (restarted["previous"], restarted["max_retries"]) == (was, 3)
    c = claim(conn, "w", "done")
    assert c.attempt == 1
    complete(conn, c, "w", 0.1, output="two\n")
    logs = ok(run, "logs", "done")
    assert logs.index("one") < logs.index("=== run 2, attempt 1") < logs.index("two")
    assert "restarted" in ok(run, "history", "done")


def test_restart_refuses_unfinished_jobs_and_unknown_ids(run, conn):
    added(run, "--id", "pend", "-c", "true")
    added(run, "--id", "sched", "--delay", "3600", "-c", "true")
    added(run, "--id", "wait", "--after", "sched", "-c", "true")
    added(run, "--id", "runs", "-p", "9", "-c", "true")
    claim(conn, "w", "runs")
    added(run, "--id", "retry", "-p", "8", "--backoff-base", "100", "-c", "false")
    fail(conn, claim(conn, "w", "retry"), "w")
    for job_id, was in (("pend", "pending"), ("sched", "scheduled"), ("wait", "waiting"),
                        ("runs", "processing"), ("retry", "failed")):
        before = snapshot(conn)
        one_error(run("restart", job_id),
                  f"Job {job_id} is {was}; only completed, dead or cancelled jobs can be "
                  "restarted")
        assert snapshot(conn) == before
    one_error(run("restart", "nope"), "Job 'nope' not found")


def test_restart_respects_the_unique_key(run, conn):
    added(run, "--id", "a", "--unique-key", "k", "-c", "true")
    complete(conn, claim(conn, "w", "a"), "w", 0.1)
    added(run, "--id", "b", "--unique-key", "k", "-c", "true")
    before = snapshot(conn)
    one_error(run("restart", "a"),
              "Job a cannot be restarted: unique key 'k' is held by unfinished job 'b'")
    assert snapshot(conn) == before
    complete(conn, claim(conn, "w", "b"), "w", 0.1)
    ok(run, "restart", "a")
    assert state(conn, "a") == "pending"


def test_dependents_are_not_blocked_again(run, conn):
    """A completed job restarted: the jobs it released stay released (here: completed);
    a dead job's waiting dependents are released once its new life completes."""
    added(run, "--id", "up", "-c", "true")
    added(run, "--id", "down", "--after", "up", "-c", "true")
    complete(conn, claim(conn, "w", "up"), "w", 0.1)
    assert state(conn, "down") == "pending"
    ok(run, "restart", "up")
    assert state(conn, "down") == "pending"  # not waiting again
    complete(conn, claim(conn, "w", "up"), "w", 0.1)  # oldest first: its enqueue came first
    complete(conn, claim(conn, "w", "down"), "w", 0.1)
    assert state(conn, "down") == "completed"

    added(run, "--id", "dead", "--max-retries", "0", "-c", "false")
    added(run, "--id", "after", "--after", "dead", "-c", "true")
    fail(conn, claim(conn, "w", "dead"), "w")
    assert state(conn, "after") == "waiting"
    ok(run, "restart", "dead")
    events = complete(conn, claim(conn, "w", "dead"), "w", 0.1)
    assert ev.Unblocked(job_id="after", completed="dead", by="w") in events
    assert state(conn, "after") == "pending"


def test_python_api_restart(db, conn):
    with Queue(db) as queue:
        job_id = queue.enqueue("true")
        complete(conn, claim(conn, "w", job_id), "w", 0.1)
        queue.restart(job_id)
        assert queue.get(job_id)["state"] == "pending"
