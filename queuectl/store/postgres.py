"""The PostgreSQL store: one database shared by workers on many hosts.

A ``PgDb`` wraps one psycopg connection. What it keeps, and why:

- **One order of events.** Every write transaction first locks the single row of
  ``queuectl_head`` and reads from it the next seq (and the server's clock): writers take
  turns there, so seqs are gapless (a rollback takes its numbers back with it) and in commit
  order (a later transaction cannot read the head until an earlier one has committed).
  Taking that lock first in every transaction also means no two transactions ever wait on
  each other's rows in opposite orders, so there are no deadlocks. A bigserial would be
  neither gapless nor in commit order.
- **One round trip where it can.** A transaction run by ``attempt`` (an enqueue) takes
  the head to be where this connection's last commit left it, and a read whose last answer
  was no rows to find none again; the server checks each guess before the writes that
  follow it, in the same round trip, and a wrong one means the transaction runs again, asking.
  Sent whole in one round trip, such a transaction locks, checks and moves the head in its
  first statement, and needs no BEGIN or COMMIT: the statements up to a pipeline's sync are
  one transaction, which the sync commits (durably, as ``synchronous_commit`` says).
- **One clock.** Event times, and the ``now`` a claim compares ``run_at`` with, come from the
  server's clock, so hosts with skewed clocks agree: each connection measures the server's
  clock against its host's monotonic clock (at connect and every minute) and tracks it
  from there, which costs no round trip and ignores steps of the host's own clock.
- **Append-only by the database**: triggers refuse UPDATE, DELETE and TRUNCATE of events.
- **Timeouts**: ``lock_timeout`` bounds a wait for the head (``QUEUECTL_LOCK_TIMEOUT``) and
  ``idle_in_transaction_session_timeout`` ends the session of a client that died holding it.
- **Wake-ups**: a transaction that makes work claimable notifies ``queuectl`` (``pg_notify``
  in the head's update, sent at commit); each worker process listens on a connection of its
  own (``Waker``). One that ends a job notifies ``queuectl_ends``, which only ``wait``
  listens for: workers are not woken by it.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from queuectl import clock, limits
from queuectl.errors import InvalidInput, StoreError, StoreUnavailable
from queuectl.store import PROCESS_LOCK, Dialect, T, TellsRows, statements
from queuectl.store.statements import Change, Clash, Insert

CHANNEL = "queuectl"
# 3: the archive, and pruning's permit; 4: the output store; 5: events_heartbeats
SCHEMA_VERSION = 5
# Events whose appending may give an idle worker something to do.
WAKING = frozenset({"enqueued", "requeued", "restarted", "scheduled-retry", "released",
                    "unblocked",
                    "lease-expired", "stop-requested", "cancel-requested", "queue-resumed",
                    "queue-limited"})
# Events that end a job: what a `wait` listens for (ENDS_CHANNEL).
ENDING = frozenset({"completed", "dead", "cancelled"})
ENDS_CHANNEL = "queuectl_ends"
_CLOCK_EVERY = 60.0  # seconds between measures of the server's clock

# The ledger's columns; the archive keeps its rows in a table of the same shape.
EVENT_TABLE = """(
        seq BIGINT PRIMARY KEY,
        at TEXT COLLATE "C" NOT NULL,
        type TEXT COLLATE "C" NOT NULL,
        job_id TEXT COLLATE "C",
        worker_id TEXT COLLATE "C",
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
    # Pruning (PgDb.archive) is the one exception: its transaction, and no other, sets
    # queuectl.pruning while it deletes.
    """CREATE OR REPLACE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' AND current_setting('queuectl.pruning', true) = 'on' THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'the events ledger is append-only';
    END $$""",
    """DROP TRIGGER IF EXISTS events_no_change ON events""",
    """CREATE TRIGGER events_no_change BEFORE UPDATE OR DELETE ON events
        FOR EACH ROW EXECUTE FUNCTION events_append_only()""",
    """DROP TRIGGER IF EXISTS events_no_truncate ON events""",
    """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()""",
    # Where pruned events go: a table of their own, which nothing updates or deletes.
    f"CREATE TABLE IF NOT EXISTS archived_events {EVENT_TABLE}",
    """CREATE INDEX IF NOT EXISTS archived_events_job ON archived_events (job_id)
        WHERE job_id IS NOT NULL""",
    """CREATE OR REPLACE FUNCTION archived_events_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the archive is append-only'; END $$""",
    "DROP TRIGGER IF EXISTS archived_events_no_change ON archived_events",
    """CREATE TRIGGER archived_events_no_change BEFORE UPDATE OR DELETE ON archived_events
        FOR EACH ROW EXECUTE FUNCTION archived_events_append_only()""",
    # The ledger's head: the last seq appended, locked first by every write transaction.
    """CREATE TABLE IF NOT EXISTS queuectl_head (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        seq BIGINT NOT NULL,
        version INTEGER NOT NULL
    )""",
    f"""INSERT INTO queuectl_head (one, seq, version) VALUES (TRUE, 0, {SCHEMA_VERSION})
        ON CONFLICT (one) DO NOTHING""",
    """CREATE TABLE IF NOT EXISTS projection_meta (
        name TEXT COLLATE "C" PRIMARY KEY,
        version BIGINT NOT NULL,
        position BIGINT NOT NULL
    )""",
    # A write that must change so many rows says so to the server, which refuses the rest of
    # the transaction (its COMMIT included) if it did not: see PgDb.change.
    """CREATE OR REPLACE FUNCTION queuectl_expect(changed BIGINT, wanted BIGINT, token TEXT)
        RETURNS VOID LANGUAGE plpgsql AS $$
    BEGIN
        IF changed <> wanted THEN RAISE EXCEPTION USING ERRCODE = 'QE001', MESSAGE = token; END IF;
    END $$""",
    # The output store: what runs printed, in chunks. Data, not events: no replay reads it.
    """CREATE TABLE IF NOT EXISTS output (
        job_id TEXT COLLATE "C" NOT NULL,
        attempt BIGINT NOT NULL,
        worker_id TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        at TEXT COLLATE "C" NOT NULL,
        start BIGINT NOT NULL,
        size BIGINT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, attempt, worker_id, seq)
    )""",
)
OURS = {"events", "queuectl_head", "projection_meta", "archived_events", "output"}


class PgDialect(Dialect):
    name = "postgres"
    _TYPES = re.compile(r"\b(INTEGER|REAL|TEXT)\b")

    def ddl(self, statement: str) -> str:
        """SQLite's column types as PostgreSQL's: 64-bit integers, double precision, and
        text compared byte by byte (ids and ISO times sort as they do in SQLite)."""
        if not statement.lstrip().upper().startswith("CREATE TABLE"):
            return statement
        return self._TYPES.sub(lambda m: {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION",
                                          "TEXT": 'TEXT COLLATE "C"'}[m.group(1)], statement)


