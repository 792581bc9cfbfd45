"""The ``jobs`` projection: one row per job, ``job_deps`` (its dependencies) and
``job_counts`` (jobs per state).

Rules it enforces: a job's state follows only from its events. It starts ``waiting`` while a
job it depends on has not completed, ``scheduled`` while its ``run_at`` lies ahead, else
``pending``; a claim makes it ``processing``; then ``completed``, ``failed`` (waiting out its
backoff until ``run_at``), ``dead`` or ``cancelled``. ``attempts`` is the number of runs
started (a released run is given back). ``job_counts`` always equals
``SELECT state, count(*) FROM jobs GROUP BY state``, so ``status`` is O(1).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import projections
from queuectl import events as ev

NAME = "jobs"
VERSION = 4
TABLES = {"jobs": ("id",), "job_deps": ("job_id", "depends_on"), "job_counts": ("state",)}

# Partial-index predicates are written as OR chains, not ``IN (...)``: SQLite builds an
# ephemeral table for an IN list each time it evaluates one, which made every UPDATE of a
# job's state several times slower. A query uses such an index only when it repeats the
# predicate word for word, so queries take these constants too.
CLAIMABLE = "(state = 'pending' OR state = 'scheduled' OR state = 'failed')"
WAITING = "(state = 'scheduled' OR state = 'failed')"
# Jobs in the rarer states (list -s, rescue). Pending jobs are in jobs_ready and completed
# ones lie in rowid order: leaving both out spares each run several index pages.
INDEXED_STATES = (
    "(state = 'processing' OR state = 'failed' OR state = 'scheduled' OR state = 'waiting'"
    " OR state = 'dead' OR state = 'cancelled')"
)

DDL = (
    # seq (the enqueued event's) is the rowid: rows lie oldest first, so listing in
    # enqueue order needs no index and no sort.
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        command TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL,
        backoff_base REAL NOT NULL,
        backoff_max REAL NOT NULL DEFAULT 0,
        backoff_jitter REAL NOT NULL DEFAULT 0,
        timeout REAL NOT NULL DEFAULT 0,
        run_at TEXT,
        worker_id TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        last_error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE job_deps (
        job_id TEXT NOT NULL,
        depends_on TEXT NOT NULL,
        PRIMARY KEY (job_id, depends_on)
    )""",
    "CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    """INSERT INTO job_counts (state, n) VALUES ('pending', 0), ('scheduled', 0),
        ('waiting', 0), ('processing', 0), ('completed', 0), ('failed', 0), ('dead', 0),
        ('cancelled', 0)""",
)

# Indexes the readers and the queue's decisions use; the projector itself only needs the
# primary keys, so a replay builds these once at the end instead of row by row.
INDEXES = (
    # The claim query walks this index in order: highest priority first, then oldest.
    f"CREATE INDEX jobs_ready ON jobs (priority DESC, seq) WHERE {CLAIMABLE}",
    # When the next scheduled job or retry is due (pending jobs are due already).
    f"CREATE INDEX jobs_run_at ON jobs (run_at) WHERE {WAITING}",
    f"CREATE INDEX jobs_state ON jobs (state, seq) WHERE {INDEXED_STATES}",
    "CREATE INDEX job_deps_depends_on ON job_deps (depends_on)",
)

_INSERT = """INSERT INTO jobs (id, seq, command, state, priority, attempts, max_retries,
    backoff_base, backoff_max, backoff_jitter, timeout, run_at, created_at, updated_at)
    VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)"""
_COUNT = """INSERT INTO job_counts (state, n) VALUES (?, ?)
    ON CONFLICT (state) DO UPDATE SET n = n + excluded.n"""
# One statement moves a job between two counts: -1 for its current state, +1 for the new
# one, nothing when they are the same (every state has a row: see the seed in DDL).
_MOVE_COUNT = """UPDATE job_counts SET n = n + CASE state WHEN :new THEN 1 ELSE -1 END
    WHERE (state = :new OR state = (SELECT state FROM jobs WHERE id = :id))
    AND :new <> coalesce((SELECT state FROM jobs WHERE id = :id), '')"""
_UNFINISHED_DEPS = """SELECT count(*) FROM job_deps d JOIN jobs j ON j.id = d.depends_on
    WHERE d.job_id = ? AND j.state != 'completed'"""
_sql_cache: dict[tuple[str, ...], str] = {}


def _move(tx: sqlite3.Connection, job_id: str, at: str, state: str | None, **cols: Any) -> None:
    """Update one job; when ``state`` is given, move it and keep ``job_counts`` in step."""
    if state is not None:
        cols["state"] = state
        if not projections.replaying.get():  # a replay recomputes the counts at the end
            tx.execute(_MOVE_COUNT, {"new": state, "id": job_id})  # before the row moves
    keys = tuple(cols)
    sql = _sql_cache.get(keys)
    if sql is None:
        assigns = ", ".join(f"{k} = ?" for k in keys)
        sql = _sql_cache[keys] = f"UPDATE jobs SET {assigns}, updated_at = ? WHERE id = ?"
    if tx.execute(sql, (*cols.values(), at, job_id)).rowcount != 1:
        raise LookupError(f"event for unknown job {job_id!r}")


def _ready_state(run_at: str, at: str) -> str:
    return "scheduled" if run_at > at else "pending"


def _enqueued_row(seq: int, at: str, e: ev.Enqueued, state: str | None = None) -> tuple[Any, ...]:
    run_at = e.run_at if e.run_at and e.run_at > at else at
    state = state or _ready_state(run_at, at)
    return (e.job_id, seq, e.command, state, e.priority, e.max_retries, e.backoff_base,
            e.backoff_max, e.backoff_jitter, e.timeout, run_at, at, at)


def _enqueued(tx: sqlite3.Connection, seq: int, at: str, e: ev.Enqueued) -> None:
    for dep in e.after:
        tx.execute("INSERT INTO job_deps (job_id, depends_on) VALUES (?, ?)", (e.job_id, dep))
    blocked = bool(e.after) and tx.execute(_UNFINISHED_DEPS, (e.job_id,)).fetchone()[0] > 0
    row = _enqueued_row(seq, at, e, "waiting" if blocked else None)
    tx.execute(_INSERT, row)
    if not projections.replaying.get():
        tx.execute(_COUNT, (row[3], 1))


def _enqueued_many(tx: sqlite3.Connection, batch: list[tuple[int, str, ev.Enqueued]]) -> None:
    """Many plain enqueues (no dependencies) at once: one executemany, one count per state."""
    rows = [_enqueued_row(seq, at, e) for seq, at, e in batch]
    tx.executemany(_INSERT, rows)
    if not projections.replaying.get():
        for state in {row[3] for row in rows}:
            tx.execute(_COUNT, (state, sum(1 for row in rows if row[3] == state)))


def _claimed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Claimed) -> None:
    _move(tx, e.job_id, at, "processing", attempts=e.attempt, worker_id=e.worker_id, run_at=None)


def _completed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Completed) -> None:
    _move(tx, e.job_id, at, "completed", worker_id=None, exit_code=0, last_error=None,
          cancel_requested=0)


def _failed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Failed) -> None:
    # The state moves with the scheduled-retry or dead event appended with this one.
    _move(tx, e.job_id, at, None, worker_id=None, exit_code=e.exit_code, last_error=e.error)


def _timed_out(tx: sqlite3.Connection, seq: int, at: str, e: ev.TimedOut) -> None:
    error = f"timed out after {e.timeout:g}s"
    _move(tx, e.job_id, at, None, worker_id=None, exit_code=None, last_error=error)


def _lease_expired(tx: sqlite3.Connection, seq: int, at: str, e: ev.LeaseExpired) -> None:
    error = f"lease expired: worker {e.worker_id} stopped heartbeating"
    _move(tx, e.job_id, at, None, worker_id=None, exit_code=None, last_error=error)


def _released(tx: sqlite3.Connection, seq: int, at: str, e: ev.Released) -> None:
    _move(tx, e.job_id, at, "pending", attempts=e.attempt - 1, worker_id=None, run_at=at)


def _scheduled_retry(tx: sqlite3.Connection, seq: int, at: str, e: ev.ScheduledRetry) -> None:
    _move(tx, e.job_id, at, "failed", run_at=e.run_at, cancel_requested=0)


def _dead(tx: sqlite3.Connection, seq: int, at: str, e: ev.Dead) -> None:
    _move(tx, e.job_id, at, "dead", run_at=None, cancel_requested=0)


def _requeued(tx: sqlite3.Connection, seq: int, at: str, e: ev.Requeued) -> None:
    _move(tx, e.job_id, at, "pending", attempts=0, max_retries=e.max_retries, run_at=at)


def _unblocked(tx: sqlite3.Connection, seq: int, at: str, e: ev.Unblocked) -> None:
    (run_at,) = tx.execute("SELECT run_at FROM jobs WHERE id = ?", (e.job_id,)).fetchone()
    run_at = max(run_at or at, at)
    _move(tx, e.job_id, at, _ready_state(run_at, at), run_at=run_at)


def _cancel_requested(tx: sqlite3.Connection, seq: int, at: str, e: ev.CancelRequested) -> None:
    _move(tx, e.job_id, at, None, cancel_requested=1)


def _cancelled(tx: sqlite3.Connection, seq: int, at: str, e: ev.Cancelled) -> None:
    _move(tx, e.job_id, at, "cancelled", worker_id=None, run_at=None, cancel_requested=0,
          last_error=e.reason)


_HANDLERS: dict[type, Callable[..., None]] = {
    ev.Enqueued: _enqueued,
    ev.Claimed: _claimed,
    ev.Completed: _completed,
    ev.Failed: _failed,
    ev.TimedOut: _timed_out,
    ev.LeaseExpired: _lease_expired,
    ev.Released: _released,
    ev.ScheduledRetry: _scheduled_retry,
    ev.Dead: _dead,
    ev.Requeued: _requeued,
    ev.Unblocked: _unblocked,
    ev.CancelRequested: _cancel_requested,
    ev.Cancelled: _cancelled,
}


HANDLES = frozenset(_HANDLERS)  # event types this projection reads; the rest pass by


apply = projections.dispatcher(_HANDLERS)


def apply_many(tx: sqlite3.Connection, batch: list[tuple[int, str, ev.Event]]) -> None:
    """``apply`` over events in ledger order, with runs of plain enqueues inserted together
    (bulk enqueue and replay). The rows are exactly those ``apply`` would write."""
    plain: list[tuple[int, str, ev.Enqueued]] = []
    for seq, at, event in batch:
        if type(event) is ev.Enqueued and not event.after:
            plain.append((seq, at, event))
            continue
        if plain:
            _enqueued_many(tx, plain)
            plain = []
        apply(tx, seq, at, event)
    if plain:
        _enqueued_many(tx, plain)


def after_replay(tx: sqlite3.Connection) -> None:
    """Recompute ``job_counts`` once, instead of per event, after a replay."""
    tx.execute("UPDATE job_counts SET n = 0")
    tx.execute(
        """INSERT INTO job_counts (state, n) SELECT state, count(*) FROM jobs GROUP BY state
        ON CONFLICT (state) DO UPDATE SET n = excluded.n"""
    )
