"""What only the PostgreSQL store has to prove: one gapless order of events with many
writers, append-only enforced by the server, clear errors for servers and databases that
cannot be used, and no password ever printed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import (
    by_hand,
    needs,
    pg_database,
    queuectl_cmd,
    replay_problems,
    spawn,
    wait_for,
)

from queuectl import claims, decisions, ledger, store
from queuectl import events as ev
from queuectl.errors import Conflict, NotFound, StoreError, StoreUnavailable

pytestmark = pytest.mark.stores("postgres")


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def queuectl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(queuectl_cmd(*args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


# -- a round trip lets the worker's other threads run -----------------------------------


def test_waiting_for_the_server_lets_other_threads_run(db, conn):
    """A worker's threads share one interpreter: while one waits for the server, the others
    must go on starting jobs and reading their output. libpq's own wait holds the GIL
    (another thread could not even wake from a sleep); the store waits on the socket."""
    ticks: list[float] = []

    def other_thread() -> None:
        for _ in range(20):
            time.sleep(0.005)
            ticks.append(time.monotonic())

    conn.execute("SELECT 1 WHERE ? = 1", (1,))  # prepared, sent through the store's own path
    thread = threading.Thread(target=other_thread)
    thread.start()
    conn.execute("SELECT pg_sleep(?)", (0.6,))
    returned = time.monotonic()
    thread.join()
    assert len(ticks) == 20 and ticks[-1] < returned, "the other thread stood still"


def test_a_read_snapshot_does_not_stop_the_connections_clock(db, conn):
    """The time asked for inside a read snapshot is that read's only: a later read, or a
    write's events, must not take it (a dashboard reads in snapshots all day)."""
    with conn.snapshot():
        during = conn.now()
    time.sleep(0.01)
    assert conn.now() > during
    decisions.pause_queue(conn, "media")
    (at,) = conn.execute("SELECT at FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    assert at > during


def test_a_snapshot_keeps_its_time_to_itself(db, conn):
    """Inside a snapshot every read sees one time; the next snapshot (a frame of status
    --watch, say) asks the clock again."""
    with conn.snapshot():
        first = conn.now()
        assert conn.now() == first
    time.sleep(0.01)
    with conn.snapshot():
        assert conn.now() > first
    assert conn.now() > first


# -- one order of events -------------------------------------------------------------------


def test_seq_stays_gapless_and_in_commit_order_with_many_writers(db, conn):
    """24 writers append at once (some transactions roll back), while a reader watches: in
    every snapshot it takes, the ledger holds exactly seqs 1..max, so no later seq ever
    committed before an earlier one, and no rollback left a hole."""
    stop = threading.Event()
    seen: list[tuple[int, int]] = []

    def watch() -> None:
        with by_hand(db) as reader:
            while not stop.is_set():
                with reader.snapshot():
                    seen.append(tuple(reader.execute(
                        "SELECT count(*), coalesce(max(seq), 0) FROM events").fetchone()))

    def write(n: int) -> None:
        writer = ledger.connect(db)
        try:
            for i in range(15):
                decisions.enqueue(writer, [decisions.JobSpec(command="true", id=f"w{n}-{i}")])
                try:  # a duplicate: the transaction rolls back, its seq must not be lost
                    decisions.enqueue(writer, [decisions.JobSpec(command="true", id=f"w{n}-{i}")])
                except Conflict:
                    pass
                wid = claims.worker_started(writer, n, f"host-{n}")
                job = claims.claim(writer, wid)
                if job is not None:
                    claims.finish(writer, job, ev.Completed(job_id=job.job_id, worker_id=wid,
                                                            attempt=job.attempt))
        finally:
            writer.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    writers = [threading.Thread(target=write, args=(n,)) for n in range(24)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    watcher.join()
    seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= 24 * 15 * 2
    assert conn.execute("SELECT seq FROM queuectl_head").fetchone() == (len(seqs),)
    assert len(seen) > 10 and all(count == last for count, last in seen)
    assert ledger.check(conn) == []


# -- a batch's one-row writes travel as one statement ------------------------------------


def _rows_written_together(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows of each held write the store sends, as it sends it."""
    from queuectl.store import postgres

    sizes: list[int] = []
    render = postgres.PgDb._render

    def counting(self: postgres.PgDb, write: postgres._Write) -> str:
        sizes.append(len(write.rows))
        return render(self, write)

    monkeypatch.setattr(postgres.PgDb, "_render", counting)
    return sizes


def test_a_batch_of_claims_and_results_goes_as_one_statement_a_table(db, conn, monkeypatch):
    """Four workers' results and their next claims in one transaction: each table's
    one-row writes of one kind go as one statement of four rows, and the rows are those
    one write at a time gives (the fixture replays the ledger against them)."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(8)])
    workers = [claims.worker_started(conn, 1, "h") for _ in range(4)]
    held = [claims.claim(conn, w) for w in workers]
    sizes = _rows_written_together(monkeypatch)
    results = [(job, ev.Completed(job_id=job.job_id, worker_id=w, attempt=1))
               for w, job in zip(workers, held, strict=True) if job is not None]
    outcomes, following = claims.finish_and_claim_many(conn, results, workers)
    assert [len(o) for o in outcomes] == [1, 1, 1, 1]
    assert all(job is not None for job in following)
    # jobs (completed and claimed, of other columns, in one UPDATE of eight rows), runs
    # (opened), workers (each worker's result and claim merged into one change first). A
    # run is closed by job id, no row's key: those stay one a row. The events go as one
    # INSERT already.
    assert sorted(n for n in sizes if n > 1) == [4, 4, 8]
    counts = dict(conn.execute("SELECT state, n FROM job_counts").fetchall())
    assert (counts["completed"], counts["processing"], counts["pending"]) == (4, 4, 0)
    assert conn.execute("SELECT jobs_done FROM workers ORDER BY id").fetchall() == [(1,)] * 4


def test_writes_to_the_same_row_never_join(db, conn, monkeypatch):
    """Two changes of one row in one batch go one after the other: the second sees the
    first (a worker's finished run and its next claim, twice over)."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(4)])
    worker = claims.worker_started(conn, 1, "h")
    first = claims.claim(conn, worker)
    second = claims.finish_and_claim_many(conn, [], [worker])[1][0]
    assert first is not None and second is not None
    sizes = _rows_written_together(monkeypatch)
    claims.finish_and_claim_many(conn, [
        (first, ev.Completed(job_id=first.job_id, worker_id=worker, attempt=1)),
        (second, ev.Completed(job_id=second.job_id, worker_id=worker, attempt=1)),
    ], [worker, worker])
    assert conn.execute("SELECT jobs_done FROM workers").fetchone() == (2,)
    # The four jobs' changes (two results, two claims) joined, and so did the runs opened;
    # the worker's row took its four changes merged into one
    assert max(sizes) == 4
    assert conn.execute("SELECT count(*) FROM jobs WHERE state = 'processing'").fetchone() == (2,)


def test_a_joined_write_that_misses_a_row_fails_the_whole_transaction(db, conn):
    """A write that expects its row (an event for a job) still fails, and writes nothing,
    when it travels with others and its job does not exist."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"j{n}") for n in range(3)])
    before = conn.execute("SELECT count(*) FROM events").fetchone()
    with pytest.raises(LookupError, match="unknown job"), ledger.write(conn):
        ledger.append(conn, *[ev.CancelRequested(job_id=j) for j in ("j0", "j1", "nope", "j2")])
    assert conn.execute("SELECT count(*) FROM events").fetchone() == before
    assert conn.execute("SELECT count(*) FROM jobs WHERE cancel_requested = 1").fetchone() == (0,)



def test_a_result_and_the_next_claim_go_as_one_update_of_jobs(db, conn, monkeypatch):
    """A worker's result and its next claim set other columns of jobs, with the run's and
    the worker's changes between them: the two rows go as one UPDATE (the fixture replays
    the ledger against the rows it left)."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(2)])
    worker = claims.worker_started(conn, 1, "h")
    first = claims.claim(conn, worker)
    assert first is not None
    sizes = _rows_written_together(monkeypatch)
    _, second = claims.finish_and_claim(
        conn, first, ev.Completed(job_id=first.job_id, worker_id=worker, attempt=1), worker)
    assert second is not None
    assert max(sizes) == 2
    rows = conn.execute("SELECT id, state, attempts, worker_id FROM jobs ORDER BY seq").fetchall()
    assert rows == [(first.job_id, "completed", 1, None), (second.job_id, "processing", 1, worker)]


def test_a_joined_update_of_other_columns_that_misses_a_row_fails_the_whole_transaction(
        db, conn):
    """Updates of one table by key that set other columns join across other tables'
    changes, and one that finds no row still fails the transaction, writing nothing."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="j0")])
    with pytest.raises(LookupError, match="another of 2 rows"), conn.transaction():
        conn.update("jobs", {"id": "j0"}, {"last_error": "x"}, missing=LookupError("no job j0"))
        conn.update("job_counts", {"queue": "default", "state": "pending"}, add={"n": 0})
        conn.update("jobs", {"id": "nope"}, {"exit_code": 1}, missing=LookupError("no job nope"))
    assert conn.execute("SELECT last_error FROM jobs").fetchone() == (None,)

# -- an enqueue in one round trip ----------------------------------------------------------


def test_an_enqueue_guesses_in_one_round_trip_and_runs_again_after_a_wrong_guess(
        db, conn, monkeypatch):
    """A connection's enqueue after its own goes in one round trip, guessing the head and
    that the made id is free. After another connection's commit (the head moved), or with
    the made id taken by a user's job, the server refuses the guess and the enqueue runs
    again, asking: ids and seqs come out as one enqueue at a time gives them."""
    from queuectl.store import postgres

    def enqueue(db_: store.Db, **fields: str) -> str:
        return decisions.enqueue(db_, [decisions.JobSpec(command="true", **fields)])[0]

    sends: list[str] = []
    send = postgres.PgDb._send
    monkeypatch.setattr(postgres.PgDb, "_send", lambda self, last: sends.append("") or send(
        self, last))
    with closing(ledger.connect(db)) as other:
        assert enqueue(conn) == "1"
        sends.clear()
        assert enqueue(conn) == "2"
        assert len(sends) == 1
        assert enqueue(other) == "3"
        assert enqueue(conn) == "4"  # guessed head 2: refused, then asked
        assert enqueue(conn, id="6") == "6"
        with pytest.raises(NotFound):
            enqueue(conn, after=["nope"])
        # seq 6: its made id is the user's job's, and its dependency's read finds a row
        # where the last found none
        assert enqueue(conn, after=["1"]) == "6.1"
        assert enqueue(other) == "7"
        assert enqueue(other) == "8"
        assert enqueue(other, id="10") == "10"
        assert enqueue(other) == "10.1"  # guessed free: refused, then asked
    assert conn.execute("SELECT count(*), min(seq), max(seq) FROM events").fetchone() == (
        10, 1, 10)


def _trips(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The statements of each round trip the store sends, as SQL (``?`` for values)."""
    from queuectl.store import postgres

    trips: list[list[str]] = []
    send = postgres.PgDb._send

    def logging(self: postgres.PgDb, last: postgres._Command | None) -> object:
        trips.append([w.sql for w in self._pending] + (
            [] if last is None else [last.text.decode() if last.text else "(prepared)"]))
        return send(self, last)

    monkeypatch.setattr(postgres.PgDb, "_send", logging)
    return trips


def test_a_guessed_enqueue_is_five_statements_the_first_of_which_takes_the_head(
        db, conn, monkeypatch):
    """Lock, guess check, move and wake-up are the head's one UPDATE, first; then the
    check of the guessed free id, then the rows. No BEGIN or COMMIT: the statements up to
    the round trip's sync are one transaction."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true")])
    trips = _trips(monkeypatch)
    decisions.enqueue(conn, [decisions.JobSpec(command="true")])
    assert len(trips) == 1
    (head, free, *rows), = trips
    assert head == ("UPDATE queuectl_head SET seq = seq + ? RETURNING "
                    "queuectl_expect(seq, ?, ?), pg_notify('queuectl', '')")
    assert free.startswith("SELECT queuectl_expect(") and "FROM jobs WHERE id = ?" in free
    assert [r.split("(")[0].strip() for r in rows] == [
        "INSERT INTO events", "INSERT INTO jobs", "INSERT INTO job_counts"]
    assert conn.execute("SELECT seq FROM queuectl_head").fetchone() == (2,)
    assert not conn.in_transaction


# Holds the head (the event it appends is not committed yet) until a line comes on stdin.
HOLDER = """
import sys
from queuectl import events, ledger
conn = ledger.connect(sys.argv[1])
with ledger.write(conn):
    ledger.append(conn, events.CancelRequested(job_id="1"))
    print("holding", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def _head_held(db: str) -> Iterator[None]:
    """Another process holds the ledger's head, with an event appended, until the block
    ends; then it commits."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        yield
    finally:
        holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0


def test_a_head_moved_while_a_guess_waited_for_it_is_refused_and_asked_again(
        db, conn, monkeypatch):
    """Another process holds the head and commits an event while this connection's
    guessed enqueue waits for it: the server checks the head as it finds it after the
    wait, and the enqueue runs again, asking, after the other's event."""
    assert decisions.enqueue(conn, [decisions.JobSpec(command="true")]) == ["1"]
    with _head_held(db):
        trips = _trips(monkeypatch)
        made: list[str] = []
        enqueuer = threading.Thread(target=lambda: made.extend(
            decisions.enqueue(conn, [decisions.JobSpec(command="true")])))
        enqueuer.start()
        with by_hand(db) as watcher:
            wait_for(lambda: watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()").fetchone()[0] == 1, 30,
                "the enqueue to wait for the head")
    enqueuer.join()
    assert made == ["3"]
    # The guess went in the head's one statement; refused, the enqueue asked.
    assert any(sql.startswith("UPDATE queuectl_head SET seq = seq + ?") for sql in trips[0])
    assert len(trips) > 1
    assert [e[:3] for e in _events(conn, "enqueued", "cancel-requested")] == [
        (1, "enqueued", "1"), (2, "cancel-requested", "1"), (3, "enqueued", "3")]


def test_a_head_held_past_the_lock_timeout_gives_one_clear_line(db, conn, monkeypatch):
    """An enqueue of one round trip (its head lock is its first statement) and the CLI's
    both meet the lock timeout as the same error, and write nothing."""
    monkeypatch.setenv("QUEUECTL_LOCK_TIMEOUT", "0.5")
    impatient = ledger.connect(db)
    assert decisions.enqueue(impatient, [decisions.JobSpec(command="true")]) == ["1"]
    try:
        with _head_held(db):
            trips = _trips(monkeypatch)
            with pytest.raises(StoreError) as refused:
                decisions.enqueue(impatient, [decisions.JobSpec(command="true")])
            assert len(trips) == 1 and trips[0][0].startswith("UPDATE queuectl_head")
            assert not impatient.in_transaction
            line = one_error_line(queuectl("enqueue", "-c", "true"))
    finally:
        impatient.close()
    message = "database is locked: another process held it for over 0.5s; try again"
    assert str(refused.value) == message
    assert line == f"Error: {message}"
    assert conn.execute("SELECT type FROM events ORDER BY seq").fetchall() == [
        ("enqueued",), ("cancel-requested",)]


def test_a_commit_refused_at_the_sync_writes_nothing(db, conn, monkeypatch):
    """A transaction of one round trip commits at the sync, without COMMIT: a commit the
    server refuses there (a deferred constraint) is the transaction's error, and leaves
    nothing written and the connection ready."""
    with by_hand(db) as admin:
        admin.execute("CREATE TABLE pairs (k INTEGER, "
                      "UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)")
    trips = _trips(monkeypatch)
    with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
        conn.insert("pairs", {"k": 1})
        conn.insert("pairs", {"k": 1})
    assert len(trips) == 1 and "BEGIN" not in trips[0] and "COMMIT" not in trips[0]
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM pairs").fetchone() == (0,)
    with conn.transaction():
        conn.insert("pairs", {"k": 2})
    assert conn.execute("SELECT k FROM pairs").fetchall() == [(2,)]


def test_each_commit_wakes_only_for_what_its_events_ask(db, conn):
    """Workers hear of an enqueue, ``wait`` of a job ended; a heartbeat, a claim and a
    rolled-back enqueue send nothing."""
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN queuectl; LISTEN queuectl_ends")

        def heard() -> list[str]:
            return [n.channel for n in listener.notifies(timeout=0.5)]

        decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a")])
        assert heard() == ["queuectl"]
        decisions.enqueue(conn, [decisions.JobSpec(command="true", id="b")])  # one trip
        assert heard() == ["queuectl"]
        with pytest.raises(Conflict):
            decisions.enqueue(conn, [decisions.JobSpec(command="true", id="b")])
        worker = claims.worker_started(conn, 1, "h")
        claims.heartbeat(conn, worker)
        job = claims.claim(conn, worker)
        assert job is not None
        assert heard() == []
        claims.finish(conn, job, ev.Completed(job_id=job.job_id, worker_id=worker,
                                              attempt=job.attempt))
        assert heard() == ["queuectl_ends"]


# -- jobs claimed ahead ------------------------------------------------------------------


def _events(conn, *types: str) -> list[tuple[int, str, str | None, dict]]:
    marks = ", ".join("?" * len(types))
    return [(seq, type_, job_id, json.loads(body)) for seq, type_, job_id, body in conn.execute(
        f"SELECT seq, type, job_id, body FROM events WHERE type IN ({marks}) ORDER BY seq",
        types)]


def test_quick_jobs_are_claimed_ahead_and_each_start_is_recorded(db, conn):
    """After a quick job a worker holds jobs claimed ahead of the one it runs (one commit
    then serves several). Each such claim says so, and the job's ``started`` event comes
    after the previous run ended and before its own did: one run at a time."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"q{n}") for n in range(8)])
    result = queuectl("worker", "--burst", "--ahead", "16")
    assert result.returncode == 0, result.stderr
    events = _events(conn, "claimed", "started", "completed")
    ahead = [job for _, kind, job, body in events if kind == "claimed" and body.get("ahead")]
    assert len(ahead) >= 4
    assert sorted(job for _, kind, job, _ in events if kind == "started") == sorted(ahead)
    # A run begins at its claim, or at its start if it was claimed ahead.
    runs = ["end" if kind == "completed" else "start" for _, kind, job, _ in events
            if kind != "claimed" or job not in ahead]
    assert runs == ["start", "end"] * 8
    assert conn.execute("SELECT count(*) FROM jobs WHERE state = 'completed' AND attempts = 1"
                        ).fetchone() == (8,)
    assert "started" in queuectl("history", ahead[0]).stdout


def test_a_long_job_gives_back_the_jobs_claimed_behind_it(db, conn):
    """A job claimed ahead waits behind the running one; once that has run past a second,
    its worker gives them back (released, no attempt counted) so that other workers may
    take them, and shows the long job as its current one throughout."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="quick")])
    decisions.enqueue(conn, [decisions.JobSpec(command="sleep 3", id="long")])
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"x{n}") for n in range(2)])
    worker = spawn("worker", "--burst", "--ahead", "16")
    try:
        wait_for(lambda: _events(conn, "started"), what="the long job's start", timeout=30)
        assert conn.execute("SELECT current_job FROM workers").fetchone() == ("long",)
        wait_for(lambda: len(_events(conn, "released")) == 2, what="the jobs given back",
                 timeout=30)
        assert conn.execute("SELECT current_job FROM workers").fetchone() == ("long",)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    released = _events(conn, "released")
    assert sorted(job for _, _, job, _ in released) == ["x0", "x1"]
    assert all(body["ahead"] and "ran over 1s" in body["reason"] for *_, body in released)
    assert conn.execute("SELECT id, state, attempts FROM jobs ORDER BY id").fetchall() == [
        ("long", "completed", 1), ("quick", "completed", 1), ("x0", "completed", 1),
        ("x1", "completed", 1)]
    assert "given back before it started" in queuectl("history", "x0").stdout


# -- append-only, by the database ----------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "UPDATE events SET body = '{}'",
    "DELETE FROM events",
    "TRUNCATE events",
    "INSERT INTO events (seq, at, type, body) VALUES (1, 'x', 'enqueued', '{}') "
    "ON CONFLICT (seq) DO UPDATE SET body = excluded.body",
])
def test_the_server_refuses_to_rewrite_the_ledger(db, conn, sql):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a")])
    before = conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
    with pytest.raises(store.driver_errors(), match="append-only"):
        conn.execute(sql)
    assert conn.execute("SELECT * FROM events ORDER BY seq").fetchall() == before


