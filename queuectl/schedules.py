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

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

import msgspec

from queuectl import actor, cascade, clock, decisions
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, write
from queuectl.states import HOLDS_KEY
from queuectl.store import Db

# The aliases of the classic crons (Vixie cron's); @reboot has no meaning for a queue.
ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                     "@hourly"})
_NAME_LIMIT = 96  # a job id is NAME@TICK, and ids are at most 128 characters
_DAY = timedelta(days=1)
_INSTANT = timedelta(microseconds=1)


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
    if not cascade.ID.fullmatch(name) or len(name) > _NAME_LIMIT or "@" in name:
        raise InvalidInput(f"schedule name {name!r} must be 1-{_NAME_LIMIT} letters, digits "
                           "or ._:/+- and start with a letter or digit")
    return name


# -- ticks ------------------------------------------------------------------------------------


def next_tick(cron: str, timezone: str, after: str) -> str:
    """The first tick of ``cron`` (in ``timezone``) strictly after ``after``, in UTC."""
    return clock.iso(next(_ticks(cron, timezone, clock.parse(after))))


def latest_tick(cron: str, timezone: str, at: str) -> str:
    """The last tick of ``cron`` (in ``timezone``) at or before ``at``, in UTC."""
    return _around(cron, timezone, at)[0]


def count_ticks(cron: str, timezone: str, start: str, end: str) -> int:
    """How many ticks come after ``start`` up to ``end``, counted a local day at a time, so
    the cost grows with the days between, not the ticks: a day the clocks keep has the
    expression's times of day if it is one of its days; a day they change is walked."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(timezone)
    done, last = clock.parse(start), clock.parse(end)  # ticks up to ``done`` are counted
    times, every_day = _times_of_day(cron), _every_day(cron)
    count, day = 0, done.astimezone(zone).date()  # its own day, or one before it
    while done < last:
        begin, finish = _midnight(day, zone), _midnight(day + _DAY, zone)
        changes = _clocks_change(begin, finish, zone)
        # A changed day is walked to its end inclusive: times the clocks skipped at its end
        # fire at the next midnight.
        upto = min(last, finish if changes else finish - _INSTANT)
        if upto > done and changes:
            count += _walked(cron, timezone, done, upto)
        elif upto > done and (every_day or _is_day(cron, day, times[0])):
            count += (bisect_right(times, (upto - begin).total_seconds())
                      - bisect_right(times, (done - begin).total_seconds()))
        day, done = day + _DAY, max(done, upto)
    return count


class Due(msgspec.Struct):
    """What a worker makes of a due schedule at a given time."""

    tick: str  # the latest tick at or before that time: the one a job is made for
    missed: int  # ticks after the schedule's next_at up to that one
    following: str  # the tick after that time: the schedule's next_at once handled


def catch_up(cron: str, timezone: str, next_at: str, now: str) -> Due:
    """The tick to handle at ``now`` for a schedule whose ``next_at`` has come: the latest,
    found in a step or two however long no worker ran."""
    latest, following = _around(cron, timezone, now)
    if latest <= next_at:  # on time; or next_at is a repeated local time an older rule named
        return Due(next_at, 0, following)
    return Due(latest, count_ticks(cron, timezone, next_at, latest), following)


def _ticks(cron: str, timezone: str, at: datetime, backwards: bool = False
           ) -> Iterator[datetime]:
    """The ticks after ``at`` (or before it, latest first), in UTC. A fixed time of day
    that comes twice when the clocks go back is a tick the first time only, as cron runs
    it; clocks that go forward over it make croniter tick right after the gap."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    zone = ZoneInfo(timezone)
    ticks = croniter(cron, at.astimezone(zone))
    step = ticks.get_prev if backwards else ticks.get_next
    once = _fixed_time(cron)
    while True:
        moment = step(datetime).astimezone(UTC)
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


def _around(cron: str, timezone: str, at: str) -> tuple[str, str]:
    """The latest tick at or before ``at`` and the first after it."""
    moment = clock.parse(at)
    latest = next(_ticks(cron, timezone, moment, backwards=True))  # strictly before
    later = _ticks(cron, timezone, latest)
    following = next(later)
    while following <= moment:  # ``at`` is a tick itself
        latest, following = following, next(later)
    return clock.iso(latest), clock.iso(following)


def _times_of_day(cron: str) -> list[int]:
    """Seconds after midnight of each time of day ``cron`` names, in order."""
    from croniter import croniter

    expanded = croniter(cron).expanded
    minutes, hours = _numbers(expanded[0], 60), _numbers(expanded[1], 24)
    return sorted(3600 * h + 60 * m for h in hours for m in minutes)


def _numbers(field: Sequence[int | str], size: int) -> list[int]:
    """A field croniter expanded: ``["*"]`` for every value, else the values."""
    return list(range(size)) if field == ["*"] else [int(value) for value in field]


