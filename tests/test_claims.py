"""Which job a claim takes, and when: the highest priority first, then the oldest; a
retried job keeps its priority; a delayed or scheduled job is taken at its time, never
before.

Where processes matter real workers run as subprocesses and the ledger is the witness;
the same rules are checked again through the library under a fake clock, without
timing margins.
"""

from __future__ import annotations

import json

import pytest
from conftest import events_of, wait_for
from helpers import (
    FakeClock,
    T,
    added,
    burst,
    claim,
    complete,
    fail,
    job,
    ok,
    rows,
    shown_time,
    state,
    table_row,
    workers,
)

from queuectl import clock

# -- priority -------------------------------------------------------------------------------


def test_single_worker_runs_by_priority_then_oldest(run, conn, tmp_path):
    order = tmp_path / "order.txt"
    for job_id, priority in (("a", "0"), ("b", "5"), ("c", "-2"), ("d", "9"), ("e", "5")):
        added(run, "--id", job_id, "-p", priority, "-c", f"echo {job_id} >> {order}")
    assert [job(conn, j).priority for j in "abcde"] == [0, 5, -2, 9, 5]

    with workers() as start:
        burst(start)

    expected = ["d", "b", "e", "a", "c"]  # priority desc; b and e tie, b is older
    assert [r["job_id"] for r in rows(conn, "claimed")] == expected
    assert [r["job_id"] for r in rows(conn, "completed")] == expected
    assert order.read_text().split() == expected
    # One worker did it all, one job at a time: each run starts after the previous one
    # completed. A run starts at its claim, or, for a job claimed ahead of its worker's
    # current one (--ahead), at its started event.
    assert len({r["worker_id"] for r in rows(conn, "claimed")}) == 1
    ahead = {r["job_id"] for r in rows(conn, "started")}
    starts = [r["seq"] for r in rows(conn, "claimed") if r["job_id"] not in ahead]
    starts += [r["seq"] for r in rows(conn, "started")]
    ends = [r["seq"] for r in rows(conn, "completed")]
    assert ["start" if s in starts else "end" for s in sorted(starts + ends)] == \
        ["start", "end"] * 5
    assert ahead == set()  # no worker claims ahead unless asked to


@pytest.mark.slow
def test_retried_job_keeps_its_priority(run, conn, tmp_path):
    order = tmp_path / "order.txt"
    marker = tmp_path / "failed-once"
    # Two older jobs of priority 0; then r (priority 5) fails its first run and waits 1 s.
    added(run, "--id", "long", "-c", f"echo long >> {order}; sleep 1.6")
    added(run, "--id", "short", "-c", f"echo short >> {order}")
    added(run, "--id", "r", "-p", "5", "--backoff-base", "1", "--max-retries", "1", "-c",
          f"echo r >> {order}; test -f {marker} || {{ touch {marker}; exit 1; }}")

    with workers() as start:
        burst(start)

    # r first (priority); while it waits out its backoff, the oldest job runs; once r is
    # eligible again it still beats the older `short`: it kept its priority.
    ran = sorted(rows(conn, "failed") + rows(conn, "completed"), key=lambda r: r["seq"])
    assert [r["job_id"] for r in ran] == ["r", "long", "r", "short"]
    assert order.read_text().split() == ["r", "long", "r", "short"]
    retry = rows(conn, "scheduled-retry", "r")
    assert len(retry) == 1 and retry[0]["delay"] == 1
    assert job(conn, "r").priority == 5
    assert (state(conn, "r"), job(conn, "r").attempts) == ("completed", 2)


def test_retried_job_keeps_its_priority_exactly(run, conn, monkeypatch):
    """The same rule under a fake clock: no timing margins at all."""
    fake = FakeClock(monkeypatch)
    added(run, "--id", "old1", "-c", "true")
    added(run, "--id", "old2", "-c", "true")
    added(run, "--id", "r", "-p", "5", "--backoff-base", "2", "--max-retries", "1", "-c", "x")
    c = claim(conn, "w1", "r")
    fake.set(1)
    fail(conn, c, "w1")  # retry at t=3
    assert (state(conn, "r"), job(conn, "r").priority) == ("failed", 5)
    fake.set(2)
    complete(conn, claim(conn, "w1", "old1"), "w1", 0.1)  # r not eligible yet
    fake.set(3)
    claim(conn, "w1", "r")  # eligible: priority 5 beats the older old2


# -- delayed and scheduled jobs ---------------------------------------------------------------


@pytest.mark.slow
def test_delayed_job_is_not_run_early_and_runs_within_100ms(run, conn, tmp_path):
    with workers() as start:
        worker = start("-s", "30")  # idle long-poll: only its own timer can wake it on time
        wait_for(lambda: rows(conn, "worker-started"), what="the worker to start")
        job_id = added(run, "--delay", "1.5", "-c", f"echo ran > {tmp_path}/ran")
        enqueued = rows(conn, "enqueued", job_id)[0]
        run_at = enqueued["run_at"]
        # The delay counts from the request (a moment before its write committed).
        assert 1.0 < clock.seconds_between(enqueued["at"], run_at) <= 1.5
        assert state(conn, job_id) == "scheduled"
        assert job(conn, job_id).run_at == run_at
        listed = ok(run, "list")
        assert "scheduled" in table_row(listed, job_id)
        assert any(t in table_row(listed, job_id) for t in shown_time(run_at)), listed
        assert json.loads(ok(run, "list", "--json"))[0]["run_at"] == run_at
        assert json.loads(ok(run, "status", "--json"))["jobs"]["scheduled"] == 1

        wait_for(lambda: "completed" in events_of(conn, job_id), what="the delayed job")
        assert worker.poll() is None  # the same long-running worker did it
    (claimed,) = rows(conn, "claimed", job_id)
    late = clock.seconds_between(run_at, claimed["at"])
    assert 0 <= late <= 0.100, f"claimed {late:.3f}s after its run_at"
    assert claimed["eligible_at"] == run_at
    assert (tmp_path / "ran").read_text() == "ran\n"


def test_scheduled_job_is_not_claimable_before_its_time(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "later", "--delay", "10", "-c", "true")
    added(run, "--id", "at", "--run-at", T(5), "-c", "true")
    assert job(conn, "later").run_at == T(10)
    assert (state(conn, "later"), state(conn, "at")) == ("scheduled", "scheduled")
    fake.set(4.999999)
    claim(conn, "w", None)
    fake.set(5)
    claim(conn, "w", "at")
    fake.set(9.9)
    claim(conn, "w", None)
    assert state(conn, "later") == "scheduled"
    fake.set(10)
    claim(conn, "w", "later")
    assert rows(conn, "claimed", "later")[0]["at"] == T(10)
