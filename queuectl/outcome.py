"""The exit code a script gets for a job that ended: one rule for ``logs --follow``,
``enqueue --follow``, ``enqueue --wait`` and ``wait``, so a shell can treat a queued command
as it would the command itself."""

from __future__ import annotations

from queuectl.records import Job
from queuectl.states import FINAL, State

TIMEOUT = 124  # what timeout(1) exits with when it kills its command
# The jobs projection's last_error for a run killed by its timeout (projections/jobs.py).
_TIMED_OUT = "timed out after "


def is_final(job: Job) -> bool:
    """Whether ``job`` will change no more by itself (completed, dead or cancelled)."""
    return job.state in FINAL


def exit_code(job: Job) -> int:
    """0 when ``job`` completed; when dead, its last run's exit code if it is 1-255 (124
    when the run was killed by its timeout), else 1; 1 when cancelled or not yet final."""
    if job.state == State.COMPLETED:
        return 0
    if job.state == State.DEAD:
        if job.exit_code is not None and 1 <= job.exit_code <= 255:
            return job.exit_code
        if job.exit_code is None and (job.last_error or "").startswith(_TIMED_OUT):
            return TIMEOUT
    return 1
