"""The statements both stores make of a projector's changes (``Db.insert``, ``Db.update``,
``Db.delete``): built from the change's structure, once per shape, never read back from
text. Each is standard SQL with ``?`` placeholders, which SQLite runs as it is and the
PostgreSQL store prepares (and, for a run of changes of one shape, writes as one statement
of many rows: see ``postgres._Shape``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

# What an insert does when a row of the same key is there already: fail (the row is new, as
# most are), keep the old row, set the old row's other columns to the new row's, or add the
# new row's other columns to the old row's (counts).
Clash = Literal["fail", "ignore", "set", "add"]


@lru_cache(maxsize=256)
def insert(table: str, columns: tuple[str, ...], key: tuple[str, ...] = (),
           clash: Clash = "fail") -> str:
    """``INSERT INTO table (columns) VALUES (?, ...)``, with what a clash on ``key`` does."""
    sql = (f"INSERT INTO {table} ({', '.join(columns)}) "
           f"VALUES ({', '.join('?' * len(columns))})")
    if clash == "fail":
        return sql
    if not key:
        raise ValueError(f"an insert into {table} that may clash needs the key it clashes on")
    others = [c for c in columns if c not in key]
    conflict = f"{sql} ON CONFLICT ({', '.join(key)}) DO"
    if clash == "ignore" or not others:
        return f"{conflict} NOTHING"
    if clash == "set":
        return f"{conflict} UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in others)
    return f"{conflict} UPDATE SET " + ", ".join(f"{c} = {table}.{c} + excluded.{c}"
                                                 for c in others)


@lru_cache(maxsize=512)
def update(table: str, where: tuple[tuple[str, bool], ...], set_: tuple[str, ...],
           add: tuple[str, ...]) -> str:
    """``UPDATE table SET c = ?, n = n + ? WHERE k = ? AND f IS NULL``: ``where`` gives each
    column the rows must match and whether they match it by NULL."""
    assigns = [f"{c} = ?" for c in set_] + [f"{c} = {c} + ?" for c in add]
    matches = [f"{c} IS NULL" if null else f"{c} = ?" for c, null in where]
    return f"UPDATE {table} SET {', '.join(assigns)} WHERE {' AND '.join(matches)}"


def update_values(where: Mapping[str, Any], set_: Mapping[str, Any], add: Mapping[str, Any]
                  ) -> tuple[tuple[tuple[str, bool], ...], list[Any]]:
    """An update's ``where`` shape (for ``update``) and its values, in the statement's order."""
    if len(where) == 1:  # by key, as nearly every update is
        ((column, value),) = where.items()
        matched: tuple[tuple[str, bool], ...] = ((column, value is None),)
        keys = [] if value is None else [value]
    else:
        matched = tuple((c, v is None) for c, v in where.items())
        keys = [v for v in where.values() if v is not None]
    return matched, [*set_.values(), *add.values(), *keys]


_UPDATES: dict[tuple[Any, ...], str] = {}  # ``update_of``'s statements, by shape
_SET, _ADD, _NULL = object(), object(), object()  # the marks between a shape's parts


def update_of(table: str, where: Mapping[str, Any], set_: Mapping[str, Any],
              add: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """An update's statement (``update``) and its values, in the statement's order: what
    the SQLite store runs for each change a projection makes, on every write. Its shape is
    one flat tuple (the table, each column matched, ``_NULL`` after one matched by NULL,
    the columns set, the columns added), the cheapest key to build and to hash."""
    values = [*set_.values(), *add.values()]
    shape: list[Any] = [table]
    for column, value in where.items():
        shape.append(column)
        if value is None:
            shape.append(_NULL)
        else:
            values.append(value)
    key = (*shape, _SET, *set_, _ADD, *add)
    sql = _UPDATES.get(key)
    if sql is None:
        matched = tuple((c, v is None) for c, v in where.items())
        sql = _UPDATES[key] = update(table, matched, tuple(set_), tuple(add))
    return sql, values


@lru_cache(maxsize=64)
def update_by(table: str, key: str, columns: tuple[str, ...]) -> str:
    """``UPDATE table SET every column = ? WHERE key = ?``: rows written back whole (a
    replay's), each row's values then its key."""
    return f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} WHERE {key} = ?"


@lru_cache(maxsize=64)
def delete(table: str, column: str) -> str:
    return f"DELETE FROM {table} WHERE {column} = ?"
