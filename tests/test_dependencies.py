"""Dependencies (``--after``): a job waits until every job it names has completed, is
released in the transaction that records the last of them, and is cancelled with any of
them; what cannot be met (an unknown or cancelled job, itself, a cycle) is refused whole,
on the command line and in a file."""

from __future__ import annotations

import json

import pytest
from conftest import events_of
from helpers import (
    _meanwhile,
    added,
    burst,
    claim,
    complete,
    job,
    ok,
    one_error,
    rows,
    snapshot,
    state,
    table_row,
    workers,
)

from queuectl import decisions


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
