"""The ``queuectl`` commands besides ``enqueue`` and ``worker``: parse, call one core
function, render.

They join the group of ``queuectl.cli_root`` when this module is imported, which that group
does the first time it is asked for one of them (see ``QueuectlGroup``); ``worker``, from
``queuectl.cli_worker``, joins with them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from queuectl import clock, complete, decisions, ledger, limits, progress, reads, settings, store
from queuectl.cli_root import (
    Number,
    RateType,
    _db,
    _env_flags,
    _json,
    _limit_options,
    _lines,
    _queue_name,
    cli,
    enqueue,
    main,
)
from queuectl.cli_worker import worker
from queuectl.states import CANCELLABLE, STATES, State

if TYPE_CHECKING:
    from queuectl import waiting

__all__ = ["cli", "enqueue", "main", "worker"]  # every command is an attribute here, as mkdocs-click asks


# -- config -------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Show or change settings (defaults for new jobs, worker timings)."""


def _config_help() -> str:
    """``config set``'s help, listing every key with what it takes, from ``settings``."""
    width = max(map(len, settings.SETTINGS))
    keys = "\n".join(f"  {key:<{width}}  {limits.describe(s.bound)} (default {s.default})"
                     for key, s in settings.SETTINGS.items())
    return ("Set KEY to VALUE. New jobs take the retry settings and timeout in force when they\n"
            "are enqueued; workers reread the others at each heartbeat.\n\n"
            f"\b\nKeys:\n{keys}\n\n\b\nExample:\n    queuectl config set max-retries 5")


@config.command("set", context_settings={"ignore_unknown_options": True}, help=_config_help())
@click.argument("key", type=click.Choice(list(settings.SETTINGS)), metavar="KEY")
@click.argument("value")
@click.pass_context
def config_set(ctx: click.Context, key: str, value: str) -> None:
    stored = decisions.set_config(_db(ctx, create=True), key, value)
    click.echo(f"Configuration updated: {key} = {stored}")
    click.echo(settings.SETTINGS[key].updated(stored))


@config.command("get")
@click.argument("key", required=False, type=click.Choice(list(settings.SETTINGS)), metavar="[KEY]")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def config_get(ctx: click.Context, key: str | None, as_json: bool) -> None:
    """Show every setting (or one) with a line on what it does."""
    values = settings.load(_db(ctx))
    if key:
        values = {key: values[key]}
    if as_json:
        return _json({name: settings.typed(name, value) for name, value in values.items()})
    click.echo("===== CONFIGURATION =====")
    for name, value in values.items():
        click.echo(f"{name} = {value}")
        click.echo(settings.SETTINGS[name].explain(value))
    click.echo("=========================")



@cli.command()
@click.argument("job_id", metavar="ID", shell_complete=complete.job_ids)
@click.option("-c", "--command", help="A new shell command.")
@click.option("-p", "--priority", type=Number("priority"), help="A new priority.")
@click.option("--delay", type=Number("delay"), help="It may run this many seconds from now.")
@click.option("--run-at", help="It may not run before this ISO-8601 time (no zone: UTC).")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names, help="Move it to this queue.")
@click.option("--max-retries", type=Number("max_retries"), help="Its retries after the first run.")
@click.option("--timeout", type=Number("timeout"), help="Seconds before it is killed (0: none).")
@click.option("--cwd", metavar="DIR", help="The directory it runs in, relative to this one.")
@click.option("--env", "env_vars", multiple=True, metavar="KEY=VALUE",
              help="Set or change a variable of its environment (repeatable); the others "
                   "stay.")
@click.option("--pass-env", multiple=True, metavar="NAME",
              help="Copy this shell's current value of NAME into its environment.")
@_limit_options("it", "'none': remove it")
@click.pass_context
def edit(ctx: click.Context, job_id: str, env_vars: tuple[str, ...], pass_env: tuple[str, ...],
         **values: Any) -> None:
    """Change a job that has not started yet (pending, scheduled or waiting); a running or
    finished job is refused. Only what differs is recorded (event ``edited``), and
    ``history`` shows it.

    \b
    Example:
        queuectl edit 12 --priority 5 -q media
        queuectl edit 12 -c "make report" --delay 60
        queuectl edit 12 --cwd ~/src/app --env CI=1
        queuectl edit 12 --memory 512MiB --cpu-time none
    """
    from queuectl import render

    env = _env_flags(env_vars, pass_env)
    if env:
        values["env"] = env
    if all(v is None for v in values.values()):
        raise click.UsageError("give at least one new value (see queuectl edit --help)")
    edited = decisions.edit(_db(ctx), job_id, **values)
    if edited is None:
        click.echo(f"Job {job_id} unchanged: it has these values already.")
    else:
        click.echo(reads.printable(f"Job {job_id} edited: {'; '.join(render.edits(edited))}."))


# -- reading ------------------------------------------------------------------------------


