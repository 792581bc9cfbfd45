"""The worker's side of the queue: claim a job, record its result (and claim the next),
heartbeat, and take back the jobs of workers that fell silent.

Each write is one transaction; the claim reads the best eligible job and appends ``claimed``
in the same one, so two workers never hold the same job.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable

import msgspec

from projections.jobs import CLAIMABLE_SQL, INDEXED_STATES, TIMED_SQL
from queuectl import clock, limits
from queuectl import events as ev
from queuectl.decisions import _cancel_dependents, _cancelled_after_run, _made_id, _unblocked_by
from queuectl.errors import Conflict
from queuectl.ledger import append, next_seq, write
from queuectl.states import UNFINISHED, State, WorkerState, any_of
from queuectl.store import Db


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


_CLAIM_FIELDS = "id, command, attempts, max_retries, backoff_base, timeout, backoff_max, " \
    "backoff_jitter"
# {jobs_ready}: the index hint SQLite needs (without statistics it prefers jobs_state and
# sorts every pending job on each claim); the partial index holds them in claim order.
_READY = f"""SELECT {_CLAIM_FIELDS}, run_at FROM jobs {{jobs_ready}}
    WHERE {CLAIMABLE_SQL} AND run_at <= ?
    ORDER BY priority DESC, seq LIMIT 1"""
# The same, for a worker: nothing for one declared lost (no live worker would ever take its
# job back) or asked to stop. One statement; the store looks at the worker once, not per job.
_READY_FOR = _READY.replace("ORDER BY", f"""AND NOT EXISTS (SELECT 1 FROM workers
        WHERE id = ? AND (state != '{WorkerState.ACTIVE}' OR stop_requested != 0)) ORDER BY""")


def worker_started(
    conn: Db, pid: int, host: str, *, worker_id: str | None = None
) -> str:
    """Record a worker's start; returns its id: spelled from its ``worker-started`` seq
    unless one is given, and checked against the workers table in the same transaction,
    as job ids are."""
    with write(conn):
        def taken(candidate: str) -> bool:
            found = conn.execute("SELECT 1 FROM workers WHERE id = ?", (candidate,))
            return found.fetchone() is not None

        if worker_id is None:
            worker_id = _made_id(next_seq(conn), taken)
        elif taken(worker_id):
            raise Conflict(f"Worker with ID '{worker_id}' already exists")
        append(conn, ev.WorkerStarted(worker_id=worker_id, pid=pid, host=host))
    return worker_id


def worker_stopped(conn: Db, worker_id: str, reason: str) -> None:
    with write(conn):
        append(conn, ev.WorkerStopped(worker_id=worker_id, reason=reason))


def heartbeat(conn: Db, worker_id: str) -> None:
    with write(conn):
        append(conn, ev.WorkerHeartbeat(worker_id=worker_id))


def worker_state(conn: Db, worker_id: str) -> tuple[str, bool]:
    """The worker's projected state and whether a stop was requested since it started."""
    row = conn.execute(
        "SELECT state, stop_requested FROM workers WHERE id = ?", (worker_id,)
    ).fetchone()
    return (row[0], bool(row[1])) if row else ("unknown", False)


def claim(conn: Db, worker_id: str) -> Claim | None:
    """Take the best eligible job (highest priority, then oldest), in one write transaction;
    None when there is none.

    A lock-free peek comes first, so idle workers never queue up for the write lock.
    """
    if conn.execute(conn.dialect.sql(_READY), (conn.now(),)).fetchone() is None:
        return None
    with write(conn):
        return _claim(conn, worker_id, conn.now())


def _claim(tx: Db, worker_id: str, now: str) -> Claim | None:
    row = tx.execute(tx.dialect.sql(_READY_FOR), (now, worker_id)).fetchone()
    if row is None:
        return None
    job = Claim(*row[:-1])
    job = msgspec.structs.replace(job, attempt=job.attempt + 1)
    append(
        tx,
        ev.Claimed(job_id=job.job_id, worker_id=worker_id, attempt=job.attempt,
                   eligible_at=row[-1]),
        at=now,
    )
    return job


def next_run_at(conn: Db) -> str | None:
    """When the earliest scheduled or failed job becomes eligible (None when none waits);
    pending jobs are eligible already."""
    return conn.execute(
        conn.dialect.sql(f"SELECT min(run_at) FROM jobs {{jobs_run_at}} WHERE {TIMED_SQL}")
    ).fetchone()[0]


