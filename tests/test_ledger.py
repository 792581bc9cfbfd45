"""The ledger as a library: the one write path, append-only storage, projections that can
be thrown away and rebuilt, and the queue decisions that sit on top of them."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from conftest import by_hand, events_of, queuectl_cmd, rescued
from helpers import ok

import projections.config
import projections.jobs
import projections.runs
import projections.workers
from queuectl import claims, clock, decisions, ledger, progress, reads, store
from queuectl import events as ev
from queuectl.errors import Conflict
from queuectl.store import sqlite as sqlite_store


def _add(conn: sqlite3.Connection, *ids: str, command: str = "true", retries: int = 3) -> None:
    decisions.enqueue(conn, [decisions.JobSpec(command=command, id=i, max_retries=retries) for i in ids])


def _rows(conn: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()


def _snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {t: _rows(conn, t) for t in ("jobs", "job_counts", "workers", "config")}


def _mixed_workload(conn: sqlite3.Connection) -> None:
    """Jobs in every state: completed, failed (waiting), dead, processing, pending."""
    decisions.set_config(conn, "backoff-base", "3")
    _add(conn, "ok", "retry")
    _add(conn, "dies", retries=0)
    _add(conn, "busy", "waiting")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    common = {"worker_id": "w1", "attempt": 1}
    for job_id, result in (
        ("ok", ev.Completed(job_id="ok", **common)),
        ("retry", ev.Failed(job_id="retry", exit_code=1, error="exit status 1", **common)),
        ("dies", ev.Failed(job_id="dies", exit_code=2, error="exit status 2", **common)),
    ):
        job = claims.claim(conn, "w1")
        assert job is not None and job.job_id == job_id
        claims.finish(conn, job, result)
    assert claims.claim(conn, "w1").job_id == "busy"  # type: ignore[union-attr]


# -- the write path -------------------------------------------------------------------------


@pytest.mark.stores("sqlite")  # SQLite only
def test_a_new_database_has_small_pages_and_wal(conn, tmp_path):
    # Each commit writes whole pages to the WAL: small pages write less (bench scenario cycle).
    assert conn.execute("PRAGMA page_size").fetchone() == (sqlite_store.PAGE_SIZE,) == (2048,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.stores("sqlite")  # SQLite only
def test_an_old_database_keeps_its_page_size(tmp_path):
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA page_size = 4096")
    raw.execute("PRAGMA journal_mode = WAL")
    raw.close()
    conn = ledger.connect(path)  # an empty file made by hand: adopted, pages as they were
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a")])
    assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
    assert reads.get_job(conn, "a").state == "pending"
    conn.close()


def test_append_outside_a_transaction_raises(conn):
    with pytest.raises(RuntimeError, match="inside a write transaction"):
        ledger.append(conn, ev.StopRequested())
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_exception_inside_write_rolls_back_event_and_projections(conn):
    _add(conn, "kept")
    before = _snapshot(conn)
    with pytest.raises(RuntimeError, match="boom"):
        with ledger.write(conn):
            ledger.append(
                conn,
                ev.Enqueued(job_id="lost", command="true", max_retries=3, backoff_base=2),
                ev.ConfigChanged(key="max-retries", value="9"),
            )
            # Inside the transaction both the event and the projections changed ...
            assert conn.execute("SELECT count(*) FROM jobs WHERE id = 'lost'").fetchone() == (1,)
            raise RuntimeError("boom")
    # ... and after the exception neither did.
    assert not conn.in_transaction
    assert events_of(conn, "lost") == []
    assert [r[0] for r in conn.execute("SELECT type FROM events")] == ["enqueued"]
    assert _snapshot(conn) == before


def test_events_are_append_only(conn):
    _add(conn, "a")
    with pytest.raises(store.driver_errors(), match="append-only"):
        conn.execute("UPDATE events SET type = 'dead'")
    with pytest.raises(store.driver_errors(), match="append-only"):
        conn.execute("DELETE FROM events")
    assert events_of(conn, "a") == ["enqueued"]


@pytest.mark.parametrize("verb", ["INSERT OR REPLACE INTO", "REPLACE INTO"])
@pytest.mark.stores("sqlite")  # SQLite only
def test_a_past_event_cannot_be_replaced(db, conn, verb):
    """REPLACE deletes the row it replaces without firing DELETE triggers (recursive_triggers
    is off in Python's sqlite3 and the sqlite3 shell): the insert itself must be refused."""
    _add(conn, "a")
    raw = sqlite3.connect(db)  # a plain client, as someone poking at the file would use
    try:
        (seq, at, body) = raw.execute("SELECT seq, at, body FROM events WHERE job_id = 'a'"
                                      ).fetchone()
        evil = body.replace('"true"', '"rm -rf ~"')
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute(f"{verb} events (seq, at, type, job_id, worker_id, body) "
                        "VALUES (?, ?, 'enqueued', 'a', NULL, ?)", (seq, at, evil))
        raw.commit()
    finally:
        raw.close()
    assert conn.execute("SELECT body FROM events WHERE seq = ?", (seq,)).fetchone() == (body,)


@pytest.mark.stores("sqlite")  # SQLite only
def test_an_older_ledger_gains_the_replace_guard_when_opened(db, conn):
    conn.execute("DROP TRIGGER events_no_replace")
    conn.execute("PRAGMA user_version = 0")  # as a database made before the guard existed
    conn.close()
    again = ledger.connect(db)
    try:
        assert again.execute("PRAGMA user_version").fetchone() == (sqlite_store.LEDGER_VERSION,)
        names = {r[0] for r in again.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert "events_no_replace" in names
    finally:
        again.close()


def _event_indexes(conn) -> dict[str, str]:
    """The events table's indexes, each with its definition, on either store."""
    if conn.kind == "sqlite":
        rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                            "AND tbl_name = 'events' AND sql IS NOT NULL").fetchall()
    else:
        rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes "
                            "WHERE tablename = 'events' AND indexname != 'events_pkey'"
                            ).fetchall()
    return dict(rows)


