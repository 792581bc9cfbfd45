"""The ``queues`` projection: the settings of each named queue someone paused or limited,
and the recent starts of each queue with a rate.

Rules it enforces: a queue is paused from its latest ``queue-paused`` until a
``queue-resumed``; its limit (jobs of it processing at once, across every worker on every
host; 0 is none) and its rate (at most ``rate`` starts in any ``period`` seconds; 0 is none)
are the ones in its latest ``queue-limited``. Queues never paused or limited have no row:
their jobs alone make them exist (``job_counts``).

``queue_starts`` holds, for each queue with a rate of N, the N latest starts that counted
against it (``rate_queue`` on ``claimed`` or ``started``), latest by their ledger time: enough
to tell whether any window of the period holds N starts already, even where ledger times
are not in seq order (on PostgreSQL a transaction takes its time before its turn to write).
A lower rate keeps the latest of them; no rate keeps none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import projections
from queuectl import events as ev
from queuectl.store import Db

NAME = "queues"
VERSION = 2
TABLES = {"queues": ("name",), "queue_starts": ("seq",)}

DDL = (
    """CREATE TABLE queues (
        name TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0,
        job_limit INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL,
        rate INTEGER NOT NULL DEFAULT 0,
        period INTEGER NOT NULL DEFAULT 0,
        held INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE queue_starts (
        seq INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        at TEXT NOT NULL
    )""",
)

# A claim counts a queue's starts since a time; a start replaces the queue's earliest.
INDEXES = ("CREATE INDEX queue_starts_at ON queue_starts (queue, at, seq)",)

HANDLES = frozenset({ev.QueuePaused, ev.QueueResumed, ev.QueueLimited, ev.Claimed,
                     ev.Started, ev.Pruned})

_STARTS = (ev.Claimed, ev.Started)
_RULES = "SELECT rate, held FROM queues WHERE name = ?"
_EARLIEST = "SELECT seq, at FROM queue_starts WHERE queue = ? ORDER BY at, seq LIMIT 1"
_LATEST = "SELECT seq FROM queue_starts WHERE queue = ? ORDER BY at DESC, seq DESC"


def apply(tx: Db, seq: int, at: str, event: ev.Event) -> None:
    """The queue's row, made by its first such event; each sets only what it is about."""
    if type(event) in _STARTS:  # most often a claim, of a queue without a rate
        if event.rate_queue:  # type: ignore[union-attr]
            _started(tx, seq, at, event.rate_queue)  # type: ignore[union-attr]
        return
    if isinstance(event, ev.Pruned):
        for queue, starts in event.starts.items():
            _restore(tx, queue, starts)
        return
    if isinstance(event, ev.QueueLimited):
        row: dict[str, Any] = {"name": event.queue, "job_limit": event.limit,
                               "rate": event.rate, "period": event.period, "updated_at": at}
        _keep_latest(tx, event.queue, event.rate)
    elif isinstance(event, ev.QueuePaused | ev.QueueResumed):
        row = {"name": event.queue, "paused": int(isinstance(event, ev.QueuePaused)),
               "updated_at": at}
    else:
        return
    tx.insert("queues", row, key=("name",), clash="set")


class Replay(projections.Passing):
    """``apply`` for a replay, holding no rows: a claim or start of a queue without a rate
    (nearly all of them) passes by in one call."""

    def handler(self, kind: type) -> Callable[[int, str, Any], None]:
        tx = self.tx
        if kind not in _STARTS:
            return projections.live(apply, tx)

        def started(seq: int, at: str, e: ev.Claimed | ev.Started) -> None:
            if e.rate_queue:
                _started(tx, seq, at, e.rate_queue)

        return started


def _started(tx: Db, seq: int, at: str, queue: str) -> None:
    """One more start of ``queue``: kept if it is among its ``rate`` latest."""
    found = tx.execute(_RULES, (queue,)).fetchone()
    if found is None or not found[0]:
        return  # decided under a rate since removed in the same transaction
    rate, held = found
    if held >= rate:
        earliest_seq, earliest_at = tx.execute(_EARLIEST, (queue,)).fetchone()
        if at < earliest_at:
            return  # later starts, by the ledger's times, fill the window already
        tx.delete("queue_starts", "seq", [earliest_seq])
    else:
        tx.update("queues", {"name": queue}, add={"held": 1})
    tx.insert("queue_starts", {"seq": seq, "queue": queue, "at": at})


def _keep_latest(tx: Db, queue: str, rate: int) -> None:
    """A new rate keeps the queue's latest ``rate`` starts (none without a rate)."""
    if tx.execute(_RULES, (queue,)).fetchone() is None:
        return
    latest = [row[0] for row in tx.execute(_LATEST, (queue,)).fetchall()]
    if len(latest) > rate:
        tx.delete("queue_starts", "seq", latest[rate:])
        tx.update("queues", {"name": queue}, {"held": rate})


def _restore(tx: Db, queue: str, starts: tuple[tuple[int, str], ...]) -> None:
    """The queue's recent starts as a prune found them: the events of some left the ledger,
    so a replay could not count them."""
    tx.delete("queue_starts", "queue", [queue])
    for seq, at in starts:
        tx.insert("queue_starts", {"seq": seq, "queue": queue, "at": at})
    tx.update("queues", {"name": queue}, {"held": len(starts)})
