"""The queue's decisions for people: enqueue, cancel, retry from the DLQ, settings, stop.

Each public function reads projections inside one write transaction, decides, and appends
the events that record the decision. Nothing here prints; the CLI renders what they return.
"""

from __future__ import annotations

import functools
import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from projections.jobs import INDEXED_STATES, JOBS_STATE, JOBS_UNIQUE_KEY, UNIQUE_HELD
from queuectl import actor, clock, limits, settings
from queuectl import events as ev
from queuectl.cascade import (
    BATCH,
    ID,
    cancel_now,
    existing,
    held_ahead,
    made_id,
    refuse_existing,
    spell,
)
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, next_seq, write
from queuectl.states import CANCELLABLE, FINAL, State, WorkerState
from queuectl.store import Db

if TYPE_CHECKING:
    from queuectl.records import Job

DEFAULT_QUEUE = "default"

# Patterns only some jobs need (a unique key, --env) are compiled when first used: re keeps
# each once compiled, and a plain enqueue does not pay for them at start-up.
_UNIQUE_KEY = r"[^\x00-\x1f\x7f]{1,255}"


# The read side (``queuectl.reads``) and hooks load on first use: ``enqueue``, which must
# start quickly, needs neither.

def get_job(conn: Db, job_id: str) -> Job:
    from queuectl import reads

    return reads.get_job(conn, job_id)


def printable(text: str) -> str:
    from queuectl import reads

    return reads.printable(text)


def _fire_hooks(conn: Db, events: Sequence[ev.Event]) -> None:
    from queuectl import hooks

    hooks.fire(conn, events)


def queue_name_problem(name: str) -> str:
    """Why ``name`` is no queue name (queue names follow the job-id rules)."""
    return (f"queue {name!r} must be 1-128 letters, digits or ._:@/+- "
            "and start with a letter or digit")


def check_queue_name(name: str) -> str:
    if not ID.fullmatch(name):
        raise InvalidInput(queue_name_problem(name))
    return name


