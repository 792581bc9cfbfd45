"""Shell completion of what only the database knows: job ids, queue names, schedule names.

click calls these while the shell waits, on every Tab. Each opens the database that
``--db`` or ``QUEUECTL_DB`` names read-only (never creating one), asks one query bounded by
an index range and a LIMIT, and closes it. A completion has no way to report an error, so
any failure (no database yet, a server that does not answer) offers nothing at all.
"""

from __future__ import annotations

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


def _offer(sql: str) -> Any:
    """A ``shell_complete`` callback offering the names ``sql`` finds from the typed text,
    each with what zsh and fish show beside it (a job's state, a schedule's cron)."""

    def offer(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        target = ctx.find_root().params.get("db") or store.default_target()
        try:
            rows = store.read_once(str(target), sql, (incomplete, incomplete + _AFTER, LIMIT))
        except Exception:  # a completion has nowhere to say what failed
            return []
        from click.shell_completion import CompletionItem

        return [CompletionItem(name, help=about) for name, about in rows]

    return offer


job_ids = _offer(JOBS)
dead_job_ids = _offer(DEAD_JOBS)
queue_names = _offer(QUEUES)
schedule_names = _offer(SCHEDULES)
