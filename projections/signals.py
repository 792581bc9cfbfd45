"""The ``signals`` projection: signals asked for running jobs (``queuectl signal``), and
whether their workers delivered them.

Rules it enforces: a request is pending (``handled_at`` NULL) from its ``signal-requested``
until a ``signalled`` names it; each names the run (the seq of its claim) it is for, so a request
its run ended before delivering is never delivered to a later run of the job.
"""

from __future__ import annotations

from typing import Any

from queuectl import events as ev
from queuectl.store import Db

NAME = "signals"
VERSION = 1
TABLES = {"signals": ("seq",)}

DDL = (
    """CREATE TABLE signals (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        run INTEGER NOT NULL,
        signal INTEGER NOT NULL,
        requested_at TEXT NOT NULL,
        handled_at TEXT,
        delivered INTEGER NOT NULL DEFAULT 0
    )""",
)

INDEXES = ("CREATE INDEX signals_job ON signals (job_id, run)",)

HANDLES = frozenset({ev.SignalRequested, ev.Signalled, ev.Pruned})


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    kind = type(e)
    if kind is ev.SignalRequested:
        tx.insert("signals", {"seq": seq, "job_id": e.job_id, "run": e.run,
                              "signal": e.signal, "requested_at": at})
    elif kind is ev.Signalled:
        tx.update("signals", {"seq": e.request},
                  {"handled_at": at, "delivered": int(e.delivered)})
    elif kind is ev.Pruned:
        tx.delete("signals", "job_id", e.jobs)
