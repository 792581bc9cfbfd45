"""Every command as a user types it: exact messages, exit codes, and what lands in the ledger.

Rich tables wrap at 80 columns under CliRunner, so tables are checked line by line for the
values they must show; seed-style messages are checked as exact text.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import by_hand, events_of, queuectl_cmd, rescued

import projections
from queuectl import actor, claims, decisions, ledger, limits, render, settings
from queuectl import events as ev

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
ISO_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3,}Z$")
MADE_ID = re.compile(r"^Job added successfully with ID: ([1-9][0-9]*)\n$")

DEFAULT_CONFIG = """\
===== CONFIGURATION =====
max-retries = 3
Maximum retry attempts before moving to DLQ
backoff-base = 2
Retry delays: 2s, 4s, 8s, 16s...
backoff-max = 0
Longest wait before one retry, in seconds (0 = no cap)
backoff-jitter = 0
Fraction (0..1) by which a retry delay may be randomly shortened
job-timeout = 0
Seconds a job may run before it is killed (0 = no limit)
heartbeat-interval = 10
Seconds between a worker's heartbeats
lease-timeout = 30
Seconds without a heartbeat before a worker's job is taken back
output-limit = 4
KiB of output (its tail) kept per run
log-limit = 10485760
Bytes of each run's output kept whole (10 MiB; then its end; 0 = its tail only)
memory-limit = 0
Address space each process of a new job may use (0 = no limit)
cpu-time-limit = 0
CPU seconds each process of a new job may use (0 = no limit)
open-files-limit = 0
Files each process of a new job may hold open (0 = no limit)
=========================
"""

ROOT = Path(__file__).resolve().parent.parent


def ok(result) -> str:
    """The stdout of a command that must have succeeded quietly on stderr."""
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def jobs_json(run, *args: str) -> list[dict]:
    return json.loads(ok(run("list", "--json", *args)))


def job(run, job_id: str) -> dict:
    (found,) = [j for j in jobs_json(run) if j["id"] == job_id]
    return found


def count_events(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM events").fetchone()[0]


def make_dead(conn: sqlite3.Connection, job_id: str, command: str = "exit 1") -> None:
    """A job that failed its only allowed run, through the queue's own decisions."""
    decisions.enqueue(conn, [decisions.JobSpec(command=command, id=job_id, max_retries=0)])
    claim = claims.claim(conn, "w-test")
    assert claim is not None and claim.job_id == job_id
    failed = ev.Failed(
        job_id=job_id, worker_id="w-test", attempt=claim.attempt, exit_code=1, error="exit status 1"
    )
    claims.finish(conn, claim, failed)


# -- config --------------------------------------------------------------------------------


def test_config_get_shows_defaults(run, conn):
    assert ok(run("config", "get")) == DEFAULT_CONFIG


def test_config_set_max_retries(run):
    assert ok(run("config", "set", "max-retries", "5")) == (
        "Configuration updated: max-retries = 5\n"
        "Jobs will retry up to 5 times before moving to DLQ\n"
    )
    assert ok(run("config", "get")) == DEFAULT_CONFIG.replace("max-retries = 3", "max-retries = 5")


def test_config_set_backoff_base(run):
    assert ok(run("config", "set", "backoff-base", "2")) == (
        "Configuration updated: backoff-base = 2\nRetry delays will be: 2s, 4s, 8s, 16s...\n"
    )
    assert ok(run("config", "set", "backoff-base", "3")) == (
        "Configuration updated: backoff-base = 3\nRetry delays will be: 3s, 9s, 27s, 81s...\n"
    )
    assert "backoff-base = 3\nRetry delays: 3s, 9s, 27s, 81s...\n" in ok(run("config", "get"))


def test_config_set_stores_canonical_value(run, conn):
    assert ok(run("config", "set", "backoff-base", "2.0")).startswith(
        "Configuration updated: backoff-base = 2\n"
    )
    assert ok(run("config", "set", "max-retries", " 07 ")).startswith(
        "Configuration updated: max-retries = 7\n"
    )
    bodies = [
        json.loads(b)
        for (b,) in conn.execute(
            "SELECT body FROM events WHERE type = 'config-changed' ORDER BY seq"
        )
    ]
    assert bodies == [
        {"type": "config-changed", "key": "backoff-base", "value": "2", "by": actor.person()},
        {"type": "config-changed", "key": "max-retries", "value": "7", "by": actor.person()},
    ]


def test_config_get_one_key(run):
    run("config", "set", "max-retries", "5")
    assert ok(run("config", "get", "max-retries")) == (
        "===== CONFIGURATION =====\n"
        "max-retries = 5\n"
        "Maximum retry attempts before moving to DLQ\n"
        "=========================\n"
    )
    assert ok(run("config", "get", "backoff-base")) == (
        "===== CONFIGURATION =====\n"
        "backoff-base = 2\n"
        "Retry delays: 2s, 4s, 8s, 16s...\n"
        "=========================\n"
    )