def test_an_older_ledger_trades_its_index_of_every_workers_event_for_one_of_heartbeats(db, conn):
    """A ledger made before version 4 (SQLite) or 5 (PostgreSQL) indexed every event that
    names a worker, two a job; opened again, it keeps an index of heartbeats only, which
    pruning still finds its heartbeats by."""
    wid = claims.worker_started(conn, 1, "h")
    claims.heartbeat(conn, wid)
    conn.execute("DROP INDEX events_heartbeats")
    conn.execute("CREATE INDEX events_worker ON events (worker_id) WHERE worker_id IS NOT NULL")
    if conn.kind == "sqlite":
        conn.execute("PRAGMA user_version = 3")
    else:
        conn.execute("UPDATE queuectl_head SET version = 4")
    conn.close()
    again = ledger.connect(db)
    try:
        indexes = _event_indexes(again)
        assert set(indexes) == {"events_job", "events_heartbeats"}
        assert "worker-heartbeat" in indexes["events_heartbeats"]
        latest = again.execute(again.dialect.sql(
            "SELECT max(seq) FROM events WHERE worker_id = ? AND type = 'worker-heartbeat'"),
            (wid,)).fetchone()[0]
        assert latest == again.execute("SELECT max(seq) FROM events").fetchone()[0]
    finally:
        again.close()


@pytest.mark.stores("sqlite")  # the plan of SQLite's own planner
def test_pruning_finds_a_workers_heartbeats_by_index_and_a_jobs_results_are_not_in_it(conn):
    from queuectl import retention

    for query in (retention._LATEST_BEAT, retention._COUNT_BEATS, retention._OLD_BEATS):
        plan = conn.execute(f"EXPLAIN QUERY PLAN {query}", ["w"] * query.count("?")).fetchall()
        assert "USING INDEX events_heartbeats" in plan[0][-1], (query, plan)
    wid = claims.worker_started(conn, 1, "h")
    _add(conn, "a")
    claim = claims.claim(conn, wid)
    claims.finish(conn, claim, ev.Completed(job_id="a", worker_id=wid, attempt=1))
    claims.heartbeat(conn, wid)
    named = conn.execute("SELECT type FROM events WHERE worker_id = ? ORDER BY seq",
                         (wid,)).fetchall()
    assert [t for (t,) in named] == ["worker-started", "claimed", "completed",
                                     "worker-heartbeat"]
    # The index's own entries (SQLite's dbstat table): the heartbeat's alone.
    (entries,) = conn.execute("SELECT sum(ncell) FROM dbstat WHERE name = 'events_heartbeats' "
                              "AND pagetype = 'leaf'").fetchone()
    assert entries == 1


def test_append_returns_last_seq_and_shares_one_time(conn):
    with ledger.write(conn):
        seq = ledger.append(
            conn, ev.ConfigChanged(key="max-retries", value="1"), ev.StopRequested()
        )
    rows = conn.execute("SELECT seq, at, type FROM events ORDER BY seq").fetchall()
    assert [r[2] for r in rows] == ["config-changed", "stop-requested"]
    assert seq == rows[-1][0]
    assert rows[0][1] == rows[1][1]
    # position records what a projection was built from; appends don't rewrite it.
    assert conn.execute("SELECT DISTINCT position FROM projection_meta").fetchall() == [(0,)]
    assert ledger.rebuild(conn) == ledger.Replayed(events=2, last_seq=seq)
    assert conn.execute("SELECT DISTINCT position FROM projection_meta").fetchall() == [(seq,)]


def _long_enqueue(n: int, prefix: str = "long") -> list[ev.Enqueued]:
    """``n`` jobs with rows as long as a user's (a directory of some depth)."""
    return [ev.Enqueued(job_id=f"{prefix}-{i:06d}", command=f"echo {i}", max_retries=3,
                        backoff_base=2.0, cwd="/home/someone/src/some-project/subdirectory")
            for i in range(n)]


@pytest.mark.stores("sqlite")  # SQLite's page cache and WAL
def test_a_long_append_writes_nothing_to_the_wal_before_it_commits(conn, db):
    # With SQLite's default page cache (2 MiB), 10,000 jobs' pages spill into the WAL in
    # the middle of the transaction, to be read back and written again.
    wal = f"{db}-wal"
    (before,) = conn.execute("PRAGMA cache_size").fetchone()
    with ledger.write(conn):
        size = os.path.getsize(wal)
        ledger.append(conn, *_long_enqueue(10_000))
        assert os.path.getsize(wal) == size  # every page still in memory
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 10_000
    assert conn.execute("PRAGMA cache_size").fetchone() == (before,)  # given back


def test_a_long_append_leaves_the_rows_of_an_append_a_step_at_a_time(conn, db):
    # On SQLite a long append always goes in steps, on PostgreSQL all at once without a
    # bar: either way the rows are those of its events applied in order.
    at = "2026-01-01T00:00:00.000000Z"
    jobs = _long_enqueue(ledger.APPEND_STEP * 2 + 7)
    with ledger.write(conn):
        last = ledger.append(conn, *jobs, at=at)
    counts = dict(conn.execute("SELECT state, n FROM job_counts WHERE n > 0").fetchall())
    assert counts == {"pending": len(jobs)}
    rows = conn.execute("SELECT seq, id, cwd, created_at FROM jobs ORDER BY seq").fetchall()
    first = last - len(jobs) + 1
    assert rows == [(first + i, e.job_id, e.cwd, at) for i, e in enumerate(jobs)]
    assert conn.execute("SELECT min(seq), max(seq), count(*) FROM events").fetchone() == (
        first, last, len(jobs))


