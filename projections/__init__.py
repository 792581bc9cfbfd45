"""The projections: tables derived from the ledger, each owned by one module.

A projection module exposes ``NAME``, ``VERSION``, ``TABLES`` (the tables it owns, each with
its primary key(s)), ``DDL``, ``HANDLES`` (the event types it reads) and
``apply(tx, seq, at, event)``, the live path: the projection's rows after one more event.
It may expose ``INDEXES`` and ``TRIGGERS`` (created once a replay's rows are in; triggers
per store, ``{"sqlite": (...), "postgres": (...)}``: each writes them in its own language),
``EARLY_INDEXES`` (created with the tables: partial indexes of few rows, cheaper kept than
built after),
``live(type)`` (what ``apply`` does with events of that type, found once per type, as
a replay's handlers are), ``apply_many(tx, [(seq, at, event), ...])`` (``apply`` over a
list, written in bulk; with ``MANY_FOR``, only for batches holding one of those types) and
``Replay(tx, find)``, whose ``handler(type)`` gives what to call for each event of that type,
doing what ``apply`` does to empty tables but holding rows in memory, written back by
``flush()`` now and then and by ``close()`` at the end (with aggregates counted once). A
``Replay`` without ``rows`` holds nothing and is never flushed: its handlers let the events
that change nothing pass by in one call.

``apply`` must be deterministic: it may use only the event, its ``seq``, its ``at`` and the
projection's own tables; never the clock, the current config, the environment or random
numbers, so that replaying the ledger gives back exactly the same rows. The live path and
the replay path must agree; ``ledger.check`` compares them, and every test runs that check
on its database.

``CATALOG`` lists every projection with its ``VERSION`` and the tags of its ``HANDLES``, so
that opening a database and appending an event need not import the projections that event
does not concern. A change to a module's ``VERSION`` or ``HANDLES`` changes its entry too:
a module that differs from its entry is refused as it loads.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from queuectl.store import Db


# For a replay: the seq of the latest event of a type for a job, among the events replayed
# so far (None if there is none). The ledger answers it from its own index on job_id, so
# projections need no index of their own until the replay is over.
Find = Callable[[str, str], "int | None"]


class Rows:
    """Rows of one table held in memory during a replay and written back in bulk.

    A replay sees a job enqueued, claimed and completed as three events; applied one by one
    they are an INSERT and two UPDATEs of the same row. Kept here, the row is changed in
    memory and written once. Rows not yet in memory are read from the table on first use
    (``locate`` turns a key into the rowid ``rowid`` names, where the key has no index);
    everything is written back by ``flush``, which a replay calls at its end and whenever
    ``full()``, between events. Columns given in ``defaults`` (with the value their DDL
    defaults to, None for NULL) are left out of the new rows' insert when every row holds
    that value there: the table fills them in, and each value bound costs sqlite3 more than
    looking at it here (most jobs keep most defaults; a finished job's row holds several
    NULLs).

    A row is a dict by column, or with ``lists`` a list of the values in ``columns``' order
    (cheaper to make and to write, for a projection whose handlers set columns by position
    and never apply a rule's dict of changes).
    """

    LIMIT = 20_000  # rows held per table: with many more, the held rows outgrow the CPU
    # caches and a replay slows down (bench scenario replay)

    def __init__(self, tx: Db, table: str, columns: Iterable[str], key: str,
                 rowid: str | None = None, locate: Callable[[Any], Any] | None = None,
                 defaults: Mapping[str, Any] | None = None, lists: bool = False):
        self.tx, self.table, self.key, self.locate = tx, table, key, locate
        self.columns = tuple(columns)
        self.defaults = dict(defaults or {})
        self.lists = lists
        # Where a column's value is in a row: its name, or its position.
        self._at: Callable[[str], Any] = self.columns.index if lists else (lambda name: name)
        where = rowid or key
        names = ", ".join(self.columns)
        self._select = f"SELECT {names} FROM {table} WHERE {where if locate else key} = ?"
        self._where = where
        self._key = self._at(key)
        self._others = others = tuple(c for c in self.columns if c != where)
        self._update_values = self._getter(*others, where)
        self.new: dict[Any, Any] = {}  # not in the table yet
        self.read: dict[Any, Any] = {}  # read from the table, written back
        self.before: list[Any] = []  # those rows as they were read

    def _getter(self, *columns: str) -> Callable[[Any], Any]:
        return operator.itemgetter(*map(self._at, columns))

    def full(self) -> bool:
        return len(self.new) + len(self.read) >= self.LIMIT

    def get(self, key: Any) -> Any:
        row = self.new.get(key) or self.read.get(key)
        if row is None:
            where = self.locate(key) if self.locate else key
            found = where is not None and self.tx.execute(self._select, (where,)).fetchone()
            if not found:
                return None
            if self.lists:
                row = self.read[key] = list(found)
                self.before.append(list(row))
            else:
                row = self.read[key] = dict(zip(self.columns, found, strict=True))
                self.before.append(dict(row))
        return row

    def add(self, row: Any) -> None:
        key = row[self._key]
        if key in self.new or key in self.read:  # a clash with the table fails later
            raise ValueError(f"UNIQUE constraint failed: {self.table}.{self.key}")
        self.new[key] = row

    def flush(self) -> None:
        # New rows through the store's bulk path (COPY on PostgreSQL, where an INSERT a row
        # would make a replay many times slower).
        self._insert_new()
        self.tx.update_many(self.table, self._where, self._others,
                            list(map(self._update_values, self.read.values())))
        self.new.clear()  # cleared, not replaced: callers may hold their get methods
        self.read.clear()
        self.before.clear()

    def _insert_new(self) -> None:
        new = self.new.values()
        left_out = self._defaulted(new) if new else set()
        columns = tuple(c for c in self.columns if c not in left_out)
        if self.lists and columns == self.columns:
            self.tx.insert_many(self.table, columns, list(new))  # as they are
            return
        self.tx.insert_many(self.table, columns, list(map(self._getter(*columns), new)))

    def _defaulted(self, rows: Iterable[Any]) -> set[str]:
        """The columns of ``defaults`` that every one of ``rows`` holds the default in. One
        lookup a row takes the values of the columns the first row holds the default in;
        rows mostly share their combination, so the set of combinations is short to read."""
        first = next(iter(rows))
        maybe = [c for c, value in self.defaults.items() if first[self._at(c)] == value]
        if not maybe:
            return set()
        found = set(map(self._getter(*maybe), rows))
        if len(maybe) == 1:  # an itemgetter of one column gives its values, not tuples
            found = {(value,) for value in found}
        return {c for i, c in enumerate(maybe)
                if frozenset({self.defaults[c]}).issuperset(map(operator.itemgetter(i), found))}


def live(apply: Callable[[Db, int, str, Any], None], tx: Db) -> Callable[[int, str, Any], None]:
    """A live ``apply`` on ``tx``, called as a replay's handlers are: a Python function, which
    the interpreter calls without going through C (a partial would)."""
    return lambda seq, at, event: apply(tx, seq, at, event)


class Passing:
    """A ``Replay`` that holds no rows: a projection whose events mostly change nothing
    gives those a handler that lets them pass in one call, and ``live`` its ``apply`` for
    the rest."""

    def __init__(self, tx: Db, find: Find) -> None:
        self.tx = tx

    def close(self) -> None:
        """Nothing held, nothing to write."""


# Each projection as opening a database and appending an event need to know it, without
# importing its module: its name, its VERSION and the tags of the events it reads (its
# HANDLES), in the order projectors run. A command that appends one kind of event
# (``enqueue``) then imports only the projections that read it: importing the other seven
# cost 1.5% of ``enqueue -c true``'s instructions. Each module is held to its entry as it
# is loaded (``load``).
CATALOG: tuple[tuple[str, int, frozenset[str]], ...] = tuple(
    (name, version, frozenset(tags.split())) for name, version, tags in (
        ("jobs", 17, "cancel-requested cancelled claimed completed dead edited enqueued "
                     "failed fenced lease-expired pruned released requeued restarted "
                     "scheduled-retry started timed-out unblocked"),
        ("runs", 9, "cancelled claimed completed dead failed fenced lease-expired pruned "
                    "released timed-out"),
        ("workers", 4, "cancelled claimed completed failed fenced lease-expired pruned "
                       "released started stop-requested timed-out worker-heartbeat "
                       "worker-lost worker-started worker-stopped"),
        ("config", 1, "config-changed"),
        ("queues", 2, "claimed pruned queue-limited queue-paused queue-resumed started"),
        ("schedules", 3, "schedule-added schedule-fired schedule-paused schedule-removed "
                         "schedule-resumed schedule-skipped"),
        ("hooks", 1, "enqueued hook-added hook-removed pruned"),
        ("signals", 1, "pruned signal-requested signalled"),
        ("tokens", 1, "token-added token-revoked"),
    )
)
VERSIONS: dict[str, int] = {name: version for name, version, _ in CATALOG}


def load(name: str) -> ModuleType:
    """The projection module ``name``, imported on first use and checked against its
    ``CATALOG`` entry."""
    module = import_module(f"projections.{name}")
    if name not in _CHECKED:
        _check(module)
        _CHECKED.add(name)
    return module


_CHECKED: set[str] = set()


def _check(module: ModuleType) -> None:
    from queuectl.events import TAG_OF

    entry = next((e for e in CATALOG if e[0] == module.NAME), None)
    tags = frozenset(TAG_OF[kind] for kind in module.HANDLES)
    if entry != (module.NAME, module.VERSION, tags):
        raise ImportError(f"{module.__name__}: NAME, VERSION or HANDLES differ from its entry "
                          f"in projections.CATALOG {entry!r}; give both the same")


def readers(*event_types: type) -> tuple[ModuleType, ...]:
    """The projections that read any of ``event_types``, in ``CATALOG`` order, each imported
    as it is first needed."""
    from queuectl.events import TAG_OF

    tags = {TAG_OF[kind] for kind in event_types}
    return tuple(load(name) for name, _, reads in CATALOG if not reads.isdisjoint(tags))


def registry() -> tuple[ModuleType, ...]:
    """Every projection, in ``CATALOG`` order (a projector reads only its own tables, so
    each can be rebuilt alone)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = tuple(load(name) for name, _, _ in CATALOG)
    return _REGISTRY


_REGISTRY: tuple[ModuleType, ...] | None = None


def __getattr__(name: str) -> object:
    if name == "REGISTRY":  # every projection, loaded
        return registry()
    raise AttributeError(f"module 'projections' has no attribute {name!r}")


def live_of(projection: ModuleType, event_type: type) -> Callable[..., None]:
    """What the live path calls, as ``apply(tx, seq, at, event)``, for an event of
    ``event_type``: the projection's own handler of that type (``live``), where it has one,
    else its ``apply``."""
    live = getattr(projection, "live", None)
    return projection.apply if live is None else live(event_type)  # type: ignore[no-any-return]


def appliers(projections: tuple[ModuleType, ...], event_type: type) -> tuple:  # type: ignore[type-arg]
    """What each projection that reads ``event_type`` calls for it (``live_of``), in order."""
    return tuple(live_of(p, event_type) for p in projections if event_type in p.HANDLES)
