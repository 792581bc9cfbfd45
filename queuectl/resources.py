"""A run's resource limits (``--memory``, ``--cpu-time``, ``--open-files``): how they are
given, how they are set, and how a run that reached one is told apart.

They are set with setrlimit by the run's own shell, before it evaluates the command
(``ulimit``; the spawn runs no Python in the child, where setrlimit would go, and a
``prlimit`` after the spawn would race the command's first allocations). So the command is
limited from its first instruction, every process it starts inherits the limits, and a job
without limits starts exactly as before. Each limit holds per process, not for the run's
group together:

- memory: RLIMIT_AS, the address space (virtual memory) of each process, which is larger
  than what it has resident; an allocation past it fails (ENOMEM), no signal is sent.
- cpu time: RLIMIT_CPU, CPU seconds of each process: SIGXCPU at the limit, SIGKILL one
  second later for a process that handles SIGXCPU.
- open files: RLIMIT_NOFILE, the highest descriptor number each process may open.

The kernel tells the parent of the CPU limit only (the signal). A failed allocation or open
is seen by the program, which says so or not: a run with a memory or open-files limit that
failed is said to have reached it when the tail of its output says so in the words the C
library and the common runtimes use. This module is imported only for jobs with limits.
"""

from __future__ import annotations

import signal

import msgspec

from queuectl import limits
from queuectl.errors import InvalidInput

NAMES = ("memory", "cpu_time", "open_files")
NOUNS = {"memory": "memory limit", "cpu_time": "cpu time limit",
         "open_files": "open files limit"}
NONE = "none"  # the word that says "no limit" where a default would otherwise apply


class Limits(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job's limits; 0: none. The ``limits`` column holds those set as JSON (NULL: none)."""

    memory: int = 0  # bytes of address space, per process
    cpu_time: int = 0  # CPU seconds, per process
    open_files: int = 0  # descriptors, per process


decode = msgspec.json.Decoder(Limits).decode  # the ``limits`` column (projections.jobs)


# -- given --------------------------------------------------------------------------------


def parse(name: str, value: object) -> int:
    """A limit as a flag, a config value or a JSON field gives it: a whole number (bytes
    for memory; a size with a unit too: ``64MiB``, ``1GiB``, ``2048K``), or ``none`` (0).
    Anything else, 0 included, is refused with InvalidInput saying what is accepted."""
    if isinstance(value, str) and value.strip().lower() == NONE:
        return 0
    number = _number(name, value) if isinstance(value, str) else value
    try:
        return int(limits.check(name, number))  # type: ignore[arg-type]  # checked there
    except InvalidInput:
        raise InvalidInput(f"expected {accepted(name)}, got {value!r}") from None


def _number(name: str, text: str) -> int | float | None:
    if name == "memory":
        from queuectl.settings import bytes_of

        return bytes_of(text)
    try:
        return int(text.strip())
    except ValueError:
        return None


def accepted(name: str) -> str:
    """What ``name`` accepts, for messages."""
    if name == "memory":
        high = limits.BOUNDS["memory"].high
        return (f"a size such as 64MiB, 1GiB or 1048576 (bytes), from 1 MiB to "
                f"{int(high) // 2**40} TiB, or {NONE}")
    return f"{limits.describe(name)}, or {NONE}"


# -- said ---------------------------------------------------------------------------------


def label(name: str, value: int) -> str:
    """``memory limit 64 MiB``, ``cpu time 1 s``, ``open files 16``: one limit as the
    reason of a run that reached it names it."""
    if name == "memory":
        from queuectl.settings import size

        return f"memory limit {size(value)}"
    if name == "cpu_time":
        return f"cpu time {value} s"
    return f"open files {value}"


def summary(given: Limits) -> str:
    """Every limit set, for ``show``: ``memory limit 64 MiB, cpu time 1 s``; ``none``."""
    said = [label(name, value) for name in NAMES if (value := getattr(given, name))]
    return ", ".join(said) or NONE


# -- set ----------------------------------------------------------------------------------


def script(given: Limits) -> str:
    """The shell commands that set the limits before the command is evaluated; the run
    fails with one line (naming the host, ``$2``) if the shell cannot set them. The soft CPU
    limit goes first: a hard one below an unlimited soft one is refused."""
    steps = []
    if given.cpu_time:
        steps += [f"ulimit -S -t {given.cpu_time}", f"ulimit -H -t {given.cpu_time + 1}"]
    if given.memory:
        steps.append(f"ulimit -v {given.memory // 1024}")  # KiB
    if given.open_files:
        steps.append(f"ulimit -n {given.open_files}")
    why = summary(given)
    return ("{ " + " && ".join(steps) + "; } 2>/dev/null || { printf 'queuectl: cannot set "
            f"{why} on %s\\n' \"$2\"; exit 1; }}; ")


def problem(given: Limits) -> str | None:
    """Why this worker cannot give a run these limits (one above its own hard limit, which
    no unprivileged process may raise), or None when it can."""
    import resource

    wanted = (("cpu_time", resource.RLIMIT_CPU, given.cpu_time + 1 if given.cpu_time else 0),
              ("memory", resource.RLIMIT_AS, given.memory // 1024 * 1024),
              ("open_files", resource.RLIMIT_NOFILE, given.open_files))
    for name, which, want in wanted:
        hard = resource.getrlimit(which)[1]
        if want and hard != resource.RLIM_INFINITY and want > hard:
            return (f"cannot set {label(name, getattr(given, name))}: above this worker's own "
                    f"hard limit ({hard})")
    return None


# -- reached ------------------------------------------------------------------------------

# What programs print when an allocation or an open failed (compared in lower case): the
# C library's strerror (ENOMEM, EMFILE), Python, C++, Rust, Go, Java and Node.js.
_NO_MEMORY = ("cannot allocate memory", "memoryerror", "out of memory", "bad_alloc",
              "memory allocation of", "outofmemoryerror", "failed to map segment")
_NO_FILES = ("too many open files", "emfile")
_CPU_SIGNALS = (signal.SIGXCPU, signal.SIGKILL)


def reached(given: Limits, code: int, cpu: float, output: str) -> str | None:
    """The limit a failed run reached (its ``label``), or None when nothing shows one.

    ``code`` is the shell's exit code (negative for a signal; a shell whose command was
    killed exits with 128 + the signal), ``cpu`` the CPU seconds of the shell and the
    processes it waited for, ``output`` the tail of what the run wrote."""
    died_of = -code if code < 0 else code - 128 if code > 128 else 0
    if given.cpu_time and died_of in _CPU_SIGNALS and (
            died_of == signal.SIGXCPU or cpu >= given.cpu_time):
        return label("cpu_time", given.cpu_time)
    said = output[-4096:].lower()
    if given.open_files and any(words in said for words in _NO_FILES):
        return label("open_files", given.open_files)
    if given.memory and any(words in said for words in _NO_MEMORY):
        return label("memory", given.memory)
    return None
