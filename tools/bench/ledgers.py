"""The replay ledger: a big ledger of finished jobs that replay, reads and the dashboard
measure, built once and cached under ``--cache-dir`` (and, on PostgreSQL, kept on the
server as a template database), keyed by its size and by the code that shapes its rows."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from queuectl import events as ev
from queuectl import ledger
from queuectl.store import sqlite as sqlite_store

from .context import PG_PREFIX, Context, pg_execute, pg_url

CACHE_FORMAT = "2"  # bump when build_ledger() changes the rows it writes
# A replay ledger this big is slow to import: keep it on the server, copy it.
PG_CACHE_MIN_JOBS = 100_000


def _cache_key(jobs: int) -> str:
    """Keyed by size, by the code that shapes the ledger's rows, and by the projections'
    versions (a cached ledger with stale projections would be rebuilt on every open)."""
    from projections import REGISTRY

    versions = repr([(p.NAME, p.VERSION) for p in REGISTRY])
    digest = hashlib.sha256()
    page_size = repr(getattr(ledger, "PAGE_SIZE", None))  # fixed when a database is made
    for part in (CACHE_FORMAT, inspect.getsource(ev), repr(sqlite_store.LEDGER_DDL), versions,
                 page_size):
        digest.update(part.encode())
    return f"ledger-{jobs}-{digest.hexdigest()[:12]}.db"


def _at(seq: int) -> str:
    """A distinct, increasing ISO time per event: one millisecond apart."""
    seconds, ms = divmod(seq, 1000)
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"2026-01-{1 + days:02d}T{h:02d}:{m:02d}:{s:02d}.{ms:03d}000Z"


def ledger_rows(jobs: int, pending: int) -> Iterator[tuple[str, str, str | None, str | None, str]]:
    """The events of ``jobs`` jobs: blocks of 1,000 enqueued, then each claimed and completed by
    one of two workers; the last ``pending`` jobs are only enqueued."""
    seq = 0
    encode = ev.encode

    def row(event: ev.Event) -> tuple[str, str, str | None, str | None, str]:
        nonlocal seq
        seq += 1
        return (_at(seq), event.type, getattr(event, "job_id", None),
                getattr(event, "worker_id", None), encode(event))

    workers = ("benchw01", "benchw02")
    # Claims carry since-when the job was eligible where the vocabulary has it, as real ones do.
    eligible = "eligible_at" in getattr(ev.Claimed, "__struct_fields__", ())
    queued = {"queue": "default"} if "queue" in getattr(ev.Claimed, "__struct_fields__", ()) else {}
    enqueued_at: dict[str, str] = {}
    for w in workers:
        yield row(ev.WorkerStarted(worker_id=w, pid=1, host="bench"))
    done = jobs - pending
    for block in range(0, jobs, 1000):
        ids = [f"j{i:07d}" for i in range(block, min(block + 1000, jobs))]
        for job_id in ids:
            yield row(ev.Enqueued(job_id=job_id, command="true", max_retries=3, backoff_base=2.0))
            enqueued_at[job_id] = _at(seq)
        for i, job_id in enumerate(ids, block):
            if i >= done:
                break
            w = workers[i & 1]
            since = {"eligible_at": enqueued_at.pop(job_id), **queued} if eligible else {}
            yield row(ev.Claimed(job_id=job_id, worker_id=w, attempt=1, **since))
            yield row(ev.Completed(job_id=job_id, worker_id=w, attempt=1, duration=0.002))
        enqueued_at.clear()
    for w in workers:
        yield row(ev.WorkerStopped(worker_id=w, reason="burst: queue empty"))


def build_ledger(ctx: Context, path: Path, jobs: int) -> None:
    conn = ledger.connect(path, durable=False)
    try:
        conn.execute("PRAGMA cache_size = -262144")  # build faster; not part of any figure
        with ledger.write(conn):
            conn.executemany(
                "INSERT INTO events (at, type, job_id, worker_id, body) VALUES (?, ?, ?, ?, ?)",
                ledger_rows(jobs, pending=max(10, jobs // 100)),
            )
        ctx.log(f"replay: {jobs:,} jobs' events written; rebuilding projections once")
        ledger.rebuild(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def cached_ledger(ctx: Context, jobs: int) -> Path:
    """The cached replay ledger for ``jobs`` jobs, built on first use."""
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.cache_dir / _cache_key(jobs)
    if path.exists():
        ctx.log(f"replay: using cached ledger {path}")
        return path
    for stale in ctx.cache_dir.glob(f"ledger-{jobs}-*.db*"):
        stale.unlink()
    ctx.log(f"replay: building a ledger of {jobs:,} jobs in {path} (cached for later runs)")
    building = path.with_name(f"{path.stem}.building-{os.getpid()}.db")
    try:
        build_ledger(ctx, building, jobs)
        for suffix in ("-wal", "-shm"):
            Path(f"{building}{suffix}").unlink(missing_ok=True)
        building.rename(path)
    finally:
        for p in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
            p.unlink(missing_ok=True)
    return path


def copy_of_replay_ledger(ctx: Context) -> Path:
    source = cached_ledger(ctx, ctx.sizes.replay_jobs)
    target = ctx.fresh_dir("replay") / "queue.db"
    shutil.copyfile(source, target)
    return target


def _pg_cache_name(jobs: int) -> str:
    """The replay ledger kept on the PostgreSQL server: keyed as the SQLite one, and by what
    shapes its tables there (the store's schema, the projections' DDL, indexes, triggers)."""
    from projections import REGISTRY
    from queuectl.store import postgres as pg_store

    tables = [(p.NAME, p.VERSION, p.DDL, getattr(p, "EARLY_INDEXES", ()),
               getattr(p, "INDEXES", ()), getattr(p, "TRIGGERS", {})) for p in REGISTRY]
    digest = hashlib.sha256()
    for part in (_cache_key(jobs), repr(pg_store.LEDGER_DDL), repr(pg_store.SCHEMA_VERSION),
                 repr(tables), inspect.getsource(pg_store.PgDialect)):
        digest.update(part.encode())
    return f"{PG_PREFIX}cache_{jobs}_{digest.hexdigest()[:12]}"


def import_replay_ledger(ctx: Context, url: str, jobs: int) -> int:
    """The replay ledger of ``jobs`` jobs exported from its SQLite cache and imported into
    the empty database at ``url``, as ``ledger export`` / ``ledger import`` would move it."""
    source = cached_ledger(ctx, jobs)
    ctx.log(f"reads: importing the {jobs:,}-job ledger into PostgreSQL")
    return copy_ledger(source, url)


def copy_ledger(source: Path, url: str) -> int:
    """The ledger of the SQLite file ``source`` exported and imported into the empty store
    at ``url``, as ``ledger export`` and ``ledger import`` move it; its event count."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)  # the source stays untouched
    try:
        db = ledger.connect(url)
        try:
            return ledger.import_(db, enumerate(ledger.export(reader), 1))  # type: ignore[arg-type]
        finally:
            db.close()
    finally:
        reader.close()


