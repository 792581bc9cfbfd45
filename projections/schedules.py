"""The ``schedules`` projection: one row per periodic job, as ``schedule list`` shows it.

Rules it enforces: a schedule exists from its ``schedule-added`` until its
``schedule-removed``; it is paused between ``schedule-paused`` and ``schedule-resumed``;
``next_at`` is the tick the latest of its events named (every tick a worker handles says
which comes next, so the projection never reads a clock or a cron expression); the last
tick handled, the job it made, and how many ticks made jobs or were skipped.
"""

from __future__ import annotations

from typing import Any

from projections.jobs import env_text
from queuectl import events as ev
from queuectl.store import Db

NAME = "schedules"
VERSION = 3
TABLES = {"schedules": ("name",)}

DDL = (
    """CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        cron TEXT NOT NULL,
        timezone TEXT NOT NULL,
        command TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        max_retries INTEGER,
        backoff_base REAL,
        timeout REAL,
        paused INTEGER NOT NULL DEFAULT 0,
        next_at TEXT NOT NULL,
        last_tick TEXT,
        last_job TEXT,
        fired INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        cwd TEXT,
        env TEXT,
        memory INTEGER,
        cpu_time INTEGER,
        open_files INTEGER
    )""",
)

HANDLES = frozenset({ev.ScheduleAdded, ev.ScheduleRemoved, ev.SchedulePaused,
                     ev.ScheduleResumed, ev.ScheduleFired, ev.ScheduleSkipped})



def _unknown(name: str) -> LookupError:
    return LookupError(f"event for unknown schedule {name!r}")


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    if isinstance(e, ev.ScheduleAdded):
        tx.insert("schedules", {
            "name": e.name, "cron": e.cron, "timezone": e.timezone, "command": e.command,
            "queue": e.queue, "priority": e.priority, "max_retries": e.max_retries,
            "backoff_base": e.backoff_base, "timeout": e.timeout, "next_at": e.next_at,
            "created_at": at, "updated_at": at, "cwd": e.cwd, "env": env_text(e.env),
            "memory": e.memory, "cpu_time": e.cpu_time, "open_files": e.open_files})
        return
    if isinstance(e, ev.ScheduleRemoved):
        tx.delete("schedules", "name", [e.name], missing=_unknown(e.name))
        return
    changes: dict[str, Any]
    adds: dict[str, int] = {}
    if isinstance(e, ev.SchedulePaused):
        changes = {"paused": 1}
    elif isinstance(e, ev.ScheduleResumed):
        changes = {"paused": 0, "next_at": e.next_at}
    elif isinstance(e, ev.ScheduleFired):
        changes = {"next_at": e.next_at, "last_tick": e.tick, "last_job": e.job_id}
        adds = {"fired": 1}
    else:  # ScheduleSkipped
        changes = {"next_at": e.next_at, "last_tick": e.tick}
        adds = {"skipped": 1}
    changes["updated_at"] = at
    tx.update("schedules", {"name": e.name}, changes, adds, missing=_unknown(e.name))
