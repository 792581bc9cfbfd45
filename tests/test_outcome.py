"""The exit code scripts get for a job that ended (queuectl.outcome), on jobs ended by
real workers: completed, dead by exit code, by a signal, by a timeout, and cancelled."""

from __future__ import annotations

import pytest
from helpers import added, burst, job, workers

from queuectl import outcome


@pytest.mark.parametrize(("command", "flags", "code"), [
    ("true", (), 0),
    ("exit 3", (), 3),
    ("exit 255", (), 255),
    ("kill -9 $$", (), 1),
    ("sleep 5", ("--timeout", "0.3"), 124),
])
def test_exit_code_of_an_ended_job(run, conn, command, flags, code):
    job_id = added(run, "-c", command, "--max-retries", "0", *flags)
    with workers() as start:
        burst(start)
    assert outcome.of_job(conn, job_id, job(conn, job_id).state) == code


def test_a_cancelled_job_exits_1_and_an_unfinished_one_has_no_code(run, conn):
    waiting = added(run, "-c", "true", "--delay", "3600")
    assert outcome.of_job(conn, waiting, job(conn, waiting).state) is None
    run("cancel", waiting)
    assert outcome.of_job(conn, waiting, job(conn, waiting).state) == 1