class _Watched(progress.Bar):
    """A bar drawn, as far as the work can tell, that keeps what it was told."""

    shown = True

    def __init__(self) -> None:
        self.advanced: list[int] = []

    def advance(self, n: int) -> None:
        self.advanced.append(n)


def test_a_long_append_tells_its_bar_as_it_goes_without_changing_how_it_writes(
        conn, monkeypatch):
    # SQLite takes a long append in steps, and the bar moves after each; PostgreSQL writes
    # it in one COPY a table, bar or no bar, and the bar moves as the rows go.
    copies: list[str] = []
    if conn.kind == "postgres":
        copy = type(conn)._copy
        monkeypatch.setattr(type(conn), "_copy", lambda self, table, columns, rows: (
            copies.append(table), copy(self, table, columns, rows))[1])
    jobs = _long_enqueue(ledger.APPEND_STEP * 5 + 7)
    bar = _Watched()
    token = progress._current.set(bar)
    try:
        with ledger.write(conn):
            last = ledger.append(conn, *jobs)
    finally:
        progress._current.reset(token)
    assert sum(bar.advanced) == len(jobs)
    assert min(bar.advanced) > 0
    if conn.kind == "postgres":
        assert copies == ["events", "jobs"]
        assert len(bar.advanced) >= 4  # COPY's chunks of 5,000 rows, of each table
    else:
        assert bar.advanced == [ledger.APPEND_STEP] * 5 + [7]
    assert conn.execute("SELECT count(*), max(seq) FROM jobs").fetchone() == (len(jobs), last)


def test_job_counts_match_jobs_after_mixed_workload(conn):
    _mixed_workload(conn)
    by_state = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    counts = dict(conn.execute("SELECT state, n FROM job_counts WHERE n != 0").fetchall())
    assert counts == by_state
    assert counts == {"completed": 1, "failed": 1, "dead": 1, "processing": 1, "pending": 1}
    assert {s: n for s, n in reads.counts(conn).items() if n} == counts


# -- projections and replay -----------------------------------------------------------------


def _bump_version(m: pytest.MonkeyPatch, projection: object) -> None:
    """A new VERSION of ``projection``, in its module and in the catalog, as a developer
    changing it gives both."""
    m.setattr(projection, "VERSION", projection.VERSION + 1)  # type: ignore[attr-defined]
    m.setitem(projections.VERSIONS, projection.NAME, projection.VERSION)  # type: ignore[attr-defined]


def test_version_change_rebuilds_projection_on_open(conn, db, monkeypatch):
    _mixed_workload(conn)
    before = _snapshot(conn)
    (last_seq,) = conn.execute("SELECT max(seq) FROM events").fetchone()
    # Mark the live rows: only a real rebuild from the ledger turns them back.
    conn.execute("UPDATE jobs SET command = 'tampered'")
    conn.close()

    _bump_version(monkeypatch, projections.jobs)
    reopened = ledger.connect(db)
    try:
        assert _snapshot(reopened) == before
        meta = dict(
            (name, (version, position))
            for name, version, position in reopened.execute("SELECT * FROM projection_meta")
        )
        assert meta["jobs"] == (projections.jobs.VERSION, last_seq)
        assert meta["workers"][0] == projections.workers.VERSION
        assert meta["config"][0] == projections.config.VERSION
        assert ledger.check(reopened) == []
    finally:
        reopened.close()


def test_the_catalog_gives_each_projection_as_its_module_does():
    """``projections.CATALOG`` says, without importing a projection, its version and the
    events it reads; each module, as it is loaded, is held to its entry."""
    assert [p.NAME for p in projections.REGISTRY] == [name for name, _, _ in projections.CATALOG]
    for projection, (name, version, tags) in zip(projections.REGISTRY, projections.CATALOG,
                                                  strict=True):
        assert (projection.NAME, projection.VERSION) == (name, version)
        assert {ev.TAG_OF[kind] for kind in projection.HANDLES} == tags
        assert projections.VERSIONS[name] == version
    assert projections.readers(ev.Enqueued) == (projections.jobs, projections.hooks)
    assert projections.readers(ev.ConfigChanged, ev.TokenAdded) == (
        projections.config, projections.tokens)


def test_a_projection_that_differs_from_its_catalog_entry_is_refused(monkeypatch):
    monkeypatch.setattr(projections, "_CHECKED", set())
    monkeypatch.setattr(projections.runs, "VERSION", projections.runs.VERSION + 1)
    with pytest.raises(ImportError, match="projections.runs: NAME, VERSION or HANDLES differ"):
        projections.load("runs")
    monkeypatch.setattr(projections.runs, "VERSION", projections.runs.VERSION - 1)
    monkeypatch.setattr(projections.runs, "HANDLES", projections.runs.HANDLES - {ev.Dead})
    with pytest.raises(ImportError, match="projections.CATALOG"):
        projections.load("runs")


