"""Where a ledger lives: one SQLite file, or one PostgreSQL database shared by many hosts.

Everything above this package (the queue's decisions, the projectors, replay, the worker)
talks to a ``Db``: one connection, with ``?`` placeholders and portable SQL, which also opens
the write transaction, appends ledger rows, tells the time and makes the waker that wakes
idle workers. What differs between the stores lives behind it, one module each:
``sqlite.py`` and ``postgres.py``. SQL that cannot be portable (index hints, column types,
trigger bodies) is declared per dialect beside the code that owns it, and the store's
``Dialect`` turns it into its own.

A *target* names a store: a ``postgresql://`` (or ``postgres://``) URL picks PostgreSQL;
anything else is the path of a SQLite file.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TypeVar

from queuectl.store.statements import Change, Clash, Insert

DEFAULT = os.path.join("data", "queue.db")
T = TypeVar("T")

# The worker threads of one process share one connection and take turns on this lock; the
# SQLite store also queues the process's writers on it (see sqlite.py).
PROCESS_LOCK = threading.RLock()


class TellsRows:
    """``Db.telling``, the same on every store: each calls ``_told`` (when set) with the rows
    each of its bulk writes wrote."""

    _told: Callable[[int], None] | None = None

    @contextmanager
    def telling(self, written: Callable[[int], None]) -> Iterator[Any]:
        before, self._told = self._told, written
        try:
            yield self
        finally:
            self._told = before


class Cursor(Protocol):
    rowcount: int

    @property
    def description(self) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int = ...) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Waker(Protocol):
    """Wakes a process's idle workers when another connection commits new work."""

    error: BaseException | None

    @property
    def generation(self) -> int: ...
    def wait(self, seen: int, timeout: float) -> None: ...
    def poke(self, wait: bool = True) -> bool: ...
    def close(self) -> None: ...


