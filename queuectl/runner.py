"""Running one job: ``sh -c COMMAND`` as the leader of a new session, its output kept as a
bounded tail, its end decided by the shell's exit, a timeout or a kill request.

Rules this module keeps:

- A run ends when its shell exits, whatever the shell left running: the worker never waits
  on a pipe a background process still holds open. What the shell left in its process
  group then gets SIGTERM at once and, if still there ``KILL_GRACE`` seconds later,
  SIGKILL. A job that means to leave a daemon behind starts it in a session of its own
  (``setsid``).
- Every process of a run carries ``QUEUECTL_JOB_ID``, ``QUEUECTL_ATTEMPT`` and
  ``QUEUECTL_WORKER_ID`` in its environment. That marks it as the run's wherever it goes,
  and cannot be mistaken for anything else after a pid is reused (this machine wraps its
  pids every 32,768 processes: seconds, on a busy queue). A rescuer on the same host finds
  a dead worker's runs by that mark and stops them before their jobs run again.
- A process group is signalled by number only while its leader is an unreaped zombie of
  ours, which keeps the number from being reused; later, processes are found by their mark
  and signalled through a pidfd, which names one process and never another.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    import subprocess

    from queuectl.resources import Limits

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
TICK = 0.05  # seconds between calls of a run's tick (heartbeats, cancel checks)


class RunResult(msgspec.Struct):
    exit_code: int | None
    duration: float
    output: str
    truncated: bool
    timed_out: bool = False
    abandoned: bool = False
    error: str | None = None  # why it failed, when not the shell's exit status


# A run whose directory cannot be entered fails with this status, as a shell's failed cd.
NO_DIRECTORY = 1


# -- the environment a run gets -----------------------------------------------------------


def base_env(environ: Mapping[str, str] | None = None) -> dict[bytes, bytes]:
    """The worker's environment as bytes, encoded once: the spawn would otherwise encode
    every variable again at every run."""
    source = os.environ if environ is None else environ
    return {os.fsencode(k): os.fsencode(v) for k, v in source.items()}


def worker_env(store_id: str, environ: Mapping[str, str] | None = None) -> dict[bytes, bytes]:
    """A worker's ``base_env``, with the store its runs belong to (part of their mark)."""
    env = base_env(environ)
    env[b"QUEUECTL_STORE_ID"] = store_id.encode()
    return env


def run_env(base: dict[bytes, bytes], job_id: str, attempt: int, worker_id: str,
            job_env: Mapping[str, str] | None = None) -> dict[bytes, bytes]:
    """A run's environment: the worker's, the job's own variables over it, then the run's
    mark, which a job's variables never replace (a rescuer finds runs by it)."""
    env = base.copy()
    if job_env:
        env.update((k.encode(), v.encode()) for k, v in job_env.items())
        if _STORE in base:
            env[_STORE] = base[_STORE]
        else:
            env.pop(_STORE, None)
    env[b"QUEUECTL_JOB_ID"] = job_id.encode()
    env[b"QUEUECTL_ATTEMPT"] = str(attempt).encode()
    env[b"QUEUECTL_WORKER_ID"] = worker_id.encode()
    return env


# -- starting ---------------------------------------------------------------------------


@functools.cache
def _shell() -> str:
    """``sh`` as PATH finds it, looked up once per process: a bare ``sh`` would be searched
    for on PATH at every spawn, failing exec after exec in the child while the worker waits.
    Looked up as ``shutil.which`` does, without importing shutil (and with it bz2, lzma and
    zlib) into every worker."""
    path = os.environ.get("PATH", os.defpath)
    for directory in path.split(os.pathsep) if path else ():
        candidate = os.path.join(directory, "sh")
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return "/bin/sh"


# A run with a directory has its shell enter it first and then evaluate the command, with
# the positional parameters cleared, as ``sh -c COMMAND`` would run it: a directory removed
# between the worker's check and the start then fails the run with its one line of output,
# like any other run, rather than as an error of the spawn.
_ENTER = ('cd -- "$1" 2>/dev/null || { printf "queuectl: cannot enter directory %s on %s: '
          '%s\\n" "$1" "$2" "it could not be entered as the run started"; exit 1; }; '
          'eval "shift 3; $3"')
_EVAL = 'eval "shift 3; $3"'


