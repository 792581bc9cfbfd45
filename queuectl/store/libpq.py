"""One query through the system's libpq, by ctypes, for callers that cannot wait for
psycopg's import: a shell completion asks one query and is gone.

Importing psycopg takes longer than a Tab may take in all; libpq with its connection is a
fraction of that (bench scenario startup). Where there is no system libpq, callers take
psycopg.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

_OK, _TUPLES_OK = 0, 2  # libpq's CONNECTION_OK and PGRES_TUPLES_OK
READ_ONLY = "-c default_transaction_read_only=on -c statement_timeout=1000"


class _Option(ctypes.Structure):
    """libpq's PQconninfoOption: one setting of a parsed connection string."""

    _fields_ = [("keyword", ctypes.c_char_p), ("envvar", ctypes.c_char_p),
                ("compiled", ctypes.c_char_p), ("val", ctypes.c_char_p),
                ("label", ctypes.c_char_p), ("dispchar", ctypes.c_char_p),
                ("dispsize", ctypes.c_int)]


def load() -> Any:
    """The system's libpq, its functions typed for ctypes; None where there is none."""
    for name in ("libpq.so.5", "libpq.5.dylib"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        pointer, text, number = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        texts = ctypes.POINTER(ctypes.c_char_p)
        options = ctypes.POINTER(_Option)
        for function, result, arguments in (
                ("PQconninfoParse", options, [text, texts]),
                ("PQconninfoFree", None, [options]),
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


def rows(lib: Any, url: str, sql: str, params: tuple[Any, ...]
                ) -> list[tuple[Any, ...]]:
    """One read-only query through libpq, text in and out, as the psycopg path asks it."""
    def array(values: list[str | None]) -> Any:
        return (ctypes.c_char_p * len(values))(
            *[None if v is None else v.encode() for v in values])

    # Given after the URL, "options" replaces the URL's own (a search_path naming another
    # schema, say): ours go after them instead, as PgDb's connection adds its settings.
    given = _given_options(lib, url)
    settings = {"dbname": url, "connect_timeout": "2", "client_encoding": "UTF8",
                "application_name": "queuectl-complete",
                "options": f"{given} {READ_ONLY}".strip()}
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


def _given_options(lib: Any, url: str) -> str:
    """The ``options`` a connection URL sets, read by libpq's own parser."""
    parsed = lib.PQconninfoParse(url.encode(), None)
    if not parsed:
        raise ConnectionError("libpq cannot read the URL")
    try:
        n = 0
        while (keyword := parsed[n].keyword) is not None:
            if keyword == b"options":
                return (parsed[n].val or b"").decode()
            n += 1
        return ""
    finally:
        lib.PQconninfoFree(parsed)
