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
        lib = _libpq()
        if lib is not None:
            return _libpq_rows(lib, target, sql, params)
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


# -- PostgreSQL without psycopg ------------------------------------------------------------
# Importing psycopg takes about 100 ms, more than a Tab may take in all. A completion needs
# one query, so where the system has libpq it asks through libpq itself (ctypes: about
# 20 ms with the connection); elsewhere it takes psycopg as every other command does.

_OK, _TUPLES_OK = 0, 2  # libpq's CONNECTION_OK and PGRES_TUPLES_OK


def _libpq() -> Any:
    """The system's libpq, its functions typed for ctypes; None where there is none."""
    import ctypes

    for name in ("libpq.so.5", "libpq.5.dylib"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        pointer, text, number = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        texts = ctypes.POINTER(ctypes.c_char_p)
        for function, result, arguments in (
                ("PQconnectdbParams", pointer, [texts, texts, number]),
                ("PQstatus", number, [pointer]),
                ("PQexecParams", pointer,
                 [pointer, text, number, pointer, texts, pointer, pointer, number]),
                ("PQresultStatus", number, [pointer]),
                ("PQntuples", number, [pointer]),
                ("PQnfields", number, [pointer]),
                ("PQgetvalue", text, [pointer, number, number]),
                ("PQgetisnull", number, [pointer, number, number]),
                ("PQclear", None, [pointer]),
                ("PQfinish", None, [pointer])):
            getattr(lib, function).restype = result
            getattr(lib, function).argtypes = arguments
        return lib
    return None


def _libpq_rows(lib: Any, url: str, sql: str, params: tuple[Any, ...]
                ) -> list[tuple[Any, ...]]:
    """One read-only query through libpq, text in and out, as the psycopg path asks it."""
    import ctypes
    import re

    def array(values: list[str | None]) -> Any:
        return (ctypes.c_char_p * len(values))(
            *[None if v is None else v.encode() for v in values])

    settings = {"dbname": url, "connect_timeout": "2", "client_encoding": "UTF8",
                "application_name": "queuectl-complete",
                "options": "-c default_transaction_read_only=on -c statement_timeout=1000"}
    conn = lib.PQconnectdbParams(array([*settings, None]), array([*settings.values(), None]), 1)
    try:
        if lib.PQstatus(conn) != _OK:
            raise ConnectionError("libpq could not connect")
        marks = iter(range(1, sql.count("?") + 1))
        numbered = re.sub(r"\?", lambda _: f"${next(marks)}", sql)
        result = lib.PQexecParams(conn, numbered.encode(), len(params), None,
                                  array([str(p) for p in params]), None, None, 0)
        try:
            if lib.PQresultStatus(result) != _TUPLES_OK:
                raise ConnectionError("libpq: the query failed")
            return [tuple(None if lib.PQgetisnull(result, row, column)
                          else lib.PQgetvalue(result, row, column).decode()
                          for column in range(lib.PQnfields(result)))
                    for row in range(lib.PQntuples(result))]
        finally:
            lib.PQclear(result)
    finally:
        lib.PQfinish(conn)
