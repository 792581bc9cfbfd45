"""One query through the system's libpq, by ctypes, for callers that cannot wait for
psycopg's import (about 100 ms): a shell completion asks one query and is gone.

Importing psycopg takes about 100 ms, more than a Tab may take in all; libpq with its
connection costs about 20 ms. Where there is no system libpq, callers take psycopg.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

_OK, _TUPLES_OK = 0, 2  # libpq's CONNECTION_OK and PGRES_TUPLES_OK


def load() -> Any:
    """The system's libpq, its functions typed for ctypes; None where there is none."""
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


def rows(lib: Any, url: str, sql: str, params: tuple[Any, ...]
                ) -> list[tuple[Any, ...]]:
    """One read-only query through libpq, text in and out, as the psycopg path asks it."""
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
