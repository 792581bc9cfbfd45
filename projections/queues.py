"""The ``queues`` projection: the settings of each named queue someone paused or limited.

Rules it enforces: a queue is paused from its latest ``queue-paused`` until a
``queue-resumed``; its limit (jobs of it processing at once, across every worker on every
host; 0 is none) is the one in its latest ``queue-limited``. Queues never paused or limited
have no row: their jobs alone make them exist (``job_counts``).
"""

from __future__ import annotations

from queuectl import events as ev
from queuectl.store import Db

NAME = "queues"
VERSION = 1
TABLES = {"queues": ("name",)}

DDL = (
    """CREATE TABLE queues (
        name TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0,
        job_limit INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    )""",
)

HANDLES = frozenset({ev.QueuePaused, ev.QueueResumed, ev.QueueLimited})

def apply(tx: Db, seq: int, at: str, event: ev.Event) -> None:
    """The queue's row, made by its first such event; each sets only what it is about."""
    if isinstance(event, ev.QueueLimited):
        row = {"name": event.queue, "job_limit": event.limit, "updated_at": at}
    elif isinstance(event, ev.QueuePaused | ev.QueueResumed):
        row = {"name": event.queue, "paused": int(isinstance(event, ev.QueuePaused)),
               "updated_at": at}
    else:
        return
    tx.insert("queues", row, key=("name",), clash="set")
