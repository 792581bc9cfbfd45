"""The root of the ``queuectl`` command line: the group, what its commands share, ``enqueue``
and ``main``.

``queuectl enqueue`` is the command people and scripts run most, one process a job, so its
start-up is what this module is for: the other commands (``queuectl.cli``) are imported only
when one of them runs, or when help, shell completion or the docs list them. ``worker``,
whose start-up every worker process pays, is imported alone (``queuectl.cli_worker``). Rich
and ``queuectl.worker`` load only in the commands that need them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

# Importing click and queuectl makes a hundred thousand objects that live as long as the
# process, and the cyclic collector would walk them again and again, during the imports and
# after, for cycles there are none of. It is off while they are made; at the end of this
# module they are frozen (never walked again) and it is turned back on.
_COLLECTING = gc.isenabled()
gc.disable()

import click  # noqa: E402

from queuectl import complete, decisions, ledger, limits, store  # noqa: E402
from queuectl.errors import InvalidInput, QueueError  # noqa: E402


class QuickStart:
    """What the root group and its commands do differently from click's own, so that a
    command that ends well (``enqueue``) loads and does no more than it needs.

    Its parser reads ``-c`` as the short option it is, straight away. Click tries every
    option as a long one first, and a miss builds the error it would raise, which imports
    ``difflib`` to suggest the nearest long option, only for the short option to match
    next. An argument of two characters (``-c``, ``-q``) can never name a long option, so it
    goes to the short options at once; everything else, and every error, is click's own.

    Its ``-h/--help`` option is made without asking gettext for the option's help text
    (click's own is, on every run): the first translation looked up imports ``locale``.
    """

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        names = self.get_help_option_names(ctx)  # type: ignore[attr-defined]
        if not names or not self.add_help_option:  # type: ignore[attr-defined]
            return None
        # One option a command, always the same object: click orders the eager callbacks
        # by comparing parameters.
        if "_quick_help" not in self.__dict__:
            self._quick_help = click.Option(
                [*names, "_click_default_help"], is_flag=True, expose_value=False,
                is_eager=True, callback=_show_help, help="Show this message and exit.")
        return self._quick_help

    def make_parser(self, ctx: click.Context) -> Any:
        parser = super().make_parser(ctx)  # type: ignore[misc]
        process = parser._process_opts

        def process_opts(arg: str, state: Any) -> None:
            if len(arg) == 2 and arg not in parser._opt_prefixes:
                parser._match_short_opt(arg, state)
            else:
                process(arg, state)

        parser._process_opts = process_opts
        return parser


def _show_help(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit()


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from importlib.metadata import version

        click.echo(f"{ctx.find_root().info_name}, version {version('queuectl-ledger')}",
                   color=ctx.color)
        ctx.exit()


class QueuectlCommand(QuickStart, click.Command):
    """A command of ``queuectl`` (see ``QuickStart``)."""


class QueuectlSubgroup(QuickStart, click.Group):
    """A group of commands under the root, such as ``worker`` or ``config`` (see
    ``QuickStart``): ``queuectl worker --burst`` parses its options as ``enqueue`` does."""

    command_class = QueuectlCommand
    group_class = type  # and so are the groups under it


class QueuectlGroup(QuickStart, click.Group):
    """Reports every error as one line on stderr: ``Error: ...``, exit 1 (usage errors 2).

    Holds ``enqueue`` from the start; the other commands join it when ``queuectl.cli`` is
    imported, which happens the first time a name it does not hold yet is asked for, or
    the whole list is (help, shell completion). ``worker`` asked for by name joins alone,
    from ``queuectl.cli_worker``.
    """

    command_class = QueuectlCommand
    group_class = QueuectlSubgroup

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            _load_commands("queuectl.cli_worker" if cmd_name == "worker" else "queuectl.cli")
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QueueError as exc:
            raise click.ClickException(str(exc)) from exc
        except store.driver_errors() as exc:
            raise click.ClickException(f"database error: {_scrubbed(str(exc))}") from exc
        except BrokenPipeError:
            sys.stderr.close()  # `queuectl list | head`: not an error worth a traceback
            raise click.exceptions.Exit(0) from None
        except OSError as exc:  # e.g. output to a full disk
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from exc

    def main(  # type: ignore[override]
        self, args: Any = None, prog_name: str | None = None, standalone_mode: bool = True,
        **kwargs: Any,
    ) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **kwargs)
        try:
            _refuse_undecodable(args)
            code = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except QueueError as exc:
            _fail(str(exc), 1)
        except click.UsageError as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("Aborted!", 1)
        sys.exit(code if isinstance(code, int) else 0)


def _load_commands(module: str = "queuectl.cli") -> None:
    """Import ``module``, which registers its commands on the group (``queuectl.cli``: every
    other command), with the collector off and what it made frozen, as for this module's
    own imports (see the top)."""
    if module in sys.modules:
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        __import__(module)  # not importlib.import_module, which -X importtime does not report
    finally:
        if collecting:
            gc.freeze()
            gc.enable()


def _refuse_undecodable(args: list[str]) -> None:
    """Every argument must be UTF-8 text: the ledger stores JSON, which holds nothing else,
    and a command that cannot be stored exactly must not be stored at all."""
    for n, arg in enumerate(args, 1):
        if not _is_text(arg):
            raise InvalidInput(f"argument {n} is not valid UTF-8: {_shown(arg)}")
    db = os.environ.get("QUEUECTL_DB")
    if db and not _is_text(db):
        raise InvalidInput(f"QUEUECTL_DB is not valid UTF-8: {_shown(db)}")


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # Python read bytes that are not UTF-8 as lone surrogates
        return False
    return True


def _shown(text: str) -> str:
    """Text with the bytes that are not UTF-8 written as ``\\xe9``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Number(click.ParamType):
    """A number from the command line, held to its range in ``limits`` (finite always)."""

    def __init__(self, bound: str) -> None:
        self.bound = bound
        self.name = "integer" if limits.BOUNDS[bound].integer else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            value = str(value)
        try:
            return limits.parse(self.bound, value)
        except QueueError as exc:
            self.fail(str(exc), param, ctx)


class RateType(click.ParamType):
    """``10/s``, ``100/m``, ``5000/h`` or ``none``: a queue's rate (``limits.parse_rate``)."""

    name = "rate"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, limits.Rate):
            return value
        try:
            return limits.parse_rate(str(value))
        except QueueError as exc:
            self.fail(str(exc), param, ctx)


