"""cycle: the ledger cycle, claim + finish(Completed) through the library, no process
spawned."""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from queuectl import claims, clock, ledger
from queuectl import events as ev
from queuectl.store import is_postgres

from .. import trace
from ..context import Context
from ..rows import LEAST_PYTHON, NO_PYTHON, Row, ScenarioResult, Target, make_row, median
from ..stores import enqueue_true, job_counts

try:  # the worker's own connection setup and waker thread, where this version has them
    from queuectl.store.sqlite import Waker
except ImportError:
    Waker = None  # type: ignore[assignment,misc]


@contextmanager
def worker_connection(db: Path | str) -> Iterator[Any]:
    """A connection set up as a worker's, with its process's waker thread beside it (which
    watches for new work, and on SQLite checkpoints the WAL)."""
    conn = ledger.connect(db, durable=False)
    conn.for_worker()
    if is_postgres(db):
        waker = conn.waker()
    else:
        waker = Waker(Path(db)) if Waker else None
    try:
        yield conn
    finally:
        if waker:
            waker.close()
        conn.close()


def one_at_a_time(conn: Any, combined: bool) -> tuple[int, float, float]:
    """Claim and complete every job as one worker: jobs done, and seconds spent in the
    claim and in the finish calls. ``combined``: the worker's own path, ``finish_and_claim``
    (each result committed with the next claim)."""
    wid = claims.worker_started(conn, os.getpid(), socket.gethostname())
    t_claim = t_finish = 0.0
    done = 0
    start = time.perf_counter()
    claim = claims.claim(conn, wid)
    t_claim += time.perf_counter() - start
    while claim is not None:
        done += 1
        t0 = time.perf_counter()
        # by: its worker's, as a worker's results are (worker.Worker._event)
        result = ev.Completed(job_id=claim.job_id, worker_id=wid, attempt=claim.attempt,
                              by=wid)
        if combined:
            _, claim = claims.finish_and_claim(conn, claim, result, wid)
            t_finish += time.perf_counter() - t0
        else:
            claims.finish(conn, claim, result)
            t1 = time.perf_counter()
            t_finish += t1 - t0
            claim = claims.claim(conn, wid)
            t_claim += time.perf_counter() - t1
    return done, t_claim, t_finish


def together(conn: Any, slots: int) -> int:
    """Claim and complete every job as ``slots`` workers whose results always arrive
    together; jobs done."""
    ids = [claims.worker_started(conn, os.getpid(), socket.gethostname())
           for _ in range(slots)]
    held = [(w, c) for w in ids if (c := claims.claim(conn, w)) is not None]
    done = 0
    while held:
        finished = [(c, ev.Completed(job_id=c.job_id, worker_id=w, attempt=c.attempt, by=w))
                    for w, c in held]
        _, following = claims.finish_and_claim_many(conn, finished, [w for w, _ in held])
        done += len(held)
        held = [(w, c) for (w, _), c in zip(held, following, strict=True) if c]
    return done