def cached_pg_ledger(ctx: Context, jobs: int) -> str:
    """The name of the server's copy of the replay ledger, imported on first use."""
    name = _pg_cache_name(jobs)
    kept = [row[0] for row in pg_execute(
        ctx.pg_admin, "SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
        (f"{PG_PREFIX}cache_{jobs}_",))]
    if name in kept:
        ctx.log(f"reads: using the cached PostgreSQL ledger {name}")
        return name
    for stale in kept:
        ctx.drop_pg(stale)
    building = ctx.create_pg()  # dropped by this run if it is interrupted
    try:
        import_replay_ledger(ctx, pg_url(ctx.pg_admin, building), jobs)
        pg_execute(ctx.pg_admin, f"ALTER DATABASE {building} RENAME TO {name}")
        ctx.log(f"reads: kept as {name} for later runs")
    finally:
        ctx.drop_pg(building)  # once renamed, nothing is left to drop
    return name


@contextmanager
def pg_replay_ledger(ctx: Context) -> Iterator[str]:
    """A fresh PostgreSQL database holding the replay ledger: a copy of the server's cached
    one, or (small ledgers, which import in seconds) imported anew."""
    jobs = ctx.sizes.replay_jobs
    if jobs < PG_CACHE_MIN_JOBS:
        with ctx.fresh_pg() as url:
            import_replay_ledger(ctx, url, jobs)
            yield url
        return
    with ctx.fresh_pg(template=cached_pg_ledger(ctx, jobs)) as url:
        yield url
