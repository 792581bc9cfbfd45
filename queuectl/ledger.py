"""The event ledger: opening the store, the one write path, and replay.

``append(tx, *events)`` is the only writer of the ``events`` table and the only caller of the
projectors, always inside a ``BEGIN IMMEDIATE`` transaction opened with ``write(conn)``: the
event and every projection change commit together or not at all.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import ModuleType

import msgspec

from projections import REGISTRY, appliers
from queuectl import clock, limits
from queuectl.errors import CorruptLedger, StoreError
from queuectl.events import TAGS, Event, decode, encode

LEDGER_DDL = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        type TEXT NOT NULL,
        job_id TEXT,
        worker_id TEXT,
        body TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id) WHERE job_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_worker ON events (worker_id) WHERE worker_id IS NOT NULL",
    # Append-only is the database's rule, not only a convention of this code.
    """CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the events ledger is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
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
)

# The ledger's own schema (the events table and its triggers), in ``PRAGMA user_version``;
# an older database gets what was added since when it is next opened.
LEDGER_VERSION = 1

# A worker's commit dirties about 16 pages (the ledger row and its indexes, the job, its run
# and their indexes, the worker, the counts); the WAL writes and checksums each whole page.
# 2 KiB pages cut the ledger cycle from 146 to 130 us a job; 1 KiB pages cut it further but
# slow a 1M-job replay by 16% (deeper trees), and 8 KiB pages cost 24%. Databases created
# before keep their page size: SQLite cannot change it in WAL mode.
PAGE_SIZE = 2048

_INSERT = "INSERT INTO events (seq, at, type, job_id, worker_id, body) VALUES (?, ?, ?, ?, ?, ?)"
_INSERT_ONE = "INSERT INTO events (at, type, job_id, worker_id, body) VALUES (?, ?, ?, ?, ?)"


def lock_timeout() -> float:
    """Seconds a writer waits for the write lock, in all, before it gives up."""
    return limits.from_env("QUEUECTL_LOCK_TIMEOUT", "lock_timeout", 30.0)


# -- opening ------------------------------------------------------------------------------


def default_path() -> Path:
    return Path(os.environ.get("QUEUECTL_DB") or Path("data") / "queue.db")


