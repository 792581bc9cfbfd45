"""Replay the ledger into fresh projections, or check that the live ones match it.

    python tools/replay.py [--db PATH] [--check]

The same as ``queuectl rebuild [--check]``; kept as a standalone tool so the rebuild can be
run (and timed) without the CLI.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from queuectl import ledger
from queuectl.errors import QueueError


@click.command()
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), envvar="QUEUECTL_DB",
              default=Path("data") / "queue.db", show_default=True)
@click.option("--check", is_flag=True, help="Rebuild aside and compare; exit 1 on drift.")
def main(db: Path, check: bool) -> None:
    try:
        conn = ledger.connect(db, create=False)  # a typo must not make an empty database
        start = time.perf_counter()
        if check:
            problems = ledger.check(conn)
            for problem in problems:
                click.echo(problem, err=True)
            if problems:
                sys.exit(1)
            click.echo("Projections match the ledger.")
            return
        position = ledger.rebuild(conn).events
    except QueueError as exc:
        raise click.ClickException(str(exc)) from exc
    seconds = time.perf_counter() - start
    click.echo(f"Replayed {position} events in {seconds:.2f}s.")


if __name__ == "__main__":
    main()
