"""The store contract: what every ``Db`` (SQLite's, PostgreSQL's) does, tested the same way
on each, as huey's storage tests and eventsourcing's recorder test cases do. The rest of
queuectl relies on exactly this and on nothing store-specific.

Each test writes to the projections' own tables inside a transaction it rolls back (or
through real events), so the database it leaves still replays to its projections."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import by_hand

from queuectl import clock, ledger, store
from queuectl import events as ev
from queuectl.errors import StoreError
from queuectl.store.statements import Change, Insert


class _Undo(Exception):
    """Raised at the end of a test's transaction, to roll it back."""


@contextmanager
def undone(conn: Any) -> Iterator[Any]:
    """A write transaction that is rolled back at its end, whatever the test wrote."""
    with pytest.raises(_Undo), conn.transaction():
        yield conn
        raise _Undo


def config_rows(conn: Any) -> dict[str, tuple[Any, ...]]:
    return {k: (v, at) for k, v, at in conn.execute(
        "SELECT key, value, updated_at FROM config ORDER BY key").fetchall()}


def counts(conn: Any, queue: str) -> dict[str, int]:
    return {state: int(n) for state, n in conn.execute(
        "SELECT state, n FROM job_counts WHERE queue = ?", (queue,)).fetchall()}


# -- inserts ----------------------------------------------------------------------------------


def test_an_insert_is_read_back_inside_its_transaction_and_gone_after_a_rollback(conn):
    with undone(conn):
        conn.insert("config", {"key": "k", "value": "1", "updated_at": "t"})
        assert config_rows(conn) == {"k": ("1", "t")}
    assert config_rows(conn) == {}


@pytest.mark.parametrize(("clash", "expected"), [
    ("ignore", {"k": ("1", "t1")}),
    ("set", {"k": ("2", "t2")}),
])
def test_an_insert_that_clashes_keeps_or_sets_the_row_as_asked(conn, clash, expected):
    with undone(conn):
        conn.insert("config", {"key": "k", "value": "1", "updated_at": "t1"})
        conn.insert("config", {"key": "k", "value": "2", "updated_at": "t2"}, key=("key",),
                    clash=clash)
        assert config_rows(conn) == expected


def test_an_insert_that_sets_on_a_clash_leaves_the_columns_it_does_not_name(conn):
    with undone(conn):
        conn.insert("queues", {"name": "q", "paused": 1, "job_limit": 3, "updated_at": "t1"})
        conn.insert("queues", {"name": "q", "paused": 0, "updated_at": "t2"}, key=("name",),
                    clash="set")
        assert conn.execute("SELECT paused, job_limit, updated_at FROM queues").fetchall() \
            == [(0, 3, "t2")]


def test_an_insert_that_adds_on_a_clash_adds_its_columns_to_the_rows(conn):
    key = ("queue", "state")
    with undone(conn):
        for n in (2, 3, -1):
            conn.insert("job_counts", {"queue": "q", "state": "pending", "n": n}, key=key,
                        clash="add")
        assert counts(conn, "q") == {"pending": 4}


def test_an_insert_that_may_not_clash_fails_the_transaction(conn):
    with pytest.raises(store.driver_errors()), conn.transaction():
        conn.insert("config", {"key": "k", "value": "1", "updated_at": "t"})
        conn.insert("config", {"key": "k", "value": "2", "updated_at": "t"})
        conn.execute("SELECT 1").fetchall()  # a store may send the insert with a read
    assert config_rows(conn) == {}


def test_many_rows_go_in_at_once_with_what_a_clash_does(conn):
    with undone(conn):
        conn.insert_many("config", ("key", "value", "updated_at"),
                         [(f"k{n}", str(n), "t") for n in range(3)])
        conn.insert_many("config", ("key", "value", "updated_at"), [("k1", "x", "u")],
                         key=("key",), clash="set")
        assert config_rows(conn) == {"k0": ("0", "t"), "k1": ("x", "u"), "k2": ("2", "t")}


def test_more_rows_than_one_statement_binds_all_go_in_and_a_clash_among_them_fails(conn):
    rows = [(f"k{n:04d}", str(n), "t") for n in range(700)]  # a store may bind them in parts
    with undone(conn):
        conn.insert_many("config", ("key", "value", "updated_at"), rows)
        assert config_rows(conn) == {key: (value, at) for key, value, at in rows}
    with pytest.raises(store.driver_errors()), conn.transaction():
        conn.insert_many("config", ("key", "value", "updated_at"), [*rows[:400], rows[3]])
    assert config_rows(conn) == {}


