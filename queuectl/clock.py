"""Time as the ledger writes it: ISO-8601 UTC, fixed width, microseconds.

Fixed width matters: projections compare these strings (``run_at <= now``), and equal-width
ISO strings sort exactly as the instants they name.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

# The times a job may name (``--run-at``): before 1970 is no one's schedule, and after
# 9999 ISO-8601 needs a fifth digit, which would sort wrong.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def iso(moment: datetime) -> str:
    """``2026-11-27T10:30:00.000000Z``: always 27 characters (isoformat pads the year to
    four digits where strftime's ``%Y`` does not), so it round-trips through ``parse``."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def now() -> str:
    """``iso`` of this moment, made from the system clock's integer time: the date and time
    of day change once a second, so only the microseconds are formatted on most calls
    (going through ``datetime`` cost several times as much, on every event's time)."""
    return of_micros(time.time_ns() // 1000)  # floored, as datetime.now rounds


def of_micros(micros: int) -> str:
    """``iso`` of the instant ``micros`` microseconds after the epoch (see ``now``)."""
    second, fraction = divmod(micros, 1_000_000)
    known = _second
    if known[0] != second:
        known = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _set_second(known)
    return f"{known[1]}.{fraction:06d}Z"


_second: tuple[int, str] = (-1, "")  # the last second ``now`` formatted, and its text


def _set_second(known: tuple[int, str]) -> None:
    global _second
    _second = known  # one reference: a thread never sees one second with another's text


# ``now`` as this module defines it: a store that has a clock of its own (PostgreSQL's
# server) uses that one unless ``now`` was replaced, as tests replace it with a fake clock.
system_now = now


def parse(text: str) -> datetime:
    """Read an ISO-8601 time; one without a zone is taken as UTC."""
    moment = datetime.fromisoformat(text)  # Python 3.11 reads the trailing Z itself
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def within_range(moment: datetime) -> datetime:
    """``moment`` if it lies between 1970 and 9999 (UTC), else ValueError."""
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 has no UTC time
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ValueError("is outside 1970-01-01 to 9999-12-31 (UTC)")
    return utc


def after(text: str, seconds: float) -> str:
    """The time ``seconds`` after (or before, if negative) ``text``, saturating at the
    ends of the range instead of overflowing."""
    start = parse(text)
    try:
        return iso(start + timedelta(seconds=seconds))
    except OverflowError:
        return iso(LATEST if seconds > 0 else EARLIEST)


def seconds_between(start: str, end: str) -> float:
    return (parse(end) - parse(start)).total_seconds()


def human(text: str | None) -> str:
    """``2026-11-27 10:30:00`` for tables people read (still UTC)."""
    return text[:19].replace("T", " ") if text else "-"


def short(text: str | None) -> str:
    """``21:58:16`` for a time today (UTC), else ``2030-01-01 02:00``: for narrow tables."""
    if not text:
        return "-"
    if text[:10] == now()[:10]:
        return text[11:19]
    return text[:16].replace("T", " ")


def age(seconds: float | None) -> str:
    """``0.4s``, ``42s``, ``3m05s``, ``2h03m``, ``3d04h``: how long, for narrow columns."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    whole = int(s)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // sub_size:02d}{sub}"
    return f"{whole}s"
