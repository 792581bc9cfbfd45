"""replay: ``ledger.rebuild`` of a ledger holding N jobs' worth of events, and beside it the
same rebuild with no projection code: its rows written by the store alone."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from projections import registry
from queuectl import events as ev
from queuectl import ledger, store

from ..context import Context
from ..ledgers import copy_of_replay_ledger
from ..rows import Row, ScenarioResult, Target, make_row

Rows = dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]]  # table: columns, rows


def bench_replay(ctx: Context, result: ScenarioResult) -> list[Row]:
    db = copy_of_replay_ledger(ctx)
    ctx.replay_db = db
    conn = ledger.connect(db)  # as `queuectl rebuild` opens it
    rates, alone = [], []
    try:
        (n_events,) = conn.execute("SELECT count(*) FROM events").fetchone()
        for r in range(ctx.runs):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            start = time.perf_counter()
            ledger.rebuild(conn)
            seconds = time.perf_counter() - start
            rates.append(n_events / seconds)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            alone.append(n_events / rows_alone(conn, projection_rows(conn)))
            ctx.log(f"replay run {r + 1}/{ctx.runs}: {n_events:,} events in {seconds:.1f} s = "
                    f"{rates[-1]:.0f} events/s; its rows written alone {alone[-1]:.0f} "
                    "events/s")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    result.details["events"] = n_events
    label = f"replay, {ctx.sizes.replay_jobs:,} jobs ({n_events:,} events)"
    return [
        make_row("replay", "replay", label, rates, "events/s",
                 Target(">= 150,000 events/s", "value", ">=", 150_000),
                 ceiling_samples=alone, ceiling_label=ROWS_ALONE),
        make_row("replay", "replay_rows_alone",
                 f"the same rebuild with no projection code: every event read and decoded, "
                 f"the rows it makes written by the store, {n_events:,} events", alone,
                 "events/s", None, baseline_samples=rates, baseline_label="the replay itself",
                 note="as `rebuild` runs: in one transaction, the jobs' rows here and the "
                      "other projections' in a second process into a scratch file, "
                      "adopted, then the indexes (rows_alone in "
                      "tools/bench/scenarios/replay.py)"),
    ]


ROWS_ALONE = "rows written alone"


def projection_rows(conn: Any) -> Rows:
    """Every projection table's rows, as the store holds them now (after a rebuild: what a
    replay of its ledger makes)."""
    found: Rows = {}
    for projection in registry():
        for table in projection.TABLES:
            cursor = conn.execute(f"SELECT * FROM {table}")
            found[table] = (tuple(d[0] for d in cursor.description), cursor.fetchall())
    return found


def rows_alone(conn: Any, rows: Rows) -> float:
    """Seconds of ``ledger.rebuild``'s work with its projection code taken out: the same
    transaction, settings, tables and indexes, split between the same two processes (the
    jobs projection here; the others into a scratch file in a forked process, adopted
    once it is done); each process reads and decodes every event, as the replay's do, and
    writes its tables' ``rows`` with the store's bulk writer, with nothing between. The
    rebuild's ceiling with no projection Python. It leaves the same rows as were there."""
    projections = registry()
    first, rest = projections[:1], projections[1:]
    start = time.perf_counter()
    with conn.bulk(), conn.aside() as spare, conn.transaction():
        if spare is None:
            raise RuntimeError("rows_alone: no scratch file beside the ledger (not WAL)")
        for projection in projections:
            ledger._create(conn, projection)
        helper = multiprocessing.get_context("fork").Process(
            target=_aside, args=(conn.path, spare, rest, rows))
        helper.start()
        _read_every_event(conn)
        _write(conn, first, rows)
        helper.join()
        if helper.exitcode != 0:
            raise RuntimeError(f"rows_alone: the second process exited {helper.exitcode}")
        conn.adopt(spare, [t for p in rest for t in p.TABLES])
        for projection in projections:
            ledger._index(conn, projection)
    seconds = time.perf_counter() - start
    for table, (_, held) in rows.items():
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        if count != len(held):
            raise RuntimeError(f"rows_alone: {table} has {count} rows, not {len(held)}")
    return seconds


def _aside(source: str, spare: str, projections: tuple[Any, ...], rows: Rows) -> None:
    """The second process's share (as ``ledger.replay_aside``): every event read and
    decoded, and its projections' rows written into the scratch file."""
    events = store.reader(source)
    into = store.scratch(spare)
    try:
        into.execute("BEGIN")
        for projection in projections:
            ledger._create(into, projection)
        _read_every_event(events)
        _write(into, projections, rows)
        into.execute("COMMIT")
    finally:
        into.close()
        events.close()


def _read_every_event(conn: Any) -> None:
    """Every event read and decoded, as a replay reads them (``ledger._replay_into``)."""
    cursor = conn.execute("SELECT seq, at, body FROM events ORDER BY seq")
    decode = ev.decode
    with ledger.no_gc():
        while batch := cursor.fetchmany(ledger.FLUSH_CHECK):
            for _, _, body in batch:
                decode(body)


def _write(conn: Any, projections: tuple[Any, ...], rows: Rows) -> None:
    """``projections``' tables' rows, with the store's bulk writer, into tables just made
    (the rows their DDL puts there, such as the zero counts, taken out first)."""
    for projection in projections:
        for table in projection.TABLES:
            columns, held = rows[table]
            conn.execute(f"DELETE FROM {table}")
            if held:
                conn.insert_many(table, columns, held)
