"""``queuectl worker``: run workers, or ask them to stop.

Every worker process pays for its start-up, and a benchmark or a supervisor starts many,
so this command joins the group of ``queuectl.cli_root`` on its own (see
``QueuectlGroup``): starting a worker loads neither the other commands nor what they render.
"""

from __future__ import annotations

import re
from typing import Any

import click

from queuectl import complete, decisions
from queuectl.cli_root import Number, _db, _queue_name, cli


def _host_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", value):
        raise click.BadParameter(f"{value!r} is not a host name (letters, digits, . _ -)")
    return value


def worker_options(f: Any) -> Any:
    for option in reversed(
        (
            click.option("-v", "--verbose", is_flag=True, help="Log every job's progress."),
            click.option("-c", "--concurrency", type=Number("concurrency"), default=1,
                         show_default=True,
                         help="Workers to run, spread over --processes processes."),
            click.option("--processes", type=Number("processes"), default=None,
                         metavar="N",
                         help="Processes the workers run in (default: one per CPU, "
                              "at most one per worker; 1: all of them in this one)."),
            click.option("-s", "--poll", type=Number("poll"), default=3.0,
                         show_default=True,
                         help="Seconds between checks when idle (new jobs wake workers "
                              "at once anyway)."),
            click.option("-l", "--limit", type=Number("jobs_per_worker"), default=0,
                         help="Jobs per worker before it exits (0 = no limit)."),
            click.option("--burst", is_flag=True,
                         help="Exit once nothing is pending, running or waiting to retry."),
            click.option("--ahead", type=Number("ahead"), default=0, metavar="N",
                         help="Jobs each worker holds claimed beyond the one it runs, after "
                              "a quick job (default 0). Each starts only once the store "
                              "says it may; a job running over 1s gives them back."),
            click.option("-q", "--queue", "queues", multiple=True, metavar="NAME",
                         callback=_queue_name, shell_complete=complete.queue_names,
                         help="Take jobs only of this queue (repeatable: all of the first "
                              "before any of the next; default: every queue, by priority)."),
            click.option("--host-name", envvar="QUEUECTL_HOST", metavar="NAME",
                         callback=_host_name,
                         help="The host these workers say they run on (also QUEUECTL_HOST; "
                              "default: this machine's name). A worker stops the runs of a "
                              "dead worker only on its own host."),
        )
    ):
        f = option(f)
    return f


@cli.group(invoke_without_command=True)
@worker_options
@click.option("--stop", is_flag=True, help="Ask running workers to finish their job and exit.")
@click.pass_context
def worker(ctx: click.Context, stop: bool, **options: Any) -> None:
    """Run workers in the foreground (Ctrl-C: finish the job and exit; twice: at once).

    \b
    Example:
        queuectl worker -v -c 3 -s 1
        queuectl worker --burst
        queuectl worker --stop
    """
    if ctx.invoked_subcommand is None:
        _stop(ctx) if stop else _run(ctx, **options)


@worker.command("start")
@worker_options
@click.pass_context
def worker_start(ctx: click.Context, **options: Any) -> None:
    """Same as `queuectl worker [OPTIONS]`."""
    _run(ctx, **options)


@worker.command("stop")
@click.pass_context
def worker_stop(ctx: click.Context) -> None:
    """Same as `queuectl worker --stop`."""
    _stop(ctx)


def _stop(ctx: click.Context) -> None:
    decisions.request_stop(_db(ctx, create=True))
    click.echo("Stop signal sent to all workers.")


def _run(ctx: click.Context, **options: Any) -> None:
    import threading

    from queuectl import processes
    from queuectl.worker import Options

    lock = threading.Lock()

    def echo(line: str) -> None:
        with lock:
            click.echo(line)

    asked = options.pop("processes")
    if asked is not None and asked > options["concurrency"]:
        raise click.BadParameter(
            f"{asked} processes for {options['concurrency']} workers: each process runs "
            "at least one (raise -c, or lower --processes)", param_hint="'--processes'")
    count = processes.count(options["concurrency"], asked)
    errors = processes.run_workers(ctx.obj["db"], Options(**options), count, echo)
    if errors:
        raise click.ClickException("; ".join(errors))
