"""How a finished job ends a command that waited for it: ``wait``, ``enqueue --wait``,
``logs --follow`` and ``Queue.wait`` give a script the same answer.

The rule (``exit_code``): 0 when the job completed; when it is dead, the exit code of its
last run if that lies in 1-255 (a script sees the command's own failure), 124 when that run
was killed for its timeout (as timeout(1) says so), else 1 (a run lost with its worker, a
signal); 1 when it was cancelled. A job that is not final has no code yet.
"""

from __future__ import annotations

from queuectl.states import State
from queuectl.store import Db

TIMED_OUT = 124  # timeout(1)'s code; also what `wait --timeout` exits with when it runs out
_LAST_RUN = ("SELECT outcome, exit_code FROM runs WHERE job_id = ? "
             "ORDER BY seq DESC LIMIT 1")


def exit_code(state: str, last_outcome: str | None = None, last_exit: int | None = None
              ) -> int | None:
    """The code a command that waited for a job exits with, from the job's state and its
    last run (the ``runs`` outcome, such as ``failed`` or ``timed-out``, and exit code);
    None while the job is not final."""
    if state == State.COMPLETED:
        return 0
    if state == State.CANCELLED:
        return 1
    if state != State.DEAD:
        return None
    if last_outcome == "timed-out":
        return TIMED_OUT
    if last_exit is not None and 1 <= last_exit <= 255:
        return last_exit
    return 1


def last_run(conn: Db, job_id: str) -> tuple[str | None, int | None]:
    """The outcome and exit code of a job's last run; ``(None, None)`` if it never ran."""
    row = conn.execute(_LAST_RUN, (job_id,)).fetchone()
    return (None, None) if row is None else (row[0], row[1])


def of_job(conn: Db, job_id: str, state: str) -> int | None:
    """``exit_code`` of a job in ``state``, its last run read from the ``runs`` projection
    only when it matters (a dead job)."""
    if state != State.DEAD:
        return exit_code(state)
    return exit_code(state, *last_run(conn, job_id))