def test_a_store_tells_the_rows_of_its_bulk_writes_only_within_telling(conn):
    told: list[int] = []
    rows = [(f"k{n:05d}", str(n), "t") for n in range(12_001)]  # COPY's chunks on PostgreSQL
    with undone(conn):
        conn.insert_many("config", ("key", "value", "updated_at"), rows[:10])
        with conn.telling(told.append):
            conn.insert_many("config", ("key", "value", "updated_at"), rows[10:])
            first = conn.next_seq()
            conn.insert_events(conn.now(), [("stop-requested", None, None,
                                             '{"type":"stop-requested"}')] * 40)
        conn.insert_many("config", ("key", "value", "updated_at"), [("z", "1", "t")])
        assert len(config_rows(conn)) == len(rows) + 1
        assert conn.execute("SELECT count(*) FROM events WHERE seq >= ?",
                            (first,)).fetchone() == (40,)
    assert sum(told) == len(rows) - 10 + 40
    assert all(n > 0 for n in told)


def test_a_declared_insert_adds_its_row_and_may_not_clash(conn):
    setting = Insert("config", ("key", "value", "updated_at"))
    with undone(conn):
        conn.add(setting, ("k", "1", "t"))
        conn.add(setting, ("l", "it's", "t"))
        assert config_rows(conn) == {"k": ("1", "t"), "l": ("it's", "t")}
    with pytest.raises(store.driver_errors()), conn.transaction():
        conn.add(setting, ("k", "1", "t"))
        conn.add(setting, ("k", "2", "t"))
        conn.execute("SELECT 1").fetchall()  # a store may send the insert with a read
    assert config_rows(conn) == {}


def test_a_clash_needs_the_key_it_is_judged_on(conn):
    with pytest.raises(ValueError, match="key"):
        conn.insert("config", {"key": "k", "value": "1", "updated_at": "t"}, clash="set")


# -- updates ------------------------------------------------------------------------------------


def _workers(conn: Any, *ids: str) -> None:
    for worker_id in ids:
        conn.insert("workers", {"id": worker_id, "pid": 1, "host": "h", "state": "active",
                                "started_at": "t", "last_heartbeat": "t", "jobs_done": 0})


def _done(conn: Any) -> dict[str, tuple[Any, ...]]:
    return {w: (n, job) for w, n, job in conn.execute(
        "SELECT id, jobs_done, current_job FROM workers ORDER BY id").fetchall()}


def test_an_update_by_key_sets_and_adds(conn):
    with undone(conn):
        _workers(conn, "w1", "w2")
        conn.update("workers", {"id": "w1"}, {"current_job": "j"}, {"jobs_done": 2})
        conn.update("workers", {"id": "w1"}, add={"jobs_done": 3})
        assert _done(conn) == {"w1": (5, "j"), "w2": (0, None)}


def test_updates_of_many_rows_in_a_row_each_see_the_ones_before(conn):
    """A store may send a run of updates of one shape as one statement; the rows come out
    as one update at a time makes them, a row changed twice included."""
    with undone(conn):
        _workers(conn, "w1", "w2", "w3")
        for worker_id in ("w1", "w2", "w3", "w1", "w2", "w1"):
            conn.update("workers", {"id": worker_id}, {"current_job": worker_id},
                        {"jobs_done": 1})
        assert _done(conn) == {"w1": (3, "w1"), "w2": (2, "w2"), "w3": (1, "w3")}


def test_an_update_may_match_by_null_and_reach_many_rows(conn):
    with undone(conn):
        _workers(conn, "w1", "w2", "w3")
        conn.update("workers", {"id": "w2"}, {"current_job": "j"})
        conn.update("workers", {"state": "active", "current_job": None},
                    {"stop_requested": 1}, unique=False)
        assert conn.execute("SELECT id FROM workers WHERE stop_requested = 1 ORDER BY id"
                            ).fetchall() == [("w1",), ("w3",)]