def test_config_get_json(run):
    run("config", "set", "max-retries", "5")
    assert json.loads(ok(run("config", "get", "--json"))) == {
        "max-retries": 5,
        "backoff-base": 2,
        "job-timeout": 0,
        "backoff-max": 0,
        "backoff-jitter": 0,
        "heartbeat-interval": 10,
        "lease-timeout": 30,
        "output-limit": 4,
        "log-limit": 10485760,
        "memory-limit": 0,
        "cpu-time-limit": 0,
        "open-files-limit": 0,
    }
    assert json.loads(ok(run("config", "get", "max-retries", "--json"))) == {"max-retries": 5}
    run("config", "set", "backoff-base", "1.5")
    assert json.loads(ok(run("config", "get", "backoff-base", "--json"))) == {"backoff-base": 1.5}


def test_config_set_changes_new_jobs_only(run, conn):
    run("enqueue", "-c", "exit 1", "--id", "old")
    run("config", "set", "max-retries", "1")
    run("config", "set", "backoff-base", "3")
    run("enqueue", "-c", "exit 1", "--id", "new")
    assert (job(run, "old")["max_retries"], job(run, "old")["backoff_base"]) == (3, 2.0)
    assert (job(run, "new")["max_retries"], job(run, "new")["backoff_base"]) == (1, 3.0)

    # The old job's first failure still waits 2 ** 1 s, the new one's 3 ** 1 s.
    for job_id in ("old", "new"):
        claim = claims.claim(conn, "w-test")
        assert claim is not None and claim.job_id == job_id
        claims.finish(
            conn,
            claim,
            ev.Failed(
                job_id=job_id, worker_id="w-test", attempt=1, exit_code=1, error="exit status 1"
            ),
        )
    delays = {
        e["job_id"]: e["delay"]
        for e in json.loads(ok(run("history", "old", "--json")))
        + json.loads(ok(run("history", "new", "--json")))
        if e["type"] == "scheduled-retry"
    }
    assert delays == {"old": 2.0, "new": 3.0}
    assert [j["state"] for j in jobs_json(run)] == ["failed", "failed"]


# -- enqueue -------------------------------------------------------------------------------


def test_enqueue_command_with_id(run, conn):
    assert ok(run("enqueue", "-c", "echo Hello World", "--id", "job1")) == (
        "Job added successfully with ID: job1\n"
    )
    assert events_of(conn, "job1") == ["enqueued"]
    j = job(run, "job1")
    assert (j["command"], j["state"], j["attempts"], j["max_retries"]) == (
        "echo Hello World",
        "pending",
        0,
        3,
    )


def test_enqueue_random_id(run, conn):
    first = MADE_ID.match(ok(run("enqueue", "-c", "echo Hello World")))
    second = MADE_ID.match(ok(run("enqueue", "--command", "echo again")))
    assert first and second
    assert first[1] != second[1]
    assert [j["id"] for j in jobs_json(run)] == [first[1], second[1]]
    assert events_of(conn, first[1]) == ["enqueued"]


def test_enqueue_options(run):
    ok(run("enqueue", "-c", "sleep 1", "--id", "j1", "--max-retries", "5", "--timeout", "2.5"))
    ok(run("enqueue", "-c", "sleep 1", "--id", "j0", "--max-retries", "0"))
    j1, j0 = job(run, "j1"), job(run, "j0")
    assert (j1["max_retries"], j1["timeout"]) == (5, 2.5)
    assert (j0["max_retries"], j0["timeout"]) == (0, 0.0)


def test_enqueue_json_object(run):
    assert ok(run("enqueue", '{"id":"job1","command":"sleep 2"}')) == (
        "Job added successfully with ID: job1\n"
    )
    j = job(run, "job1")
    assert (j["command"], j["state"], j["max_retries"]) == ("sleep 2", "pending", 3)


def test_enqueue_json_all_fields_and_random_id(run):
    out = ok(run("enqueue", '{"command":"echo x","max_retries":1,"timeout":4}'))
    match = MADE_ID.match(out)
    assert match
    j = job(run, match[1])
    assert (j["command"], j["max_retries"], j["timeout"]) == ("echo x", 1, 4.0)


def test_enqueue_json_flags_override_fields(run):
    ok(
        run(
            "enqueue",
            '{"id":"a","command":"echo x","max_retries":1}',
            "--id",
            "b",
            "--max-retries",
            "4",
        )
    )
    assert [(j["id"], j["max_retries"]) for j in jobs_json(run)] == [("b", 4)]


