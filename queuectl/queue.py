"""The queue's decisions: each public function reads projections inside one write
transaction, decides, and appends the events that record the decision.

Nothing here prints; the CLI renders what these functions return.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import string
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import msgspec

from queuectl import clock, settings
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, read_events, write

STATES = ("pending", "processing", "completed", "failed", "dead")
BATCH = 500  # jobs per transaction when enqueueing many: workers get the lock in between

_ALPHABET = string.ascii_lowercase + string.digits
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")


def new_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(8))


# -- enqueue ------------------------------------------------------------------------------


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A job as the user describes it: the ``enqueue`` flags, or one JSON object."""

    command: str
    id: str | None = None
    max_retries: Annotated[int, msgspec.Meta(ge=0)] | None = None
    timeout: Annotated[float, msgspec.Meta(ge=0)] | None = None


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
    if spec.id is not None and not _ID.fullmatch(spec.id):
        raise InvalidInput(
            f"invalid job{where}: id {spec.id!r} must be 1-128 letters, digits or ._:@/+- "
            "and start with a letter or digit"
        )
    return spec


def enqueue(conn: sqlite3.Connection, specs: Sequence[JobSpec]) -> list[str]:
    """Add jobs; returns their ids. A duplicate id (stored or within ``specs``) writes nothing.

    Many jobs are written ``BATCH`` per transaction so that running workers are not starved
    of the write lock; every id is checked before the first batch is written.
    """
    ids = [spec.id or new_id() for spec in specs]
    seen: set[str] = set()
    for job_id in ids:
        if job_id in seen:
            raise Conflict(f"Job ID '{job_id}' appears more than once")
        seen.add(job_id)
    _refuse_existing(conn, ids)
    for start in range(0, len(specs), BATCH):
        chunk = range(start, min(start + BATCH, len(specs)))
        with write(conn):
            config = settings.load(conn)
            _refuse_existing(conn, [ids[i] for i in chunk])
            append(conn, *(_enqueued(ids[i], specs[i], config) for i in chunk))
    return ids


def _enqueued(job_id: str, spec: JobSpec, config: dict[str, str]) -> ev.Enqueued:
    return ev.Enqueued(
        job_id=job_id,
        command=spec.command,
        max_retries=spec.max_retries
        if spec.max_retries is not None
        else int(config["max-retries"]),
        backoff_base=float(config["backoff-base"]),
        timeout=spec.timeout if spec.timeout is not None else float(config["job-timeout"]),
    )


