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
from conftest import by_hand, pg_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import queuectl
from queuectl import (
    Conflict,
    InvalidInput,
    NotFound,
    Queue,
    QueueError,
    StoreError,
    claims,
    decisions,
)
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


def test_an_enqueue_takes_the_settings_another_process_set_since_the_last(queue, run):
    first = queue.enqueue("true")
    queue.enqueue("true")  # the settings are known now, as of this job's event
    ok(run("config", "set", "max-retries", "7"))
    later = queue.enqueue("true")
    ok(run("config", "set", "max-retries", "2"))
    ok(run("enqueue", "-c", "true"))  # the ledger moved again, past the setting
    last = queue.enqueue("true")
    assert [queue.get(j)["max_retries"] for j in (first, later, last)] == [3, 7, 2]


def test_a_made_id_a_user_chose_before_is_made_again_with_a_suffix(queue):
    assert queue.enqueue("true", id="3") == "3"  # seq 1: the id seq 3 will make
    assert queue.enqueue("true") == "2"
    assert queue.enqueue("true") == "3.1"
    assert queue.enqueue("true") == "4"


def test_a_queue_names_its_database_and_closes(db, tmp_path):
    target = tmp_path / "elsewhere.db" if isinstance(db, Path) else db
    with Queue(target) as opened:
        opened.enqueue("true", id="x")
        assert repr(opened) == f"Queue({str(target)!r})"
    opened.close()  # again: nothing to do
    assert repr(opened) == f"Queue({str(target)!r})"
    for call in (lambda: opened.enqueue("true"), lambda: opened.enqueue_many([]),
                 lambda: opened.get("x"), opened.jobs, lambda: opened.history("x"),
                 opened.status, lambda: opened.cancel("x"), lambda: opened.retry("x")):
        with pytest.raises(StoreError) as raised:
            call()
        assert str(raised.value) == "the queue is closed"


# -- bad arguments: one QueueError, the same on every store, nothing written -----------------

NOT_UTF8 = "caf\udce9"  # what Python makes of a byte that is not UTF-8 (a file name, argv)
QUEUE_NAME = "must be 1-128 letters, digits or ._:@/+- and start with a letter or digit"
LIMIT = "limit: expected a whole number from 1 to 1000000000, got"
BAD_CALLS = {
    "limit-huge": (lambda q: q.jobs(limit=10**30), InvalidInput, f"{LIMIT} {10**30}"),
    "limit-negative": (lambda q: q.jobs(limit=-1), InvalidInput, f"{LIMIT} -1"),
    "limit-zero": (lambda q: q.jobs(limit=0), InvalidInput, f"{LIMIT} 0"),
    "limit-fraction": (lambda q: q.jobs(limit=1.5), InvalidInput, f"{LIMIT} 1.5"),
    "limit-nan": (lambda q: q.jobs(limit=float("nan")), InvalidInput, f"{LIMIT} nan"),
    "limit-bool": (lambda q: q.jobs(limit=True), InvalidInput, f"{LIMIT} bool"),
    "limit-text": (lambda q: q.jobs(limit="3"), InvalidInput, f"{LIMIT} str"),
    "state-number": (lambda q: q.jobs(state=5), InvalidInput, "unknown state 5 (known: "
                     "pending, scheduled, waiting, processing, completed, failed, dead, "
                     "cancelled)"),
    "queue-number": (lambda q: q.jobs(queue=5), InvalidInput, "queue: expected text, got int"),
    "queue-not-utf8": (lambda q: q.jobs(queue=NOT_UTF8), InvalidInput,
                       f"queue 'caf\\udce9' {QUEUE_NAME}"),
    "queue-nul": (lambda q: q.jobs(queue="a\0"), InvalidInput, f"queue 'a\\x00' {QUEUE_NAME}"),
    "queue-space": (lambda q: q.jobs(queue="a b"), InvalidInput, f"queue 'a b' {QUEUE_NAME}"),
    "get-not-utf8": (lambda q: q.get(NOT_UTF8), NotFound, "Job 'caf\\xe9' not found"),
    "get-surrogate": (lambda q: q.get("\ud800"), NotFound, "Job '\\ud800' not found"),
    "get-nul": (lambda q: q.get("a\0b"), NotFound, "Job 'a\\x00b' not found"),
    "get-number": (lambda q: q.get(5), InvalidInput, "job id: expected text, got int"),
    "get-none": (lambda q: q.get(None), InvalidInput, "job id: expected text, got NoneType"),
    "history-not-utf8": (lambda q: q.history(NOT_UTF8), NotFound, "Job 'caf\\xe9' not found"),
    "history-archive-text": (lambda q: q.history("x", archive="yes"), InvalidInput,
                             "archive: expected True or False, got str"),
    "cancel-nul": (lambda q: q.cancel("\0"), NotFound, "Job '\\x00' not found"),
    "cancel-bytes": (lambda q: q.cancel(b"x"), InvalidInput, "job id: expected text, got bytes"),
    "retry-not-utf8": (lambda q: q.retry(NOT_UTF8), NotFound, "Job 'caf\\xe9' not found"),
    "command-not-utf8": (lambda q: q.enqueue(f"cat {NOT_UTF8}"), InvalidInput,
                         "invalid job: command is not valid UTF-8: cat caf\\xe9"),
    "unique-key-not-utf8": (lambda q: q.enqueue("true", unique_key=NOT_UTF8), InvalidInput,
                            "invalid job: unique_key is not valid UTF-8: caf\\xe9"),
    "command-number": (lambda q: q.enqueue(5), InvalidInput,
                       "invalid job: Expected `str`, got `int` - at `$.command`"),
    "many-number": (lambda q: q.enqueue_many(5), InvalidInput,
                    "enqueue_many: expected an iterable of jobs, got int"),
    "many-one-job": (lambda q: q.enqueue_many({"command": "true"}), InvalidInput,
                     "enqueue_many: expected an iterable of jobs, got dict"),
    "many-text": (lambda q: q.enqueue_many([{"command": "true"}, "true"]), InvalidInput,
                  "invalid job #2: expected a mapping of job fields or a JobSpec, got str"),
    "many-spec-typed-wrong": (lambda q: q.enqueue_many([decisions.JobSpec(command=5)]),
                              InvalidInput,
                              "invalid job #1: Expected `str`, got `int` - at `$.command`"),
    "many-not-utf8": (lambda q: q.enqueue_many([decisions.JobSpec(command=NOT_UTF8)]),
                      InvalidInput, "invalid job #1: command is not valid UTF-8: caf\\xe9"),
}