def test_enqueue_file(run, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"id":"f1","command":"echo one"}\n'
        "\n"
        '{"id":"f2","command":"echo two","max_retries":0}\n'
        '{"command":"echo three"}\n'
    )
    assert ok(run("enqueue", "--file", str(path))) == "3 jobs added successfully.\n"
    jobs = jobs_json(run)
    assert [j["command"] for j in jobs] == ["echo one", "echo two", "echo three"]
    assert [j["id"] for j in jobs][:2] == ["f1", "f2"]
    assert re.fullmatch(r"[1-9][0-9]*", jobs[2]["id"])
    assert jobs[1]["max_retries"] == 0


def test_a_big_file_keeps_every_character_of_every_field(run, tmp_path):
    """Over 100 jobs go in by PostgreSQL's COPY, written as its text format: tabs, newlines,
    carriage returns, backslashes and a literal \\N must come back exactly as given."""
    awkward = ["tab\there", "two\nlines", "cr\rhere", "back\\slash", "\\N", "\\", "ünï 漢",
               "plain"]
    lines = [json.dumps({"id": f"k{n}", "command": awkward[n % len(awkward)],
                         "timeout": 0.1 * n, "priority": n % 7, "backoff_base": 1.5})
             for n in range(160)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert ok(run("enqueue", "--file", str(path))) == "160 jobs added successfully.\n"
    for n in (0, 1, 2, 3, 4, 5, 6, 7, 99, 159):
        shown = job(run, f"k{n}")
        assert shown["command"] == awkward[n % len(awkward)]
        assert shown["timeout"] == 0.1 * n and shown["priority"] == n % 7
        assert shown["backoff_base"] == 1.5


def test_enqueue_file_from_stdin(run, conn):
    lines = "".join(f'{{"id":"s{n}","command":"echo {n}"}}\n' for n in range(5))
    assert ok(run("enqueue", "--file", "-", input=lines)) == "5 jobs added successfully.\n"
    assert [j["id"] for j in jobs_json(run)] == [f"s{n}" for n in range(5)]
    assert count_events(conn) == 5


def test_enqueue_duplicate_id_writes_nothing(run, conn):
    ok(run("enqueue", "-c", "echo one", "--id", "j1"))
    before = count_events(conn)
    result = run("enqueue", "-c", "echo two", "--id", "j1")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "Error: Job with ID 'j1' already exists\n"
    assert count_events(conn) == before
    assert job(run, "j1")["command"] == "echo one"


def test_enqueue_file_with_existing_id_writes_nothing(run, conn, tmp_path):
    ok(run("enqueue", "-c", "echo one", "--id", "j1"))
    before = count_events(conn)
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id":"new1","command":"echo"}\n{"id":"j1","command":"echo"}\n')
    result = run("enqueue", "--file", str(path))
    assert result.exit_code == 1
    assert result.stderr == "Error: Job with ID 'j1' already exists\n"
    assert count_events(conn) == before
    assert [j["id"] for j in jobs_json(run)] == ["j1"]


# -- list ----------------------------------------------------------------------------------


def test_list_json_fields(run):
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    (j,) = jobs_json(run)
    for key in ("id", "command", "state", "attempts", "max_retries", "created_at", "updated_at"):
        assert key in j
    assert (j["id"], j["command"], j["state"], j["attempts"], j["max_retries"]) == (
        "j1",
        "echo hi",
        "pending",
        0,
        3,
    )
    assert ISO_UTC.match(j["created_at"]), j["created_at"]
    assert ISO_UTC.match(j["updated_at"]), j["updated_at"]
    assert j["created_at"] <= j["updated_at"]


def test_list_filters_and_limits(run, conn):
    make_dead(conn, "d1")
    for n in range(1, 4):
        ok(run("enqueue", "-c", f"echo {n}", "--id", f"p{n}"))
    assert [j["id"] for j in jobs_json(run)] == ["d1", "p1", "p2", "p3"]
    assert [j["id"] for j in jobs_json(run, "-s", "pending")] == ["p1", "p2", "p3"]
    assert [j["id"] for j in jobs_json(run, "--state", "dead")] == ["d1"]
    assert jobs_json(run, "-s", "completed") == []
    assert [j["id"] for j in jobs_json(run, "--limit", "2")] == ["d1", "p1"]
    assert [j["id"] for j in jobs_json(run, "-s", "pending", "--limit", "1")] == ["p1"]


def test_list_table(run):
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    ok(run("enqueue", "-c", "sleep 2", "--id", "j2", "--max-retries", "5"))
    lines = ok(run("list")).splitlines()
    assert lines[0].strip() == "Jobs"
    header = next(line for line in lines if "ID" in line)
    assert header.split()[:2] == ["ID", "State"]
    row1 = next(line for line in lines if line.split()[:1] == ["j1"])
    row2 = next(line for line in lines if line.split()[:1] == ["j2"])
    # Attempts read runs started / runs allowed (1 + max_retries).
    assert row1.split()[:5] == ["j1", "pending", "0/4", "echo", "hi"]
    assert row2.split()[:5] == ["j2", "pending", "0/6", "sleep", "2"]


def test_list_cuts_a_huge_command_that_show_and_json_give_whole(run):
    command = "echo " + "y" * 50_000
    ok(run("enqueue", "-c", command, "--id", "huge"))
    listing = ok(run("list"))
    assert len(listing) < 2_000
    assert "…(49,706morecharacters)" in "".join(listing.split())  # 50,005 - 299, unwrapped
    assert jobs_json(run)[0]["command"] == command
    assert "".join(command.split()) in "".join(ok(run("show", "huge")).split())


def test_list_table_filtered_and_empty(run, conn):
    assert ok(run("list")) == "Jobs: no jobs\n"
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    assert ok(run("list", "-s", "dead")) == "Jobs (dead): no jobs\n"
    out = ok(run("list", "-s", "pending"))
    assert out.splitlines()[0].strip() == "Jobs (pending)"
    assert "j1" in out


# -- status --------------------------------------------------------------------------------


def test_status_text(run, conn):
    make_dead(conn, "d1")
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    assert ok(run("status")) == (
        "Jobs  pending: 1  scheduled: 0  waiting: 0  processing: 0  completed: 0  failed: 0  "
        "dead: 1  cancelled: 0  (total: 2)\n"
        "Workers: none active\n"
    )


def test_status_json(run, conn):
    make_dead(conn, "d1")
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    ok(run("enqueue", "-c", "echo hi", "--id", "j2"))
    data = json.loads(ok(run("status", "--json")))
    assert data["jobs"] == {
        "pending": 2, "scheduled": 0, "waiting": 0, "processing": 0, "completed": 0,
        "failed": 0, "dead": 1, "cancelled": 0,
    }
    assert data["workers"] == []


def test_status_shows_active_worker(run, conn):
    claims.worker_started(conn, 4242, "build-01", worker_id="wk000001")
    data = json.loads(ok(run("status", "--json")))
    (w,) = data["workers"]
    assert (w["id"], w["state"], w["pid"], w["host"]) == ("wk000001", "active", 4242, "build-01")
    assert ISO_UTC.match(w["last_heartbeat"])
    row = next(line for line in ok(run("status")).splitlines() if "wk000001" in line)
    assert row.split()[:5] == ["wk000001", "active", "build-01", "4242", "-"]
    claims.worker_stopped(conn, "wk000001", "test over")
    data = json.loads(ok(run("status", "--json")))
    assert data["workers"] == []
    assert data["worker_counts"] == {"active": 0, "silent": 0, "stopped": 1, "gone": 0}


def test_status_lists_running_workers_and_only_counts_the_rest(run, conn):
    """After a long life the workers table holds hundreds that stopped or were declared
    gone; status shows the running ones and a count of the others."""
    for n in range(240):
        claims.worker_started(conn, n, "old-host", worker_id=f"old{n}")
        if n % 3:
            claims.worker_stopped(conn, f"old{n}", "done")
    silent = [f"old{n}" for n in range(0, 240, 3)]
    taken = rescued(conn, 30)
    assert len(taken) == len(silent)
    claims.worker_started(conn, 1, "here", worker_id="live1")
    out = ok(run("status"))
    assert "Workers: 1 active, 0 silent (160 stopped, 80 gone, not shown)\n" in out
    assert "live1" in out and "old1" not in out
    data = json.loads(ok(run("status", "--json")))
    assert [w["id"] for w in data["workers"]] == ["live1"]
    assert data["worker_counts"] == {"active": 1, "silent": 0, "stopped": 160, "gone": 80}


# -- dlq -----------------------------------------------------------------------------------


def test_dlq_list_empty(run, conn):
    assert ok(run("dlq", "list")) == "Dead letter queue is empty\n"
    assert json.loads(ok(run("dlq", "list", "--json"))) == []


def test_dlq_list(run, conn):
    make_dead(conn, "d1")
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    (dead,) = json.loads(ok(run("dlq", "list", "--json")))
    assert (dead["id"], dead["state"], dead["attempts"], dead["max_retries"]) == (
        "d1",
        "dead",
        1,
        0,
    )
    assert (dead["exit_code"], dead["last_error"]) == (1, "exit status 1")
    lines = ok(run("dlq", "list")).splitlines()
    assert lines[0].strip() == "Dead letter queue"
    row = next(line for line in lines if line.split()[:1] == ["d1"])
    assert row.split()[:7] == ["d1", "exit", "1", "1", "0", "exit", "status"]
    assert not any("j1" in line for line in lines)


def test_dlq_retry(run, conn):
    make_dead(conn, "d1")
    before = events_of(conn, "d1")
    assert before == ["enqueued", "claimed", "failed", "dead"]
    assert ok(run("dlq", "retry", "d1")) == "Job d1 has been requeued with max_retries = 0\n"
    j = job(run, "d1")
    assert (j["state"], j["attempts"], j["max_retries"]) == ("pending", 0, 0)
    assert events_of(conn, "d1") == [*before, "requeued"]
    assert json.loads(ok(run("dlq", "list", "--json"))) == []


def test_dlq_retry_keeps_the_jobs_own_max_retries(run, conn):
    """The fresh budget is the job's own max_retries, not today's config value."""
    with ledger.write(conn):
        ledger.append(
            conn,
            ev.Enqueued(job_id="d2", command="exit 3", max_retries=2, backoff_base=2.0),
            ev.Claimed(job_id="d2", worker_id="w-test", attempt=1),
            ev.Failed(
                job_id="d2", worker_id="w-test", attempt=1, exit_code=3, error="exit status 3"
            ),
            ev.Dead(job_id="d2", attempts=1, reason="exit status 3"),
        )
    ok(run("config", "set", "max-retries", "7"))
    assert ok(run("dlq", "retry", "d2")) == "Job d2 has been requeued with max_retries = 2\n"
    j = job(run, "d2")
    assert (j["state"], j["attempts"], j["max_retries"]) == ("pending", 0, 2)


def test_dlq_retry_reruns_the_job(run):
    """Through a real worker run: dead, requeued, then run again (the seed's retry never did)."""
    ok(run("enqueue", "-c", "exit 1", "--id", "d1", "--max-retries", "0"))
    assert run("worker", "--burst").exit_code == 0
    assert job(run, "d1")["state"] == "dead"
    assert ok(run("dlq", "retry", "d1")) == "Job d1 has been requeued with max_retries = 0\n"
    assert run("worker", "--burst").exit_code == 0
    j = job(run, "d1")
    assert (j["state"], j["attempts"]) == ("dead", 1)
    types = [e["type"] for e in json.loads(ok(run("history", "d1", "--json")))]
    assert types == [
        "enqueued",
        "claimed",
        "failed",
        "dead",
        "requeued",
        "claimed",
        "failed",
        "dead",
    ]


# -- history -------------------------------------------------------------------------------


def test_history_json(run, conn):
    make_dead(conn, "d1")
    ok(run("dlq", "retry", "d1"))
    events = json.loads(ok(run("history", "d1", "--json")))
    assert [e["type"] for e in events] == ["enqueued", "claimed", "failed", "dead", "requeued"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for e in events:
        assert ISO_UTC_MS.match(e["at"]), e["at"]
        assert e["job_id"] == "d1"
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    enqueued, claimed, failed, dead, requeued = events
    assert (enqueued["command"], enqueued["max_retries"], enqueued["backoff_base"]) == (
        "exit 1",
        0,
        2.0,
    )
    assert (claimed["worker_id"], claimed["attempt"]) == ("w-test", 1)
    assert (failed["exit_code"], failed["error"], failed["attempt"]) == (1, "exit status 1", 1)
    assert (dead["attempts"], dead["reason"]) == (1, "exit status 1")
    assert requeued["max_retries"] == 0
    stored = conn.execute("SELECT seq FROM events WHERE job_id = 'd1' ORDER BY seq").fetchall()
    assert seqs == [s for (s,) in stored]


def test_history_table(run, conn):
    make_dead(conn, "d1")
    lines = ok(run("history", "d1")).splitlines()
    assert lines[0].strip() == "History of job d1"
    types = [line.split()[3] for line in lines if re.match(r"^\s+\d+\s+\d{4}-", line)]
    assert types == ["enqueued", "claimed", "failed", "dead"]
    claimed = next(line for line in lines if " claimed " in line)
    assert "w-test" in claimed and "attempt 1" in claimed
    assert "moved to the DLQ after 1 attempt: exit status 1" in " ".join(" ".join(lines).split())


# -- workers -------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("worker", "--stop"), ("worker", "stop")])
def test_worker_stop(run, conn, args):
    assert ok(run(*args)) == "Stop signal sent to all workers.\n"
    assert conn.execute("SELECT type, job_id FROM events").fetchall() == [("stop-requested", None)]


def test_worker_burst_prints_seed_lines(run):
    ok(run("enqueue", "-c", "true", "--id", "ok1"))
    out = ok(run("worker", "--burst", "-v"))
    worker_id = re.match(r"^Worker started: (\S+)\n", out)
    assert worker_id, out
    assert f"[{worker_id[1]}] Picked up NEW job: ok1 (Command: true)" in out
    assert job(run, "ok1")["state"] == "completed"


# -- rebuild -------------------------------------------------------------------------------


def test_rebuild(run, conn):
    make_dead(conn, "d1")
    ok(run("enqueue", "-c", "echo hi", "--id", "j1"))
    n = count_events(conn)
    before = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    assert ok(run("rebuild")) == f"Projections rebuilt from {n} events.\n"
    assert conn.execute("SELECT * FROM jobs ORDER BY id").fetchall() == before
    assert count_events(conn) == n
    assert ok(run("rebuild", "--check")) == "Projections match the ledger.\n"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE jobs SET state = 'completed' WHERE id = 'j2'", "jobs: row 'j2' differs"),
        ("DELETE FROM jobs WHERE id = 'j1'", "jobs: row 'j1' is in the replay but not live"),
        (
            "UPDATE job_counts SET n = 7 WHERE state = 'pending'",
            "job_counts: row ('default', 'pending') differs",
        ),
        (
            "INSERT INTO config (key, value, updated_at) VALUES ('max-retries', '9', 'x')",
            "config: row 'max-retries' is live but not in the replay",
        ),
    ],
)
def test_rebuild_check_finds_drift(run, db, sql, expected):
    ok(run("enqueue", "-c", "echo 1", "--id", "j1"))
    ok(run("enqueue", "-c", "echo 2", "--id", "j2"))
    with by_hand(db) as conn:
        conn.execute(sql)
    result = run("rebuild", "--check")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert expected in result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: projections drift")
    # rebuild repairs the drift (and leaves the database clean for the replay fixture)
    ok(run("rebuild"))
    assert ok(run("rebuild", "--check")) == "Projections match the ledger.\n"