def cycle_rate(ctx: Context, n: int, combined: bool) -> tuple[float, float, float]:
    """Jobs/s of claiming and completing ``n`` no-op jobs in one process, and the mean
    microseconds spent in the claim and finish calls. ``combined``: the worker's own path,
    ``finish_and_claim`` (each result committed with the next claim), where the queue has it."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        with worker_connection(db) as conn:
            start = time.perf_counter()
            done, t_claim, t_finish = one_at_a_time(conn, combined)
            seconds = time.perf_counter() - start
    if done != n:
        raise RuntimeError(f"cycled {done} jobs, expected {n}")
    return n / seconds, t_claim / n * 1e6, t_finish / n * 1e6


def batched_cycle_rate(ctx: Context, n: int, slots: int) -> float:
    """Jobs/s of ``slots`` workers whose results always arrive together: each transaction
    records ``slots`` results and claims the next job for each (``finish_and_claim_many``,
    what a worker process's GroupCommit writes at best)."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        with worker_connection(db) as conn:
            start = time.perf_counter()
            done = together(conn, slots)
            seconds = time.perf_counter() - start
    if done != n:
        raise RuntimeError(f"cycled {done} jobs, expected {n}")
    return n / seconds


def statements_rate(ctx: Context, n: int, slots: int) -> float:
    """Jobs/s of the cycle's statements alone (``trace``): those of one worker's
    ``finish_and_claim`` (``slots`` 1) or of ``slots`` workers' results together, recorded
    on one store and replayed on its twin, each connection set up as a worker's."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        with trace.twin(ctx, db) as copy:
            with worker_connection(db) as conn, trace.recording(conn) as steps:
                done = one_at_a_time(conn, True)[0] if slots == 1 else together(conn, slots)
            if done != n:
                raise RuntimeError(f"cycled {done} jobs, expected {n}")
            with worker_connection(copy) as conn:
                trace.prepare_for_replay(conn, steps)
                start = time.perf_counter()
                trace.replay(conn, steps)
                seconds = time.perf_counter() - start
            counts = job_counts(copy)
            if counts.get("completed") != n:  # the replay did not do the same work
                raise RuntimeError(f"the replayed cycle left {counts}, expected {n} completed")
    return n / seconds


# The statements of one steady transaction of the one-result cycle on SQLite, in order:
# what least_python writes by hand, each recognised by how it begins.
_STEADY = ("BEGIN IMMEDIATE", "SELECT 'r'", "INSERT INTO events", "UPDATE jobs SET state = "
           "'completed'", "UPDATE jobs SET state = 'processing'", "UPDATE runs",
           "INSERT INTO runs", "UPDATE workers", "COMMIT")


def least_python(conn: Any, run: Callable[[claims.Claim], tuple[float, str]] | None = None
                 ) -> int:
    """The one-result cycle on SQLite, as one worker, with the least Python a queue needs
    for it: the cycle's own statements (recorded from queuectl's first transaction, so
    that they stay the schema's), each steady transaction written by hand. Under the same
    locks (the store's transaction), it reads the claim's one query, checks that the
    worker still holds its job, makes the two events and encodes them (``events.encode``),
    and binds the six writes; no ledger, projection or decision code runs between them.
    The first claim and the last result go through queuectl. ``run``: runs each job
    before its result, which records the run's duration and output (what ``run`` gives);
    None: the cycle alone, each job completed at once. Jobs done."""
    wid = claims.worker_started(conn, os.getpid(), socket.gethostname())
    claim = claims.claim(conn, wid)
    if claim is None:
        return 0
    took, output = run(claim) if run else (0.0, "")
    result = ev.Completed(job_id=claim.job_id, worker_id=wid, attempt=claim.attempt, by=wid,
                          duration=took, output=output)
    with trace.recording(conn) as steps:  # its statements, from queuectl's own transaction
        _, claim = claims.finish_and_claim(conn, claim, result, wid)
    sql = [text for _, text, _ in steps.steps]
    if len(sql) != len(_STEADY) or not all(map(str.startswith, sql, _STEADY)):
        raise trace.Unfit(f"least_python: the cycle's statements changed: {sql}")
    known, events, done_, claimed, closed, opened, worker = sql[1:-1]
    execute, encode, now, wait = conn.execute, ev.encode, clock.now, _seconds_after
    done = 1
    while claim is not None:
        job_id, attempt = claim.job_id, claim.attempt
        took, output = run(claim) if run else (0.0, "")
        completed = ev.Completed(job_id=job_id, worker_id=wid, attempt=attempt, by=wid,
                                 duration=took, output=output)
        with conn.transaction():
            at = now()
            ready = held = None
            for row in execute(known, (at, 1, job_id, wid)).fetchall():
                if row[0] == "r":
                    ready = row
                elif row[0] == "j":
                    held = row
                else:  # a worker refused, a queue with rules, a hook: not this cycle's
                    raise RuntimeError(f"least_python: unexpected row {row}")
            if held is None or held[2:5] != ("processing", wid, attempt) or held[5] or held[6]:
                raise RuntimeError(f"least_python: the job is not as it was claimed: {held}")
            if ready is None:
                break  # the last result: below, through queuectl
            _, next_id, command, run_at, attempts, retries, _, _, *policy, queue, cwd, env, \
                limits = ready
            attempts += 1
            claim_event = ev.Claimed(job_id=next_id, worker_id=wid, attempt=attempts,
                                     eligible_at=run_at, queue=queue, by=wid)
            seq = execute(events, (at, "completed", job_id, wid, encode(completed), "claimed",
                                   next_id, wid, encode(claim_event))).lastrowid
            execute(done_, (at, job_id))
            execute(claimed, (attempts, wid, 0, at, next_id))
            execute(closed, (at, "completed", 0, took, job_id))
            execute(opened, (seq, next_id, attempts, wid, at, wait(at, run_at), queue))
            execute(worker, (next_id, at, 1, wid))
        claim = claims.Claim(next_id, command, attempts, retries, *policy, cwd, env, limits)
        done += 1
    if claim is not None:  # its run is done: ``completed`` is its result
        claims.finish(conn, claim, completed)
        done += 1
    return done


def _seconds_after(at: str, since: str) -> float:
    """Seconds from ``since`` to ``at`` (ledger times), none if negative: a run's wait."""
    wait = (datetime.fromisoformat(at) - datetime.fromisoformat(since)).total_seconds()
    return wait if wait > 0.0 else 0.0


def least_python_rate(ctx: Context, n: int) -> float:
    """Jobs/s of ``least_python`` on ``n`` jobs; what it left must replay to exactly its
    live tables (``ledger.check``), as queuectl's own cycle's does: the same work."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        with worker_connection(db) as conn:
            start = time.perf_counter()
            done = least_python(conn)
            seconds = time.perf_counter() - start
            problems = ledger.check(conn)
        if done != n or job_counts(db).get("completed") != n or problems:
            raise RuntimeError(f"least_python: {done} jobs of {n}; {problems[:3]}")
    return n / seconds


def where_commits_go(ctx: Context, n: int) -> tuple[float, float, dict[str, float]]:
    """SQLite: the one-result cycle's statements (``trace``), replayed one at a time with a
    clock around each, on a connection set up as a worker's without its checkpoints: the
    share of their time that the COMMITs take, the pages each commit writes to the WAL,
    and those pages per B-tree. The WAL's frame headers give each page's number; SQLite's
    ``dbstat`` table names its B-tree, read right after some commits (a page freed by one
    B-tree, such as the index of pending jobs as they are claimed, may go to another)."""
    with ctx.fresh_target("cycle") as db:
        enqueue_true(db, n)
        with trace.twin(ctx, db) as copy:
            with worker_connection(db) as conn, trace.recording(conn) as steps:
                done = one_at_a_time(conn, True)[0]
            if done != n:
                raise RuntimeError(f"cycled {done} jobs, expected {n}")
            wal = Path(f"{copy}-wal")
            replaying: Any = ledger.connect(copy, durable=False)  # a SqliteDb
            try:
                replaying.for_worker()  # and no Waker: the WAL keeps every frame of the replay
                replaying.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                committing = total = 0.0
                commits = 0
                trees: Counter[str] = Counter()  # the sampled commits' pages, per B-tree
                sampled = 0
                clock = time.perf_counter
                for many, sql, values in steps.steps:
                    start = clock()
                    if many:
                        replaying.executemany(sql, values)
                    else:
                        replaying.execute(sql, values).fetchall()
                    took = clock() - start
                    total += took
                    if sql == "COMMIT":
                        committing += took
                        commits += 1
                        if commits % _NAMED_EVERY == 0:
                            owners = _owners(replaying)
                            trees.update(owners.get(page, "(unnamed)")
                                         for page in _last_commit(_wal_frames(wal)))
                            sampled += 1
                pages = len(_wal_frames(wal))
            finally:
                replaying.close()
    return (committing / total, pages / max(commits, 1),
            {tree: count / max(sampled, 1) for tree, count in trees.most_common()})


_NAMED_EVERY = 50  # the commits whose pages are named: one in this many


def _owners(conn: Any) -> dict[int, str]:
    """Each page's B-tree (a table's or an index's name), as the database is now; none
    where SQLite is built without the ``dbstat`` table."""
    try:
        return dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    except sqlite3.OperationalError:
        return {}


def _last_commit(frames: list[tuple[int, bool]]) -> list[int]:
    """The pages of the last commit in ``frames`` (``_wal_frames``)."""
    pages: list[int] = []
    for page, ends in reversed(frames[:-1]):
        if ends:
            break
        pages.append(page)
    return [frames[-1][0], *pages] if frames else []


def _wal_frames(wal: Path) -> list[tuple[int, bool]]:
    """Each frame of a WAL file, in order: its page number, and whether it ends a commit.
    The WAL format: a 32-byte header whose bytes 8-12 give the page size, then frames of a
    24-byte header (the page number, then the database size after a commit, else 0) and
    the page."""
    data = wal.read_bytes()
    if len(data) < 32:
        return []
    (page_size,) = struct.unpack(">I", data[8:12])
    frames = []
    for at in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        page, size_after = struct.unpack(">II", data[at:at + 8])
        frames.append((page, size_after != 0))
    return frames


BATCH = 16  # results a transaction records in the batched cycle
WAL_JOBS = 1_000  # jobs whose commits' WAL pages are read (the WAL keeps them all)


def empty_transaction_rate(ctx: Context, n: int) -> float:
    """Write transactions a second that append nothing: the ledger's lock taken, one read
    answered, committed. No job cycle on this store can go faster than this, one job a
    transaction (on PostgreSQL: two round trips, the head row locked between them)."""
    with ctx.fresh_target("cycle") as db:
        conn = ledger.connect(db, durable=False)
        conn.for_worker()
        try:
            start = time.perf_counter()
            for _ in range(n):
                with ledger.write(conn):
                    conn.execute("SELECT 1 WHERE ? > 0", (1,)).fetchone()
            return n / (time.perf_counter() - start)
        finally:
            conn.close()


def bench_cycle(ctx: Context, result: ScenarioResult) -> list[Row]:
    n = ctx.sizes.cycle_jobs
    combined = hasattr(claims, "finish_and_claim")
    batched = hasattr(claims, "finish_and_claim_many")
    split, split_claim, split_finish, joined, many, empty = [], [], [], [], [], []
    alone: list[float] = []  # the target's cycle, its statements alone
    least: list[float] = []  # the same cycle with the least Python it needs (SQLite)
    batched_path = batched and ctx.backend == "postgres"
    by_hand = combined and not batched_path
    for r in range(ctx.runs):
        rate, c_us, f_us = cycle_rate(ctx, n, combined=False)
        split.append(rate)
        split_claim.append(c_us)
        split_finish.append(f_us)
        if combined:
            joined.append(cycle_rate(ctx, n, combined=True)[0])
        if batched:
            many.append(batched_cycle_rate(ctx, n, BATCH))
        empty.append(empty_transaction_rate(ctx, n))
        if combined:
            alone.append(statements_rate(ctx, n, BATCH if batched_path else 1))
        if by_hand:
            by_hand = trace.by_hand(ctx, "cycle", lambda: least_python_rate(ctx, n), least)
        ctx.log(f"cycle run {r + 1}/{ctx.runs}: claim + finish {rate:.0f} jobs/s (claim "
                f"{c_us:.0f} us, finish {f_us:.0f} us)"
                + (f"; finish_and_claim {joined[-1]:.0f} jobs/s" if combined else "")
                + (f"; {BATCH} results a transaction {many[-1]:.0f} jobs/s" if batched else "")
                + f"; empty write transactions {empty[-1]:.0f}/s"
                + (f"; its statements alone {alone[-1]:.0f} jobs/s" if combined else "")
                + (f"; with the least Python {least[-1]:.0f} jobs/s" if by_hand else ""))
    result.details.update(claim_us=median(split_claim), finish_us=median(split_finish),
                          finish_and_claim=combined)
    commits: list[Row] = []
    if combined and ctx.backend != "postgres":
        share, pages, trees = where_commits_go(ctx, min(n, WAL_JOBS))
        result.details.update(wal_pages_per_tree=trees)
        commits = [
            make_row("cycle", "ledger_cycle_commit_share",
                     "the COMMITs' share of the one-result cycle's statements alone "
                     f"(each timed), {min(n, WAL_JOBS):,} jobs", [share * 100], "%", None,
                     note="a commit writes each page the transaction changed to the WAL, "
                          "two write calls a page"),
            make_row("cycle", "ledger_cycle_wal_pages",
                     "pages each commit of the one-result cycle writes to the WAL",
                     [pages], "pages", None,
                     note="per B-tree: " + ", ".join(f"{tree} {count:.2f}"
                                                     for tree, count in trees.items())),
        ]
    target = (Target(">= 3,000 jobs/s", "value", ">=", 3000) if ctx.backend == "postgres"
              else Target(">= 8,000 jobs/s", "value", ">=", 8000))
    split_note = (f"claim {median(split_claim):.0f} us + finish {median(split_finish):.0f} us "
                  "per job")
    if not combined:
        return [make_row("cycle", "ledger_cycle",
                         f"ledger cycle (claim + finish, no spawn), {n:,} jobs", split,
                         "jobs/s", target, note=split_note)]
    rows = [make_row(
        "cycle", "empty_transaction", f"empty write transactions (lock, one read, commit), "
        f"{n:,}", empty, "tx/s", None,
        note="the ceiling of any cycle that commits once a job")]
    # A worker process writes the results its workers hand in together, each with its
    # worker's next claim, in one transaction (worker.Pipeline's group commit): on
    # PostgreSQL, where a commit costs round trips, the batched cycle is what the target
    # measures. A SQLite worker's commit is cheap, so it commits one a job.
    rows += [] if not batched else [make_row(
        "cycle", "ledger_cycle_batched",
        f"ledger cycle, {BATCH} workers' results a transaction (`finish_and_claim_many`), "
        f"{n:,} jobs", many, "jobs/s", target if batched_path else None,
        note="a process's results written together, as its results thread does",
        ceiling_samples=alone, ceiling_label="statements alone")]
    return [
        *rows,
        make_row("cycle", "ledger_cycle",
                 f"ledger cycle, one result a transaction (`finish_and_claim`, no spawn), "
                 f"{n:,} jobs", joined, "jobs/s", None if batched_path else target,
                 note="one commit per job, as a SQLite worker runs",
                 # Its statements alone leave out even the Python any queue needs to
                 # decide them; where it was run, the same cycle with only that is the
                 # tighter ceiling.
                 ceiling_samples=least or alone,
                 ceiling_label="cycle written by hand" if least else "statements alone",
                 ceiling_means=LEAST_PYTHON if least else NO_PYTHON),
        *([] if not least else [make_row(
            "cycle", "ledger_cycle_least_python",
            f"the same cycle with the least Python it needs, written by hand, {n:,} jobs",
            least, "jobs/s", None, baseline_samples=joined, baseline_label="the cycle itself",
            note="the same statements, locks and encoded events, with no ledger, projection "
                 "or decision code between them (least_python in "
                 "tools/bench/scenarios/cycle.py); what it leaves replays exactly")]),
        make_row("cycle", "ledger_cycle_statements",
                 f"the same {'batched ' if batched_path else ''}cycle's statements alone, "
                 f"recorded and replayed on a copy of the store, {n:,} jobs", alone,
                 "jobs/s", None, baseline_samples=many if batched_path else joined,
                 baseline_label="the cycle itself",
                 note="no queuectl Python between the statements: the ceiling of this cycle "
                      "on this schema (tools/bench/trace.py)"),
        *commits,
        make_row("cycle", "ledger_cycle_split",
                 f"ledger cycle, separate `claim` + `finish` calls, {n:,} jobs", split,
                 "jobs/s", None, note=split_note + "; two commits per job"),
    ]