DIALECT = PgDialect()


def without_password(url: str) -> str:
    """``postgresql://app@db:5432/q``: the URL with any password left out."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unreadable URL)"
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, user + host, parts.path, query, ""))


_PLACEHOLDERS: dict[str, str] = {}


EVENT_COLUMNS = ("seq", "at", "type", "job_id", "worker_id", "body")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_field(value: Any) -> str:
    """One value in COPY's text format: NULL is \\N; a backslash, tab, newline or carriage
    return in text is escaped (NUL never gets here: text with one is refused as input)."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        text = str.__str__(value)  # a State is a str: its text, not its name
        if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
            return text.translate(_COPY_ESCAPES)
        return text
    if type(value) is bool:
        return "t" if value else "f"
    return repr(value)  # int, and float as its shortest exact form


class _Texts(dict[Any, str]):
    """Values written before, and their text: a bulk insert repeats a few floats and states
    on every row, and float's repr is the slowest step of a row."""

    def __missing__(self, value: Any) -> str:
        if len(self) > 4096:
            self.clear()
        text = self[value] = _copy_field(value)
        return text


# How a value that is not plain text is written: the common kinds without a detour.
_COPY_TEXT: dict[type, Callable[[Any], str]] = {
    int: repr, float: _Texts().__getitem__, type(None): _copy_field}


def _texter(value: Any) -> Callable[[Any], str]:
    """How values of ``value``'s kind are written, learnt on first sight: the members of an
    enum (a job's State) are remembered like floats."""
    kind = type(value)
    _COPY_TEXT[kind] = _Texts().__getitem__ if isinstance(value, Enum) else _copy_field
    return _COPY_TEXT[kind]


def _copy_line(row: Sequence[Any]) -> str:
    """A row in COPY's text format. Most rows need no escaping, which one look at the
    joined line tells: its only tabs are the separators, its only backslashes the NULLs."""
    line = "\t".join([v if v.__class__ is str else (_COPY_TEXT.get(v.__class__) or _texter(v))(v)
                       for v in row])
    if (line.count("\t") == len(row) - 1 and line.count("\\") == list(row).count(None)
            and "\n" not in line and "\r" not in line):
        return line
    return "\t".join(map(_copy_field, row))


