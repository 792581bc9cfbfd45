"""The worker's side of the queue: claim a job, record its result (and claim the next),
heartbeat, and take back the jobs of workers that fell silent.

Each write is one transaction; the claim reads the best eligible job and appends ``claimed``
in the same one, so two workers never hold the same job.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import msgspec

from projections.jobs import (
    CLAIMABLE_SQL,
    INDEXED_STATES,
    JOBS_READY,
    JOBS_RUN_AT,
    JOBS_STATE,
    TIMED_SQL,
    ready_of,
)
from queuectl import actor, clock, hooks, limits
from queuectl import events as ev
from queuectl.cascade import (
    cancel_dependents,
    cancel_now,
    cancelled_after_run,
    made_id,
    unblocked_by,
)
from queuectl.errors import Conflict
from queuectl.ledger import append, next_seq, write
from queuectl.states import UNFINISHED, State, WorkerState, any_of
from queuectl.store import Db, Dialect


class Claim(msgspec.Struct, frozen=True):
    """A job a worker now holds, with everything it needs to run it and judge the result."""

    job_id: str
    command: str
    attempt: int
    max_retries: int
    backoff_base: float
    timeout: float
    backoff_max: float = 0.0
    backoff_jitter: float = 0.0
    cwd: str | None = None  # where it runs; None: the worker's directory
    env: str | None = None  # its variables, a JSON object (the ``env`` column)
    limits: str | None = None  # its resource limits, a JSON object (the ``limits`` column)


_CLAIM_FIELDS = "id, command, attempts, max_retries, backoff_base, timeout, backoff_max, " \
    "backoff_jitter, cwd, env, limits"


def worker_started(
    conn: Db, pid: int, host: str, *, worker_id: str | None = None
) -> str:
    """Record a worker's start; returns its id: ``w`` and its ``worker-started`` seq
    unless one is given, and checked against the workers table in the same transaction,
    as job ids are."""
    with write(conn):
        def taken(candidate: str) -> bool:
            found = conn.execute("SELECT 1 FROM workers WHERE id = ?", (candidate,))
            return found.fetchone() is not None

        if worker_id is None:
            worker_id = made_id(next_seq(conn), taken, "w")
        elif taken(worker_id):
            raise Conflict(f"Worker with ID '{worker_id}' already exists")
        append(conn, ev.WorkerStarted(worker_id=worker_id, pid=pid, host=host, by=worker_id))
    return worker_id


def worker_stopped(conn: Db, worker_id: str, reason: str) -> None:
    with write(conn):
        append(conn, ev.WorkerStopped(worker_id=worker_id, reason=reason, by=worker_id))


def heartbeat(conn: Db, worker_id: str) -> float:
    """Renew the worker's lease; returns the monotonic time just before the commit, which
    no rescuer can have seen the renewal before (``queuectl.fence`` counts from it)."""
    with write(conn):
        append(conn, ev.WorkerHeartbeat(worker_id=worker_id, by=worker_id))
        before_commit = time.monotonic()
    return before_commit


def worker_state(conn: Db, worker_id: str) -> tuple[str, bool]:
    """The worker's projected state and whether a stop was requested since it started."""
    row = conn.execute(
        "SELECT state, stop_requested FROM workers WHERE id = ?", (worker_id,)
    ).fetchone()
    return (row[0], bool(row[1])) if row else ("unknown", False)


Queues = Sequence[str] | None  # a worker's queues in the order it takes them; None: all


def claim(conn: Db, worker_id: str, queues: Queues = None) -> Claim | None:
    """Take the best eligible job (highest priority, then oldest; of the first of
    ``queues`` that has one, when given), in one write transaction; None when there is none.

    A lock-free peek comes first, so idle workers never queue up for the write lock.
    """
    sql, params = _ready_query(conn.now(), 1, queues)
    if conn.execute(conn.dialect.sql(sql), params).fetchone() is None:
        return None
    return finish_and_claim_many(conn, [], [worker_id], queues=queues)[1][0]


def _in(queues: Queues) -> tuple[str, list[str]]:
    """`` AND queue IN (...)`` for a worker's queues, and its values ("" for all queues)."""
    if not queues:
        return "", []
    return f" AND queue IN ({', '.join('?' * len(queues))})", list(queues)


