"""api: ``Queue.enqueue`` from Python, one durable job a call, against huey's task enqueue
on SqliteHuey and a bare one-row durable commit of the same store."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from typing import Any

from queuectl import actor, clock

from .. import trace
from ..context import Context
from ..measure import until_wal_wraps
from ..peers import huey_enqueue_rate
from ..rows import LEAST_PYTHON, NO_PYTHON, Row, ScenarioResult, Target, make_row
from ..stores import job_counts


def api_enqueue_rate(ctx: Context, n: int) -> tuple[float, float]:
    """Calls/s of ``Queue.enqueue`` on one ``Queue`` held open, each durable on return,
    and this process's CPU a call in microseconds (on PostgreSQL, the client's alone);
    timed once the store's WAL has wrapped (``until_wal_wraps``)."""
    from queuectl.api import Queue

    with ctx.fresh_target("api") as db, Queue(db) as queue:
        warm = until_wal_wraps(lambda: queue.enqueue("true"), db)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            queue.enqueue("true")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if queue.status()["jobs"]["pending"] != warm + n:
            raise RuntimeError("Queue.enqueue lost jobs")
    return n / seconds, cpu / n * 1e6


def api_statements_rate(ctx: Context, n: int) -> tuple[float, float]:
    """Calls/s of ``Queue.enqueue``'s statements alone (``trace``): those of ``n`` calls,
    recorded on one store and replayed on its twin, each commit as durable; and the
    replaying process's CPU a call in microseconds. The calls that took the recording's
    WAL to its wrap (``until_wal_wraps``) are replayed first, untimed: so are the twin's."""
    from queuectl import ledger
    from queuectl.api import Queue

    with ctx.fresh_target("api") as db:
        Queue(db).close()  # the store made, as the calls will find it
        with trace.twin(ctx, db) as copy:
            with Queue(db) as queue, trace.recording(queue._db) as steps:
                warm = until_wal_wraps(lambda: queue.enqueue("true"), db)
                for _ in range(n):
                    queue.enqueue("true")
            calls = trace.transactions(steps)
            if len(calls) != warm + n:
                raise RuntimeError(f"recorded {len(calls)} transactions for {warm + n} calls")
            before, timed = trace.joined(calls[:warm]), trace.joined(calls[warm:])
            conn = ledger.connect(copy)
            try:
                trace.prepare_for_replay(conn, steps)
                trace.replay(conn, before)
                start, cpu = time.perf_counter(), time.process_time()
                trace.replay(conn, timed)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            finally:
                conn.close()
            counts = job_counts(copy)
            if counts.get("pending") != warm + n:  # the replay did not do the same work
                raise RuntimeError(f"the replayed enqueues left {counts}, expected "
                                   f"{warm + n} pending")
    return n / seconds, cpu / n * 1e6


# The statements of one ``Queue.enqueue`` of a plain command on SQLite, in order: what
# least_python_enqueue writes by hand, each recognised by how it begins.
_ENQUEUE = ("BEGIN IMMEDIATE", "SELECT coalesce(max(seq), 0) FROM events",
            "SELECT 1 FROM jobs WHERE id = ?", "INSERT INTO events", "INSERT INTO jobs",
            "INSERT INTO job_counts", "COMMIT")