def _every_day(cron: str) -> bool:
    from croniter import croniter

    return all(field == ["*"] for field in croniter(cron).expanded[2:])


def _is_day(cron: str, day: date, first_time: int) -> bool:
    """Whether ``day`` is one of ``cron``'s days (its day of month, month and weekday)."""
    from croniter import croniter

    moment = datetime.combine(day, time()) + timedelta(seconds=first_time)
    return bool(croniter.match(cron, moment))


def _midnight(day: date, zone: tzinfo) -> datetime:
    """The instant (UTC) ``day`` begins in ``zone`` (a midnight the clocks skipped is read at
    the offset before they went forward)."""
    return datetime.combine(day, time(), zone).astimezone(UTC)


def _clocks_change(begin: datetime, finish: datetime, zone: tzinfo) -> bool:
    """Whether the clocks change within a day, so that its local times are not its hours
    from midnight: it lasts other than 24 hours, or ends at another offset than it began
    (a gap across midnight leaves a day of 24 hours)."""
    offsets = {moment.astimezone(zone).utcoffset() for moment in (begin, finish - _INSTANT)}
    return finish - begin != _DAY or len(offsets) > 1


def _walked(cron: str, timezone: str, start: datetime, end: datetime) -> int:
    count, ticks = 0, _ticks(cron, timezone, start)
    while next(ticks) <= end:
        count += 1
    return count


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
            backoff_base=spec.backoff_base, timeout=spec.timeout, cwd=spec.cwd, env=spec.env,
            memory=decisions.limit(spec.memory), cpu_time=decisions.limit(spec.cpu_time),
            open_files=decisions.limit(spec.open_files)))
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
            "updated_at, cwd, env, memory, cpu_time, open_files")


def _limit(stored: int | None) -> int | str | None:
    """A schedule's resource limit as its jobs' spec gives it: None takes the settings'
    default when the job is made, 0 says none."""
    return "none" if stored == 0 else stored


def listed(conn: Db) -> list[dict[str, Any]]:
    found = conn.execute(f"SELECT {_COLUMNS} FROM schedules ORDER BY name")
    names = [d[0] for d in found.description]
    listing = [dict(zip(names, row, strict=True)) for row in found.fetchall()]
    for row in listing:
        row["env"] = _env(row["env"])
    return listing


def _env(text: str | None) -> dict[str, str]:
    """A schedule's variables from its ``env`` column (a JSON object, or NULL for none)."""
    return msgspec.json.decode(text, type=dict[str, str]) if text else {}


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

_DUE = ("SELECT name, cron, timezone, next_at FROM schedules WHERE paused = 0 AND next_at <= ? "
        "ORDER BY next_at, name")


def next_due(conn: Db) -> str | None:
    """The earliest tick of a running schedule: when a worker should look again."""
    return conn.execute("SELECT min(next_at) FROM schedules WHERE paused = 0").fetchone()[0]


def fire_due(conn: Db) -> list[ev.Event]:
    """Handle every schedule's due tick: enqueue its job, or record why not. A lock-free
    look comes first, so workers take the write lock only when a tick is due; it also works
    out the ticks, so a long outage holds the lock no longer than a tick on time does.

    Ticks missed (no worker ran while they passed) make one job, for the latest of them,
    recorded with how many went before it. A tick whose schedule's previous job is still
    unfinished is skipped and recorded: jobs do not pile up behind a slow one."""
    now = conn.now()
    looked = {name: ((cron, zone, at), catch_up(cron, zone, at, now))
              for name, cron, zone, at in conn.execute(_DUE, (now,)).fetchall()}
    if not looked:
        return []
    events: list[ev.Event] = []
    with write(conn):
        now = conn.now()
        for name, cron, zone, at in conn.execute(_DUE, (now,)).fetchall():  # under the lock
            seen, due = looked.get(name, ((), None))
            if due is None or seen != (cron, zone, at) or due.following <= now:
                due = catch_up(cron, zone, at, now)  # it changed, or a tick came, meanwhile
            with actor.acting_as(f"schedule:{name}"):
                events += _fire(conn, _known(conn, name), due)
    return events


def _fire(conn: Db, row: dict[str, Any], due: Due) -> list[ev.Event]:
    tick, missed, following = due.tick, due.missed, due.following
    name, made = row["name"], job_id(row["name"], tick)
    held = row["last_job"]
    if held is not None:
        state = conn.execute("SELECT state FROM jobs WHERE id = ?", (held,)).fetchone()
        if state is None or state[0] not in HOLDS_KEY:
            held = None
    if held is None and cascade.existing(conn, [made]):
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
                             backoff_base=row["backoff_base"], timeout=row["timeout"],
                             cwd=row["cwd"], env=_env(row["env"]),
                             memory=_limit(row["memory"]), cpu_time=_limit(row["cpu_time"]),
                             open_files=_limit(row["open_files"]))
    decisions.add_jobs(conn, [spec])
    return [fired]