# -- servers and databases that cannot be used ----------------------------------------------


def test_an_unreachable_server_is_one_line_without_the_password():
    url = "postgresql://app:s3cret@127.0.0.1:1/q"
    line = one_error_line(queuectl("--db", url, "list"))
    assert line.startswith("Error: cannot connect to postgresql://app@127.0.0.1:1/q: ")
    assert "s3cret" not in line


def test_a_database_that_does_not_exist_is_one_line(db):
    missing = db.rsplit("/", 1)[0] + "/no_such_database_here"
    line = one_error_line(queuectl("--db", missing, "enqueue", "-c", "true"))
    assert "cannot connect to" in line and "no_such_database_here" in line


def test_a_database_of_someone_elses_is_refused_and_left_alone():
    with pg_database() as url:
        with __import__("psycopg").connect(url, autocommit=True) as other:
            other.execute("CREATE TABLE invoices (id serial PRIMARY KEY, total numeric)")
        line = one_error_line(queuectl("--db", url, "enqueue", "-c", "true"))
        assert line == f"Error: {url} is not a queuectl database (it holds other tables)"
        with __import__("psycopg").connect(url, autocommit=True) as other:
            tables = {r[0] for r in other.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()")}
        assert tables == {"invoices"}


READS = [["status"], ["list"], ["show", "a"], ["logs", "a"], ["history", "a"], ["dlq", "list"],
         ["queues"], ["schedule", "list"], ["stats"], ["config", "get"], ["ledger", "export"],
         ["rebuild", "--check"], ["rebuild"], ["cancel", "a"], ["dlq", "retry", "a"],
         ["schedule", "remove", "s"], ["prune", "--before", "1d"],
         ["dashboard", "--port", "0"]]


def _made_by_anyone(url: str) -> tuple[int, int]:
    """Relations and functions in the database outside the system's own schemas."""
    with __import__("psycopg").connect(url, autocommit=True) as conn:
        outside = ("NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg_toast%'")
        (relations,) = conn.execute(
            "SELECT count(*) FROM pg_class JOIN pg_namespace n ON n.oid = relnamespace "
            f"WHERE nspname {outside}").fetchone()
        (functions,) = conn.execute(
            "SELECT count(*) FROM pg_proc JOIN pg_namespace n ON n.oid = pronamespace "
            f"WHERE nspname {outside}").fetchone()
    return relations, functions


@pytest.mark.parametrize("args", READS, ids=[" ".join(a) for a in READS])
def test_a_read_never_creates_the_schema(db, args):
    """As on SQLite, where a read refuses a file that does not exist: a typo in --db (the
    server's own ``postgres`` database, say) must not quietly give an empty queue, nor
    leave queuectl's tables and functions in someone's database."""
    line = one_error_line(queuectl("--db", db, *args))
    assert line == (f"Error: no queuectl database at {db} (commands that write, such as "
                    "enqueue, create it)")
    assert _made_by_anyone(db) == (0, 0)


def test_a_password_in_the_url_is_never_printed(db):
    with_password = db.replace("://root@", "://root:hunter2@")  # trust auth ignores it
    for args in (["enqueue", "--id", "p", "-c", "true"], ["status"], ["list"],
                 ["worker", "--burst", "-v"], ["show", "nope"], ["history", "p"]):
        result = queuectl("--db", with_password, *args)
        assert "hunter2" not in result.stdout + result.stderr, args
    assert store.shown(with_password) == db


def test_without_psycopg_the_extra_is_named(db):
    code = ("import sys; sys.modules['psycopg'] = None; "
            "from queuectl.cli import main; sys.argv = ['queuectl', 'list']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parent.parent)
    assert one_error_line(result) == (
        "Error: PostgreSQL support needs psycopg: from queuectl's clone, "
        "pip install '.[postgres]'")


# -- faults: workers survive and lose nothing ---------------------------------------------


@contextmanager
def private_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL server of this test's own: a cluster made for it with Debian's tools,
    trust on loopback, dropped afterwards. Restarting it disturbs no other test running
    beside this one. Gives the URL of a database on it, and what restarts the server; the
    database is checked for replay drift before it goes, as the fixtures check theirs."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    name = f"queuectl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(["pg_createcluster", version, name, "--port", str(port), "--",
                    "--auth=trust"], check=True, capture_output=True, timeout=120)
    control = ["pg_ctlcluster", "--skip-systemctl-redirect", version, name]
    try:
        subprocess.run([*control, "start"], check=True, capture_output=True, timeout=120)
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        wait_for(lambda: _server_answers(admin), 60, "the private server to answer")
        with closing(psycopg.connect(admin, autocommit=True)) as conn:
            conn.execute("CREATE DATABASE queue")
        url = admin.rsplit("/", 1)[0] + "/queue"
        yield url, lambda: subprocess.run([*control, "restart"], check=True,
                                          capture_output=True, timeout=120)
        wait_for(lambda: _server_answers(url), 60, "the private server to answer")
        assert replay_problems(url) == []
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True,
                       timeout=120)


def _jobs_run_through(db: str, disturb: Callable[[], None], n: int = 300) -> None:
    """``n`` short jobs, two worker processes of two workers each; ``disturb`` strikes when
    a third of the jobs are done. Every job must complete exactly once, and the workers
    outlive it."""
    with closing(ledger.connect(db)) as conn:  # the first use: it creates the schema
        decisions.enqueue(conn, [decisions.JobSpec(command="sleep 0.02", id=f"j{i}")
                                 for i in range(n)])
    workers = [spawn("worker", "-c", "2", "-s", "0.2", start_new_session=True)
               for _ in range(2)]
    try:
        def completed() -> int:
            with by_hand(db) as conn:
                return int(conn.execute(
                    "SELECT n FROM job_counts WHERE state = 'completed'").fetchone()[0])

        wait_for(lambda: completed() >= n // 3, 120, "a third of the jobs")
        disturb()
        wait_for(lambda: _answers(db) and completed() == n, 180, "every job completed")
        assert [w.poll() for w in workers] == [None, None]  # the workers lived through it
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        results = [w.communicate(timeout=60) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], results
    with by_hand(db) as conn:
        done = dict(conn.execute("SELECT job_id, count(*) FROM events WHERE type = 'completed' "
                                 "GROUP BY job_id").fetchall())
        expired = {r[0] for r in conn.execute(
            "SELECT job_id FROM events WHERE type = 'lease-expired'")}
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
    assert len(done) == n
    assert all(count == 1 or job in expired for job, count in done.items())
    assert seqs == list(range(1, len(seqs) + 1))


def _server_answers(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def _answers(db: str) -> bool:
    try:
        with by_hand(db):
            return True
    except store.driver_errors() + (StoreError,):
        return False


@pytest.mark.slow
def test_workers_survive_a_restart_of_the_server(monkeypatch):
    """On a server of the test's own, restarted while the workers run."""
    if not os.path.isdir("/etc/postgresql") or not shutil.which("pg_createcluster"):
        needs("/usr/bin/pg_createcluster", "the local PostgreSQL server's tools")
    with private_server() as (url, restart):
        monkeypatch.setenv("QUEUECTL_DB", url)
        _jobs_run_through(url, restart)


def _kill_backend_of(conn) -> None:
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with by_hand(conn.url) as other:
        other.execute("SELECT pg_terminate_backend(?)", (pid,))


@pytest.mark.stores("postgres")
@pytest.mark.parametrize("ask", ["clock", "next seq"])
def test_a_lost_connection_is_reported_as_one_whatever_asks_first(db, conn, ask):
    """Every statement reports a lost connection as StoreUnavailable, which callers turn
    into a reconnect (a worker) or a 503 (the dashboard), never a driver's traceback: the
    clock's measure against the server's, and the ledger's head read outside a write."""
    _kill_backend_of(conn)
    with pytest.raises(StoreUnavailable, match="lost the connection"):
        if ask == "clock":
            conn._measured = -1e9  # due for its measure against the server's clock
            conn.now()
        else:
            ledger.next_seq(conn)
    conn.reconnect()
    assert ledger.next_seq(conn) >= 1


@pytest.mark.slow
def test_workers_survive_their_connections_being_killed(db):
    def kill_connections() -> None:
        for _ in range(3):
            with by_hand(db) as conn:
                killed = conn.execute(  # this test's database only: others run beside it
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'queuectl%' AND pid <> pg_backend_pid() "
                    "AND datname = current_database()").fetchone()[0]
            assert killed >= 2
            time.sleep(0.5)

    _jobs_run_through(db, kill_connections)


@pytest.mark.slow
def test_many_hosts_share_one_queue_through_kill_9s(db):
    """Three worker processes presenting three hosts, -c 4 each, on 2,000 jobs while some
    are killed with kill -9 and others start: every job completes, none twice but through a
    recorded lease expiry, the ledger is contiguous and replays exactly (the fixture)."""
    n = 2000
    with closing(ledger.connect(db)) as conn:  # the first use: it creates the schema
        decisions.set_config(conn, "heartbeat-interval", "0.3")
        decisions.set_config(conn, "lease-timeout", "1.5")
        decisions.enqueue(conn, [decisions.JobSpec(command="sleep 0.005", id=f"m{i:04d}")
                                 for i in range(n)])

    def start(host: str) -> subprocess.Popen[str]:
        return spawn("worker", "-c", "4", "-s", "0.2", "--host-name", host,
                     start_new_session=True)

    def completed() -> int:
        with by_hand(db) as conn:
            return int(conn.execute(
                "SELECT n FROM job_counts WHERE state = 'completed'").fetchone()[0])

    running = {host: start(host) for host in ("alpha", "beta", "gamma")}
    killed = 0
    try:
        for share, victim, newcomer in ((3, "alpha", "delta"), (2, "beta", "epsilon")):
            wait_for(lambda s=share: completed() >= n // s, 180, f"1/{share} of the jobs")
            os.kill(running[victim].pid, signal.SIGKILL)
            running.pop(victim).wait()
            killed += 1
            running[newcomer] = start(newcomer)
        wait_for(lambda: completed() == n, 240, "every job completed")
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outcomes = [(proc.communicate(timeout=60), proc.returncode) for proc in running.values()]
    assert [code for _, code in outcomes] == [0, 0, 0], outcomes
    with by_hand(db) as conn:
        done = dict(conn.execute("SELECT job_id, count(*) FROM events WHERE type = 'completed' "
                                 "GROUP BY job_id").fetchall())
        expired = {r[0] for r in conn.execute(
            "SELECT job_id FROM events WHERE type = 'lease-expired'")}
        hosts = {r[0] for r in conn.execute("SELECT DISTINCT host FROM workers")}
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
        lost = conn.execute("SELECT count(*) FROM workers WHERE state = 'gone'").fetchone()[0]
    assert len(done) == n
    assert all(count == 1 or job in expired for job, count in done.items())
    assert hosts == {"alpha", "beta", "gamma", "delta", "epsilon"}
    assert lost == killed * 4  # every worker thread of each killed process was declared lost
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.slow
def test_processes_opening_a_new_database_at_once_all_get_in():
    """Each waits for the schema lock; one that gets it after another brought the schema up
    to date does not run its DDL again (which locked the ledger against the other's first
    transaction: a deadlock, and a command that failed)."""
    for _ in range(8):
        with pg_database() as url:
            procs = [spawn("--db", url, "enqueue", "-c", "true") for _ in range(3)]
            for proc in procs:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
