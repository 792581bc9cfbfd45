"""``worker -c N`` as processes: the N workers spread over one process per CPU.

A process's workers are threads, and one interpreter runs one thread's Python at a time:
at ``-c 2`` the two workers' Python took turns for the GIL while the second core waited.
Two processes of one worker each did 1.08x-1.11x the jobs a second of one process of two
(bench scenarios worker and scaling). So ``worker -c N`` forks ``min(N, CPUs)`` processes,
each running its share of the N workers as threads (``worker.run_workers``); more
processes than cores would only add memory. ``--processes 1`` keeps them all in one.

The first process prepares the store (creates or migrates it, loads every projection),
closes its connection and forks: no connection and no thread crosses a fork. It then only
supervises:

- Signals. Each child leads a process group of its own, so that the terminal's Ctrl-C (a
  SIGINT to the foreground group) or a signal sent to the command's group reaches this
  process only, never a child, nor a job's shell a child is starting (which joins its own
  session only once it runs). This process counts them for all: the first SIGINT or
  SIGTERM asks every child to finish its job and stop (SIGTERM), a SIGINT after that to
  stop at once (SIGUSR1, their ``hard`` signal). A child takes SIGINT and SIGTERM as the
  first request only, so that one sent to it as well counts once.
- Pauses. Ctrl-Z stops the children, then this process; ``fg`` or ``bg`` continues them
  all, as it did the one process of before.
- Failure. A child that exits with an error makes the others finish their jobs and stop,
  as one worker's crash does among threads; the command then exits 1 with every child's
  errors on one line.
- Its own death. Each child asks the kernel to kill it should the first process die
  (``PR_SET_PDEATHSIG``): ``kill -9`` of the command ends its workers at once, as it did
  when they were threads, and their jobs go back through their leases.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from queuectl import worker

if TYPE_CHECKING:
    from pathlib import Path  # importing it costs a worker's start 2.7 ms

_STOPS = {signal.SIGINT, signal.SIGTERM}
_PAUSES = {signal.SIGTSTP, signal.SIGCONT}  # Ctrl-Z and fg/bg: the workers pause too
_WATCHED = {*_STOPS, *_PAUSES, signal.SIGCHLD}
_HARD = signal.SIGUSR1  # a child's signal to stop at once
_MESSAGE = 3000  # bytes of one child's errors at most: one write to the pipe, never split
_PR_SET_PDEATHSIG = 1


def count(concurrency: int, asked: int | None) -> int:
    """Processes for ``concurrency`` workers: ``asked``, else one per CPU this process
    may run on, and never more than the workers."""
    if asked is None:
        try:
            asked = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            asked = os.cpu_count() or 1
    return max(1, min(asked, concurrency))


def shares(concurrency: int, processes: int) -> list[int]:
    """The workers of each process: as even as they go, the first ones one more."""
    each, extra = divmod(concurrency, processes)
    return [each + (n < extra) for n in range(processes)]


def run_workers(target: str | Path, options: worker.Options, processes: int,
                echo: Callable[[str], None]) -> list[str]:
    """``worker.run_workers`` over ``processes`` processes; returns their error messages."""
    if processes <= 1 or not hasattr(os, "fork"):
        return worker.run_workers(target, options, echo)
    worker.prepare(target)
    errors_out, errors_in = os.pipe()
    os.set_blocking(errors_out, False)
    # Blocked from here: in each child, until its handlers are in place.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*_WATCHED, _HARD})
    children: dict[int, int] = {}
    first = os.getpid()
    try:
        for share in shares(options.concurrency, processes):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child's coverage is not collected
                os.close(errors_out)
                _child(target, msgspec.structs.replace(options, concurrency=share), echo,
                       errors_in, mask, first)
            children[pid] = share
        os.close(errors_in)
        errors_in = -1
        return _supervise(children, errors_out)
    except BaseException:
        if errors_in >= 0:  # a fork failed: the children forked have their own copies
            os.close(errors_in)
        for pid in children:  # a fork that failed, or a bug here: the others stop too
            _signal(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(errors_out)


def _child(target: str | Path, options: worker.Options, echo: Callable[[str], None],
           errors_in: int, mask: set[int], first: int) -> None:
    """A forked process's life: its workers, its errors to the pipe, then its end."""
    code = 1
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        if os.getppid() != first:  # the first process died before the request was made
            errors = ["the worker command's first process ended"]
        else:
            # The handlers run_workers puts back when its workers have stopped: a stop asked
            # for while this process then tidies up (the first process's SIGTERM after this
            # one's own SIGINT, say) would otherwise find the default, and kill it.
            for sig in (*_STOPS, _HARD):
                signal.signal(sig, _stopping_already)
            errors = worker.run_workers(
                target, options, _flushed(echo), hard=_HARD,
                listening=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, mask))
        code = 1 if errors else 0
    except BaseException as exc:  # reported by the first process, as one line
        from queuectl import render

        errors = [render.one_line(exc)]
    try:
        if errors:
            text = "\n".join(errors).encode("utf-8", "replace")[:_MESSAGE]
            os.write(errors_in, f"{os.getpid()}\t".encode()
                     + text.decode("utf-8", "ignore").encode() + b"\0")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):  # `worker -v | head`, as ``main`` does
                pass
    except OSError:  # a full disk, say
        code = code or 1
    finally:
        os._exit(code)