def least_python_enqueue_rate(ctx: Context, n: int) -> float:
    """Calls/s of ``Queue.enqueue("true")``'s work with the least Python a queue needs for
    it, written by hand: the command checked (text that is UTF-8), under the same locks the
    seq read and the id made of it, checked free, the ``enqueued`` event made with the
    store's defaults and encoded (``events.encode``), and the three writes bound, each
    durable on return. The statements are ``Queue.enqueue``'s own, recorded from one call
    on the same store (its second: the first reads the settings too); what the calls leave must replay exactly (``ledger.check``).
    Timed once the store's WAL has wrapped (``until_wal_wraps``), as ``Queue.enqueue``."""
    from queuectl import decisions, ledger, settings
    from queuectl import events as ev
    from queuectl.api import Queue

    with ctx.fresh_target("api") as db:
        with Queue(db) as queue:
            queue.enqueue("true")  # the first call of a Queue reads the settings too
            with trace.recording(queue._db) as steps:
                queue.enqueue("true")
        sql = [text for _, text, _ in steps.steps]
        if len(sql) != len(_ENQUEUE) or not all(map(str.startswith, sql, _ENQUEUE)):
            raise trace.Unfit(f"least_python_enqueue: Queue.enqueue's statements changed: "
                              f"{sql}")
        head, taken, insert_event, insert_job, count = sql[1:-1]
        conn = ledger.connect(db)
        try:
            defaults = decisions._defaults(settings.load(conn))  # read once, as the API does
            by = actor.current()
            execute, encode, now = conn.execute, ev.encode, clock.now

            def enqueue(command: str) -> str:
                command.encode("utf-8")  # text that is UTF-8, as every command is checked
                with conn.transaction():
                    (last,) = execute(head).fetchone()
                    seq = int(last) + 1
                    job_id = str(seq)
                    if execute(taken, (job_id,)).fetchone() is not None:
                        raise RuntimeError("least_python_enqueue: a user chose that id")
                    at = now()
                    event = ev.Enqueued(
                        by=by, job_id=job_id, command=command,
                        max_retries=defaults["max_retries"],
                        backoff_base=defaults["backoff_base"], timeout=defaults["timeout"],
                        backoff_max=defaults["backoff_max"],
                        backoff_jitter=defaults["backoff_jitter"])
                    execute(insert_event, (at, "enqueued", job_id, None, encode(event)))
                    execute(insert_job, (seq, job_id, command, "default", "pending", 0,
                                         event.max_retries, event.backoff_base,
                                         event.backoff_max, event.backoff_jitter,
                                         event.timeout, at, None, at, at, None, None, None))
                    execute(count, ("default", "pending", 1))
                return job_id

            warm = until_wal_wraps(lambda: enqueue("true"), db)
            start = time.perf_counter()
            for _ in range(n):
                enqueue("true")
            seconds = time.perf_counter() - start
            problems = ledger.check(conn)
        finally:
            conn.close()
        pending = job_counts(db).get("pending")
        if pending != 2 + warm + n or problems:
            raise RuntimeError(f"least_python_enqueue: {pending} pending, expected "
                               f"{2 + warm + n}; {problems[:3]}")
    return n / seconds


def pgbench_script(steps: trace.Trace) -> tuple[str, dict[str, str], int]:
    """A pgbench script of the second of two recorded ``Queue.enqueue`` calls on PostgreSQL:
    its statements as the store prepared them, in one pipeline; the values that follow the
    call's seq (the seq itself, and the job's id, which is made of it) the variable ``s``,
    which the script steps; every other value as recorded (a variable given with ``-D``, so
    the statement keeps its parameters), NULL as such. Returns the script, the variables
    to give and the recorded call's seq. ``trace.Unfit`` where the two calls recorded are
    not one round trip each of prepared statements, a seq apart."""
    texts = {}
    for text in steps.prepared:
        name, _, body = text.partition(" AS ")
        texts[name.split()[-1].encode()] = body
    if len(steps.steps) != 2:  # two calls recorded, each one round trip
        raise trace.Unfit(f"pgbench_script: two calls took {len(steps.steps)} round trips")
    before, last = steps.steps
    if len(before) != len(last) or any(c.name not in texts for c in (*before, *last)):
        raise trace.Unfit("pgbench_script: a call sent what it had not prepared")

    def seq_of(trip: list[Any]) -> int:
        for command in trip:
            if texts[command.name].startswith("UPDATE queuectl_head SET seq = seq +"):
                return int(command.values[1])  # the head the call expects to leave
        raise trace.Unfit("pgbench_script: a call without the head's guessed update")

    seq = seq_of(last)
    if seq_of(before) != seq - 1:
        raise trace.Unfit("pgbench_script: the last two calls are not a seq apart")
    given: dict[str, str] = {}
    lines = [r"\set s :s + 1", r"\startpipeline"]
    for was, command in zip(before, last, strict=True):
        lines.append(re.sub(r"\$(\d+)", _parameter(was.values, command.values, seq, given),
                            texts[command.name]) + ";")
    return "\n".join([*lines, r"\endpipeline", ""]), given, seq


def _parameter(was: list[Any], values: list[Any], seq: int, given: dict[str, str]
               ) -> Callable[[re.Match[str]], str]:
    """What ``$k`` of a statement becomes in ``pgbench_script``: NULL; ``:s`` where its value
    is the call's seq and was the call before's; else a variable of its own, given as
    recorded (added to ``given``)."""
    def parameter(match: re.Match[str]) -> str:
        k = int(match[1]) - 1
        if values[k] is None:
            return "NULL"
        if values[k] == str(seq).encode() and was[k] == str(seq - 1).encode():
            return ":s"
        name = f"v{len(given) + 1}"
        given[name] = bytes(values[k]).decode()
        return f":{name}"

    return parameter


