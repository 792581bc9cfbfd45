"""The ``runs`` projection: one row per run of a job, for ``stats`` and ``logs``.

Indexes are kept to what ``stats`` needs, since every run touches each of them.

Rules it enforces: a claim opens a run whose ``wait`` is how long the job had been eligible
(claim time minus its ``run_at``); the run's outcome event (completed, failed, timed-out,
lease-expired, released, cancelled) closes it with its duration; a ``dead`` event marks the
run that exhausted the job's retries. ``run_counts`` keeps all-time totals so that
``stats`` without ``--since`` reads no more than a few rows plus two index walks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import projections
from queuectl import clock
from queuectl import events as ev

NAME = "runs"
VERSION = 3
TABLES = {"runs": ("seq",), "run_counts": ("outcome",)}

DDL = (
    """CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker_id TEXT NOT NULL,
        claimed_at TEXT NOT NULL,
        wait REAL NOT NULL,
        finished_at TEXT,
        outcome TEXT,
        exit_code INTEGER,
        duration REAL,
        dead INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX runs_job ON runs (job_id, seq)",
    "CREATE INDEX runs_finished ON runs (finished_at)",
    "CREATE TABLE run_counts (outcome TEXT PRIMARY KEY, n INTEGER NOT NULL)",
)

# Only stats reads these; a replay builds them once at the end.
INDEXES = (
    "CREATE INDEX runs_duration ON runs (duration) WHERE duration IS NOT NULL",
    "CREATE INDEX runs_wait ON runs (wait)",
)

_COUNT = """INSERT INTO run_counts (outcome, n) VALUES (?, 1)
    ON CONFLICT (outcome) DO UPDATE SET n = n + 1"""
_CLOSE = """UPDATE runs SET finished_at = ?, outcome = ?, exit_code = ?, duration = ?
    WHERE job_id = ? AND finished_at IS NULL"""


def _claimed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Claimed) -> None:
    eligible = e.eligible_at
    wait = max(0.0, round(clock.seconds_between(eligible, at), 6)) if eligible else 0.0
    tx.execute(
        """INSERT INTO runs (seq, job_id, attempt, worker_id, claimed_at, wait)
        VALUES (?, ?, ?, ?, ?, ?)""",
        (seq, e.job_id, e.attempt, e.worker_id, at, wait),
    )
    if not projections.replaying.get():  # a replay recomputes the counts at the end
        tx.execute(_COUNT, ("claimed",))


def _close(tx: sqlite3.Connection, at: str, job_id: str, outcome: str,
           exit_code: int | None, duration: float | None) -> None:
    closed = tx.execute(_CLOSE, (at, outcome, exit_code, duration, job_id)).rowcount
    if closed and not projections.replaying.get():
        tx.execute(_COUNT, (outcome,))


def _completed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Completed) -> None:
    _close(tx, at, e.job_id, "completed", 0, e.duration)


def _failed(tx: sqlite3.Connection, seq: int, at: str, e: ev.Failed) -> None:
    _close(tx, at, e.job_id, "failed", e.exit_code, e.duration)


def _timed_out(tx: sqlite3.Connection, seq: int, at: str, e: ev.TimedOut) -> None:
    _close(tx, at, e.job_id, "timed-out", None, e.duration)


def _lease_expired(tx: sqlite3.Connection, seq: int, at: str, e: ev.LeaseExpired) -> None:
    _close(tx, at, e.job_id, "lease-expired", None, None)


def _released(tx: sqlite3.Connection, seq: int, at: str, e: ev.Released) -> None:
    _close(tx, at, e.job_id, "released", None, None)


def _cancelled(tx: sqlite3.Connection, seq: int, at: str, e: ev.Cancelled) -> None:
    if e.worker_id is not None:
        _close(tx, at, e.job_id, "cancelled", None, None)  # not a run time: it was cut


def _dead(tx: sqlite3.Connection, seq: int, at: str, e: ev.Dead) -> None:
    # A dead event always follows the event that closed the job's latest run.
    tx.execute(
        "UPDATE runs SET dead = 1 WHERE seq = (SELECT max(seq) FROM runs WHERE job_id = ?)",
        (e.job_id,),
    )
    if not projections.replaying.get():
        tx.execute(_COUNT, ("dead",))


_HANDLERS: dict[type, Callable[..., None]] = {
    ev.Claimed: _claimed,
    ev.Completed: _completed,
    ev.Failed: _failed,
    ev.TimedOut: _timed_out,
    ev.LeaseExpired: _lease_expired,
    ev.Released: _released,
    ev.Cancelled: _cancelled,
    ev.Dead: _dead,
}


HANDLES = frozenset(_HANDLERS)  # event types this projection reads; the rest pass by


apply = projections.dispatcher(_HANDLERS)


def after_replay(tx: sqlite3.Connection) -> None:
    """Recompute ``run_counts`` once, instead of per event, after a replay."""
    tx.execute("DELETE FROM run_counts")
    tx.execute(
        """INSERT INTO run_counts (outcome, n)
        SELECT outcome, count(*) FROM runs WHERE outcome IS NOT NULL GROUP BY outcome
        UNION ALL SELECT 'claimed', count(*) FROM runs HAVING count(*) > 0
        UNION ALL SELECT 'dead', count(*) FROM runs WHERE dead = 1 HAVING count(*) > 0"""
    )