def _chunks(rows: Iterable[Sequence[Any]], size: int) -> Iterator[list[Sequence[Any]]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _text(value: str) -> bytes:
    if "\x00" in value:
        # Nothing stored can hold one (SQLite's side refuses them on the way in), so this
        # is input to refuse, such as an id typed with one.
        raise InvalidInput("text with a NUL character: PostgreSQL text cannot hold one")
    return value.encode()


# How a value of each common type is given to a prepared statement: as text.
_PARAMS: dict[type, Callable[[Any], bytes | None]] = {
    str: _text, int: lambda n: b"%d" % n, float: lambda x: repr(x).encode(),
    type(None): lambda _: None, bool: lambda b: b"true" if b else b"false",
}


def _param(value: Any) -> bytes | None:
    """A value as the text a prepared statement's parameter is given, for the types queuectl
    stores: text, whole numbers, floats, NULL."""
    give = _PARAMS.get(type(value))
    if give is not None:
        return give(value)
    if isinstance(value, str):  # a StrEnum: its value
        return _text(str.__str__(value))
    if isinstance(value, int | float):
        return _param(float(value) if isinstance(value, float) else int(value))
    raise TypeError(f"cannot give {type(value).__name__} to SQL")


_CONNECTION_OK = 0  # libpq's CONNECTION_OK
_PIPELINE_SYNC = 10  # libpq's PGRES_PIPELINE_SYNC
_FATAL_ERROR = 7  # libpq's PGRES_FATAL_ERROR
# How the text of a column of these types (by OID) is read; anything else stays text.
_LOADERS: dict[int, Callable[[bytes], Any]] = {
    20: int, 21: int, 23: int, 26: int,  # int8, int2, int4, oid
    700: float, 701: float,  # float4, float8
    1700: lambda b: int(b) if b"." not in b else float(b),  # numeric (sum of integers)
    16: lambda b: b == b"t",  # bool
}


class _Rows:
    """A result read straight from libpq, with the cursor methods queuectl uses."""

    def __init__(self, result: Any) -> None:
        self._result = result
        self._next = 0
        fields = range(result.nfields)
        self.description = [(result.fname(i).decode(), result.ftype(i)) for i in fields]
        self._loaders = [_LOADERS.get(result.ftype(i)) for i in fields]
        tuples = result.command_tuples
        self.rowcount = result.ntuples if result.nfields else (tuples if tuples is not None
                                                                else -1)

    def _row(self, n: int) -> tuple[Any, ...]:
        row = []
        for i, load in enumerate(self._loaders):
            value = self._result.get_value(n, i)
            row.append(None if value is None else load(value) if load else value.decode())
        return tuple(row)

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._next >= self._result.ntuples:
            return None
        self._next += 1
        return self._row(self._next - 1)

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        end = min(self._next + size, self._result.ntuples)
        rows = [self._row(n) for n in range(self._next, end)]
        self._next = end
        return rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.fetchmany(self._result.ntuples)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


def _translated(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    found = _PLACEHOLDERS.get(sql)
    if found is None:
        found = _PLACEHOLDERS[sql] = sql.replace("%", "%%").replace("?", "%s")
    return found


class _Write:
    """A write held until the next round trip: one row's statement, or several rows of one
    ``_Shape`` that will go as one statement."""

    __slots__ = ("sql", "shape", "rows", "expect", "otherwise", "consume", "keys", "prepare",
                 "shapes")

    def __init__(self, sql: str, shape: _Shape | None, rows: list[Sequence[Any]],
                 expect: int | None, otherwise: list[Exception | None],
                 consume: Callable[[Any], None] | None, prepare: bool = False) -> None:
        self.sql, self.shape, self.rows, self.expect = sql, shape, rows, expect
        self.otherwise, self.consume, self.prepare = otherwise, consume, prepare
        self.keys: set[Any] | None = None  # an UPDATE's keys so far, once a second row comes
        # Each row's shape, once an update of other columns of the same table joins (_joined).
        self.shapes: list[_Shape] | None = None


class _Command(NamedTuple):
    """A statement as sent: a statement this connection prepared (its name) and its values
    as text, or (no name) a statement's own text."""

    name: bytes | None
    values: list[bytes | None] | None
    text: bytes | None


class _Shape:
    """One kind of change (``Db.insert`` into one table of the same columns, or
    ``Db.update`` of one table by its key, setting and adding the same columns), with its
    one-row statement; a run of such changes goes as one statement of many rows (see
    ``many``). One statement in place of n saves the server n - 1 executor start-ups; the
    rows and their triggers are the same. Two updates of the same row never join: the
    second must see the first."""

    def __init__(self, sql: str, table: str, columns: tuple[str, ...],
                 adds: tuple[bool, ...] = (), key: str | None = None,
                 joinable: bool = True, suffix: str = "") -> None:
        self.sql, self.table, self.columns, self.adds, self.key = sql, table, columns, adds, key
        self.joinable = joinable
        self.suffix = suffix  # what follows an INSERT's rows (ON CONFLICT ... DO NOTHING)
        self._many: dict[int, tuple[str, list[tuple[int, int]]]] = {}

    def joins(self, write: _Write, row: Sequence[Any]) -> bool:
        """Whether ``row`` may go in the same statement as ``write``'s rows."""
        if not self.joinable:
            return False
        if self.key is None:
            return True
        if write.keys is None:
            write.keys = {write.rows[0][-1]}
        if row[-1] in write.keys:
            return False
        write.keys.add(row[-1])
        return True

    def many(self, n: int, casts: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
        """The statement for ``n`` rows, and for each of its ``?`` in turn, which row's
        value (row, position in the one-row statement's values) it takes.

        An UPDATE sets each column by a CASE on the key and finds its rows with ``key IN
        (...)``: no join for the planner to get wrong (a join to a VALUES list was planned
        as a hash join over the whole table while it was young, and a prepared statement
        keeps its plan)."""
        found = self._many.get(n)
        if found is not None:
            return found
        if self.key is None:
            row = f"({', '.join('?' * len(self.columns))})"
            sql = (f"INSERT INTO {self.table} ({', '.join(self.columns)}) "
                   f"VALUES {', '.join([row] * n)}{self.suffix}")
            order = [(r, c) for r in range(n) for c in range(len(self.columns))]
        else:
            key = len(self.columns)  # the key's value comes last in the one-row statement
            assigns, order = [], []
            for c, (column, add) in enumerate(zip(self.columns, self.adds, strict=True)):
                # Each value cast to its column's type: a CASE alone would make it text.
                whens = " ".join(f"WHEN ? THEN {casts[column]}" for _ in range(n))
                order += [pair for r in range(n) for pair in ((r, key), (r, c))]
                value = f"CASE {self.key} {whens} END"
                assigns.append(f"{column} = {column} + {value}" if add
                               else f"{column} = {value}")
            order += [(r, key) for r in range(n)]
            sql = (f"UPDATE {self.table} SET {', '.join(assigns)} "
                   f"WHERE {self.key} IN ({', '.join('?' * n)})")
        if len(self._many) < 64:
            self._many[n] = sql, order
        return sql, order


_SHAPES: dict[tuple[Any, ...], _Shape] = {}
# Rows an update may have for one of other columns (or not next to it) to join it: each
# column's CASE walks its WHENs for every row, so a large batch's results and claims cost
# less as the two statements they were.
_JOIN_ACROSS = 8
_JOINED: dict[tuple[_Shape, ...], tuple[str, list[tuple[int, int]]]] = {}


def _joined(shapes: tuple[_Shape, ...], casts: dict[str, str]
            ) -> tuple[str, list[tuple[int, int]]]:
    """One UPDATE of several rows of a table, each found by its key and changed as its own
    shape says (a job's result and the next job's claim set different columns): each
    column takes, by a CASE on the key, the value of the rows that set or add to it, and
    keeps its own in the others. The order is as ``_Shape.many``'s."""
    found = _JOINED.get(shapes)
    if found is not None:
        return found
    key = shapes[0].key
    columns = list(dict.fromkeys(c for shape in shapes for c in shape.columns))
    assigns, order = [], []
    for column in columns:
        whens = []
        for r, shape in enumerate(shapes):
            if column in shape.columns:
                c = shape.columns.index(column)
                value = casts[column] if not shape.adds[c] else f"{column} + {casts[column]}"
                whens.append(f"WHEN ? THEN {value}")
                order += [(r, len(shape.columns)), (r, c)]
        assigns.append(f"{column} = CASE {key} {' '.join(whens)} ELSE {column} END")
    order += [(r, len(shape.columns)) for r, shape in enumerate(shapes)]
    sql = (f"UPDATE {shapes[0].table} SET {', '.join(assigns)} "
           f"WHERE {key} IN ({', '.join('?' * len(shapes))})")
    if len(_JOINED) < 256:
        _JOINED[shapes] = sql, order
    return sql, order


def _insert_shape(table: str, columns: tuple[str, ...], key: tuple[str, ...],
                  clash: Clash) -> _Shape:
    """Inserts join unless a clash would update a row: two rows of one statement may not
    both update the same one."""
    found = _SHAPES.get(("insert", table, columns, key, clash))
    if found is None:
        sql = statements.insert(table, columns, key, clash)
        plain = statements.insert(table, columns)
        found = _SHAPES[("insert", table, columns, key, clash)] = _Shape(
            sql, table, columns, joinable=clash in ("fail", "ignore"),
            suffix=sql[len(plain):])
    return found


def _update_shape(table: str, matched: tuple[tuple[str, bool], ...], set_: tuple[str, ...],
                  add: tuple[str, ...], unique: bool) -> _Shape:
    """Updates join only when each names its row by a key alone: with a further condition
    (a job's open run) an IN list of keys was planned as a scan of the whole table while it
    was young, a plan a prepared statement then kept."""
    found = _SHAPES.get(("update", table, matched, set_, add, unique))
    if found is None:
        by_key = unique and len(matched) == 1 and not matched[0][1]
        found = _SHAPES[("update", table, matched, set_, add, unique)] = _Shape(
            statements.update(table, matched, set_, add), table, (*set_, *add),
            (False,) * len(set_) + (True,) * len(add), matched[0][0] if by_key else None,
            joinable=by_key)
    return found


# Each ``statements.Change`` as this store writes it: its update's shape and fixed values.
_CHANGES: dict[Change, tuple[_Shape, tuple[Any, ...]]] = {}
_INSERTS: dict[Insert, _Shape] = {}  # each ``statements.Insert``'s shape
_NONE: Mapping[str, Any] = {}
HEAD_LOCK = "SELECT seq FROM queuectl_head FOR UPDATE"
# The head locked, and checked to be where this connection's last commit left it.
GUESSED_HEAD_LOCK = "SELECT queuectl_expect(seq, ?, ?) FROM queuectl_head FOR UPDATE"


class _Misguessed(Exception):
    """A write transaction's guess (``PgDb.attempt``) was wrong: the server refused it."""


class _NoRows:
    """The answer of a read guessed to find nothing."""

    description = [("guessed", 25)]
    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        return []

    def fetchall(self) -> list[tuple[Any, ...]]:
        return []

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(())


_NO_ROWS = _NoRows()


class PgDb(TellsRows):
    """A queuectl connection to a PostgreSQL database."""

    kind = "postgres"
    dialect = DIALECT
    appends_in_steps = False

    def __init__(self, conn: Any, url: str, durable: bool = True) -> None:
        self.conn = conn
        self.url = url
        self.durable = durable
        self.target = without_password(url)
        self._head: int | None = None  # inside a write transaction: the seq last appended
        self._tx_now: str | None = None
        self._wakes = False
        self._ends = False  # this transaction ended a job: NOTIFY ENDS_CHANNEL at commit
        self._appended = False
        self._offset = 0.0  # server clock minus local monotonic clock, seconds
        self._measured = -_CLOCK_EVERY
        self.generation = 0  # reconnections so far
        self._identity: str | None = None
        # Writes no one reads the result of, waiting to go with the next statement that
        # must be answered (a read, or the commit): their SQL, with the values in it, and
        # what to give their result to, if anything.
        self._pending: list[_Write] = []
        self._expected: dict[str, Exception] = {}  # what to raise for a failed expectation
        self._types: dict[str, dict[str, str]] = {}  # table -> column -> its type, for casts
        self._prepared: dict[str, bytes] = {}  # SQL -> the name this connection prepared it as
        # What a write transaction may guess instead of asking (see ``attempt``): the head as
        # this connection's last commit left it, and the reads whose last answer was no rows.
        self._last_head: int | None = None
        self._empty: set[str] = set()
        self._guessing = False  # inside a write transaction that guesses
        self._misses = 0  # wrong guesses in a row: as many doublings of the wait to guess again
        self._wait = 0  # attempts left to run without guessing

    # -- what every Db does ---------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        # 0: idle, outside any; a write transaction whose BEGIN waits to be sent counts too.
        # libpq's own number: conn.info builds an object and an enum member on every look.
        return self.conn.pgconn.transaction_status != 0 or self.in_transaction_pending()

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        """One statement, with the writes waiting (``change``) sent first in the same round
        trip; a statement with values runs as ``EXECUTE`` of one this connection prepared.

        Inside a transaction that guesses (``attempt``), a read whose last answer was no rows
        is answered so at once, and the server checks it in the transaction's place."""
        if self._guessing and sql in self._empty:
            token = f"queuectl-guess-{len(self._expected)}"
            self._expected[token] = _Misguessed(sql)
            # A row found fails the check; none found calls nothing (no count to take).
            checked = f"SELECT queuectl_expect(1, 0, ?) FROM ({sql}) AS guessed"
            self._hold(checked, (token, *parameters))
            return _NO_ROWS
        if self._pending or parameters:
            rows = self._send(self._command(sql, parameters))
        else:
            rows = self._direct(sql)
        if rows.description:  # an answer of rows, if only none
            if rows.rowcount == 0:
                self._empty.add(sql)
            else:
                self._empty.discard(sql)
        return rows

    @property
    def identity(self) -> str:
        """The server (its system identifier), the database and the schema, whatever host
        name or socket reaches them: read once, on first use."""
        if self._identity is None:
            (server, database, schema), = self._direct(
                "SELECT system_identifier, (SELECT oid FROM pg_database WHERE datname = "
                "current_database()), current_schema() FROM pg_control_system()").fetchall()
            self._identity = f"postgres:{server}:{database}:{schema}"
        return self._identity

    def _hold(self, sql: str, parameters: Sequence[Any] = (),
              consume: Callable[[Any], None] | None = None, prepare: bool = False) -> None:
        """A statement of the store's own (BEGIN, the head's lock) held until the next one
        that must be answered, and sent with it in one round trip; ``consume`` is given its
        result; ``prepare``: prepared even without values, as a statement run often is."""
        self._pending.append(_Write(sql, None, [tuple(parameters)], None, [None], consume,
                                    prepare))

    def _held(self, shape: _Shape, parameters: tuple[Any, ...],
              missing: Exception | None = None) -> None:
        """A projector's change, held until the next statement that must be answered, and
        then sent with it in one round trip: a projector's writes for one event cost no round
        trip of their own. A run of changes of one ``_Shape`` goes as one statement, and
        so do the updates by key of one table that other tables' changes alone separate
        (``_earlier_update``): a worker's result and its next claim are one UPDATE of jobs,
        and one firing of its triggers.
        ``missing`` is checked by the server (``queuectl_expect``): a change that matched
        no row fails the statement, and with it the rest of the transaction, before any
        COMMIT sent in the same round trip can run."""
        expect = None if missing is None else 1
        last = self._pending[-1] if self._pending else None
        if (last is not None and last.shape is shape and last.expect == expect
                and shape.joins(last, parameters)):
            last.rows.append(parameters)
            last.otherwise.append(missing)
            if last.shapes is not None:
                last.shapes.append(shape)
            return
        earlier = self._earlier_update(shape, expect)
        if (earlier is not None and len(earlier.rows) < _JOIN_ACROSS
                and shape.joins(earlier, parameters)):
            if earlier.shapes is None:
                assert earlier.shape is not None
                earlier.shapes = [earlier.shape] * len(earlier.rows)
            earlier.shapes.append(shape)
            earlier.rows.append(parameters)
            earlier.otherwise.append(missing)
            return
        self._pending.append(_Write(shape.sql, shape, [parameters], expect, [missing], None))

    def _earlier_update(self, shape: _Shape, expect: int | None) -> _Write | None:
        """The held update of ``shape``'s table by the same key that an update by key may
        join, though other changes came between: those are of other tables, whose rows
        and triggers do not touch this one, so the order of the two does not matter. None
        when a statement of the store's own (a lock, a guessed read) or another change of
        the table comes first: nothing passes those."""
        if shape.key is None:
            return None
        for write in reversed(self._pending):
            if write.shape is None:
                return None
            if write.shape.table == shape.table:
                same = write.shape.key == shape.key and write.expect == expect
                return write if same else None
        return None

    def insert(self, table: str, row: Mapping[str, Any], *, key: Sequence[str] = (),
               clash: Clash = "fail") -> None:
        self._held(_insert_shape(table, tuple(row), tuple(key), clash), tuple(row.values()))

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                    *, key: Sequence[str] = (), clash: Clash = "fail") -> None:
        """COPY, not one INSERT a row, unless a row may clash with one there already."""
        if clash == "fail":
            self._copy(table, columns, rows)
        elif rows:
            self._flush()
            sql = statements.insert(table, tuple(columns), tuple(key), clash)
            try:
                self.conn.cursor().executemany(_translated(sql), rows)
            except _driver().OperationalError as exc:
                raise self._failure(exc) from exc
            if self._told is not None:
                self._told(len(rows))

    def update(self, table: str, where: Mapping[str, Any], set_: Mapping[str, Any] = _NONE,
               add: Mapping[str, Any] = _NONE, *, unique: bool = True,
               missing: Exception | None = None) -> None:
        matched, values = statements.update_values(where, set_, add)
        self._held(_update_shape(table, matched, tuple(set_), tuple(add), unique),
                   tuple(values), missing)

    def add(self, insert: Insert, values: Sequence[Any]) -> None:
        shape = _INSERTS.get(insert)
        if shape is None:
            shape = _INSERTS[insert] = _insert_shape(insert.table, insert.columns, (), "fail")
        self._held(shape, tuple(values))

    def change(self, change: Change, values: Sequence[Any]) -> None:
        """As ``update`` would write it: the fixed values bound with the others, so that
        a change joins the updates of other shapes of its table (``_Shape``)."""
        found = _CHANGES.get(change)
        if found is None:
            found = _CHANGES[change] = (_update_shape(
                change.table, ((change.key, False), *((c, True) for c in change.null)),
                (*change.fixed, *change.given), change.added, change.unique),
                tuple(change.fixed.values()))
        shape, fixed = found
        self._held(shape, (*fixed, *values),
                   None if change.missing is None else change.missing(values[-1]))

    def update_many(self, table: str, key: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        self._flush()
        try:
            self.conn.cursor().executemany(
                _translated(statements.update_by(table, key, tuple(columns))), rows)
        except _driver().OperationalError as exc:
            raise self._failure(exc) from exc

    def delete(self, table: str, column: str, keys: Sequence[Any], *,
               missing: Exception | None = None) -> None:
        """One statement with the keys as an array, not one statement a key."""
        gone = self._with_array(f"DELETE FROM {table} WHERE {column} = ANY(%s)", keys)
        if missing is not None and gone < len(keys):
            raise missing

    def _render(self, write: _Write) -> _Command:
        """A held write as sent: one row with the statement prepared for it; several of one
        shape (or updates of one table's rows by key, of several shapes) as one statement of
        many rows."""
        sql, rows = write.sql, write.rows
        parameters: Sequence[Any] = rows[0]
        if write.shapes is not None:
            sql, order = _joined(tuple(write.shapes), self._column_types(write.shapes[0].table))
            parameters = [rows[r][c] for r, c in order]
        elif len(rows) > 1:
            assert write.shape is not None
            sql, order = write.shape.many(len(rows), self._column_types(write.shape.table))
            parameters = [rows[r][c] for r, c in order]
        if write.expect is None:
            return self._command(sql, parameters, write.prepare)
        token = f"queuectl-expect-{len(self._expected)}"
        first = write.otherwise[0] or LookupError(f"{write.sql}: {write.expect} rows expected")
        self._expected[token] = first if len(rows) == 1 else type(first)(
            f"{first} (or another of {len(rows)} rows written together)")
        checked = (f"WITH changed AS ({sql} RETURNING 1) "
                   "SELECT queuectl_expect(count(*), ?, ?) FROM changed")
        return self._command(checked, (*parameters, write.expect * len(rows), token))

    def _column_types(self, table: str) -> dict[str, str]:
        """How a value is cast to each column's type (and collation) of ``table``, read from
        the catalog once per connection."""
        types = self._types.get(table)
        if types is None:
            try:
                found = self.conn.execute(
                    """SELECT a.attname, 'CAST(? AS ' || format_type(a.atttypid, a.atttypmod)
                        || ')' || CASE WHEN c.collname IS NULL OR c.collname = 'default' THEN ''
                           ELSE ' COLLATE "' || c.collname || '"' END
                    FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation
                    WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped""",
                    (table,)).fetchall()
            except _driver().OperationalError as exc:
                raise self._failure(exc) from exc
            types = self._types[table] = dict(found)
        return types

    def _command(self, sql: str, parameters: Sequence[Any], prepare: bool = False
                 ) -> _Command:
        """``sql`` to send with others in one round trip: a statement this connection
        prepared the first time it met it (the server plans it once), given its values as
        text. Without values, the text itself, unless ``prepare``."""
        if not parameters and not prepare:
            return _Command(None, None, sql.encode())
        name = self._prepared.get(sql)
        if name is None:
            text = f"queuectl_{len(self._prepared) + 1}"
            marks = iter(range(1, sql.count("?") + 1))
            numbered = re.sub(r"\?", lambda _: f"${next(marks)}", sql)
            try:
                self.conn.execute(f"PREPARE {text} AS {numbered}")
            except _driver().OperationalError as exc:
                raise self._failure(exc) from exc
            name = self._prepared[sql] = text.encode()
        params = _PARAMS
        return _Command(name, [(params.get(type(v)) or _param)(v) for v in parameters], None)

    def _send(self, last: _Command | None) -> Any:
        """The pending writes and ``last`` in one round trip, sent through libpq itself
        (psycopg's cursors cost more than the round trip on a busy worker) in its pipeline
        mode: a prepared statement runs from its values, with no statement text for the
        server to parse. Returns ``last``'s rows (without ``last``, the last write's). A
        write that changed other than the rows it expected fails its statement, and the
        server skips the rest."""
        pending, self._pending = self._pending, []
        commands = [*map(self._render, pending), *([last] if last is not None else [])]
        psycopg = _driver()
        pgconn = self.conn.pgconn
        results = []
        try:
            pgconn.enter_pipeline_mode()
            for command in commands:
                if command.name is None:
                    pgconn.send_query_params(command.text, None)
                else:
                    pgconn.send_query_prepared(command.name, command.values)
            pgconn.pipeline_sync()
            while pgconn.flush():
                select.select([], [pgconn.socket], [])
            while True:
                # libpq's PQgetResult waits for the server holding the GIL: every other
                # thread of the worker (the jobs it is starting, their output) would stop
                # for the round trip. Wait on the socket instead, which releases it.
                while pgconn.is_busy():
                    select.select([pgconn.socket], [], [])
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:  # the end of one statement's results
                    if pgconn.status != _CONNECTION_OK:
                        break
                    continue
                if result.status == _PIPELINE_SYNC:
                    break
                results.append(result)
            if pgconn.status == _CONNECTION_OK:
                pgconn.exit_pipeline_mode()
        except psycopg.OperationalError as exc:
            raise self._failure(exc) from exc
        if pgconn.status != _CONNECTION_OK:
            raise self._failure(psycopg.OperationalError(pgconn.error_message.decode(
                errors="replace")))
        failed = next((r for r in results if r.status == _FATAL_ERROR), None)
        if failed is not None:
            error = psycopg.errors.error_from_result(failed, encoding="utf-8")
            token = error.diag.message_primary
            if error.sqlstate == "QE001" and token in self._expected:
                raise self._expected[token] from None
            if isinstance(error, psycopg.OperationalError):
                raise self._failure(error) from error
            raise error
        if not self.in_transaction:
            self._expected.clear()
        for write, result in zip(pending, results, strict=False):
            if write.consume is not None:
                write.consume(_Rows(result))
        return _Rows(results[-1])

    def _flush(self) -> None:
        if self._pending:
            self._send(_Command(None, None, b"SELECT 1"))

    def _failure(self, exc: BaseException) -> BaseException:
        """What a driver's operational error means to queuectl: a lost connection (a new one
        may do), the head held longer than the lock timeout, or a plain error."""
        psycopg = _driver()
        if self.conn.closed or self.conn.broken:
            return StoreUnavailable(f"lost the connection to {self.target}: "
                                    f"{_reason(exc, self.url)}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return StoreError("database is locked: another process held it for over "
                              f"{_lock_timeout():g}s; try again")
        return exc

    def reconnect(self) -> None:
        """A new connection in place of a lost one; StoreUnavailable while the server is
        still away. ``generation`` counts the connections made, so that users of this one
        can tell they may have missed the outcome of a commit."""
        try:
            self.conn.close()
        except Exception:
            pass
        try:
            fresh = connect(self.url, durable=self.durable, timeout=3)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None
        self.conn = fresh.conn
        self._prepared = {}
        self._types = {}
        self._pending = []
        self._head = self._tx_now = self._last_head = None
        self._measured = -_CLOCK_EVERY
        self.generation += 1

    @contextmanager
    def transaction(self, guess: bool = False) -> Iterator[PgDb]:
        """BEGIN, then the head row locked first: every writer of the ledger takes turns here,
        which makes seqs gapless and in commit order. Both go with the transaction's first
        read (or its commit). A transaction that appended moves the head and, if it made
        work claimable, wakes the listening workers.

        ``guess`` (see ``attempt``): the head is taken to be where this connection's last
        commit left it, which the server checks as it takes the lock, before any write."""
        with PROCESS_LOCK:
            self._pending = []
            self._appended = self._wakes = self._ends = False
            try:
                self._hold("BEGIN")
                if guess and self._last_head is not None:
                    # The lock and the check are one statement: were the head moved while
                    # this one waited for it, the server checks the row as it finds it then.
                    token = f"queuectl-guess-{len(self._expected)}"
                    self._expected[token] = _Misguessed("the head")
                    self._hold(GUESSED_HEAD_LOCK, (self._last_head, token))
                    self._head, self._guessing = self._last_head, True
                else:
                    self._hold(HEAD_LOCK, consume=self._took_head, prepare=True)
                yield self
                if self._appended:
                    self._move_head()
                self._commit()
                self._last_head = self._head
            except BaseException as exc:
                # Whatever failed may have been decided on a wrong guess: the server says.
                refuted = (self._guessing and not isinstance(exc, _Misguessed)
                           and self._refuted())
                self._pending = []
                self._rollback()
                if refuted:
                    raise _Misguessed("a guess the transaction's error followed") from exc
                raise
            finally:
                self._head = self._tx_now = None
                self._guessing = False

    def _move_head(self) -> None:
        """The head moved to the seq last appended, at the end of the transaction. When
        nothing of it has gone yet, the guessed lock itself moves it instead, by the
        number of events appended, and checks where it moved to (so, where it was): lock,
        check and move are then one statement, still the first, and a head moved by a
        commit it waited for is checked as the server finds it after the wait."""
        held = self._pending[1] if self.in_transaction_pending() else None
        if held is None or held.sql != GUESSED_HEAD_LOCK:
            self._hold(f"UPDATE queuectl_head SET seq = ?{self._notifies(' RETURNING ')}",
                       (self._last(),))
            return
        assert self._head is not None
        guessed, token = held.rows[0]
        held.sql = ("UPDATE queuectl_head SET seq = seq + ? "
                    f"RETURNING queuectl_expect(seq, ?, ?){self._notifies(', ')}")
        held.rows = [(self._head - guessed, self._head, token)]

    def _commit(self) -> None:
        """COMMIT, sent with the writes still held. A transaction none of whose statements
        has gone yet needs neither BEGIN nor COMMIT: in pipeline mode, the statements up
        to a sync run as one transaction, which the sync commits (as durably: the commit
        waits for the flush to disk as any other under ``synchronous_commit``) or, after
        an error, rolls back whole."""
        if not self.in_transaction_pending():
            self.execute("COMMIT")
            return
        del self._pending[0]
        if self._pending:
            self._send(None)

    def _notifies(self, before: str) -> str:
        """What the head's update returns: the transaction's wake-ups, as ``pg_notify``
        calls, which the server sends at commit as it would a NOTIFY statement of each."""
        channels = [c for c, sent in ((CHANNEL, self._wakes), (ENDS_CHANNEL, self._ends)) if sent]
        calls = ", ".join(f"pg_notify('{c}', '')" for c in channels)
        return before + calls if calls else ""

    def _refuted(self) -> bool:
        """Whether the server finds one of this transaction's guesses wrong, asked now."""
        try:
            self._flush()
        except _Misguessed:
            return True
        except Exception:  # the transaction's own error is the one to report
            pass
        return False

    def attempt(self, body: Callable[[], T]) -> T:
        """``body`` in one write transaction, sent to the server in one round trip when this
        connection can guess everything it would otherwise wait for: the head, as its own
        last commit left it, and the answer to each read whose last answer was no rows.
        The server checks every guess before the writes that follow it; after a wrong one
        the transaction is rolled back and ``body`` runs again, asking. A connection whose
        guesses keep failing (other hosts write) guesses less and less often."""
        if self._last_head is not None and not self._wait:
            try:
                with self.transaction(guess=True):
                    result = body()
                self._misses = 0
                return result
            except _Misguessed:
                self._misses = min(self._misses + 1, 6)
                self._wait = 2 ** self._misses
        self._wait = max(0, self._wait - 1)
        with self.transaction():
            return body()

    @contextmanager
    def side_transaction(self) -> Iterator[PgDb]:
        """A write of data beside the ledger (the output store): it appends no event, so it
        does not take the ledger's head, and ledger writers never wait for it."""
        with PROCESS_LOCK:
            self._pending = []
            try:
                self._hold("BEGIN")
                yield self
                self._commit()
            except BaseException:
                self._pending = []
                self._rollback()
                raise
            finally:
                self._tx_now = None

    def _took_head(self, cursor: Any) -> None:
        (self._head,) = cursor.fetchone()

    def _last(self) -> int:
        """The seq last appended in this transaction (the head, read if not yet)."""
        if self._head is None:
            self._flush()
        assert self._head is not None
        return self._head

    def _rollback(self) -> None:
        if self.conn.pgconn.transaction_status == 0:  # idle: nothing sent, or the sync of a
            return  # transaction of one round trip rolled it back already
        try:
            self.conn.execute("ROLLBACK")
        except Exception:  # the connection itself is what failed: nothing to roll back
            pass

    @contextmanager
    def snapshot(self) -> Iterator[PgDb]:
        with PROCESS_LOCK:
            self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield self
            finally:
                self._rollback()
                self._tx_now = None  # the time asked for inside was this read's only

    def now(self) -> str:
        """The server's clock, tracked on this host's monotonic clock (measured against the
        server at connect and every minute): no round trip. Inside a write transaction, the
        time it first asked for, so that all its events share it."""
        if self._tx_now is not None:
            return self._tx_now
        if clock.now is not clock.system_now:  # a fake clock (tests) is taken at its word
            now = clock.now()
        else:
            if time.monotonic() - self._measured > _CLOCK_EVERY:
                self._measure_clock()
            now = clock.of_micros(int((time.monotonic() + self._offset) * 1_000_000))
        if self.in_transaction:
            self._tx_now = now
        return now

    def _measure_clock(self) -> None:
        """The server's clock against this host's monotonic one, taken halfway through a
        round trip."""
        before = time.monotonic()
        (server,) = self._direct(
            "SELECT extract(epoch FROM clock_timestamp())::double precision").fetchone()
        after = time.monotonic()
        self._offset = float(server) - (before + after) / 2
        self._measured = after

    def _direct(self, sql: str) -> Any:
        """A statement sent at once, outside the pipeline of changes; a lost connection is
        reported as every other statement's is (``_failure``)."""
        try:
            return self.conn.execute(sql)
        except _driver().OperationalError as exc:
            raise self._failure(exc) from exc

    def in_transaction_pending(self) -> bool:
        """Inside a write transaction whose BEGIN has not been sent yet."""
        return bool(self._pending) and self._pending[0].sql == "BEGIN"

    def next_seq(self) -> int:
        if self._head is None and self.in_transaction_pending():
            self._flush()
        if self._head is None:  # outside a write transaction: only a guess
            return int(self._direct("SELECT seq FROM queuectl_head").fetchone()[0]) + 1
        return self._head + 1

    def insert_events(self, at: str, rows: list[tuple[str, str | None, str | None, str]]
                      ) -> int:
        if self._head is None and self.in_transaction_pending():
            self._flush()
        if self._head is None:
            raise RuntimeError("insert_events() needs a write transaction")
        first = self._head + 1
        if len(rows) <= 100:
            values = ", ".join("(?, ?, ?, ?, ?, ?)" for _ in rows)
            self._hold(f"INSERT INTO events (seq, at, type, job_id, worker_id, body) "
                       f"VALUES {values}",
                       [x for n, row in enumerate(rows) for x in (first + n, at, *row)])
            if self._told is not None:
                self._told(len(rows))
        else:  # a bulk enqueue: COPY writes rows at a fraction of the cost
            self._copy("events", EVENT_COLUMNS,
                       ((first + n, at, *row) for n, row in enumerate(rows)))
        self._head = first + len(rows) - 1
        self._appended = True
        self._wakes = self._wakes or any(row[0] in WAKING for row in rows)
        self._ends = self._ends or any(row[0] in ENDING for row in rows)
        return first

    def _copy(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """COPY ``rows`` into ``table``, written as COPY's text format here, which costs a
        row less than psycopg's ``write_row`` (bench scenario bulk)."""
        self._flush()
        try:
            with self.conn.cursor().copy(
                    f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for chunk in _chunks(rows, 5_000):
                    copy.write(("\n".join(map(_copy_line, chunk)) + "\n").encode())
                    if self._told is not None:
                        self._told(len(chunk))
        except _driver().OperationalError as exc:
            raise self._failure(exc) from exc

    def _with_array(self, sql: str, values: Sequence[Any]) -> int:
        """``sql`` with ``values`` as its one array parameter; how many rows it changed."""
        self._flush()
        try:
            return int(self.conn.execute(sql, (list(values),)).rowcount)
        except _driver().OperationalError as exc:
            raise self._failure(exc) from exc

    def copy_events(self, rows: list[tuple[int, str, str, str | None, str | None, str]]) -> None:
        if not self.in_transaction and not self.in_transaction_pending():
            raise RuntimeError("copy_events() needs a write transaction")
        self._flush()
        assert self._head is not None
        if rows and rows[0][0] <= self._head:
            raise StoreError(f"seq {rows[0][0]} does not follow the ledger's last, {self._head}")
        self._copy("events", EVENT_COLUMNS, rows)
        if rows:
            self._head = rows[-1][0]
            self._appended = True

    archive_target = "table archived_events"

    def archive(self, seqs: Sequence[int]) -> None:
        """Copied and deleted in this transaction: both commit, or neither."""
        if not self.in_transaction:
            raise RuntimeError("archive() needs a write transaction")
        self._hold("SET LOCAL queuectl.pruning = 'on'")
        self._with_array("INSERT INTO archived_events SELECT * FROM events WHERE seq = ANY(%s) "
                         "ON CONFLICT (seq) DO NOTHING", seqs)
        self.delete("events", "seq", seqs)
        self.execute("SET LOCAL queuectl.pruning = 'off'")

    def archived(self, job_id: str) -> list[tuple[int, str, str, str]]:
        return self.execute("SELECT seq, at, type, body FROM archived_events "
                            "WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()

    @contextmanager
    def bulk(self) -> Iterator[PgDb]:
        yield self

    @contextmanager
    def aside(self) -> Iterator[None]:
        """None: a SQLite file's rows cannot be copied into the server's tables in one
        statement, so a replay here goes in one process."""
        yield None

    def adopt(self, scratch: str, tables: Iterable[str]) -> None:
        raise NotImplementedError("PostgreSQL takes no scratch file (see aside)")

    def wake(self) -> None:
        self._wakes = True

    def waker(self, on_crash: Callable[[BaseException], None] | None = None, *,
              ends: bool = False) -> Waker:
        return Waker(self.url, on_crash, ENDS_CHANNEL if ends else CHANNEL)

    def for_worker(self, interrupt: int | None = None) -> None:
        """A worker's results are written without waiting for the flush to disk: a crash of
        the server may forget the last ones, and those jobs run again (at-least-once).

        Its statements are planned once each (``plan_cache_mode``), not for each of their
        first five runs: a batch's statements come in many sizes, each its own prepared
        statement, so most of their runs were planned afresh (pg_stat_statements shows the
        planning time). Their plans,
        read by key or down ``jobs_ready`` to a LIMIT, do not depend on the values (at a
        million jobs the generic plan of the claim's read is the custom one); a change of
        a table's statistics (ANALYZE) still replans them."""
        self.durable = False
        self.execute("SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan")

    def close(self) -> None:
        self.conn.close()


# -- opening ------------------------------------------------------------------------------


def read_once(url: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One query on a read-only connection of its own (see ``store.read_once``): through
    the system's libpq where there is one, which spares psycopg's import."""
    from queuectl.store import libpq

    found = libpq.load()
    if found is not None:
        return libpq.rows(found, url, sql, params)
    psycopg = _driver()
    with psycopg.connect(url, autocommit=True, connect_timeout=2,
                         application_name="queuectl-read",
                         options=_with_given_options(psycopg, url, libpq.READ_ONLY)) as conn:
        return [tuple(row) for row in conn.execute(_translated(sql), params).fetchall()]


def _with_given_options(psycopg: Any, url: str, ours: str) -> str:
    """``ours`` after the ``options`` the URL gives (a search_path naming the schema of its
    queue, say), which an ``options`` argument would otherwise replace."""
    given = psycopg.conninfo.conninfo_to_dict(url).get("options") or ""
    return f"{given} {ours}".strip()


def _driver() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("PostgreSQL support needs psycopg: from queuectl's clone, "
                         "pip install '.[postgres]'") from None
    return psycopg


def connect(url: str, *, durable: bool = True, create: bool = True, timeout: int = 10
            ) -> PgDb:
    """Connect to ``url`` and bring the ledger's own tables up to date, creating them in a
    database without them only when ``create`` (the database itself is made by its
    administrator, not by queuectl)."""
    psycopg = _driver()
    shown = without_password(url)
    lock_timeout = _lock_timeout()
    # The session's settings travel in the start-up packet: no round trip of their own.
    settings = {"lock_timeout": int(lock_timeout * 1000),
                "idle_in_transaction_session_timeout": 60000,
                "synchronous_commit": "on" if durable else "off",
                "TimeZone": "UTC", "standard_conforming_strings": "on"}
    try:
        options = _with_given_options(
            psycopg, url, " ".join(f"-c {k}={v}" for k, v in settings.items()))
        conn = psycopg.connect(url, autocommit=True, connect_timeout=timeout,
                               application_name="queuectl", options=options)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to {shown}: {_reason(exc, url)}") from None
    # queuectl prepares its statements itself (PgDb._command); psycopg's own cache would
    # answer every ROLLBACK with DEALLOCATE ALL, dropping them.
    conn.prepare_threshold = None
    db = PgDb(conn, url, durable)
    try:
        _ensure_ledger(db, shown, create)
    except psycopg.Error as exc:
        conn.close()
        raise StoreError(f"cannot open {shown}: {_reason(exc, url)}") from None
    except BaseException:
        conn.close()
        raise
    return db


def _lock_timeout() -> float:
    return limits.from_env("QUEUECTL_LOCK_TIMEOUT", "lock_timeout", 30.0)


def _reason(exc: BaseException, url: str) -> str:
    """A driver's message on one line, with the URL's password (should it appear) hidden."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def _ensure_ledger(db: PgDb, shown: str, create: bool) -> None:
    """The ledger's tables, created on first use (under an advisory lock, so that two hosts
    starting at once do not race); as on SQLite, a database holding other tables but not
    queuectl's is refused, and so is one without them when ``create`` is not given."""
    tables = {r[0] for r in db.conn.execute(  # not information_schema: its views cost more
        "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
        "AND relkind IN ('r', 'p', 'v', 'm', 'f')")}
    if "queuectl_head" in tables:
        version, db._last_head = db.conn.execute(
            "SELECT version, seq FROM queuectl_head").fetchone()
        if version >= SCHEMA_VERSION:
            return
    elif tables - OURS:
        raise StoreError(f"{shown} is not a queuectl database (it holds other tables)")
    elif not create:
        raise StoreError(f"no queuectl database at {shown} (commands that write, such as "
                         "enqueue, create it)")
    db.conn.execute("BEGIN")
    try:
        db.conn.execute("SELECT pg_advisory_xact_lock(hashtext('queuectl schema'))")
        if _current(db):  # another process brought it up to date while this one waited:
            db.conn.execute("COMMIT")  # its DDL again would lock the ledger against its work
            return
        for statement in LEDGER_DDL:
            db.conn.execute(statement)
        db.conn.execute("UPDATE queuectl_head SET version = %s", (SCHEMA_VERSION,))
        db.conn.execute("COMMIT")
    except BaseException:
        db._rollback()
        raise


def _current(db: PgDb) -> bool:
    """Whether the ledger's tables are there at ``SCHEMA_VERSION`` (under the schema lock)."""
    (head,) = db.conn.execute("SELECT to_regclass('queuectl_head') IS NOT NULL").fetchone()
    if not head:
        return False
    (version,) = db.conn.execute("SELECT version FROM queuectl_head").fetchone()
    return bool(version >= SCHEMA_VERSION)


# -- waking idle workers ------------------------------------------------------------------


class Waker:
    """Wakes a process's idle workers when a transaction sends ``NOTIFY queuectl`` (or a
    ``wait`` when one sends ``NOTIFY queuectl_ends``: ``channel``).

    It listens on a connection of its own. A lost connection is reopened with back-off; the
    notifications sent meanwhile are lost, so every reconnection wakes the workers once, to
    look for themselves. Their poll interval stays as a fallback.
    """

    def __init__(self, url: str, on_crash: Callable[[BaseException], None] | None = None,
                 channel: str = CHANNEL) -> None:
        self._url = url
        self._channel = channel
        self._on_crash = on_crash
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = False
        self._conn: Any = None
        self._stop_r, self._stop_w = os.pipe()  # written by close(): ends the wait at once
        # The thread listens first, then pokes: whatever was sent before it listened, the
        # workers look for once (their first claims go meanwhile, not after a connection).
        self._thread = threading.Thread(target=self._supervised, name="waker", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        psycopg = _driver()
        self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10,
                                     application_name="queuectl-waker")
        self._conn.execute(f"LISTEN {self._channel}")

    def _supervised(self) -> None:
        try:
            self._watch()
        except BaseException as exc:
            self.error = exc
            if self._on_crash is not None:
                self._on_crash(exc)

    def _watch(self) -> None:
        psycopg = _driver()
        backoff = 0.1
        while not self._closed:
            try:
                if self._conn is None:
                    self._listen()
                    backoff = 0.1
                    self.poke()  # what was sent while we were away is lost: look once
                ready, _, _ = select.select([self._conn.fileno(), self._stop_r], [], [], 5.0)
                if self._conn.fileno() in ready and list(self._conn.notifies(timeout=0)):
                    self.poke()
            except psycopg.Error:
                if self._closed:
                    return
                try:
                    self._conn.close()
                except Exception:
                    pass
                self._conn = None
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

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
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen or self._closed, timeout)

    def close(self) -> None:
        self._closed = True
        self.poke()
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        if self._conn is not None:
            self._conn.close()
