"""Time as the ledger writes it: ISO-8601 UTC, fixed width, microseconds.

Fixed width matters: projections compare these strings (``run_at <= now``), and equal-width
ISO strings sort exactly as the instants they name.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> str:
    return iso(datetime.now(UTC))


def parse(text: str) -> datetime:
    """Read an ISO-8601 time; one without a zone is taken as UTC."""
    moment = datetime.fromisoformat(text)  # Python 3.11 reads the trailing Z itself
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def after(text: str, seconds: float) -> str:
    return iso(parse(text) + timedelta(seconds=seconds))


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