def test_updates_of_the_same_columns_matched_or_changed_otherwise_are_told_apart(conn):
    """A store may find an update's statement by its shape: a column matched by a value and
    by NULL, or set and added, are shapes of their own, whichever came first."""
    with undone(conn):
        _workers(conn, "w1", "w2")
        conn.update("workers", {"id": "w1"}, {"current_job": "j"})
        conn.update("workers", {"state": "active", "current_job": "j"}, {"jobs_done": 4},
                    unique=False)
        conn.update("workers", {"state": "active", "current_job": None}, {"jobs_done": 7},
                    unique=False)
        conn.update("workers", {"id": "w1"}, add={"jobs_done": 1})
        conn.update("workers", {"id": "w2"}, {"jobs_done": 1})
        assert _done(conn) == {"w1": (5, "j"), "w2": (1, None)}


def test_an_update_that_finds_no_row_raises_what_it_was_given_and_writes_nothing(conn):
    with pytest.raises(LookupError, match="no such worker"), conn.transaction():
        _workers(conn, "w1")
        conn.update("workers", {"id": "w1"}, add={"jobs_done": 1})
        conn.update("workers", {"id": "nope"}, add={"jobs_done": 1},
                    missing=LookupError("no such worker"))
        conn.update("workers", {"id": "w1"}, add={"jobs_done": 1})
    assert _done(conn) == {}


# A declared change (statements.Change): fixed values, given columns, added amounts.
_SEEN = Change("workers", "id", {"state": "stopped"}, ("current_job",), ("jobs_done",),
               missing=lambda worker_id: LookupError(f"no worker {worker_id}"))
_OPEN_ONES = Change("workers", "state", {"stop_requested": 1}, null=("current_job",),
                    unique=False)


def test_a_declared_change_writes_its_fixed_given_and_added_values(conn):
    with undone(conn):
        _workers(conn, "w1", "w2")
        conn.change(_SEEN, ("j", 2, "w1"))
        conn.change(_SEEN, ("k", 3, "w1"))  # the same shape again, as a store may join
        conn.change(_SEEN, ("it's", 1, "w2"))  # a value is bound, quotes and all
        assert _done(conn) == {"w1": (5, "k"), "w2": (1, "it's")}
        assert conn.execute("SELECT DISTINCT state FROM workers").fetchall() == [("stopped",)]


def test_a_declared_change_may_match_by_null_and_reach_many_rows(conn):
    with undone(conn):
        _workers(conn, "w1", "w2", "w3")
        conn.update("workers", {"id": "w2"}, {"current_job": "j"})
        conn.change(_OPEN_ONES, ("active",))
        assert conn.execute("SELECT id FROM workers WHERE stop_requested = 1 ORDER BY id"
                            ).fetchall() == [("w1",), ("w3",)]


def test_a_declared_change_that_finds_no_row_raises_what_it_makes_of_the_key(conn):
    # Written together with others of its shape, the store may not know which missed.
    with pytest.raises(LookupError, match=r"no worker (nope|w1 \(or another of 2)"), \
            conn.transaction():
        _workers(conn, "w1")
        conn.change(_SEEN, ("j", 1, "w1"))
        conn.change(_SEEN, ("j", 1, "nope"))
        conn.change(_SEEN, ("j", 1, "w1"))
    assert _done(conn) == {}


def test_merged_changes_write_what_the_two_write_one_after_the_other(conn):
    later = Change("workers", "id", {"current_job": None}, ("last_heartbeat",), ("jobs_done",))
    then = _SEEN.then(later)
    assert _SEEN.then(later) is then  # made once a pair
    with undone(conn):
        _workers(conn, "w1", "w2")
        conn.change(_SEEN, ("j", 2, "w1"))
        conn.change(later, ("t1", 3, "w1"))
        conn.change(then.merged, then.values(("j", 2, "w2"), ("t1", 3, "w2")))
        assert conn.execute("SELECT id, state, current_job, last_heartbeat, jobs_done "
                            "FROM workers ORDER BY id").fetchall() == [
            ("w1", "stopped", None, "t1", 5), ("w2", "stopped", None, "t1", 5)]


def test_rows_written_back_whole(conn):
    with undone(conn):
        _workers(conn, "w1", "w2")
        conn.update_many("workers", "id", ("jobs_done", "current_job"),
                         [(7, "a", "w1"), (8, "b", "w2")])
        assert _done(conn) == {"w1": (7, "a"), "w2": (8, "b")}


# -- deletes ------------------------------------------------------------------------------------