def pgbench_rate(ctx: Context, url: str, script: str, given: dict[str, str], n: int) -> float:
    """Transactions/s of ``script`` run ``n`` times by pgbench (its prepared statements, one
    connection, each commit durable) on ``url``."""
    path = ctx.tmp / f"pgbench-{time.monotonic_ns()}.sql"
    path.write_text(script)
    cmd = [shutil.which("pgbench") or "pgbench", "-n", "-M", "prepared", "-t", str(n),
           "-f", str(path), *(f"-D{name}={value}" for name, value in given.items()), url]
    env = {**os.environ, "PGOPTIONS": "-c synchronous_commit=on"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=max(120.0, n / 5))
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: ([0-9]+)", done.stdout)
    if done.returncode or found is None or (failed and int(failed[1])):
        raise RuntimeError(f"pgbench failed: {(done.stderr or done.stdout)[-500:]}")
    return float(found[1])


def pgbench_enqueue_rates(ctx: Context, n: int) -> tuple[float, float]:
    """On PostgreSQL, with no Python anywhere: calls/s of ``Queue.enqueue``'s statements sent
    by pgbench, a client in C (``pgbench_script``: one call's round trip, recorded, with
    the next seq each time), and of a bare durable one-row INSERT sent by it on the same
    server. What the statements leave is checked: one more pending job a call."""
    from queuectl.api import Queue

    if shutil.which("pgbench") is None:
        raise trace.Unfit("pgbench is not installed")
    with ctx.fresh_target("api") as url:
        with Queue(url) as queue:
            for _ in range(20):  # the settings read, the guesses warm: the steady shape
                queue.enqueue("true")
            with trace.recording(queue._db) as steps:
                queue.enqueue("true")
                queue.enqueue("true")
        script, given, seq = pgbench_script(steps)
        statements = pgbench_rate(ctx, url, script, {"s": str(seq), **given}, n)
        pending = job_counts(url).get("pending")
        if pending != 22 + n:
            raise RuntimeError(f"pgbench's enqueues left {pending} pending, expected {22 + n}")
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x bigint)")
        bare = pgbench_rate(ctx, url, "\\set s :s + 1\nINSERT INTO t VALUES (:s);\n",
                            {"s": "0"}, n)
    return statements, bare


def durable_commit_rate(ctx: Context, n: int) -> float:
    """Commits/s of a one-row INSERT, each durable when it returns, on this run's store: what
    any queue that promises that pays, whatever its own work (SQLite: WAL, synchronous=FULL,
    as queuectl's and huey's; PostgreSQL: synchronous_commit=on), timed once the WAL has
    wrapped (``until_wal_wraps``)."""
    if ctx.backend == "postgres":
        with ctx.fresh_pg() as url:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (x int)")
                start = time.perf_counter()
                for i in range(n):
                    conn.execute("INSERT INTO t VALUES (%s)", (i,))
                return n / (time.perf_counter() - start)
    with ctx.fresh_db("commit-floor") as path:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("CREATE TABLE t (x INTEGER)")
            until_wal_wraps(lambda: conn.execute("INSERT INTO t VALUES (0)"), path)
            start = time.perf_counter()
            for i in range(n):
                conn.execute("INSERT INTO t VALUES (?)", (i,))
            return n / (time.perf_counter() - start)
        finally:
            conn.close()


