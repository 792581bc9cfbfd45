"""The event ledger: the one write path, reading it back, and replay.

``append(tx, *events)`` is the only writer of the ``events`` table and the only caller of the
projectors, always inside a write transaction opened with ``write(db)``: the event and every
projection change commit together or not at all. Which store holds the ledger (SQLite or
PostgreSQL) is the ``Db``'s business (``queuectl.store``); nothing here depends on it.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec

from projections import VERSIONS, appliers, live, live_of, readers, registry
from queuectl import actor, store
from queuectl import events as ev
from queuectl.errors import CorruptLedger, InvalidInput
from queuectl.events import TAG_OF, TAGS, Event, Pruned, encode
from queuectl.store import PROCESS_LOCK, Db

if TYPE_CHECKING:
    from queuectl import progress

__all__ = ["PROCESS_LOCK", "Db", "append", "check", "connect", "next_seq", "read_events",
           "rebuild", "write"]


# -- opening ------------------------------------------------------------------------------


def connect(target: str | os.PathLike[str] | None = None, *, durable: bool = True,
            create: bool = True) -> Db:
    """Open the store ``target`` names (``QUEUECTL_DB``, else ``data/queue.db``), creating a
    SQLite file on first use when ``create``, and bring its projections up to date.

    ``durable``: an acknowledged write survives power loss (workers pass False: a lost
    completion only means a job runs again).
    """
    db = store.connect(target, durable=durable, create=create)
    try:
        _ensure_projections(db)
    except BaseException:
        db.close()
        raise
    return db


def _ensure_projections(db: Db) -> None:
    """A projection whose stored version differs from the code's is rebuilt from the ledger,
    in one transaction (on any error the old tables stay)."""
    versions = dict(db.execute("SELECT name, version FROM projection_meta").fetchall())
    if any(versions.get(name) != version for name, version in VERSIONS.items()):
        with db.transaction():
            # Look again under the write lock: another process may have just rebuilt them.
            versions = dict(db.execute("SELECT name, version FROM projection_meta").fetchall())
            _rebuild(db, [p for p in registry() if versions.get(p.NAME) != p.VERSION])


def write(db: Db) -> AbstractContextManager[Any]:
    """One write transaction on ``db``: commit on success, roll back on any exception."""
    return db.transaction()


def next_seq(db: Db) -> int:
    """The seq the next appended event will get: known once the write lock is held, so a
    decision may name what it creates after the event that creates it."""
    return db.next_seq()


# -- writing ------------------------------------------------------------------------------


_LIVE: dict[type, tuple] = {}  # type: ignore[type-arg]


def _live(event_type: type) -> tuple:  # type: ignore[type-arg]
    _LIVE[event_type] = appliers(readers(event_type), event_type)
    return _LIVE[event_type]


# How a batch of events of these types, in this order, reaches the projections: in turn,
# each projection that reads any of them, either as its ``apply_many`` given the events it
# reads (None: all of them), or, where it has none or the batch holds none of its
# ``MANY_FOR``, as each event's own handler (``live_of``) given the event at its place.
# Worked out once per sequence of types (a worker's result and next claim are the same
# few, job after job).
_Plan = tuple[tuple[Any, "int | tuple[int, ...] | None"], ...]
_PLANS: dict[tuple[type, ...], _Plan] = {}


_PLANNED = 64  # batches longer than this (a bulk enqueue) are planned each time, not kept


def _plan(kinds: tuple[type, ...]) -> _Plan:
    at: dict[type, list[int]] = {}  # where each type stands in the batch: one pass over it
    for n, kind in enumerate(kinds):
        at.setdefault(kind, []).append(n)
    plan: list[tuple[Any, int | tuple[int, ...] | None]] = []
    for projection in readers(*at):
        read = [at[kind] for kind in at if kind in projection.HANDLES]
        wanted = tuple(read[0] if len(read) == 1 else sorted(n for ns in read for n in ns))
        if not wanted:
            continue
        many = getattr(projection, "apply_many", None)
        many_for = getattr(projection, "MANY_FOR", None)
        if many is not None and (many_for is None or not many_for.isdisjoint(at)):
            # None: the whole batch, passed as it is rather than copied.
            plan.append((many, None if wanted == tuple(range(len(kinds))) else wanted))
        else:
            plan += [(live_of(projection, kinds[n]), n) for n in wanted]
    found = tuple(plan)
    if len(kinds) <= _PLANNED:  # a long-lived process (serve) keeps no plan of a bulk's
        _PLANS[kinds] = found
    return found


def _apply_many(tx: Db, first: int, at: str, events: tuple[Event, ...]) -> None:
    """Each projection takes the events it reads, in ledger order, on its own (it reads
    only its own tables); the first event has seq ``first``, the others the next ones."""
    kinds = tuple(map(type, events))
    batch = None
    for apply, wanted in _PLANS.get(kinds) or _plan(kinds):
        if type(wanted) is int:  # one event, to its own handler
            apply(tx, first + wanted, at, events[wanted])
            continue
        if batch is None:
            batch = [(first + n, at, e) for n, e in enumerate(events)]
        apply(tx, batch if wanted is None else [batch[n] for n in wanted])  # type: ignore[union-attr]


def append(tx: Db, *events: Event, at: str | None = None) -> int:
    """Append events to the ledger and apply them to every projection; returns the last seq.

    Must run inside ``write(tx)``. All events of one call share one ``at``.
    """
    if not tx.in_transaction:
        raise RuntimeError("append() must run inside a write transaction")
    at = at or tx.now()
    for event in events:
        if not event.by:  # some event names no actor: the current one is theirs
            by = actor.current()
            events = tuple(e if e.by else msgspec.structs.replace(e, by=by) for e in events)
            break
    if len(events) > APPEND_STEP:
        return _append_long(tx, events, at)
    return _append_whole(tx, events, at)


def _append_whole(tx: Db, events: tuple[Event, ...], at: str) -> int:
    """``append``'s events in one step: their ledger rows, then each projection's."""
    rows = [(TAG_OF[type(e)], getattr(e, "job_id", None), getattr(e, "worker_id", None),
             encode(e)) for e in events]
    first = tx.insert_events(at, rows)
    if len(events) == 1:  # the common case
        event = events[0]
        for apply in _LIVE.get(type(event)) or _live(type(event)):
            apply(tx, first, at, event)
        return first
    _apply_many(tx, first, at, events)
    return first + len(events) - 1


APPEND_STEP = 2000  # events appended at a time by a long append, where it goes in steps


def _bar() -> progress.Bar:
    """The command's progress bar. ``progress`` is loaded here, by the calls that may draw
    one: a command that appends a few events (``enqueue``) never needs it."""
    from queuectl import progress

    return progress.current()


def _append_long(tx: Db, events: tuple[Event, ...], at: str) -> int:
    """A long append (a bulk enqueue), telling the command's progress bar how far it got.

    A store whose long appends are cheaper in steps (``appends_in_steps``: SQLite, where
    100,000 jobs' took a sixth less time so) takes them a step at a time, and the bar moves
    after each: applying events in order, a step after another, is what applying them all
    at once stands for. Another (PostgreSQL) writes them in one step, a COPY a table, and
    the bar moves as the store writes their rows (``telling``); in steps, each COPY's end
    had the client and the server wait for each other, and the bar cost the enqueue a
    tenth of its time (bench scenario progress).

    The whole append runs with the store's bulk settings: it dirties more pages than
    SQLite's default page cache holds, and SQLite would write the excess to the WAL in the
    middle of the transaction, read pages back as each B-tree's edge moved on and write
    them again: up to six times the writes of a 100,000-job enqueue, by the length of its
    rows (bench scenario progress)."""
    bar = _bar()
    with tx.bulk():
        if not tx.appends_in_steps:
            if not bar.shown:
                return _append_whole(tx, events, at)
            told = _Told(bar, len(events))
            with tx.telling(told):
                last = _append_whole(tx, events, at)
            if told.shown < len(events):  # what no bulk write told (a job's own insert)
                bar.advance(len(events) - told.shown)
            return last
        for start in range(0, len(events), APPEND_STEP):
            last = _append_whole(tx, events[start:start + APPEND_STEP], at)
            bar.advance(min(APPEND_STEP, len(events) - start))
    return last


class _Told:
    """The rows a store wrote for a long append, told to its bar as events done: each
    event makes its ledger row and, a plain enqueue, its job's row, so two rows written
    are one event done."""

    def __init__(self, bar: progress.Bar, events: int) -> None:
        self.bar, self.events = bar, events
        self.rows = self.shown = 0

    def __call__(self, rows: int) -> None:
        self.rows += rows
        done = min(self.rows // 2, self.events)
        if done > self.shown:
            self.bar.advance(done - self.shown)
            self.shown = done


# -- reading the ledger ------------------------------------------------------------------


def decode_row(seq: int, type_: str, body: str) -> Event:
    """Decode one ledger row, or say clearly which seq this version cannot read."""
    if type_ not in TAGS:
        raise CorruptLedger(
            f"event seq {seq} has type {type_!r}, which this version of queuectl does not know"
        )
    try:
        return ev.decode(body)
    except msgspec.DecodeError as exc:
        raise CorruptLedger(f"event seq {seq} ({type_}) cannot be decoded: {exc}") from exc


def read_events(
    conn: Db, where: str = "", params: tuple[object, ...] = ()
) -> Iterator[tuple[int, str, Event]]:
    """Yield ``(seq, at, event)`` in ledger order; ``where`` is a constant SQL filter."""
    sql = f"SELECT seq, at, type, body FROM events {where} ORDER BY seq"
    for seq, at, type_, body in conn.execute(sql, params):
        yield seq, at, decode_row(seq, type_, body)


# -- moving a ledger between stores ------------------------------------------------------

EXPORT_PAGE = 5000  # events read at a time: an export holds no more than this in memory


def export(db: Db, since: int = 0) -> Iterator[str]:
    """The ledger after seq ``since`` as JSON lines, ``{"seq": .., "at": .., "event": ..}``:
    the portable truth of a queue, which ``import_`` turns back into a store of either kind."""
    last = since
    while True:
        rows = db.execute("SELECT seq, at, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                          (last, EXPORT_PAGE)).fetchall()
        for seq, at, body in rows:
            yield f'{{"seq":{seq},"at":{msgspec.json.encode(at).decode()},"event":{body}}}'
        if len(rows) < EXPORT_PAGE:
            return
        last = rows[-1][0]


def _seq_span(db: Db) -> int:
    """How many events the ledger holds, at once: exact unless a prune left gaps (a
    progress bar's total; a count would read the whole table first)."""
    (first,) = db.execute("SELECT min(seq) FROM events").fetchone()
    (last,) = db.execute("SELECT max(seq) FROM events").fetchone()
    return 0 if first is None else int(last) - int(first) + 1


def count_events(db: Db, since: int = 0) -> int:
    """How many events ``export(db, since)`` would give now."""
    return int(db.execute("SELECT count(*) FROM events WHERE seq > ?", (since,)).fetchone()[0])


class _Exported(msgspec.Struct, forbid_unknown_fields=True):
    seq: int
    at: str
    event: msgspec.Raw


_exported = msgspec.json.Decoder(_Exported)


def import_(db: Db, lines: Iterable[tuple[int, str]]) -> int:
    """Append an exported ledger (numbered lines) to an empty store and build its
    projections, all in one transaction; returns the number of events. Every event is
    decoded first; seqs must run 1, 2, 3... with no gap but those that ``pruned`` events
    account for (each names how many events left, all numbered below its own)."""
    with db.transaction():
        if db.execute("SELECT count(*) FROM events").fetchone()[0]:
            raise InvalidInput(f"{db.target} already holds a ledger: import into an empty one")
        count = last = missing = pruned = 0
        gap: tuple[int, int, int] | None = None
        batch: list[tuple[int, str, str, str | None, str | None, str]] = []
        for n, text in lines:
            try:
                row = _exported.decode(text)
                event = ev.decode(row.event)
            except msgspec.DecodeError as exc:
                raise InvalidInput(f"line {n}: {exc}") from None
            if row.seq <= last:
                raise InvalidInput(f"line {n}: seq {row.seq} after {last}: seqs must rise")
            if row.seq != last + 1:
                gap = (n, row.seq, last + 1)  # a later pruned event must account for it
            missing += row.seq - last - 1
            last = row.seq
            if isinstance(event, Pruned):
                pruned += event.events
                gap = None
            body = bytes(row.event).decode()
            batch.append((row.seq, row.at, event.type, getattr(event, "job_id", None),
                          getattr(event, "worker_id", None), body))
            count += 1
            if len(batch) >= EXPORT_PAGE:
                db.copy_events(batch)
                batch = []
        db.copy_events(batch)
        if gap is not None:
            raise InvalidInput(f"line {gap[0]}: seq {gap[1]} where {gap[2]} was due, and no "
                               "pruned event after it accounts for the gap")
        if missing != pruned:
            raise InvalidInput(f"{missing:,} events are missing where pruned events account "
                               f"for {pruned:,}")
        _rebuild(db, registry())
    return count


# -- replay -------------------------------------------------------------------------------


def _create(tx: Db, projection: ModuleType) -> None:
    """Fresh, empty tables with the indexes the projector needs, and the readers' indexes
    that are kept as rows go in (``EARLY_INDEXES``), not yet the others."""
    for table in projection.TABLES:
        tx.execute(f"DROP TABLE IF EXISTS {table}")
    for statement in projection.DDL:
        tx.execute(tx.dialect.ddl(statement))
    for statement in getattr(projection, "EARLY_INDEXES", ()):
        tx.execute(statement)


def _index(tx: Db, projection: ModuleType) -> None:
    """The readers' indexes and the projection's triggers, once its rows are in."""
    triggers = getattr(projection, "TRIGGERS", {}).get(tx.dialect.name, ())
    for statement in (*getattr(projection, "INDEXES", ()), *triggers):
        tx.execute(statement)


_FIND = "SELECT max(seq) FROM events WHERE job_id = ? AND type = ? AND seq <= ?"
FLUSH_CHECK = 4096  # events read at a time; between them a replay may write rows back


class Replayed(msgspec.Struct, frozen=True):
    events: int  # how many the ledger holds (a prune moves some to the archive)
    last_seq: int


def _replay_into(target: Db, source: Db, projections: Iterable[ModuleType]) -> Replayed:
    """Apply every event to empty tables (no readers' indexes, no triggers yet). Projections
    with a ``Replay`` keep rows in memory and write them in bulk."""
    projections = tuple(projections)
    position = events = 0

    def find(job_id: str, type_: str) -> int | None:
        (seq,) = source.execute(_FIND, (job_id, type_, position)).fetchone()
        return seq  # type: ignore[no-any-return]

    replay_of = {p: p.Replay(target, find) for p in projections if hasattr(p, "Replay")}
    replays = list(replay_of.values())
    holding = [r for r in replays if hasattr(r, "rows")]  # flushed when full
    routes = {  # what each type of event is given to, in CATALOG order
        kind: [
            replay_of[p].handler(kind) if p in replay_of else live(p.apply, target)
            for p in projections
            if kind in p.HANDLES
        ]
        for kind in TAGS.values()
    }
    bar = _bar()
    bar.task("Replaying the ledger", lambda: _seq_span(source), "events")
    cursor = source.execute("SELECT seq, at, body FROM events ORDER BY seq")
    decode = ev.decode
    with no_gc():
        while rows := cursor.fetchmany(FLUSH_CHECK):
            events += len(rows)
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
            for replay in holding:  # between events: no row held in memory is half-changed
                if replay.rows.full():
                    replay.flush()
            bar.update(events)
    for replay in replays:
        replay.close()
    return Replayed(events, position)


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off: a replay (or a bulk enqueue) makes millions of
    rows and events that are freed by reference counting alone, and the collector would
    walk the rows held in memory again and again for cycles there are none of."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rebuild(tx: Db, projections: Iterable[ModuleType], spare: str | None = None) -> Replayed:
    """``spare``: a scratch file (``Db.aside``); with one, a long ledger is replayed in two
    processes (``_Helper``)."""
    projections = tuple(projections)
    for projection in projections:
        _create(tx, projection)
    helper = None
    if spare is not None and len(projections) > 1 and _seq_span(tx) >= ASIDE_MIN:
        helper = _Helper.start(tx.target, spare, projections[1:])
    started = time.monotonic()
    try:
        replayed = _replay_into(tx, tx, projections[:1] if helper else projections)
        if helper is not None:
            _bar().task("Taking the other projections' rows")
            # About as much work as this process's: one that takes far longer is stuck.
            patience = max(HELPER_GRACE, 2 * (time.monotonic() - started))
            if helper.finish(patience) == replayed:
                tx.adopt(helper.scratch, [t for p in helper.projections for t in p.TABLES])
            else:  # it failed (or read another ledger): its share is done here
                _replay_into(tx, tx, helper.projections)
    finally:
        if helper is not None:
            helper.stop()
    position = replayed.last_seq
    _bar().task("Building indexes")
    for projection in projections:
        _index(tx, projection)  # one sorted build each, after the rows are in
        tx.execute(
            """INSERT INTO projection_meta (name, version, position) VALUES (?, ?, ?)
            ON CONFLICT (name) DO UPDATE SET version = excluded.version,
                position = excluded.position""",
            (projection.NAME, projection.VERSION, position),
        )
    return replayed


def rebuild(db: Db) -> Replayed:
    """Throw every projection away and replay the ledger into fresh tables, atomically;
    returns how many events that took, and the last one's seq."""
    with db.bulk(), db.aside() as spare, db.transaction():
        return _rebuild(db, registry(), spare)


# A rebuild of a ledger this long replays every projection but the first (jobs, about half
# the work) in a process of its own, on the other core, into a scratch file whose tables
# are then copied in whole (bench scenario replay). Below it, starting that process (a
# tenth of a second) would cost about what it saves.
ASIDE_MIN = 200_000  # events
HELPER_GRACE = 60.0  # seconds the helper may take beyond twice this process's replay


class _Helper:
    """The process that replays ``projections`` into ``scratch`` (``replay_aside``), run as
    ``python -m queuectl.aside``; it reads the ledger through a connection of its own,
    which sees what this one does: the rebuild holds the write lock throughout."""

    def __init__(self, process: Any, scratch: str, projections: tuple[ModuleType, ...]):
        self.process, self.scratch, self.projections = process, scratch, projections

    @classmethod
    def start(cls, source: str, scratch: str, projections: tuple[ModuleType, ...]
              ) -> _Helper | None:
        import subprocess
        import sys

        if not sys.executable:
            return None
        import site

        # The packages this process imported: the same code, however it was found. An
        # installed queuectl is found there anyway; a site directory put on PYTHONPATH
        # would go before the standard library, where a backport could shadow it.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        if root not in {*site.getsitepackages(), site.getusersitepackages()}:
            env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "queuectl.aside", source, scratch,
                 *(p.NAME for p in projections)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, text=True)
        except OSError:
            return None
        return cls(process, scratch, projections)

    def finish(self, timeout: float) -> Replayed | None:
        """What it replayed, once it has ended; None if it failed, or had not ended within
        ``timeout`` seconds (it is then stopped)."""
        import subprocess

        try:
            out = self.process.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        if self.process.returncode != 0:
            return None
        try:
            return msgspec.json.decode(out, type=Replayed)
        except msgspec.DecodeError:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:  # this replay failed first
            self.process.kill()
            self.process.communicate()


def replay_aside(source: str, scratch: str, names: Sequence[str]) -> Replayed:
    """The helper's side of a rebuild: the projections ``names`` replayed from the SQLite
    ledger at ``source`` into fresh tables in the scratch file ``scratch``."""
    chosen = tuple(p for p in registry() if p.NAME in set(names))
    if len(chosen) != len(set(names)):
        raise InvalidInput(f"unknown projections among {', '.join(names)}")
    events = store.reader(source)
    try:
        into = store.scratch(scratch)
        try:
            into.execute("BEGIN")
            for projection in chosen:
                _create(into, projection)
            replayed = _replay_into(into, events, chosen)
            into.execute("COMMIT")
            return replayed
        finally:
            into.close()
    finally:
        events.close()


def check(db: Db) -> list[str]:
    """Replay the ledger aside (into an in-memory SQLite database, whichever store holds the
    ledger) and list every way it differs from the live tables, all read in one snapshot.

    The replay is built without the readers' indexes: only rows are compared.
    """
    fresh = store.memory()
    try:
        with db.snapshot():
            fresh.execute("BEGIN")
            for projection in registry():
                _create(fresh, projection)
            _replay_into(fresh, db, registry())
            fresh.execute("COMMIT")
            _bar().task("Comparing with the live tables")
            problems: list[str] = []
            for projection in registry():
                for table, key in projection.TABLES.items():
                    problems += _diff(table, key, db, fresh)
            return problems
    finally:
        fresh.close()


def _diff(table: str, key: tuple[str, ...], live: Db, fresh: Db) -> list[str]:
    def rows(conn: Db) -> tuple[dict[object, tuple[object, ...]], list[str]]:
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
