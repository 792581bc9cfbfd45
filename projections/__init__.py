"""The projections: tables derived from the ledger, each owned by one module.

A projection module exposes ``NAME``, ``VERSION``, ``TABLES`` (the tables it owns, each with
its primary key(s)), ``DDL``, ``HANDLES`` (the event types it reads) and
``apply(tx, seq, at, event)``, and may expose ``INDEXES`` (built after a replay),
``after_replay(tx)`` and ``apply_many(tx, [(seq, at, event), ...])`` (the same rows as
``apply`` over the list, written in bulk). ``apply`` must be deterministic:
it may use only the event, its ``seq`` and its ``at``; never the clock, the current config, the
environment or random numbers, so that replaying the ledger gives back exactly the same rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextvars import ContextVar
from types import ModuleType

# True while the ledger is replayed into empty tables: projections may then skip keeping
# running aggregates per event and recompute them once in ``after_replay(tx)`` instead.
# The live path (incremental) and the replay path (recomputed) must agree; ``ledger.check``
# compares them, and every test runs that check on its database.
replaying: ContextVar[bool] = ContextVar("replaying", default=False)


def dispatcher(handlers: dict[type, Callable[..., None]]) -> Callable[..., None]:
    """A projection's ``apply``: the handler for the event's type, or nothing."""

    def apply(tx: sqlite3.Connection, seq: int, at: str, event: object) -> None:
        handler = handlers.get(type(event))
        if handler is not None:
            handler(tx, seq, at, event)

    return apply


from projections import config, jobs, runs, workers  # noqa: E402

# A projector reads only its own tables, so each can be rebuilt alone.
REGISTRY: tuple[ModuleType, ...] = (jobs, runs, workers, config)


def appliers(projections: tuple[ModuleType, ...], event_type: type) -> tuple:  # type: ignore[type-arg]
    """The ``apply`` functions of the projections that read ``event_type``, in order."""
    return tuple(p.apply for p in projections if event_type in p.HANDLES)