@pytest.mark.stores("sqlite")
def test_an_enqueue_loads_only_the_projections_that_read_its_event(conn, db):
    """A short command imports only what it uses: an enqueue into a database whose
    projections are current loads the two projections that read ``enqueued``."""
    _add(conn, "first")
    conn.close()
    probe = ("import sys; from queuectl import cli_root; "
             "cli_root.cli(['--db', sys.argv[1], 'enqueue', '-c', 'true'], standalone_mode=False); "
             "print(sorted(m for m in sys.modules if m.startswith('projections.')))")
    done = subprocess.run([*queuectl_cmd()[:1], "-c", probe, db], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Job added successfully with ID: 2", "['projections.hooks', 'projections.jobs']"]


def test_failed_rebuild_leaves_old_tables(conn, db, monkeypatch):
    _mixed_workload(conn)
    before = _snapshot(conn)
    meta_before = _rows(conn, "projection_meta")
    conn.close()

    calls = 0
    real_flush = projections.jobs.Replay.flush

    def broken_flush(self):
        nonlocal calls
        calls += 1
        real_flush(self)  # the replayed rows are written...
        raise RuntimeError("projector bug")  # ...and then the replay fails

    with monkeypatch.context() as m:
        _bump_version(m, projections.jobs)
        m.setattr(projections.jobs.Replay, "flush", broken_flush)
        with pytest.raises(RuntimeError, match="projector bug"):
            ledger.connect(db)
        assert calls == 1

    plain = ledger.connect(db)
    try:
        assert _snapshot(plain) == before
        assert _rows(plain, "projection_meta") == meta_before
        assert not plain.in_transaction
    finally:
        plain.close()


def test_rebuild_returns_last_seq_and_restores_rows(conn):
    _mixed_workload(conn)
    before = _snapshot(conn)
    conn.execute("DELETE FROM jobs")
    conn.execute("DELETE FROM job_counts")
    (last_seq,) = conn.execute("SELECT max(seq) FROM events").fetchone()
    assert ledger.rebuild(conn).last_seq == last_seq
    assert _snapshot(conn) == before


def test_a_rebuild_whose_flush_hands_a_unique_key_over_leaves_every_index(run, conn,
                                                                          monkeypatch):
    """A flush writes its new rows before the rows it read back: a job that took over a
    unique key from one cancelled in the same window meets its old holder's row as it was.
    The unique index is built after the rows are in; the others are there from the start,
    and each index ends up on the rebuilt tables either way."""
    ok(run, "enqueue", "-c", "true", "--id", "a", "--unique-key", "k")
    ok(run, "config", "set", "max-retries", "4")
    ok(run, "cancel", "a")
    ok(run, "enqueue", "-c", "true", "--id", "b", "--unique-key", "k")
    before = _snapshot(conn)
    # a, then the config, in one window; a's cancel (a read back) and b in the next
    monkeypatch.setattr(ledger, "FLUSH_CHECK", 2)
    monkeypatch.setattr(projections.Rows, "LIMIT", 1)
    ledger.rebuild(conn)
    assert _snapshot(conn) == before
    jobs = projections.jobs
    wanted = {re.search(r"INDEX (\w+) ON jobs", s) for s in (*jobs.EARLY_INDEXES, *jobs.INDEXES)}
    assert {m.group(1) for m in wanted if m} == set(_indexes(conn, "jobs"))


def _indexes(conn, table: str) -> list[str]:
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? " \
              "AND sql IS NOT NULL"
    else:
        sql = "SELECT indexname FROM pg_indexes WHERE tablename = ? AND indexname NOT LIKE '%pkey'"
    return [name for (name,) in conn.execute(conn.dialect.sql(sql), (table,)).fetchall()]


def _every_table(conn) -> dict[str, list[tuple[object, ...]]]:
    return {t: _rows(conn, t) for p in projections.REGISTRY for t in p.TABLES}


def _worked(run, conn) -> None:
    """Jobs in every state, with runs, workers, a stop request and queue settings."""
    _mixed_workload(conn)
    ok(run, "enqueue", "-c", "exit 3", "--id", "bad", "--max-retries", "0", "-q", "other")
    ok(run, "queue", "limit", "other", "2")
    ok(run, "schedule", "add", "tick", "--cron", "* * * * *", "-c", "true")
    ok(run, "worker", "--burst", "-q", "other")
    ok(run, "worker", "stop")


def test_a_long_rebuild_replays_all_but_jobs_in_a_helper_process(run, conn, db, tmp_path,
                                                                  monkeypatch):
    """On SQLite the other projections go to a process of their own, and their rows are
    copied in from its scratch file, which is gone afterwards; PostgreSQL replays alone.
    Either way every table is what the events say."""
    _worked(run, conn)
    before = _every_table(conn)
    conn.execute("DELETE FROM runs")  # only a real replay brings them back
    conn.execute("UPDATE workers SET jobs_done = 99")
    adopted: list[list[str]] = []
    real = type(conn).adopt
    monkeypatch.setattr(type(conn), "adopt",
                        lambda self, scratch, tables: adopted.append(list(tables)) or
                        real(self, scratch, tables))
    monkeypatch.setattr(ledger, "ASIDE_MIN", 0)
    (last,) = conn.execute("SELECT max(seq) FROM events").fetchone()
    assert ledger.rebuild(conn) == ledger.Replayed(events=last, last_seq=last)
    assert _every_table(conn) == before
    others = [t for p in projections.REGISTRY[1:] for t in p.TABLES]
    assert adopted == ([others] if conn.kind == "sqlite" else [])
    if conn.kind == "sqlite":
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == ["queue.db", "queue.db-lock", "queue.db-shm", "queue.db-wal"]
        assert not any(row[1] == "aside" for row in conn.execute("PRAGMA database_list"))


@pytest.mark.stores("sqlite")
def test_a_rebuild_removes_the_scratch_files_of_rebuilds_that_were_killed(run, conn, tmp_path):
    """A rebuild killed before it could remove its scratch file leaves it behind; the next
    rebuild removes those whose process is gone, and no other file."""
    run("enqueue", "--id", "a", "-c", "true")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stray = tmp_path / f"queue.db-replay-{dead.pid}-abcd1234"
    alive = tmp_path / f"queue.db-replay-{os.getpid()}-abcd1234"
    other = tmp_path / "queue.db-replay-notes.txt"
    for path in (stray, alive, other):
        path.write_bytes(b"")
    ledger.rebuild(conn)
    assert sorted(p.name for p in tmp_path.iterdir() if "replay" in p.name) == sorted(
        [alive.name, other.name])


@pytest.mark.stores("sqlite")
def test_a_rebuild_whose_helper_fails_replays_its_share_itself(run, conn, tmp_path,
                                                                 monkeypatch):
    _worked(run, conn)
    before = _every_table(conn)
    conn.execute("DELETE FROM runs")
    started = []
    real = ledger._Helper.start.__func__

    def unwritable(cls, source, scratch, chosen):  # the helper cannot open its file
        started.append(chosen)
        return real(cls, source, str(tmp_path / "missing" / "scratch.db"), chosen)

    monkeypatch.setattr(ledger._Helper, "start", classmethod(unwritable))
    monkeypatch.setattr(type(conn), "adopt", lambda *a: pytest.fail("nothing to adopt"))
    monkeypatch.setattr(ledger, "ASIDE_MIN", 0)
    ledger.rebuild(conn)
    assert started == [projections.REGISTRY[1:]]
    assert _every_table(conn) == before


@pytest.mark.stores("sqlite")
def test_a_rebuild_stops_a_helper_that_takes_far_longer_than_itself(run, conn, monkeypatch):
    _worked(run, conn)
    before = _every_table(conn)
    conn.execute("DELETE FROM runs")
    stuck = []

    def hanging(cls, source, scratch, chosen):  # a helper that never ends
        stuck.append(subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE, text=True))
        return cls(stuck[-1], scratch, chosen)

    monkeypatch.setattr(ledger._Helper, "start", classmethod(hanging))
    monkeypatch.setattr(ledger, "ASIDE_MIN", 0)
    monkeypatch.setattr(ledger, "HELPER_GRACE", 0.2)
    started = time.monotonic()
    ledger.rebuild(conn)
    assert time.monotonic() - started < 30
    assert stuck[0].poll() is not None  # stopped, not left running
    assert _every_table(conn) == before