def _argv(command: str, cwd: str | None, limits: Limits | None) -> list[str]:
    """The shell's arguments: ``sh -c command``, or with a directory to enter or resource
    limits to set first (``resources.script``), a script that then evaluates it."""
    if limits is None:
        return ["sh", "-c", command] if cwd is None else ["sh", "-c", _ENTER, "sh", cwd,
                                                          _host(), command]
    from queuectl import resources

    script = resources.script(limits) + (_EVAL if cwd is None else _ENTER)
    return ["sh", "-c", script, "sh", cwd or "", _host(), command]


def _spawn(command: str, env: Mapping[bytes, bytes] | Mapping[str, str], cwd: str | None = None,
           limits: Limits | None = None, shared: bool = False) -> tuple[int, int]:
    """Start ``sh -c command`` as the leader of a new session, reading /dev/null, writing
    stdout and stderr into one pipe; returns its pid and the pipe's read end (non-blocking).

    Two ways, because of the GIL. os.posix_spawn (vfork and exec inside libc) costs the
    worker the least CPU a job, but holds the GIL until the child has exec'd. In a process
    whose other threads have work meanwhile (``shared``: the other workers of ``worker -c
    N``, the results thread of ``--ahead``), that stopped them all, another worker's spawn
    and its transaction included. subprocess lets go of the GIL while its vfork'd child
    execs (CPython 3.11.6 and later), for more set-up of its own in Python.
    Descriptors the job must not see are close-on-exec (see ``close_on_exec``), which is
    what close_fds would otherwise do in the child, walking every descriptor.
    """
    read_end, write_end = os.pipe()
    if write_end < 3:  # the worker runs with stdout or stderr closed: keep off 0-2
        low, write_end = write_end, fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(low)
    os.set_blocking(read_end, False)
    try:
        pid = (_popen if shared else _posix_spawn)(_argv(command, cwd, limits), env, write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return pid, read_end


# Python ignores SIGPIPE and SIGXFSZ for itself; a job starts with the default actions, as
# subprocess's restore_signals gives it (else `yes | head` never ends).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def _posix_spawn(argv: list[str], env: Mapping[bytes, bytes] | Mapping[str, str],
                 out: int) -> int:
    return os.posix_spawn(
        _shell(),
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, out, 2),
        ],
        setsid=True,
        setsigdef=_DEFAULT_SIGNALS,
    )


def _popen(argv: list[str], env: Mapping[bytes, bytes] | Mapping[str, str], out: int) -> int:
    return _shell_class()(argv, executable=_shell(), stdin=_devnull(), stdout=out,
                          stderr=out, env=env, close_fds=False, start_new_session=True,
                          restore_signals=True).pid


@functools.cache
def _shell_class() -> type[subprocess.Popen[bytes]]:
    """The Popen of a run's shell, made on the first run that needs it: a process of one
    worker and no jobs ahead starts every run with posix_spawn, and need not import
    subprocess."""
    import subprocess

    class _Shell(subprocess.Popen):  # type: ignore[type-arg]
        """A run's shell, started by subprocess and then left to this module: it is reaped
        here (``_exit_code`` leaves it a zombie first, keeping its group's number ours),
        never by subprocess, whose clean-up of dropped Popen objects would reap it behind
        our back."""

        def __del__(self) -> None:
            pass

    return _Shell


