"""The statements both stores make of a projector's changes (``Db.insert``, ``Db.update``,
``Db.delete``): built from the change's structure, once per shape, never read back from
text. Each is standard SQL with ``?`` placeholders, which SQLite runs as it is and the
PostgreSQL store prepares (and, for a run of changes of one shape, writes as one statement
of many rows: see ``postgres._Shape``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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


class Insert:
    """A projector's new row of one shape, declared once beside its rule instead of built
    from a dict on every write (``Db.add``): its values come in ``columns``' order."""

    __slots__ = ("table", "columns", "sql")

    def __init__(self, table: str, columns: tuple[str, ...]) -> None:
        self.table, self.columns = table, columns
        self.sql = insert(table, columns)

    def __repr__(self) -> str:
        return f"Insert({self.sql!r})"


class Change:
    """A projector's change of one shape, declared once beside its rule instead of built
    from dicts on every write (``Db.change``): the row of ``table`` whose ``key`` column
    holds the key given (and whose ``null`` columns are NULL) takes the ``fixed`` values,
    the values given for the ``given`` columns, and has the amounts given added to its
    ``added`` columns. A write's values are the given columns', the added amounts, then
    the key: the order of the statement's ``?``.

    ``unique``: the key names one row at most. ``missing``: what to raise, made from the
    key, when no row matched (None: nothing). A replay applies the same change to a row
    it holds in memory (``into``): one change, two writers.
    """

    __slots__ = ("table", "key", "fixed", "given", "added", "null", "unique", "missing",
                 "sql", "_then", "into")

    def __init__(self, table: str, key: str, fixed: Mapping[str, Any] | None = None,
                 given: tuple[str, ...] = (), added: tuple[str, ...] = (),
                 null: tuple[str, ...] = (), unique: bool = True,
                 missing: Callable[[Any], Exception] | None = None) -> None:
        self.table, self.key, self.fixed = table, key, dict(fixed or {})
        self.given, self.added, self.null = given, added, null
        self.unique, self.missing = unique, missing
        if set(self.fixed) & set(given) or set(added) & {*self.fixed, *given}:
            raise ValueError(f"a change of {table} names a column twice")
        # SQLite's statement: the fixed values written in it, bound once when prepared
        # rather than on every write.
        assigns = ([f"{c} = {literal(v)}" for c, v in self.fixed.items()]
                   + [f"{c} = ?" for c in given] + [f"{c} = {c} + ?" for c in added])
        matches = [f"{key} = ?", *(f"{c} IS NULL" for c in null)]
        self.sql = (f"UPDATE {table} SET {', '.join(assigns)} "
                    f"WHERE {' AND '.join(matches)}")
        self._then: dict[Change, Then] = {}
        # ``into(row, values)``: the change applied to ``row``, a dict by column held in
        # memory (a replay's), written for its shape: a replay calls it for most events.
        self.into = _into(self.fixed, given, tuple(enumerate(added, len(given))))

    def __repr__(self) -> str:
        return f"Change({self.sql!r})"

    def set_values(self, values: Sequence[Any]) -> dict[str, Any]:
        """The columns a write of ``values`` sets, and their values."""
        found = self.fixed.copy()
        for column, value in zip(self.given, values, strict=False):  # the key comes after
            found[column] = value
        return found

    def then(self, later: Change) -> Then:
        """This change and ``later``, of the same row, as one (``Then``)."""
        found = self._then.get(later)
        if found is None:
            found = self._then[later] = Then(self, later)
        return found


def _into(fixed: dict[str, Any], given: tuple[str, ...], added: tuple[tuple[int, str], ...]
          ) -> Callable[[dict[str, Any], Sequence[Any]], None]:
    """``Change.into`` for a change of these columns, written out for the shapes the
    projections' rules have (the time of the event, a worker's job, one count)."""
    update = dict.update
    if len(given) == 1 and not added:
        (column,) = given

        def into(row: dict[str, Any], values: Sequence[Any]) -> None:
            update(row, fixed)
            row[column] = values[0]
    elif len(given) == 1 and len(added) == 1:
        (column,), ((_, count),) = given, added

        def into(row: dict[str, Any], values: Sequence[Any]) -> None:
            update(row, fixed)
            row[column] = values[0]
            row[count] += values[1]
    elif len(given) == 2 and not added and not fixed:
        first, second = given

        def into(row: dict[str, Any], values: Sequence[Any]) -> None:
            row[first] = values[0]
            row[second] = values[1]
    else:  # (dict.update of a zip of the columns and values costs twice this loop)
        given_at = tuple(enumerate(given))

        def into(row: dict[str, Any], values: Sequence[Any]) -> None:
            update(row, fixed)
            for at, name in given_at:
                row[name] = values[at]
            for at, name in added:
                row[name] += values[at]
    return into


class Then:
    """Two changes of one row as one change (``merged``), and how to make its values of
    theirs (``values``): a later value replaces an earlier one, amounts added add up."""

    __slots__ = ("merged", "_take")

    def __init__(self, first: Change, later: Change) -> None:
        if (first.table, first.key, first.null) != (later.table, later.key, later.null):
            raise ValueError(f"{first!r} and {later!r} do not change the same row")
        set_later = {*later.fixed, *later.given}
        if not {*first.fixed, *first.given}.isdisjoint(later.added):
            raise ValueError(f"{later!r} adds to a column {first!r} sets: not merged")
        fixed = {c: v for c, v in first.fixed.items() if c not in later.given}
        fixed.update(later.fixed)
        given = (*(c for c in first.given if c not in set_later), *later.given)
        # What is set later replaces what was added before.
        added = tuple(dict.fromkeys((*(c for c in first.added if c not in set_later),
                                     *later.added)))
        self.merged = Change(first.table, first.key, fixed, given, added, first.null,
                             first.unique and later.unique, later.missing or first.missing)
        # For each of the merged change's values: where it comes from, as (a, i, b, j):
        # the sum of first's value i (if a) and later's value j (if b).
        def source(change: Change, column: str, added: bool) -> int | None:
            names = change.added if added else change.given
            if column not in names:
                return None
            return (len(change.given) if added else 0) + names.index(column)
        self._take = [(source(first, c, False) if c not in later.given else None,
                       source(later, c, False)) for c in given]
        self._take += [(source(first, c, True), source(later, c, True)) for c in added]

    def values(self, first: Sequence[Any], later: Sequence[Any]) -> tuple[Any, ...]:
        """The merged change's values, of ``first``'s and ``later``'s (each ends with the
        row's key, as the merged values do)."""
        out = []
        for i, j in self._take:
            if i is None:
                out.append(later[j])  # type: ignore[index]
            elif j is None:
                out.append(first[i])
            else:  # an amount both add
                out.append(first[i] + later[j])
        out.append(later[-1])
        return tuple(out)


def literal(value: Any) -> str:
    """A constant of the code as SQL text: NULL, a number, or a quoted string."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value) if isinstance(value, float) else str(int(value))
    if isinstance(value, str):
        return "'" + str.__str__(value).replace("'", "''") + "'"
    raise ValueError(f"{value!r} cannot be written into a statement")
