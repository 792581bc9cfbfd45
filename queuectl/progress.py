"""Progress bars for long work (rebuild, ledger import and export, prune, enqueue --file):
done/total, rate and time left, drawn on standard error when it is a terminal.

The command opens the display with ``progress(...)``; the work reports into it through
``current()``, so the core needs no parameter for it and prints nothing itself. Nothing is
drawn, and rich is not even imported, when standard error is not a terminal, when the
command was asked for ``--json``, or while the work is too small to be worth a bar: a
display appears once a task has ``SMALL`` items in view (its total, or its count so far
when the total is unknown), and from then on shows every later task of the command.
Work reports every few thousand items, never per item, and the display redraws on its own
thread at most ``REFRESH`` times a second, so the bar costs the work almost nothing.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any, TypeVar

import msgspec

if TYPE_CHECKING:  # imported where a bar's process starts: most commands never draw one
    import subprocess

SMALL = 1000  # items: work smaller than this is over before a bar could say anything
REFRESH = 10  # redraws a second, at most
EVERY = 1024  # items between two reports of a loop that counts them one by one

T = TypeVar("T")
Total = int | Callable[[], int | None] | None


class Bar:
    """Where long work says how far it got. This one draws nothing: the work runs as if
    no one were watching."""

    shown = False

    def task(self, label: str, total: Total = None, unit: str = "") -> None:
        """Begin the next step (the one before is done): ``total`` items, or a function
        that counts them (only called when a bar is drawn), or None when unknown."""

    def update(self, done: int) -> None:
        """The current step has done ``done`` items so far."""

    def advance(self, n: int) -> None:
        """The current step has done ``n`` more items."""

    def finish(self) -> None:
        """The current step is over."""

    def close(self) -> None:
        """Stop drawing (the last frame stays on the screen)."""


NO_BAR = Bar()
_current: ContextVar[Bar] = ContextVar("queuectl_progress", default=NO_BAR)


def current() -> Bar:
    """The bar of the command running, or one that draws nothing."""
    return _current.get()


def terminal() -> bool:
    """Standard error is a terminal a bar can be drawn on."""
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # replaced by an object without a file, or closed
        return False


@contextmanager
def progress(total: Total = None, label: str = "", *, unit: str = "",
             enabled: bool = True) -> Iterator[Bar]:
    """A progress display for the work inside the block (its first step ``label`` of
    ``total`` items, when given); a no-op bar unless standard error is a terminal and
    ``enabled`` (pass False for ``--json``). Inside another display, the steps join it."""
    outer = _current.get()
    if outer.shown:  # one display a command
        if label:
            outer.task(label, total, unit)
        yield outer
        if label:
            outer.finish()
        return
    bar: Bar = _Drawn() if enabled and terminal() else NO_BAR
    token = _current.set(bar)
    try:
        if label:
            bar.task(label, total, unit)
        yield bar
        bar.finish()
    finally:
        _current.reset(token)
        bar.close()


def counted(items: Iterable[T], bar: Bar | None = None, every: int = EVERY) -> Iterator[T]:
    """``items``, telling ``bar`` (the current one) how many went by every ``every``."""
    bar = bar or current()
    if not bar.shown:
        yield from items
        return
    n = 0
    for n, item in enumerate(items, 1):
        if not n % every:
            bar.update(n)
        yield item
    bar.update(n)


@contextmanager
def reading(stream: IO[bytes], label: str, unit: str = "lines") -> Iterator[Iterator[bytes]]:
    """The lines of ``stream``, read inside the block with a bar of how many were, out of
    how many a regular file holds (a pipe's are unknown: the bar counts without a total)."""
    with progress(lambda: count_lines(stream), label, unit=unit) as bar:
        yield counted(stream, bar)


def count_lines(stream: IO[bytes]) -> int | None:
    """How many lines a regular file holds from where it is read, leaving it there; None
    for a pipe, a terminal or anything else that cannot be read twice."""
    try:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            return None
        start = stream.tell()
    except (AttributeError, OSError, ValueError):  # no file behind it (a test's BytesIO)
        return None
    lines, last = 0, b"\n"
    try:
        while chunk := stream.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    finally:
        stream.seek(start)
    return lines + (last != b"\n")


class _Drawn(Bar):
    """A progress display on standard error, drawn by a process of its own once there is
    enough to show. The work's process only tells it how far it got, a line on a pipe at
    most twice a frame: rich in the same process, drawing or not, slowed a replay by
    several percent (bench scenario progress), and a separate process costs it nothing."""

    shown = True

    def __init__(self) -> None:
        self.view: subprocess.Popen[bytes] | None = None
        self.open = False  # the current step is on the display
        self.label, self.unit, self.done = "", "", 0
        self.total: int | None = None
        self._sent = 0.0

    def task(self, label: str, total: Total = None, unit: str = "") -> None:
        self.finish()
        self.label, self.unit, self.done, self.open = label, unit, 0, False
        self.total = total() if callable(total) else total
        self._show()

    def update(self, done: int) -> None:
        self.done = done
        if not self.open:
            self._show()
            return
        now = time.monotonic()
        if now - self._sent >= 0.5 / REFRESH:
            self._sent = now
            self._send(["u", done])

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def finish(self) -> None:
        if self.open:
            # Over: what it counted is the total (a total given may have been an estimate).
            self._send(["f", self.done or self.total or 0])
            self.open = False

    def close(self) -> None:
        """Stop drawing, once the last frame is drawn: what the command prints next (an
        error, say) comes after it."""
        if self.view is None:
            return
        view, self.view = self.view, None
        try:
            assert view.stdin is not None
            view.stdin.close()
        except OSError:
            pass
        import subprocess

        try:
            _wait(view, 5)
        except subprocess.TimeoutExpired:
            view.kill()
            view.wait()

    def _show(self) -> None:
        if self.view is None:
            if max(self.total or 0, self.done) < SMALL:
                return
            import subprocess

            self.view = subprocess.Popen(
                [sys.executable, "-m", "queuectl.progress_view", str(REFRESH)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self._send(["t", self.label, self.total, self.done, self.unit])
        self.open = True

    def _send(self, message: list[Any]) -> None:
        if self.view is None or self.view.stdin is None:
            return
        try:
            self.view.stdin.write(msgspec.json.encode(message) + b"\n")
            self.view.stdin.flush()
        except (OSError, ValueError):  # the display is gone: the work goes on without it
            self.view.stdin = None


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """``proc.wait(timeout)``, returning as soon as the process ends: ``Popen.wait`` with a
    timeout looks in sleeps that double up to 50 ms, and the command waits for its bar's
    last frame before it goes on."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3 or later
        proc.wait(timeout)
        return
    import select

    try:
        poller = select.poll()  # not select(): a descriptor may be numbered past 1023
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            import subprocess

            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    proc.wait()
