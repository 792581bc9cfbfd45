"""The queue's decisions: each public function reads projections inside one write
transaction, decides, and appends the events that record the decision.

Nothing here prints; the CLI renders what these functions return.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from projections.jobs import CLAIMABLE, INDEXED_STATES, WAITING
from queuectl import clock, limits, settings
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, next_seq, read_events, write

STATES = (
    "pending", "scheduled", "waiting", "processing", "completed", "failed", "dead", "cancelled"
)
CANCELLABLE = ("pending", "scheduled", "waiting", "failed", "processing")
BATCH = 2000  # ids per IN (...) query

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")


# In ASCII order, so that ids sort as the numbers they spell.
_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def spell(seq: int) -> str:
    """The id made for the record a ledger event creates: 8 characters (2-7, a-z) spelling
    the event's seq, so that made ids sort exactly in the order the ledger committed them,
    whichever process made them, and never repeat within a database.

    Ids made one after another sit side by side in every index on job ids (the ledger's,
    the jobs' and the runs'): a bulk enqueue writes a few new index pages instead of
    touching pages all over the index, and a worker's result and next claim, usually jobs
    enqueued together, share pages.
    """
    return (_PAIRS[(seq >> 30) & 1023] + _PAIRS[(seq >> 20) & 1023]
            + _PAIRS[(seq >> 10) & 1023] + _PAIRS[seq & 1023])


def _made_id(seq: int, taken: Callable[[str], bool]) -> str:
    """``spell(seq)``, or after a clash with an id a user chose, the first free
    ``spell(seq).N``, which still sorts right after it."""
    made = spell(seq)
    n = 1
    while taken(made):
        made, n = f"{spell(seq)}.{n}", n + 1
    return made


# -- enqueue ------------------------------------------------------------------------------


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A job as the user describes it: the ``enqueue`` flags, or one JSON object. Every
    number is held to its range in ``limits`` while it is decoded."""

    command: str
    id: str | None = None
    max_retries: limits.MaxRetries | None = None
    backoff_base: limits.BackoffBase | None = None
    timeout: limits.Seconds | None = None
    priority: limits.Priority = 0
    run_at: str | None = None  # ISO-8601; no zone means UTC
    delay: limits.Seconds | None = None  # seconds from now
    after: list[str] = []


_spec_decoder = msgspec.json.Decoder(JobSpec)


def parse_spec(text: str, where: str = "") -> JobSpec:
    """Decode one JSON job object, or raise InvalidInput naming what is wrong."""
    try:
        spec = _spec_decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid job{where}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON{where}: {exc}") from None
    return check_spec(spec, where)


def check_spec(spec: JobSpec, where: str = "") -> JobSpec:
    if not spec.command.strip():
        raise InvalidInput(f"invalid job{where}: command is empty")
    if "\0" in spec.command:  # no shell can be given one: exec would refuse it every time
        raise InvalidInput(f"invalid job{where}: command contains a NUL character")
    if spec.run_at is not None and spec.delay is not None:
        raise InvalidInput(f"invalid job{where}: give run_at or delay, not both")
    for name in ("max_retries", "backoff_base", "timeout", "priority", "delay"):
        value = getattr(spec, name)  # checked again: flags build a JobSpec without decoding
        if value is not None:
            try:
                limits.check(name, value)
            except InvalidInput as exc:
                raise InvalidInput(f"invalid job{where}: {name}: {exc}") from None
    if spec.run_at is not None:
        try:
            moment = clock.parse(spec.run_at)
        except ValueError:
            raise InvalidInput(
                f"invalid job{where}: run_at {spec.run_at!r} is not an ISO-8601 time"
            ) from None
        try:
            spec.run_at = clock.iso(clock.within_range(moment))
        except ValueError as exc:
            raise InvalidInput(f"invalid job{where}: run_at {spec.run_at!r} {exc}") from None
    if spec.after:
        spec.after = list(dict.fromkeys(spec.after))
    for dep in spec.after:
        if not _ID.fullmatch(dep):
            raise InvalidInput(f"invalid job{where}: dependency id {dep!r} is not a job id")
    if spec.id is not None and not _ID.fullmatch(spec.id):
        raise InvalidInput(
            f"invalid job{where}: id {spec.id!r} must be 1-128 letters, digits or ._:@/+- "
            "and start with a letter or digit"
        )
    return spec


