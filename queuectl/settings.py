"""The settings ``config set`` accepts: their defaults, validation and explanations.

The ``config`` projection stores only what a user set; defaults live here, so ``config get``
shows every key and a better default needs no event.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from queuectl.errors import InvalidInput


def _number(text: str, minimum: float, integer: bool, maximum: float | None = None) -> str:
    """Validate and return the canonical text of a number: ``2`` not ``2.0``."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise InvalidInput(f"expected {kind}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
        raise InvalidInput(f"must be {bound}, got {text}")
    return str(value) if integer else f"{value:g}"


def _delays(base: str) -> str:
    b = float(base)
    return ", ".join(f"{b**k:g}s" for k in range(1, 5)) + "..."


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    parse: Callable[[str], str]
    explain: Callable[[str], str]  # the line under the value in ``config get``
    updated: Callable[[str], str]  # the line after ``Configuration updated: ...``


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting(
            "max-retries",
            "3",
            lambda t: _number(t, 0, integer=True),
            lambda v: "Maximum retry attempts before moving to DLQ",
            lambda v: f"Jobs will retry up to {v} times before moving to DLQ",
        ),
        Setting(
            "backoff-base",
            "2",
            lambda t: _number(t, 1, integer=False),
            lambda v: f"Retry delays: {_delays(v)}",
            lambda v: f"Retry delays will be: {_delays(v)}",
        ),
        Setting(
            "backoff-max",
            "0",
            lambda t: _number(t, 0, integer=False),
            lambda v: "Longest wait before one retry, in seconds (0 = no cap)",
            lambda v: f"Retry delays will be capped at {v}s" if float(v) else "Retry delays "
            "will not be capped",
        ),
        Setting(
            "backoff-jitter",
            "0",
            lambda t: _number(t, 0, integer=False, maximum=1),
            lambda v: "Fraction (0..1) by which a retry delay may be randomly shortened",
            lambda v: f"Each retry delay will be shortened by a random 0-{float(v):.0%}",
        ),
        Setting(
            "job-timeout",
            "0",
            lambda t: _number(t, 0, integer=False),
            lambda v: "Seconds a job may run before it is killed (0 = no limit)",
            lambda v: f"New jobs will be killed after {v}s"
            if float(v)
            else "New jobs may run without a time limit",
        ),
        Setting(
            "heartbeat-interval",
            "10",
            lambda t: _number(t, 0.1, integer=False),
            lambda v: "Seconds between a worker's heartbeats",
            lambda v: f"Workers will send a heartbeat every {v}s",
        ),
        Setting(
            "lease-timeout",
            "30",
            lambda t: _number(t, 0.5, integer=False),
            lambda v: "Seconds without a heartbeat before a worker's job is taken back",
            lambda v: f"Jobs of workers silent for {v}s will be rescued",
        ),
        Setting(
            "output-limit",
            "4",
            lambda t: _number(t, 0, integer=True, maximum=1024),
            lambda v: "KiB of output (its tail) kept per run",
            lambda v: f"The last {v} KiB of each run's output will be kept",
        ),
    )
}


def parse(key: str, text: str) -> str:
    """Validate ``text`` for ``key``; returns its canonical form or raises InvalidInput."""
    setting = SETTINGS.get(key)
    if setting is None:
        raise InvalidInput(f"unknown config key {key!r} (known: {', '.join(SETTINGS)})")
    try:
        return setting.parse(text.strip())
    except InvalidInput as exc:
        raise InvalidInput(f"invalid value for {key}: {exc}") from None


def typed(value: str) -> int | float:
    """A canonical value as a number, for JSON output."""
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number


def load(conn: sqlite3.Connection) -> dict[str, str]:
    """Every setting: the stored value where one was set, else the default."""
    values = {key: s.default for key, s in SETTINGS.items()}
    values.update(conn.execute("SELECT key, value FROM config").fetchall())
    return values