def test_rebuild_check_names_the_changed_column(run, db):
    ok(run("enqueue", "-c", "echo 1", "--id", "j1"))
    with by_hand(db) as conn:
        conn.execute("UPDATE jobs SET attempts = 5 WHERE id = 'j1'")
    result = run("rebuild", "--check")
    assert result.exit_code == 1
    assert "jobs: row 'j1' differs (attempts: live 5, replayed 0)" in result.stderr
    ok(run("rebuild"))


# -- where the database lives --------------------------------------------------------------


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_db_option(run, db, tmp_path):
    other = tmp_path / "elsewhere" / "other.db"
    ok(run("--db", str(other), "enqueue", "-c", "echo hi", "--id", "x1"))
    assert other.exists()
    assert not db.exists()
    assert [j["id"] for j in json.loads(ok(run("--db", str(other), "list", "--json")))] == ["x1"]
    assert not db.exists()  # QUEUECTL_DB's database is a different one, still not made


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_queuectl_db_env(run, tmp_path, monkeypatch):
    path = tmp_path / "env.db"
    monkeypatch.setenv("QUEUECTL_DB", str(path))
    ok(run("enqueue", "-c", "echo hi", "--id", "e1"))
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT id FROM jobs").fetchall() == [("e1",)]
    # --db wins over the environment
    flag = tmp_path / "flag.db"
    ok(run("--db", str(flag), "enqueue", "-c", "echo hi", "--id", "f1"))
    with sqlite3.connect(flag) as raw:
        assert raw.execute("SELECT id FROM jobs").fetchall() == [("f1",)]
    assert [j["id"] for j in jobs_json(run)] == ["e1"]


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_default_path_and_permissions(run, tmp_path, monkeypatch):
    monkeypatch.delenv("QUEUECTL_DB")
    ok(run("enqueue", "-c", "echo hi", "--id", "d1"))
    path = tmp_path / "data" / "queue.db"
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [j["id"] for j in jobs_json(run)] == ["d1"]


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_every_new_directory_of_a_db_path_is_private(run, tmp_path):
    (tmp_path / "a").mkdir()
    os.chmod(tmp_path / "a", 0o755)
    path = tmp_path / "a" / "b" / "c" / "d" / "queue.db"
    ok(run("--db", str(path), "enqueue", "-c", "true"))
    for directory in (path.parent, path.parent.parent, path.parent.parent.parent):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755  # what existed is left alone


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_replay_tool_refuses_a_database_that_does_not_exist(tmp_path):
    missing = tmp_path / "nothere.db"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "replay.py"), "--db", str(missing),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == f"Error: no queuectl database at {missing} (commands that write, such as enqueue, create it)\n"
    assert not missing.exists()