def enqueue(conn: sqlite3.Connection, specs: Sequence[JobSpec]) -> list[str]:
    """Add jobs in one transaction, all or none; returns their ids. A duplicate id, an
    unknown or cancelled dependency or a dependency cycle refuses the whole request.

    Jobs are written dependencies first. Made ids spell the seq of each job's ``enqueued``
    event, known under the write lock. Everything that needs no lock (decoding, checks,
    ordering) is done before it is taken, so running workers wait only for the writes.
    """
    given = [spec.id for spec in specs if spec.id]
    if len(set(given)) != len(given):
        seen: set[str] = set()
        twice = next(i for i in given if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise Conflict(f"Job ID '{twice}' appears more than once")
    order, outside = _dependency_order(specs)
    ids = [spec.id or "" for spec in specs]
    with write(conn):
        _refuse_existing(conn, given)
        _refuse_bad_deps(conn, outside)
        defaults = _defaults(settings.load(conn))
        now = clock.now()
        first = next_seq(conn)
        made = [i for i in order if not ids[i]]
        if made:
            seq_of = {i: first + position for position, i in enumerate(order)}
            clashes = _existing(conn, [spell(seq_of[i]) for i in made])
            for i in made:
                ids[i] = spell(seq_of[i])
                if ids[i] in clashes:  # a user chose that id: rare, so looked up one by one
                    ids[i] = _made_id(seq_of[i], lambda job_id: bool(_existing(conn, [job_id])))
        append(conn, *(_enqueued(ids[i], specs[i], defaults, now) for i in order), at=now)
    return ids


def _dependency_order(specs: Sequence[JobSpec]) -> tuple[list[int], set[str]]:
    """Indexes of ``specs`` with every job after the jobs of this request it depends on,
    and the ids it depends on outside the request."""
    if not any(spec.after for spec in specs):
        return list(range(len(specs))), set()
    position = {spec.id: i for i, spec in enumerate(specs) if spec.id}
    outside: set[str] = set()
    for spec in specs:
        for dep in spec.after:
            if dep == spec.id:
                raise InvalidInput(f"job {dep} cannot depend on itself")
            if dep not in position:
                outside.add(dep)
    order: list[int] = []
    state: dict[int, str] = {}  # "visiting" or "done"

    def visit(i: int, path: list[str]) -> None:
        if state.get(i) == "done":
            return
        name = specs[i].id or f"#{i + 1}"
        if state.get(i) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise InvalidInput(f"dependency cycle: {' -> '.join(cycle)}")
        state[i] = "visiting"
        for dep in specs[i].after:
            if dep in position:
                visit(position[dep], path + [name])
        state[i] = "done"
        order.append(i)

    for i in range(len(specs)):
        visit(i, [])
    return order, outside


def _refuse_bad_deps(conn: sqlite3.Connection, deps: set[str]) -> None:
    for dep in sorted(deps):
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (dep,)).fetchone()
        if row is None:
            raise NotFound(f"dependency '{dep}' is not a known job")
        if row[0] == "cancelled":
            raise Conflict(f"dependency '{dep}' is cancelled")


def _defaults(config: dict[str, str]) -> dict[str, Any]:
    """The settings a new job takes when its spec leaves them out."""
    return {
        "max_retries": int(config["max-retries"]),
        "backoff_base": float(config["backoff-base"]),
        "timeout": float(config["job-timeout"]),
        "backoff_max": float(config["backoff-max"]),
        "backoff_jitter": float(config["backoff-jitter"]),
    }


def _enqueued(job_id: str, spec: JobSpec, defaults: dict[str, Any], now: str) -> ev.Enqueued:
    return ev.Enqueued(
        job_id=job_id,
        command=spec.command,
        max_retries=defaults["max_retries"] if spec.max_retries is None else spec.max_retries,
        backoff_base=defaults["backoff_base"] if spec.backoff_base is None else spec.backoff_base,
        timeout=defaults["timeout"] if spec.timeout is None else spec.timeout,
        priority=spec.priority,
        run_at=clock.after(now, spec.delay) if spec.delay else spec.run_at,
        after=tuple(spec.after),
        backoff_max=defaults["backoff_max"],
        backoff_jitter=defaults["backoff_jitter"],
    )


def _existing(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(f"SELECT id FROM jobs WHERE id IN ({marks})", chunk))
    return found


