"""The projections: tables derived from the ledger, each owned by one module.

A projection module exposes ``NAME``, ``VERSION``, ``TABLES`` (the tables it owns, each with
its primary key), ``DDL`` and ``apply(tx, seq, at, event)``. ``apply`` must be deterministic:
it may use only the event, its ``seq`` and its ``at``; never the clock, the current config, the
environment or random numbers, so that replaying the ledger gives back exactly the same rows.
"""

from __future__ import annotations

from types import ModuleType

from projections import config, jobs, runs, workers

# A projector reads only its own tables, so each can be rebuilt alone.
REGISTRY: tuple[ModuleType, ...] = (jobs, runs, workers, config)