@functools.cache
def _devnull() -> int:
    """/dev/null, opened once per process for every run's stdin (close-on-exec: only the
    copy a run gets as its descriptor 0 outlives the exec), kept off 0-2 as the pipe is."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if fd < 3:
        low, fd = fd, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(low)
    return fd


@functools.cache
def _host() -> str:
    """This host's name, as the worker and the ledger's ``by`` give it (``uname``, which
    ``socket.gethostname`` reads too, without importing socket: 2 ms a worker's start)."""
    return os.uname().nodename


def enter_problem(cwd: str) -> str | None:
    """Why a run could not start in ``cwd`` on this host (its one line of output), or
    None when it can."""
    try:
        st = os.stat(cwd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(cwd, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        return f"queuectl: cannot enter directory {cwd} on {_host()}: {exc.strerror or exc}"
    return None


def close_on_exec() -> None:
    """Mark every descriptor above stderr close-on-exec, once per worker process: Python
    and SQLite open theirs that way, so only those the worker inherited could leak into
    jobs started by posix_spawn."""
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        if int(name) > 2:
            try:
                os.set_inheritable(int(name), False)
            except OSError:  # the directory listing's own descriptor, closed by now
                pass


# -- waiting ----------------------------------------------------------------------------


def _exit_code(pid: int, block: bool = False) -> int | None:
    """The shell's exit code (negative for a signal) once it has exited, else None. The
    shell is left unreaped: as a zombie it keeps its process group's number ours."""
    flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
    try:
        info = os.waitid(os.P_PID, pid, flags)
    except ChildProcessError:  # reaped behind our back (SIGCHLD ignored), as subprocess says
        return 0
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def shell_exited(pid: int) -> bool:
    """Whether a run's shell (still unreaped) has exited; it is left unreaped."""
    return _exit_code(pid) is not None


def _wait(pid: int, timeout: float) -> int | None:
    """``_exit_code`` until the shell exits or ``timeout`` passes, in growing sleeps."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while (code := _exit_code(pid)) is None and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
    return code


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user: it is there, and not ours to signal
        return True
    return True


def _reap(pid: int, usage: bool = False) -> float:
    """Reap the shell; with ``usage``, return the CPU seconds it and the processes it
    waited for used (else 0)."""
    try:
        if not usage:
            os.waitpid(pid, 0)
            return 0.0
        used = os.wait4(pid, 0)[2]
        return used.ru_utime + used.ru_stime
    except ChildProcessError:
        return 0.0


# -- reading ----------------------------------------------------------------------------


class _Tail:
    """The last ``limit`` bytes a run wrote, read from a non-blocking pipe."""

    def __init__(self, fd: int, limit: int, sink: Callable[[bytes], None] | None = None
                 ) -> None:
        self.fd, self.limit, self.sink = fd, limit, sink
        self.data = bytearray()
        self.total = 0
        self.open = True

    def read(self) -> bool:
        """Take what the pipe holds now; False once every writer has closed it."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            self.open = False
            return False
        self.total += len(chunk)
        if self.sink is not None:
            self.sink(chunk)
        self.data.extend(chunk)
        if len(self.data) > self.limit + 65536:  # bounded, whatever the job prints
            del self.data[: len(self.data) - self.limit]
        return True

    def drain(self) -> None:
        """What is in the pipe already, never waiting for more: a background process may
        hold it open for hours."""
        for _ in range(64):
            if not self.open:
                return
            before = self.total
            if not self.read() or self.total == before:
                return

    def text(self) -> tuple[str, bool]:
        kept = bytes(self.data[-self.limit:]) if self.limit else b""
        return kept.decode("utf-8", "replace"), self.total > len(kept)


# -- one run ----------------------------------------------------------------------------


def run_command(
    command: str,
    *,
    timeout: float,
    output_limit: int,
    tick: Callable[[], bool],
    env: Mapping[bytes, bytes] | Mapping[str, str] | None = None,
    leftovers: Leftovers | None = None,
    cwd: str | None = None,
    sink: Callable[[bytes], None] | None = None,
    started: Callable[[int], None] | None = None,
    ending: Callable[[], None] | None = None,
    limits: Limits | None = None,
    shared: bool = False,
) -> RunResult:
    """Run ``sh -c command`` in a new process group, keeping only the tail of its output.

    ``tick`` is called about every 50 ms while it runs (heartbeats, cancel checks); when it
    returns True the group is killed at once. On timeout the group gets SIGTERM, then
    SIGKILL after a grace. ``started`` is given the run's process group as it starts: a
    ``tick`` may signal it (the shell is not reaped before the last tick, so the group's
    number stays ours); ``ending`` is called once the run is over, before the shell is
    reaped, after which the number may go to another process. ``env`` defaults to the worker's own environment, ``cwd`` to its
    directory; a ``cwd`` that cannot be entered is a failed run (``NO_DIRECTORY``) whose one
    line of output names the directory, the host and why. A shell that
    cannot be started (a command over the kernel's 128 KiB argument limit, no processes
    left) is a run that failed with status 126, not the worker's end. If anything raises
    (``tick`` writing to a database that fails, say), the run's group is killed first.
    ``sink``, if given, is handed every read of the output as it comes (the output store).
    ``limits`` (``queuectl.resources``) are set on the run's processes; a run that failed
    after reaching one says which in its ``error`` and a last line of output, and a run
    whose limits this worker cannot set fails without starting. ``shared``: other threads
    of this process have work while the shell starts (see ``_spawn``).
    """
    start = time.monotonic()
    if cwd is not None and (problem := enter_problem(cwd)) is not None:
        return _not_started(problem, start, output_limit)
    if limits is not None and (problem := _limits_problem(limits)) is not None:
        return _not_started(problem, start, output_limit)
    try:
        pid, fd = _spawn(command, os.environ if env is None else env, cwd, limits, shared)
    except OSError as exc:
        why = f"queuectl: cannot start sh: {exc.strerror or exc}"
        return RunResult(exit_code=126, duration=round(time.monotonic() - start, 6),
                         output=why[-output_limit:] if output_limit else "", truncated=False)
    if started is not None:
        started(pid)
    tail = _Tail(fd, output_limit, sink)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    # A pidfd turns readable when the shell exits, so one poll() waits for output, end of
    # output and exit alike (Linux >= 5.3; elsewhere we look every TICK).
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = None
    timed_out = abandoned = False
    code: int | None = None
    try:
        while True:
            for ready, _ in poller.poll(TICK * 1000):
                if ready == fd and not tail.read():
                    poller.unregister(fd)
            code = _exit_code(pid) if pidfd is not None or tail.open else _wait(pid, TICK)
            if code is not None:
                tail.drain()
                break
            abandoned = tick()
            timed_out = bool(timeout) and time.monotonic() - start > timeout
            if abandoned or timed_out:
                kill_group(pid, signal.SIGTERM)
                code = _wait(pid, 0 if abandoned else KILL_GRACE)
                kill_group(pid, signal.SIGKILL)  # and any grandchild that ignored TERM
                if code is None:
                    code = _exit_code(pid, block=True)
                tail.drain()
                break
    except BaseException:
        kill_group(pid, signal.SIGKILL)  # the shell is unreaped: the group is still ours
        if ending is not None:
            ending()
        _reap(pid)
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
        os.close(fd)
    if ending is not None:
        ending()
    cpu = _end(pid, env, leftovers, usage=limits is not None)
    output, truncated = tail.text()
    result = RunResult(
        exit_code=code,
        duration=round(time.monotonic() - start, 6),
        output=output,
        truncated=truncated,
        timed_out=timed_out,
        abandoned=abandoned,
    )
    if limits is not None and code and not (timed_out or abandoned):
        return _limit_reached(result, limits, cpu, output_limit, sink)
    return result


def _not_started(problem: str, start: float, output_limit: int) -> RunResult:
    """A run that failed before its shell started: ``problem`` is its one line of output."""
    return RunResult(exit_code=NO_DIRECTORY, duration=round(time.monotonic() - start, 6),
                     output=(problem + "\n")[-output_limit:] if output_limit else "",
                     truncated=False, error=problem.removeprefix("queuectl: "))


def _limits_problem(limits: Limits) -> str | None:
    from queuectl import resources

    problem = resources.problem(limits)
    return None if problem is None else f"queuectl: {problem} on {_host()}"


def _limit_reached(result: RunResult, limits: Limits, cpu: float, output_limit: int,
                   sink: Callable[[bytes], None] | None) -> RunResult:
    """A failed run that reached one of its limits, as such: its error names the limit,
    and so does a last line of its output (in the output store too)."""
    from queuectl import resources

    assert result.exit_code is not None
    which = resources.reached(limits, result.exit_code, cpu, result.output)
    if which is None:
        return result
    error = f"{which} reached ({describe_exit(result.exit_code)})"
    line = ("\n" if result.output and not result.output.endswith("\n") else "") + \
        f"queuectl: {error}\n"
    if sink is not None:
        sink(line.encode())
    output = (result.output + line)[-output_limit:] if output_limit else ""
    return msgspec.structs.replace(result, output=output, error=error)


def _end(pid: int, env: Mapping[bytes, bytes] | Mapping[str, str] | None,
         leftovers: Leftovers | None, usage: bool = False) -> float:
    """The shell has exited (and is still a zombie): SIGTERM what it left in its group,
    reap it, and if anything of the group is still alive, have it killed after the grace.
    Returns the CPU seconds of the shell and what it waited for, with ``usage``."""
    kill_group(pid, signal.SIGTERM)
    cpu = _reap(pid, usage)
    if _group_alive(pid):
        mark = mark_of(env)
        if mark is not None:
            (leftovers or LEFTOVERS).add(mark)
    return cpu


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    note = {126: " (command not executable)", 127: " (command not found)"}.get(code, "")
    return f"exit status {code}{note}"


# -- processes found by their mark ------------------------------------------------------

_MARKS = (b"QUEUECTL_WORKER_ID", b"QUEUECTL_JOB_ID", b"QUEUECTL_ATTEMPT")
_STORE = b"QUEUECTL_STORE_ID"  # a worker's runs carry it (worker_env); a bare run may not


def mark_of(env: Mapping[bytes, bytes] | Mapping[str, str] | None) -> tuple[bytes, ...] | None:
    """The environment entries that name a run, or None for a run without them."""
    if env is None:
        return None
    named = (*_MARKS, _STORE)
    as_bytes = {os.fsencode(k): os.fsencode(v) for k, v in env.items() if os.fsencode(k) in named}
    if not all(key in as_bytes for key in _MARKS):
        return None
    return tuple(key + b"=" + as_bytes[key] for key in named if key in as_bytes)


def worker_mark(worker_id: str, store_id: str) -> tuple[bytes, ...]:
    """The mark every run of one worker of one store carries: worker ids repeat from one
    database to another, so a rescuer stops only its own store's runs."""
    return (_STORE + b"=" + store_id.encode(), b"QUEUECTL_WORKER_ID=" + worker_id.encode())


def _marked(environ: bytes, mark: tuple[bytes, ...]) -> bool:
    entries = set(environ.split(b"\0"))
    return all(entry in entries for entry in mark)


def _environ(pid: int | str) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # gone, or another user's
        return b""


def marked_processes(mark: tuple[bytes, ...]) -> list[int]:
    """Pids of the processes on this host whose environment carries ``mark`` (Linux: read
    from /proc; elsewhere none are found)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    me = os.getpid()
    return [int(n) for n in names
            if n.isdigit() and int(n) != me and _marked(_environ(n), mark)]


def signal_marked(pid: int, mark: tuple[bytes, ...], sig: int) -> bool:
    """Send ``sig`` to ``pid`` if it is (still) a marked process: through a pidfd opened
    before the mark is checked, so a reused pid can never be hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False  # gone, or no pidfds here: never signal a bare pid that may be reused
    try:
        if not _marked(_environ(pid), mark):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def stop_marked(mark: tuple[bytes, ...], grace: float = KILL_GRACE) -> int:
    """Stop every process carrying ``mark``: SIGTERM, then SIGKILL to what is left after
    ``grace`` seconds (waiting here until they are gone or the grace is over). Returns how
    many processes were found."""
    pids = [p for p in marked_processes(mark) if signal_marked(p, mark, signal.SIGTERM)]
    if not pids:
        return 0
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and marked_processes(mark):
        time.sleep(0.02)
    for pid in marked_processes(mark):
        signal_marked(pid, mark, signal.SIGKILL)
    return len(pids)


class Leftovers:
    """Runs that left processes behind when their shell exited: each got SIGTERM then, and
    whatever of it is still there after the grace gets SIGKILL from ``sweep``."""

    def __init__(self) -> None:
        self._due: list[tuple[float, tuple[bytes, ...]]] = []
        self._lock = threading.Lock()

    def add(self, mark: tuple[bytes, ...]) -> None:
        with self._lock:
            self._due.append((time.monotonic() + KILL_GRACE, mark))

    def sweep(self, everything: bool = False) -> None:
        """SIGKILL the leftovers whose grace is over (all of them with ``everything``)."""
        if not self._due:
            return
        now = time.monotonic()
        with self._lock:
            due = [m for t, m in self._due if everything or t <= now]
            self._due = [(t, m) for t, m in self._due if not (everything or t <= now)]
        for mark in due:
            for pid in marked_processes(mark):
                signal_marked(pid, mark, signal.SIGKILL)


LEFTOVERS = Leftovers()  # one per process: worker threads share it
