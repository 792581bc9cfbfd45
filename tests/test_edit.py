"""``edit``: a job that has not started takes new values, recorded as one ``edited`` event
holding only what changed; a running or finished job is refused; numbers are checked as
``enqueue`` checks them."""

from __future__ import annotations

import json

import pytest
from helpers import FakeClock, T, added, claim, complete, job, ok, one_error, rows, snapshot

from queuectl import actor


def test_a_pending_job_takes_the_new_values_and_the_event_holds_only_those(run, conn,
                                                                           tmp_path):
    (tmp_path / "app").mkdir()
    added(run, "-c", "echo old", "--id", "j", "--env", "KEEP=1", "--env", "CHANGE=a",
          "--priority", "1")
    out = ok(run, "edit", "j", "-c", "echo new", "-p", "1", "-q", "media", "--max-retries", "0",
             "--timeout", "30", "--cwd", "app", "--env", "CHANGE=b", "--env", "KEEP=1",
             "--env", "NEW=x")
    assert out == ("Job j edited: command echo new; queue media; max_retries 0; timeout 30s; "
                   f"directory {tmp_path}/app; env CHANGE=b NEW=x.\n")
    (edited,) = rows(conn, "edited", "j")
    assert {k: v for k, v in edited.items() if k not in ("seq", "at")} == {
        "type": "edited", "job_id": "j", "command": "echo new", "queue": "media",
        "max_retries": 0, "timeout": 30.0, "cwd": f"{tmp_path}/app",
        "env": {"CHANGE": "b", "NEW": "x"},  # the priority did not change
        "by": actor.person()}
    shown = json.loads(ok(run, "show", "j", "--json"))
    assert {k: shown[k] for k in ("command", "queue", "priority", "max_retries", "timeout",
                                  "cwd", "env", "state")} == {
        "command": "echo new", "queue": "media", "priority": 1, "max_retries": 0,
        "timeout": 30.0, "cwd": f"{tmp_path}/app",
        "env": {"CHANGE": "b", "KEEP": "1", "NEW": "x"}, "state": "pending"}
    # The job moved queue: the counts moved with it.
    counts = json.loads(ok(run, "status", "--json"))["queues"]
    assert (counts["default"]["pending"], counts["media"]["pending"]) == (0, 1)
    assert "changed: command echo new; queue media" in ok(run, "history", "j")
    assert ok(run, "edit", "j", "-p", "1") == "Job j unchanged: it has these values already.\n"
    assert len(rows(conn, "edited", "j")) == 1


def test_times_move_a_job_between_pending_and_scheduled(run, conn, monkeypatch):
    clock = FakeClock(monkeypatch, start=100)
    added(run, "-c", "true", "--id", "j")
    added(run, "-c", "true", "--id", "first", "--delay", "5")
    added(run, "-c", "true", "--id", "after", "--after", "first")
    ok(run, "edit", "j", "--delay", "60")
    assert (job(conn, "j").state, job(conn, "j").run_at) == ("scheduled", T(160))
    clock.set(110)
    ok(run, "edit", "j", "--run-at", "2020-01-01T00:00:00")  # a time gone by: now
    assert (job(conn, "j").state, job(conn, "j").run_at) == ("pending", T(110))
    ok(run, "edit", "j", "--delay", "30", "-q", "later")  # state and queue in one change
    assert (job(conn, "j").state, job(conn, "j").queue) == ("scheduled", "later")
    counts = json.loads(ok(run, "status", "--json"))["queues"]
    assert (counts["default"]["pending"], counts["later"]["scheduled"]) == (0, 1)
    ok(run, "edit", "after", "--delay", "0", "-p", "4")  # it still waits for "first"
    assert (job(conn, "after").state, job(conn, "after").priority) == ("waiting", 4)


@pytest.mark.parametrize("args, message", [
    (("--priority", "high"), "Invalid value for '-p' / '--priority'"),
    (("--max-retries", "-1"), "Invalid value for '--max-retries'"),
    (("--timeout", "nan"), "Invalid value for '--timeout'"),
    (("--delay", "1", "--run-at", "2030-01-01"), "give run_at or delay, not both"),
    (("--run-at", "tomorrow"), "is not an ISO-8601 time"),
    (("-c", " "), "command is empty"),
    (("-q", "bad queue"), "queue 'bad queue' must be"),
    ((), "give at least one new value"),
])
def test_bad_values_are_one_error_and_nothing_is_written(run, conn, args, message):
    added(run, "-c", "true", "--id", "j")
    before = snapshot(conn)
    one_error(run("edit", "j", *args), message)
    assert snapshot(conn) == before


def test_a_running_or_finished_job_is_refused(run, conn):
    added(run, "-c", "true", "--id", "running")
    added(run, "-c", "true", "--id", "done")
    c = claim(conn, "w1", "running")
    assert c is not None
    complete(conn, claim(conn, "w1", "done"), "w1", 0.1)  # type: ignore[arg-type]
    ok(run, "cancel", "running")  # asks its worker; it is still processing
    added(run, "-c", "true", "--id", "gone")
    ok(run, "cancel", "gone")
    before = snapshot(conn)
    for job_id, state in (("running", "processing"), ("done", "completed"),
                          ("gone", "cancelled")):
        one_error(run("edit", job_id, "-p", "3"),
                  f"Job {job_id} is {state}; only pending, scheduled or waiting jobs")
    one_error(run("edit", "nosuch", "-p", "3"), "Job 'nosuch' not found")
    assert snapshot(conn) == before
