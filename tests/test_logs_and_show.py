"""``logs`` and ``show``: every attempt of a job with its outcome and output, escaped for
the terminal, and one job's whole record, as text and as JSON."""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import (
    FakeClock,
    T,
    added,
    burst,
    claim,
    complete,
    fail,
    ok,
    one_error,
    rows,
    snapshot,
    state,
    workers,
)

# -- logs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logs_show_every_attempt(run, conn, tmp_path):
    counter = tmp_path / "count"
    command = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
        f"sleep 0.$n; echo \"run $n\"; test $n -ge 3 || exit $((40+n))"
    )
    job_id = added(run, "--backoff-base", "1", "--max-retries", "3", "-c", command)
    with workers() as start:
        burst(start)
    assert state(conn, job_id) == "completed"

    runs = json.loads(ok(run, "logs", job_id, "--json"))
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert [r["run"] for r in runs] == [1, 2, 3]
    assert [r["outcome"] for r in runs] == ["failed", "failed", "completed"]
    assert [r["exit_code"] for r in runs] == [41, 42, 0]
    assert [r["output"] for r in runs] == ["run 1\n", "run 2\n", "run 3\n"]
    assert [r["error"] for r in runs] == ["exit status 41", "exit status 42", None]
    assert set(runs[0]) == {"run", "attempt", "worker_id", "started_at", "finished_at",
                            "outcome", "exit_code", "duration", "output", "truncated", "error"}
    # Durations are the ones the worker recorded, and at least each run's sleep.
    recorded = [r["duration"] for r in rows(conn, "failed", job_id) + rows(conn, "completed", job_id)]
    assert [r["duration"] for r in runs] == recorded
    for n, r in enumerate(runs, 1):
        assert 0.1 * n <= r["duration"] < 0.1 * n + 10
        assert r["started_at"] <= r["finished_at"] and r["truncated"] is False
    workers_seen = {r["worker_id"] for r in rows(conn, "claimed", job_id)}
    assert {r["worker_id"] for r in runs} == workers_seen

    text = ok(run, "logs", job_id)
    headers = [line for line in text.splitlines() if line.startswith("=== attempt")]
    assert len(headers) == 3
    for n, (header, r) in enumerate(zip(headers, runs, strict=True), 1):
        assert header.startswith(f"=== attempt {n} on worker {r['worker_id']} at ")
        assert header.endswith(f", {r['duration']:.3f}s ===")
    assert "failed: exit status 41" in headers[0] and "failed: exit status 42" in headers[1]
    assert "completed" in headers[2]
    lines = text.splitlines()
    assert [lines[lines.index(h) + 1] for h in headers] == ["run 1", "run 2", "run 3"]

    only = ok(run, "logs", job_id, "--attempt", "2")
    assert [line for line in only.splitlines() if line.startswith("===")] == [headers[1]]
    assert "run 2" in only and "run 1" not in only and "run 3" not in only
    assert json.loads(ok(run, "logs", job_id, "--attempt", "2", "--json")) == [runs[1]]
    one_error(run("logs", job_id, "--attempt", "4"), f"Job {job_id} has no attempt 4")


def test_logs_escape_control_characters(run, conn):
    job_id = added(run, "-c", r"printf 'bell\007 esc\033[31mred\n'")
    with workers() as start:
        burst(start)
    (done,) = rows(conn, "completed", job_id)
    assert done["output"] == "bell\x07 esc\x1b[31mred\n"  # stored as it was
    text = ok(run, "logs", job_id)
    assert "bell\\x07 esc\\x1b[31mred" in text
    assert "\x1b" not in text and "\x07" not in text
    assert json.loads(ok(run, "logs", job_id, "--json"))[0]["output"] == "bell\x07 esc\x1b[31mred\n"


def test_logs_of_a_job_that_has_not_run(run, conn):
    job_id = added(run, "-c", "true")
    assert ok(run, "logs", job_id) == f"Job {job_id} has not run yet\n"
    assert json.loads(ok(run, "logs", job_id, "--json")) == []