def test_a_delete_takes_the_rows_of_its_keys(conn):
    with undone(conn):
        _workers(conn, "w1", "w2", "w3")
        conn.delete("workers", "id", ["w1", "w3"])
        assert _done(conn) == {"w2": (0, None)}


def test_a_delete_that_misses_a_key_raises_what_it_was_given(conn):
    with pytest.raises(LookupError, match="gone already"), conn.transaction():
        _workers(conn, "w1")
        conn.delete("workers", "id", ["w1", "w2"], missing=LookupError("gone already"))
    assert _done(conn) == {}


# -- transactions and reads -----------------------------------------------------------------------


def test_a_transaction_commits_on_success_and_says_it_is_one(conn):
    assert not conn.in_transaction
    with conn.transaction():
        assert conn.in_transaction
        conn.insert("config", {"key": "k", "value": "1", "updated_at": "t"})
    assert not conn.in_transaction
    # Written around the ledger (no event): put back as it was, for the replay check.
    with conn.transaction():
        conn.delete("config", "key", ["k"], missing=LookupError("k"))
    assert config_rows(conn) == {}


def test_a_snapshot_does_not_see_what_commits_after_it_began(db, conn):
    with conn.snapshot():
        before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        with by_hand(db) as other, ledger.write(other):
            ledger.append(other, ev.StopRequested())
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == before
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == before + 1


def test_an_index_mark_runs_on_every_store(conn):
    """The mark is SQLite's INDEXED BY there and nothing elsewhere: the query runs and
    answers the same."""
    sql = conn.dialect.sql(f"SELECT count(*) FROM jobs {store.index('jobs_state')} "
                           "WHERE state = 'dead' AND (state = 'processing' OR state = 'failed' "
                           "OR state = 'scheduled' OR state = 'waiting' OR state = 'dead' OR "
                           "state = 'cancelled')")
    assert ("INDEXED BY jobs_state" in sql) == (conn.kind == "sqlite")
    assert "/*index" not in sql
    assert conn.execute(sql).fetchone()[0] == 0


# -- the ledger's rows --------------------------------------------------------------------------


def test_events_take_gapless_seqs_in_order_and_one_time(conn):
    with conn.transaction():
        first = conn.next_seq()
        at = conn.now()
        assert conn.insert_events(at, [("stop-requested", None, None, '{"type":"stop-requested"}')]
                                  * 3) == first
        assert conn.next_seq() == first + 3
    # Written around append, with no worker for a stop request to reach: the projections
    # are what a replay of them gives.
    assert conn.execute("SELECT seq, at FROM events ORDER BY seq").fetchall() == [
        (first + n, at) for n in range(3)]


def test_the_clock_writes_iso_utc_and_stays_put_in_a_transaction(conn):
    with conn.transaction():
        first = conn.now()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first)
        assert conn.now() == first
    assert clock.seconds_between(first, conn.now()) >= 0


def test_copied_events_must_follow_the_ledgers_last(conn):
    with pytest.raises(StoreError, match="does not follow"), conn.transaction():
        conn.copy_events([(0, "t", "stop-requested", None, None, '{"type":"stop-requested"}')])


def test_an_archived_event_leaves_the_ledger_and_is_read_from_the_archive(conn):
    from queuectl import decisions, retention

    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a")])
    decisions.cancel(conn, "a")
    seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE job_id = 'a'")]
    retention.prune(conn, retention.cutoff(conn, "0s"))
    assert conn.execute("SELECT count(*) FROM events WHERE job_id = 'a'").fetchone() == (0,)
    assert [row[0] for row in conn.archived("a")] == seqs
    assert [row[2] for row in conn.archived("a")] == ["enqueued", "cancelled"]


# -- the connection --------------------------------------------------------------------------------


def test_a_reconnect_counts_a_generation_where_there_is_a_server(conn):
    before = conn.generation
    conn.reconnect()
    assert conn.generation == before + (conn.kind == "postgres")
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] >= 0


def test_a_store_in_memory_replays_a_ledger_aside(conn):
    fresh = store.memory()
    try:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
    finally:
        fresh.close()
    assert ledger.check(conn) == []


def test_read_once_reads_what_the_commands_read(db, conn):
    from queuectl import decisions

    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a")])
    assert store.read_once(str(db), "SELECT id FROM jobs WHERE id >= ?", ("a",)) == [("a",)]