_PAUSED = "SELECT name FROM queues WHERE paused != 0"


def next_run_at(conn: Db, queues: Queues = None) -> str | None:
    """When the earliest scheduled or failed job becomes eligible (None when none waits);
    pending jobs are eligible already, and a paused queue's never are."""
    where, params = _in(queues)
    return conn.execute(conn.dialect.sql(
        f"""SELECT min(run_at) FROM jobs {JOBS_RUN_AT} WHERE {TIMED_SQL}{where}
        AND queue NOT IN ({_PAUSED})"""), params).fetchone()[0]


def unfinished(conn: Db, queues: Queues = None) -> int:
    """Jobs pending, processing or waiting to retry: what ``--burst`` waits for.

    Scheduled jobs and jobs waiting on dependencies are not counted: their time may be far
    off, and a dead dependency may hold a job forever; nor are the jobs of a paused queue
    that are not running.
    """
    where, params = _in(queues)
    (n,) = conn.execute(
        f"""SELECT coalesce(sum(n), 0) FROM job_counts WHERE ({any_of(*UNFINISHED)}){where}
        AND (state = '{State.PROCESSING}' OR queue NOT IN ({_PAUSED}))""",
        params).fetchone()
    return int(n)


def retry_or_dead(job: Claim, at: str, reason: str) -> ev.Event:
    """The retry rule: after its k-th failed run a job waits ``backoff_base ** k`` seconds,
    unless it has used all ``1 + max_retries`` runs, in which case it is dead."""
    k = job.attempt
    if k >= 1 + job.max_retries:
        return ev.Dead(job_id=job.job_id, attempts=k, reason=reason)
    delay = limits.backoff_delay(job.backoff_base, k)
    if job.backoff_max:
        delay = min(delay, job.backoff_max)
    if job.backoff_jitter:
        import random  # only jittered retries pay for the import

        # Decided here and recorded in the event: replay never draws a random number.
        delay = round(delay * (1 - job.backoff_jitter * random.random()), 3)
    return ev.ScheduledRetry(
        job_id=job.job_id, attempt=k, delay=delay, run_at=clock.after(at, delay)
    )


def finish(conn: Db, job: Claim, result: ev.Event) -> list[ev.Event]:
    """Record the outcome of a run (completed, failed, timed-out, cancelled or released).

    If the worker no longer holds the job (its lease expired and another worker took it
    back), nothing is written: the job already went through the retry rule.
    """
    return finish_and_claim(conn, job, result, None)[0]


def finish_and_claim(
    conn: Db, job: Claim, result: ev.Event, worker_id: str | None, queues: Queues = None
) -> tuple[list[ev.Event], Claim | None]:
    """``finish``, then (when ``worker_id`` is given) claim that worker's next job in the
    same transaction: one commit per job instead of two on a busy queue."""
    outcomes, following = finish_and_claim_many(conn, [(job, result)],
                                                [worker_id] if worker_id else [],
                                                queues=queues)
    return outcomes[0], following[0] if following else None


# What a result can give that other claims may take at once: a dependent unblocked, a run
# released, a retry due now (a zero delay). The claims look again after any of them.
_FREES = (ev.Unblocked, ev.Released, ev.ScheduledRetry)


def _frees(outcomes: list[list[ev.Event]]) -> bool:
    """Whether any result gave an event in ``_FREES``."""
    for outcome in outcomes:
        for event in outcome:
            if isinstance(event, _FREES):
                return True
    return False


