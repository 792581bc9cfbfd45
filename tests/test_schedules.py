"""Periodic schedules (issue 13, point 3): cron ticks become jobs exactly once, missed ticks
make one catch-up job, a tick behind an unfinished job is skipped, all recorded as events.
Issue 22: a local time the clocks repeat fires once; an expression that never fires is
refused.
Rules are checked under a fake clock through the library; the race and the CLI through real
processes. Every test runs on both stores."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from test_features import FakeClock, T, claim, complete, rows, workers

from queuectl import claims, clock, decisions, ledger, reads, schedules
from queuectl import events as ev


def spec(command: str = "echo tick", **options: Any) -> decisions.JobSpec:
    return decisions.JobSpec(command=command, **options)


def test_a_tick_makes_one_job_named_after_it(conn, monkeypatch, run):
    fake = FakeClock(monkeypatch)  # 2026-01-01T00:00:00Z
    assert schedules.add(conn, "sweep", "*/5 * * * *", spec(queue="ops", priority=3)) == T(300)
    fake.set(299)
    assert schedules.fire_due(conn) == []
    fake.set(300)
    fired = schedules.fire_due(conn)
    assert fired == [ev.ScheduleFired(name="sweep", tick=T(300), job_id="sweep@2026-01-01T00:05:00Z",
                                      next_at=T(600))]
    assert schedules.fire_due(conn) == []  # once
    job = reads.get_job(conn, "sweep@2026-01-01T00:05:00Z")
    assert (job["command"], job["queue"], job["priority"]) == ("echo tick", "ops", 3)
    # Its history shows the tick that made it, before its enqueue.
    types = [event.type for _, _, event in reads.history(conn, job["id"])]
    assert types == ["schedule-fired", "enqueued"]
    listed = json.loads(run("schedule", "list", "--json").output)
    assert [(s["name"], s["next_at"], s["last_job"], s["fired"]) for s in listed] == \
        [("sweep", T(600), job["id"], 1)]


def test_missed_ticks_make_one_catch_up_job(conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    schedules.add(conn, "m", "*/5 * * * *", spec())
    fake.set(3600 + 30)  # no worker ran from 00:05 to 01:00:30: twelve ticks passed
    (fired,) = schedules.fire_due(conn)
    assert isinstance(fired, ev.ScheduleFired)
    assert (fired.tick, fired.missed, fired.next_at) == (T(3600), 11, T(3900))
    assert [r["job_id"] for r in rows(conn, "enqueued")] == ["m@2026-01-01T01:00:00Z"]


def test_a_tick_behind_an_unfinished_job_is_skipped_and_recorded(conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    schedules.add(conn, "slow", "* * * * *", spec())
    fake.set(60)
    schedules.fire_due(conn)
    claims.worker_started(conn, 1, "h", worker_id="w")
    held = claim(conn, "w", "slow@2026-01-01T00:01:00Z")
    fake.set(120)
    (skipped,) = schedules.fire_due(conn)
    assert skipped == ev.ScheduleSkipped(
        name="slow", tick=T(120), reason="its previous job slow@2026-01-01T00:01:00Z is unfinished",
        next_at=T(180), held="slow@2026-01-01T00:01:00Z")
    assert held is not None
    complete(conn, held, "w", 0.1)
    fake.set(180)
    (fired,) = schedules.fire_due(conn)
    assert isinstance(fired, ev.ScheduleFired) and fired.job_id == "slow@2026-01-01T00:03:00Z"
    (row,) = schedules.listed(conn)
    assert (row["fired"], row["skipped"]) == (2, 1)


def test_time_zones_pause_resume_and_remove(conn, monkeypatch, run):
    fake = FakeClock(monkeypatch)
    # 02:00 in Paris is 01:00 UTC in winter and 00:00 UTC in summer.
    assert schedules.add(conn, "nightly", "0 2 * * *", spec(), "Europe/Paris") == T(3600)
    fake.set(182 * 86400)  # 2026-07-02
    (fired,) = schedules.fire_due(conn)
    assert fired.next_at == "2026-07-03T00:00:00.000000Z"
    assert run("schedule", "pause", "nightly").output == "Schedule 'nightly' paused.\n"
    assert run("schedule", "pause", "nightly").output == "Schedule 'nightly' was paused already.\n"
    fake.set(190 * 86400)  # ticks pass while it is paused: none is made, none caught up
    assert schedules.fire_due(conn) == []
    assert run("schedule", "resume", "nightly").output == "Schedule 'nightly' resumed.\n"
    (row,) = schedules.listed(conn)
    assert row["next_at"] == "2026-07-11T00:00:00.000000Z" and not row["paused"]
    assert run("schedule", "remove", "nightly").output == "Schedule 'nightly' removed.\n"
    assert schedules.listed(conn) == []
    assert reads.get_job(conn, fired.job_id)["state"] == "pending"  # its jobs stay
    assert [t for _, t in ledger_types(conn) if t.startswith("schedule-")] == [
        "schedule-added", "schedule-fired", "schedule-paused", "schedule-resumed",
        "schedule-removed"]


def ledger_types(conn: Any) -> list[tuple[int, str]]:
    return conn.execute("SELECT seq, type FROM events ORDER BY seq").fetchall()


def test_threads_racing_for_a_tick_make_one_job(conn, db, monkeypatch):
    """Eight connections handle the same due tick at once: one job, one schedule-fired."""
    FakeClock(monkeypatch)
    schedules.add(conn, "race", "* * * * *", spec())
    monkeypatch.setattr("queuectl.clock.now", lambda: T(90))
    barrier = threading.Barrier(8)
    results: list[list[ev.Event]] = []

    def handle() -> None:
        mine = ledger.connect(db)
        try:
            barrier.wait()
            results.append(schedules.fire_due(mine))
        finally:
            mine.close()

    threads = [threading.Thread(target=handle) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(r) for r in results) == [0] * 7 + [1]
    assert [r["job_id"] for r in rows(conn, "enqueued")] == ["race@2026-01-01T00:01:00Z"]


def test_worker_processes_racing_for_a_due_tick_make_one_job(conn, monkeypatch, run):
    """Three worker processes (two workers each) start with a tick overdue: exactly one job
    is made (the catch-up of every tick missed since the epoch's first minute) and run."""
    FakeClock(monkeypatch)  # the schedule is added in 2026-01-01; the workers run now
    # Daily, half a day from now: ticks were missed since January, and none can come due
    # while the workers run (every minute, one could, and rightly fire a second job).
    hour = (datetime.now(UTC).hour + 12) % 24
    schedules.add(conn, "due", f"0 {hour} * * *", spec("echo due"))
    with workers() as start:
        procs = [start("--burst", "-s", "0.2", "-c", "2") for _ in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
    fired = rows(conn, "schedule-fired")
    assert len(fired) == 1 and fired[0]["missed"] > 0
    assert [r["job_id"] for r in rows(conn, "completed")] == [fired[0]["job_id"]]
    assert "catch-up of" in run("history", fired[0]["job_id"]).output


def test_schedule_cli_add_and_list(run):
    out = run("schedule", "add", "poll", "--cron", "*/5 * * * *", "-c", "echo poll",
              "-q", "web", "--timezone", "Europe/Paris", "--max-retries", "1").output
    assert out.startswith("Schedule 'poll' added; its first job at ") and out.endswith(" UTC.\n")
    again = run("schedule", "add", "poll", "--cron", "@hourly", "-c", "x")
    assert again.exit_code == 1 and "Schedule 'poll' already exists" in again.stderr
    (listed,) = json.loads(run("schedule", "list", "--json").output)
    assert (listed["cron"], listed["timezone"], listed["queue"], listed["max_retries"],
            listed["paused"]) == ("*/5 * * * *", "Europe/Paris", "web", 1, False)
    assert "poll" in run("schedule", "list").output
    assert run("schedule", "add", "h", "--cron", "@HOURLY", "-c", "x").exit_code == 0
    assert [s["cron"] for s in json.loads(run("schedule", "list", "--json").output)] == \
        ["@hourly", "*/5 * * * *"]


# -- clock changes (issue 22, point 2) -------------------------------------------------------


def utc(text: str) -> str:
    """``2026-10-25T00:00`` (UTC) as the ledger writes it."""
    return clock.iso(clock.parse(text + "Z"))


def since_epoch(text: str) -> float:
    return clock.seconds_between(T(0), utc(text))


# Ticks in UTC from a little before a change of clocks to a little after it.
CHANGES = [
    # Clocks go back: a fixed local time that comes twice fires the first time only.
    ("0 2 * * *", "Europe/Paris", ["2026-10-24T00:00", "2026-10-25T00:00", "2026-10-26T01:00"]),
    ("30 1 * * *", "America/New_York",
     ["2026-10-31T05:30", "2026-11-01T05:30", "2026-11-02T06:30"]),
    # Clocks go forward: a local time that never comes fires right after the gap.
    ("0 2 * * *", "Europe/Paris", ["2026-03-28T01:00", "2026-03-29T01:00", "2026-03-30T00:00"]),
    ("30 2 * * *", "America/New_York",
     ["2026-03-07T07:30", "2026-03-08T07:00", "2026-03-09T06:30"]),
    ("0,30 2 * * *", "Europe/Paris",
     ["2026-03-28T01:30", "2026-03-29T01:00", "2026-03-30T00:00"]),
]
# As cron does, a schedule with * in its minute or hour runs by the clock through the
# repeated hour: an hourly job does not stop for an hour.
WILDCARDS = [
    ("0 * * * *", "Europe/Paris",
     ["2026-10-24T23:00", "2026-10-25T00:00", "2026-10-25T01:00", "2026-10-25T02:00"]),
    ("@hourly", "America/New_York",
     ["2026-11-01T04:00", "2026-11-01T05:00", "2026-11-01T06:00", "2026-11-01T07:00"]),
    ("*/30 * * * *", "Europe/Paris",
     ["2026-10-25T00:30", "2026-10-25T01:00", "2026-10-25T01:30", "2026-10-25T02:00"]),
]


@pytest.mark.stores("sqlite")  # no store: the cron arithmetic alone
@pytest.mark.parametrize(("cron", "zone", "ticks"), CHANGES + WILDCARDS)
def test_ticks_across_a_change_of_clocks(cron: str, zone: str, ticks: list[str]) -> None:
    ticks = [utc(t) for t in ticks]
    following = [schedules.next_tick(cron, zone, t) for t in ticks[:-1]]
    assert following == ticks[1:]


@pytest.mark.parametrize(("cron", "zone", "ticks"), CHANGES)
def test_a_worker_fires_each_local_time_once_across_a_change_of_clocks(
        conn, monkeypatch, cron: str, zone: str, ticks: list[str]) -> None:
    ticks = [utc(t) for t in ticks]
    fake = FakeClock(monkeypatch, since_epoch(ticks[0][:16]) - 60)
    assert schedules.add(conn, "n", cron, spec(), zone) == ticks[0]
    claims.worker_started(conn, 1, "h", worker_id="w")
    for tick, following in zip(ticks, ticks[1:], strict=False):
        fake.set(since_epoch(tick[:16]) + 30)
        (fired,) = schedules.fire_due(conn)
        assert fired == ev.ScheduleFired(name="n", tick=tick, job_id=schedules.job_id("n", tick),
                                         next_at=following)
        held = claim(conn, "w", fired.job_id)
        assert held is not None
        complete(conn, held, "w", 0.1)
        # Looking every quarter of an hour up to the next tick finds nothing due.
        for quarter in range(int(clock.seconds_between(tick, following) // 900)):
            fake.set(since_epoch(tick[:16]) + 60 + 900 * quarter)
            assert schedules.fire_due(conn) == []
    assert [r["job_id"] for r in rows(conn, "enqueued")] == \
        [schedules.job_id("n", t) for t in ticks[:-1]]


# -- expressions that never fire (issue 22, point 6) -----------------------------------------


@pytest.mark.parametrize("expression", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4 *"])
def test_a_cron_expression_that_never_fires_is_refused(conn, run, expression: str) -> None:
    result = run("schedule", "add", "x", "--cron", expression, "-c", "true")
    assert (result.exit_code, result.stdout, result.stderr) == \
        (1, "", f"Error: cron expression '{expression}' never fires\n")
    assert ledger_types(conn) == [] and schedules.listed(conn) == []


@pytest.mark.stores("sqlite")  # no store: the cron arithmetic alone
def test_rare_cron_expressions_are_accepted() -> None:
    # Leap days only; and February's 31st or any Monday in February (cron's either-day rule).
    assert schedules.check_cron("0 0 29 2 *") == "0 0 29 2 *"
    assert schedules.check_cron("0 0 31 2 1") == "0 0 31 2 1"
