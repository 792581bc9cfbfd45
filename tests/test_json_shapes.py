"""What scripts read: every ``--json`` output, and what the Python API returns, locked byte for
byte against files recorded in tests/data/json/, on both stores.

One queue holds jobs in every state, runs of every outcome, workers active, silent, stopped
and gone, a paused and limited queue, a schedule and a changed setting, all built under a
fake clock with fixed ids, so every output is the same on every run and on either store.
The only thing normalised is where the database and its archive are.

To record the files anew (only when an output is meant to change, and say so in the
commit): ``QUEUECTL_RECORD_JSON=1 python -m pytest tests/test_json_shapes.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import rescued
from helpers import FakeClock, ok

from queuectl import Queue, actor, claims, clock
from queuectl import events as ev

RECORDED = Path(__file__).parent / "data" / "json"
RECORD = bool(os.environ.get("QUEUECTL_RECORD_JSON"))
PLAIN = (str, int, float, bool, type(None))


def _claim(conn: Any, worker_id: str, expect: str) -> claims.Claim:
    got = claims.claim(conn, worker_id)
    assert got is not None and got.job_id == expect, got
    return got


def _done(conn: Any, c: claims.Claim, worker_id: str, duration: float, output: str) -> None:
    claims.finish(conn, c, ev.Completed(job_id=c.job_id, worker_id=worker_id, attempt=c.attempt,
                                        duration=duration, output=output))


def _failed(conn: Any, c: claims.Claim, worker_id: str, code: int, output: str = "") -> None:
    claims.finish(conn, c, ev.Failed(job_id=c.job_id, worker_id=worker_id, attempt=c.attempt,
                                     exit_code=code, error=f"exit status {code}",
                                     duration=0.25, output=output, truncated=bool(output)))


def build(run: Any, conn: Any, fake: FakeClock) -> None:
    """A queue with a job in every state and a run of every outcome."""
    ok(run, "config", "set", "backoff-max", "60")
    for pid, name in ((11, "w1"), (12, "w2"), (13, "w3"), (14, "w4")):
        claims.worker_started(conn, pid, "host-a", worker_id=name)

    def enqueue(*args: str) -> None:
        ok(run, "enqueue", *args)

    enqueue("--id", "done", "-c", "echo hello", "-p", "5")
    enqueue("--id", "flaky", "-c", "exit 3", "--max-retries", "2", "--backoff-base", "3")
    enqueue("--id", "doomed", "-c", "exit 4", "--max-retries", "0")
    enqueue("--id", "slow", "-c", "sleep 100", "--timeout", "1.5", "--max-retries", "0")
    enqueue("--id", "lost", "-c", "sleep 8")
    enqueue("--id", "running", "-c", "sleep 9")
    enqueue("--id", "stopped", "-c", "sleep 7")
    enqueue("--id", "given-back", "-c", "true")
    fake.set(1)
    _done(conn, _claim(conn, "w1", "done"), "w1", 1.5, "hello\n")
    _failed(conn, _claim(conn, "w1", "flaky"), "w1", 3, "boom\n")
    _failed(conn, _claim(conn, "w1", "doomed"), "w1", 4)
    slow = _claim(conn, "w1", "slow")
    fake.set(2.5)
    claims.finish(conn, slow, ev.TimedOut(job_id="slow", worker_id="w1", attempt=1,
                                          timeout=1.5, duration=1.5, output="partial"))
    _claim(conn, "w2", "lost")
    _claim(conn, "w1", "running")
    stopped = _claim(conn, "w4", "stopped")
    ok(run, "cancel", "stopped")
    claims.finish(conn, stopped, ev.Cancelled(job_id="stopped", worker_id="w4", attempt=1,
                                              reason="cancelled by user while running",
                                              duration=0.5, output="bye\n"))
    back = _claim(conn, "w3", "given-back")
    claims.finish(conn, back, ev.Released(job_id="given-back", worker_id="w3", attempt=1,
                                          reason="its worker stopped"))
    claims.worker_stopped(conn, "w3", "burst finished")
    fake.set(3)
    ok(run, "cancel", "running")  # running: a cancel requested, its worker still at it
    fake.set(4)
    claims.heartbeat(conn, "w1")
    claims.heartbeat(conn, "w4")
    assert [e.type for e in rescued(conn, 30, meanwhile=lambda: _beat(conn, fake))] == \
        ["lease-expired", "scheduled-retry"]  # lost: w2 stopped heartbeating

    enqueue("--id", "child", "-c", "echo child", "--after", "flaky", "--after", "done")
    enqueue("--id", "later", "-c", "echo later", "--run-at", "2026-01-01T01:00:00Z")
    enqueue("--id", "m1", "-c", "convert a.mp4", "-q", "media", "-p", "3",
            "--unique-key", "video:a")
    enqueue("--id", "m2", "-c", "convert b.mp4", "-q", "media")
    enqueue("--id", "gone-soon", "-c", "true", "-q", "media")
    ok(run, "cancel", "gone-soon")
    enqueue("--id", "needs-doomed", "-c", "true", "--after", "doomed")
    enqueue("--id", "text", "-c", "printf 'tab\\there\\n\\u00e9'", "--unique-key", "k\u00e9y")
    ok(run, "queue", "pause", "media")
    ok(run, "queue", "limit", "media", "2")
    ok(run, "queue", "limit", "empty", "4", "--rate", "100/m")
    ok(run, "schedule", "add", "nightly", "--cron", "0 2 * * *", "-c", "backup.sh",
       "--timezone", "Europe/Paris", "-q", "media", "--max-retries", "1")
    ok(run, "schedule", "add", "often", "--cron", "*/5 * * * *", "-c", "poll")
    ok(run, "schedule", "pause", "often")
    fake.set(40)  # w4 fell silent (its last heartbeat at 5s, the lease 30s); w1 did not
    claims.heartbeat(conn, "w1")
    ok(run, "token", "add", "ci", "--scope", "enqueue")
    ok(run, "token", "add", "ops", "--scope", "admin")


def _beat(conn: Any, fake: FakeClock) -> None:
    """While w2 stays silent, the others keep beating."""
    fake.set(5)
    claims.heartbeat(conn, "w1")
    claims.heartbeat(conn, "w4")


# Each --json command and the file its output is recorded in.
COMMANDS: list[tuple[str, tuple[str, ...]]] = [
    ("list", ("list",)),
    ("list-limit", ("list", "--limit", "3")),
    ("list-after", ("list", "--limit", "3", "--after", "slow")),
    ("list-pending-after", ("list", "-s", "pending", "--after", "m1")),
    ("list-media", ("list", "-q", "media")),
    ("list-media-pending", ("list", "-q", "media", "-s", "pending")),
    *[(f"list-{s}", ("list", "-s", s)) for s in (
        "pending", "scheduled", "waiting", "processing", "completed", "failed", "dead",
        "cancelled")],
    ("dlq-list", ("dlq", "list")),
    ("status", ("status",)),
    ("queues", ("queues",)),
    *[(f"show-{j}", ("show", j)) for j in (
        "done", "flaky", "doomed", "slow", "running", "stopped", "lost", "given-back", "child",
        "later", "m1", "gone-soon", "needs-doomed", "text")],
    *[(f"history-{j}", ("history", j)) for j in (
        "done", "flaky", "slow", "running", "stopped", "lost", "given-back", "child",
        "gone-soon")],
    *[(f"logs-{j}", ("logs", j)) for j in (
        "done", "flaky", "doomed", "slow", "running", "stopped", "lost", "given-back",
        "later")],
    ("logs-flaky-attempt", ("logs", "flaky", "--attempt", "1")),
    ("stats", ("stats",)),
    ("stats-since", ("stats", "--since", "30s")),
    ("stats-empty-window", ("stats", "--since", "1s")),
    ("schedule-list", ("schedule", "list")),
    ("config-get", ("config", "get")),
    ("config-get-key", ("config", "get", "backoff-max")),
    ("prune-dry-run", ("prune", "--before", "0s", "--dry-run")),
    ("health", ("health",)),
    ("token-list", ("token", "list")),
]


def normalised(text: str, db: Any) -> str:
    """The output with where the database lives, where jobs were enqueued and who enqueued
    them replaced: the only things that differ between runs, machines and stores (the
    archive is a file beside the database, or a table)."""
    text = text.replace(str(db), "<db>").replace(json.dumps(os.getcwd()), '"<cwd>"')
    text = text.replace(json.dumps(actor.person()), '"<user@host>"')
    for target in (str(Path(str(db)).with_name("queue.archive.db")), "table archived_events"):
        text = text.replace(json.dumps(target), '"<archive>"')
    return text


def check(name: str, text: str, db: Any) -> None:
    """``text`` is exactly the recorded file; recording, the SQLite run writes it and the
    PostgreSQL run after it must match."""
    path = RECORDED / f"{name}.json"
    if RECORD and isinstance(db, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is not recorded (QUEUECTL_RECORD_JSON=1)"
    assert text == path.read_text(encoding="utf-8"), name


@pytest.fixture
def queue(run: Any, conn: Any, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(monkeypatch)
    build(run, conn, fake)
    return fake


def test_every_json_output_is_as_recorded(run, conn, db, queue):
    for name, args in COMMANDS:
        result = run(*args, "--json")
        assert result.exit_code == 0, (name, result.stdout, result.stderr)
        check(name, normalised(result.stdout, db), db)
    before = clock.now()
    result = run("prune", "--before", before, "--json")
    assert result.exit_code == 0, result.stderr
    check("prune", normalised(result.stdout, db), db)
    for name, args in (("list-after-prune", ("list",)),
                       ("history-done-archive", ("history", "done", "--archive")),
                       ("status-after-prune", ("status",)),
                       ("stats-after-prune", ("stats",))):
        result = run(*args, "--json")
        assert result.exit_code == 0, (name, result.stderr)
        check(name, normalised(result.stdout, db), db)


def _plain(value: Any, where: str = "") -> None:
    """Plain JSON types all the way down: dicts with str keys, lists, and exact scalars (no
    Structs, tuples, or str enums)."""
    if type(value) is dict:
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            _plain(item, f"{where}.{key}")
    elif type(value) is list:
        for n, item in enumerate(value):
            _plain(item, f"{where}[{n}]")
    else:
        assert type(value) in PLAIN, f"{where}: {type(value).__name__} {value!r}"


def test_python_api_returns_plain_data_as_recorded(db, queue):
    with Queue(db) as q:
        given = {
            "api-get-done": q.get("done"),
            "api-get-running": q.get("running"),
            "api-get-text": q.get("text"),
            "api-jobs": q.jobs(),
            "api-jobs-media-pending": q.jobs("pending", "media"),
            "api-jobs-limit": q.jobs(limit=2),
            "api-status": q.status(),
            "api-history-lost": q.history("lost"),
            "api-history-running": q.history("running", archive=True),
        }
    for name, value in given.items():
        _plain(value, name)
        check(name, normalised(json.dumps(value, indent=2, ensure_ascii=False) + "\n", db), db)


def test_wait_json_is_as_recorded(run, db, queue):
    """``wait --json`` of jobs in every final state (the dead ones by exit code and by
    timeout), and of unfinished ones when its timeout runs out."""
    for name, code, args in (
            ("wait-final", 1, ("done", "doomed", "slow", "stopped", "gone-soon")),
            ("wait-timeout", 124, ("done", "flaky", "running", "m1", "--timeout", "0"))):
        result = run("wait", *args, "--json")
        assert result.exit_code == code, (name, result.stdout, result.stderr)
        check(name, normalised(result.stdout, db), db)
    with Queue(db) as q:
        value = q.wait(["done", "doomed", "stopped"])
    _plain(value, "api-wait")
    check("api-wait", json.dumps(value, indent=2) + "\n", db)