@pytest.mark.stores("sqlite")
@pytest.mark.corrupt_ledger
def test_a_split_rebuild_stops_at_an_undecodable_event_and_leaves_nothing(run, db, tmp_path,
                                                                          monkeypatch):
    run("enqueue", "--id", "a", "-c", "true")
    with by_hand(db) as conn:
        conn.execute("INSERT INTO events (seq, at, type, job_id, body) "
                     "VALUES (2, '2026-01-01T00:00:00.000000Z', 'failed', 'a', '{not json')")
    helpers = []
    real = ledger._Helper.start.__func__
    monkeypatch.setattr(ledger._Helper, "start", classmethod(
        lambda cls, *a: helpers.append(real(cls, *a)) or helpers[-1]))
    monkeypatch.setattr(ledger, "ASIDE_MIN", 0)
    result = run("rebuild")
    assert (result.exit_code, result.stderr) == (
        1, "Error: event seq 2 (failed) cannot be decoded: JSON is malformed: object keys "
           "must be strings (byte 1)\n")
    assert len(helpers) == 1 and helpers[0].process.poll() is not None
    assert sorted(p.name for p in tmp_path.iterdir() if "replay" in p.name) == []
    assert json.loads(run("list", "--json").stdout)[0]["id"] == "a"


def test_rebuild_of_empty_ledger_returns_zero(conn):
    assert ledger.rebuild(conn) == ledger.Replayed(events=0, last_seq=0)


def test_check_is_clean_then_names_altered_row(conn):
    _mixed_workload(conn)
    assert ledger.check(conn) == []

    conn.execute("UPDATE jobs SET attempts = 7 WHERE id = 'ok'")
    problems = ledger.check(conn)
    assert len(problems) == 1
    assert problems[0].startswith("jobs: row 'ok' differs")
    assert "attempts: live 7, replayed 1" in problems[0]

    conn.execute("INSERT INTO config (key, value, updated_at) VALUES ('ghost', '1', 'x')")
    problems = ledger.check(conn)
    assert "config: row 'ghost' is live but not in the replay" in problems

    ledger.rebuild(conn)  # leave a database that replays cleanly for the fixture's check
    assert ledger.check(conn) == []


def test_a_replayed_row_is_what_an_enqueue_writes():
    job = {"job_id": "j", "command": "true", "max_retries": 3, "backoff_base": 2.0}
    at = "2026-01-01T00:00:00.000000Z"
    for e, blocked in (
        (ev.Enqueued(**job), False),
        (ev.Enqueued(**job, run_at="2026-01-02T00:00:00.000000Z", priority=4, queue="q"), False),
        (ev.Enqueued(**job, env={"A": "1"}, memory=1 << 20, cwd="/tmp", unique_key="u"), True),
    ):
        jobs = projections.jobs
        values = jobs._values(1, at, e, blocked)
        written = {**jobs._UNSET, **dict(zip(jobs._ENQUEUED, values, strict=True))}
        assert jobs._row(1, at, e, blocked) == written
        assert set(written) == set(jobs.COLUMNS)


def test_a_replayed_run_is_what_a_claim_writes():
    at = "2026-01-01T00:00:01.500000Z"
    for claim in (ev.Claimed(job_id="j", worker_id="w", attempt=2),
                  ev.Claimed(job_id="j", worker_id="w", attempt=1, queue="q",
                             eligible_at="2026-01-01T00:00:00.250000Z"),
                  ev.Claimed(job_id="j", worker_id="w", attempt=1,  # eligible after the claim
                             eligible_at="2026-01-01T00:00:02.000000Z")):
        runs = projections.runs
        written = {**runs._DEFAULTS,
                   **dict(zip(runs._OPEN.columns, runs._opened(7, at, claim), strict=True))}
        assert dict(zip(runs.COLUMNS, runs._run(7, at, claim), strict=True)) == written
        assert set(written) == set(runs.COLUMNS)
    assert runs._run(7, at, claim)[runs.COLUMNS.index("wait")] == 0.0
    # a run's end sets these four together, as one slice of a replay's row
    assert runs.COLUMNS[runs._FINISHED_AT:runs._DEAD] == ("finished_at", "outcome",
                                                          "exit_code", "duration")
    opened = runs._opened(7, at, ev.Claimed(job_id="j", worker_id="w", attempt=1,
                                            eligible_at="2026-01-01T00:00:00.250000Z"))
    assert opened[runs._OPEN.columns.index("wait")] == 1.25