@cli.command("list")
@click.option("-s", "--state", type=click.Choice([s.value for s in STATES]), help="Only jobs in this state.")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="Only jobs of this queue.")
@click.option("--limit", type=Number("limit"), help="At most N jobs (oldest first).")
@click.option("--after", metavar="ID", shell_complete=complete.job_ids,
              help="Only the jobs listed after job ID (the next page after --limit).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_(ctx: click.Context, state: str | None, queue: str | None, limit: int | None,
          after: str | None, as_json: bool) -> None:
    """List jobs, oldest first (pending ones in the order they will run).

    \b
    Example:
        queuectl list -s failed
        queuectl list -q media -s pending
        queuectl list --json --limit 10
        queuectl list --json --limit 10 --after 1042
    """
    from queuectl import render, views

    if as_json:
        return _json(views.jobs(_db(ctx), state, queue, limit, after))
    jobs = reads.list_jobs(_db(ctx), state, limit, queue, after)
    title = ", ".join(filter(None, (state, queue and f"queue {queue}")))
    render.jobs_table(jobs, f"Jobs ({title})" if title else "Jobs")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--watch", is_flag=True,
              help="A live view, redrawn every -n seconds, until Ctrl-C.")
@click.option("-n", "--interval", type=Number("interval"), metavar="SECONDS",
              help="With --watch: seconds between redraws (default 1).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: bool, interval: float | None) -> None:
    """Job counts per state, and the workers still running (active, or silent for longer
    than lease-timeout); workers that stopped or were declared gone are only counted.

    With --watch, a live view: jobs per state and queue, workers with their current job,
    runs ended a minute over the last ten, and the newest failures.

    \b
    Example:
        queuectl status --watch -n 2
    """
    if interval is not None and not watch:
        raise click.UsageError("-n goes with --watch")
    if watch:
        if as_json:
            raise click.UsageError("--watch draws for people, --json prints for scripts: "
                                   "give one")
        if not sys.stdout.isatty():
            raise click.UsageError("--watch needs a terminal, and standard output is not one "
                                   "(status --json gives scripts the figures)")
        from queuectl.watch import run as watching

        return watching(_db(ctx), interval or 1.0, store.shown(ctx.obj["db"]))
    from queuectl import render, views

    found = views.status(_db(ctx))
    if as_json:
        return _json(found)
    render.status(found.jobs, found.queues, found.workers, found.worker_counts)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def queues(ctx: click.Context, as_json: bool) -> None:
    """Every queue: paused or running, its limit, its jobs per state and how long its
    oldest pending job has waited."""
    from queuectl import render, views

    found = views.queues(_db(ctx))
    if as_json:
        return _json(found)
    render.queues_table(found)


@cli.command()
@click.argument("job_id", metavar="ID", shell_complete=complete.job_ids)
@click.option("--archive", is_flag=True,
              help="With the events pruned out of the ledger (queuectl prune).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of events.")
@click.pass_context
def history(ctx: click.Context, job_id: str, archive: bool, as_json: bool) -> None:
    """Every event of one job, in order: its whole life."""
    from queuectl import render, views

    if as_json:
        return _json(views.history(_db(ctx), job_id, archive))
    rows = reads.history(_db(ctx), job_id, archive)
    render.history_table(job_id, rows)


@cli.command()
@click.argument("job_id", metavar="ID", shell_complete=complete.job_ids)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Everything about one job: fields, retry policy, dependencies, last error, next run."""
    from queuectl import render, views

    conn = _db(ctx)
    if as_json:
        return _json(views.job(conn, job_id))
    job = reads.get_job(conn, job_id)
    deps = {dep: reads.get_job(conn, dep).state for dep in job.after}
    runs = reads.runs_of(conn, job_id)
    render.show(job, deps, runs)


@cli.command()
@click.argument("job_id", metavar="ID", shell_complete=complete.job_ids)
@click.option("--attempt", type=Number("attempt"), help="Only this attempt.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of runs.")
@click.option("-f", "--follow", is_flag=True,
              help="Print the output as it is written, from the start of the current run "
                   "(waiting for the job to start), through every retry, until the job is "
                   "final; then exit with its exit code (0 completed; dead: its last run's "
                   "exit code, 124 for a timeout, else 1; cancelled: 1). Ctrl-C stops "
                   "following (exit 130) and leaves the job alone.")
@click.option("--full", is_flag=True,
              help="Print the whole kept output (up to log-limit) of the last run, or of "
                   "--attempt N, from the output store.")
@click.pass_context
def logs(ctx: click.Context, job_id: str, attempt: int | None, as_json: bool, follow: bool,
         full: bool) -> None:
    """Each run of a job: exit code, duration and the tail of its output; with --follow
    or --full, the output itself.

    \b
    Example:
        queuectl logs 7
        queuectl logs 7 --follow
        queuectl logs 7 --full --attempt 2 > attempt2.log
    """
    from queuectl import render

    if follow and (full or as_json or attempt is not None):
        raise click.UsageError("--follow goes with none of --full, --json and --attempt")
    if full and as_json:
        raise click.UsageError("--full prints the output itself; --json prints the runs")
    conn = _db(ctx)
    if follow:
        _follow(conn, job_id)
    if full:
        return _full(conn, job_id, reads.runs_of(conn, job_id), attempt)
    from queuectl import views

    runs = views.logs(conn, job_id, attempt)
    if attempt is not None and not runs:
        raise click.ClickException(f"Job {job_id} has no attempt {attempt}")
    if as_json:
        return _json(runs)
    render.logs(job_id, runs)


def _full(conn: store.Db, job_id: str, runs: list[Any], attempt: int | None) -> None:
    from queuectl import output

    if attempt is not None:
        runs = [r for r in runs if r.attempt == attempt]
        if not runs:
            raise click.ClickException(f"Job {job_id} has no attempt {attempt}")
    if not runs:
        raise click.ClickException(f"Job {job_id} has not run yet")
    click.echo(output.full(conn, job_id, runs[-1]), nl=False)


def _follow(conn: store.Db, job_id: str) -> NoReturn:
    """Print a job's output as it is written until the job is final (``output.follow``),
    then exit with its exit code (``outcome.exit_code``); Ctrl-C: exit 130."""
    from queuectl import outcome, output

    try:
        for piece in output.follow(conn, job_id):
            if isinstance(piece, str):
                click.echo(piece, nl=False)
                sys.stdout.flush()
            else:
                click.echo(str(piece), err=True)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    code = outcome.of_job(conn, job_id, reads.get_job(conn, job_id).state)
    raise click.exceptions.Exit(1 if code is None else code)


@cli.command()
@click.argument("job_id", metavar="[ID]", required=False, shell_complete=complete.job_ids)
@click.option("--state", type=click.Choice([s.value for s in CANCELLABLE]),
              help="Cancel every job in this state instead of one.")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="With --state: only jobs of this queue.")
@click.option("--dry-run", is_flag=True, help="With --state: print how many, change nothing.")
@click.pass_context
def cancel(ctx: click.Context, job_id: str | None, state: str | None, queue: str | None,
           dry_run: bool) -> None:
    """Cancel a job, or every job in a state; a running one is killed (its whole process
    group) by its worker.

    Jobs waiting on a cancelled job are cancelled too.

    \b
    Example:
        queuectl cancel nightly
        queuectl cancel --state pending -q media --dry-run
    """
    if (job_id is None) == (state is None):
        raise click.UsageError("give a job ID or --state STATE")
    if job_id is not None:
        if queue or dry_run:
            raise click.UsageError("-q and --dry-run go with --state")
        if decisions.cancel(_db(ctx), job_id) == "requested":
            click.echo(f"Cancel requested for running job {job_id}; its worker will stop it.")
        else:
            click.echo(f"Job {job_id} cancelled.")
        return
    assert state is not None
    cancelled, requested = decisions.cancel_all(_db(ctx), state, queue, dry_run=dry_run)
    dry = " (dry run: nothing written)" if dry_run else ""
    if state != State.PROCESSING or cancelled:  # running: those held ahead, not started
        held = " held ahead, not yet started" if state == State.PROCESSING else ""
        click.echo(f"{'Would cancel' if dry_run else 'Cancelled'} {_jobs(cancelled)}{held}{dry}.")
    if state == State.PROCESSING and dry_run:
        click.echo(f"Would ask {_jobs(requested, 'running job')} to stop{dry}.")
    elif state == State.PROCESSING:
        click.echo(f"Cancel requested for {_jobs(requested, 'running job')}; their workers "
                   "will stop them.")


def _jobs(n: int, noun: str = "job") -> str:
    return f"{n:,} {noun}{'s' if n != 1 else ''}"


@cli.command()
@click.option("--since", metavar="DURATION", help="Only the last DURATION (90s, 15m, 2h, 1d).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def stats(ctx: click.Context, since: str | None, as_json: bool) -> None:
    """Throughput, success rate, run time and queue wait, from the ledger's runs."""
    from queuectl import render

    seconds = reads.parse_since(since) if since else None
    figures = reads.stats(_db(ctx), seconds)
    if as_json:
        return _json(figures)
    render.stats(figures, since)


# -- monitoring ---------------------------------------------------------------------------


@cli.command()
@click.pass_context
def metrics(ctx: click.Context) -> None:
    """Print the Prometheus metrics once, in the text format: jobs, runs, workers,
    queues and schedules, read from the projections (``queuectl dashboard`` serves the
    same at /metrics).

    \b
    Example:
        queuectl metrics
        queuectl metrics > /var/lib/node_exporter/queuectl.prom.tmp && \\
          mv /var/lib/node_exporter/queuectl.prom.tmp /var/lib/node_exporter/queuectl.prom
    """
    from queuectl import metrics as collector

    click.echo(collector.exposition(collector.reader(_db(ctx))).decode(), nl=False)


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value != value or value == float("inf"):  # nan, inf: no number of seconds
        raise click.BadParameter(f"{value} is not a number of seconds.")
    return value


@cli.command()
@click.option("--max-ready-age", type=click.FloatRange(min=0), default=300, show_default=True,
              callback=_seconds, metavar="SECONDS",
              help="Unhealthy when a ready job has waited longer (paused queues aside).")
@click.option("--min-workers", type=click.IntRange(min=0), default=1, show_default=True,
              metavar="N", help="Unhealthy with fewer live workers (heartbeating).")
@click.option("-q", "--queue", "queues", multiple=True, callback=_queue_name, metavar="QUEUE",
              help="Only these queues' ready jobs count (repeatable; default every queue).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object of the checks.")
@click.pass_context
def health(ctx: click.Context, max_ready_age: float, min_workers: int,
           queues: tuple[str, ...], as_json: bool) -> None:
    """Check that the queue is served: the store answers, enough workers are live and
    no ready job waits too long. Exit 0 and one line when healthy, else exit 1 and one
    line saying what is wrong. Never creates a database.

    \b
    Example:
        queuectl health
        queuectl health --max-ready-age 60 --min-workers 2 -q emails
        queuectl health --json
    """
    from queuectl import health as checks

    found = checks.check_target(ctx.obj["db"], max_ready_age, min_workers, queues)
    if as_json:
        _json(found)
    else:
        click.echo(found.message)
    ctx.exit(0 if found.healthy else 1)


# -- dlq ----------------------------------------------------------------------------------


@cli.group()
def queue() -> None:
    """Pause, resume or limit a named queue (jobs go to one with enqueue --queue)."""


@queue.command("pause")
@click.argument("name", metavar="NAME", callback=_queue_name,
                shell_complete=complete.queue_names)
@click.pass_context
def queue_pause(ctx: click.Context, name: str) -> None:
    """Stop workers everywhere from starting jobs of NAME; it still takes jobs, and running
    jobs finish."""
    changed = decisions.pause_queue(_db(ctx, create=True), name)
    click.echo(f"Queue '{name}' paused." if changed else f"Queue '{name}' was paused already.")


@queue.command("resume")
@click.argument("name", metavar="NAME", callback=_queue_name,
                shell_complete=complete.queue_names)
@click.pass_context
def queue_resume(ctx: click.Context, name: str) -> None:
    """Let workers start jobs of NAME again."""
    changed = decisions.pause_queue(_db(ctx, create=True), name, pause=False)
    click.echo(f"Queue '{name}' resumed." if changed else f"Queue '{name}' was not paused.")


@queue.command("limit")
@click.argument("name", metavar="NAME", callback=_queue_name,
                shell_complete=complete.queue_names)
@click.argument("n", metavar="[N]", type=Number("queue_limit"), required=False)
@click.option("--rate", type=RateType(), metavar="N/PERIOD",
              help="At most N of its jobs started in any second, minute or hour "
                   "(10/s, 100/m, 5000/h), across every worker; none removes it.")
@click.pass_context
def queue_limit(ctx: click.Context, name: str, n: int | None, rate: limits.Rate | None) -> None:
    """At most N jobs of NAME running at once, across every worker on every host
    (0: no limit); with --rate, at most so many started a period. Either may be given
    alone: the other stays as it was.

    \b
    Example:
        queuectl queue limit media 2
        queuectl queue limit mail --rate 10/s
        queuectl queue limit mail --rate none
    """
    if n is None and rate is None:
        raise click.UsageError("give N, --rate N/PERIOD, or both")
    changed = decisions.limit_queue(_db(ctx, create=True), name, n, rate)
    shown = []
    if n is not None:
        shown.append(f"at most {n} jobs at once" if n else "no limit")
    if rate is not None:
        shown.append(rate.describe())
    text = ", ".join(shown)
    click.echo(f"Queue '{name}': {text}." if changed else f"Queue '{name}' had {text} already.")


@cli.group()
def schedule() -> None:
    """Periodic jobs: a command enqueued at each tick of a cron expression."""


@schedule.command("add")
@click.argument("name", metavar="NAME")
@click.option("--cron", "cron", required=True, metavar="EXPR",
              help='Standard 5-field cron ("*/5 * * * *") or an alias (@hourly, @daily, '
                   "@weekly, @monthly, @yearly).")
@click.option("-c", "--command", required=True, help="Shell command each tick enqueues.")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names, default="default",
              help="The queue its jobs wait in (default: default).")