class Limit(click.ParamType):
    """A resource limit of a job's runs (``queuectl.resources``): a number, a size for
    ``--memory``, or ``none``."""

    def __init__(self, name: str) -> None:
        self.limit = name
        self.name = "size" if name == "memory" else "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from queuectl import resources

        try:
            return resources.parse(self.limit, str(value)) or resources.NONE
        except QueueError as exc:
            self.fail(str(exc), param, ctx)


def _limit_options(whose: str, none: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--memory``, ``--cpu-time`` and ``--open-files`` for ``whose`` runs; ``none`` says
    what the value ``none`` does."""
    flags = (("--memory", "memory", "SIZE", "Address space (virtual memory) each process of "
              "{} may use: bytes, or 64MiB, 1GiB, 2048K ({})."),
             ("--cpu-time", "cpu_time", "SECONDS", "CPU seconds each process of {} may use "
              "({})."),
             ("--open-files", "open_files", "N", "Files each process of {} may hold open ({})."))

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for flag, name, metavar, what in reversed(flags):
            command = click.option(flag, name, type=Limit(name), metavar=metavar,
                                   help=what.format(whose, none))(command)
        return command
    return decorate


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {' '.join(_shown(message).split())}", err=True)
    sys.exit(code)


def _scrubbed(text: str) -> str:
    """A driver's message with any connection URL in it shown without its password."""
    return re.sub(r"postgres(?:ql)?://\S+", lambda m: store.shown(m.group(0)), text)


def _db(ctx: click.Context, create: bool = False) -> store.Db:
    """A connection for this command, closed when the command ends (see ``main``). Only
    commands that record something new pass ``create``: a read of a database that does
    not exist (a typo in ``--db``) is an error, not a new empty queue."""
    conn = ledger.connect(ctx.obj["db"], create=create)
    ctx.call_on_close(conn.close)
    return conn


def _queue_name(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A queue name, or each of several (the job-id rules), checked before anything runs."""
    for name in (value,) if isinstance(value, str) else value or ():
        try:
            decisions.check_queue_name(name)
        except QueueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _json(data: Any) -> None:
    from queuectl.render import to_json

    click.echo(to_json(data))


@click.group(cls=QueuectlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="QUEUECTL_DB",
    default=store.DEFAULT,
    show_default=True,
    help="A SQLite file (created on first use), or a postgresql:// URL; also QUEUECTL_DB.",
)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_show_version, help="Show the version and exit.")
@click.pass_context
def cli(ctx: click.Context, db: str) -> None:
    """queuectl: a background job queue for shell commands, stored as an event ledger.

    \b
    Example:
        queuectl enqueue -c "echo Hello World"
        queuectl worker --burst -v
        queuectl history <job-id>
    """
    for variable, bound in (("QUEUECTL_LOCK_TIMEOUT", "lock_timeout"), ("COLUMNS", "columns")):
        limits.from_env(variable, bound, 0)  # a bad value is one line now, not a traceback later
    ctx.obj = {"db": db}


# -- enqueue ------------------------------------------------------------------------------


@cli.command()
@click.argument("job_json", required=False, metavar="[JSON]")
@click.option("-c", "--command", help="Shell command to run (as sh -c COMMAND).")
@click.option("--id", "job_id", help="Job id (default: the seq of its enqueued event, such as 1042).")
@click.option("--max-retries", type=Number("max_retries"), help="Retries after the first run.")
@click.option("--backoff-base", type=Number("backoff_base"),
              help="This job's retry delays: base**k seconds.")
@click.option("--timeout", type=Number("timeout"), help="Seconds before the job is killed.")
@click.option("-p", "--priority", type=Number("priority"), help="Higher runs first (default 0).")
@click.option("--delay", type=Number("delay"), help="Seconds from now before it may run.")
@click.option("--run-at", help="ISO-8601 time before which it may not run (no zone: UTC).")
@click.option("-q", "--queue", metavar="NAME", callback=_queue_name,
              shell_complete=complete.queue_names,
              help="The queue it waits in (default: default).")
@click.option("--unique-key", metavar="KEY",
              help="Add no job while an unfinished job holds KEY; print that job's id.")
@click.option("--on-duplicate", type=click.Choice(["skip", "error"]), default="skip",
              show_default=True, help="For a held --unique-key: exit 0, or exit 1.")
@click.option("--after", multiple=True, metavar="ID", shell_complete=complete.job_ids,
              help="Run only after job ID completed (repeatable).")
@click.option(
    "-f", "--file", "jobs_file", type=click.File("rb"),
    help="JSON lines, one job per line ('-' for stdin).",
)
@click.option("--commands", "commands_file", type=click.File("rb"), metavar="FILE",
              help="One shell command a line, each a job with the flags given ('-' for "
                   "stdin; blank lines and lines starting with # skipped); all or none.")
@click.option("--cwd", metavar="DIR",
              help="The directory it runs in, relative to this one (default: this one).")
@click.option("--env", "env_vars", multiple=True, metavar="KEY=VALUE",
              help="Set a variable in its environment (repeatable). Kept in the ledger: "
                   "no secrets.")
@click.option("--pass-env", multiple=True, metavar="NAME",
              help="Copy this shell's current value of NAME into its environment "
                   "(repeatable).")
@_limit_options("the job", "'none': no limit; default: config memory-limit, cpu-time-limit, "
                "open-files-limit")
@click.option("--follow", "follow", is_flag=True,
              help="Then print the job's output as it runs, as logs --follow does, and exit "
                   "with its exit code (the 'Job added' line goes to stderr).")
@click.option("--wait", "wait_for", is_flag=True,
              help="Then block until the job is final and exit with its code: 0 completed, "
                   "the last run's exit code when dead (124: timed out), 1 cancelled. With "
                   "--file or --commands: wait for every job and exit as `queuectl wait` "
                   "does. Ctrl-C stops waiting (exit 130) and leaves the job alone.")
@click.pass_context
def enqueue(
    ctx: click.Context,
    job_json: str | None,
    command: str | None,
    job_id: str | None,
    jobs_file: Any,
    commands_file: Any,
    follow: bool,
    **flags: Any,
) -> None:
    """Add a job, from flags, one JSON object, or a file of JSON lines.

    \b
    Example:
        queuectl enqueue -c "sleep 2" --max-retries 5
        queuectl enqueue '{"id":"job1","command":"sleep 2"}'
        queuectl enqueue -c "make report" --after build --priority 5
        queuectl enqueue -c "backup.sh" --run-at 2026-12-01T02:00:00
        queuectl enqueue -c "convert video.mp4" --queue media
        queuectl enqueue -c "make report" --unique-key report:2026-12-01
        queuectl enqueue --file jobs.jsonl
        queuectl enqueue -c "make test" --cwd ~/src/app --env CI=1 --pass-env PATH
        ls *.wav | sed 's/.*/flac "&"/' | queuectl enqueue --commands -
        queuectl enqueue -c "make test" --wait && echo passed
        queuectl enqueue -c "python3 train.py" --memory 2GiB --cpu-time 600

    A job runs in the directory it was enqueued from (or --cwd), with the worker's
    environment and the variables --env and --pass-env name. --memory, --cpu-time and
    --open-files limit each of its processes (setrlimit); a run that fails on reaching one
    says which.
    """
    on_duplicate = flags.pop("on_duplicate")
    wait_for = flags.pop("wait_for")
    env = _env_flags(flags.pop("env_vars"), flags.pop("pass_env"))
    flags = {k: v for k, v in flags.items() if v is not None and v != ()}
    if env:
        flags["env"] = env
    if "after" in flags:
        flags["after"] = list(flags["after"])
    sources = [s for s in (job_json, command, jobs_file, commands_file) if s is not None]
    if len(sources) != 1:
        raise click.UsageError(
            "give exactly one of JSON, -c COMMAND, --file FILE or --commands FILE")
    if follow and wait_for:
        raise click.UsageError("--follow waits for the job too: give --follow or --wait")
    if follow and (jobs_file is not None or commands_file is not None):
        raise click.UsageError("--follow follows one job; it cannot go with --file or "
                               "--commands")
    # A file of a million jobs makes millions of objects, none of them in a cycle: the
    # collector would walk them again and again (a twelfth of a bulk's instructions).
    with ledger.no_gc(), _display(jobs_file is not None or commands_file is not None):
        specs = _specs(job_json, command, job_id, jobs_file, commands_file, flags)
        _here_by_default(specs)
        conn = _db(ctx, create=True)
        with _adding(len(specs)):
            ids, duplicate = decisions.enqueue_unique(conn, specs, on_duplicate)
    if len(ids) == 1 and jobs_file is None and commands_file is None:
        if duplicate[0]:
            click.echo(f"Job already queued with ID: {ids[0]} "
                       f"(unique key '{specs[0].unique_key}')", err=follow)
        else:
            click.echo(f"Job added successfully with ID: {ids[0]}", err=follow)
        if follow:
            from queuectl.cli import _follow

            _follow(conn, ids[0])
    else:
        added = len(ids) - sum(duplicate)
        held = f"; {sum(duplicate)} already queued (unique keys held)" if any(duplicate) else ""
        click.echo(f"{added} job{'s' if added != 1 else ''} added successfully{held}.")
    if wait_for:  # a held unique key: the job that holds it is the one waited for
        from queuectl.cli import _wait_enqueued

        ctx.exit(_wait_enqueued(conn, ids, one=jobs_file is None and commands_file is None))


def _display(many: bool) -> contextlib.AbstractContextManager[object]:
    """One progress display for reading a file of jobs and adding them: each display is
    a process of its own, which starts Python and rich and is waited for as it closes, and
    two cost an enqueue of 100,000 jobs a few percent of its time (bench scenario
    progress). None for a job or a command given on the command line."""
    if not many:
        return contextlib.nullcontext()
    from queuectl import progress

    return progress.progress()


def _adding(count: int) -> contextlib.AbstractContextManager[object]:
    """The bar of jobs being added: none for one job, which is added too soon to draw one
    (and need not load ``progress``)."""
    if count == 1:
        return contextlib.nullcontext()
    from queuectl import progress

    return progress.progress(count, "Adding jobs", unit="jobs")


def _specs(job_json: str | None, command: str | None, job_id: str | None, jobs_file: Any,
           commands_file: Any, flags: dict[str, Any]) -> list[decisions.JobSpec]:
    """The jobs ``enqueue`` was given, from its one source, checked."""
    if commands_file is not None or jobs_file is not None:
        from queuectl import progress  # a file's bar; a job given here needs none
    if commands_file is not None:
        if job_id is not None:
            raise click.UsageError("--id names one job; it cannot go with --commands")
        with progress.reading(commands_file, "Reading commands") as lines:
            return _command_specs(lines, flags)
    if jobs_file is not None:
        with progress.reading(jobs_file, "Reading jobs") as lines:
            specs = [
                decisions.parse_spec(text, f" on line {n}")
                for n, text in _lines(lines)
                if text.strip()
            ]
        if not specs:
            raise click.UsageError("the file has no jobs")
        if job_id is not None:
            raise click.UsageError("--id names one job; it cannot go with --file")
        if flags:  # flags beside a file apply to every job in it
            specs = [_override(spec, flags) for spec in specs]
        return specs
    if job_json is not None:
        return [_override(decisions.parse_spec(job_json), {"id": job_id, **flags})]
    return [decisions.check_spec(decisions.JobSpec(command=command or "", id=job_id, **flags))]


def _lines(stream: Any) -> Iterator[tuple[int, str]]:
    """Numbered lines of a file of JSON lines, each strictly UTF-8 (a byte-order mark
    before the first is allowed)."""
    for n, raw in enumerate(stream, 1):
        try:
            yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"line {n} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                f"{exc.start + 1}); queuectl reads job files as UTF-8") from None


def _env_flags(assignments: tuple[str, ...], passed: tuple[str, ...]) -> dict[str, str]:
    """``--env`` and ``--pass-env`` as one mapping (``--env`` wins)."""
    return decisions.parse_env(assignments, passed) if assignments or passed else {}


def _command_specs(stream: Any, flags: dict[str, Any]) -> list[decisions.JobSpec]:
    """``enqueue --commands``: a job a line, each with the flags given."""
    specs = []
    for n, text in _lines(stream):
        line = text.strip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec = decisions.JobSpec(command=line, **{**flags, "after": list(flags.get("after", ()))})
        specs.append(decisions.check_spec(spec, f" on line {n}"))
    if not specs:
        raise click.UsageError("the input has no commands")
    return specs


def _here_by_default(specs: list[decisions.JobSpec]) -> None:
    """Jobs that name no directory run in the caller's: the directory it was asked from."""
    here = None
    for spec in specs:
        if spec.cwd is None:
            spec.cwd = here = here or decisions.caller_dir()


def _override(spec: decisions.JobSpec, flags: dict[str, Any]) -> decisions.JobSpec:
    """Flags given beside a JSON job win over its fields (``--env`` over its ``env``,
    variable by variable)."""
    import msgspec

    given = {k: v for k, v in flags.items() if v is not None}
    if "env" in given and spec.env:
        given["env"] = {**spec.env, **given["env"]}
    if "run_at" in given or "delay" in given:  # a flag's time replaces the JSON's
        spec = msgspec.structs.replace(spec, run_at=None, delay=None)
    return decisions.check_spec(msgspec.structs.replace(spec, **given)) if given else spec


def main() -> None:
    """The ``queuectl`` program: run the command, then leave without tearing Python down.

    Python's own exit frees every module and object one by one, which costs more than
    ``enqueue`` or a burst worker's own closing (bench scenario startup, whose wall time
    includes the exit). Like mypy's command line, this one flushes its output and ends the
    process instead. Nothing is left to tear down by then: each command's connections are
    closed as it ends (``_db``), and workers close theirs.
    """
    try:
        cli(prog_name="queuectl")
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    else:
        code = 0
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(code)  # coverage or a profiler is watching: it writes its report at exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # `list | head`, stderr closed (see invoke)
            pass
        except OSError:  # a full disk, say: the output is incomplete
            code = code or 1
    os._exit(code)


if _COLLECTING:
    gc.freeze()
    gc.enable()
