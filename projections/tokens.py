"""The ``tokens`` projection: the HTTP API's bearer tokens that are in force.

Rules it enforces: a token exists from its ``token-added`` until its ``token-revoked``; only
its SHA-256 is kept (the ledger never holds a token); a name is held by one token at a time,
and a revoked token's name may be given to a new one.
"""

from __future__ import annotations

from typing import Any

from queuectl import events as ev
from queuectl.store import Db

NAME = "tokens"
VERSION = 1
TABLES = {"tokens": ("name",)}

DDL = (
    """CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL
    )""",
)

HANDLES = frozenset({ev.TokenAdded, ev.TokenRevoked})


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    if type(e) is ev.TokenAdded:
        tx.insert("tokens", {"name": e.name, "scope": e.scope, "hash": e.hash,
                             "created_at": at, "created_by": e.by})
    elif type(e) is ev.TokenRevoked:
        tx.delete("tokens", "name", [e.name],
                  missing=LookupError(f"event for unknown token {e.name!r}"))
