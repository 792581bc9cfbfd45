"""The Python API (issue 14): ``from queuectl import Queue``. It calls the functions the CLI
calls, so each method must give what the matching ``--json`` command prints and record
what the matching command records. Every test runs on both stores."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import by_hand

import queuectl
from queuectl import Conflict, InvalidInput, NotFound, Queue, QueueError, claims, decisions
from queuectl import events as ev

ROOT = Path(__file__).resolve().parent.parent


def ok(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return str(result.stdout)


@pytest.fixture
def queue(db):  # type: ignore[no-untyped-def]
    with Queue() as opened:  # QUEUECTL_DB, as the CLI reads it
        yield opened


def test_enqueue_takes_the_json_job_fields_and_returns_the_id(queue, run):
    made = queue.enqueue("echo one")
    named = queue.enqueue("echo two", id="two", queue="media", priority=7, max_retries=1,
                          backoff_base=3, timeout=9.5, delay=3600, unique_key="k")
    assert named == "two"
    after = queue.enqueue("echo three", after=[made, "two"])
    listed = {job["id"]: job for job in json.loads(ok(run("list", "--json")))}
    assert set(listed) == {made, "two", after}
    two = listed["two"]
    assert (two["queue"], two["priority"], two["max_retries"], two["backoff_base"],
            two["timeout"], two["state"]) == ("media", 7, 1, 3.0, 9.5, "scheduled")
    assert listed[after]["state"] == "waiting" and listed[after]["after"] == [made, "two"]
    # A unique key held by an unfinished job: no new job, the holder's id.
    assert queue.enqueue("echo again", unique_key="k") == "two"
    assert len(queue.jobs()) == 3


def test_enqueue_many_is_all_or_none(queue):
    ids = queue.enqueue_many([{"command": "true"}, decisions.JobSpec(command="false", id="f")])
    assert ids[1] == "f" and len(queue.jobs()) == 2
    with pytest.raises(InvalidInput, match=r"invalid job #2: .*priority"):
        queue.enqueue_many([{"command": "true", "id": "fine"}, {"command": "x", "priority": "9"}])
    with pytest.raises(Conflict, match="'f' already exists"):
        queue.enqueue_many([{"command": "true", "id": "new"}, {"command": "true", "id": "f"}])
    assert [j["id"] for j in queue.jobs()] == ids
    assert queue.enqueue_many([]) == []


@pytest.mark.parametrize("options, message", [
    ({"priority": float("nan")}, "priority"),
    ({"timeout": float("inf")}, "timeout"),
    ({"max_retries": -1}, "max_retries"),
    ({"bogus": 1}, "unknown field `bogus`"),
    ({"delay": 5, "run_at": "2030-01-01"}, "run_at or delay"),
    ({"run_at": "tomorrow"}, "run_at"),
    ({"id": "has space"}, "id"),
    ({"queue": "a/b c"}, "queue"),
    ({"after": ["nope"]}, "nope"),
])
def test_bad_options_raise_one_clear_error_and_write_nothing(queue, db, options, message):
    with pytest.raises(QueueError, match=message) as raised:
        queue.enqueue("true", **options)
    assert "\n" not in str(raised.value)
    with by_hand(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_an_empty_command_is_refused(queue):
    with pytest.raises(InvalidInput, match="command is empty"):
        queue.enqueue("  ")


def test_reads_give_what_the_json_commands_print(queue, run, conn):
    a = queue.enqueue("echo a")
    queue.enqueue("exit 3", id="bad", max_retries=0)
    worker = claims.worker_started(conn, 1, "h")
    while (job := claims.claim(conn, worker)) is not None:
        result: ev.Event = ev.Completed(job_id=job.job_id, worker_id=worker, attempt=job.attempt)
        if job.job_id == "bad":
            result = ev.Failed(job_id="bad", worker_id=worker, attempt=job.attempt,
                               exit_code=3, error="exit status 3")
        claims.finish(conn, job, result)

    assert queue.jobs() == json.loads(ok(run("list", "--json")))
    assert queue.jobs(state="dead") == json.loads(ok(run("list", "--json", "-s", "dead")))
    assert queue.jobs(queue="default", limit=1) == \
        json.loads(ok(run("list", "--json", "-q", "default", "--limit", "1")))
    assert queue.get(a) == {k: v for k, v in json.loads(ok(run("show", a, "--json"))).items()
                            if k in queue.get(a)}
    assert queue.history("bad") == json.loads(ok(run("history", "bad", "--json")))
    assert queue.status() == json.loads(ok(run("status", "--json")))
    assert queue.status()["jobs"]["dead"] == 1
    with pytest.raises(NotFound, match="Job 'nope' not found"):
        queue.get("nope")
    with pytest.raises(InvalidInput, match="unknown state 'weird'"):
        queue.jobs(state="weird")


def test_cancel_and_retry_record_the_same_events_as_the_cli(queue, conn):
    queue.enqueue("true", id="x")
    queue.enqueue("true", id="child", after=["x"])
    assert queue.cancel("x") == "cancelled"
    assert [e["type"] for e in queue.history("child")][-1] == "cancelled"
    queue.enqueue("exit 1", id="d", max_retries=0)
    worker = claims.worker_started(conn, 1, "h")
    job = claims.claim(conn, worker)
    assert job is not None and job.job_id == "d"
    claims.finish(conn, job, ev.Failed(job_id="d", worker_id=worker, attempt=1, exit_code=1,
                                       error="exit status 1"))
    queue.retry("d")
    assert queue.get("d")["state"] == "pending"
    assert [e["type"] for e in queue.history("d")][-2:] == ["dead", "requeued"]
    with pytest.raises(Conflict):
        queue.retry("d")


def test_one_queue_serves_many_threads(queue):
    made: list[str] = []

    def enqueue() -> None:
        for _ in range(20):
            made.append(queue.enqueue("true"))

    threads = [threading.Thread(target=enqueue) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 80 and len(queue.jobs()) == 80


def test_each_enqueue_is_committed_when_it_returns(queue, db):
    job_id = queue.enqueue("true")
    with by_hand(db) as other:  # another connection sees it at once
        assert other.execute("SELECT id FROM jobs").fetchall() == [(job_id,)]
    if queue._db.kind == "sqlite":  # and the commit was synced: it survives power loss
        assert queue._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_a_queue_names_its_database_and_closes(db, tmp_path):
    target = tmp_path / "elsewhere.db" if isinstance(db, Path) else db
    with Queue(target) as opened:
        opened.enqueue("true")
        assert repr(opened) == f"Queue({str(target)!r})"
    with pytest.raises(Exception):  # noqa: B017  (closed: any driver's error)
        opened.jobs()


@pytest.mark.stores("sqlite")
def test_the_command_line_does_not_load_the_api():
    code = ("import sys, queuectl.cli; "
            "print('queuectl.api' in sys.modules, hasattr(queuectl, 'Queue'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "True"]
    with pytest.raises(AttributeError):
        queuectl.Nothing  # type: ignore[attr-defined]  # noqa: B018