def _prepare_file(path: Path, create: bool) -> None:
    """Create the data directories (0700) and the database file (0600) on first use; a
    command that only reads refuses a database that does not exist."""
    if str(path) == ":memory:":
        raise StoreError("an in-memory database (:memory:) would lose every job when the "
                         "command ends; give a file path")
    if not path.exists() and not create:
        raise StoreError(f"no queuectl database at {path} (commands that write, such as "
                         "enqueue, create it)")
    directory = path.parent
    if not directory.exists():
        missing = [p for p in (directory, *directory.parents) if not p.exists()]
        for part in reversed(missing):  # each new directory 0700, not only the last
            try:
                part.mkdir(mode=0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create data directory {part}: {exc.strerror}") from exc
    if not path.exists():
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create database {path}: {exc.strerror}") from exc
    elif path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file")
    if not os.access(path, os.W_OK) or not os.access(directory, os.W_OK):
        raise StoreError(f"database {path} is not writable (check its directory's permissions)")


def connect(
    path: str | Path | None = None, *, durable: bool = True, create: bool = True
) -> sqlite3.Connection:
    """Open a queuectl database (creating it first when ``create``) and bring its schema and
    projections up to date.

    ``durable`` picks ``synchronous=FULL``: an acknowledged write survives power loss.
    Workers pass ``durable=False`` (NORMAL): a lost completion only means a job runs again.
    """
    path = Path(path) if path is not None else default_path()
    _prepare_file(path, create)
    # SQLite's busy handler does the waiting; _retry_locked covers the SQLITE_BUSY cases
    # where SQLite returns at once instead of waiting (e.g. during WAL recovery).
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=lock_timeout()
    )
    try:
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        _ensure_schema(conn, path)  # refuses a foreign database before anything is written
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
    except sqlite3.DatabaseError as exc:
        conn.close()
        if "not a database" in str(exc):
            raise StoreError(f"{path} is not a SQLite database") from exc
        raise StoreError(f"cannot open {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    try:
        versions = dict(conn.execute("SELECT name, version FROM projection_meta").fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables - {"events", "projection_meta"} or (tables and "events" not in tables):
            raise StoreError(f"{path} is not a queuectl database") from exc
        if not tables:  # a page size holds only if set before the first table
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        with write(conn):
            for statement in LEDGER_DDL:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {LEDGER_VERSION}")
        versions = {}
    if conn.execute("PRAGMA user_version").fetchone()[0] < LEDGER_VERSION:
        with write(conn):  # IF NOT EXISTS: another process may have just done it
            for statement in LEDGER_DDL:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {LEDGER_VERSION}")
    stale = [p for p in REGISTRY if versions.get(p.NAME) != p.VERSION]
    if stale:
        with write(conn):
            # Look again under the write lock: another process may have just rebuilt them.
            versions = dict(conn.execute("SELECT name, version FROM projection_meta").fetchall())
            stale = [p for p in REGISTRY if versions.get(p.NAME) != p.VERSION]
            _rebuild(conn, stale)


# -- writing ------------------------------------------------------------------------------


def _retry_locked(action):  # type: ignore[no-untyped-def]
    """Run ``action``; while the database is locked, wait and retry, up to the lock timeout."""
    start = time.monotonic()  # the timeout itself is read only on a failure (runs per write)
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            message = str(exc)
            if "locked" not in message and "busy" not in message:
                raise
            if time.monotonic() >= start + lock_timeout():
                raise StoreError(
                    f"database is locked: another process held it for over "
                    f"{lock_timeout():g}s; try again"
                ) from exc
            time.sleep(0.05)


# Writers of one process (the worker threads of `worker -c N`) queue on this lock instead
# of on SQLite's busy handler, which sleeps 1 ms, then 2, 5, 10... while it waits: with
# two busy workers that sleeping, not the work, set the pace. Other processes still meet
# at the database lock. Reentrant: worker threads sharing one connection also hold it
# around their reads and their calls that write (see worker.Worker.db).
PROCESS_LOCK = threading.RLock()


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: commit on success, roll back on any exception."""
    with PROCESS_LOCK:
        _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        _retry_locked(lambda: conn.execute("COMMIT"))


_LIVE: dict[type, tuple] = {}  # type: ignore[type-arg]


def _live(event_type: type) -> tuple:  # type: ignore[type-arg]
    _LIVE[event_type] = appliers(REGISTRY, event_type)
    return _LIVE[event_type]


def _apply_many(
    tx: sqlite3.Connection,
    projections: tuple[ModuleType, ...],
    batch: list[tuple[int, str, Event]],
) -> None:
    for projection in projections:
        if hasattr(projection, "apply_many"):
            projection.apply_many(tx, [b for b in batch if type(b[2]) in projection.HANDLES])
            continue
        for seq, at, event in batch:
            if type(event) in projection.HANDLES:
                projection.apply(tx, seq, at, event)


def append(tx: sqlite3.Connection, *events: Event, at: str | None = None) -> int:
    """Append events to the ledger and apply them to every projection; returns the last seq.

    Must run inside ``write(tx)``. All events of one call share one ``at``.
    """
    if not tx.in_transaction:
        raise RuntimeError("append() must run inside a write transaction")
    at = at or clock.now()
    if len(events) == 1:  # the common case: no need to number it ourselves
        event = events[0]
        seq = tx.execute(
            _INSERT_ONE,
            (at, event.type, getattr(event, "job_id", None), getattr(event, "worker_id", None),
             encode(event)),
        ).lastrowid or 0
        for apply in _LIVE.get(type(event)) or _live(type(event)):
            apply(tx, seq, at, event)
        return seq
    # The write lock is held, so the next seqs are ours: rows go in with one executemany.
    (last,) = tx.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
    rows = [
        (
            last + n,
            at,
            event.type,
            getattr(event, "job_id", None),
            getattr(event, "worker_id", None),
            encode(event),
        )
        for n, event in enumerate(events, 1)
    ]
    tx.executemany(_INSERT, rows)
    # Each projection reads only its own tables, so it may take the batch on its own.
    _apply_many(tx, REGISTRY, [(r[0], at, e) for r, e in zip(rows, events, strict=True)])
    return last + len(events)


def next_seq(tx: sqlite3.Connection) -> int:
    """The seq the next appended event will get: known once the write lock is held, so a
    decision may name what it creates after the event that creates it."""
    (last,) = tx.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
    return int(last) + 1


# -- reading the ledger ------------------------------------------------------------------


def decode_row(seq: int, type_: str, body: str) -> Event:
    """Decode one ledger row, or say clearly which seq this version cannot read."""
    if type_ not in TAGS:
        raise CorruptLedger(
            f"event seq {seq} has type {type_!r}, which this version of queuectl does not know"
        )
    try:
        return decode(body)
    except msgspec.DecodeError as exc:
        raise CorruptLedger(f"event seq {seq} ({type_}) cannot be decoded: {exc}") from exc


def read_events(
    conn: sqlite3.Connection, where: str = "", params: tuple[object, ...] = ()
) -> Iterator[tuple[int, str, Event]]:
    """Yield ``(seq, at, event)`` in ledger order; ``where`` is a constant SQL filter."""
    sql = f"SELECT seq, at, type, body FROM events {where} ORDER BY seq"
    for seq, at, type_, body in conn.execute(sql, params):
        yield seq, at, decode_row(seq, type_, body)


# -- replay -------------------------------------------------------------------------------


def _create(tx: sqlite3.Connection, projection: ModuleType) -> None:
    """Fresh, empty tables with the indexes the projector needs (not yet the readers')."""
    for table in projection.TABLES:
        tx.execute(f"DROP TABLE IF EXISTS {table}")
    for statement in projection.DDL:
        tx.execute(statement)


def _index(tx: sqlite3.Connection, projection: ModuleType) -> None:
    """The readers' indexes and the projection's triggers, once its rows are in."""
    for statement in (*getattr(projection, "INDEXES", ()), *getattr(projection, "TRIGGERS", ())):
        tx.execute(statement)


_FIND = "SELECT max(seq) FROM events WHERE job_id = ? AND type = ? AND seq <= ?"
FLUSH_CHECK = 4096  # events read at a time; between them a replay may write rows back


def _replay_into(
    target: sqlite3.Connection, source: sqlite3.Connection, projections: Iterable[ModuleType]
) -> int:
    """Apply every event to empty tables (no readers' indexes, no triggers yet); returns the
    last seq. Projections with a ``Replay`` keep rows in memory and write them in bulk."""
    projections = tuple(projections)
    position = 0

    def find(job_id: str, type_: str) -> int | None:
        (seq,) = source.execute(_FIND, (job_id, type_, position)).fetchone()
        return seq  # type: ignore[no-any-return]

    replay_of = {p: p.Replay(target, find) for p in projections if hasattr(p, "Replay")}
    replays = list(replay_of.values())
    routes = {  # what each type of event is given to, in REGISTRY order
        kind: [
            replay_of[p].handler(kind) if p in replay_of else partial(p.apply, target)
            for p in projections
            if kind in p.HANDLES
        ]
        for kind in TAGS.values()
    }
    cursor = source.execute("SELECT seq, at, body FROM events ORDER BY seq")
    while rows := cursor.fetchmany(FLUSH_CHECK):
        for position, at, body in rows:  # read_events, with less work per row
            try:
                event = decode(body)  # its tag is its type: an unknown one fails here
            except msgspec.DecodeError:
                (type_,) = source.execute(
                    "SELECT type FROM events WHERE seq = ?", (position,)).fetchone()
                decode_row(position, type_, body)  # raises the error that names the seq
                raise
            for apply in routes[type(event)]:
                apply(position, at, event)
        for replay in replays:  # between events: no row held in memory is half-changed
            if replay.rows.full():
                replay.flush()
    for replay in replays:
        replay.close()
    return position


def _rebuild(tx: sqlite3.Connection, projections: Iterable[ModuleType]) -> int:
    projections = tuple(projections)
    for projection in projections:
        _create(tx, projection)
    position = _replay_into(tx, tx, projections)
    for projection in projections:
        _index(tx, projection)  # one sorted build each, after the rows are in
        tx.execute(
            """INSERT INTO projection_meta (name, version, position) VALUES (?, ?, ?)
            ON CONFLICT (name) DO UPDATE SET version = excluded.version,
                position = excluded.position""",
            (projection.NAME, projection.VERSION, position),
        )
    return position


def rebuild(conn: sqlite3.Connection) -> int:
    """Throw every projection away and replay the ledger into fresh tables, atomically."""
    (cache,) = conn.execute("PRAGMA cache_size").fetchone()
    conn.execute("PRAGMA cache_size = -262144")  # 256 MiB: a big replay stays in memory
    try:
        with write(conn):
            return _rebuild(conn, REGISTRY)
    finally:
        conn.execute(f"PRAGMA cache_size = {int(cache)}")


def check(conn: sqlite3.Connection) -> list[str]:
    """Replay the ledger aside (in memory) and list every way it differs from the live tables.

    The replay is built without the readers' indexes: only rows are compared.
    """
    fresh = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("BEGIN")  # one snapshot of the live database for the whole comparison
    try:
        fresh.execute("BEGIN")
        for projection in REGISTRY:
            _create(fresh, projection)
        _replay_into(fresh, conn, REGISTRY)
        fresh.execute("COMMIT")
        problems: list[str] = []
        for projection in REGISTRY:
            for table, key in projection.TABLES.items():
                problems += _diff(table, key, conn, fresh)
        return problems
    finally:
        conn.execute("COMMIT")
        fresh.close()


def _diff(
    table: str, key: tuple[str, ...], live: sqlite3.Connection, fresh: sqlite3.Connection
) -> list[str]:
    def rows(conn: sqlite3.Connection) -> tuple[dict[object, tuple[object, ...]], list[str]]:
        cursor = conn.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cursor.description]
        index = [names.index(k) for k in key]
        found = {}
        for row in cursor:
            k = row[index[0]] if len(index) == 1 else tuple(row[i] for i in index)
            found[k] = row
        return found, names

    live_rows, names = rows(live)
    fresh_rows, _ = rows(fresh)
    problems = []
    for k in sorted(live_rows.keys() - fresh_rows.keys(), key=str)[:5]:
        problems.append(f"{table}: row {k!r} is live but not in the replay")
    for k in sorted(fresh_rows.keys() - live_rows.keys(), key=str)[:5]:
        problems.append(f"{table}: row {k!r} is in the replay but not live")
    changed = [k for k in live_rows.keys() & fresh_rows.keys() if live_rows[k] != fresh_rows[k]]
    for k in sorted(changed, key=str)[:5]:
        cols = [
            f"{name}: live {a!r}, replayed {b!r}"
            for name, a, b in zip(names, live_rows[k], fresh_rows[k], strict=True)
            if a != b
        ]
        problems.append(f"{table}: row {k!r} differs ({'; '.join(cols)})")
    return problems