class Db(Protocol):
    """One connection to a store: everything the rest of queuectl calls on one.

    Projectors hand it their changes as data (``insert``, ``update``, ``delete``) and each
    store turns them into its own statements; reads are SQL with ``?`` placeholders
    (``execute``), written once for both stores with ``Dialect`` marks where they differ.
    """

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgres``."""
    @property
    def target(self) -> str:
        """What messages call it: the path, or the URL without its password."""
    @property
    def dialect(self) -> Dialect: ...
    @property
    def identity(self) -> str:
        """Names this database the same way from every connection to it, however its path
        or URL is spelled: a worker marks its runs' processes with it, so that a rescuer
        stops only the runs of its own queue's workers (another queue on the host may have
        a worker of the same id)."""
    @property
    def generation(self) -> int:
        """How many times this connection was opened again (``reconnect``): a caller that
        saw another generation may have missed the outcome of a commit."""
    @property
    def in_transaction(self) -> bool: ...
    @property
    def appends_in_steps(self) -> bool:
        """Whether a long append (a bulk enqueue) is cheaper written a step at a time than
        all at once: on SQLite, where steps keep what each builds small; not on
        PostgreSQL, where the server writes one long COPY while the client encodes it, and
        a step's end would make each wait for the other (bench scenario bulk)."""
    def execute(self, sql: str, parameters: Any = ..., /) -> Any:
        """A read (or the ledger's own bookkeeping): ``?`` placeholders."""
    def insert(self, table: str, row: Mapping[str, Any], *, key: Sequence[str] = (),
               clash: Clash = "fail") -> None:
        """A new row of ``table``; on a row with the same ``key`` there already, ``clash``
        says what happens (``statements.Clash``). A store may send it later, with the next
        read or the commit."""
    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                    *, key: Sequence[str] = (), clash: Clash = "fail") -> None:
        """Many new rows at once (a bulk enqueue, a replay), as fast as the store can."""
    def update(self, table: str, where: Mapping[str, Any], set_: Mapping[str, Any] = ...,
               add: Mapping[str, Any] = ..., *, unique: bool = True,
               missing: Exception | None = None) -> None:
        """The rows whose columns equal ``where``'s values (None: NULL) take ``set_``'s
        values and have ``add``'s added to theirs. ``unique``: ``where`` names one row at
        most (a key), so that a store may write a run of such updates as one statement.
        ``missing``: raised, inside the transaction, if no row matched. A store may send it
        later, with the next read or the commit."""
    def add(self, insert: Insert, values: Sequence[Any]) -> None:
        """``insert`` of one shape declared once (``statements.Insert``), failing on a row of
        the same key. A store may send it later, with the next read or the commit."""
    def change(self, change: Change, values: Sequence[Any]) -> None:
        """``update`` of one shape declared once (``statements.Change``): ``values`` are
        the given columns', the added amounts, then the key. ``change.missing`` is raised,
        inside the transaction, if no row matched. A store may send it later."""
    def update_many(self, table: str, key: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Any]]) -> None:
        """Rows written back whole (each row: its ``columns``' values, then its ``key``)."""
    def delete(self, table: str, column: str, keys: Sequence[Any], *,
               missing: Exception | None = None) -> None:
        """Delete the rows whose ``column`` is one of ``keys``; ``missing``: raised if fewer
        rows than keys went."""
    def transaction(self) -> AbstractContextManager[Any]:
        """One write transaction: commit on success, roll back on any exception."""
    def attempt(self, body: Callable[[], T]) -> T:
        """``body()`` in one write transaction, whose result it returns. A store may run
        ``body`` more than once (PostgreSQL guesses what a transaction would wait for, and
        runs it again if the server finds a guess wrong), so ``body`` must only read and
        write through this Db and decide from what it reads."""
    def side_transaction(self) -> AbstractContextManager[Any]:
        """A short write transaction for data beside the ledger (the output store): no
        event is appended in it, so on PostgreSQL it leaves the ledger's head alone."""
    def snapshot(self) -> AbstractContextManager[Any]:
        """One consistent read of the whole database."""
    def now(self) -> str:
        """The store's clock, as the ledger writes time."""
    def next_seq(self) -> int:
        """The seq the next appended event will get (inside a write transaction)."""
    def insert_events(self, at: str, rows: list[tuple[str, str | None, str | None, str]]
                      ) -> int:
        """Add ledger rows (type, job id, worker id, body) at ``at``; returns the first seq."""
    def copy_events(self, rows: list[tuple[int, str, str, str | None, str | None, str]]) -> None:
        """Add ledger rows that carry their own seq and time (a ledger imported into an empty
        store), inside a write transaction; the seqs must follow the ledger's last."""
    def archive(self, seqs: Sequence[int]) -> None:
        """Move these ledger rows to the archive, inside a write transaction: the one way
        events leave the ledger (``queuectl prune``); the database refuses any other."""
    def archived(self, job_id: str) -> list[tuple[int, str, str, str]]:
        """A job's events in the archive, ``(seq, at, type, body)``, oldest first."""
    @property
    def archive_target(self) -> str:
        """Where the archive is, as messages name it."""
    def bulk(self) -> AbstractContextManager[Any]:
        """Settings for a big write, a replay or a long append: a page cache that holds
        what it changes until it commits."""
    def telling(self, written: Callable[[int], None]) -> AbstractContextManager[Any]:
        """Within the block, ``written(n)`` each time the store has written ``n`` more rows
        of ``insert_events`` or ``insert_many``: a long append written in one step (one
        COPY a table on PostgreSQL) says so to its progress bar as it goes."""
    def aside(self) -> AbstractContextManager[str | None]:
        """A scratch SQLite file (``scratch``) that another process may fill with projection
        rows while this connection's next write transaction runs, to be copied in by
        ``adopt``; removed afterwards. None where the store cannot take rows so (PostgreSQL)
        or another process could not read the ledger meanwhile."""
    def adopt(self, scratch: str, tables: Iterable[str]) -> None:
        """Replace the rows of ``tables`` with those of the same tables (of the same shape,
        without triggers) in the scratch file that ``aside`` gave, inside the write
        transaction under way."""
    def waker(self, on_crash: Callable[[BaseException], None] | None = None, *,
              ends: bool = False) -> Waker:
        """The process's waker: it wakes when a commit brings new work, or with ``ends``
        when one ends a job (a ``wait``), whatever process or host committed it."""
    def wake(self) -> None:
        """The write transaction under way frees work that its events alone do not say is
        claimable (a place under a queue's limit): idle workers are woken at its commit."""
    def for_worker(self, interrupt: int | None = None) -> None:
        """Tune this connection for a worker's many small commits. ``interrupt``: a signal
        with a handler of the caller's that does nothing, which the store may send this
        process's threads, until this connection closes, to end a wait in a system call
        (SQLite: the writers' queue)."""
    def reconnect(self) -> None:
        """A new connection in place of a lost one (``generation`` goes up);
        StoreUnavailable while the store is still away. SQLite's file is never away."""
    def close(self) -> None: ...


