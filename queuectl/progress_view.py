"""``python -m queuectl.progress_view REFRESH``: draws a command's progress bar on standard
error, at most REFRESH frames a second, from what the command writes to its standard input
(see ``queuectl.progress``).

It runs beside the work, on the same cores: it imports only rich and the standard library
(not msgspec, not the rest of queuectl), and once its last frame is out it ends at once,
without tearing its interpreter down, since the command waits for that before going on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any


def view(lines: Iterable[bytes], refresh: float) -> None:
    """Draw what the work's process says (``progress._Drawn``), until it closes the pipe."""
    display = _display(refresh)
    display.start()
    task: Any = None
    try:
        for line in lines:
            kind, *args = json.loads(line)
            if kind == "t":
                label, total, done, unit = args
                task = display.add_task(label, total=total, completed=done, unit=unit)
            elif kind == "u" and task is not None:
                display.update(task, completed=args[0])
            elif kind == "f" and task is not None:
                display.update(task, total=args[0], completed=args[0])
                task = None
    finally:
        display.stop()


def _display(refresh: float) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Count(ProgressColumn):
        """``12,345/100,000 events``; without a total, ``12,345 events``."""

        def render(self, task: Any) -> Text:
            if not task.fields["unit"]:  # a step that is not counted
                return Text("")
            done = f"{int(task.completed):,}"
            if task.total is not None:
                done += f"/{int(task.total):,}"
            return Text(f"{done} {task.fields['unit']}", style="progress.download")

    class Rate(ProgressColumn):
        """``45,678 events/s``: lately, or over the whole step once it is over."""

        def render(self, task: Any) -> Text:
            if task.finished and task.finished_time:
                speed = task.completed / task.finished_time
            else:
                speed = task.speed
            if not speed or not task.fields["unit"]:
                return Text("")
            return Text(f"{speed:,.0f} {task.fields['unit']}/s",
                        style="progress.data.speed")

    return Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        BarColumn(),
        Count(),
        Rate(),
        TimeRemainingColumn(elapsed_when_finished=True),
        console=Console(file=sys.stderr),
        refresh_per_second=refresh,
        redirect_stdout=False,  # stdout may be the data (ledger export): never through here
        redirect_stderr=False,
    )


if __name__ == "__main__":
    # Ctrl-C is the command's to handle: the bar ends when the command closes the pipe (or
    # exits), with its last frame drawn.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    view(sys.stdin.buffer, float(sys.argv[1]) if len(sys.argv) > 1 else 10)
    sys.stderr.flush()
    os._exit(0)