@click.option("--timezone", default="UTC", show_default=True, metavar="TZ",
              help="The time zone the expression is read in (an IANA name).")
@click.option("--max-retries", type=Number("max_retries"), help="Each job's retries.")
@click.option("--backoff-base", type=Number("backoff_base"), help="Each job's retry base.")
@click.option("--timeout", type=Number("timeout"), help="Seconds before a job is killed.")
@click.option("-p", "--priority", type=Number("priority"), default=0, help="Each job's priority.")
@click.option("--cwd", metavar="DIR",
              help="The directory its jobs run in, relative to this one (default: this one).")
@click.option("--env", "env_vars", multiple=True, metavar="KEY=VALUE",
              help="Set a variable in its jobs' environment (repeatable). No secrets.")
@click.option("--pass-env", multiple=True, metavar="NAME",
              help="Copy this shell's current value of NAME into its jobs' environment.")
@_limit_options("its jobs", "'none': no limit; default: the config's when a job is made")
@click.pass_context
def schedule_add(ctx: click.Context, name: str, cron: str, command: str, queue: str,
                 timezone: str, cwd: str | None, env_vars: tuple[str, ...],
                 pass_env: tuple[str, ...], **options: Any) -> None:
    """Enqueue COMMAND at each tick of --cron, from running workers (each tick once,
    however many workers and hosts there are).

    \b
    Example:
        queuectl schedule add backup --cron "0 2 * * *" -c backup.sh --timezone Europe/Paris
        queuectl schedule add poll --cron "*/5 * * * *" -c "curl -fsS example.com" -q web
    """
    from queuectl import schedules

    spec = decisions.JobSpec(command=command, queue=queue, cwd=cwd or decisions.caller_dir(),
                             env=_env_flags(env_vars, pass_env), **options)
    first = schedules.add(_db(ctx, create=True), name, cron, spec, timezone)
    click.echo(f"Schedule '{name}' added; its first job at {clock.human(first)} UTC.")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def schedule_list(ctx: click.Context, as_json: bool) -> None:
    """Every schedule, with its next tick and the job its last tick made."""
    from queuectl import render, schedules

    found = schedules.listed(_db(ctx))
    for row in found:
        row["paused"] = bool(row["paused"])
    if as_json:
        return _json(found)
    render.schedules_table(found)