def test_no_chatter_on_first_use(run):
    assert ok(run("enqueue", "-c", "echo", "--id", "a")) == ("Job added successfully with ID: a\n")


READS = [["list"], ["status"], ["show", "a"], ["logs", "a"], ["history", "a"], ["stats"],
         ["dlq", "list"], ["config", "get"], ["rebuild", "--check"], ["rebuild"],
         ["cancel", "a"], ["dlq", "retry", "a"]]


@pytest.mark.parametrize("args", READS, ids=[" ".join(a) for a in READS])
@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_a_read_never_creates_a_database(run, tmp_path, args):
    """A typo in --db must not quietly give an empty queue: only writers create one."""
    typo = tmp_path / "typo" / "q.db"
    result = run("--db", str(typo), *args)
    assert result.exit_code == 1
    assert result.stderr == f"Error: no queuectl database at {typo} (commands that write, such as enqueue, create it)\n"
    assert not typo.parent.exists()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("args", [["enqueue", "-c", "true"], ["config", "set", "max-retries", "2"],
                                  ["worker", "--stop"]])
@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_writers_create_the_database(run, tmp_path, args):
    path = tmp_path / "new" / "q.db"
    ok(run("--db", str(path), *args))
    assert path.exists()


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_an_in_memory_database_is_refused(run):
    result = run("--db", ":memory:", "enqueue", "-c", "true")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith("Error: an in-memory database (:memory:) would lose every job")


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_python_m_queuectl_help(tmp_path):
    result = subprocess.run(queuectl_cmd("--help"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    for command in ("config", "enqueue", "list", "status", "worker", "dlq", "history", "rebuild"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command
    assert result.stderr == ""
    assert not Path(tmp_path / "data").exists()  # --help touches no database


@pytest.mark.stores("sqlite")  # start-up is the same on every store
def test_commands_that_do_not_draw_never_load_rich(db):
    """rich costs start-up time: only the commands that draw tables (and status --watch)
    import it."""
    for args in (["--help"], ["status", "--help"], ["enqueue", "-c", "true"]):
        done = subprocess.run([sys.executable, "-X", "importtime", *queuectl_cmd(*args)[1:]],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                  for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "click" in loaded and "rich" not in loaded, args


@pytest.mark.stores("sqlite")  # start-up is the same on every store
def test_a_burst_worker_on_an_empty_queue_loads_only_what_it_uses(db):
    """Every worker process pays for its start-up: ``worker`` loads without the other
    commands, and a worker that runs nothing without what only runs or help need."""
    def loaded(*args: str) -> set[str]:
        done = subprocess.run([sys.executable, "-X", "importtime", *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return {line.rsplit("|", 1)[-1].strip()
                for line in done.stderr.splitlines() if line.startswith("import time:")}

    # What any queuectl command loads before its own (an editable install's import hook
    # brings pathlib, say), which no change to the worker could leave out.
    floor = loaded("-c", "import queuectl.cli_root")
    for args in (["worker", "--burst"], ["worker", "-c", "2", "--burst"]):
        worker = loaded(*queuectl_cmd(*args)[1:])
        assert {"queuectl.cli_worker", "queuectl.worker"} <= worker, args
        unused = {"queuectl.cli", "queuectl.reads", "rich", "shutil", "subprocess", "pathlib",
                  "dataclasses", "locale"}
        assert (worker - floor) & unused == set(), args


def test_the_program_keeps_its_output_exit_code_and_tidy_database(db):
    """``queuectl`` ends its process without tearing Python down (``cli.main``): what it
    printed still arrives whole through a pipe, the exit code is the command's, and its
    connection was closed first (the last close checkpoints and removes the WAL)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def program(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(queuectl_cmd(*args), capture_output=True, text=True, timeout=30,
                              env=env)

    added = program("enqueue", "-c", "echo hi", "--id", "j1")
    assert (added.returncode, added.stdout, added.stderr) == (
        0, "Job added successfully with ID: j1\n", "")
    assert not Path(f"{db}-wal").exists()
    listed = program("list", "--json")
    assert [j["command"] for j in json.loads(listed.stdout)] == ["echo hi"]
    missing = program("show", "nosuch")
    assert (missing.returncode, missing.stdout, missing.stderr) == (
        1, "", "Error: Job 'nosuch' not found\n")
    misused = program("list", "--state", "bogus")
    assert misused.returncode == 2
    assert misused.stderr.startswith("Error: ") and misused.stderr.count("\n") == 1


def test_a_profiler_still_gets_its_report(db):
    """The quick exit gives way when a tracer or profiler is on (it reports at exit)."""
    result = subprocess.run([sys.executable, "-m", "cProfile", "-m", "queuectl", "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "function calls" in result.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_one_line_on_stderr(run):
    ok(run("enqueue", "-c", "true", "--id", "j1"))
    for args in (("status",), ("list", "--json")):
        with open("/dev/full", "w") as full:
            result = subprocess.run(queuectl_cmd(*args), stdout=full, stderr=subprocess.PIPE,
                                    text=True, timeout=30)
        assert (result.returncode, result.stderr) == (1, "Error: No space left on device\n")


def test_flags_beside_a_file_apply_to_every_job(run, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"command":"echo a"}\n{"command":"echo b","priority":1}\n')
    assert ok(run("enqueue", "--file", str(jobs), "--priority", "7", "--max-retries", "1")) == (
        "2 jobs added successfully.\n"
    )
    listed = json.loads(ok(run("list", "--json")))
    assert [(j["priority"], j["max_retries"]) for j in listed] == [(7, 1), (7, 1)]
    result = run("enqueue", "--file", str(jobs), "--id", "x")
    assert result.exit_code == 2
    assert result.stderr == "Error: --id names one job; it cannot go with --file\n"
    assert len(json.loads(ok(run("list", "--json")))) == 2


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_config_set_help_names_every_key_and_its_range(run):
    out = ok(run("config", "set", "--help"))
    for key, setting in settings.SETTINGS.items():
        line = next(x for x in out.splitlines() if x.strip().startswith(key + " "))
        assert limits.describe(setting.bound) in line and f"(default {setting.default})" in line


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_rebuild_help_names_every_projection(run):
    out = " ".join(ok(run("rebuild", "--help")).split())
    assert f"({', '.join(p.NAME for p in projections.REGISTRY)})" in out


def test_a_history_longer_than_rich_draws_is_drawn_whole(run, conn, monkeypatch):
    """Past ``RICH_ROWS`` rows a table is written row by row, not laid out whole by rich
    first (bench scenario reads, history_10k), and every row is still there."""
    decisions.enqueue(conn, [decisions.JobSpec(command="exit 1", id="big", max_retries=1000)])
    wid = claims.worker_started(conn, 1, "h")
    with ledger.write(conn):
        for attempt in range(1, 201):
            ledger.append(conn, ev.Claimed(job_id="big", worker_id=wid, attempt=attempt))
            ledger.append(conn, ev.Failed(job_id="big", worker_id=wid, attempt=attempt,
                                          exit_code=1, error="exit status 1", output="x" * 90),
                          ev.ScheduledRetry(job_id="big", attempt=attempt, delay=1.0,
                                            run_at="2026-01-01T00:00:00.000000Z"))
    assert render.RICH_ROWS < 601
    monkeypatch.setenv("COLUMNS", "100")
    lines = ok(run("history", "big")).splitlines()
    assert lines[0] == "History of job big" and lines[1] == ""
    assert lines[2].split() == ["Seq", "Time", "(UTC)", "Event", "Worker", "By", "Details"]
    assert set(lines[3].strip()) == {"─"}
    assert max(map(len, lines)) <= 100
    seqs = [int(x.split()[0]) for x in lines[4:] if x[:8].strip().isdigit()]
    expected = [r[0] for r in conn.execute("SELECT seq FROM events WHERE job_id = 'big' ORDER BY seq")]
    assert seqs == expected and len(seqs) == 601
    details = lines[2].index("Details")
    first_failed = next(x for x in lines if " failed " in x)
    assert first_failed[details:].startswith("attempt 1: exit status 1")


# -- piped output ----------------------------------------------------------------------------


def test_piped_output_is_neither_padded_nor_wrapped(run, conn, monkeypatch):
    """A script reads each row as one line: piped (no terminal, no COLUMNS), a table is as
    wide as its longest row, and no line ends in the spaces that pad it to the table's
    width; the job counts line keeps its total, whatever the width."""
    monkeypatch.delenv("COLUMNS", raising=False)
    command = "echo" + " long" * 50  # wider than any terminal, shorter than a cut cell
    ok(run("enqueue", "--id", "wide", "-c", command))
    for n in range(3):
        ok(run("enqueue", "-c", "true", "-q", f"queue-with-a-long-name-{n}"))
    for args in (["list"], ["history", "wide"], ["status"], ["queues"], ["show", "wide"]):
        out = ok(run(*args))
        assert [line for line in out.splitlines() if line != line.rstrip()] == [], args
    assert any(command in line for line in ok(run("list")).splitlines())
    monkeypatch.setenv("COLUMNS", "40")
    jobs_line = ok(run("status")).splitlines()[0]
    assert jobs_line.startswith("Jobs  pending: 4") and jobs_line.endswith("(total: 4)")


def test_made_ids_are_short_numbers_listed_in_the_order_they_were_made(run, conn, db):
    """A made id is its enqueued event's seq (7, 10, 1042): listings order by seq, so
    ``10`` comes after ``9`` though it sorts before it as text."""
    from queuectl import Queue

    ids = [ok(run("enqueue", "-c", "true")).rsplit(" ", 1)[1].strip() for _ in range(12)]
    assert ids == [str(n) for n in range(1, 13)]
    assert [j["id"] for j in jobs_json(run)] == ids
    assert [j["id"] for j in jobs_json(run, "-s", "pending")] == ids
    with Queue(db) as queue:
        assert [j["id"] for j in queue.jobs()] == ids
    table = ok(run("list")).splitlines()
    assert [line.split()[0] for line in table if line.split()[:1] and
            line.split()[0].isdigit()] == ids
