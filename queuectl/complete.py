"""Shell completion of what only the database knows: job ids, queue names, schedule names.

click calls these while the shell waits, on every Tab. Each opens the database that
``--db`` or ``QUEUECTL_DB`` names read-only (never creating one), asks one query bounded by
an index range and a LIMIT, and closes it. A completion has no way to report an error, so
any failure (no database yet, a server that does not answer) offers nothing at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from queuectl import store

LIMIT = 50  # names offered at once
NEAR = 1000  # ids after the typed text that a completion of dead jobs looks among
_AFTER = "\U0010ffff"  # sorts after every character: [text, text + _AFTER) holds text*

# Each query takes the typed text's range (two values), then the LIMIT.
JOBS = "SELECT id, state FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT ?"
DEAD_JOBS = (f"SELECT id, state FROM (SELECT id, state FROM jobs WHERE id >= ? AND id < ? "
             f"ORDER BY id LIMIT {NEAR}) AS near WHERE state = 'dead' ORDER BY id LIMIT ?")
QUEUES = ("SELECT queue, NULL FROM (SELECT DISTINCT queue FROM job_counts UNION "
          "SELECT name FROM queues) AS named WHERE queue >= ? AND queue < ? "
          "ORDER BY queue LIMIT ?")
SCHEDULES = ("SELECT name, cron FROM schedules WHERE name >= ? AND name < ? "
             "ORDER BY name LIMIT ?")


def _rows(target: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    if store.is_postgres(target):
        import psycopg

        with psycopg.connect(target, autocommit=True, connect_timeout=2,
                             application_name="queuectl-complete",
                             options="-c default_transaction_read_only=on "
                                     "-c statement_timeout=1000") as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()
    import sqlite3

    uri = f"{Path(target).resolve().as_uri()}?mode=ro"  # ro: a missing file is an error
    lite = sqlite3.connect(uri, uri=True, timeout=0.2)
    try:
        return lite.execute(sql, params).fetchall()
    finally:
        lite.close()


def _offer(sql: str) -> Any:
    """A ``shell_complete`` callback offering the names ``sql`` finds from the typed text,
    each with what zsh and fish show beside it (a job's state, a schedule's cron)."""

    def offer(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        target = ctx.find_root().params.get("db") or store.default_target()
        try:
            rows = _rows(str(target), sql, (incomplete, incomplete + _AFTER, LIMIT))
        except Exception:  # a completion has nowhere to say what failed
            return []
        from click.shell_completion import CompletionItem

        return [CompletionItem(name, help=about) for name, about in rows]

    return offer


job_ids = _offer(JOBS)
dead_job_ids = _offer(DEAD_JOBS)
queue_names = _offer(QUEUES)
schedule_names = _offer(SCHEDULES)
