"""Periodic schedules (issue 13, point 3): cron ticks become jobs exactly once, missed ticks
make one catch-up job, a tick behind an unfinished job is skipped, all recorded as events.
Issue 22: a local time the clocks repeat fires once; a long outage is caught up in a few
steps, outside the write lock; an expression that never fires is refused.
Rules are checked under a fake clock through the library; the race and the CLI through real
processes. Every test runs on both stores."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import zoneinfo
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import needs
from helpers import FakeClock, T, claim, complete, rows, workers

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
    assert (job.command, job.queue, job.priority) == ("echo tick", "ops", 3)
    # Its history shows the tick that made it, before its enqueue.
    types = [event.type for _, _, event in reads.history(conn, job.id)]
    assert types == ["schedule-fired", "enqueued"]
    listed = json.loads(run("schedule", "list", "--json").output)
    assert [(s["name"], s["next_at"], s["last_job"], s["fired"]) for s in listed] == \
        [("sweep", T(600), job.id, 1)]


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
    assert reads.get_job(conn, fired.job_id).state == "pending"  # its jobs stay
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
    # Looking back finds the same ticks: each is the latest at or before itself, and
    # still the latest until the next one.
    assert [schedules.latest_tick(cron, zone, t) for t in ticks] == ticks
    assert [schedules.latest_tick(cron, zone, clock.after(t, -1)) for t in ticks[1:]] == \
        ticks[:-1]


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


def test_a_repeated_tick_an_older_version_named_is_handled_once(conn, monkeypatch):
    """A ledger written before the rule may name the second 02:00 as a schedule's next
    tick: it is handled, and the next is the next day's."""
    fake = FakeClock(monkeypatch, since_epoch("2026-10-25T00:30"))
    with ledger.write(conn):
        ledger.append(conn, ev.ScheduleAdded(name="n", cron="0 2 * * *", command="true",
                                             next_at=utc("2026-10-25T01:00"),
                                             timezone="Europe/Paris"))
    fake.set(since_epoch("2026-10-25T01:00") + 30)
    (fired,) = schedules.fire_due(conn)
    assert (fired.tick, fired.missed, fired.next_at) == \
        (utc("2026-10-25T01:00"), 0, utc("2026-10-26T01:00"))


# -- catching up after an outage (issue 22, point 3) ------------------------------------------