def _events(queue: Queue) -> int:
    return int(queue._db.execute("SELECT count(*) FROM events").fetchone()[0])


@pytest.mark.parametrize("call, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_a_bad_argument_is_one_queue_error_and_writes_nothing(queue, call, error, message):
    queue.enqueue("true", id="x")
    with pytest.raises(error) as raised:
        call(queue)
    assert str(raised.value) == message
    assert _events(queue) == 1


class BytesPath:
    def __fspath__(self) -> bytes:
        return b"q.db"


BAD_TARGETS = {
    "number": (5, "db: expected a path or a postgresql:// URL, got int"),
    "bool": (True, "db: expected a path or a postgresql:// URL, got bool"),
    "bytes": (b"q.db", "db: expected a path or a postgresql:// URL, got bytes"),
    "bytes-path": (BytesPath(), "db: expected a path or a postgresql:// URL, got bytes"),
    "nul": (Path("a\0b.db"), "db contains a NUL character: a\\x00b.db"),
    "not-utf8": (f"{NOT_UTF8}.db", "db is not valid UTF-8: caf\\xe9.db"),
    "url-not-utf8": (f"postgresql://127.0.0.1/{NOT_UTF8}",
                     "db is not valid UTF-8: postgresql://127.0.0.1/caf\\xe9"),
}


@pytest.mark.parametrize("target, message", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_a_bad_database_argument_is_one_queue_error(db, tmp_path, target, message):
    with pytest.raises(InvalidInput) as raised:
        Queue(target)
    assert str(raised.value) == message
    assert list(tmp_path.iterdir()) == []


def test_a_queuectl_db_that_is_not_utf8_is_refused_as_the_cli_refuses_it(db, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("QUEUECTL_DB", f"{NOT_UTF8}.db")
    with pytest.raises(InvalidInput) as raised:
        Queue()
    assert str(raised.value) == "QUEUECTL_DB is not valid UTF-8: caf\\xe9.db"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.stores("sqlite")
def test_the_command_line_does_not_load_the_api():
    code = ("import sys, queuectl.cli; "
            "print('queuectl.api' in sys.modules, hasattr(queuectl, 'Queue'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "True"]
    with pytest.raises(AttributeError):
        queuectl.Nothing  # type: ignore[attr-defined]  # noqa: B018


# Text no store can hold: a NUL, or a lone surrogate (a byte that is not UTF-8, or worse).
unstorable = st.builds(lambda a, bad, b: a + bad + b, st.text(max_size=4),
                       st.one_of(st.just("\0"), st.characters(categories=["Cs"])),
                       st.text(max_size=4))
not_text = st.one_of(st.integers(), st.floats(), st.booleans(), st.binary(max_size=3),
                     st.lists(st.integers(), max_size=2), st.tuples(), st.just(object()))
not_whole = st.one_of(st.floats(), st.booleans(), st.text(max_size=3), st.binary(max_size=2),
                      st.lists(st.integers(), max_size=1))


def outside(low: int, high: int) -> st.SearchStrategy[object]:
    """Values no whole-number argument between ``low`` and ``high`` takes."""
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                     not_whole)


def beyond(low: float, high: float) -> st.SearchStrategy[object]:
    """Values no number argument between ``low`` and ``high`` takes."""
    return st.one_of(st.floats(max_value=low, exclude_max=True),
                     st.floats(min_value=high, exclude_min=True), st.just(float("nan")),
                     st.integers(min_value=int(high) + 1), st.booleans(),
                     st.text(max_size=3), st.binary(max_size=2))


bad_text = st.one_of(not_text, unstorable)
JOB_FIELDS = {"command": bad_text, "id": bad_text, "queue": bad_text, "run_at": bad_text,
              "unique_key": bad_text, "priority": outside(-2**31, 2**31 - 1),
              "max_retries": outside(0, 1_000_000), "backoff_base": beyond(1, 1_000_000),
              "timeout": beyond(0, 315_360_000), "delay": beyond(0, 315_360_000),
              "after": st.one_of(not_text.filter(lambda v: not isinstance(v, list | tuple)),
                                 st.lists(bad_text, min_size=1, max_size=2))}
job_fields = st.sampled_from(sorted(JOB_FIELDS)).flatmap(
    lambda name: JOB_FIELDS[name].map(lambda value: {"command": "true", name: value}))
ids = st.one_of(bad_text, st.none())
calls = st.one_of(
    st.tuples(st.sampled_from(["get", "history", "cancel", "retry"]), ids.map(lambda i: (i,)),
              st.just({})),
    st.tuples(st.just("history"), st.just(("x",)),
              st.one_of(not_text, st.text(max_size=2), st.none()).filter(
                  lambda v: not isinstance(v, bool)).map(lambda v: {"archive": v})),
    st.tuples(st.just("jobs"), st.just(()), st.one_of(
        outside(1, 1_000_000_000).map(lambda v: {"limit": v}),
        bad_text.map(lambda v: {"queue": v}), bad_text.map(lambda v: {"state": v}))),
    st.tuples(st.just("enqueue"), bad_text.map(lambda c: (c,)), st.just({})),
    st.tuples(st.just("enqueue"), st.just(("true",)), job_fields.map(
        lambda f: {k: v for k, v in f.items() if k != "command"}).filter(bool)),
    st.tuples(st.just("enqueue_many"), st.lists(job_fields, min_size=1, max_size=2).map(
        lambda jobs: ([{"command": "true"}, *jobs],)), st.just({})),
    st.tuples(st.just("enqueue_many"), st.one_of(
        not_text.filter(lambda v: not isinstance(v, list | tuple | bytes)), st.text(max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)).map(lambda v: (v,)),
        st.just({})),
)


@pytest.fixture
def stores(db):  # type: ignore[no-untyped-def]
    """A queue on each store, each holding job ``x``."""
    with pg_database() as url, Queue(db) as lite, Queue(url) as pg:
        for queue in (lite, pg):
            queue.enqueue("true", id="x")
        yield lite, pg


@pytest.mark.stores("sqlite")  # and PostgreSQL beside it, in every example
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=calls)
def test_every_bad_argument_fails_alike_on_both_stores(stores, call):
    """Whatever a caller passes, a method either works or raises one QueueError, with a
    one-line message, the same on SQLite and PostgreSQL, and nothing written."""
    method, args, kwargs = call
    outcomes = []
    for queue in stores:
        before = _events(queue)
        with pytest.raises(QueueError) as raised:
            getattr(queue, method)(*args, **kwargs)
        message = str(raised.value)
        assert "\n" not in message and message.isprintable(), message
        assert _events(queue) == before
        outcomes.append((type(raised.value), message))
    assert outcomes[0] == outcomes[1]
