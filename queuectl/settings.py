"""The settings ``config set`` accepts: their defaults, validation and explanations.

The ``config`` projection stores only what a user set; defaults live here, so ``config get``
shows every key and a better default needs no event.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec

from queuectl import limits
from queuectl.errors import InvalidInput
from queuectl.store import Db


def canonical(value: float) -> str:
    """The text a value is stored as: every digit given kept (``1234567``, ``0.1``), and
    ``2`` rather than ``2.0``."""
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e16):
        return str(int(value))
    return repr(value)


def _delays(base: str) -> str:
    b = float(base)
    return ", ".join(f"{limits.backoff_delay(b, k):g}s" for k in range(1, 5)) + "..."


class Setting(msgspec.Struct, frozen=True):
    """One key of ``config set``. A Struct, not a dataclass: ``enqueue`` loads this module,
    and a dataclass compiles generated methods at import."""

    key: str
    default: str
    bound: str  # its range, in ``limits.BOUNDS``
    explain: Callable[[str], str]  # the line under the value in ``config get``
    updated: Callable[[str], str]  # the line after ``Configuration updated: ...``

    def parse(self, text: str) -> str:
        return canonical(limits.parse(self.bound, text))

    def stored(self, text: str) -> str:
        """A stored value as today's bounds read it: one set before a bound existed (or
        in a ledger written by hand) is brought into range, never refused, so that every
        command still works."""
        try:
            return self.parse(text)
        except InvalidInput:
            try:
                value = float(text)
            except ValueError:
                return self.default
            clamped = limits.clamp(self.bound, value)
            return canonical(int(clamped) if limits.BOUNDS[self.bound].integer else clamped)


_SIZE = r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?"  # compiled on first use: re keeps it
_UNIT = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def bytes_of(text: str) -> int | None:
    """A count of bytes given as bytes or with a unit (``10MiB``, ``512K``, ``1.5G``:
    powers of 1024), or None when ``text`` is not one."""
    found = re.fullmatch(_SIZE, text.strip(), re.IGNORECASE)
    if found is None:
        return None
    number, unit = found.groups()
    return int(float(number) * _UNIT[(unit or "").upper()[:1].replace("B", "")])


def size(n: float, tenths: bool = False) -> str:
    """``10 MiB``, ``512 KiB``, ``12.3 MiB``, ``900 B``: a count of bytes as people read it
    (``tenths``: always with one decimal, ``10.0 MiB``, so that every figure has one form)."""
    for unit in ("GiB", "MiB", "KiB"):
        scale = _UNIT[unit[0]]
        if n >= scale:
            figure = f"{n / scale:.1f}"
            return (figure if tenths else figure.removesuffix(".0")) + f" {unit}"
    return f"{int(n)} B"


class SizeSetting(Setting, frozen=True):
    """A setting counted in bytes, given as bytes or with a unit (``10MiB``, ``512KiB``,
    ``1.5M``: powers of 1024), and stored as bytes."""

    def parse(self, text: str) -> str:
        value = bytes_of(text)
        if value is None:
            raise InvalidInput(f"expected a size such as 10MiB, 512KiB or 4096 (bytes), "
                               f"got {text!r}")
        try:
            return canonical(limits.check(self.bound, value))
        except InvalidInput:
            raise InvalidInput(f"expected a size from 0 to {size(limits.BOUNDS[self.bound].high)}"
                               f", got {text!r}") from None


class LimitSetting(Setting, frozen=True):
    """The default of one of a run's resource limits (``queuectl.resources``): what a job
    given none takes when it is enqueued; 0 or ``none``: none."""

    def parse(self, text: str) -> str:
        from queuectl import resources

        if text.strip() == "0":
            return "0"
        return str(resources.parse(self.bound, text))

    def stored(self, text: str) -> str:
        try:
            return self.parse(text)
        except InvalidInput:
            return self.default


def _limit_line(name: str, value: str) -> str:
    from queuectl import resources

    return resources.label(name, int(value))


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting(
            "max-retries",
            "3",
            "max_retries",
            lambda v: "Maximum retry attempts before moving to DLQ",
            lambda v: f"Jobs will retry up to {v} times before moving to DLQ",
        ),
        Setting(
            "backoff-base",
            "2",
            "backoff_base",
            lambda v: f"Retry delays: {_delays(v)}",
            lambda v: f"Retry delays will be: {_delays(v)}",
        ),
        Setting(
            "backoff-max",
            "0",
            "backoff_max",
            lambda v: "Longest wait before one retry, in seconds (0 = no cap)",
            lambda v: f"Retry delays will be capped at {v}s" if float(v) else "Retry delays "
            "will not be capped",
        ),
        Setting(
            "backoff-jitter",
            "0",
            "backoff_jitter",
            lambda v: "Fraction (0..1) by which a retry delay may be randomly shortened",
            lambda v: f"Each retry delay will be shortened by a random 0-{float(v) * 100:g}%"
            if float(v) else "Retry delays will not be shortened",
        ),
        Setting(
            "job-timeout",
            "0",
            "timeout",
            lambda v: "Seconds a job may run before it is killed (0 = no limit)",
            lambda v: f"New jobs will be killed after {v}s"
            if float(v)
            else "New jobs may run without a time limit",
        ),
        Setting(
            "heartbeat-interval",
            "10",
            "heartbeat_interval",
            lambda v: "Seconds between a worker's heartbeats",
            lambda v: f"Workers will send a heartbeat every {v}s",
        ),
        Setting(
            "lease-timeout",
            "30",
            "lease_timeout",
            lambda v: "Seconds without a heartbeat before a worker's job is taken back",
            lambda v: f"Jobs of workers silent for {v}s will be rescued",
        ),
        Setting(
            "output-limit",
            "4",
            "output_limit",
            lambda v: "KiB of output (its tail) kept per run",
            lambda v: f"The last {v} KiB of each run's output will be kept",
        ),
        SizeSetting(
            "log-limit",
            str(10 * 1024**2),
            "log_limit",
            lambda v: f"Bytes of each run's output kept whole ({size(int(v))}; then its end; "
            "0 = its tail only)",
            lambda v: f"Each run's output will be kept up to {size(int(v))} (its end)"
            if int(v) else "Runs' output will not be kept beyond the tail in the ledger",
        ),
        LimitSetting(
            "memory-limit",
            "0",
            "memory",
            lambda v: "Address space each process of a new job may use (0 = no limit)"
            + (f": {size(int(v))}" if int(v) else ""),
            lambda v: f"New jobs will run with a {_limit_line('memory', v)}" if int(v)
            else "New jobs will run without a memory limit",
        ),
        LimitSetting(
            "cpu-time-limit",
            "0",
            "cpu_time",
            lambda v: "CPU seconds each process of a new job may use (0 = no limit)",
            lambda v: f"New jobs will run with a {_limit_line('cpu_time', v)} limit" if int(v)
            else "New jobs will run without a cpu time limit",
        ),
        LimitSetting(
            "open-files-limit",
            "0",
            "open_files",
            lambda v: "Files each process of a new job may hold open (0 = no limit)",
            lambda v: f"New jobs will run with a limit of {_limit_line('open_files', v)}"
            if int(v) else "New jobs will run without an open files limit",
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


def typed(key: str, value: str) -> int | float:
    """A canonical value as a number, for JSON output: ``2``, not ``2.0``."""
    number = float(SETTINGS[key].stored(value))
    return int(number) if number.is_integer() and abs(number) < 1e16 else number


def load(conn: Db) -> dict[str, str]:
    """Every setting: the stored value where one was set, else the default."""
    values = {key: s.default for key, s in SETTINGS.items()}
    for key, value in conn.execute("SELECT key, value FROM config").fetchall():
        if key in SETTINGS:
            values[key] = SETTINGS[key].stored(value)
    return values