@pytest.mark.parametrize("setting", [0, 1, 2])
def test_a_sqlite_replay_zeroes_no_dropped_page_and_leaves_secure_delete_as_it_was(
        tmp_path, setting):
    conn = ledger.connect(tmp_path / "queue.db")  # a setting of SQLite alone
    try:
        conn.execute(f"PRAGMA secure_delete = {'FAST' if setting == 2 else setting}")
        with conn.bulk():
            assert conn.execute("PRAGMA secure_delete").fetchone() == (2,)  # FAST
        assert conn.execute("PRAGMA secure_delete").fetchone() == (setting,)
    finally:
        conn.close()


def test_a_replay_leaves_out_of_an_insert_only_columns_every_row_holds_the_default_of():
    rows = projections.Rows(None, "t", ("k", "a", "b", "c", "d"), "k",  # type: ignore[arg-type]
                            defaults={"a": None, "b": 0.0, "c": "x", "d": 0})
    held = [{"k": 1, "a": None, "b": 0, "c": "x", "d": 0},
            {"k": 2, "a": None, "b": 0.0, "c": "y", "d": 0},
            {"k": 3, "a": None, "b": 0.0, "c": "x", "d": 5}]
    assert rows._defaulted(held) == {"a", "b"}
    assert rows._defaulted(held[:1]) == {"a", "b", "c", "d"}
    assert rows._defaulted([{"k": 1, "a": "set", "b": 1.5, "c": "x", "d": 1}]) == {"c"}
    assert rows._defaulted([{"k": 1, "a": "set", "b": 1.5, "c": "z", "d": 1}]) == set()


# -- queue decisions ------------------------------------------------------------------------


def test_ids_made_by_separate_processes_are_their_enqueued_events_seqs(db, run):
    """Each ``queuectl enqueue`` is its own process; each made id is the seq of its job's
    ``enqueued`` event, in plain decimal, and workers' are ``w`` and theirs."""
    made = []
    for _ in range(6):
        done = subprocess.run(queuectl_cmd("enqueue", "-c", "true"), capture_output=True,
                              text=True, timeout=60, check=True)
        made.append(done.stdout.rsplit(" ", 1)[-1].strip())
    assert all(re.fullmatch(r"[1-9][0-9]*", job_id) for job_id in made) and len(set(made)) == 6
    conn = ledger.connect(db)
    try:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE type = 'enqueued' "
                                           "ORDER BY seq")]
    finally:
        conn.close()
    assert made == [str(seq) for seq in seqs]
    started = run("worker", "--burst").output.splitlines()[0]
    with by_hand(db) as conn:
        (seq,) = conn.execute("SELECT seq FROM events WHERE type = 'worker-started'").fetchone()
    assert started == f"Worker started: w{seq}"


def test_a_made_id_that_a_user_already_chose_gets_a_suffix(conn):
    taken = str(ledger.next_seq(conn) + 1)  # what the next job would be called
    _add(conn, taken)  # the user takes it (seq n); the next made id would be n+1
    ids = decisions.enqueue(conn, [decisions.JobSpec(command="true"), decisions.JobSpec(command="true")])
    assert ids == [f"{taken}.1", str(ledger.next_seq(conn) - 1)]


def test_worker_ids_never_collide(conn):
    made = {claims.worker_started(conn, n, "host") for n in range(200)}
    assert len(made) == 200
    with pytest.raises(Conflict, match="Worker with ID 'w1' already exists"):
        claims.worker_started(conn, 1, "host", worker_id="w1")
        claims.worker_started(conn, 1, "host", worker_id="w1")


def test_claim_takes_oldest_first(conn):
    _add(conn, "first")
    _add(conn, "second")
    _add(conn, "third")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    claimed = [claims.claim(conn, "w1") for _ in range(4)]
    assert [c.job_id if c else None for c in claimed] == ["first", "second", "third", None]
    assert [c.attempt for c in claimed if c] == [1, 1, 1]


def test_claim_skips_jobs_waiting_out_their_backoff(conn):
    _add(conn, "a", "b")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    job = claims.claim(conn, "w1")
    assert job is not None and job.job_id == "a"
    failed = ev.Failed(job_id="a", worker_id="w1", attempt=1, exit_code=1, error="exit status 1")
    claims.finish(conn, job, failed)
    assert claims.claim(conn, "w1").job_id == "b"  # type: ignore[union-attr]
    assert claims.claim(conn, "w1") is None  # "a" waits 2 s


def test_a_retry_due_at_once_is_claimed_with_the_result_that_made_it(conn, monkeypatch):
    """Found by the state machine: a failure whose retry is due at once (full jitter drew
    a zero delay) frees the job in the same transaction that claims the next one, and
    that claim must see it."""
    decisions.set_config(conn, "backoff-jitter", "1")
    decisions.enqueue(conn, [decisions.JobSpec(command="false", id="r", max_retries=1)])
    claims.worker_started(conn, 1, "host", worker_id="w1")
    job = claims.claim(conn, "w1")
    assert job is not None and job.attempt == 1
    monkeypatch.setattr("random.random", lambda: 0.9999)  # 2 s * (1 - 0.9999): 0.0 s
    failed = ev.Failed(job_id="r", worker_id="w1", attempt=1, exit_code=1, error="exit status 1")
    events, again = claims.finish_and_claim(conn, job, failed, "w1")
    assert [type(e) for e in events] == [ev.Failed, ev.ScheduledRetry]
    assert events[1].delay == 0.0  # type: ignore[attr-defined]
    assert again is not None and (again.job_id, again.attempt) == ("r", 2)