def finish_and_claim_many(
    conn: Db, finished: Sequence[tuple[Claim, ev.Event]], claimers: Sequence[str],
    ahead: bool = False, queues: Queues = None,
) -> tuple[list[list[ev.Event]], list[Claim | None]]:
    """Record the outcome of several runs, then claim a job for each of ``claimers`` (a
    worker named twice is given two, one held ahead of the other), all in
    one write transaction: the workers of a process whose results arrive together share
    one commit. Returns the events each result gave, and each claimer's job (or None).

    The rules are those of one result at a time, applied in order: a result counts only
    while its worker still holds the job (a worker whose lease was taken back is not
    heard); a job that ran its last allowed run is dead; what one result changes (a
    dependent unblocked) is seen by the next, and by the claims. A claimer lost or asked
    to stop gets nothing. Everything the transaction needs to know is read in one query,
    with the jobs the claims would take; only results that free jobs to run (a dependent
    unblocked, a run released, a retry due at once) make the claims look again.

    A ``started`` given as a result is a worker's ask to start a job held ahead: see
    ``_start`` for what the store answers.

    ``ahead``: the jobs are claimed to run after their workers' current ones; each is
    started only once the store says so. No job of a limited queue is claimed ahead: held,
    it could not start while its queue is full, and other workers could not take it.
    ``queues``: the claimers take jobs only of these queues, all of the first before any of
    the second (None: of every queue).
    """
    with write(conn):
        at = conn.now()
        starters = [result.worker_id for _, result in finished
                    if type(result) is ev.Started]
        known = _known(conn, [job.job_id for job, _ in finished], claimers, at, queues,
                       starters)
        # Events wait here and go in one append (one statement per table on PostgreSQL),
        # until a rule must read what the events before it changed.
        held_back: list[ev.Event] = []

        def settled() -> None:
            if held_back:
                append(conn, *held_back, at=at)
                held_back.clear()

        outcomes = [_outcome(conn, job, result, known, at, held_back, settled)
                    for job, result in finished]
        if known.hooks and any(outcomes):
            settled()  # hook jobs go in after what fired them, in the same transaction
            hooks.fire(conn, [e for outcome in outcomes for e in outcome], at)
        if known.queues and any(r.limit for r in known.queues.values()) and any(outcomes):
            conn.wake()  # a run that ended may leave a place under its queue's limit
        refused = known.refused
        able = [w for w in claimers if w not in refused] if refused else claimers
        ready = known.ready
        if able and known.queues:  # a queue paused or limited: claims keep to its rules
            settled()
            ready = _ready_within(conn, at, len(able), queues, known.queues, ahead)
        elif able and _frees(outcomes):
            settled()
            sql, params = _ready_query(at, len(able), queues)
            ready = _best(conn.execute(conn.dialect.sql(sql), params).fetchall())
        following: list[Claim | None] = [None] * len(claimers)
        slots = [n for n, w in enumerate(claimers) if w not in refused] if refused else \
            range(len(claimers))
        for n, row in zip(slots, ready, strict=False):
            job_id, command, attempt, *policy = row[:-2]
            attempt += 1  # the run this claim starts
            following[n] = Claim(job_id, command, attempt, *policy)
            rated = not ahead and row[-1] in known.queues and known.queues[row[-1]].rate.n
            held_back.append(ev.Claimed(job_id=job_id, worker_id=claimers[n],
                                        attempt=attempt, eligible_at=row[-2],
                                        ahead=ahead, queue=row[-1], by=claimers[n],
                                        rate_queue=row[-1] if rated else ""))
        settled()
    return outcomes, following


class _Held(msgspec.Struct):
    """A job whose result or start is being recorded, as the store has it now."""

    state: str
    worker_id: str | None
    attempts: int
    cancel_requested: bool
    has_dependents: bool
    ahead: bool  # claimed ahead and not started
    queue: str


class _Rules(msgspec.Struct):
    """What a queue paused or limited holds its claims and starts to."""

    paused: bool
    limit: int  # jobs of it running at once; 0: no limit
    rate: limits.Rate  # starts of it in any period; NO_RATE: none


class _Known(msgspec.Struct):
    held: dict[str, _Held]
    refused: set[str]  # workers declared lost or stopped, or asked to stop
    ready: list[tuple[Any, ...]]  # the jobs the claims would take, best first (``_best`` rows)
    queues: dict[str, _Rules]  # queues paused or limited
    hooks: bool = False  # some hook exists: results must be shown to ``hooks.fire``


# One query, four kinds of rows in the same columns (kind, id, then what each kind has,
# then a queue): the best eligible jobs (their priority and seq kept to sort them, since a
# UNION keeps no order), the jobs whose results or starts are recorded, the workers that may
# not claim or start, and the queues whose rules a claim or start must keep.
def _known_jobs(n: int) -> str:
    return f"""SELECT 'j', id, state, worker_id, attempts, cancel_requested,
    CASE WHEN EXISTS (SELECT 1 FROM job_deps WHERE depends_on = jobs.id) THEN 1 ELSE 0 END,
    ahead, NULL, NULL, NULL, NULL, queue, NULL, NULL, NULL FROM jobs WHERE id IN ({_marks(n)})"""