def unfinished(conn: Db) -> int:
    """Jobs pending, processing or waiting to retry: what ``--burst`` waits for.

    Scheduled jobs and jobs waiting on dependencies are not counted: their time may be far
    off, and a dead dependency may hold a job forever.
    """
    (n,) = conn.execute(
        "SELECT coalesce(sum(n), 0) FROM job_counts WHERE " + any_of(*UNFINISHED)
    ).fetchone()
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


# Whether the worker still holds the job, and (for a completion) whether any job depends
# on it: most jobs have no dependents, and then finding the ones it unblocks is skipped.
_HELD = """SELECT state, worker_id, attempts, cancel_requested,
    EXISTS (SELECT 1 FROM job_deps WHERE depends_on = jobs.id) FROM jobs WHERE id = ?"""


def finish_and_claim(
    conn: Db, job: Claim, result: ev.Event, worker_id: str | None
) -> tuple[list[ev.Event], Claim | None]:
    """``finish``, then (when ``worker_id`` is given) claim that worker's next job in the
    same transaction: one commit per job instead of two on a busy queue."""
    with write(conn):
        at = conn.now()
        row = conn.execute(_HELD, (job.job_id,)).fetchone()
        events: list[ev.Event] = []
        if row and row[:3] == (State.PROCESSING, result.worker_id, job.attempt):  # type: ignore[union-attr]
            events.append(result)
            if row[3] and isinstance(result, ev.Failed | ev.TimedOut | ev.Released):
                # Cancelled while it ran, but the run ended before its worker saw that:
                # the cancel still wins over a retry.
                events += _cancelled_after_run(conn, job.job_id)
            elif isinstance(result, ev.Failed | ev.TimedOut):
                reason = result.error if isinstance(result, ev.Failed) else "timed out"
                events.append(retry_or_dead(job, at, reason))
            elif isinstance(result, ev.Completed) and row[4]:
                events += _unblocked_by(conn, job.job_id)
            elif isinstance(result, ev.Cancelled):
                events += _cancel_dependents(conn, job.job_id)
            append(conn, *events, at=at)
        following = _claim(conn, worker_id, at) if worker_id else None
    return events, following


def release_strays(conn: Db, worker_id: str, keep: str | None) -> list[ev.Event]:
    """Release the jobs held under ``worker_id`` that its worker does not know it holds
    (all but ``keep``): after a lost connection, a commit that claimed one may have
    succeeded unseen. A released run is not counted as an attempt."""
    with write(conn):
        rows = conn.execute(
            f"""SELECT id, attempts FROM jobs
            WHERE state = '{State.PROCESSING}' AND {INDEXED_STATES} AND worker_id = ?""",
            (worker_id,)).fetchall()
        events: list[ev.Event] = [
            ev.Released(job_id=job_id, worker_id=worker_id, attempt=attempts,
                        reason="claimed while its worker lost the database connection")
            for job_id, attempts in rows if job_id != keep]
        if events:
            append(conn, *events)
    return events


def cancel_requested(conn: Db, job_id: str) -> bool:
    row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return bool(row and row[0])


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

    Each held job gets a ``lease-expired`` event (with ``killed``: how many of the run's
    processes the caller stopped on its host) and then the normal retry rule (it counts as
    a failed run); a silent worker holding nothing is recorded as ``worker-lost``.
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
                f"""SELECT {_CLAIM_FIELDS}, cancel_requested FROM jobs
                WHERE state = '{State.PROCESSING}' AND {INDEXED_STATES} AND worker_id = ?""",
                (worker_id,),
            ).fetchall()
            if not held:
                events.append(ev.WorkerLost(worker_id=worker_id, last_heartbeat=last_beat))
            for row in held:
                job = Claim(*row[:-1])
                events.append(
                    ev.LeaseExpired(
                        job_id=job.job_id, worker_id=worker_id, attempt=job.attempt,
                        last_heartbeat=last_beat, killed=(killed or {}).get(worker_id, 0),
                    )
                )
                if row[-1]:  # a cancel was waiting for that worker
                    events += _cancelled_after_run(conn, job.job_id)
                else:
                    events.append(retry_or_dead(job, at, "lease expired"))
        if events:
            append(conn, *events, at=at)
    return events