# -- show -------------------------------------------------------------------------------------


def _field(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}:\s+(.*)$", text, re.MULTILINE)
    assert match, f"no {key!r} line in:\n{text}"
    return match.group(1)


def test_show_text_and_json(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    ok(run, "config", "set", "backoff-max", "30")
    ok(run, "config", "set", "backoff-jitter", "0.25")
    added(run, "--id", "dep1", "-c", "true")
    added(run, "--id", "dep2", "-c", "true")
    complete(conn, claim(conn, "w", "dep1"), "w", 0.1)
    added(run, "--id", "J", "-p", "7", "--max-retries", "2", "--backoff-base", "3",
          "--timeout", "4", "--after", "dep1", "--after", "dep2", "-c", "make report")

    text = ok(run, "show", "J")
    assert _field(text, "ID") == "J"
    assert _field(text, "Command") == "make report"
    assert _field(text, "State") == "waiting"
    assert _field(text, "Priority") == "7"
    policy = _field(text, "Retry policy")
    for part in ("max_retries 2", "backoff_base 3", "backoff_max 30", "backoff_jitter 0.25"):
        assert part in policy
    assert _field(text, "Timeout") == "4s"
    assert _field(text, "After") == "dep1 (completed), dep2 (pending)"
    assert _field(text, "Last error") == "-"
    assert _field(text, "Next run") == "after its dependencies complete"

    data = json.loads(ok(run, "show", "J", "--json"))
    assert data == {
        "id": "J", "command": "make report", "queue": "default", "state": "waiting",
        "priority": 7, "attempts": 0,
        "max_retries": 2, "backoff_base": 3.0, "backoff_max": 30.0, "backoff_jitter": 0.25,
        "timeout": 4.0, "run_at": None, "after": ["dep1", "dep2"], "unique_key": None,
        "dependencies": [{"id": "dep1", "state": "completed"}, {"id": "dep2", "state": "pending"}],
        "exit_code": None, "last_error": None, "created_at": T(0), "updated_at": T(0),
        "worker_id": None, "cancel_requested": False, "cwd": os.getcwd(), "env": {},
        "memory": None, "cpu_time": None, "open_files": None,
        "next_run": "after its dependencies complete", "runs": 0,
    }

    fake.set(2)
    complete(conn, claim(conn, "w", "dep2"), "w", 0.1)  # releases J
    assert json.loads(ok(run, "show", "J", "--json"))["next_run"] == "now (waiting for a worker)"
    fake.set(3)
    c = claim(conn, "w", "J")
    processing = json.loads(ok(run, "show", "J", "--json"))
    assert (processing["state"], processing["worker_id"]) == ("processing", "w")
    fake.set(4)
    fail(conn, c, "w", code=3)
    (retry,) = rows(conn, "scheduled-retry", "J")
    assert 3 * 0.75 <= retry["delay"] <= 3

    data = json.loads(ok(run, "show", "J", "--json"))
    assert data["state"] == "failed"
    assert data["after"] == ["dep1", "dep2"]  # a list, as in list --json
    assert data["dependencies"] == [{"id": "dep1", "state": "completed"},
                                    {"id": "dep2", "state": "completed"}]
    assert (data["last_error"], data["exit_code"]) == ("exit status 3", 3)
    assert data["run_at"] == data["next_run"] == retry["run_at"]
    assert (data["attempts"], data["runs"], data["worker_id"]) == (1, 1, None)
    text = ok(run, "show", "J")
    assert _field(text, "State") == "failed"
    assert _field(text, "Last error") == "exit status 3"
    assert _field(text, "Exit code") == "3"
    assert _field(text, "Next run") == retry["run_at"]
    assert _field(text, "After") == "dep1 (completed), dep2 (completed)"
    assert _field(text, "Runs") == "1"


def test_show_unknown_job(run, conn):
    before = snapshot(conn)
    one_error(run("show", "nope"), "'nope' not found")
    one_error(run("show", "nope", "--json"), "'nope' not found")
    assert snapshot(conn) == before