def _known_refused(n: int) -> str:
    return f"""SELECT 'w', id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL FROM workers WHERE id IN ({_marks(n)})
    AND (state != '{WorkerState.ACTIVE}' OR stop_requested != 0)"""


def _marks(n: int) -> str:
    return ", ".join("?" * n)
# Usually none: a read of an empty table.
_KNOWN_QUEUES = """SELECT 'q', name, NULL, NULL, paused, job_limit, rate, period, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL FROM queues WHERE paused != 0 OR job_limit > 0 OR rate > 0"""
# One row when any hook exists (usually none: a look at an empty table).
_KNOWN_HOOKS = """SELECT 'h', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL WHERE EXISTS (SELECT 1 FROM hooks)"""
# The best eligible jobs, of every queue or of one (kind 'r<n>': the n-th of a worker's queues).
_KNOWN_READY = f"""SELECT 'r', id, command, run_at, attempts, max_retries, priority, seq,
    backoff_base, timeout, backoff_max, backoff_jitter, queue, cwd, env, limits FROM (SELECT *
    FROM jobs {JOBS_READY} WHERE {CLAIMABLE_SQL} AND run_at <= ?
    ORDER BY priority DESC, seq LIMIT ?)
    AS best"""


def _ready_in(position: int, queue: str) -> str:
    """``_KNOWN_READY`` for the ``position``-th of a worker's queues (kind ``r<position>``)."""
    index, where = ready_of(queue)
    return (f"SELECT 'r{position}', id, command, run_at, attempts, max_retries, priority, seq, "
            "backoff_base, timeout, backoff_max, backoff_jitter, queue, cwd, env, limits "
            "FROM (SELECT * FROM jobs "
            f"{index} WHERE {where} AND run_at <= ? ORDER BY priority DESC, seq LIMIT ?) "
            f"AS best{position}")


def _ready_query(at: str, n: int, queues: Queues) -> tuple[str, list[Any]]:
    """The query of the ``n`` best eligible jobs for a worker of ``queues`` (its rows, of
    ``_KNOWN_READY``'s columns, sorted by ``_best``)."""
    if not queues:
        return _KNOWN_READY, [at, n]
    parts = [_ready_in(i, queue) for i, queue in enumerate(queues)]
    return " UNION ALL ".join(parts), [v for q in queues for v in (q, at, n)]


