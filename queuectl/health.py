"""Health: whether the queue is being served (``queuectl health``, ``/healthz``).

Three checks, read from the projections: the store answers; at least ``min_workers`` live
workers (active, heartbeat within the lease timeout); no ready job has waited longer than
``max_ready_age`` seconds. Ready means a worker may claim it now: pending, or scheduled or
failed whose time has come. Jobs of a paused queue are left out: they wait because someone
paused it, not because nobody serves it. Live workers are counted over every queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from queuectl import ledger, metrics, reads
from queuectl.errors import InvalidInput, QueueError
from queuectl.store import Db, driver_errors

MAX_READY_AGE = 300.0  # seconds
MIN_WORKERS = 1


class Check(msgspec.Struct):
    ok: bool
    detail: str = ""


class StoreCheck(Check):
    pass


class WorkersCheck(Check):
    live: int = 0
    min: int = MIN_WORKERS


class ReadyCheck(Check):
    oldest_seconds: float | None = None  # the oldest ready job's wait; None: none ready
    queue: str | None = None  # its queue
    max: float = MAX_READY_AGE


class Checks(msgspec.Struct):
    store: StoreCheck
    workers: WorkersCheck | None = None
    ready_age: ReadyCheck | None = None


class Health(msgspec.Struct):
    healthy: bool
    message: str  # the one line ``health`` prints
    checks: Checks


def check_options(max_ready_age: float, min_workers: int) -> None:
    if not max_ready_age >= 0 or max_ready_age == float("inf"):
        raise InvalidInput(f"max ready age must be a number of seconds >= 0, not {max_ready_age}")
    if min_workers < 0:
        raise InvalidInput(f"min workers must be an integer >= 0, not {min_workers}")


def check(conn: Db, max_ready_age: float = MAX_READY_AGE, min_workers: int = MIN_WORKERS,
          queues: Sequence[str] = ()) -> Health:
    """The checks on an open store, inside the caller's snapshot. ``queues``: only these
    queues' ready jobs count (none: every queue's)."""
    check_options(max_ready_age, min_workers)
    now = conn.now()
    live = sum(1 for w in reads.running_workers(conn) if w.state == "active")
    paused = {name for (name,) in conn.execute("SELECT name FROM queues WHERE paused = 1")}
    ready = metrics.oldest_ready(conn, now, queues or None)
    waits = {q: age for q, age in ready.items()
             if q not in paused and (not queues or q in queues)}
    oldest = max(waits, key=lambda q: (waits[q], q), default=None)
    workers = WorkersCheck(ok=live >= min_workers, live=live, min=min_workers)
    age = None if oldest is None else waits[oldest]
    ready_check = ReadyCheck(ok=age is None or age <= max_ready_age, oldest_seconds=age,
                             queue=oldest, max=max_ready_age)
    workers.detail = _workers_text(live, min_workers)
    ready_check.detail = _ready_text(age, oldest, max_ready_age)
    checks = Checks(StoreCheck(ok=True), workers, ready_check)
    problems = [c.detail for c in (workers, ready_check) if not c.ok]
    if problems:
        return Health(False, "unhealthy: " + "; ".join(problems), checks)
    return Health(True, f"healthy: {workers.detail}, {ready_check.detail}", checks)


def check_target(target: str, max_ready_age: float = MAX_READY_AGE,
                 min_workers: int = MIN_WORKERS, queues: Sequence[str] = (),
                 connect: Callable[[str], Db] | None = None) -> Health:
    """``check`` on the store ``target``, opened for it and closed after (never created):
    a store that cannot be opened is unhealthy, not an error."""
    check_options(max_ready_age, min_workers)
    failures = store_errors()
    try:
        conn = (connect or _connect)(target)
    except failures as exc:
        return unreachable(exc)
    try:
        with conn.snapshot():
            return check(conn, max_ready_age, min_workers, queues)
    except InvalidInput:
        raise
    except store_errors() as exc:
        return unreachable(exc)
    finally:
        conn.close()


def store_errors() -> tuple[type[BaseException], ...]:
    """What a store that cannot be reached raises: queuectl's errors and the drivers'."""
    return (QueueError, *driver_errors())


def unreachable(exc: BaseException) -> Health:
    reason = " ".join(str(exc).split())
    detail = f"the store cannot be reached: {reason}"
    return Health(False, f"unhealthy: {detail}", Checks(StoreCheck(ok=False, detail=detail)))


def _connect(target: str) -> Db:
    return ledger.connect(target, create=False)


def _workers_text(live: int, minimum: int) -> str:
    if live == 0:
        return "no live worker" + (f" (at least {minimum} wanted)" if minimum > 1 else "")
    text = f"{live} live worker{'s' if live != 1 else ''}"
    return text if live >= minimum else f"{text}, fewer than {minimum}"


def _ready_text(age: float | None, queue: str | None, maximum: float) -> str:
    if age is None:
        return "no ready job"
    text = f"the oldest ready job (queue {queue}) is {age:.1f} s old"
    return text if age <= maximum else f"{text}, over {maximum:g} s"
