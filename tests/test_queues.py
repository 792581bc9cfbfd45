"""Named queues (issue 13): ``enqueue --queue``, ``list -q``, ``status`` per queue, ``worker -q``
in strict order, and ``queuectl queues``. Every test runs on both stores."""

from __future__ import annotations

import json
from typing import Any

from test_features import burst, rows, workers

from queuectl import decisions, reads


def added(run: Any, *args: str) -> str:
    result = run("enqueue", *args)
    assert result.exit_code == 0, result.output
    return result.output.rsplit(" ", 1)[-1].strip()


def test_a_job_waits_in_the_queue_it_names(run, conn):
    added(run, "--id", "a", "-c", "true")
    added(run, "--id", "m", "-c", "true", "--queue", "media")
    assert run("enqueue", '{"id": "j", "command": "true", "queue": "media"}').exit_code == 0
    assert [(j["id"], j["queue"]) for j in reads.list_jobs(conn)] == \
        [("a", "default"), ("m", "media"), ("j", "media")]
    # The enqueued event says so, and history shows it (the default queue goes unsaid).
    assert [r.get("queue") for r in rows(conn, "enqueued")] == [None, "media", "media"]
    assert "queue media" in run("history", "m").output
    assert "queue default" not in run("history", "a").output

    listed = json.loads(run("list", "-q", "media", "--json").output)
    assert [(j["id"], j["queue"]) for j in listed] == [("m", "media"), ("j", "media")]
    assert [j["id"] for j in json.loads(run("list", "-q", "media", "-s", "pending",
                                            "--json").output)] == ["m", "j"]
    assert json.loads(run("list", "-q", "nothing", "--json").output) == []
    table = run("list", "-q", "media").output
    assert "Jobs (queue media)" in table and "media" in table and " a " not in table

    status = json.loads(run("status", "--json").output)
    assert status["jobs"]["pending"] == 3
    assert status["queues"]["default"]["pending"] == 1
    assert status["queues"]["media"]["pending"] == 2
    text = run("status").output
    assert "queue default  pending: 1" in text and "queue media  pending: 2" in text


def test_status_shows_no_queue_lines_while_only_the_default_queue_is_used(run):
    added(run, "-c", "true")
    assert "queue default" not in run("status").output


def test_worker_takes_its_queues_in_strict_order_and_leaves_the_others(run, conn):
    # Priority orders jobs inside a queue, never across the worker's queues.
    added(run, "--id", "d1", "-c", "true", "-p", "9")
    added(run, "--id", "h1", "-c", "true", "-q", "high")
    added(run, "--id", "l1", "-c", "true", "-q", "low", "-p", "5")
    added(run, "--id", "h2", "-c", "true", "-q", "high", "-p", "3")
    added(run, "--id", "d2", "-c", "true")
    added(run, "--id", "o1", "-c", "true", "-q", "other")

    with workers() as start:
        burst(start, "-q", "high", "-q", "default", "-q", "low")  # -c 1: one claim at a time

    assert [r["job_id"] for r in rows(conn, "claimed")] == ["h2", "h1", "d1", "d2", "l1"]
    # --burst ended with "other" still pending: it waits only for its own queues.
    assert reads.get_job(conn, "o1")["state"] == "pending"


def test_worker_without_queues_takes_every_queue_by_priority_then_age(run, conn):
    added(run, "--id", "a", "-c", "true", "-q", "x")
    added(run, "--id", "b", "-c", "true", "-q", "y", "-p", "2")
    added(run, "--id", "c", "-c", "true")
    with workers() as start:
        burst(start)
    assert [r["job_id"] for r in rows(conn, "claimed")] == ["b", "a", "c"]


def test_concurrent_workers_of_one_queue_never_touch_another(run, conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", queue="a") for _ in range(30)]
                      + [decisions.JobSpec(command="true", queue="b") for _ in range(30)])
    with workers() as start:
        burst(start, "-c", "3", "-q", "a")
    counts = reads.queue_counts(conn)
    assert counts["a"]["completed"] == 30 and counts["b"]["pending"] == 30
    assert counts["b"]["completed"] == 0


def test_queues_lists_every_queue_with_counts_and_oldest_wait(run, conn):
    added(run, "--id", "a", "-c", "true", "-q", "media")
    added(run, "--id", "b", "-c", "exit 3", "-q", "media", "--max-retries", "0")
    added(run, "--id", "c", "-c", "true", "-q", "mail")
    with workers() as start:
        burst(start, "-q", "mail")
    found = {q["queue"]: q for q in json.loads(run("queues", "--json").output)}
    assert list(found) == ["default", "mail", "media"]
    assert found["media"]["jobs"]["pending"] == 2 and found["media"]["total"] == 2
    assert found["mail"]["jobs"]["completed"] == 1 and found["mail"]["total"] == 1
    assert found["mail"]["oldest_pending_wait"] is None
    assert found["media"]["oldest_pending_wait"] >= 0
    assert found["default"]["total"] == 0

    with workers() as start:
        burst(start, "-q", "media")
    found = {q["queue"]: q for q in json.loads(run("queues", "--json").output)}
    assert found["media"]["jobs"]["dead"] == 1 and found["media"]["jobs"]["completed"] == 1
    table = run("queues").output
    assert "media" in table and "mail" in table and "Oldest pending" in table


def test_queue_counts_replay_exactly_after_jobs_move(run, conn):
    """job_counts holds a row for every state of every queue used; a replay writes the same
    rows (the fixture compares them after each test; here also by hand)."""
    added(run, "--id", "a", "-c", "exit 1", "-q", "q1", "--max-retries", "0")
    added(run, "--id", "b", "-c", "true", "-q", "q2")
    with workers() as start:
        burst(start)
    assert run("rebuild", "--check").exit_code == 0
    assert conn.execute("SELECT count(*) FROM job_counts WHERE queue = 'q1'").fetchone()[0] \
        == len(reads.STATES)