class Steps:
    """Counts croniter's steps, and those taken while the ledger's write lock is held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from croniter import croniter

        self.taken = self.locked = 0
        self.held = False
        for name in ("get_next", "get_prev"):
            monkeypatch.setattr(croniter, name, self._counted(getattr(croniter, name)))
        write = schedules.write

        @contextmanager
        def counted_write(conn: Any) -> Iterator[None]:
            with write(conn):
                self.held = True
                try:
                    yield
                finally:
                    self.held = False

        monkeypatch.setattr(schedules, "write", counted_write)

    def _counted(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.taken += 1
            self.locked += self.held
            return step(*args, **kwargs)
        return counted


# Paris changes its clocks on 29 March: the ticks of that day are walked.
@pytest.mark.parametrize(("zone", "most"), [("UTC", 4), ("Europe/Paris", 4 + 1440)])
def test_a_long_outage_catches_up_in_one_fire_for_the_latest_tick(
        conn, monkeypatch, zone: str, most: int) -> None:
    fake = FakeClock(monkeypatch)
    schedules.add(conn, "m", "* * * * *", spec(), zone)
    steps = Steps(monkeypatch)
    days = 100
    fake.set(days * 86400 + 30)  # no worker ran for a hundred days
    (fired,) = schedules.fire_due(conn)
    assert fired == ev.ScheduleFired(name="m", tick=T(days * 86400),
                                     job_id="m@2026-04-11T00:00:00Z",
                                     next_at=T(days * 86400 + 60), missed=days * 1440 - 1)
    assert [r["job_id"] for r in rows(conn, "enqueued")] == ["m@2026-04-11T00:00:00Z"]
    # Steps find the latest tick and the next, and count the missed; none under the lock.
    assert steps.taken <= most and steps.locked == 0


def test_a_tick_that_passes_while_waiting_for_the_lock_is_the_one_handled(conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    schedules.add(conn, "m", "*/5 * * * *", spec())
    write = schedules.write

    @contextmanager
    def slow_write(conn: Any) -> Iterator[None]:
        fake.set(600 + 30)  # the lock came after the next tick
        with write(conn):
            yield

    monkeypatch.setattr(schedules, "write", slow_write)
    fake.set(300 + 30)
    (fired,) = schedules.fire_due(conn)
    assert (fired.tick, fired.missed, fired.next_at) == (T(600), 1, T(900))


# Ticks counted without walking them must be the ticks walked, from and to any time,
# across changes of clocks (Lord Howe's are half an hour; Santiago's come at midnight;
# Casey's went back three hours across midnight), and the latest tick found looking back
# must be the latest.
COUNTED = ["*/7 * * * *", "0 * * * *", "30 2 * * *", "30 23 * * *", "15,45 1-3 * * *",
           "0 0 * * 1", "*/20 9-17 * * 1-5", "0 12 L * *", "0 0 1,15 * 0", "@daily"]
ZONES = {"UTC": 2026, "Europe/Paris": 2026, "America/New_York": 2026,
         "Australia/Lord_Howe": 2026, "America/Santiago": 2026, "Antarctica/Casey": 2010}


def changes_of_clocks(zone: str, year: int) -> list[datetime]:
    """The days (UTC midnights) before which ``zone`` changed its offset in ``year``."""
    tz = ZoneInfo(zone)
    days = [datetime(year, 1, 1, tzinfo=UTC) + timedelta(days=d) for d in range(366)]
    return [b for a, b in pairwise(days) if a.astimezone(tz).utcoffset() != b.astimezone(tz).utcoffset()]


def assert_counted(cron: str, zone: str, start: datetime, end: datetime) -> None:
    """Counts from ``start`` to times between, and from times between to ``end``, against
    the ticks walked; the times fall a ragged step apart, in gaps and repeats too."""
    a, b = clock.iso(start), clock.iso(end)
    ticks = [schedules.next_tick(cron, zone, a)]
    while ticks[-1] <= b:
        ticks.append(schedules.next_tick(cron, zone, ticks[-1]))
    ticks.pop()  # the first after ``end``
    between = [clock.iso(start + (end - start) * k / 8) for k in range(9)]
    for t in between:
        assert schedules.count_ticks(cron, zone, a, t) == bisect_right(ticks, t), (a, t)
        assert schedules.count_ticks(cron, zone, t, b) == len(ticks) - bisect_right(ticks, t), (t, b)
        latest = schedules.latest_tick(cron, zone, t)
        assert latest <= t < schedules.next_tick(cron, zone, latest)


@pytest.mark.stores("sqlite")  # no store: the cron arithmetic alone
@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("cron", COUNTED)
def test_missed_ticks_are_counted_as_walking_them_would(cron: str, zone: str) -> None:
    for day in changes_of_clocks(zone, ZONES[zone]):
        assert_counted(cron, zone, day - timedelta(days=1, minutes=7, seconds=30),
                       day + timedelta(days=1))
    assert_counted(cron, zone, datetime(2026, 1, 1, tzinfo=UTC),
                   datetime(2026, 1, 9, 0, 1, tzinfo=UTC))


@pytest.mark.stores("sqlite")  # no store: the cron arithmetic alone
def test_ticks_are_counted_from_and_to_a_time_repeated_across_midnight() -> None:
    """Casey went back from 02:00 to 23:00 the day before: 15:30 UTC on 4 March 2010 was
    23:30 a second time, a local date before the day it falls in."""
    for cron in COUNTED:
        assert_counted(cron, "Antarctica/Casey", datetime(2010, 3, 3, 15, 30, tzinfo=UTC),
                       datetime(2010, 3, 5, 15, 30, tzinfo=UTC))


@pytest.mark.stores("sqlite")  # no store: the cron arithmetic alone
def test_ticks_are_counted_where_the_clocks_skip_to_or_over_midnight(tmp_path) -> None:
    """Zones of our making: one goes forward from 23:00 to midnight (what it skipped fires
    at the midnight of the next day); one from 23:30 to 00:30 (a day of 24 hours whose
    local times are not its hours from midnight)."""
    zic = shutil.which("zic") or "/usr/sbin/zic"
    needs(zic, "apt-get install libc-bin")
    source = tmp_path / "zones.txt"
    source.write_text("Zone Test/Midnight 0:00 - A 2026 Mar 28 23:00\n 1:00 - B\n"
                      "Zone Test/Straddle 0:00 - A 2026 Mar 28 23:30\n 1:00 - B\n")
    subprocess.run([zic, "-d", str(tmp_path / "zones"), str(source)], check=True)
    zoneinfo.reset_tzpath([str(tmp_path / "zones")])
    try:
        for zone in ("Test/Midnight", "Test/Straddle"):
            for cron in COUNTED:
                assert_counted(cron, zone, datetime(2026, 3, 27, 0, 7, 30, tzinfo=UTC),
                               datetime(2026, 3, 30, tzinfo=UTC))
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()


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