@schedule.command("remove")
@click.argument("name", metavar="NAME", shell_complete=complete.schedule_names)
@click.pass_context
def schedule_remove(ctx: click.Context, name: str) -> None:
    """Remove a schedule (the jobs it made stay)."""
    from queuectl import schedules

    schedules.remove(_db(ctx), name)
    click.echo(f"Schedule '{name}' removed.")


@schedule.command("pause")
@click.argument("name", metavar="NAME", shell_complete=complete.schedule_names)
@click.pass_context
def schedule_pause(ctx: click.Context, name: str) -> None:
    """Make no more jobs until resumed (ticks while paused are not caught up)."""
    from queuectl import schedules

    changed = schedules.pause(_db(ctx), name)
    click.echo(f"Schedule '{name}' paused." if changed else f"Schedule '{name}' was paused already.")


@schedule.command("resume")
@click.argument("name", metavar="NAME", shell_complete=complete.schedule_names)
@click.pass_context
def schedule_resume(ctx: click.Context, name: str) -> None:
    """Make jobs again, from the next tick after now."""
    from queuectl import schedules

    changed = schedules.pause(_db(ctx), name, paused=False)
    click.echo(f"Schedule '{name}' resumed." if changed else f"Schedule '{name}' was not paused.")


@cli.group()
def dlq() -> None:
    """The dead letter queue: jobs that failed every allowed run."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def dlq_list(ctx: click.Context, as_json: bool) -> None:
    """List dead jobs."""
    from queuectl import render

    jobs = reads.list_jobs(_db(ctx), "dead")
    if as_json:
        return _json([render.job_json(j) for j in jobs])
    render.dlq_table(jobs)


@dlq.command("retry")
@click.argument("job_id", metavar="[ID]", required=False,
                shell_complete=complete.dead_job_ids)
@click.option("--all", "every", is_flag=True, help="Every dead job instead of one.")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="With --all: only dead jobs of this queue.")
@click.option("--dry-run", is_flag=True, help="With --all: print how many, change nothing.")
@click.pass_context
def dlq_retry(ctx: click.Context, job_id: str | None, every: bool, queue: str | None,
              dry_run: bool) -> None:
    """Send a dead job (or every one) back to pending, attempts 0, with a fresh retry
    budget.

    \b
    Example:
        queuectl dlq retry flaky
        queuectl dlq retry --all -q media
    """
    if (job_id is None) != every:
        raise click.UsageError("give a job ID or --all")
    if job_id is not None:
        if queue or dry_run:
            raise click.UsageError("-q and --dry-run go with --all")
        max_retries = decisions.dlq_retry(_db(ctx), job_id)
        click.echo(f"Job {job_id} has been requeued with max_retries = {max_retries}")
        return
    requeued, skipped = decisions.dlq_retry_all(_db(ctx), queue, dry_run=dry_run)
    if dry_run:
        held = f"; {_jobs(skipped)} would stay dead (unique key held)" if skipped else ""
        click.echo(f"Would requeue {_jobs(requeued)}{held} (dry run: nothing written).")
        return
    held = f"; {_jobs(skipped)} left dead (unique key held)" if skipped else ""
    click.echo(f"Requeued {_jobs(requeued)} from the dead letter queue{held}.")


# -- restart, signal, hooks ----------------------------------------------------------------


@cli.command()
@click.argument("job_id", metavar="ID", shell_complete=complete.job_ids)
@click.pass_context
def restart(ctx: click.Context, job_id: str) -> None:
    """Run a completed, dead or cancelled job again, as a fresh series of attempts with
    its own retry budget. `history` and `logs` keep both lives; jobs that waited on it
    stay as they are.

    \b
    Example:
        queuectl restart 1042
    """
    max_retries = decisions.restart(_db(ctx), job_id)
    click.echo(f"Job {job_id} restarted with max_retries = {max_retries}")


@cli.command("signal")
@click.argument("job_id", metavar="ID", shell_complete=complete.job_ids)
@click.argument("given", metavar="SIGNAL")
@click.pass_context
def signal_(ctx: click.Context, job_id: str, given: str) -> None:
    """Send SIGNAL to a running job's whole process group, through the worker running it
    (on any host, within a second). SIGNAL: TERM, INT, HUP, USR1, USR2, KILL, STOP or
    CONT, with or without SIG, any case, or a number. Unlike `cancel`, the job's end is
    its own: a job killed by a signal fails, and may retry.

    \b
    Example:
        queuectl signal 1042 USR1
        queuectl signal 1042 sigstop
    """
    sig = decisions.parse_signal(given)
    worker_id = decisions.signal(_db(ctx), job_id, sig)
    from queuectl.render import signal_name

    click.echo(f"{signal_name(sig)} requested for job {job_id}; worker {worker_id} will send "
               "it.")


@cli.group()
def hook() -> None:
    """Hooks: a job that completes, fails, dies or is cancelled makes another job."""


@hook.command("add")
@click.argument("name", metavar="NAME")
@click.option("--on", "on", required=True, metavar="STATES",
              help="completed, failed, dead or cancelled, or several separated by commas. "
                   "failed: each failed run that leaves the job to retry.")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="Only jobs of this queue fire it (default: jobs of every queue).")
@click.option("--to-queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="The queue the hook's jobs wait in (default: the firing job's).")
@click.option("-c", "--command", required=True,
              help="Shell command of the hook's jobs; it finds the firing job in "
                   "QUEUECTL_HOOK_JOB_ID, QUEUECTL_HOOK_STATE, QUEUECTL_HOOK_EXIT_CODE, "
                   "QUEUECTL_HOOK_QUEUE and QUEUECTL_HOOK_COMMAND.")
@click.pass_context
def hook_add(ctx: click.Context, name: str, on: str, queue: str | None, to_queue: str | None,
             command: str) -> None:
    """Enqueue COMMAND as a job whenever a job reaches one of --on's states, in the same
    transaction as that change: exactly once, whatever crashes. A hook's own jobs fire no
    hooks.

    \b
    Example:
        queuectl hook add notify --on dead,failed -c 'notify-send "job $QUEUECTL_HOOK_JOB_ID"'
        queuectl hook add ping --on completed -q media --to-queue hooks -c ./ping.sh
    """
    from queuectl import hooks

    states = hooks.add(_db(ctx, create=True), name, on, command, queue, to_queue)
    click.echo(f"Hook '{name}' added: on {', '.join(states)}.")


@hook.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def hook_list(ctx: click.Context, as_json: bool) -> None:
    """Every hook: the states it fires on, the queues, its command."""
    from queuectl import hooks, render

    found = hooks.listed(_db(ctx))
    if as_json:
        return _json(found)
    render.hooks_table(found)


@hook.command("remove")
@click.argument("name", metavar="NAME")
@click.pass_context
def hook_remove(ctx: click.Context, name: str) -> None:
    """Remove a hook (the jobs it made stay)."""
    from queuectl import hooks

    hooks.remove(_db(ctx), name)
    click.echo(f"Hook '{name}' removed.")


# -- waiting ------------------------------------------------------------------------------


@cli.command("wait")
@click.argument("job_ids", nargs=-1, metavar="[ID]...", shell_complete=complete.job_ids)
@click.option("-q", "--queue", "queues", multiple=True, metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="Every job of this queue that exists when the wait starts (repeatable).")
@click.option("--all", "every", is_flag=True,
              help="Every job that exists when the wait starts.")
@click.option("--timeout", type=Number("timeout"), metavar="SECONDS",
              help="Give up after SECONDS and exit 124 (the jobs go on).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object: each job's state and exit code, and the totals.")
@click.pass_context
def wait(ctx: click.Context, job_ids: tuple[str, ...], queues: tuple[str, ...], every: bool,
         timeout: float | None, as_json: bool) -> None:
    """Block until every named job (or every job of the queues, or every job) is completed,
    dead or cancelled. Jobs added after the wait starts are not waited for.

    Exit 0 when all completed, 1 when any ended dead or cancelled, 124 when --timeout ran
    out first. On a terminal a progress bar shows on stderr; at the end one line says how
    the jobs ended. Ctrl-C stops waiting (exit 130) and leaves the jobs alone.

    \b
    Example:
        queuectl wait 41 42 && echo "both completed"
        queuectl wait -q media --timeout 3600
        queuectl wait --all --json
    """
    from queuectl import waiting

    if not (job_ids or queues or every):
        raise click.UsageError("name the jobs to wait for: job IDs, -q QUEUE or --all")
    if every and (job_ids or queues):
        raise click.UsageError("--all waits for every job: give no IDs or -q with it")
    conn = _db(ctx)
    with _interruptible():
        jobs = waiting.watch(conn, dict.fromkeys(job_ids), queues, every)
        ctx.exit(_waited(conn, jobs, timeout, as_json))


def _wait_enqueued(conn: store.Db, ids: list[str], one: bool) -> int:
    """``enqueue --wait``: one job exits with its own code, many as ``wait`` does."""
    from queuectl import outcome, waiting

    with _interruptible():
        jobs = waiting.watch(conn, dict.fromkeys(ids))
        status = _waited(conn, jobs, None, False)
    if not one:
        return status
    (job_id, state), = jobs.states.items()
    return outcome.of_job(conn, job_id, state) or 0


def _waited(conn: store.Db, jobs: waiting.Watch, timeout: float | None, as_json: bool) -> int:
    """Wait for ``jobs`` (a bar on a terminal's stderr), print how they ended, and return
    ``wait``'s exit code."""
    from contextlib import nullcontext

    from queuectl import render, waiting

    bar = None
    if not as_json and jobs.total > 1 and not jobs.finished and sys.stderr.isatty():
        bar = render.WaitBar(jobs.total)
    with bar or nullcontext():
        finished = waiting.until_final(lambda: nullcontext(conn), jobs, timeout,
                                       bar.update if bar else None)
    status = waiting.exit_status(jobs, finished)
    codes = waiting.codes(conn, jobs) if as_json or jobs.total == 1 else None
    if as_json:
        _json(render.waited_json(jobs, finished, codes or {}, status))
    else:
        click.echo(render.waited_line(jobs, finished, timeout, codes))
    return status


@contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C while waiting: stop waiting, exit 130, and leave the jobs as they are."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("Stopped waiting; the jobs are left as they are.", err=True)
        raise click.exceptions.Exit(130) from None


# -- serve --------------------------------------------------------------------------------

DASHBOARD_NEEDS = ("starlette", "uvicorn", "jinja2")


def serve_options(f: Any) -> Any:
    for option in reversed((
        click.option("--host", default="127.0.0.1", show_default=True,
                     help="The address to listen on; beyond loopback --token is required."),
        click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True),
        click.option("--token", envvar="QUEUECTL_DASHBOARD_TOKEN", metavar="TOKEN",
                     help="Required on every page (also QUEUECTL_DASHBOARD_TOKEN); it is an "
                          "admin token of the API too, acting as token:serve."),
        click.option("--allow-host", "allowed", multiple=True, metavar="NAME",
                     help="Another name it is reached by (the Host header; repeatable)."),
        click.option("--read-only", is_flag=True,
                     help="No actions: pages and the API's reads only."),
    )):
        f = option(f)
    return f