def _refuse_existing(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    found = _existing(conn, ids)
    if found:
        first = next(job_id for job_id in ids if job_id in found)
        raise Conflict(f"Job with ID '{first}' already exists")


# -- config and control -------------------------------------------------------------------


def set_config(conn: sqlite3.Connection, key: str, text: str) -> str:
    """Validate and record a setting; returns the canonical value stored."""
    value = settings.parse(key, text)
    with write(conn):
        config = settings.load(conn) | {key: value}
        if float(config["lease-timeout"]) <= float(config["heartbeat-interval"]):
            raise InvalidInput(
                f"invalid value for {key}: lease-timeout ({config['lease-timeout']}) must be "
                f"longer than heartbeat-interval ({config['heartbeat-interval']})"
            )
        append(conn, ev.ConfigChanged(key=key, value=value))
    return value


def request_stop(conn: sqlite3.Connection) -> int:
    """Ask every running worker to finish its current job and exit; returns how many."""
    with write(conn):
        (active,) = conn.execute("SELECT count(*) FROM workers WHERE state = 'active'").fetchone()
        append(conn, ev.StopRequested())
    return int(active)


def dlq_retry(conn: sqlite3.Connection, job_id: str) -> int:
    """Send a dead job back to pending with attempts 0; returns its max_retries."""
    with write(conn):
        job = get_job(conn, job_id)
        if job["state"] != "dead":
            raise Conflict(
                f"Job {job_id} is not in the dead letter queue (state: {job['state']})"
            )
        append(conn, ev.Requeued(job_id=job_id, max_retries=job["max_retries"]))
    return int(job["max_retries"])


# -- the worker's side --------------------------------------------------------------------


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
# INDEXED BY: without statistics SQLite prefers jobs_state and sorts every pending job on
# each claim (quadratic); the partial index already holds them in claim order.
_READY = f"""SELECT {_CLAIM_FIELDS}, run_at FROM jobs INDEXED BY jobs_ready
    WHERE {CLAIMABLE} AND run_at <= ?
    ORDER BY priority DESC, seq LIMIT 1"""
# The same, for a worker: nothing for one declared lost (no live worker would ever take its
# job back) or asked to stop. One statement; SQLite looks at the worker once, not per job.
_READY_FOR = _READY.replace("ORDER BY", """AND NOT EXISTS (SELECT 1 FROM workers
        WHERE id = ? AND (state != 'active' OR stop_requested)) ORDER BY""")


def worker_started(
    conn: sqlite3.Connection, pid: int, host: str, *, worker_id: str | None = None
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


def worker_stopped(conn: sqlite3.Connection, worker_id: str, reason: str) -> None:
    with write(conn):
        append(conn, ev.WorkerStopped(worker_id=worker_id, reason=reason))


def heartbeat(conn: sqlite3.Connection, worker_id: str) -> None:
    with write(conn):
        append(conn, ev.WorkerHeartbeat(worker_id=worker_id))


def worker_state(conn: sqlite3.Connection, worker_id: str) -> tuple[str, bool]:
    """The worker's projected state and whether a stop was requested since it started."""
    row = conn.execute(
        "SELECT state, stop_requested FROM workers WHERE id = ?", (worker_id,)
    ).fetchone()
    return (row[0], bool(row[1])) if row else ("unknown", False)


def claim(conn: sqlite3.Connection, worker_id: str) -> Claim | None:
    """Take the best eligible job (highest priority, then oldest), in one write transaction;
    None when there is none.

    A lock-free peek comes first, so idle workers never queue up for the write lock.
    """
    now = clock.now()
    if conn.execute(_READY, (now,)).fetchone() is None:
        return None
    with write(conn):
        return _claim(conn, worker_id, now)


def _claim(tx: sqlite3.Connection, worker_id: str, now: str) -> Claim | None:
    row = tx.execute(_READY_FOR, (now, worker_id)).fetchone()
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


def next_run_at(conn: sqlite3.Connection) -> str | None:
    """When the earliest scheduled or failed job becomes eligible (None when none waits);
    pending jobs are eligible already."""
    return conn.execute(
        f"SELECT min(run_at) FROM jobs INDEXED BY jobs_run_at WHERE {WAITING}"
    ).fetchone()[0]


def unfinished(conn: sqlite3.Connection) -> int:
    """Jobs pending, processing or waiting to retry: what ``--burst`` waits for.

    Scheduled jobs and jobs waiting on dependencies are not counted: their time may be far
    off, and a dead dependency may hold a job forever.
    """
    (n,) = conn.execute(
        "SELECT coalesce(sum(n), 0) FROM job_counts "
        "WHERE state IN ('pending', 'processing', 'failed')"
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


def finish(conn: sqlite3.Connection, job: Claim, result: ev.Event) -> list[ev.Event]:
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
    conn: sqlite3.Connection, job: Claim, result: ev.Event, worker_id: str | None
) -> tuple[list[ev.Event], Claim | None]:
    """``finish``, then (when ``worker_id`` is given) claim that worker's next job in the
    same transaction: one commit per job instead of two on a busy queue."""
    at = clock.now()
    with write(conn):
        row = conn.execute(_HELD, (job.job_id,)).fetchone()
        events: list[ev.Event] = []
        if row and row[:3] == ("processing", result.worker_id, job.attempt):  # type: ignore[union-attr]
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


def _cancelled_after_run(conn: sqlite3.Connection, job_id: str) -> list[ev.Event]:
    cancelled = ev.Cancelled(job_id=job_id, reason="cancelled by user while running")
    return [cancelled, *_cancel_dependents(conn, job_id)]


def _unblocked_by(conn: sqlite3.Connection, job_id: str) -> list[ev.Event]:
    """Waiting jobs whose last unfinished dependency is ``job_id`` (about to complete)."""
    rows = conn.execute(
        """SELECT d.job_id FROM job_deps d JOIN jobs j ON j.id = d.job_id
        WHERE d.depends_on = ? AND j.state = 'waiting'
        AND NOT EXISTS (
            SELECT 1 FROM job_deps o JOIN jobs oj ON oj.id = o.depends_on
            WHERE o.job_id = d.job_id AND o.depends_on != ? AND oj.state != 'completed')
        ORDER BY j.seq""",
        (job_id, job_id),
    ).fetchall()
    return [ev.Unblocked(job_id=r[0], completed=job_id) for r in rows]


def _cancel_dependents(conn: sqlite3.Connection, job_id: str) -> list[ev.Event]:
    """Cancel every waiting job that depends, directly or not, on a cancelled job."""
    events: list[ev.Event] = []
    queue_, done = [job_id], {job_id}
    while queue_:
        current = queue_.pop(0)
        for (dependent,) in conn.execute(
            """SELECT d.job_id FROM job_deps d JOIN jobs j ON j.id = d.job_id
            WHERE d.depends_on = ? AND j.state = 'waiting' ORDER BY j.seq""",
            (current,),
        ).fetchall():
            if dependent not in done:
                done.add(dependent)
                queue_.append(dependent)
                events.append(ev.Cancelled(
                    job_id=dependent, reason=f"dependency {current} was cancelled"))
    return events


def cancel(conn: sqlite3.Connection, job_id: str) -> str:
    """Cancel a job. Returns ``cancelled``, or ``requested`` for a running job, which its
    worker stops (killing its process group) within a moment."""
    with write(conn):
        job = get_job(conn, job_id)
        if job["state"] not in CANCELLABLE:
            raise Conflict(
                f"Job {job_id} is {job['state']}; only pending, scheduled, waiting, failed "
                "or running jobs can be cancelled"
            )
        if job["state"] == "processing":
            if not job["cancel_requested"]:
                append(conn, ev.CancelRequested(job_id=job_id))
            return "requested"
        cancelled = ev.Cancelled(job_id=job_id, reason="cancelled by user")
        append(conn, cancelled, *_cancel_dependents(conn, job_id))
    return "cancelled"


def cancel_requested(conn: sqlite3.Connection, job_id: str) -> bool:
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


def silent_workers(conn: sqlite3.Connection, lease_timeout: float, silence: Silence,
                   longest_gap: float = math.inf) -> list[tuple[str, str, str]]:
    """Active workers (id, last heartbeat, host) that ``silence`` has watched stay silent for
    longer than the lease timeout. Reads only: the caller may stop what they left running
    on this host before ``rescue`` lets their jobs run again."""
    rows = conn.execute(
        "SELECT id, last_heartbeat, host FROM workers WHERE state = 'active'").fetchall()
    return silence.silent(rows, lease_timeout, longest_gap)


def rescue(conn: sqlite3.Connection, silent: Iterable[tuple[str, str, str]],
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
    at = clock.now()
    events: list[ev.Event] = []
    with write(conn):
        for worker_id, last_beat, _ in silent:
            now_row = conn.execute("SELECT state, last_heartbeat FROM workers WHERE id = ?",
                                   (worker_id,)).fetchone()
            if now_row != ("active", last_beat):
                continue
            held = conn.execute(
                f"""SELECT {_CLAIM_FIELDS}, cancel_requested FROM jobs
                WHERE state = 'processing' AND {INDEXED_STATES} AND worker_id = ?""",
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


# -- reads --------------------------------------------------------------------------------

JOB_FIELDS = (
    "id, command, state, priority, attempts, max_retries, backoff_base, backoff_max, "
    "backoff_jitter, timeout, run_at, worker_id, cancel_requested, exit_code, last_error, "
    "created_at, updated_at, "
    "(SELECT json_group_array(depends_on) FROM job_deps WHERE job_deps.job_id = jobs.id) AS after"
)


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def _dicts_jobs(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    rows = _dicts(cursor)
    for row in rows:
        row["after"] = msgspec.json.decode(row["after"])
    return rows


def get_job(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    rows = _dicts_jobs(conn.execute(f"SELECT {JOB_FIELDS} FROM jobs WHERE id = ?", (job_id,)))
    if not rows:
        raise NotFound(f"Job '{job_id}' not found")
    return rows[0]


def list_jobs(
    conn: sqlite3.Connection, state: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Jobs oldest first, optionally of one state; pending jobs in the order they will run
    (highest priority first, then oldest)."""
    if state == "pending":
        where, order = f"INDEXED BY jobs_ready WHERE state = ? AND {CLAIMABLE}", \
            "priority DESC, seq"
    elif state in ("processing", "failed", "scheduled", "waiting", "dead", "cancelled"):
        where, order = f"INDEXED BY jobs_state WHERE state = ? AND {INDEXED_STATES}", "seq"
    else:  # all jobs, or completed ones: rows are stored oldest first
        where, order = ("WHERE state = ?" if state else ""), "seq"
    sql = f"SELECT {JOB_FIELDS} FROM jobs {where} ORDER BY {order} LIMIT ?"
    params = (state,) if state else ()
    return _dicts_jobs(conn.execute(sql, (*params, -1 if limit is None else limit)))


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Jobs per state, every state present (from the ``job_counts`` projection: O(1))."""
    found = dict(conn.execute("SELECT state, n FROM job_counts").fetchall())
    return {state: int(found.get(state, 0)) for state in STATES}


def workers(conn: sqlite3.Connection, states: Iterable[str] = ("active",)) -> list[dict[str, Any]]:
    states = tuple(states)
    marks = ",".join("?" * len(states))
    return _dicts(
        conn.execute(
            f"""SELECT id, state, pid, host, started_at, last_heartbeat, current_job, jobs_done
            FROM workers WHERE state IN ({marks}) ORDER BY started_at, id""",
            states,
        )
    )


def worker_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Workers per projected state (active, stopped, gone)."""
    return dict(conn.execute("SELECT state, count(*) FROM workers GROUP BY state").fetchall())


def history(conn: sqlite3.Connection, job_id: str) -> list[tuple[int, str, ev.Event]]:
    """Every event of one job, in order; NotFound when the ledger never saw it."""
    rows = list(read_events(conn, "WHERE job_id = ?", (job_id,)))
    if not rows:
        raise NotFound(f"Job '{job_id}' not found")
    return rows


def runs_of(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    """Each run of a job, from its events: when, by whom, how it ended, and its output."""
    runs: list[dict[str, Any]] = []
    for _, at, event in history(conn, job_id):
        match event:
            case ev.Claimed(attempt=a, worker_id=w):
                runs.append({"run": len(runs) + 1, "attempt": a, "worker_id": w,
                             "started_at": at, "finished_at": None, "outcome": "running",
                             "exit_code": None, "duration": None, "output": "",
                             "truncated": False, "error": None})
            case ev.Completed() | ev.Failed() | ev.TimedOut() | ev.Cancelled() | \
                    ev.Released() | ev.LeaseExpired() if runs and runs[-1]["finished_at"] is None:
                run = runs[-1]
                run["finished_at"] = at
                run["outcome"] = event.type
                run["exit_code"] = getattr(event, "exit_code", 0 if event.type == "completed"
                                           else None)
                run["duration"] = getattr(event, "duration", None)
                run["output"] = getattr(event, "output", "")
                run["truncated"] = getattr(event, "truncated", False)
                run["error"] = getattr(event, "error", None) or getattr(event, "reason", None)
                if isinstance(event, ev.TimedOut):
                    run["error"] = f"killed after its {event.timeout:g}s timeout"
                elif isinstance(event, ev.LeaseExpired):
                    run["error"] = f"worker {event.worker_id} stopped heartbeating"
    return runs


def parse_since(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    unit = units.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
        return limits.check("since", value)
    except (ValueError, InvalidInput):
        raise InvalidInput(
            f"--since {text!r}: expected a duration like 90s, 15m, 2h or 1d, from 1ms to "
            "100 years") from None


def _percentile(conn: sqlite3.Connection, column: str, where: str, params: tuple[Any, ...],
                n: int, p: float) -> float | None:
    """Nearest-rank percentile, walked along the column's index (no sort in Python)."""
    if n == 0:
        return None
    rank = max(0, -(-int(p * 1000) * n // 1000) - 1)  # ceil(p * n) - 1
    row = conn.execute(
        f"SELECT {column} FROM runs WHERE {column} IS NOT NULL {where} "
        f"ORDER BY {column} LIMIT 1 OFFSET ?",
        (*params, rank),
    ).fetchone()
    return row[0] if row else None


def stats(conn: sqlite3.Connection, since_seconds: float | None = None) -> dict[str, Any]:
    """Completed / failed / dead, success rate, throughput, run time and queue wait
    percentiles, from the ``runs`` projection (all time, or the last ``since_seconds``)."""
    now = clock.now()
    conn.execute("BEGIN")  # one snapshot for every figure
    try:
        if since_seconds is None:
            found = dict(conn.execute("SELECT outcome, n FROM run_counts").fetchall())
            first = conn.execute("SELECT claimed_at FROM runs ORDER BY seq LIMIT 1").fetchone()
            last = conn.execute(
                "SELECT max(finished_at) FROM runs WHERE finished_at IS NOT NULL").fetchone()
            span = (first[0] if first else None, last[0])
            fin_where, fin_params = "", ()  # type: tuple[str, tuple[str, ...]]
            wait_where, wait_params = "", ()  # type: tuple[str, tuple[str, ...]]
        else:
            since = clock.after(now, -since_seconds)
            found = dict(conn.execute(
                "SELECT outcome, count(*) FROM runs WHERE finished_at >= ? GROUP BY outcome",
                (since,)).fetchall())
            found["dead"] = conn.execute(
                "SELECT count(*) FROM runs WHERE dead = 1 AND finished_at >= ?", (since,)
            ).fetchone()[0]
            # Within a window, queue wait is taken over the runs that finished in it.
            found["claimed"] = sum(found.values()) - found["dead"]
            span = (since, now)
            fin_where, fin_params = "AND finished_at >= ?", (since,)
            wait_where, wait_params = fin_where, fin_params
        completed = int(found.get("completed", 0))
        failed = sum(int(found.get(k, 0)) for k in ("failed", "timed-out", "lease-expired"))
        timed = completed + int(found.get("failed", 0)) + int(found.get("timed-out", 0))
        claims = int(found.get("claimed", 0))
        minutes = (clock.seconds_between(span[0], span[1]) / 60) if span[0] and span[1] else 0
        # Within a window, walk the window's runs: the planner would rather walk runs_duration
        # down from its top, which passes every run when the window holds none.
        within = "INDEXED BY runs_finished" if fin_where else ""
        max_run = conn.execute(
            f"SELECT max(duration) FROM runs {within} WHERE duration IS NOT NULL {fin_where}",
            fin_params,
        ).fetchone()[0]
        result = {
            "since": None if since_seconds is None else span[0],
            "completed": completed,
            "failed": failed,
            "dead": int(found.get("dead", 0)),
            "success_rate": round(completed / (completed + failed), 4)
            if completed + failed else None,
            "throughput_per_min": round(completed / minutes, 2) if minutes > 0 else None,
            "run_time": {
                "p50": _percentile(conn, "duration", fin_where, fin_params, timed, 0.50),
                "p95": _percentile(conn, "duration", fin_where, fin_params, timed, 0.95),
                "max": max_run,
            },
            "queue_wait": {
                "p50": _percentile(conn, "wait", wait_where, wait_params, claims, 0.50),
                "p95": _percentile(conn, "wait", wait_where, wait_params, claims, 0.95),
            },
        }
    finally:
        conn.execute("COMMIT")
    return result
