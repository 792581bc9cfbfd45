"""The bench's own reads and writes of the store under test, outside any figure."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from queuectl import decisions, ledger
from queuectl.store import is_postgres


@contextmanager
def reading(db: Path | str) -> Iterator[Any]:
    """A plain connection for the bench's own queries (``?`` placeholders) on either store."""
    conn: Any = ledger.connect(db, create=False) if is_postgres(db) else sqlite3.connect(db)
    try:
        yield conn
    finally:
        conn.close()


def enqueue_true(db: Path | str, n: int, command: str = "true") -> None:
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command=command) for _ in range(n)])
    finally:
        conn.close()


def job_counts(db: Path | str) -> dict[str, int]:
    with reading(db) as conn:
        return dict(conn.execute(
            "SELECT state, sum(n) FROM job_counts GROUP BY state HAVING sum(n) != 0").fetchall())


def claims_span(db: Path | str) -> float:
    """Seconds from the first claim to the last result, by the ledger's own times: a run
    without its processes' start-up and exit."""
    with reading(db) as conn:
        first, last = conn.execute(
            "SELECT min(at), max(at) FROM events WHERE type IN ('claimed', 'completed')"
        ).fetchone()
    return parse_at(last) - parse_at(first)


def first_claim_at(db: Path | str) -> float:
    """The wall-clock time of the ledger's first claim (the store's clock: on PostgreSQL
    the server's)."""
    with reading(db) as conn:
        (first,) = conn.execute("SELECT min(at) FROM events WHERE type = 'claimed'").fetchone()
    return parse_at(first)


def parse_at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