def test_concurrent_claims_never_share_a_job(db, conn):
    ids = [f"job{i:03d}" for i in range(200)]
    _add(conn, *ids)
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def claimer(worker_id: str) -> None:
        mine = got.setdefault(worker_id, [])
        try:
            c = ledger.connect(db)
            try:
                claims.worker_started(c, 1, "host", worker_id=worker_id)
                start.wait()
                while (job := claims.claim(c, worker_id)) is not None:
                    mine.append(job.job_id)
            finally:
                c.close()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    claimed = [job for jobs in got.values() for job in jobs]
    assert sorted(claimed) == ids  # each job exactly once
    per_job = Counter(
        r[0] for r in conn.execute("SELECT job_id FROM events WHERE type = 'claimed'")
    )
    assert set(per_job.values()) == {1} and len(per_job) == 200
    holders = dict(conn.execute("SELECT id, worker_id FROM jobs WHERE state = 'processing'"))
    assert holders == {job: w for w, jobs in got.items() for job in jobs}


def _claim(attempt: int, max_retries: int = 3, base: float = 2) -> claims.Claim:
    return claims.Claim("j", "false", attempt, max_retries, base, 0.0)


@pytest.mark.parametrize(
    ("base", "max_retries", "delays"),
    [(2, 3, [2, 4, 8]), (3, 2, [3, 9]), (1.5, 1, [1.5]), (2, 0, [])],
)
def test_retry_rule(base, max_retries, delays):
    at = "2026-11-27T10:30:00.000000Z"
    for k in range(1, 2 + max_retries):
        event = claims.retry_or_dead(_claim(k, max_retries, base), at, "exit status 1")
        if k <= max_retries:
            assert event == ev.ScheduledRetry(
                job_id="j", attempt=k, delay=base**k, run_at=clock.after(at, base**k)
            )
            assert clock.seconds_between(at, event.run_at) == pytest.approx(delays[k - 1])
        else:  # the (1 + max_retries)-th failed run
            assert event == ev.Dead(job_id="j", attempts=k, reason="exit status 1")


def test_job_runs_at_most_one_plus_max_retries_times(conn):
    _add(conn, "f", command="false", retries=2)
    claims.worker_started(conn, 1, "host", worker_id="w1")
    runs = 0
    while True:
        job = claims.claim(conn, "w1")
        if job is None:  # waiting out its backoff, or dead: claim it when its run_at comes
            state, run_at = conn.execute("SELECT state, run_at FROM jobs WHERE id = 'f'").fetchone()
            if state == "dead":
                break
            assert state == "failed"
            with pytest.MonkeyPatch.context() as m:
                m.setattr(clock, "now", lambda: run_at)  # noqa: B023
                job = claims.claim(conn, "w1")
            assert job is not None
        runs += 1
        result = ev.Failed(
            job_id="f", worker_id="w1", attempt=job.attempt, exit_code=1, error="exit status 1"
        )
        claims.finish(conn, job, result)
    assert runs == 3
    assert events_of(conn, "f") == [
        "enqueued",
        *["claimed", "failed", "scheduled-retry"] * 2,
        "claimed", "failed", "dead",
    ]
    delays = [
        msgspec.json.decode(b)["delay"]
        for (b,) in conn.execute("SELECT body FROM events WHERE type = 'scheduled-retry'")
    ]
    assert delays == [2, 4]
    assert reads.get_job(conn, "f").attempts == 3


def test_finish_writes_nothing_when_worker_no_longer_holds_job(conn, monkeypatch):
    _add(conn, "j")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    job = claims.claim(conn, "w1")
    assert job is not None

    later = clock.iso(clock.parse(clock.now()) + timedelta(hours=1))
    monkeypatch.setattr(clock, "now", lambda: later)
    claims.worker_started(conn, 2, "host", worker_id="w2")

    def w2_lives() -> None:
        monkeypatch.setattr(clock, "now", lambda: clock.after(later, 10))
        claims.heartbeat(conn, "w2")

    taken = rescued(conn, 30, meanwhile=w2_lives)
    assert [e.type for e in taken] == ["lease-expired", "scheduled-retry"]
    retry_at = reads.get_job(conn, "j").run_at
    monkeypatch.setattr(clock, "now", lambda: retry_at)
    again = claims.claim(conn, "w2")
    assert again is not None and again.attempt == 2
    (seq_before,) = conn.execute("SELECT max(seq) FROM events").fetchone()
    before = _snapshot(conn)

    # w1 comes back from the dead and reports its (long lost) run.
    assert claims.finish(conn, job, ev.Completed(job_id="j", worker_id="w1", attempt=1)) == []
    failed = ev.Failed(job_id="j", worker_id="w1", attempt=1, exit_code=1, error="x")
    assert claims.finish(conn, job, failed) == []
    assert conn.execute("SELECT max(seq) FROM events").fetchone() == (seq_before,)
    assert _snapshot(conn) == before

    # The holder's result is still recorded.
    done = ev.Completed(job_id="j", worker_id="w2", attempt=2)
    assert claims.finish(conn, again, done) == [msgspec.structs.replace(done, by="w2")]
    assert reads.get_job(conn, "j").state == "completed"


