"""Every number that enters queuectl, and the range it must lie in.

Flags, JSON job fields, ``config set`` values, environment variables and durations all
pass through ``parse`` (text) or ``check`` (an already typed value) against one table, so a
number that is accepted anywhere works everywhere: it fits a SQLite (and PostgreSQL)
column, encodes to JSON and decodes back, and adds to a time without overflowing.
Non-finite numbers are never accepted.
"""

from __future__ import annotations

import math
import os
import re
from typing import Annotated

import msgspec

from queuectl.errors import InvalidInput

DAY = 86_400.0
YEAR = 365 * DAY
# The longest wait queuectl schedules (a delay, a retry, a timeout): a cap far in the future
# is still a time, so retry delays saturate here instead of overflowing.
LONGEST = 10 * YEAR
INT32 = 2**31 - 1


# Records are msgspec Structs, not NamedTuples: a NamedTuple class costs every command that
# imports it more to make (``enqueue -c`` pays it at start-up).
class Bound(msgspec.Struct, frozen=True):
    integer: bool
    low: float
    high: float
    unit: str = ""  # how the message names what is counted


BOUNDS: dict[str, Bound] = {
    # job fields (flags, JSON and the settings that give their defaults)
    "max_retries": Bound(True, 0, 1_000_000),
    "backoff_base": Bound(False, 1, 1_000_000),
    "backoff_max": Bound(False, 0, LONGEST, "seconds"),
    "backoff_jitter": Bound(False, 0, 1),
    "timeout": Bound(False, 0, LONGEST, "seconds"),
    "delay": Bound(False, 0, LONGEST, "seconds"),
    "priority": Bound(True, -INT32 - 1, INT32),
    # a run's resource limits (queuectl.resources); none of them may be 0: "none" says none
    "memory": Bound(True, 2**20, 2**48, "bytes"),  # 1 MiB to x86-64's 256 TiB of addresses
    "cpu_time": Bound(True, 1, LONGEST, "seconds"),
    "open_files": Bound(True, 1, 2**20),  # Linux's default ceiling (fs.nr_open)
    # worker timings
    "heartbeat_interval": Bound(False, 0.1, DAY, "seconds"),
    "lease_timeout": Bound(False, 0.5, DAY, "seconds"),
    "output_limit": Bound(True, 0, 1024, "KiB"),
    "log_limit": Bound(True, 0, 2**30, "bytes"),
    "poll": Bound(False, 0.01, DAY, "seconds"),
    "concurrency": Bound(True, 1, 1024),
    "processes": Bound(True, 1, 1024),
    "jobs_per_worker": Bound(True, 0, INT32),
    "ahead": Bound(True, 0, 64),
    "queue_limit": Bound(True, 0, 1_000_000),
    "queue_rate": Bound(True, 1, 100_000),  # starts a period (queue limit --rate N/PERIOD)
    # reads
    "seq": Bound(True, 0, 2**62),
    "limit": Bound(True, 1, 1_000_000_000),
    "attempt": Bound(True, 1, 1_000_001),
    "since": Bound(False, 0.001, 100 * YEAR, "seconds"),
    "before": Bound(False, 0, 100 * YEAR, "seconds"),
    "interval": Bound(False, 0.1, 3600, "seconds"),  # status --watch redraws
    # environment
    "lock_timeout": Bound(False, 0, DAY, "seconds"),
    "columns": Bound(True, 20, 10_000),
}


def describe(name: str) -> str:
    """``a whole number from 0 to 1000000``: what ``name`` accepts, for messages."""
    b = BOUNDS[name]
    kind = "a whole number" if b.integer else "a number"
    unit = f" {b.unit}" if b.unit else ""
    return f"{kind} from {_figure(b.low)} to {_figure(b.high)}{unit}"


