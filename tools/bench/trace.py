"""A piece of work's statements alone: what the store sent for it, recorded, then sent again
to a copy of the store as it was before, with none of queuectl's Python between them.

The replay runs the same statements, with the same values, in the same order, on the same
rows, in the same transactions (and on PostgreSQL in the same round trips), so the store
does the same work. What it costs is the ceiling of that piece of work on this schema and
machine: no change to queuectl's Python can make the work go faster than its statements.
The bench reads a target that the statements alone miss as bound by the schema.
"""

from __future__ import annotations

import select
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from queuectl.store import is_postgres

from .context import Context


class Unfit(RuntimeError):
    """A ceiling written for the statements of this version cannot run: those recorded are
    not what a piece of work written by hand was written for (the code measured is another
    version's), or the tool it needs (pgbench) is not installed."""


T = TypeVar("T")


def by_hand(ctx: Context, scenario: str, measure: Callable[[], T], into: list[T]) -> bool:
    """``measure()``, a ceiling written for this version's statements (the least Python, or
    the statements sent by pgbench), its figure added to ``into``; whether it ran (the log
    says why not: its target then keeps the ceiling of its statements alone)."""
    try:
        into.append(measure())
    except Unfit as exc:
        ctx.log(f"{scenario}: a ceiling is not run here ({exc})")
        return False
    return True


class Trace:
    """The statements one connection sent, in order: on SQLite ``(many, sql, values)``;
    on PostgreSQL a list of round trips, each a list of libpq commands, and the statements
    the connection prepared (their ``PREPARE`` texts), which a replay prepares first."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.prepared: list[str] = []

    def __len__(self) -> int:
        return len(self.steps)


@contextmanager
def twin(ctx: Context, db: Path | str) -> Iterator[Path | str]:
    """A copy of the store ``db`` as it is now (nobody may be writing it): a file copy of a
    SQLite database, a PostgreSQL database made from it as a template."""
    if is_postgres(db):
        name = urlsplit(str(db)).path.lstrip("/")
        with ctx.fresh_pg(template=name) as url:
            yield url
        return
    with ctx.fresh_db("twin") as path:
        for suffix in ("", "-wal"):  # the WAL, if a connection left one
            source = Path(f"{db}{suffix}")
            if source.exists():
                shutil.copyfile(source, f"{path}{suffix}")
        yield path


@contextmanager
def recording(conn: Any) -> Iterator[Trace]:
    """Every statement ``conn`` (a queuectl connection) sends while inside, in ``Trace``."""
    trace = Trace()
    kind = type(conn)
    conn.__class__ = _recorder(kind)
    conn.trace = trace
    try:
        yield trace
        if is_postgres(conn.target):
            trace.prepared = [text for (text,) in conn.conn.execute(
                "SELECT statement FROM pg_prepared_statements").fetchall()]
    finally:
        conn.__class__ = kind
        del conn.trace


def replay(conn: Any, trace: Trace) -> None:
    """Send ``trace`` again on ``conn``, a queuectl connection to a twin of the store it was
    recorded on, set up as the recording one was; answers are read and dropped."""
    if is_postgres(conn.target):
        send_trips(conn.conn.pgconn, trace.steps)
    else:
        send_steps(conn, trace.steps)


# send_steps and send_trips use nothing but their arguments, select and _PIPELINE_SYNC: the
# scaling scenario's interpreters that replay with no queuectl in them run their source.


def send_steps(conn: Any, steps: list[Any]) -> None:
    """A SQLite trace's steps, on ``conn`` (any ``sqlite3`` connection)."""
    execute, executemany = conn.execute, conn.executemany
    for many, sql, values in steps:
        if many:
            executemany(sql, values)
        else:
            execute(sql, values).fetchall()


def transactions(trace: Trace) -> list[Trace]:
    """A trace cut into its write transactions, each from its ``BEGIN`` (what comes before
    the first stays with it). On PostgreSQL, a transaction is its round trips from the one
    that begins it to the one that commits it; a round trip outside any (one sent whole,
    which the pipeline's sync commits) is one of its own."""
    parts: list[Trace] = []
    open_ = False
    for step in trace.steps:
        if isinstance(step, list):  # a PostgreSQL round trip
            begins = step[0][2] == b"BEGIN"
            starts = begins or not open_
            open_ = (open_ or begins) and step[-1][2] != b"COMMIT"
        else:
            starts = step[1] == "BEGIN IMMEDIATE"
        if not parts or starts:
            parts.append(Trace())
            parts[-1].prepared = trace.prepared
        parts[-1].steps.append(step)
    return parts


def joined(parts: list[Trace]) -> Trace:
    """One trace of ``parts`` (of one recording, as ``transactions`` cut it), in order."""
    whole = Trace()
    for part in parts:
        whole.steps.extend(part.steps)
        whole.prepared = part.prepared
    return whole


def prepare_for_replay(conn: Any, trace: Trace) -> None:
    """On PostgreSQL, the recorded connection's prepared statements, under their names, in
    place of this one's own (outside the replay's time, as the recording prepared them
    before its own)."""
    if is_postgres(conn.target):
        conn.conn.execute("DEALLOCATE ALL")
        for text in trace.prepared:
            conn.conn.execute(text)


_RECORDERS: dict[type, type] = {}


def _recorder(kind: type) -> type:
    """A subclass of the connection's class that records what it sends."""
    if kind in _RECORDERS:
        return _RECORDERS[kind]
    if getattr(kind, "kind", "") == "sqlite":

        class Sqlite(kind):  # type: ignore[valid-type,misc]
            def execute(self, sql: str, parameters: Any = (), /) -> Any:
                self.trace.steps.append((False, sql, tuple(parameters)))
                return super().execute(sql, parameters)

            def executemany(self, sql: str, rows: Any, /) -> Any:
                rows = [tuple(row) for row in rows]
                self.trace.steps.append((True, sql, rows))
                return super().executemany(sql, rows)

        _RECORDERS[kind] = Sqlite
    else:

        class Postgres(kind):  # type: ignore[valid-type,misc]
            def _render(self, write: Any) -> Any:
                command = super()._render(write)
                self._trip.append(command)
                return command

            def _send(self, last: Any) -> Any:
                self._trip = []
                try:
                    return super()._send(last)
                finally:  # without ``last``: the writes alone, committed by the sync
                    self.trace.steps.append([*self._trip, *([last] if last else [])])

            def _direct(self, sql: str) -> Any:
                self.trace.steps.append([(None, None, sql.encode())])
                return super()._direct(sql)

        _RECORDERS[kind] = Postgres
    return _RECORDERS[kind]


_PIPELINE_SYNC = 10  # libpq's PGRES_PIPELINE_SYNC


def send_trips(pgconn: Any, trips: list[Any]) -> None:
    """Each recorded round trip in libpq's pipeline mode on ``pgconn`` (psycopg's), as the
    store sends them: the loop of ``PgDb._send``, copied rather than called, so that the
    bench replays the statements of older versions of the store too (comparing a commit
    with an older one in the same run)."""
    for trip in trips:
        pgconn.enter_pipeline_mode()
        for name, values, text in trip:
            if name is None:
                pgconn.send_query_params(text, None)
            else:
                pgconn.send_query_prepared(name, values)
        pgconn.pipeline_sync()
        while pgconn.flush():
            select.select([], [pgconn.socket], [])
        while True:
            while pgconn.is_busy():
                select.select([pgconn.socket], [], [])
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is not None and result.status == _PIPELINE_SYNC:
                break
        pgconn.exit_pipeline_mode()
