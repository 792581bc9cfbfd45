"""The ``hooks`` projection: the hooks people added (``hooks``), and the jobs hooks made
(``hook_jobs``), with what fired each.

Rules it enforces: a hook exists from its ``hook-added`` until its ``hook-removed``; a job
is a hook job when its ``enqueued`` event says what fired it, and then it has a row here,
which leaves with the job when it is pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import projections
from queuectl import events as ev
from queuectl.store import Db

NAME = "hooks"
VERSION = 1
TABLES = {"hooks": ("name",), "hook_jobs": ("job_id",)}

DDL = (
    """CREATE TABLE hooks (
        name TEXT PRIMARY KEY,
        states TEXT NOT NULL,
        queue TEXT,
        to_queue TEXT,
        command TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE hook_jobs (
        job_id TEXT PRIMARY KEY,
        hook TEXT NOT NULL,
        source_job TEXT NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        queue TEXT NOT NULL,
        command TEXT NOT NULL
    )""",
)

HANDLES = frozenset({ev.HookAdded, ev.HookRemoved, ev.Enqueued, ev.Pruned})


def _unknown(name: str) -> LookupError:
    return LookupError(f"event for unknown hook {name!r}")


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    kind = type(e)
    if kind is ev.Enqueued:
        if e.hook is not None:
            made = e.hook
            tx.insert("hook_jobs", {
                "job_id": e.job_id, "hook": made.name, "source_job": made.job_id,
                "state": made.state, "exit_code": made.exit_code, "queue": made.queue,
                "command": made.command})
    elif kind is ev.HookAdded:
        tx.insert("hooks", {"name": e.name, "states": ",".join(e.on), "queue": e.queue,
                            "to_queue": e.to_queue, "command": e.command, "created_at": at})
    elif kind is ev.HookRemoved:
        tx.delete("hooks", "name", [e.name], missing=_unknown(e.name))
    elif kind is ev.Pruned:
        tx.delete("hook_jobs", "job_id", e.jobs)


class Replay(projections.Passing):
    """``apply`` for a replay, holding no rows: an enqueued event that made no hook job
    (nearly all of them) passes by in one call."""

    def handler(self, kind: type) -> Callable[[int, str, Any], None]:
        tx = self.tx
        if kind is not ev.Enqueued:
            return projections.live(apply, tx)

        def enqueued(seq: int, at: str, e: ev.Enqueued) -> None:
            if e.hook is not None:
                apply(tx, seq, at, e)

        return enqueued


def apply_many(tx: Db, batch: list[tuple[int, str, ev.Event]]) -> None:
    """``apply`` over a batch: most are plain enqueues (a bulk enqueue), which pass by."""
    for seq, at, event in batch:
        if type(event) is not ev.Enqueued or event.hook is not None:
            apply(tx, seq, at, event)
