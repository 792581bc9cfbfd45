"""Periodic jobs: a schedule enqueues its command at each tick of a cron expression.

Cron expressions are read by croniter (standard 5 fields, or ``@hourly``-style aliases) in
the schedule's time zone (``zoneinfo``), with cron's rule for the clocks going back: a fixed
time of day they repeat is one tick. Every decision is an event: adding, pausing,
resuming and removing a schedule, and each tick a worker handles (``schedule-fired`` with
the job it made, or ``schedule-skipped`` saying why not), each naming the tick after it.
Any worker may handle a due tick: it does so under the ledger's write lock, reading the
schedule again there, so a tick makes one job however many workers race for it, and the
job's id (``NAME@TICK``) could not be made twice anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, tzinfo
from typing import Any

from queuectl import clock, decisions
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, write
from queuectl.states import HOLDS_KEY
from queuectl.store import Db

# The aliases of the classic crons (Vixie cron's); @reboot has no meaning for a queue.
ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                     "@hourly"})
MAX_MISSED = 100_000  # ticks counted as missed at most (a minutely schedule idle 69 days)
_NAME_LIMIT = 96  # a job id is NAME@TICK, and ids are at most 128 characters


def check_cron(expression: str) -> str:
    """The expression, spaces normalised, if croniter reads it as standard cron and it
    names at least one time (``0 0 31 2 *`` reads well and never comes)."""
    expression = " ".join(expression.split())
    if expression.startswith("@"):
        if expression.lower() not in ALIASES:
            raise InvalidInput(f"cron expression {expression!r}: the aliases are "
                               + ", ".join(sorted(ALIASES)))
        return expression.lower()
    if len(expression.split()) != 5:
        raise InvalidInput(f"cron expression {expression!r} must have 5 fields "
                           "(minute hour day-of-month month day-of-week) or be an alias "
                           "such as @hourly")
    from croniter import CroniterBadDateError, croniter

    if not croniter.is_valid(expression):
        raise InvalidInput(f"cron expression {expression!r} is not valid")
    try:  # a date cron can name recurs within 40 years; croniter looks 50 ahead
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidInput(f"cron expression {expression!r} never fires") from None
    return expression


def check_timezone(name: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {name!r} (an IANA name, such as "
                           "Europe/Paris or UTC)") from None
    return name


def check_name(name: str) -> str:
    if not decisions._ID.fullmatch(name) or len(name) > _NAME_LIMIT or "@" in name:
        raise InvalidInput(f"schedule name {name!r} must be 1-{_NAME_LIMIT} letters, digits "
                           "or ._:/+- and start with a letter or digit")
    return name


# -- ticks ------------------------------------------------------------------------------------


def next_tick(cron: str, timezone: str, after: str) -> str:
    """The first tick of ``cron`` (in ``timezone``) strictly after ``after``, in UTC."""
    return clock.iso(next(_ticks(cron, timezone, clock.parse(after))))


def _ticks(cron: str, timezone: str, at: datetime) -> Iterator[datetime]:
    """The ticks after ``at``, in UTC. A fixed time of day that comes twice when the clocks
    go back is a tick the first time only, as cron runs it; clocks that go forward over it
    make croniter tick right after the gap."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    zone = ZoneInfo(timezone)
    ticks = croniter(cron, at.astimezone(zone))
    once = _fixed_time(cron)
    while True:
        moment = ticks.get_next(datetime).astimezone(UTC)
        if not (once and _repeated(moment, zone)):
            yield moment


def _fixed_time(cron: str) -> bool:
    """Whether ``cron`` names fixed times of day. Cron (Vixie's, cronie) runs only these
    once in a repeated hour: one with * in its minute or hour (``*/5 * * * *``,
    ``@hourly``) runs by the clock, as it does every other hour."""
    if cron.startswith("@"):
        return cron != "@hourly"
    minute, hour = cron.split()[:2]
    return "*" not in minute + hour


def _repeated(moment: datetime, zone: tzinfo) -> bool:
    """Whether the local time at ``moment`` came once already (the clocks went back)."""
    local = moment.astimezone(zone)
    return bool(local.fold) and local.utcoffset() != local.replace(fold=0).utcoffset()


def job_id(name: str, tick: str) -> str:
    """``NAME@2026-12-01T02:00:00Z``: the schedule and the tick that made the job."""
    return f"{name}@{clock.parse(tick).strftime('%Y-%m-%dT%H:%M:%SZ')}"


# -- what people do -------------------------------------------------------------------------