def bench_api(ctx: Context, result: ScenarioResult) -> list[Row]:
    """``from queuectl import Queue``: one job a call, each durable when it returns, against
    huey's task enqueue on SqliteHuey and the store's bare durable commit, run in turn."""
    n = ctx.sizes.worker_jobs
    have_huey = importlib.util.find_spec("huey") is not None
    mine, peer, floor, alone = [], [], [], []
    least: list[float] = []  # the same calls with the least Python they need (SQLite)
    in_c: list[float] = []  # their statements sent by pgbench, no Python (PostgreSQL)
    bare_in_c: list[float] = []  # the bare commit sent by pgbench
    mine_cpu, alone_cpu = [], []  # this process's CPU a call, microseconds
    on_pg = ctx.backend == "postgres"
    by_hand, with_pgbench = not on_pg, on_pg
    for r in range(ctx.runs):
        if have_huey:
            peer.append(huey_enqueue_rate(ctx, n))
        rate, cpu = api_enqueue_rate(ctx, n)
        mine.append(rate)
        mine_cpu.append(cpu)
        floor.append(durable_commit_rate(ctx, n))
        rate, cpu = api_statements_rate(ctx, n)
        alone.append(rate)
        alone_cpu.append(cpu)
        if by_hand:
            by_hand = trace.by_hand(ctx, "api", lambda: least_python_enqueue_rate(ctx, n), least)
        if with_pgbench:
            pairs: list[tuple[float, float]] = []
            with_pgbench = trace.by_hand(ctx, "api", lambda: pgbench_enqueue_rates(ctx, n),
                                         pairs)
            for statements, bare in pairs:
                in_c.append(statements)
                bare_in_c.append(bare)
        ctx.log(f"api run {r + 1}/{ctx.runs}: Queue.enqueue {mine[-1]:,.0f}/s, durable "
                f"one-row commit {floor[-1]:,.0f}/s, its statements alone {alone[-1]:,.0f}/s"
                + (f", with the least Python {least[-1]:,.0f}/s" if least else "")
                + (f", sent by pgbench {in_c[-1]:,.0f}/s (its bare commit {bare_in_c[-1]:,.0f}/s)"
                   if in_c else "")
                + (f", huey task enqueue {peer[-1]:,.0f}/s" if have_huey else ""))
    figure = f"`Queue.enqueue`, one job a call, each durable, {n:,} calls"
    # huey has no PostgreSQL store: there its SqliteHuey is a figure beside ours, not a bar.
    target = None if on_pg else Target(">= 1.0 x huey", "ratio", ">=", 1.0)
    if have_huey:
        first = make_row("api", "api_enqueue_vs_huey", figure, mine, "jobs/s", target,
                         baseline_samples=peer, baseline_label="huey task() on SqliteHuey",
                         note="huey on SQLite; not a target on PostgreSQL" if on_pg else "",
                         # on SQLite, the tighter ceiling: the calls with the least Python
                         ceiling_samples=least or alone,
                         ceiling_label="calls written by hand" if least else "statements alone",
                         ceiling_means=LEAST_PYTHON if least else NO_PYTHON)
    else:
        first = make_row("api", "api_enqueue_vs_huey", figure, mine, "jobs/s", None,
                         note="n/a (pip install .[bench])")
        first.status, first.baseline_label = "n/a", "huey not installed"
        first.target = target.text if target else ""
    result.details["huey"] = have_huey
    floor_target = (Target(">= 0.7 x bare commit", "ratio", ">=", 0.7) if on_pg
                    else Target(">= 0.85 x bare commit", "ratio", ">=", 0.85))
    rows = [first, make_row(
        "api", "api_enqueue_vs_commit", "the same against a bare one-row durable commit", mine,
        "jobs/s", floor_target, baseline_samples=floor,
        baseline_label="one-row INSERT, durable commit, same store",
        note="the bound: every durable enqueue pays at least one such commit",
        # on PostgreSQL, where pgbench is at hand, the statements from a client in C
        ceiling_samples=in_c or alone,
        ceiling_label="statements alone, sent by pgbench" if in_c else "statements alone"),
        make_row(
        "api", "api_statements_vs_commit", "the same calls' statements alone, recorded and "
        "replayed on a copy of the store", alone, "jobs/s", None, baseline_samples=floor,
        baseline_label="one-row INSERT, durable commit, same store",
        note="no queuectl Python between the statements: the ceiling of `Queue.enqueue` on "
             "this schema (tools/bench/trace.py)")]
    if in_c:
        rows.append(make_row(
            "api", "api_statements_pgbench", "the same calls' statements sent by pgbench, a "
            "client in C: no Python anywhere", in_c, "jobs/s", None, baseline_samples=bare_in_c,
            baseline_label="one-row INSERT, durable commit, sent by pgbench",
            note="the server's own work for the calls against its work for a bare commit "
                 "(pgbench_enqueue_rates in tools/bench/scenarios/api.py)"))
    if least:
        rows.append(make_row(
            "api", "api_enqueue_least_python", "the same calls with the least Python they "
            "need, written by hand", least, "jobs/s", None, baseline_samples=mine,
            baseline_label="`Queue.enqueue` itself",
            note="the same statements, locks and encoded event, with no API, decision, ledger "
                 "or projection code between them (least_python_enqueue_rate in "
                 "tools/bench/scenarios/api.py); what they leave replays exactly"))
    return [*rows, make_row(
        "api", "api_enqueue_cpu", "CPU of the calling process a `Queue.enqueue` call"
        + (" (the client's: the server's is apart)" if on_pg else ""), mine_cpu, "us", None,
        baseline_samples=alone_cpu, baseline_label="the same statements alone, replayed",
        note="what queuectl's Python adds to the statements it sends")]