def _figure(x: float) -> str:
    """``315360000``, ``0.1``: a bound as people write it."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check(name: str, value: int | float) -> int | float:
    """``value`` if it lies in ``name``'s range (finite, whole where it must be), else
    InvalidInput saying what is accepted."""
    b = BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"expected {describe(name)}, got {value!r}")
    if b.integer and not isinstance(value, int):
        raise InvalidInput(f"expected {describe(name)}, got {value!r}")
    if not math.isfinite(value) or not b.low <= value <= b.high:
        raise InvalidInput(f"expected {describe(name)}, got {value!r}")
    return value


def parse(name: str, text: str) -> int | float:
    """A number written as text (a flag, a config value, an environment variable)."""
    b = BOUNDS[name]
    stripped = text.strip()
    try:
        value: int | float = int(stripped) if b.integer else float(stripped)
    except ValueError:
        raise InvalidInput(f"expected {describe(name)}, got {text!r}") from None
    try:
        return check(name, value)
    except InvalidInput:
        raise InvalidInput(f"expected {describe(name)}, got {text!r}") from None


def from_env(variable: str, name: str, default: float) -> float:
    """A number from the environment (unset or empty: ``default``), held to its range."""
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        return parse(name, text)
    except InvalidInput as exc:
        raise InvalidInput(f"{variable}: {exc}") from None


def clamp(name: str, value: float) -> float:
    """``value`` brought into ``name``'s range: for values stored before a bound existed."""
    b = BOUNDS[name]
    if math.isnan(value):
        return b.low
    return min(max(value, b.low), b.high)


def meta(name: str) -> msgspec.Meta:
    b = BOUNDS[name]
    return msgspec.Meta(ge=int(b.low) if b.integer else b.low,
                        le=int(b.high) if b.integer else b.high)


# The typed fields of a JSON job: msgspec enforces the same ranges while decoding.
MaxRetries = Annotated[int, meta("max_retries")]
BackoffBase = Annotated[float, meta("backoff_base")]
Seconds = Annotated[float, meta("timeout")]
Priority = Annotated[int, meta("priority")]


class Rate(msgspec.Struct, frozen=True):
    """At most ``n`` starts of a queue's jobs in any ``period`` seconds; ``NO_RATE``: none."""

    n: int
    period: int  # seconds: 1, 60 or 3600

    def __str__(self) -> str:
        return f"{self.n}/{_UNIT_OF[self.period]}" if self.n else "none"

    def describe(self) -> str:
        """``at most 5 starts per second``, for messages."""
        return f"at most {self.n} starts per {_NAME_OF[self.period]}" if self.n else \
            "no rate limit"


NO_RATE = Rate(0, 0)
PERIODS = {"s": 1, "m": 60, "h": 3600}
_UNIT_OF = {seconds: unit for unit, seconds in PERIODS.items()}
_NAME_OF = {1: "second", 60: "minute", 3600: "hour"}
# ASCII digits only, and few of them: int() is never handed a number it would choke on.
_RATE = r"([0-9]{1,12})/([smh])"  # compiled on first use: re keeps it


def parse_rate(text: str) -> Rate:
    """``10/s``, ``100/m``, ``5000/h`` (starts per second, minute or hour); ``none``:
    ``NO_RATE``."""
    stripped = text.strip()
    if stripped.lower() == "none":
        return NO_RATE
    found = re.fullmatch(_RATE, stripped, re.ASCII)
    b = BOUNDS["queue_rate"]
    if found is None or not b.low <= int(found[1]) <= b.high:
        raise InvalidInput(
            f"expected a rate N/PERIOD, N {describe('queue_rate')} and PERIOD s, m or h "
            f"(10/s, 100/m, 5000/h), or none; got {text!r}")
    return Rate(int(found[1]), PERIODS[found[2]])


def rate_of(n: int, period: int) -> Rate:
    """A rate as the ``queues`` table stores it (0: none)."""
    return Rate(n, period) if n else NO_RATE


def backoff_delay(base: float, k: int) -> float:
    """``base ** k`` seconds, the wait after a job's k-th failed run, saturating at
    ``LONGEST`` instead of overflowing (base 60 after 7 runs would be 89,000 years)."""
    if base <= 1:
        return 1.0 if k >= 0 else 0.0
    if k * math.log(base) >= math.log(LONGEST):
        return LONGEST
    return float(base**k)
