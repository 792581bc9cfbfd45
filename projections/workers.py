"""The ``workers`` projection: one row per worker that ever started.

Rules it enforces: a worker is ``active`` from its start until it stops (``stopped``) or is
declared lost (``gone``); ``last_heartbeat`` is the time of its latest heartbeat, claim or
result; a stop request flags exactly the workers active when it was appended, so workers
started later are not affected.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import projections
from queuectl import events as ev

NAME = "workers"
VERSION = 2
TABLES = {"workers": ("id",)}

DDL = (
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at TEXT NOT NULL,
        last_heartbeat TEXT NOT NULL,
        stopped_at TEXT,
        stop_requested INTEGER NOT NULL DEFAULT 0,
        current_job TEXT,
        jobs_done INTEGER NOT NULL DEFAULT 0
    )""",
)


def _started(tx: sqlite3.Connection, seq: int, at: str, e: ev.WorkerStarted) -> None:
    tx.execute(
        """INSERT INTO workers (id, pid, host, state, started_at, last_heartbeat)
        VALUES (?, ?, ?, 'active', ?, ?)""",
        (e.worker_id, e.pid, e.host, at, at),
    )


def _heartbeat(tx: sqlite3.Connection, seq: int, at: str, e: ev.WorkerHeartbeat) -> None:
    tx.execute("UPDATE workers SET last_heartbeat = ? WHERE id = ?", (at, e.worker_id))


def _claimed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Claimed) -> None:
    tx.execute(
        "UPDATE workers SET current_job = ?, last_heartbeat = ? WHERE id = ?",
        (e.job_id, at, e.worker_id),
    )


def _finished(
    tx: sqlite3.Connection, seq: int, at: str, e: ev.Completed | ev.Failed | ev.TimedOut | ev.Cancelled
) -> None:
    tx.execute(
        """UPDATE workers SET current_job = NULL, last_heartbeat = ?, jobs_done = jobs_done + 1
        WHERE id = ?""",
        (at, e.worker_id),
    )


def _cancelled(tx: sqlite3.Connection, seq: int, at: str, e: ev.Cancelled) -> None:
    if e.worker_id is not None:  # a running job, stopped by its worker
        _finished(tx, seq, at, e)


def _released(tx: sqlite3.Connection, seq: int, at: str, e: ev.Released) -> None:
    tx.execute("UPDATE workers SET current_job = NULL WHERE id = ?", (e.worker_id,))


def _gone(tx: sqlite3.Connection, seq: int, at: str, e: ev.LeaseExpired | ev.WorkerLost) -> None:
    tx.execute(
        "UPDATE workers SET state = 'gone', current_job = NULL, stopped_at = ? WHERE id = ?",
        (at, e.worker_id),
    )


def _stopped(tx: sqlite3.Connection, seq: int, at: str, e: ev.WorkerStopped) -> None:
    tx.execute(
        """UPDATE workers SET state = 'stopped', current_job = NULL, stopped_at = ?,
        last_heartbeat = ? WHERE id = ?""",
        (at, at, e.worker_id),
    )


def _stop_requested(tx: sqlite3.Connection, seq: int, at: str, e: ev.StopRequested) -> None:
    tx.execute("UPDATE workers SET stop_requested = 1 WHERE state = 'active'")


_HANDLERS: dict[type, Callable[..., None]] = {
    ev.WorkerStarted: _started,
    ev.WorkerHeartbeat: _heartbeat,
    ev.Claimed: _claimed,
    ev.Completed: _finished,
    ev.Failed: _finished,
    ev.TimedOut: _finished,
    ev.Released: _released,
    ev.Cancelled: _cancelled,
    ev.LeaseExpired: _gone,
    ev.WorkerLost: _gone,
    ev.WorkerStopped: _stopped,
    ev.StopRequested: _stop_requested,
}


HANDLES = frozenset(_HANDLERS)  # event types this projection reads; the rest pass by


apply = projections.dispatcher(_HANDLERS)
