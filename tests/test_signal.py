"""``queuectl signal``: the worker running a job sends the signal to the run's whole process
group within a second, on either store (the request goes through the store, so across
hosts too), and records that it did; a job that is not running is refused."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import events_of, wait_for
from helpers import (
    added,
    claim,
    fail,
    kill_leftovers,
    ok,
    one_error,
    rows,
    snapshot,
    state,
    workers,
)

from queuectl import claims, decisions
from queuectl.errors import InvalidInput


@pytest.mark.slow
def test_signal_reaches_the_running_job_within_a_second(run, conn, tmp_path):
    got = tmp_path / "got.txt"
    # A sleep argument no other process here uses: not even this test on the other store,
    # run beside it by another pytest process, whose clean-up would kill this one's job.
    unique = f"0.1093{os.getpid() % 100_000:05d}"
    command = (f"trap 'echo USR1 >> {got}' USR1; i=0; "
               f"while [ $i -lt 300 ]; do sleep {unique}; i=$((i+1)); done")
    try:
        with workers() as start:
            start("-s", "30")
            added(run, "--id", "long", "-c", command)
            wait_for(lambda: state(conn, "long") == "processing", 20, "the claim")
            time.sleep(0.3)  # the shell has set its trap
            asked = time.monotonic()
            out = ok(run, "signal", "long", "usr1")
            wait_for(got.exists, 5, "the trap to run", interval=0.005)
            took = time.monotonic() - asked
            (claimed,) = rows(conn, "claimed", "long")
            assert out == (f"SIGUSR1 requested for job long; worker {claimed['worker_id']} "
                           "will send it.\n")
            assert got.read_text() == "USR1\n"
            wait_for(lambda: rows(conn, "signalled", "long"), 5, "the signalled event")
            assert state(conn, "long") == "processing"  # it trapped the signal: still runs

            # A second request is a second delivery; KILL ends the run, which then fails.
            ok(run, "signal", "long", "SIGKILL")
            wait_for(lambda: state(conn, "long") == "failed", 5, "the killed run to fail")
    finally:
        kill_leftovers(f"sleep {unique}")
    assert took < 1.0, took
    requests = rows(conn, "signal-requested", "long")
    done = rows(conn, "signalled", "long")
    assert [r["signal"] for r in requests] == [int(signal.SIGUSR1), int(signal.SIGKILL)]
    assert [d["request"] for d in done] == [r["seq"] for r in requests]
    assert all(d.get("delivered", True) and not d.get("error") for d in done)
    print(f"signal delivered {took:.3f}s after it was asked for")
    assert {r["run"] for r in requests} == {claimed["seq"]}
    (failed,) = rows(conn, "failed", "long")
    assert failed["error"] == "killed by signal SIGKILL"
    assert "SIGUSR1 sent to attempt 1's process group" in ok(run, "history", "long")
    assert "signalled" in events_of(conn, "long")


def test_signal_refuses_a_job_that_is_not_running(run, conn):
    added(run, "--id", "pend", "-c", "true")
    added(run, "--id", "sched", "--delay", "3600", "-c", "true")
    added(run, "--id", "retry", "-p", "5", "--backoff-base", "100", "-c", "false")
    fail(conn, claim(conn, "w", "retry"), "w")
    for job_id, was in (("pend", "pending"), ("sched", "scheduled"), ("retry", "failed")):
        before = snapshot(conn)
        one_error(run("signal", job_id, "TERM"),
                  f"Job {job_id} is not running (state: {was}); only a running job can be "
                  "signalled")
        assert snapshot(conn) == before
    one_error(run("signal", "nope", "TERM"), "Job 'nope' not found")
    before = snapshot(conn)
    one_error(run("signal", "pend", "FOO"), "signal 'FOO': give one of TERM, INT, HUP")
    assert snapshot(conn) == before


@pytest.mark.stores("sqlite")  # no store involved
def test_signal_names_and_numbers():
    for text, sig in (("TERM", signal.SIGTERM), ("sigint", signal.SIGINT), ("Hup", signal.SIGHUP),
                      ("SIGUSR1", signal.SIGUSR1), ("usr2", signal.SIGUSR2),
                      ("KILL", signal.SIGKILL), ("sigSTOP", signal.SIGSTOP),
                      ("cont", signal.SIGCONT), ("9", signal.SIGKILL), ("10", 10)):
        assert decisions.parse_signal(text) == int(sig), text
    # Unicode digits and a number too long for int(): one clear error, not a ValueError.
    for text in ("", "SIG", "0", "-1", "999", "SEGV", "term1", "1.5", "²", "٩", "9" * 5000):
        with pytest.raises(InvalidInput):
            decisions.parse_signal(text)


def test_a_request_is_for_its_run_only(run, conn):
    """A signal asked for a run that ended before its worker delivered it is never sent to
    a later run of the job (the request names the run's claim)."""
    added(run, "--id", "j", "--backoff-base", "1", "-c", "false")
    first = claim(conn, "w", "j")
    ok(run, "signal", "j", "HUP")
    assert [s for _, s in claims.signals_asked(conn, "j")] == [int(signal.SIGHUP)]
    fail(conn, first, "w")
    again = wait_for(lambda: claims.claim(conn, "w"), 5, "the retry")
    assert (again.job_id, again.attempt) == ("j", 2)
    assert claims.signals_asked(conn, "j") == []
    ok(run, "signal", "j", "USR2")
    ((request, sig),) = claims.signals_asked(conn, "j")
    claims.signalled(conn, again, "w", request, sig)
    assert claims.signals_asked(conn, "j") == []
    assert json.loads(ok(run, "history", "j", "--json"))[-1]["type"] == "signalled"
