"""The ``config`` projection: the settings a user has set, latest value per key.

Rule it enforces: a key's value is the one in its latest ``config-changed`` event; keys never
set are absent (their defaults live in ``queuectl.settings``), so defaults can improve without
rewriting history.
"""

from __future__ import annotations

from queuectl import events as ev
from queuectl.store import Db

NAME = "config"
VERSION = 1
TABLES = {"config": ("key",)}

DDL = (
    """CREATE TABLE config (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
)


HANDLES = frozenset({ev.ConfigChanged})


def apply(tx: Db, seq: int, at: str, event: ev.Event) -> None:
    if isinstance(event, ev.ConfigChanged):
        tx.insert("config", {"key": event.key, "value": event.value, "updated_at": at},
                  key=("key",), clash="set")