def _best(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Ready rows of ``_ready_query``, best first, as ``Claim`` fields, the job's run_at and
    its queue."""
    best = []
    if len(rows) == 1:  # one claim, as a worker's: nothing to sort
        kind, id_, command, run_at, attempts, retries, priority, seq, *rest = rows[0]
        return [(id_, command, attempts, retries, *rest[:4], *rest[5:8], run_at, rest[4])]
    for kind, id_, command, run_at, attempts, retries, priority, seq, *rest in rows:
        policy = rest[:4]  # backoff_base, timeout, backoff_max, backoff_jitter; then queue
        position = int(kind[1:] or 0)  # a UNION keeps no order: each row says where it sorts
        best.append(((position, -priority, seq),
                     (id_, command, attempts, retries, *policy, *rest[5:8], run_at, rest[4])))
    return [claim for _, claim in sorted(best)]


def _ready_open(closed: str) -> str:
    """The best eligible jobs of every queue but some (for _ready_within): ``closed`` is
    the condition that leaves those out."""
    return (f"SELECT 'r', id, command, run_at, attempts, max_retries, priority, seq, "
            f"backoff_base, timeout, backoff_max, backoff_jitter, queue, cwd, env, limits "
            f"FROM jobs {JOBS_READY} "
            f"WHERE {CLAIMABLE_SQL} AND run_at <= ?{closed} ORDER BY priority DESC, seq LIMIT ?")


def running(conn: Db, queues: Collection[str]) -> dict[str, int]:
    """How many jobs of each of ``queues`` run now: those processing, less those held
    ahead of their workers' current jobs, which have not started."""
    if not queues:
        return {}
    marks = ", ".join("?" * len(queues))
    found = conn.execute(conn.dialect.sql(
        f"SELECT queue, count(*) FROM jobs {JOBS_STATE} WHERE state = '{State.PROCESSING}' "
        f"AND {INDEXED_STATES} AND ahead = 0 AND queue IN ({marks}) GROUP BY queue"),
        list(queues)).fetchall()
    return {queue: int(n) for queue, n in found}


_OPEN = _Rules(False, 0, limits.NO_RATE)
# How many of a queue's starts, at most its rate, came later than a time; and the earliest.
_RECENT = "SELECT count(*), min(at) FROM queue_starts WHERE queue = ? AND at > ?"


def rate_room(conn: Db, queue: str, rate: limits.Rate, at: str) -> tuple[int, str | None]:
    """How many more jobs of ``queue`` may start at ``at`` under its ``rate``, and when one
    more may (None: now). Any window of the period that holds ``at`` lies after ``at`` less
    the period, so the starts recorded after that are all that count, wherever they fall:
    one taken later by a transaction that began earlier counts too."""
    recent, earliest = conn.execute(
        _RECENT, (queue, clock.after(at, -rate.period))).fetchone()
    left = max(0, rate.n - int(recent))
    return left, None if left else clock.after(earliest, rate.period)


def next_start_at(conn: Db, queues: Queues = None) -> str | None:
    """When the next job of a queue held back by its rate may start (None: none is):
    a worker waits until then, since no event says so."""
    rated = [row for row in conn.execute(
        "SELECT name, rate, period FROM queues WHERE rate > 0 AND paused = 0").fetchall()
        if not queues or row[0] in queues]
    if not rated:
        return None
    at = conn.now()
    frees = [rate_room(conn, name, limits.Rate(int(n), int(period)), at)[1]
             for name, n, period in rated]
    return min((f for f in frees if f is not None), default=None)


def _ready_within(conn: Db, at: str, n: int, queues: Queues,
                  rules: dict[str, _Rules], ahead: bool = False
                  ) -> list[tuple[Any, ...]]:
    """The ``n`` best eligible jobs for a worker of ``queues`` that keep every queue's
    rules: none of a paused queue, and no more of a limited one than its limit leaves room
    for beside the jobs of it running now, and its rate beside its starts in the period up
    to ``at`` (none at all when claimed ``ahead``). Exact, since claims are written one
    transaction at a time (the ledger's lock), and this one's results are in already."""
    closed = {q for q, r in rules.items() if r.paused}
    limited = {q: r.limit for q, r in rules.items() if r.limit and not r.paused}
    rated = {q: r.rate for q, r in rules.items()
             if r.rate.n and not r.paused and (not queues or q in queues)}
    room: dict[str, int] = {}
    if ahead:
        closed |= set(limited) | set(rated)
    else:
        if limited:
            now_running = running(conn, limited)
            room = {q: max(0, limit - now_running.get(q, 0)) for q, limit in limited.items()}
        for q, rate in rated.items():
            room[q] = min(room.get(q, n), rate_room(conn, q, rate, at)[0])
        closed |= {q for q, left in room.items() if left == 0}
    taken: list[tuple[Any, ...]] = []
    if queues:  # each queue in turn, as many of it as there is room for
        for queue in queues:
            want = min(n - len(taken), room.get(queue, n))
            if queue in closed or want <= 0:
                continue
            sql, params = _ready_query(at, want, [queue])
            taken += _best(conn.execute(conn.dialect.sql(sql), params).fetchall())
        return taken[:n]
    # Every queue by priority: walk past the closed ones; a limited queue that fills up
    # on the way is closed, and the walk goes on from there.
    while len(taken) < n:
        skip = [q for q in closed]
        ids = [row[0] for row in taken]
        where = "".join([f" AND queue NOT IN ({', '.join('?' * len(skip))})"] * bool(skip)
                        + [f" AND id NOT IN ({', '.join('?' * len(ids))})"] * bool(ids))
        found = conn.execute(conn.dialect.sql(_ready_open(where)),
                             [at, *skip, *ids, n - len(taken)]).fetchall()
        filled = False
        for row in found:
            queue = row[12]
            if queue in closed:
                filled = True  # it filled up on this walk: the rows after it may be others'
                continue
            taken += _best([row])
            if queue in room:
                room[queue] -= 1
                if room[queue] == 0:
                    closed.add(queue)
        if not filled:
            break
    return taken


@functools.lru_cache(maxsize=256)
def _known_sql(dialect: Dialect, claimers: int, queues: tuple[str, ...], jobs: int,
               workers: int) -> str:
    """The query of ``_known``, made once for each shape of the question (a worker's
    results and claims are of the same shape, job after job)."""
    parts: list[str] = []
    if claimers:  # first: its typed columns give the NULLs of the others a type
        parts.append(_ready_query("", claimers, queues)[0])
    if jobs:  # before the workers' rows, whose columns are all NULL, for the same reason
        parts.append(_known_jobs(jobs))
    if workers:
        parts.append(_known_refused(workers))
    parts.append(_KNOWN_QUEUES)
    if jobs:
        parts.append(_KNOWN_HOOKS)
    return dialect.sql(" UNION ALL ".join(parts))


def _known(conn: Db, job_ids: Sequence[str], claimers: Sequence[str], at: str,
           queues: Queues = None, starters: Sequence[str] = ()) -> _Known:
    # Each id once: a statement of fewer shapes, which the server plans fewer times.
    jobs = list(job_ids) if len(job_ids) < 2 else list(dict.fromkeys(job_ids))
    workers = list(claimers) if not starters and len(claimers) < 2 else \
        list(dict.fromkeys([*claimers, *starters]))
    known = _Known(held={}, refused=set(), ready=[], queues={})
    if not (claimers or jobs or workers):
        return known
    params: list[Any] = []
    if claimers:
        params += _ready_query(at, len(claimers), queues)[1]
    sql = _known_sql(conn.dialect, len(claimers), tuple(queues or ()), len(jobs), len(workers))
    ready: list[Any] = []
    for row in conn.execute(sql, [*params, *jobs, *workers]).fetchall():
        if row[0] == "j":
            known.held[row[1]] = _Held(row[2], row[3], row[4], bool(row[5]), bool(row[6]),
                                       bool(row[7]), row[12])
        elif row[0] == "w":
            known.refused.add(row[1])
        elif row[0] == "q":
            known.queues[row[1]] = _Rules(bool(row[4]), int(row[5]),
                                          limits.rate_of(int(row[6]), int(row[7])))
        elif row[0] == "h":
            known.hooks = True
        else:
            ready.append(row)
    known.ready = _best(ready)
    return known


# The results the retry rule judges; and those with a released run, which a cancel overrides.
_RETRIED = (ev.Failed, ev.TimedOut, ev.Fenced)
_RETRIED_OR_RELEASED = (*_RETRIED, ev.Released)


def _outcome(conn: Db, job: Claim, result: ev.Event, known: _Known, at: str,
             held_back: list[ev.Event], settled: Callable[[], None]) -> list[ev.Event]:
    """The events one run's result gives (added to ``held_back``, which ``settled()``
    appends before any rule reads the tables), or none if its worker no longer holds the
    job."""
    held = known.held.get(job.job_id)
    if held is None or (held.state, held.worker_id, held.attempts) != (
            State.PROCESSING, getattr(result, "worker_id", None), job.attempt):
        if isinstance(result, ev.Fenced):  # recorded all the same, as changing nothing
            late = msgspec.structs.replace(result, rescued=True, by=result.worker_id)
            held_back.append(late)
            return [late]
        return []
    if isinstance(result, ev.Started):
        return _start(conn, job, result, held, known, at, held_back, settled)
    events: list[ev.Event] = [result]
    if held.cancel_requested and isinstance(result, _RETRIED_OR_RELEASED):
        # Cancelled while it ran, but the run ended before its worker saw that:
        # the cancel still wins over a retry.
        settled()
        events += cancelled_after_run(conn, job.job_id)
    elif isinstance(result, _RETRIED):
        reason = (result.error if isinstance(result, ev.Failed) else "timed out"
                  if isinstance(result, ev.TimedOut) else "fenced: lease not renewed")
        events.append(retry_or_dead(job, at, reason))
    elif isinstance(result, ev.Completed) and held.has_dependents:
        settled()
        events += unblocked_by(conn, job.job_id)
    elif isinstance(result, ev.Cancelled):
        settled()
        events += cancel_dependents(conn, job.job_id)
    events = actor.stamped(events, held.worker_id or "")  # the worker that ran it
    held_back.extend(events)
    return events


def _start(conn: Db, job: Claim, started: ev.Started, held: _Held, known: _Known, at: str,
           held_back: list[ev.Event], settled: Callable[[], None]) -> list[ev.Event]:
    """What the store answers a worker that asks to start a job it holds ahead: ``started``
    only if, now, the job is not cancelled, its queue neither paused nor at its limit, and
    the worker not stopping; otherwise the job goes back, no attempt counted (a cancelled
    job is then cancelled). Nothing if the job was started already. The run begins only
    on ``started``."""
    if not held.ahead:
        return []
    rules = known.queues.get(held.queue, _OPEN)
    paused, limit, rate = rules.paused, rules.limit, rules.rate
    reason = None
    if held.cancel_requested:
        reason = "cancelled before it started"
    elif started.worker_id in known.refused:
        reason = "its worker is stopping"
    elif paused:
        reason = f"its queue {held.queue} is paused"
    if reason is None and (limit or rate.n):
        settled()  # the starts before this one in the batch count
        if limit and running(conn, [held.queue]).get(held.queue, 0) >= limit:
            reason = f"its queue {held.queue} is at its limit of {limit} running"
        elif rate.n and rate_room(conn, held.queue, rate, at)[0] == 0:
            reason = f"its queue {held.queue} is at its rate of {rate}"
        elif rate.n:
            started = msgspec.structs.replace(started, rate_queue=held.queue)
    if reason is None:
        events: list[ev.Event] = [started]
    elif held.cancel_requested:
        settled()
        events = cancel_now(conn, job.job_id)
    else:
        events = [_released_ahead(job, started.worker_id, reason)]
    events = actor.stamped(events, started.worker_id)
    held_back.extend(events)
    return events


def _released_ahead(job: Claim, worker_id: str, reason: str) -> ev.Released:
    """A job held ahead goes back to the queue as it was: its attempt is not counted."""
    return ev.Released(job_id=job.job_id, worker_id=worker_id, attempt=job.attempt,
                       reason=reason, ahead=True)


def release_strays(conn: Db, worker_id: str, keep: Collection[str]) -> list[ev.Event]:
    """Release the jobs held under ``worker_id`` that its worker does not know it holds
    (all but those in ``keep``): after a lost connection, a commit that claimed one may have
    succeeded unseen. A released run is not counted as an attempt."""
    with write(conn):
        rows = conn.execute(
            f"""SELECT id, attempts FROM jobs
            WHERE state = '{State.PROCESSING}' AND {INDEXED_STATES} AND worker_id = ?""",
            (worker_id,)).fetchall()
        events: list[ev.Event] = [
            ev.Released(job_id=job_id, worker_id=worker_id, attempt=attempts,
                        reason="claimed while its worker lost the database connection",
                        by=worker_id)
            for job_id, attempts in rows if job_id not in keep]
        if events:
            append(conn, *events)
    return events


def cancel_requested(conn: Db, job_id: str) -> bool:
    row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return bool(row and row[0])


def signals_asked(conn: Db, job_id: str) -> list[tuple[int, int]]:
    """(request seq, signal) of each signal asked for the job's current run and not yet
    handled, oldest first: the worker holding the job delivers them."""
    return conn.execute(
        """SELECT seq, signal FROM signals WHERE job_id = ? AND handled_at IS NULL
        AND run = (SELECT max(seq) FROM runs WHERE job_id = ?) ORDER BY seq""",
        (job_id, job_id)).fetchall()


def signalled(conn: Db, job: Claim, worker_id: str, request: int, sig: int,
              error: str = "") -> None:
    """Record that the worker delivered (``error`` empty) or could not deliver a signal."""
    with write(conn):
        append(conn, ev.Signalled(job_id=job.job_id, worker_id=worker_id, attempt=job.attempt,
                                  request=request, signal=sig, delivered=not error,
                                  error=error, by=worker_id))


class Silence:
    """How long each active worker has been silent, as this process has watched it.

    Silence is time this watcher has itself spent looking, counted on its monotonic clock
    from the moment it saw a worker's ``last_heartbeat`` take its current value, with each
    gap between two looks counted as at most ``longest_gap`` seconds. A step of the wall
    clock (NTP, faketime), a jump of the monotonic clock, or the watcher's own pause (a
    suspended laptop or VM) then counts as one short gap, not as everyone else's silence,
    and hosts with skewed clocks cannot expire each other's jobs. The price: a watcher that
    has just started waits a whole lease before it takes anything back, however old the
    heartbeats it finds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[str, float]] = {}  # worker -> (heartbeat, watched then)
        self._last_look: float | None = None
        self._watched = 0.0  # seconds of looking so far, gaps capped
        self._lock = threading.Lock()  # the worker threads of a process share one

    def silent(self, rows: Iterable[tuple[str, str, str]], lease: float,
               longest_gap: float = math.inf) -> list[tuple[str, str, str]]:
        """Record what ``rows`` (worker id, last heartbeat, host) say; return those whose
        heartbeat has not changed for more than ``lease`` seconds of watching."""
        stale = []
        with self._lock:
            now = self._clock()
            if self._last_look is not None:
                self._watched += min(max(now - self._last_look, 0.0), longest_gap)
            self._last_look = now
            seen = {}
            for worker_id, beat, host in rows:
                value, since = self._seen.get(worker_id, (beat, self._watched))
                since = since if value == beat else self._watched
                seen[worker_id] = (beat, since)
                if self._watched - since > lease:
                    stale.append((worker_id, beat, host))
            self._seen = seen  # workers no longer active are forgotten
        return stale


def silent_workers(conn: Db, lease_timeout: float, silence: Silence,
                   longest_gap: float = math.inf) -> list[tuple[str, str, str]]:
    """Active workers (id, last heartbeat, host) that ``silence`` has watched stay silent for
    longer than the lease timeout. Reads only: the caller may stop what they left running
    on this host before ``rescue`` lets their jobs run again."""
    rows = conn.execute(
        "SELECT id, last_heartbeat, host FROM workers WHERE state = ?",
        (WorkerState.ACTIVE,)).fetchall()
    return silence.silent(rows, lease_timeout, longest_gap)


def rescue(conn: Db, silent: Iterable[tuple[str, str, str]],
           killed: dict[str, int] | None = None) -> list[ev.Event]:
    """Take back the jobs of workers found silent (``silent_workers``), unless they spoke,
    stopped or were taken back since.

    A running job gets a ``lease-expired`` event (with ``killed``: how many of the run's
    processes the caller stopped on its host) and then the normal retry rule (it counts as
    a failed run); a job held ahead, never started, goes back as it was (``released``, no
    attempt counted). A silent worker running nothing is recorded as ``worker-lost``.
    """
    silent = list(silent)
    if not silent:
        return []
    events: list[ev.Event] = []
    with write(conn):
        at = conn.now()
        for worker_id, last_beat, _ in silent:
            now_row = conn.execute("SELECT state, last_heartbeat FROM workers WHERE id = ?",
                                   (worker_id,)).fetchone()
            if now_row != (WorkerState.ACTIVE, last_beat):
                continue
            held = conn.execute(
                f"""SELECT {_CLAIM_FIELDS}, cancel_requested, ahead FROM jobs
                WHERE state = '{State.PROCESSING}' AND {INDEXED_STATES} AND worker_id = ?
                ORDER BY seq""",
                (worker_id,),
            ).fetchall()
            ran = False
            for row in held:
                job = Claim(*row[:-2])
                if row[-1] and row[-2]:  # held ahead, and a cancel asked for it
                    events += cancel_now(conn, job.job_id)
                    continue
                if row[-1]:
                    events.append(_released_ahead(
                        job, worker_id, f"its worker {worker_id} fell silent before it started"))
                    continue
                ran = True
                events.append(
                    ev.LeaseExpired(
                        job_id=job.job_id, worker_id=worker_id, attempt=job.attempt,
                        last_heartbeat=last_beat, killed=(killed or {}).get(worker_id, 0),
                    )
                )
                if row[-2]:  # a cancel was waiting for that worker
                    events += cancelled_after_run(conn, job.job_id)
                else:
                    events.append(retry_or_dead(job, at, "lease expired"))
            if not ran:
                events.append(ev.WorkerLost(worker_id=worker_id, last_heartbeat=last_beat))
        if events:
            append(conn, *events, at=at)
            events += hooks.fire(conn, events, at)
    return events