def add(conn: Db, name: str, cron: str, spec: decisions.JobSpec, timezone: str = "UTC") -> str:
    """Add a schedule; returns its first tick. ``spec`` gives the command and the job
    options each job it makes gets (its id and times are the schedule's own)."""
    check_name(name)
    cron = check_cron(cron)
    check_timezone(timezone)
    decisions.check_spec(spec)
    if spec.id is not None or spec.after or spec.run_at or spec.delay or spec.unique_key:
        raise InvalidInput("a schedule's jobs take no id, dependencies, times or unique key")
    with write(conn):
        if _row(conn, name) is not None:
            raise Conflict(f"Schedule '{name}' already exists")
        first = next_tick(cron, timezone, conn.now())
        append(conn, ev.ScheduleAdded(
            name=name, cron=cron, command=spec.command, next_at=first, timezone=timezone,
            queue=spec.queue, priority=spec.priority, max_retries=spec.max_retries,
            backoff_base=spec.backoff_base, timeout=spec.timeout))
    return first


def remove(conn: Db, name: str) -> None:
    with write(conn):
        _known(conn, name)
        append(conn, ev.ScheduleRemoved(name=name))


def pause(conn: Db, name: str, paused: bool = True) -> bool:
    """Pause a schedule (or resume it, from its next tick after now); False, writing
    nothing, when it already was."""
    with write(conn):
        row = _known(conn, name)
        if bool(row["paused"]) == paused:
            return False
        if paused:
            append(conn, ev.SchedulePaused(name=name))
        else:
            following = next_tick(row["cron"], row["timezone"], conn.now())
            append(conn, ev.ScheduleResumed(name=name, next_at=following))
    return True


_COLUMNS = ("name, cron, timezone, command, queue, priority, max_retries, backoff_base, "
            "timeout, paused, next_at, last_tick, last_job, fired, skipped, created_at, "
            "updated_at")


def listed(conn: Db) -> list[dict[str, Any]]:
    found = conn.execute(f"SELECT {_COLUMNS} FROM schedules ORDER BY name")
    names = [d[0] for d in found.description]
    return [dict(zip(names, row, strict=True)) for row in found.fetchall()]


def _row(conn: Db, name: str) -> dict[str, Any] | None:
    found = conn.execute(f"SELECT {_COLUMNS} FROM schedules WHERE name = ?", (name,))
    names = [d[0] for d in found.description]
    row = found.fetchone()
    return None if row is None else dict(zip(names, row, strict=True))


def _known(conn: Db, name: str) -> dict[str, Any]:
    row = _row(conn, name)
    if row is None:
        raise NotFound(f"Schedule '{name}' not found")
    return row


# -- what workers do --------------------------------------------------------------------------

_DUE = "SELECT name FROM schedules WHERE paused = 0 AND next_at <= ? ORDER BY next_at, name"


def next_due(conn: Db) -> str | None:
    """The earliest tick of a running schedule: when a worker should look again."""
    return conn.execute("SELECT min(next_at) FROM schedules WHERE paused = 0").fetchone()[0]


def fire_due(conn: Db) -> list[ev.Event]:
    """Handle every schedule's due tick: enqueue its job, or record why not. A lock-free
    look comes first, so workers take the write lock only when a tick is due.

    Ticks missed (no worker ran while they passed) make one job, for the latest of them,
    recorded with how many went before it. A tick whose schedule's previous job is still
    unfinished is skipped and recorded: jobs do not pile up behind a slow one."""
    if not conn.execute(_DUE, (conn.now(),)).fetchall():
        return []
    events: list[ev.Event] = []
    with write(conn):
        now = conn.now()
        for (name,) in conn.execute(_DUE, (now,)).fetchall():  # read again under the lock
            events += _fire(conn, _known(conn, name), now)
    return events


def _fire(conn: Db, row: dict[str, Any], now: str) -> list[ev.Event]:
    cron, timezone, tick = row["cron"], row["timezone"], row["next_at"]
    missed = 0
    while missed < MAX_MISSED and (later := next_tick(cron, timezone, tick)) <= now:
        tick, missed = later, missed + 1
    following = next_tick(cron, timezone, now)
    name, made = row["name"], job_id(row["name"], tick)
    held = row["last_job"]
    if held is not None:
        state = conn.execute("SELECT state FROM jobs WHERE id = ?", (held,)).fetchone()
        if state is None or state[0] not in HOLDS_KEY:
            held = None
    if held is None and decisions._existing(conn, [made]):
        skipped: ev.Event = ev.ScheduleSkipped(
            name=name, tick=tick, reason=f"job id {made} is taken", next_at=following,
            missed=missed)
        append(conn, skipped)
        return [skipped]
    if held is not None:
        skipped = ev.ScheduleSkipped(
            name=name, tick=tick, reason=f"its previous job {held} is unfinished",
            next_at=following, held=held, missed=missed)
        append(conn, skipped)
        return [skipped]
    fired = ev.ScheduleFired(name=name, tick=tick, job_id=made, next_at=following,
                             missed=missed)
    append(conn, fired)
    spec = decisions.JobSpec(command=row["command"], id=made, queue=row["queue"],
                             priority=row["priority"], max_retries=row["max_retries"],
                             backoff_base=row["backoff_base"], timeout=row["timeout"])
    decisions._enqueue(conn, [spec])
    return [fired]


