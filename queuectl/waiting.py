"""Blocking until jobs are final: ``queuectl wait``, ``enqueue --wait`` and ``Queue.wait``.

Which jobs a wait is for is fixed when it starts (``watch``): named ones, or the jobs of some
queues, or every job, as they exist then; jobs added later are not waited for. It sleeps on
the store's waker for ended jobs (``Db.waker(ends=True)``: SQLite's ``data_version``,
PostgreSQL's ``LISTEN queuectl_ends``), never polling in a loop, and at each wake reads only
the ledger's job-ending events since its last look, then the states of the jobs they name,
so a look costs what changed, not what is waited for. The jobs projection has the last
word: a job that ended and was sent back (``dlq retry``) before the look is still waited for.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from queuectl import outcome, reads
from queuectl.states import FINAL, State
from queuectl.store import Db

ENDING = ("completed", "dead", "cancelled")  # the events after which a job may be final
SAFETY_LOOK = 5.0  # seconds: a look even without a wake-up (a notification lost meanwhile)
_ENDED = ("SELECT job_id, type FROM events WHERE seq > ? AND seq <= ? AND "
          f"type IN ({', '.join(repr(t) for t in ENDING)}) ORDER BY seq")
_STATE = "SELECT state FROM jobs WHERE id = ?"


class Watch:
    """The jobs a wait is for and their states as last looked at, from ledger seq ``head``."""

    def __init__(self, states: dict[str, str], head: int) -> None:
        self.states = states
        self.head = head
        self._open = {job_id for job_id, state in states.items() if state not in FINAL}

    @property
    def total(self) -> int:
        return len(self.states)

    @property
    def unfinished(self) -> list[str]:
        return [job_id for job_id in self.states if job_id in self._open]

    @property
    def finished(self) -> bool:
        return not self._open

    @property
    def done(self) -> int:
        return self.total - len(self._open)

    @property
    def failed(self) -> int:
        """Jobs that ended without completing (dead or cancelled)."""
        return sum(1 for s in self.states.values() if s in (State.DEAD, State.CANCELLED))

    def counts(self) -> dict[str, int]:
        """Jobs per final state (every one, zeros too), and ``unfinished``."""
        found = Counter(s if s in FINAL else "unfinished" for s in self.states.values())
        return {s: found[s] for s in (*FINAL, "unfinished")}

    def look(self, conn: Db) -> bool:
        """Read what ended since the last look; whether any job of the wait became final."""
        with conn.snapshot():
            head = reads.head(conn)
            if head == self.head:
                return False
            ended = {job_id: type_ for job_id, type_ in conn.execute(_ENDED, (self.head, head))
                     if job_id in self._open}
            self.head = head
            changed = False
            for job_id, type_ in ended.items():
                row = conn.execute(_STATE, (job_id,)).fetchone()
                state = type_ if row is None else row[0]  # no row: pruned since it ended
                self.states[job_id] = state
                if state in FINAL:
                    self._open.discard(job_id)
                    changed = True
            return changed


def watch(conn: Db, ids: Iterable[str] = (), queues: Iterable[str] = (),
          every: bool = False) -> Watch:
    """The jobs to wait for, read in one snapshot: ``ids`` (each must exist: NotFound), the
    jobs of ``queues`` and, with ``every``, every job, as they are now."""
    states: dict[str, str] = {}
    with conn.snapshot():
        head = reads.head(conn)
        for job_id in ids:
            states[job_id] = reads.get_job(conn, job_id).state
        if every:
            states.update(conn.execute("SELECT id, state FROM jobs ORDER BY seq").fetchall())
        for queue in queues:
            states.update(conn.execute("SELECT id, state FROM jobs WHERE queue = ? ORDER BY seq",
                                       (queue,)).fetchall())
    return Watch(states, head)


def until_final(opened: Callable[[], AbstractContextManager[Db]], jobs: Watch,
                timeout: float | None = None,
                changed: Callable[[Watch], None] | None = None) -> bool:
    """Block until every job of ``jobs`` is final (True) or ``timeout`` seconds have passed
    (False); ``changed`` is called after each look that saw a job end. ``opened`` lends the
    connection for each look (a ``Queue`` shares it between threads). Ctrl-C
    (KeyboardInterrupt) goes through, leaving the jobs as they are."""
    if jobs.finished:
        return True
    deadline = None if timeout is None else time.monotonic() + timeout
    with opened() as conn:
        waker = conn.waker(ends=True)
    try:
        while True:
            seen = waker.generation
            with opened() as conn:
                if jobs.look(conn) and changed is not None:
                    changed(jobs)
            if jobs.finished:
                return True
            left = SAFETY_LOOK if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            waker.wait(seen, min(left, SAFETY_LOOK))
    finally:
        waker.close()


def exit_status(jobs: Watch, finished: bool) -> int:
    """``wait``'s exit code: 124 when its timeout ran out first, 1 when any job ended dead or
    cancelled, else 0."""
    if not finished:
        return outcome.TIMED_OUT
    return 1 if jobs.failed else 0


def codes(conn: Db, jobs: Watch) -> dict[str, int | None]:
    """Each job's ``outcome.exit_code`` (None while unfinished), the unfinished jobs' states
    read again (a pending job may be running now): what a report of the wait shows."""
    with conn.snapshot():
        for job_id in jobs.unfinished:
            row = conn.execute(_STATE, (job_id,)).fetchone()
            if row is not None and row[0] not in FINAL:  # one that just ended waits a look
                jobs.states[job_id] = row[0]
        return {job_id: outcome.of_job(conn, job_id, state)
                for job_id, state in jobs.states.items()}