# -- enqueue ------------------------------------------------------------------------------


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A job as the user describes it: the ``enqueue`` flags, or one JSON object. Every
    number is held to its range in ``limits`` while it is decoded."""

    command: str
    id: str | None = None
    max_retries: limits.MaxRetries | None = None
    backoff_base: limits.BackoffBase | None = None
    timeout: limits.Seconds | None = None
    priority: limits.Priority = 0
    run_at: str | None = None  # ISO-8601; no zone means UTC
    delay: limits.Seconds | None = None  # seconds from now
    after: list[str] = []
    queue: str = DEFAULT_QUEUE
    unique_key: str | None = None
    cwd: str | None = None  # where it runs; relative: to the caller's; None: the worker's
    env: dict[str, str] = {}  # variables set over the worker's environment
    # Resource limits (queuectl.resources): a number, a size (memory), or "none"; None:
    # the settings' default. check_spec leaves a number above 0 or "none" (see ``limit``).
    memory: int | str | None = None
    cpu_time: int | str | None = None
    open_files: int | str | None = None


@functools.cache
def _spec_decoder() -> msgspec.json.Decoder[JobSpec]:
    """Made on first use: making one evaluates every field's annotation, which ``enqueue
    -c`` (no JSON to decode) need not pay for."""
    return msgspec.json.Decoder(JobSpec)


def parse_spec(text: str, where: str = "", *, remote: bool = False) -> JobSpec:
    """Decode one JSON job object, or raise InvalidInput naming what is wrong. ``remote``:
    the caller has no directory here (the HTTP API), so a ``cwd`` must be absolute."""
    try:
        spec = _spec_decoder().decode(text)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid job{where}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON{where}: {exc}") from None
    except RecursionError:  # [[[[... a few hundred thousand deep
        raise InvalidInput(f"malformed JSON{where}: nested too deeply") from None
    return check_spec(spec, where, remote=remote, decoded=True)


_NUMBERS = ("max_retries", "backoff_base", "timeout", "priority", "delay")  # JobSpec's


def check_command(command: str, where: str = "") -> str:
    if not command.strip():
        raise InvalidInput(f"invalid job{where}: command is empty")
    if "\0" in command:  # no shell can be given one: exec would refuse it every time
        raise InvalidInput(f"invalid job{where}: command contains a NUL character")
    return command


def check_spec(spec: JobSpec, where: str = "", *, remote: bool = False,
               decoded: bool = False) -> JobSpec:
    """``spec``, its fields checked (InvalidInput says which is wrong and why). ``decoded``:
    it was just decoded, which held every number to its range already."""
    check_command(spec.command, where)
    if spec.run_at is not None and spec.delay is not None:
        raise InvalidInput(f"invalid job{where}: give run_at or delay, not both")
    for name in () if decoded else _NUMBERS:  # flags build a JobSpec without decoding
        value = getattr(spec, name)
        if value is not None:
            try:
                limits.check(name, value)
            except InvalidInput as exc:
                raise InvalidInput(f"invalid job{where}: {name}: {exc}") from None
    if spec.run_at is not None:
        try:
            moment = clock.parse(spec.run_at)
        except ValueError:
            raise InvalidInput(
                f"invalid job{where}: run_at {spec.run_at!r} is not an ISO-8601 time"
            ) from None
        try:
            spec.run_at = clock.iso(clock.within_range(moment))
        except ValueError as exc:
            raise InvalidInput(f"invalid job{where}: run_at {spec.run_at!r} {exc}") from None
    if spec.after:
        spec.after = list(dict.fromkeys(spec.after))
    for dep in spec.after:
        if not ID.fullmatch(dep):
            raise InvalidInput(f"invalid job{where}: dependency id {dep!r} is not a job id")
    if spec.unique_key is not None and not re.fullmatch(_UNIQUE_KEY, spec.unique_key):
        raise InvalidInput(f"invalid job{where}: unique_key must be 1-255 characters, "
                           "none of them a control character")
    if not ID.fullmatch(spec.queue):
        raise InvalidInput(f"invalid job{where}: {queue_name_problem(spec.queue)}")
    if spec.id is not None and not ID.fullmatch(spec.id):
        raise InvalidInput(
            f"invalid job{where}: id {spec.id!r} must be 1-128 letters, digits or ._:@/+- "
            "and start with a letter or digit"
        )
    if spec.cwd is not None:
        if remote and not os.path.isabs(spec.cwd):
            raise InvalidInput(f"invalid job{where}: cwd must be an absolute path (the "
                               "server's directory is not the caller's)")
        spec.cwd = check_cwd(spec.cwd, where)
    if spec.env:
        spec.env = check_env(spec.env, where)
    if spec.memory is not None or spec.cpu_time is not None or spec.open_files is not None:
        _check_limits(spec, where)
    return spec


def _check_limits(spec: JobSpec, where: str) -> None:
    from queuectl import resources

    for name in resources.NAMES:
        if (value := getattr(spec, name)) is not None:
            try:
                setattr(spec, name, resources.parse(name, value) or resources.NONE)
            except InvalidInput as exc:
                raise InvalidInput(f"invalid job{where}: {name}: {exc}") from None


def limit(value: int | str | None) -> int | None:
    """A checked spec's resource limit as its events hold it (0: none); None when the spec
    gives none."""
    return None if value is None else _given(value)


def _given(value: int | str) -> int:
    return 0 if value == "none" else int(value)


# -- where and with what a job runs -------------------------------------------------------

ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def caller_dir() -> str:
    """The caller's working directory as its shell names it: ``$PWD`` when that is the
    same directory (a path through a symlink is more likely to exist on another host),
    else the real one."""
    try:
        here = os.getcwd()
    except OSError:
        raise InvalidInput("the current directory no longer exists; give --cwd DIR") from None
    pwd = os.environ.get("PWD", "")
    try:
        if os.path.isabs(pwd) and os.path.samefile(pwd, here):
            return os.path.normpath(pwd)
    except OSError:
        pass
    return here


def check_cwd(cwd: str, where: str = "") -> str:
    """A job's directory, absolute: a relative one is taken from the caller's. Whether it
    exists is the worker's host's question, asked when the job runs."""
    if not cwd or "\0" in cwd or not _utf8(cwd):
        raise InvalidInput(f"invalid job{where}: cwd must be a directory's path, without NUL")
    return os.path.normpath(cwd if os.path.isabs(cwd) else os.path.join(caller_dir(), cwd))


def check_env(env: dict[str, str], where: str = "") -> dict[str, str]:
    """Variables for a job's environment, sorted by name (so that the same variables are
    always the same event): names as a shell's, values UTF-8 text without NUL."""
    for name, value in env.items():
        if not re.fullmatch(ENV_NAME, name):
            raise InvalidInput(f"invalid job{where}: environment variable name "
                               f"{printable(name)!r} must be letters, digits or _ and not "
                               "start with a digit")
        if "\0" in value or not _utf8(value):
            raise InvalidInput(f"invalid job{where}: the value of {name} must be UTF-8 text "
                               "without NUL")
    return dict(sorted(env.items()))