def index(name: str) -> str:
    """The mark a query puts after a table it should read through the index ``name``: each
    store's ``Dialect.sql`` turns it into its own (SQLite's ``INDEXED BY``); anywhere else
    it is a comment. A plain SQL comment: it cannot clash with anything a query holds."""
    return f"/*index:{name}*/"


_INDEX = r"/\*index:(\w+)\*/"  # compiled on first use: re keeps it


class Dialect:
    """The SQL of one store, where it cannot be portable: index marks (``index``) and
    the column types of DDL."""

    name = ""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def hint(self, index: str) -> str:
        """What an index mark becomes: nothing where the planner chooses for itself."""
        return ""

    def sql(self, text: str) -> str:
        """``text`` with its index marks as this store reads them, once per query text."""
        found = self._cache.get(text)
        if found is None:
            found = self._cache[text] = re.sub(_INDEX, lambda m: self.hint(m[1]), text)
        return found

    def ddl(self, statement: str) -> str:
        """A CREATE statement written for SQLite, in this store's own types."""
        return statement


def default_target() -> str:
    return os.environ.get("QUEUECTL_DB") or DEFAULT


def is_postgres(target: str | os.PathLike[str]) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def connect(target: str | os.PathLike[str] | None = None, *, durable: bool = True,
            create: bool = True) -> Db:
    """Open the store ``target`` names (creating a SQLite file on first use when ``create``),
    with its schema and projections brought up to date."""
    target = default_target() if target is None else str(target)
    if is_postgres(target):
        from queuectl.store import postgres

        return postgres.connect(target, durable=durable, create=create)
    from queuectl.store import sqlite

    return sqlite.connect(target, durable=durable, create=create)


def memory() -> Db:
    """A store in memory, gone when closed: a replay set aside (``ledger.check``)."""
    from queuectl.store import sqlite

    return sqlite.memory()


def reader(path: str) -> Db:
    """A read-only connection to a SQLite database as it is (no schema made or brought up
    to date): what the process that helps a rebuild (``Db.aside``) reads the ledger
    through."""
    from queuectl.store import sqlite

    return sqlite.reader(path)


def scratch(path: str) -> Db:
    """A SQLite file for rows that another connection will copy (``Db.adopt``): no journal,
    no syncing, and the ledger's page size."""
    from queuectl.store import sqlite

    return sqlite.scratch(path)


def read_once(target: str | os.PathLike[str], sql: str, params: tuple[Any, ...]
              ) -> list[tuple[Any, ...]]:
    """One read-only query (``?`` placeholders) on a connection of its own, for a caller
    that asks once and is gone (a shell completion): it never creates a database, never
    brings a schema up to date, and raises on any failure."""
    target = str(target)
    if is_postgres(target):
        from queuectl.store import postgres

        return postgres.read_once(target, sql, params)
    from queuectl.store import sqlite

    return sqlite.read_once(target, sql, params)


def shown(target: str | os.PathLike[str]) -> str:
    """A target as messages may print it: a URL without its password."""
    if not is_postgres(target):
        return str(target)
    from queuectl.store.postgres import without_password

    return without_password(str(target))


def driver_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of the database drivers loaded so far (the CLI reports them)."""
    import sqlite3

    errors: list[type[BaseException]] = [sqlite3.Error]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errors.append(psycopg.Error)
    return tuple(errors)
