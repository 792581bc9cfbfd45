"""What follows from one job to others, for every module that decides: the ids a ledger
event makes, whether ids are taken, the jobs a completion unblocks, and the jobs a cancel
takes with it.

``decisions`` (people's actions), ``claims`` (workers' results) and ``schedules`` (ticks)
all call these, inside their own write transaction; each returns the events to append and
appends nothing itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from queuectl import events as ev
from queuectl.errors import Conflict
from queuectl.states import State
from queuectl.store import Db

# Job ids, and the names of queues and schedules, which follow the same rules.
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
BATCH = 2000  # ids per IN (...) query


# -- made ids ---------------------------------------------------------------------------------


def spell(seq: int, prefix: str = "") -> str:
    """The id made for the record a ledger event creates: the event's seq in plain decimal
    (``1042``; a worker's with a ``w``: ``w17``), short to type as every shell queue's ids
    are, and never repeated within a database whichever process made it. Ids sort by
    number only among ids of as many digits: listings order by seq, never by id."""
    return f"{prefix}{seq}"


def made_id(seq: int, taken: Callable[[str], bool], prefix: str = "") -> str:
    """``spell(seq)``, or after a clash with an id a user chose, the first free
    ``spell(seq).N``."""
    made = spell(seq, prefix)
    n = 1
    while taken(made):
        made, n = f"{spell(seq, prefix)}.{n}", n + 1
    return made


# -- existence ----------------------------------------------------------------------------------


def existing(conn: Db, ids: Sequence[str]) -> set[str]:
    """Those of ``ids`` that name a job."""
    found: set[str] = set()
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(f"SELECT id FROM jobs WHERE id IN ({marks})", chunk))
    return found


def refuse_existing(conn: Db, ids: Sequence[str]) -> None:
    """Conflict, naming the first of ``ids`` that a job has already."""
    found = existing(conn, ids)
    if found:
        first = next(job_id for job_id in ids if job_id in found)
        raise Conflict(f"Job with ID '{first}' already exists")


# -- what follows from a job's end ------------------------------------------------------------


def unblocked_by(conn: Db, job_id: str) -> list[ev.Event]:
    """Waiting jobs whose last unfinished dependency is ``job_id`` (about to complete)."""
    rows = conn.execute(
        f"""SELECT d.job_id FROM job_deps d JOIN jobs j ON j.id = d.job_id
        WHERE d.depends_on = ? AND j.state = '{State.WAITING}'
        AND NOT EXISTS (
            SELECT 1 FROM job_deps o JOIN jobs oj ON oj.id = o.depends_on
            WHERE o.job_id = d.job_id AND o.depends_on != ? AND oj.state != '{State.COMPLETED}')
        ORDER BY j.seq""",
        (job_id, job_id),
    ).fetchall()
    return [ev.Unblocked(job_id=r[0], completed=job_id) for r in rows]


def cancel_dependents(conn: Db, job_id: str) -> list[ev.Event]:
    """Cancel every waiting job that depends, directly or not, on a cancelled job."""
    events: list[ev.Event] = []
    queue_, done = [job_id], {job_id}
    while queue_:
        current = queue_.pop(0)
        for (dependent,) in conn.execute(
            f"""SELECT d.job_id FROM job_deps d JOIN jobs j ON j.id = d.job_id
            WHERE d.depends_on = ? AND j.state = '{State.WAITING}' ORDER BY j.seq""",
            (current,),
        ).fetchall():
            if dependent not in done:
                done.add(dependent)
                queue_.append(dependent)
                events.append(ev.Cancelled(
                    job_id=dependent, reason=f"dependency {current} was cancelled"))
    return events


def cancelled_after_run(conn: Db, job_id: str) -> list[ev.Event]:
    """A run that ended with a cancel waiting for it: the cancel wins over a retry."""
    cancelled = ev.Cancelled(job_id=job_id, reason="cancelled by user while running")
    return [cancelled, *cancel_dependents(conn, job_id)]


def held_ahead(conn: Db, job_id: str) -> tuple[str, int] | None:
    """(worker, attempt) of a job claimed ahead of its worker's current one and not yet
    started; None for any other job."""
    row = conn.execute("SELECT worker_id, attempts FROM jobs WHERE id = ? AND ahead != 0",
                       (job_id,)).fetchone()
    return (row[0], int(row[1])) if row else None


def cancel_now(conn: Db, job_id: str) -> list[ev.Event]:
    """The events that cancel a job that is not running, and the jobs waiting on it. One
    held ahead by a worker is given back first (its attempt not counted), so that it never
    starts."""
    events: list[ev.Event] = []
    held = held_ahead(conn, job_id)
    if held is not None:
        events.append(ev.Released(job_id=job_id, worker_id=held[0], attempt=held[1],
                                  reason="cancelled before it started", ahead=True))
    return [*events, ev.Cancelled(job_id=job_id, reason="cancelled by user"),
            *cancel_dependents(conn, job_id)]