def _refuse_existing(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        marks = ",".join("?" * len(chunk))
        row = conn.execute(f"SELECT id FROM jobs WHERE id IN ({marks}) LIMIT 1", chunk).fetchone()
        if row:
            raise Conflict(f"Job with ID '{row[0]}' already exists")


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


_READY = """SELECT id, command, attempts, max_retries, backoff_base, timeout FROM jobs
    WHERE state IN ('pending', 'failed') AND run_at <= ? ORDER BY seq LIMIT 1"""


def worker_started(conn: sqlite3.Connection, worker_id: str, pid: int, host: str) -> None:
    with write(conn):
        append(conn, ev.WorkerStarted(worker_id=worker_id, pid=pid, host=host))


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
    """Take the oldest eligible job, in one write transaction; None when there is none.

    A lock-free peek comes first, so idle workers never queue up for the write lock.
    """
    now = clock.now()
    if conn.execute(_READY, (now,)).fetchone() is None:
        return None
    with write(conn):
        row = conn.execute(_READY, (now,)).fetchone()
        if row is None:
            return None
        job_id, command, attempts, max_retries, backoff_base, timeout = row
        append(conn, ev.Claimed(job_id=job_id, worker_id=worker_id, attempt=attempts + 1))
    return Claim(job_id, command, attempts + 1, max_retries, backoff_base, timeout)


def next_run_at(conn: sqlite3.Connection) -> str | None:
    """When the earliest waiting job becomes eligible (None when nothing waits)."""
    return conn.execute(
        "SELECT min(run_at) FROM jobs WHERE state IN ('pending', 'failed')"
    ).fetchone()[0]


def unfinished(conn: sqlite3.Connection) -> int:
    """Jobs pending, processing or waiting to retry: what ``--burst`` waits for."""
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
    delay = job.backoff_base**k
    return ev.ScheduledRetry(
        job_id=job.job_id, attempt=k, delay=delay, run_at=clock.after(at, delay)
    )


def finish(conn: sqlite3.Connection, job: Claim, result: ev.Event) -> list[ev.Event]:
    """Record the outcome of a run (completed, failed, timed-out or released).

    If the worker no longer holds the job (its lease expired and another worker took it
    back), nothing is written: the job already went through the retry rule.
    """
    at = clock.now()
    with write(conn):
        row = conn.execute(
            "SELECT state, worker_id, attempts FROM jobs WHERE id = ?", (job.job_id,)
        ).fetchone()
        if row != ("processing", result.worker_id, job.attempt):  # type: ignore[union-attr]
            return []
        events: list[ev.Event] = [result]
        if isinstance(result, ev.Failed | ev.TimedOut):
            reason = result.error if isinstance(result, ev.Failed) else "timed out"
            events.append(retry_or_dead(job, at, reason))
        append(conn, *events, at=at)
    return events


def rescue(conn: sqlite3.Connection, lease_timeout: float) -> list[ev.Event]:
    """Take back jobs of workers silent for longer than the lease timeout.

    Each held job gets a ``lease-expired`` event and then the normal retry rule (it counts as
    a failed run); a silent worker holding nothing is recorded as ``worker-lost``.
    """
    cutoff = clock.after(clock.now(), -lease_timeout)
    stale_sql = "SELECT id, last_heartbeat FROM workers WHERE state = 'active' AND last_heartbeat < ?"
    if conn.execute(stale_sql, (cutoff,)).fetchone() is None:
        return []
    at = clock.now()
    events: list[ev.Event] = []
    with write(conn):
        for worker_id, last_beat in conn.execute(stale_sql, (cutoff,)).fetchall():
            held = conn.execute(
                """SELECT id, command, attempts, max_retries, backoff_base, timeout FROM jobs
                WHERE state = 'processing' AND worker_id = ?""",
                (worker_id,),
            ).fetchall()
            if not held:
                events.append(ev.WorkerLost(worker_id=worker_id, last_heartbeat=last_beat))
            for job_id, command, attempts, max_retries, base, timeout in held:
                job = Claim(job_id, command, attempts, max_retries, base, timeout)
                events.append(
                    ev.LeaseExpired(
                        job_id=job_id, worker_id=worker_id, attempt=attempts,
                        last_heartbeat=last_beat,
                    )
                )
                events.append(retry_or_dead(job, at, "lease expired"))
        if events:
            append(conn, *events, at=at)
    return events


# -- reads --------------------------------------------------------------------------------

JOB_FIELDS = (
    "id, command, state, attempts, max_retries, backoff_base, timeout, run_at, worker_id, "
    "exit_code, last_error, created_at, updated_at"
)


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def get_job(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    rows = _dicts(conn.execute(f"SELECT {JOB_FIELDS} FROM jobs WHERE id = ?", (job_id,)))
    if not rows:
        raise NotFound(f"Job '{job_id}' not found")
    return rows[0]


def list_jobs(
    conn: sqlite3.Connection, state: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Jobs oldest first, optionally of one state."""
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    sql = f"SELECT {JOB_FIELDS} FROM jobs {where} ORDER BY seq LIMIT ?"
    return _dicts(conn.execute(sql, (*params, -1 if limit is None else limit)))


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


def history(conn: sqlite3.Connection, job_id: str) -> list[tuple[int, str, ev.Event]]:
    """Every event of one job, in order; NotFound when the ledger never saw it."""
    rows = list(read_events(conn, "WHERE job_id = ?", (job_id,)))
    if not rows:
        raise NotFound(f"Job '{job_id}' not found")
    return rows
