"""The ``workers`` projection: one row per worker that ever started.

Rules it enforces: a worker is ``active`` from its start until it stops (``stopped``) or is
declared lost (``gone``); ``last_heartbeat`` is the time of its latest heartbeat, claim or
result; a stop request flags exactly the workers active when it was appended, so workers
started later are not affected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import projections
from queuectl import events as ev
from queuectl.states import WorkerState
from queuectl.store import Db
from queuectl.store.statements import Change

NAME = "workers"
VERSION = 4
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


COLUMNS = ("id", "pid", "host", "state", "started_at", "last_heartbeat", "stopped_at",
           "stop_requested", "current_job", "jobs_done")

# How each event changes its worker's row: a change declared once (``statements.Change``)
# and its values, the worker's id last. The live path makes it one UPDATE, a replay
# applies it to rows held in memory (``Replay``).
Changed = tuple[Change, tuple[Any, ...]]


def _worker(fixed: dict[str, Any], *given: str, added: tuple[str, ...] = ()) -> Change:
    return Change("workers", "id", fixed, given, added)


_BEAT = _worker({}, "last_heartbeat")
_TAKE = _worker({}, "current_job", "last_heartbeat")
# A run ended by its worker: each adds one to the worker's jobs_done.
_DONE = _worker({"current_job": None}, "last_heartbeat", added=("jobs_done",))
_PUT_BACK = _worker({"current_job": None})
_LOST = _worker({"state": WorkerState.GONE, "current_job": None}, "stopped_at")
_STOPPED = _worker({"state": WorkerState.STOPPED, "current_job": None},
                   "stopped_at", "last_heartbeat")

_CHANGES: dict[type, Callable[[Any, str], Changed | None]] = {
    ev.WorkerHeartbeat: lambda e, at: (_BEAT, (at, e.worker_id)),
    # A job claimed ahead is its worker's current job once it has started.
    ev.Claimed: lambda e, at: ((_BEAT, (at, e.worker_id)) if e.ahead
                               else (_TAKE, (e.job_id, at, e.worker_id))),
    ev.Started: lambda e, at: (_TAKE, (e.job_id, at, e.worker_id)),
    ev.Completed: lambda e, at: (_DONE, (at, 1, e.worker_id)),
    ev.Failed: lambda e, at: (_DONE, (at, 1, e.worker_id)),
    ev.TimedOut: lambda e, at: (_DONE, (at, 1, e.worker_id)),
    # A running job stopped by its worker; a job cancelled before it ran had no worker.
    ev.Cancelled: lambda e, at: (
        (_DONE, (at, 1, e.worker_id)) if e.worker_id is not None else None),
    ev.Released: lambda e, at: None if e.ahead else (_PUT_BACK, (e.worker_id,)),
    ev.LeaseExpired: lambda e, at: (_LOST, (at, e.worker_id)),
    # Its worker stopped the run itself: a result, unless a rescuer had declared it gone.
    ev.Fenced: lambda e, at: None if e.rescued else (_DONE, (at, 1, e.worker_id)),
    ev.WorkerLost: lambda e, at: (_LOST, (at, e.worker_id)),
    ev.WorkerStopped: lambda e, at: (_STOPPED, (at, at, e.worker_id)),
}


def _row(at: str, e: ev.WorkerStarted) -> dict[str, Any]:
    return {"id": e.worker_id, "pid": e.pid, "host": e.host, "state": WorkerState.ACTIVE,
            "started_at": at, "last_heartbeat": at, "stopped_at": None, "stop_requested": 0,
            "current_job": None, "jobs_done": 0}



HANDLES = frozenset({ev.WorkerStarted, ev.StopRequested, ev.Pruned, *_CHANGES})  # the rest pass by

# A pruned event gives the rows of the workers its events named, as they stood: what a
# replay, without those events, could not work out.
_SNAPSHOT = ("state", "last_heartbeat", "stopped_at", "stop_requested", "current_job",
             "jobs_done")


def _snapshot(w: ev.PrunedWorker) -> dict[str, Any]:
    return {"state": w.state, "last_heartbeat": w.last_heartbeat, "stopped_at": w.stopped_at,
            "stop_requested": w.stop_requested, "current_job": w.current_job,
            "jobs_done": w.jobs_done}


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    kind = type(e)
    if kind is ev.WorkerStarted:
        tx.insert("workers", _row(at, e))
    elif kind is ev.StopRequested:
        _stop(tx)
    elif kind is ev.Pruned:
        for worker in e.workers:
            tx.update("workers", {"id": worker.worker_id}, _snapshot(worker))
    else:
        changes = _CHANGES[kind](e, at)
        if changes is not None:
            tx.change(*changes)


def live(kind: type) -> Callable[[Db, int, str, Any], None]:
    """What ``apply`` does with an event of ``kind``: its rule's change, looked up once."""
    rule = _CHANGES.get(kind)
    if rule is None:
        return apply

    def changed(tx: Db, seq: int, at: str, e: Any) -> None:
        changes = rule(e, at)
        if changes is not None:
            tx.change(*changes)

    return changed