def parse_env(assignments: Sequence[str], passed: Sequence[str] = (),
              environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--pass-env NAME`` (the caller's value) and ``--env KEY=VALUE`` (which wins) as
    one mapping; a malformed assignment or a variable that is not set is refused."""
    source = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for name in passed:
        if not re.fullmatch(ENV_NAME, name):
            raise InvalidInput(f"--pass-env {printable(name)!r}: not a variable name")
        if name not in source:
            raise InvalidInput(f"--pass-env {name}: the variable is not set")
        env[name] = source[name]
    for text in assignments:
        name, equals, value = text.partition("=")
        if not equals:
            raise InvalidInput(f"--env {printable(text)!r}: expected KEY=VALUE")
        if not re.fullmatch(ENV_NAME, name):
            raise InvalidInput(f"--env {printable(text)!r}: {printable(name)!r} is not a "
                               "variable name (letters, digits or _, not starting with a digit)")
        env[name] = value
    return check_env(env)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8
        return False
    return True


def enqueue(conn: Db, specs: Sequence[JobSpec]) -> list[str]:
    """Add jobs in one transaction, all or none; returns their ids (for a job whose unique
    key an unfinished job holds, that job's id: see ``enqueue_unique``)."""
    return enqueue_unique(conn, specs)[0]


def enqueue_unique(conn: Db, specs: Sequence[JobSpec], on_duplicate: str = "skip"
                   ) -> tuple[list[str], list[bool]]:
    """Add jobs in one transaction, all or none; returns each one's id and whether it was
    a duplicate. A duplicate id, an unknown or cancelled dependency or a dependency cycle
    refuses the whole request.

    A job whose ``unique_key`` an unfinished job (pending, scheduled, waiting, processing,
    or failed and waiting to retry) holds, or an earlier job of the same request, is not
    added: its id is the holder's, and with ``on_duplicate="error"`` the whole request is
    refused. The keys are read under the write lock, so concurrent enqueuers make one job.

    Jobs are written dependencies first. Made ids spell the seq of each job's ``enqueued``
    event, known under the write lock. Everything that needs no lock (decoding, checks,
    ordering) is done before it is taken, so running workers wait only for the writes.
    """
    if len(specs) == 1 and not specs[0].after and specs[0].unique_key is None:
        return [_add_one(conn, specs[0])], [False]
    given = [spec.id for spec in specs if spec.id]
    if len(set(given)) != len(given):
        seen: set[str] = set()
        twice = next(i for i in given if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise Conflict(f"Job ID '{twice}' appears more than once")
    keys = [spec.unique_key for spec in specs if spec.unique_key is not None]
    if keys:
        with write(conn):
            holders = _holders(conn, keys)
            duplicate = [False] * len(specs)
            first_of: dict[str, int] = {}
            for i, spec in enumerate(specs):
                key = spec.unique_key
                if key is None:
                    continue
                if key in holders or key in first_of:
                    if on_duplicate == "error":
                        holder = holders.get(key) or specs[first_of[key]].id or "another job"
                        raise Conflict(f"unique key '{key}' is held by unfinished job "
                                       f"'{holder}'")
                    duplicate[i] = True
                else:
                    first_of[key] = i
            kept = [spec for spec, dup in zip(specs, duplicate, strict=True) if not dup]
            made = iter(add_jobs(conn, kept) if kept else [])
            ids = [next(made) if not dup else "" for dup in duplicate]
            for i, spec in enumerate(specs):
                if duplicate[i]:
                    key = spec.unique_key or ""
                    ids[i] = holders.get(key) or ids[first_of[key]]
            return ids, duplicate
    ordered = _dependency_order(specs)
    return conn.attempt(lambda: add_jobs(conn, specs, ordered)), [False] * len(specs)


def add_jobs(conn: Db, specs: Sequence[JobSpec],
             ordered: tuple[list[int], set[str]] | None = None) -> list[str]:
    """Write ``specs`` (none a duplicate) in the caller's write transaction; ``ordered``:
    their ``_dependency_order``, if worked out before the lock was taken."""
    order, outside = ordered or _dependency_order(specs)
    ids = [spec.id or "" for spec in specs]
    refuse_existing(conn, [spec.id for spec in specs if spec.id])
    _refuse_bad_deps(conn, outside)
    defaults = _defaults(settings.load(conn))
    now = conn.now()
    first = next_seq(conn)
    made = [i for i in order if not ids[i]]
    if made:
        seq_of = {i: first + position for position, i in enumerate(order)}
        spelt = [spell(seq_of[i]) for i in made]
        clashes = existing(conn, spelt)
        for i, job_id in zip(made, spelt, strict=True):
            ids[i] = job_id
            if job_id in clashes:  # a user chose that id: rare, so looked up one by one
                ids[i] = made_id(seq_of[i], lambda job_id: bool(existing(conn, [job_id])))
    by = actor.current()  # stamped here: append would copy each event to stamp it
    append(conn, *(_enqueued(ids[i], specs[i], defaults, now, by) for i in order), at=now)
    return ids


# Per connection: the defaults of new jobs as the settings were at a ledger head. Settings
# change only by events: while the head is still where this connection's own last enqueue
# left it, nothing was appended since and they need not be read again.
_KNOWN: weakref.WeakKeyDictionary[Db, tuple[int, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _add_one(conn: Db, spec: JobSpec) -> str:
    """``add_jobs`` for one job that depends on none and holds no unique key, the call a
    program or a shell makes job after job, written out for that case."""
    known = _KNOWN.get(conn)
    by = actor.current()

    def body() -> tuple[str, int, dict[str, Any]]:
        if spec.id:
            refuse_existing(conn, [spec.id])
        seq = next_seq(conn)
        if known is not None and known[0] == seq - 1:
            defaults = known[1]
        else:
            defaults = _defaults(settings.load(conn))
        now = conn.now()
        job_id = spec.id or spell(seq)
        if not spec.id and _taken(conn, job_id):  # a user chose that id: rare
            job_id = made_id(seq, lambda made: _taken(conn, made))
        append(conn, _enqueued(job_id, spec, defaults, now, by), at=now)
        return job_id, seq, defaults

    job_id, seq, defaults = conn.attempt(body)
    _KNOWN[conn] = (seq, defaults)  # committed: the head is (or was) this job's event
    return job_id


def _taken(conn: Db, job_id: str) -> bool:
    """Whether a job has the id ``job_id`` (``existing`` for one id, with less around it)."""
    return conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None


def _dependency_order(specs: Sequence[JobSpec]) -> tuple[list[int], set[str]]:
    """Indexes of ``specs`` with every job after the jobs of this request it depends on,
    and the ids it depends on outside the request."""
    if not any(spec.after for spec in specs):
        return list(range(len(specs))), set()
    position = {spec.id: i for i, spec in enumerate(specs) if spec.id}
    outside: set[str] = set()
    for spec in specs:
        for dep in spec.after:
            if dep == spec.id:
                raise InvalidInput(f"job {dep} cannot depend on itself")
            if dep not in position:
                outside.add(dep)
    order: list[int] = []
    state: dict[int, str] = {}  # "visiting" or "done"

    def visit(i: int, path: list[str]) -> None:
        if state.get(i) == "done":
            return
        name = specs[i].id or f"#{i + 1}"
        if state.get(i) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise InvalidInput(f"dependency cycle: {' -> '.join(cycle)}")
        state[i] = "visiting"
        for dep in specs[i].after:
            if dep in position:
                visit(position[dep], path + [name])
        state[i] = "done"
        order.append(i)

    for i in range(len(specs)):
        visit(i, [])
    return order, outside


def _refuse_bad_deps(conn: Db, deps: set[str]) -> None:
    for dep in sorted(deps):
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (dep,)).fetchone()
        if row is None:
            raise NotFound(f"dependency '{dep}' is not a known job")
        if row[0] == State.CANCELLED:
            raise Conflict(f"dependency '{dep}' is cancelled")


def _defaults(config: dict[str, str]) -> dict[str, Any]:
    """The settings a new job takes when its spec leaves them out."""
    return {
        "max_retries": int(config["max-retries"]),
        "backoff_base": float(config["backoff-base"]),
        "timeout": float(config["job-timeout"]),
        "backoff_max": float(config["backoff-max"]),
        "backoff_jitter": float(config["backoff-jitter"]),
        "memory": int(config["memory-limit"]),
        "cpu_time": int(config["cpu-time-limit"]),
        "open_files": int(config["open-files-limit"]),
    }


def _enqueued(job_id: str, spec: JobSpec, defaults: dict[str, Any], now: str,
              by: str = "") -> ev.Enqueued:
    return ev.Enqueued(
        by=by,
        job_id=job_id,
        command=spec.command,
        max_retries=defaults["max_retries"] if spec.max_retries is None else spec.max_retries,
        backoff_base=defaults["backoff_base"] if spec.backoff_base is None else spec.backoff_base,
        timeout=defaults["timeout"] if spec.timeout is None else spec.timeout,
        priority=spec.priority,
        run_at=clock.after(now, spec.delay) if spec.delay else spec.run_at,
        after=tuple(spec.after),
        unique_key=spec.unique_key,
        backoff_max=defaults["backoff_max"],
        backoff_jitter=defaults["backoff_jitter"],
        queue=spec.queue,
        cwd=spec.cwd,
        env=spec.env,
        memory=defaults["memory"] if spec.memory is None else _given(spec.memory),
        cpu_time=defaults["cpu_time"] if spec.cpu_time is None else _given(spec.cpu_time),
        open_files=defaults["open_files"] if spec.open_files is None else _given(spec.open_files),
    )


def _holders(conn: Db, keys: Sequence[str]) -> dict[str, str]:
    """The unfinished job holding each of ``keys`` that one holds."""
    found: dict[str, str] = {}
    distinct = list(dict.fromkeys(keys))
    for start in range(0, len(distinct), BATCH):
        chunk = distinct[start : start + BATCH]
        marks = ",".join("?" * len(chunk))
        found.update(conn.execute(conn.dialect.sql(
            f"SELECT unique_key, id FROM jobs {JOBS_UNIQUE_KEY} "
            f"WHERE unique_key IN ({marks}) AND {UNIQUE_HELD}"), chunk).fetchall())
    return found


# -- edit ---------------------------------------------------------------------------------

EDITABLE = (State.PENDING, State.SCHEDULED, State.WAITING)  # jobs that have not started


def edit(conn: Db, job_id: str, *, command: str | None = None, priority: int | None = None,
         run_at: str | None = None, delay: float | None = None, queue: str | None = None,
         max_retries: int | None = None, timeout: float | None = None,
         cwd: str | None = None, env: Mapping[str, str] | None = None,
         memory: int | str | None = None, cpu_time: int | str | None = None,
         open_files: int | str | None = None) -> ev.Edited | None:
    """Give a job that has not started (pending, scheduled, waiting) new values, checked as
    enqueue checks them; ``env`` sets or changes variables, keeping the others; a resource
    limit given as ``none`` is removed. Records only what differs from the job's values,
    and returns that ``edited`` event (None: nothing differed, nothing written). A job
    running or finished is refused."""
    spec = check_spec(JobSpec(
        command="true" if command is None else command, priority=priority or 0,
        run_at=run_at, delay=delay, queue=queue or DEFAULT_QUEUE, max_retries=max_retries,
        timeout=timeout, cwd=cwd, env=dict(env or {}), memory=memory, cpu_time=cpu_time,
        open_files=open_files))
    with write(conn):
        job = get_job(conn, job_id)
        if job.state not in EDITABLE:
            raise Conflict(f"Job {job_id} is {job.state}; only pending, scheduled or waiting "
                           "jobs (not started yet) can be edited")
        when = clock.after(conn.now(), spec.delay) if spec.delay is not None else spec.run_at
        changed: dict[str, Any] = {name: value for name, value, old in (
            ("command", command, job.command), ("priority", priority, job.priority),
            ("queue", queue, job.queue), ("max_retries", max_retries, job.max_retries),
            ("timeout", timeout, job.timeout), ("cwd", spec.cwd, job.cwd),
            ("run_at", when, job.run_at), ("memory", limit(spec.memory), job.memory or 0),
            ("cpu_time", limit(spec.cpu_time), job.cpu_time or 0),
            ("open_files", limit(spec.open_files), job.open_files or 0))
            if value is not None and value != old}
        variables = {k: v for k, v in spec.env.items() if job.env.get(k) != v}
        if variables:
            changed["env"] = variables
        if not changed:
            return None
        edited = ev.Edited(job_id=job_id, **changed)
        append(conn, edited)
    return edited


# -- config and control -------------------------------------------------------------------


def set_config(conn: Db, key: str, text: str) -> str:
    """Validate and record a setting; returns the canonical value stored."""
    value = settings.parse(key, text)
    with write(conn):
        config = settings.load(conn) | {key: value}
        if float(config["lease-timeout"]) <= float(config["heartbeat-interval"]):
            raise InvalidInput(
                f"invalid value for {key}: lease-timeout ({config['lease-timeout']}) must be "
                f"longer than heartbeat-interval ({config['heartbeat-interval']})"
            )
        append(conn, ev.ConfigChanged(key=key, value=value))
    return value


# -- queues -----------------------------------------------------------------------------


def _queue_rules(conn: Db, name: str) -> tuple[bool, int]:
    row = conn.execute("SELECT paused, job_limit FROM queues WHERE name = ?", (name,)).fetchone()
    return (bool(row[0]), int(row[1])) if row else (False, 0)


def pause_queue(conn: Db, name: str, pause: bool = True) -> bool:
    """Pause a queue (or resume it): no worker starts a job of a paused queue; it still takes
    jobs, and jobs running finish. Returns False, writing nothing, when it already was."""
    check_queue_name(name)
    with write(conn):
        if _queue_rules(conn, name)[0] == pause:
            return False
        append(conn, ev.QueuePaused(queue=name) if pause else ev.QueueResumed(queue=name))
    return True


def limit_queue(conn: Db, name: str, limit: int | None = None,
                rate: limits.Rate | None = None) -> bool:
    """At most ``limit`` jobs of a queue processing at once, across every worker on every
    host (0: no limit), and at most ``rate.n`` of its jobs started in any window of
    ``rate.period`` seconds (``NO_RATE``: none); None keeps what the queue has. Jobs running
    over a new, lower limit finish; no more start until the queue is under it. Returns
    False, writing nothing, when both already were so."""
    check_queue_name(name)
    if limit is None and rate is None:
        raise InvalidInput("give a limit, a rate, or both")
    if limit is not None:
        limits.check("queue_limit", limit)
    if rate is not None and rate != limits.NO_RATE:
        limits.check("queue_rate", rate.n)
        if rate.period not in limits.PERIODS.values():
            raise InvalidInput(f"a rate's period is 1, 60 or 3600 seconds, not {rate.period}")
    with write(conn):
        row = conn.execute("SELECT job_limit, rate, period FROM queues WHERE name = ?",
                           (name,)).fetchone()
        now_limit, now_rate = (int(row[0]), limits.rate_of(int(row[1]), int(row[2]))) if row \
            else (0, limits.NO_RATE)
        limit = now_limit if limit is None else limit
        rate = now_rate if rate is None else rate
        if (limit, rate) == (now_limit, now_rate):
            return False
        append(conn, ev.QueueLimited(queue=name, limit=limit, rate=rate.n, period=rate.period))
    return True


def request_stop(conn: Db) -> int:
    """Ask every running worker to finish its current job and exit; returns how many."""
    with write(conn):
        (active,) = conn.execute("SELECT count(*) FROM workers WHERE state = ?",
                                 (WorkerState.ACTIVE,)).fetchone()
        append(conn, ev.StopRequested())
    return int(active)


def dlq_retry(conn: Db, job_id: str) -> int:
    """Send a dead job back to pending with attempts 0; returns its max_retries."""
    with write(conn):
        job = get_job(conn, job_id)
        if job.state != State.DEAD:
            raise Conflict(f"Job {job_id} is not in the dead letter queue (state: {job.state})")
        key = job.unique_key
        holder = _holders(conn, [key]).get(key) if key is not None else None
        if holder is not None:
            raise Conflict(f"Job {job_id} cannot be retried: unique key '{key}' is held by "
                           f"unfinished job '{holder}'")
        append(conn, ev.Requeued(job_id=job_id, max_retries=job.max_retries))
    return job.max_retries


def cancel(conn: Db, job_id: str) -> str:
    """Cancel a job. Returns ``cancelled``, or ``requested`` for a running job, which its
    worker stops (killing its process group) within a moment."""
    with write(conn):
        job = get_job(conn, job_id)
        if job.state not in CANCELLABLE:
            raise Conflict(
                f"Job {job_id} is {job.state}; only pending, scheduled, waiting, failed "
                "or running jobs can be cancelled"
            )
        if job.state == State.PROCESSING and not held_ahead(conn, job_id):
            if not job.cancel_requested:
                append(conn, ev.CancelRequested(job_id=job_id))
            return "requested"
        events = cancel_now(conn, job_id)
        append(conn, *events)
        _fire_hooks(conn, events)
    return "cancelled"


def restart(conn: Db, job_id: str) -> int:
    """Run a finished job (completed, dead or cancelled) again, as a fresh series of
    attempts with its own retry budget; returns its max_retries. Its history and runs
    stay; jobs that waited on it and were released or cancelled stay as they are."""
    with write(conn):
        job = get_job(conn, job_id)
        if job.state not in FINAL:
            raise Conflict(f"Job {job_id} is {job.state}; only completed, dead or cancelled "
                           "jobs can be restarted")
        key = job.unique_key
        holder = _holders(conn, [key]).get(key) if key is not None else None
        if holder is not None:
            raise Conflict(f"Job {job_id} cannot be restarted: unique key '{key}' is held by "
                           f"unfinished job '{holder}'")
        append(conn, ev.Restarted(job_id=job_id, max_retries=job.max_retries,
                                  previous=job.state))
    return job.max_retries


# Signals ``signal`` names; any other is given by its number.
SIGNALS = ("TERM", "INT", "HUP", "USR1", "USR2", "KILL", "STOP", "CONT")


def parse_signal(text: str) -> int:
    """``USR1``, ``SIGusr1`` or ``10`` -> 10: one of ``SIGNALS`` by name (with or without
    SIG, any case), or any signal this host knows by number."""
    import signal as signals

    name = text.strip().upper()
    name = name[3:] if name.startswith("SIG") else name
    if name in SIGNALS:
        return int(getattr(signals, "SIG" + name))
    # ASCII digits only, and few of them: int() refuses '²' and 5,000-digit strings.
    if name.isascii() and name.isdigit() and len(name) <= 3 \
            and int(name) in {int(s) for s in signals.valid_signals()}:
        return int(name)
    raise InvalidInput(f"signal {text!r}: give one of {', '.join(SIGNALS)} (with or without "
                       "SIG, any case) or a signal number")


def signal(conn: Db, job_id: str, sig: int) -> str:
    """Ask the worker running a job to send ``sig`` to the run's process group; returns
    that worker's id. It delivers it within a second, on any host."""
    with write(conn):
        job = get_job(conn, job_id)
        if job.state != State.PROCESSING or held_ahead(conn, job_id) or job.worker_id is None:
            raise Conflict(f"Job {job_id} is not running (state: {job.state}); only a "
                           "running job can be signalled")
        (run,) = conn.execute("SELECT max(seq) FROM runs WHERE job_id = ?",
                              (job_id,)).fetchone()
        append(conn, ev.SignalRequested(job_id=job_id, worker_id=job.worker_id, run=int(run),
                                        signal=sig))
    return job.worker_id


# -- bulk actions -------------------------------------------------------------------------

BULK_BATCH = 500  # jobs a transaction in a bulk action: workers wait for one batch at most


class _DryRun(Exception):
    """Raised inside a dry run's transaction to roll it back."""


def _in_batches(conn: Db, dry_run: bool, step: Callable[[], bool]) -> None:
    """``step()`` (one batch; False once nothing was left) until it is done, each batch in
    a write transaction of its own, so that workers get the lock between them. A dry run
    makes the very same decisions in one transaction, which is then rolled back: what it
    reports is what the real run would do."""
    if not dry_run:
        while True:
            with write(conn):
                if not step():
                    return
    try:
        with write(conn):
            while step():
                pass
            raise _DryRun
    except _DryRun:
        pass


def _bulk_rows(conn: Db, state: str, queue: str | None, after: int, limit: int | None,
               columns: str = "seq, id") -> list[tuple[Any, ...]]:
    """Jobs in ``state`` (of ``queue``) after seq ``after``, oldest first; a running job
    whose cancel was asked for already is not one to ask again."""
    from queuectl.reads import INDEXED

    where = f"{JOBS_STATE} WHERE state = ? AND {INDEXED_STATES}" if state in INDEXED \
        else "WHERE state = ?"
    where += " AND seq > ?"
    params: list[Any] = [state, after]
    if state == State.PROCESSING:
        where += " AND cancel_requested = 0"
    if queue:
        where += " AND queue = ?"
        params.append(queue)
    return conn.execute(conn.dialect.sql(
        f"SELECT {columns} FROM jobs {where} ORDER BY seq LIMIT ?"), [*params, limit]).fetchall()


def cancel_all(conn: Db, state: str, queue: str | None = None,
               batch: int = BULK_BATCH, dry_run: bool = False) -> tuple[int, int]:
    """Cancel every job in ``state`` (of ``queue``), ``batch`` jobs a transaction; running
    jobs get a cancel request, which their workers carry out (a job held ahead of its
    worker's current one is cancelled at once). Jobs waiting on a cancelled job are
    cancelled too. Returns (jobs cancelled, running jobs asked to stop); ``dry_run``: what
    it would return, writing nothing."""
    if state not in CANCELLABLE:
        raise InvalidInput(f"{state} jobs cannot be cancelled; only pending, scheduled, "
                           "waiting, failed or processing ones")
    cancelled = requested = after = 0

    def step() -> bool:
        nonlocal cancelled, requested, after
        rows = _bulk_rows(conn, state, queue, after, batch)
        if not rows:
            return False
        after = rows[-1][0]
        done: set[str] = set()
        for _, job_id in rows:
            if job_id in done:  # cancelled already, waiting on one before it
                continue
            if state == State.PROCESSING and not held_ahead(conn, job_id):
                append(conn, ev.CancelRequested(job_id=job_id))
                requested += 1
                continue
            events = cancel_now(conn, job_id)
            append(conn, *events)
            _fire_hooks(conn, events)
            done.update(e.job_id for e in events if isinstance(e, ev.Cancelled))
            cancelled += sum(isinstance(e, ev.Cancelled) for e in events)
        return True

    _in_batches(conn, dry_run, step)
    return cancelled, requested


def dlq_retry_all(conn: Db, queue: str | None = None, batch: int = BULK_BATCH,
                  dry_run: bool = False) -> tuple[int, int]:
    """``dlq_retry`` for every dead job (of ``queue``), ``batch`` a transaction. A job whose
    unique key an unfinished job holds (one requeued before it, say) stays dead. Returns
    (requeued, left dead); ``dry_run``: what it would return, writing nothing."""
    requeued = skipped = after = 0

    def step() -> bool:
        nonlocal requeued, skipped, after
        rows = _bulk_rows(conn, State.DEAD, queue, after, batch,
                          "seq, id, max_retries, unique_key")
        if not rows:
            return False
        after = rows[-1][0]
        for _, job_id, max_retries, key in rows:
            if key is not None and _holders(conn, [key]):
                skipped += 1
                continue
            append(conn, ev.Requeued(job_id=job_id, max_retries=max_retries))
            requeued += 1
        return True

    _in_batches(conn, dry_run, step)
    return requeued, skipped