@cli.command()
@serve_options
@click.pass_context
def serve(ctx: click.Context, **options: Any) -> None:
    """Serve the web dashboard (counts, charts, jobs, timelines, the DLQ, queues, schedules
    and workers, with retry, cancel and pause) and the HTTP API under /api/v1 (bearer
    tokens from queuectl token add); needs the dashboard extra.

    \b
    Example:
        queuectl serve
        queuectl serve --read-only --port 9000
        queuectl serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    _serve(ctx, **options)


@cli.command()
@serve_options
@click.pass_context
def dashboard(ctx: click.Context, **options: Any) -> None:
    """Another name for queuectl serve (the same options)."""
    _serve(ctx, **options)


def _serve(ctx: click.Context, host: str, port: int, token: str | None,
           allowed: tuple[str, ...], read_only: bool) -> None:
    try:
        import uvicorn

        from queuectl.dashboard.app import LOOPBACK, create_app, is_loopback
    except ImportError as exc:
        if exc.name not in DASHBOARD_NEEDS:
            raise
        raise click.ClickException("the dashboard needs Starlette, uvicorn and Jinja2: "
                                   "from queuectl's clone, pip install '.[dashboard]'"
                                   ) from None
    if not is_loopback(host) and not token:
        raise click.UsageError(f"--host {host} is beyond loopback: give --token TOKEN (or "
                               "QUEUECTL_DASHBOARD_TOKEN) too")
    ledger.connect(ctx.obj["db"], create=False).close()  # a typo in --db: an error now
    hosts = {*LOOPBACK, *allowed, *(() if host in ("0.0.0.0", "::") else (host,))}
    app = create_app(ctx.obj["db"], token=token, read_only=read_only, hosts=hosts)
    shown = f"[{host}]" if ":" in host else host
    needs = "; open it once as .../?token=TOKEN" if token else ""
    click.echo(f"Dashboard of {store.shown(ctx.obj['db'])} at http://{shown}:{port}/"
               f"{' (read-only)' if read_only else ''}{needs}; API at /api/v1; Ctrl-C to "
               "stop.")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.group()
def token() -> None:
    """Bearer tokens for the HTTP API of queuectl serve (the ledger keeps only their
    hashes)."""


@token.command("add")
@click.argument("name", metavar="NAME")
@click.option("--scope", required=True, type=click.Choice(["read", "enqueue", "admin"]),
              help="read: the GET routes; enqueue: also POST /api/v1/jobs; admin: also "
                   "cancel, retry, restart, pause and resume.")
@click.pass_context
def token_add(ctx: click.Context, name: str, scope: str) -> None:
    """Add a token and print it, the only time it is ever shown (a line on stderr says
    so); keep it as you would a password.

    \b
    Example:
        queuectl token add ci --scope enqueue > ci.token
        curl -H "Authorization: Bearer $(cat ci.token)" http://127.0.0.1:8765/api/v1/status
    """
    from queuectl import tokens

    made = tokens.add(_db(ctx, create=True), name, scope)
    click.echo(f"Token '{name}' added (scope {scope}); it is shown only this once:", err=True)
    click.echo(made)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """Every token in force: its name, scope, when it was added and by whom."""
    from queuectl import render, tokens

    found = tokens.listed(_db(ctx))
    if as_json:
        return _json(found)
    render.tokens_table(found)


@token.command("revoke")
@click.argument("name", metavar="NAME")
@click.pass_context
def token_revoke(ctx: click.Context, name: str) -> None:
    """Revoke a token: running servers refuse it from their next request."""
    from queuectl import tokens

    tokens.revoke(_db(ctx), name)
    click.echo(f"Token '{name}' revoked.")


# -- maintenance --------------------------------------------------------------------------


@cli.command()
@click.option("--check", is_flag=True, help="Rebuild aside and compare; exit 1 on any drift.")
@click.pass_context
def rebuild(ctx: click.Context, check: bool) -> None:
    """Replay the ledger into fresh projections (jobs, runs, workers, config, queues,
    schedules, hooks, signals, tokens)."""
    conn = _db(ctx)
    if check:
        with progress.progress():
            problems = ledger.check(conn)
        if problems:
            for problem in problems:
                click.echo(problem, err=True)
            raise click.ClickException(f"projections drift from the ledger ({len(problems)} "
                                       "differences shown above)")
        click.echo("Projections match the ledger.")
        return
    with progress.progress():
        replayed = ledger.rebuild(conn)
    pruned = (f" (seq 1 to {replayed.last_seq:,}; the others were pruned to the archive)"
              if replayed.events != replayed.last_seq else "")
    click.echo(f"Projections rebuilt from {replayed.events:,} events{pruned}.")


@cli.command()
@click.option("--before", required=True, metavar="AGE|TIME",
              help="What finished before this: an age (30d, 12h, 90m, 0s; w for weeks) or a "
                   "UTC date or time (2026-11-01, 2026-11-01T12:00:00Z).")
@click.option("--dry-run", is_flag=True, help="Print how much would go, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def prune(ctx: click.Context, before: str, dry_run: bool, as_json: bool) -> None:
    """Move old events out of the ledger into its archive: those of jobs that finished
    (completed, dead, cancelled) before then, and heartbeats a later one superseded.

    Pruned jobs leave list and status; history ID --archive still reads them. Their whole
    output (logs --full) is deleted; the tail stays in their archived events. A job that
    an unfinished job depends on stays. The archive is a file beside the database
    (data/queue.archive.db for data/queue.db), or a table on PostgreSQL.

    
    Example:
        queuectl prune --before 30d --dry-run
        queuectl prune --before 30d
    """
    from queuectl import retention

    conn = _db(ctx)
    moment = retention.cutoff(conn, before)
    with progress.progress(enabled=not as_json):
        report = retention.prune(conn, moment, dry_run=dry_run)
    if as_json:
        return _json({"before": report.before, "jobs": report.jobs,
                      "job_events": report.job_events, "heartbeats": report.heartbeats,
                      "events": report.events, "archive": conn.archive_target,
                      "dry_run": dry_run})
    what = (f"{_jobs(report.jobs)} finished before {clock.human(report.before)} "
            f"({report.job_events:,} events) and {report.heartbeats:,} superseded "
            f"heartbeat{'s' if report.heartbeats != 1 else ''}")
    if dry_run:
        click.echo(f"Would prune {what} (dry run: nothing written).")
    else:
        click.echo(f"Pruned {what}; archive: {conn.archive_target}.")


@cli.group("ledger")
def ledger_group() -> None:
    """The ledger itself, as JSON lines: the portable truth of a queue, between stores."""


@ledger_group.command("export")
@click.option("--since", type=Number("seq"), default=0, metavar="SEQ",
              help="Only the events after this seq (for an export that continues another).")
@click.pass_context
def ledger_export(ctx: click.Context, since: int) -> None:
    """Write every event of the ledger to stdout, one JSON object a line.

    The output store (runs' whole output) is not exported: it is data, not events; each
    run's finished event carries the tail of its output.

    \b
    Example:
        queuectl ledger export > ledger.jsonl
        queuectl --db postgresql://app@db/queue ledger import ledger.jsonl
    """
    conn = _db(ctx)
    # The bar only when the lines go elsewhere: drawn between them, it would garble both.
    with progress.progress(lambda: ledger.count_events(conn, since), "Exporting the ledger",
                           unit="events", enabled=not sys.stdout.isatty()):
        for line in progress.counted(ledger.export(conn, since)):
            click.echo(line)


@ledger_group.command("import")
@click.argument("source", type=click.File("rb"), metavar="FILE")
@click.pass_context
def ledger_import(ctx: click.Context, source: Any) -> None:
    """Append an exported ledger (FILE, or - for stdin) to an empty store and build its
    projections, in one transaction: all of it, or nothing."""
    conn = _db(ctx, create=True)
    with progress.progress(), progress.reading(source, "Reading events", "events") as lines:
        count = ledger.import_(conn, _lines(lines))
    click.echo(f"Imported {count} events; projections rebuilt.")