def _stop(tx: Db) -> None:
    """A stop request flags every worker active at that moment."""
    tx.update("workers", {"state": WorkerState.ACTIVE.value}, {"stop_requested": 1},
              unique=False)


def apply_many(tx: Db, batch: list[tuple[int, str, ev.Event]]) -> None:
    """``apply`` over events in ledger order, with the changes of each worker's row merged
    into one UPDATE (a batch's result, claim and start of one worker). Merging is exact:
    a change depends on its event alone, a later value replaces an earlier one, and
    additions add up (``Change.then``). A start, a stop request or a pruned event writes
    what is merged first."""
    merged: dict[str, Changed] = {}

    def write() -> None:
        for change, values in merged.values():
            tx.change(change, values)
        merged.clear()

    for seq, at, event in batch:
        kind = type(event)
        e: Any = event  # of HANDLES
        if kind is ev.WorkerStarted or kind is ev.StopRequested or kind is ev.Pruned:
            write()
            apply(tx, seq, at, event)
            continue
        changes = _CHANGES[kind](e, at)
        if changes is None:
            continue
        earlier = merged.get(e.worker_id)
        if earlier is None:
            merged[e.worker_id] = changes
        else:
            then = earlier[0].then(changes[0])
            merged[e.worker_id] = then.merged, then.values(earlier[1], changes[1])
    write()


class Replay:
    """``apply`` for a replay into empty tables, on rows held in memory."""

    def __init__(self, tx: Db, find: projections.Find) -> None:
        self.tx = tx
        self.rows = projections.Rows(tx, "workers", COLUMNS, "id")

    def handler(self, kind: type) -> Callable[[int, str, Any], None]:
        """What to call with ``(seq, at, event)`` for events of this type."""
        if kind is ev.WorkerStarted:
            return lambda seq, at, e: self.rows.add(_row(at, e))
        if kind is ev.StopRequested:
            return self._stop_requested
        if kind is ev.Pruned:
            return self._pruned
        rule = _CHANGES[kind]
        # A worker's row is new until the first flush, then read back: either in one call.
        held, again, get = self.rows.new.get, self.rows.read.get, self.rows.get

        def changed(seq: int, at: str, e: Any) -> None:
            changes = rule(e, at)
            if changes is not None:
                row = held(e.worker_id) or again(e.worker_id) or get(e.worker_id)
                if row is not None:
                    changes[0].into(row, changes[1])

        return changed

    def _pruned(self, seq: int, at: str, e: ev.Pruned) -> None:
        for worker in e.workers:
            row = self.rows.get(worker.worker_id)
            if row is not None:
                row.update(_snapshot(worker))

    def _stop_requested(self, seq: int, at: str, e: ev.StopRequested) -> None:
        self.rows.flush()  # it reaches every active worker: let the table hold them all
        _stop(self.tx)

    def flush(self) -> None:
        self.rows.flush()

    close = flush
