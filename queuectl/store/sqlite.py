"""The SQLite store: one file, WAL mode, the default.

A ``SqliteDb`` is a ``sqlite3.Connection`` (a subclass, so every ``execute`` is still the C
method) with the store's part of the ledger added: the write transaction (``BEGIN
IMMEDIATE``), the ledger's own schema, the append's inserts, and the waker that watches
``PRAGMA data_version`` (and inotify on the WAL) for idle workers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING, Any

from queuectl import clock, limits
from queuectl.errors import StoreError
from queuectl.states import State, WorkerState
from queuectl.store import PROCESS_LOCK, Dialect, T, TellsRows, statements
from queuectl.store.statements import Change, Clash, Insert

if TYPE_CHECKING:
    import select  # imported by the waker, which a command that only writes never starts

# The sqlite3 module binds exact ints, floats and strs as they are; any other value, None
# and the states' str enums among them, goes through its adaptation protocol first, which
# looks up __adapt__ and __conform__ and formats an AttributeError for each, only to throw
# them away: several times the cost of the bind itself, and a replay's rows hold millions
# of NULLs. A registered adapter is found before any of that.
sqlite3.register_adapter(type(None), lambda none: none)
sqlite3.register_adapter(State, str)
sqlite3.register_adapter(WorkerState, str)

# The ledger's columns; the archive keeps its rows in a table of the same shape.
EVENT_TABLE = """(
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        type TEXT NOT NULL,
        job_id TEXT,
        worker_id TEXT,
        body TEXT NOT NULL
    )"""

LEDGER_DDL = (
    f"CREATE TABLE IF NOT EXISTS events {EVENT_TABLE}",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id) WHERE job_id IS NOT NULL",
    # The events looked up by worker are its heartbeats, which pruning thins out. The
    # index once held every event naming a worker, two a job (its result and its claim),
    # and cost each worker's commit a page of the WAL (SQLite) or two index inserts.
    "DROP INDEX IF EXISTS events_worker",
    """CREATE INDEX IF NOT EXISTS events_heartbeats ON events (worker_id)
        WHERE type = 'worker-heartbeat'""",
    # Append-only is the database's rule, not only a convention of this code.
    """CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the events ledger is append-only'); END""",
    # Pruning (SqliteDb.archive) is the one exception: its transaction holds a row of
    # ledger_permit while it deletes, and no other does.
    "CREATE TABLE IF NOT EXISTS ledger_permit (reason TEXT NOT NULL)",
    "DROP TRIGGER IF EXISTS events_no_delete",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        WHEN NOT EXISTS (SELECT 1 FROM ledger_permit)
        BEGIN SELECT RAISE(ABORT, 'the events ledger is append-only'); END""",
    # INSERT OR REPLACE deletes the row it replaces without firing the DELETE trigger
    # (recursive_triggers is off by default in every client), so refuse the insert itself.
    """CREATE TRIGGER IF NOT EXISTS events_no_replace BEFORE INSERT ON events
        WHEN EXISTS (SELECT 1 FROM events WHERE seq = NEW.seq)
        BEGIN SELECT RAISE(ABORT, 'the events ledger is append-only'); END""",
    # What each projection was last built from: its code version and the ledger seq its
    # replay reached. Live appends keep every projection at the ledger's head in the same
    # transaction, so position is not rewritten on each append (a page per commit saved).
    """CREATE TABLE IF NOT EXISTS projection_meta (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        position INTEGER NOT NULL
    )""",
    # The output store: what runs printed, in chunks. Data, not events: no replay reads it.
    """CREATE TABLE IF NOT EXISTS output (
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at TEXT NOT NULL,
        start INTEGER NOT NULL,
        size INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, attempt, worker_id, seq)
    )""",
)

# The ledger's own schema (the events table and its triggers), in ``PRAGMA user_version``;
# an older database gets what was added since when it is next opened.
LEDGER_VERSION = 4  # 2: pruning's permit; 3: the output store; 4: events_heartbeats

# A worker's commit dirties many small pages (the ledger row and its indexes, the job, its
# run and their indexes, the worker, the counts), and the WAL writes and checksums each
# whole page: small pages make the ledger cycle cheaper, while pages smaller still make a
# big replay's trees deeper (bench scenarios cycle and replay). Databases created before
# keep their page size: SQLite cannot change it in WAL mode.
PAGE_SIZE = 2048

_INSERT = "INSERT INTO events (seq, at, type, job_id, worker_id, body) VALUES (?, ?, ?, ?, ?, ?)"
_INSERT_ONE = "INSERT INTO events (at, type, job_id, worker_id, body) VALUES (?, ?, ?, ?, ?)"
_ROWS_AT_ONCE = 16  # events an append writes in one INSERT of many rows; more: executemany


@lru_cache(maxsize=_ROWS_AT_ONCE)
def _insert_rows(n: int) -> str:
    """One INSERT of ``n`` events, numbered by SQLite, their one time bound once (``?1``;
    each plain ``?`` takes the number after the highest before it)."""
    return ("INSERT INTO events (at, type, job_id, worker_id, body) VALUES "
            + ", ".join(["(?1, ?, ?, ?, ?)"] * n))

_VALUES_AT_ONCE = 999  # values bound to one INSERT of many rows (SQLite's old least limit)


@lru_cache(maxsize=64)
def _insert_values(table: str, columns: tuple[str, ...], n: int) -> str:
    """One INSERT of ``n`` rows."""
    row = f"({', '.join('?' * len(columns))})"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * n)


# The archive: a SQLite file beside the database, which pruned events move to. Its table
# is not called ``events``, so that the file can never be taken for a ledger.
ARCHIVE_DDL = (
    f"CREATE TABLE IF NOT EXISTS archived_events {EVENT_TABLE}",
    """CREATE INDEX IF NOT EXISTS archived_events_job ON archived_events (job_id)
        WHERE job_id IS NOT NULL""",
    """CREATE TRIGGER IF NOT EXISTS archived_events_no_change BEFORE UPDATE ON archived_events
        BEGIN SELECT RAISE(ABORT, 'the archive is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS archived_events_no_delete BEFORE DELETE ON archived_events
        BEGIN SELECT RAISE(ABORT, 'the archive is append-only'); END""",
)
_ARCHIVE = """INSERT INTO archived_events (seq, at, type, job_id, worker_id, body)
    VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (seq) DO NOTHING"""
_CHUNK = 500  # values in one IN (...) list

WAKE_POLL = 0.002  # seconds between data_version reads in the waker (without inotify)
LOOK_POLL = 0.0005  # the same while a commit is being written (inotify): a short window
WATCH_AFTER = 1.0  # seconds of workers waiting before the waker sets up inotify
CHECKPOINT_EVERY = 0.25  # seconds between the waker's WAL checkpoints
LOCKED_SHARE = 0.02  # at most this share of the time may the waker hold the process lock
LOCKED_WAIT = 0.1  # seconds the locked pass waits for the writers' queue, else it is skipped
WATCH_SAFETY_MS = 50  # with inotify, the waker still looks this often (ms), just in case
WATCH_LOOK = 0.25  # after a write to the WAL, the waker looks every LOOK_POLL for this long


_NONE: Mapping[str, Any] = {}


def lock_timeout() -> float:
    """Seconds a writer waits for the write lock, in all, before it gives up."""
    return limits.from_env("QUEUECTL_LOCK_TIMEOUT", "lock_timeout", 30.0)


class SqliteDialect(Dialect):
    name = "sqlite"

    def hint(self, index: str) -> str:
        # Without statistics SQLite may pick another index and sort every row it finds.
        return f"INDEXED BY {index}"


DIALECT = SqliteDialect()


class SqliteDb(sqlite3.Connection, TellsRows):
    """A queuectl connection to a SQLite file."""

    kind = "sqlite"
    dialect = DIALECT
    appends_in_steps = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = os.fspath(args[0] if args else kwargs["database"])
        self.target = self.path
        self._writing = False  # inside transaction()
        self._tx_now: str | None = None  # its time, once asked for

    def transaction(self) -> _Transaction:
        """One ``BEGIN IMMEDIATE`` transaction: commit on success, roll back on any exception.

        Writers of one process (the worker threads of ``worker -c N``) queue on the process
        lock, and processes on the lock file beside the database (``WriterQueue``), instead
        of on SQLite's busy handler, which sleeps 1 ms, then 2, 5, 10... while it waits:
        with two busy workers that sleeping, not the work, set the pace.
        """
        return _Transaction(self)

    _queue: WriterQueue | contextlib.nullcontext[None] | None = None

    def _find_queue(self) -> WriterQueue | contextlib.nullcontext[None]:
        self._queue = writer_queue(self.path)
        return self._queue

    def attempt(self, body: Callable[[], T]) -> T:
        with self.transaction():
            return body()

    generation = 0  # a file is never lost: this connection is the only one it has

    @property
    def identity(self) -> str:
        """The file itself (its device and inode), whatever path names it."""
        found = os.stat(self.path)
        return f"sqlite:{found.st_dev}:{found.st_ino}"

    def insert(self, table: str, row: Mapping[str, Any], *, key: Sequence[str] = (),
               clash: Clash = "fail") -> None:
        self.execute(statements.insert(table, tuple(row), tuple(key), clash),
                     tuple(row.values()))

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                    *, key: Sequence[str] = (), clash: Clash = "fail") -> None:
        told = len(rows)
        columns, key = tuple(columns), tuple(key)
        at_once = _VALUES_AT_ONCE // len(columns)
        whole = len(rows) - len(rows) % at_once if clash == "fail" and at_once > 1 else 0
        if whole:
            # Many rows a statement: each statement executed costs sqlite3 and SQLite more
            # than the row it adds, when rows are short.
            values = list(chain.from_iterable(rows[:whole]))
            step = at_once * len(columns)
            self.executemany(_insert_values(table, columns, at_once),
                             [values[i:i + step] for i in range(0, len(values), step)])
            rows = rows[whole:]
        self.executemany(statements.insert(table, columns, key, clash), rows)
        if self._told is not None:
            self._told(told)

    def update(self, table: str, where: Mapping[str, Any], set_: Mapping[str, Any] = _NONE,
               add: Mapping[str, Any] = _NONE, *, unique: bool = True,
               missing: Exception | None = None) -> None:
        sql, values = statements.update_of(table, where, set_, add)
        if self.execute(sql, values).rowcount == 0 and missing is not None:
            raise missing

    def add(self, insert: Insert, values: Sequence[Any]) -> None:
        self.execute(insert.sql, values)

    def change(self, change: Change, values: Sequence[Any]) -> None:
        if self.execute(change.sql, values).rowcount == 0 and change.missing is not None:
            raise change.missing(values[-1])

    def update_many(self, table: str, key: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Any]]) -> None:
        self.executemany(statements.update_by(table, key, tuple(columns)), rows)

    def delete(self, table: str, column: str, keys: Sequence[Any], *,
               missing: Exception | None = None) -> None:
        gone = self.executemany(statements.delete(table, column), [(k,) for k in keys]).rowcount
        if missing is not None and gone < len(keys):
            raise missing

    def reconnect(self) -> None:
        """Nothing to do: a SQLite file is not a server that goes away."""

    def side_transaction(self) -> Any:
        """A write of data beside the ledger (the output store): SQLite has one write lock,
        so it is a transaction like any other."""
        return self.transaction()

    @contextmanager
    def snapshot(self) -> Iterator[SqliteDb]:
        """One read transaction: every query inside sees the same database."""
        self.execute("BEGIN")
        try:
            yield self
        finally:
            self.execute("COMMIT")

    def now(self) -> str:
        """This host's clock; inside a write transaction, the time it first asked for, so
        that all its events share it (as on PostgreSQL)."""
        if self._tx_now is not None:
            return self._tx_now
        now = clock.now()
        if self._writing:
            self._tx_now = now
        return now

    def next_seq(self) -> int:
        (last,) = self.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        return int(last) + 1

    def insert_events(self, at: str, rows: list[tuple[str, str | None, str | None, str]]
                      ) -> int:
        if len(rows) == 1:  # the common case: SQLite numbers the row itself
            return self.execute(_INSERT_ONE, (at, *rows[0])).lastrowid or 0
        if len(rows) <= _ROWS_AT_ONCE:  # SQLite numbers the rows itself, in order, and
            # the write lock is held: the last row's seq gives the first's.
            last = self.execute(_insert_rows(len(rows)),
                                [at, *chain.from_iterable(rows)]).lastrowid or 0
            first = last - len(rows) + 1
        else:  # the write lock is held, so the next seqs are ours: one executemany
            first = self.next_seq()
            self.executemany(_INSERT, [(first + n, at, *row) for n, row in enumerate(rows)])
        if self._told is not None:
            self._told(len(rows))
        return first

    def copy_events(self, rows: list[tuple[int, str, str, str | None, str | None, str]]) -> None:
        last = self.next_seq() - 1
        if rows and rows[0][0] <= last:
            raise StoreError(f"seq {rows[0][0]} does not follow the ledger's last, {last}")
        self.executemany(_INSERT, rows)

    @property
    def archive_path(self) -> str:
        """``data/queue.db`` keeps its archive in ``data/queue.archive.db``."""
        root, suffix = os.path.splitext(self.path)
        return f"{root}.archive{suffix}"

    @property
    def archive_target(self) -> str:
        return self.archive_path

    def archive(self, seqs: Sequence[int]) -> None:
        """The rows go to the archive file first, committed there; only then do they leave
        the ledger, with this transaction. The two files cannot commit as one: a crash in
        between leaves the rows in both, and the next prune's copy is then a no-op."""
        if not self.in_transaction:
            raise RuntimeError("archive() needs a write transaction")
        rows = []
        for start in range(0, len(seqs), _CHUNK):
            chunk = list(seqs[start:start + _CHUNK])
            rows += self.execute(
                "SELECT seq, at, type, job_id, worker_id, body FROM events "
                f"WHERE seq IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
        archive = _open_archive(self.archive_path)
        try:
            with archive:  # one transaction, committed (synchronous=FULL) before the delete
                archive.executemany(_ARCHIVE, rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the archive {self.archive_path}: {exc}") from exc
        finally:
            archive.close()
        self.execute("INSERT INTO ledger_permit (reason) VALUES ('prune')")
        self.delete("events", "seq", [row[0] for row in rows])
        self.execute("DELETE FROM ledger_permit")

    def archived(self, job_id: str) -> list[tuple[int, str, str, str]]:
        if not os.path.exists(self.archive_path):
            return []
        try:
            archive = sqlite3.connect(f"file:{self.archive_path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the archive {self.archive_path}: {exc}") from exc
        try:
            return archive.execute("SELECT seq, at, type, body FROM archived_events "
                                   "WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the archive {self.archive_path}: {exc}") from exc
        finally:
            archive.close()

    @contextmanager
    def bulk(self) -> Iterator[SqliteDb]:
        (cache,) = self.execute("PRAGMA cache_size").fetchone()
        (secure,) = self.execute("PRAGMA secure_delete").fetchone()
        # 256 MiB: a big replay, or a bulk enqueue's transaction, stays in memory (a limit,
        # not an allocation: pages are taken as they are needed)
        self.execute("PRAGMA cache_size = -262144")
        # A replay drops tables whose every row it writes again from the ledger. Where
        # SQLite was built to zero what it frees (Debian's is), zeroing the pages of a
        # million jobs' tables was a twentieth of a replay (bench scenario replay); FAST
        # still zeroes what is freed within a page, but leaves whole free pages as they
        # are until they are used again, which the replay does at once.
        self.execute("PRAGMA secure_delete = FAST")
        try:
            yield self
        finally:
            self.execute(f"PRAGMA cache_size = {int(cache)}")
            self.execute(f"PRAGMA secure_delete = {'FAST' if secure == 2 else int(secure)}")

    @contextmanager
    def aside(self) -> Iterator[str | None]:
        """A scratch file beside the database (``scratch``), for another process to fill
        while this connection's next transaction runs; detached (``adopt`` attaches it) and
        removed afterwards. In WAL mode only: there a writer leaves the ledger readable."""
        import tempfile  # a rebuild's alone

        directory, name = os.path.split(self.path)
        directory = directory or "."
        try:
            if self.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                yield None
                return
            _remove_strays(directory, f"{name}-replay-")
            fd, path = tempfile.mkstemp(prefix=f"{name}-replay-{os.getpid()}-", dir=directory)
        except OSError:  # a directory where no file can be made: the replay goes alone
            yield None
            return
        os.close(fd)
        try:
            yield path
        finally:
            if any(row[1] == ASIDE for row in self.execute("PRAGMA database_list")):
                self.execute(f"DETACH DATABASE {ASIDE}")  # not possible inside a transaction
            for leftover in (path, f"{path}-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def adopt(self, scratch: str, tables: Iterable[str]) -> None:
        """Each table's rows replaced by the scratch file's: into an empty table of the same
        shape, SQLite copies the records as they are (and index entries), without
        decoding them or seeking a place for each."""
        self.execute(f"ATTACH DATABASE ? AS {ASIDE}", (scratch,))
        for table in tables:
            self.execute(f"DELETE FROM main.{table}")  # what its DDL put there
            self.execute(f"INSERT INTO main.{table} SELECT * FROM {ASIDE}.{table}")

    def waker(self, on_crash: Callable[[BaseException], None] | None = None, *,
              ends: bool = False) -> Waker:
        return Waker(self.path, on_crash)  # data_version moves at every commit: ends too

    def wake(self) -> None:
        """Every commit wakes the workers of a SQLite database already (its Waker watches
        the file)."""

    def for_worker(self, interrupt: int | None = None) -> None:
        """Progress is written with synchronous=NORMAL (a lost result only means the job
        runs again) and checkpoints are left to the process's Waker. ``interrupt``: a
        signal whose handler (installed by the caller, doing nothing) lets this process's
        writers wait for the writers' queue in place (``WriterQueue``) until this
        connection closes."""
        self.execute("PRAGMA synchronous = NORMAL")
        self.execute("PRAGMA wal_autocheckpoint = 0")
        queue = self._queue or self._find_queue()
        if isinstance(queue, WriterQueue) and interrupt is not None:
            queue.interrupt, self._interrupting = interrupt, True

    _interrupting = False  # this connection has the writers of its process wait in place

    def close(self) -> None:
        if self._interrupting and isinstance(self._queue, WriterQueue):
            self._queue.interrupt, self._interrupting = None, False
        super().close()


def read_once(path: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One query on a read-only connection of its own (see ``store.read_once``)."""
    from pathlib import Path  # not on the path of a command that writes

    uri = f"{Path(path).resolve().as_uri()}?mode=ro"  # ro: a missing file is an error
    lite = sqlite3.connect(uri, uri=True, timeout=0.2)
    try:
        return lite.execute(sql, params).fetchall()
    finally:
        lite.close()


ASIDE = "aside"  # the name a scratch file is attached under (``SqliteDb.adopt``)


def _remove_strays(directory: str, prefix: str) -> None:
    """Scratch files (``SqliteDb.aside``) of rebuilds whose process is gone: killed before
    they could remove their own. Each name holds its process's id."""
    for entry in os.scandir(directory):
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        except OSError:  # alive, another user's
            pass


def reader(path: str) -> SqliteDb:
    """A read-only connection to the database at ``path``, as it is."""
    from pathlib import Path

    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=lock_timeout(),  # type: ignore[return-value]
                           factory=SqliteDb)


def scratch(path: str) -> SqliteDb:
    """A file for rows another connection will copy (``SqliteDb.adopt``): if anything goes
    wrong before then it is thrown away, so nothing in it is journalled or synced."""
    db: SqliteDb = sqlite3.connect(path, isolation_level=None, factory=SqliteDb)  # type: ignore[assignment]
    for pragma in (f"page_size = {PAGE_SIZE}", "journal_mode = OFF", "synchronous = OFF",
                   "cache_size = -262144"):
        db.execute(f"PRAGMA {pragma}")
    return db


def memory() -> SqliteDb:
    """An in-memory database, for a replay set aside (``ledger.check``)."""
    return sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)  # type: ignore[return-value]


# -- opening ------------------------------------------------------------------------------


def _prepare_file(path: str, create: bool) -> None:
    """Create the data directories (0700) and the database file (0600) on first use; a
    command that only reads refuses a database that does not exist."""
    if path == ":memory:":
        raise StoreError("an in-memory database (:memory:) would lose every job when the "
                         "command ends; give a file path")
    if not os.path.exists(path) and not create:
        raise StoreError(f"no queuectl database at {path} (commands that write, such as "
                         "enqueue, create it)")
    directory = os.path.dirname(path) or "."
    if not os.path.exists(directory):
        missing, part = [], directory
        while part and not os.path.exists(part):
            missing.append(part)
            part = os.path.dirname(part)
        for part in reversed(missing):  # each new directory 0700, not only the last
            try:
                os.mkdir(part, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create data directory {part}: {exc.strerror}") from exc
    if not os.path.exists(path):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create database {path}: {exc.strerror}") from exc
    elif os.path.isdir(path):
        raise StoreError(f"{path} is a directory, not a database file")
    if not os.access(path, os.W_OK) or not os.access(directory, os.W_OK):
        raise StoreError(f"database {path} is not writable (check its directory's permissions)")


def connect(path: str | os.PathLike[str], *, durable: bool = True, create: bool = True
            ) -> SqliteDb:
    """Open (creating when ``create``) a queuectl database file with the ledger's schema.

    ``durable`` picks ``synchronous=FULL``: an acknowledged write survives power loss.
    """
    path = os.fspath(path)
    _prepare_file(path, create)
    # SQLite's busy handler does the waiting; _retry_locked covers the SQLITE_BUSY cases
    # where SQLite returns at once instead of waiting (e.g. during WAL recovery).
    db: SqliteDb = sqlite3.connect(  # type: ignore[assignment]
        str(path), isolation_level=None, check_same_thread=False, timeout=lock_timeout(),
        factory=SqliteDb,
    )
    try:
        db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys = ON")
        _ensure_ledger(db)  # refuses a foreign database before anything is written
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            _retry_locked(db.execute, "PRAGMA journal_mode = WAL")
    except sqlite3.DatabaseError as exc:
        db.close()
        if "not a database" in str(exc):
            raise StoreError(f"{path} is not a SQLite database") from exc
        raise StoreError(f"cannot open {path}: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db


def _open_archive(path: str) -> sqlite3.Connection:
    """The archive file beside a database, created (0600) with its table on first use."""
    try:
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        archive = sqlite3.connect(str(path), timeout=lock_timeout())
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise StoreError(f"cannot create the archive {path}: {reason}") from exc
    try:
        archive.execute("PRAGMA synchronous = FULL")
        with archive:
            for statement in ARCHIVE_DDL:
                archive.execute(statement)
    except sqlite3.Error as exc:
        archive.close()
        raise StoreError(f"cannot open the archive {path}: {exc}") from exc
    return archive


def _ensure_ledger(db: SqliteDb) -> None:
    """The ledger's own tables and triggers, created on first use and brought up to
    ``LEDGER_VERSION``; a database that holds other tables and not queuectl's is refused."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "projection_meta" not in tables:
        if tables - {"events", "projection_meta"} or (tables and "events" not in tables):
            raise StoreError(f"{db.path} is not a queuectl database")
        if not tables:  # a page size holds only if set before the first table
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if "projection_meta" not in tables or \
            db.execute("PRAGMA user_version").fetchone()[0] < LEDGER_VERSION:
        with db.transaction():  # IF NOT EXISTS: another process may have just done it
            for statement in LEDGER_DDL:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {LEDGER_VERSION}")


class _Transaction:
    """``SqliteDb.transaction``. A class rather than a generator: every write of every
    worker goes through it, and a generator's context manager costs several calls more."""

    __slots__ = ("db", "queue")

    def __init__(self, db: SqliteDb) -> None:
        self.db = db

    def __enter__(self) -> SqliteDb:
        db = self.db
        PROCESS_LOCK.acquire()
        try:
            queue = self.queue = db._queue or db._find_queue()
            queue.__enter__()
            try:
                _retry_locked(db.execute, "BEGIN IMMEDIATE")
            except BaseException:
                queue.__exit__(None, None, None)
                raise
        except BaseException:
            PROCESS_LOCK.release()
            raise
        db._writing = True
        return db

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        db = self.db
        db._writing, db._tx_now = False, None
        try:
            if kind is None:
                _retry_locked(db.execute, "COMMIT")
            else:
                db.execute("ROLLBACK")
        finally:
            self.queue.__exit__(None, None, None)
            PROCESS_LOCK.release()


def _retry_locked(execute: Callable[[str], Any], statement: str) -> Any:
    """``execute(statement)``; while the database is locked, wait and retry, up to the lock
    timeout (counted from the first refusal: this runs twice a write)."""
    try:
        return execute(statement)
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
    start = time.monotonic()
    while True:
        try:
            return execute(statement)
        except sqlite3.OperationalError as exc:
            message = str(exc)
            if "locked" not in message and "busy" not in message:
                raise
            if time.monotonic() >= start + lock_timeout():
                raise _held_too_long() from exc
            time.sleep(0.05)


def _held_too_long() -> StoreError:
    return StoreError(f"database is locked: another process held it for over "
                      f"{lock_timeout():g}s; try again")


# -- the writers' queue -------------------------------------------------------------------


class WriterQueue:
    """Writers of every process queue here before they ask SQLite for its write lock: on a
    POSIX lock of the file ``<database>-lock``, which the kernel hands to the next waiter
    the moment its holder lets go. SQLite's busy handler sleeps 1 ms, then 2, 5, 10... and
    tries again, and between two busy worker processes that sleeping set the pace (shorter
    sleeps only collide more often, the more processes wait).

    SQLite's lock stays the rule: a writer that does not queue here (another tool, an
    older queuectl, a directory where the file cannot be made) still meets the others at
    the database's lock, with the busy handler as before. A POSIX lock is the process's:
    the threads of one process (which take turns on ``PROCESS_LOCK`` first) share it, a
    forked child does not inherit it, and the kernel drops it when the process dies,
    however it dies.

    A blocking lock has no timeout, so a writer that must wait hands the wait to a thread
    of the queue's own and waits for that thread up to the lock timeout; if the lock comes
    later, the thread lets it go again at once.

    In a worker process (``interrupt``, see ``SqliteDb.for_worker``) a writer waits for the
    lock itself, and a watchdog thread interrupts a wait that outlives the lock timeout
    with that signal, whose handler the worker installed. The hand-off costs a second
    wake-up, the thread's then the writer's, while the lock is already this process's: on
    two cores shared by eight worker processes the writer often waited for a core in
    between, the lock held and idle (eight ``worker -c 1`` did 3-10% more jobs a second
    waiting in place).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._held = 0  # nested transactions of this process (other connections)
        self.interrupt: int | None = None  # the signal that ends a wait in place, if any
        self._start_waiting()

    def _start_waiting(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._asked = 0  # the waiter the thread is to get the lock for (0: none)
        self._served = 0  # the last waiter the thread got the lock for
        self._thread: threading.Thread | None = None
        self._in_place: dict[int, float] = {}  # threads waiting themselves: their deadlines
        self._watchdog: threading.Thread | None = None
        self._watch_until = float("inf")  # when the watchdog looks next

    def __enter__(self) -> None:
        self._take(None)

    @contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        """``with queue``, waiting for it ``seconds`` at most (then StoreError)."""
        self._take(seconds)
        try:
            yield
        finally:
            self.__exit__()

    def _take(self, seconds: float | None) -> None:
        """Take the queue, waiting ``seconds`` at most (None: the lock timeout)."""
        if self._held == 0:
            try:
                os.lockf(self.fd, os.F_TLOCK, 0)
            except (BlockingIOError, PermissionError):  # held by another process
                limit = lock_timeout() if seconds is None else seconds
                if self.interrupt is None:
                    self._wait(limit)
                else:
                    self._wait_in_place(self.interrupt, limit)
            except OSError:  # no locks here (NFS without a lock daemon): SQLite's only
                return
        self._held += 1

    def __exit__(self, *exc: object) -> None:
        if self._held == 0:  # never taken: the file system refused it
            return
        self._held -= 1
        if self._held == 0:
            os.lockf(self.fd, os.F_ULOCK, 0)

    def forked(self) -> None:
        """In a forked child, which holds none of its parent's locks and none of its
        threads."""
        self._held = 0
        self._start_waiting()

    def _wait(self, seconds: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._lock_for_waiters,
                                                name="writer-queue", daemon=True)
                self._thread.start()
            waiter = self._asked = self._served + 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: self._served == waiter, seconds):
                    raise _held_too_long()
            finally:
                self._asked = 0

    def _wait_in_place(self, interrupt: int, seconds: float) -> None:
        """Wait for the lock in this thread, ``seconds`` at most (the watchdog sends
        ``interrupt`` to a wait that outlives them)."""
        deadline = time.monotonic() + seconds
        me = threading.get_ident()
        with self._cond:
            self._in_place[me] = deadline
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._interrupt_late, args=(interrupt,),
                                                  name="writer-queue-watchdog", daemon=True)
                self._watchdog.start()
            elif deadline < self._watch_until:
                self._cond.notify_all()
        try:
            while True:
                try:
                    os.lockf(self.fd, os.F_LOCK, 0)
                    return
                except InterruptedError:  # the watchdog, or a signal meant for the process
                    if time.monotonic() >= deadline:
                        raise _held_too_long() from None
                except OSError:  # a deadlock the kernel saw: this writer goes to SQLite's
                    return
        finally:
            with self._cond:
                del self._in_place[me]

    def _interrupt_late(self, interrupt: int) -> None:
        """The watchdog: sleeps until the earliest waiter's deadline, and interrupts every
        wait that outlived its own, again every 50 ms until it ends. It sleeps as long as
        the deadlines are far: a waiter that comes and goes wakes nobody."""
        import signal  # only a worker process waits in place

        with self._cond:
            while True:
                now = time.monotonic()
                late = [ident for ident, deadline in self._in_place.items() if deadline <= now]
                for ident in late:
                    signal.pthread_kill(ident, interrupt)
                self._watch_until = now + 0.05 if late else min(self._in_place.values(),
                                                                default=now + 60.0)
                self._cond.wait(max(0.0, self._watch_until - now))

    def _lock_for_waiters(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asked > self._served)
            while True:
                try:
                    os.lockf(self.fd, os.F_LOCK, 0)
                    break
                except InterruptedError:  # a signal meant for the process came here
                    continue
                except OSError:  # a deadlock the kernel saw: the waiter goes to SQLite's
                    break
            with self._cond:
                if self._asked:  # the waiter, or a new one after it gave up
                    self._served = self._asked
                    self._cond.notify_all()
                else:
                    os.lockf(self.fd, os.F_ULOCK, 0)


_QUEUES: dict[str, WriterQueue | contextlib.nullcontext[None]] = {}
_UNQUEUED = contextlib.nullcontext()


def _forked() -> None:
    for queue in _QUEUES.values():
        if isinstance(queue, WriterQueue):
            queue.forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def writer_queue(path: str) -> WriterQueue | contextlib.nullcontext[None]:
    """The queue of the writers of the database at ``path``, one for the process (its
    lock file stays open: closing any descriptor of a file drops the process's POSIX
    locks on it); where the lock file cannot be opened, none (``with`` does nothing)."""
    if path == ":memory:" or not hasattr(os, "lockf"):
        return _UNQUEUED
    lock_path = f"{os.path.realpath(path)}-lock"  # one file, whatever symlink names it
    queue = _QUEUES.get(lock_path)
    if queue is None:
        try:
            queue = WriterQueue(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                        0o600))
        except OSError:  # a read-only directory, say: SQLite's lock alone, as before
            queue = _UNQUEUED
        _QUEUES[lock_path] = queue
    return queue


# -- waking idle workers ------------------------------------------------------------------


class WalWatch:
    """Linux inotify on the database's ``-wal`` file: its descriptor turns readable as soon
    as any connection, in any process, writes a commit there. Idle workers then sleep in
    poll() instead of waking every 2 ms to look, which costs an idle process CPU."""

    IN_MODIFY = 0x2

    def __init__(self, wal: str) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(fd, os.fsencode(wal), self.IN_MODIFY) < 0:
            os.close(fd)
            raise OSError(ctypes.get_errno(), f"cannot watch {wal}")
        self.fd = fd

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class Waker:
    """Wakes idle workers whenever another connection commits to the database.

    ``PRAGMA data_version`` says whether anything changed. The waker looks every 2 ms while
    a worker waits; once workers have waited a second in all, inotify on the WAL file (where
    available) says when to look instead. Short waits, such as the end of a burst, never
    pay for setting inotify up (ctypes) or for taking it down (close() waits for it).
    """

    def __init__(self, path: str, on_crash: Callable[[BaseException], None] | None = None
                 ) -> None:
        self._on_crash = on_crash
        self.error: BaseException | None = None
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA data_version").fetchone()  # the WAL file exists from here
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # workers wait here for a new generation
        self._wanted = threading.Condition(lock)  # the waker waits here for a waiting worker
        self._waiting = 0
        self._generation = 0
        self._closed = False
        self._wal = f"{path}-wal"
        self._next_locked = 0.0  # monotonic time of the next locked checkpoint pass
        self._path = path
        self._copied_at: int | None = None  # the database's mtime after its last checkpoint
        self._watch_fd: WalWatch | None = None
        self._thread = threading.Thread(target=self._supervised, name="waker", daemon=True)
        self._thread.start()

    def _supervised(self) -> None:
        """The waker's thread. If it dies, the process stops as if a worker had crashed:
        its workers would otherwise go on with wake-ups and checkpoints silently gone."""
        try:
            self._watch()
        except BaseException as exc:
            self.error = exc
            if self._on_crash is not None:
                self._on_crash(exc)

    def _watch(self) -> None:
        last = None
        next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
        look_until = 0.0
        polled = 0.0  # seconds of looking every WAKE_POLL, up to WATCH_AFTER
        import select

        poller = select.poll()
        while not self._closed:
            self._until_wanted(next_checkpoint)
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != last:
                last = version
                self.poke()
            if time.monotonic() >= next_checkpoint:
                self._checkpoint()
                next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
            if self._watch_fd is None:
                slept = time.monotonic()
                time.sleep(WAKE_POLL)
                polled += time.monotonic() - slept if self._waiting else 0.0
                if polled >= WATCH_AFTER:
                    polled = float("-inf")  # one try: without inotify, go on looking
                    self._start_watching(poller)
            elif time.monotonic() < look_until:
                time.sleep(LOOK_POLL)
            elif poller.poll(WATCH_SAFETY_MS):  # the WAL is being written to
                # The first page of a commit reaches the WAL before the commit is visible:
                # look again and again for a while (a loaded machine may pause the writer),
                # rather than once.
                look_until = time.monotonic() + WATCH_LOOK
            if self._watch_fd is not None:
                self._watch_fd.drain()

    def _start_watching(self, poller: select.poll) -> None:
        import select

        try:
            self._watch_fd = WalWatch(self._wal)
        except (OSError, AttributeError):  # not Linux, or no inotify watches left
            return
        poller.register(self._watch_fd.fd, select.POLLIN)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database, all of it, so that the next commit writes the WAL
        from its start again.

        Workers turn automatic checkpoints off (they ran inside a worker's COMMIT, holding
        the write lock while pages were copied and synced). This thread copies beside the
        workers, then what they committed meanwhile while holding the process lock and the
        writers' queue (a short pass): the writers of every process wait, those of
        ``worker -c N``'s other processes too, which under the process lock alone committed
        throughout, so that the copy never caught up. A checkpoint that never catches up
        cannot restart the WAL: under busy workers it grows without end, and the last close
        has to checkpoint and delete it all. Where syncing is slow (a disk, not a VM's
        cache), the locked pass comes less often, holding the lock no more than LOCKED_SHARE of
        the time: the WAL then grows for longer instead of the workers stalling.

        The wakers of other worker processes checkpoint the same file: when one of them
        did within CHECKPOINT_EVERY, this one leaves it. Each on its own schedule, they
        copied the same hot pages (the counts, the ends of the indexes) several times over,
        and synced twice for each.
        """
        if self._checkpointed_elsewhere():
            return
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if time.monotonic() >= self._next_locked:
            queue = writer_queue(self._path)
            try:
                with PROCESS_LOCK, (queue.within(LOCKED_WAIT) if isinstance(queue, WriterQueue)
                                    else queue):
                    start = time.monotonic()
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    held = time.monotonic() - start
            except StoreError:  # another process kept the queue (a long transaction): the
                pass  # locked pass is tried again at the next checkpoint
            else:
                self._next_locked = time.monotonic() + held / LOCKED_SHARE
        self._copied_at = self._written_at()

    def _written_at(self) -> int | None:
        """When the database file was last written (ns): only checkpoints write it, the
        commits go to the WAL."""
        try:
            return os.stat(self._path).st_mtime_ns
        except OSError:
            return None

    def _checkpointed_elsewhere(self) -> bool:
        """Whether another connection copied the WAL into the database after this waker
        last did, and within CHECKPOINT_EVERY."""
        if self._copied_at is None:  # not yet: nothing says whose the last copy was
            return False
        written = self._written_at()
        return (written is not None and written != self._copied_at
                and 0 <= time.time_ns() - written < CHECKPOINT_EVERY * 1e9)

    def _until_wanted(self, deadline: float) -> None:
        """Sleep while no worker waits, until ``deadline`` at the latest (the checkpoint).

        Busy workers claim their next job as they record a result, so on a busy queue
        nobody needs waking: looking every 2 ms and waking at every commit then only took
        the GIL and CPU from the workers. A worker that starts to wait wakes this thread,
        whose first look sees any commit made while it slept (``data_version`` moved).
        """
        with self._wanted:
            self._wanted.wait_for(
                lambda: self._waiting or self._closed, max(0.0, deadline - time.monotonic())
            )

    @property
    def watching(self) -> bool:
        """Whether inotify tells this waker when to look (else it looks every 2 ms)."""
        return self._watch_fd is not None

    @property
    def generation(self) -> int:
        return self._generation

    def poke(self, wait: bool = True) -> bool:
        """Wake every waiting worker; ``wait=False``: only if the lock is free at once (a
        signal handler, which may have interrupted its holder). Whether it did."""
        if not self._cond.acquire(wait):
            return False
        try:
            self._generation += 1
            self._cond.notify_all()
        finally:
            self._cond.release()
        return True

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the database changes after generation ``seen``, or ``timeout``."""
        with self._cond:
            self._waiting += 1
            self._wanted.notify()
            try:
                self._cond.wait_for(lambda: self._generation != seen or self._closed, timeout)
            finally:
                self._waiting -= 1

    def close(self) -> None:
        self._closed = True
        self.poke()
        with self._wanted:
            self._wanted.notify()
        self._thread.join()
        if self._watch_fd is not None:
            self._watch_fd.close()
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._conn.close()