def _stopping_already(signum: int, frame: object) -> None:
    """A stop asked for once a worker process's workers have stopped: it is ending anyway."""


def _flushed(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo``, each line written out at once: a pipe shared by several processes then
    gets whole lines, never a buffer cut in the middle of one."""
    def echo_line(line: str) -> None:
        echo(line)
        sys.stdout.flush()

    return echo_line


def _die_with_parent() -> None:
    """Ask Linux for SIGKILL when the first process ends (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _supervise(children: dict[int, int], errors_out: int) -> list[str]:
    """Pass signals on, reap the children, stop the rest once one fails; returns the
    errors the children reported, in the order they arrived, then how any child ended
    that failed without a word (killed by a signal, say)."""
    received = bytearray()
    ended: dict[int, int] = {}  # pid: exit code, negative for a signal
    stopping = asked = False
    while children:
        info = signal.sigtimedwait(_WATCHED, 0.5)
        if info is not None and info.si_signo in _PAUSES:
            _pause(children, info.si_signo)
        elif info is not None and info.si_signo in _STOPS:
            hard = asked and info.si_signo == signal.SIGINT
            asked = stopping = True
            for pid in children:
                _signal(pid, _HARD if hard else signal.SIGTERM)
        received += _drain(errors_out)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            del children[pid]
            ended[pid] = os.waitstatus_to_exitcode(status)
            if ended[pid] and not stopping:  # its own failure: the others stop too
                stopping = True
                for other in children:
                    _signal(other, signal.SIGTERM)
    received += _drain(errors_out)
    reports = _reports(received)
    errors = [line for _, text in reports for line in text.split("\n")]
    said = {pid for pid, _ in reports}
    for pid, code in ended.items():
        if code < 0:
            errors.append(f"worker process {pid} was killed by signal "
                          f"{signal.Signals(-code).name}")
        elif code and pid not in said:
            errors.append(f"worker process {pid} exited with status {code}")
    return errors


def _pause(children: dict[int, int], sig: int) -> None:
    """Ctrl-Z (SIGTSTP) stops the workers, then this process, as it stopped the one process
    they ran in before; the shell's ``fg`` or ``bg`` (SIGCONT, which has continued this
    one already) continues them."""
    if sig == signal.SIGTSTP:
        for pid in children:
            _signal(pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        for pid in children:
            _signal(pid, signal.SIGCONT)


def _reports(received: bytes | bytearray) -> list[tuple[int, str]]:
    """The children's reports (each its pid, a tab, its errors, a NUL), in order."""
    reports = []
    for part in received.split(b"\0"):
        if part:
            pid, _, text = part.decode("utf-8", "replace").partition("\t")
            reports.append((int(pid), text))
    return reports


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # exited, not yet reaped