def test_rescue_takes_back_stale_workers_jobs(conn, monkeypatch):
    _add(conn, "held", retries=3)
    claims.worker_started(conn, 1, "host", worker_id="busy")
    claims.worker_started(conn, 2, "host", worker_id="idle")
    job = claims.claim(conn, "busy")
    assert job is not None and job.job_id == "held"
    assert rescued(conn, 30, watched=30) == []  # nobody is silent for over 30 s yet

    far = "2099-01-01T00:00:00.000000Z"
    monkeypatch.setattr("queuectl.clock.now", lambda: far)
    events = rescued(conn, 30)
    by_type = {e.type: e for e in events}
    assert sorted(by_type) == ["lease-expired", "scheduled-retry", "worker-lost"]
    assert len(events) == 3
    assert by_type["lease-expired"].job_id == "held"
    assert by_type["lease-expired"].worker_id == "busy"
    assert by_type["lease-expired"].attempt == 1
    assert by_type["worker-lost"].worker_id == "idle"
    retry = by_type["scheduled-retry"]
    assert (retry.job_id, retry.attempt, retry.delay) == ("held", 1, 2)
    assert retry.run_at == clock.after(far, 2)

    assert events_of(conn, "held") == ["enqueued", "claimed", "lease-expired", "scheduled-retry"]
    row = reads.get_job(conn, "held")
    assert (row.state, row.worker_id, row.run_at) == ("failed", None, retry.run_at)
    states = dict(conn.execute("SELECT id, state FROM workers"))
    assert states == {"busy": "gone", "idle": "gone"}
    assert rescued(conn, 30) == []  # recorded once, not again


def test_rescue_kills_job_that_used_its_last_run(conn, monkeypatch):
    _add(conn, "last", retries=0)
    claims.worker_started(conn, 1, "host", worker_id="w1")
    assert claims.claim(conn, "w1") is not None
    monkeypatch.setattr(clock, "now", lambda: "2099-01-01T00:00:00.000000Z")
    assert [e.type for e in rescued(conn, 30)] == ["lease-expired", "dead"]
    assert reads.get_job(conn, "last").state == "dead"


# -- silence: how a rescuer decides a worker is gone ------------------------------------------


class Watch:
    """A rescuer's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 0.0
        self.silence = claims.Silence(clock=lambda: self.t)

    def look(self, conn: sqlite3.Connection, after: float, lease: float = 30,
             gap: float = float("inf")) -> list[str]:
        self.t += after
        return [w for w, _, _ in claims.silent_workers(conn, lease, self.silence, gap)]


def test_silence_is_what_the_rescuer_watched_not_the_wall_clock(conn, monkeypatch):
    claims.worker_started(conn, 1, "host", worker_id="w1")
    watch = Watch()
    assert watch.look(conn, 0) == []
    # The wall clock steps a year ahead; the rescuer's own clock does not.
    monkeypatch.setattr(clock, "now", lambda: "2099-01-01T00:00:00.000000Z")
    assert watch.look(conn, 10) == []
    assert watch.look(conn, 10) == []
    assert watch.look(conn, 10.5) == ["w1"]  # 30.5 s watched without a heartbeat


def test_a_jump_or_a_pause_of_the_rescuer_counts_as_one_short_gap(conn):
    claims.worker_started(conn, 1, "host", worker_id="w1")
    watch = Watch()
    watch.look(conn, 0)
    assert watch.look(conn, 3600, gap=20) == []  # an hour's jump counts as 20 s
    assert watch.look(conn, 5, gap=20) == []  # 25 s
    assert watch.look(conn, 6, gap=20) == ["w1"]  # 31 s


def test_a_heartbeat_starts_the_silence_over(conn, monkeypatch):
    claims.worker_started(conn, 1, "host", worker_id="w1")
    watch = Watch()
    watch.look(conn, 0)
    watch.look(conn, 20)
    monkeypatch.setattr(clock, "now", lambda: "2099-01-01T00:00:00.000000Z")
    claims.heartbeat(conn, "w1")
    assert watch.look(conn, 20) == []  # 40 s since the start, but only 0 since the beat
    assert watch.look(conn, 31) == ["w1"]


def test_a_new_rescuer_waits_a_whole_lease_however_old_the_heartbeat(conn, monkeypatch):
    claims.worker_started(conn, 1, "host", worker_id="w1")
    monkeypatch.setattr(clock, "now", lambda: "2099-01-01T00:00:00.000000Z")
    watch = Watch()
    assert watch.look(conn, 0) == []
    assert watch.look(conn, 29) == []
    assert watch.look(conn, 2) == ["w1"]


def test_rescue_leaves_a_worker_that_spoke_after_it_was_found_silent(conn, monkeypatch):
    _add(conn, "j")
    claims.worker_started(conn, 1, "host", worker_id="w1")
    assert claims.claim(conn, "w1") is not None
    watch = Watch()
    watch.look(conn, 0)
    watch.t += 31
    silent = claims.silent_workers(conn, 30, watch.silence)
    assert [w for w, _, _ in silent] == ["w1"]
    monkeypatch.setattr(clock, "now", lambda: "2099-01-01T00:00:00.000000Z")
    claims.heartbeat(conn, "w1")  # it was slow, not dead
    assert claims.rescue(conn, silent) == []
    assert reads.get_job(conn, "j").state == "processing"


def test_now_is_the_system_clock_as_iso_gives_it():
    for _ in range(3):
        before = clock.iso(datetime.now(UTC))
        now = clock.now()
        after = clock.iso(datetime.now(UTC))
        assert before <= now <= after and len(now) == 27 and now.endswith("Z")
        assert clock.iso(clock.parse(now)) == now
        time.sleep(0.4)  # across a second's boundary at least once


def test_a_time_in_microseconds_is_the_instant_iso_gives():
    """``of_micros`` (the PostgreSQL store's tracked server clock goes through it) writes the
    same text as ``iso``, whichever second it was asked for last."""
    for moment in (datetime(1970, 1, 1, tzinfo=UTC), datetime(2026, 12, 6, 8, 0, 52, 72660, UTC),
                   datetime(2026, 12, 6, 8, 0, 53, tzinfo=UTC),
                   datetime(2026, 12, 6, 8, 0, 52, 999999, UTC), clock.LATEST):
        micros = (moment - clock.EARLIEST) // timedelta(microseconds=1)
        assert clock.of_micros(micros) == clock.iso(moment)
