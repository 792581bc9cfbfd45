"""Hooks: a job that reaches a state (completed, failed, dead, cancelled) makes another job.

A hook fires inside the very transaction that records the change of state: the queue's
decisions (cancel), the workers' results (``claims.finish_and_claim_many``) and the
rescue of a silent worker's jobs each call ``fire`` with the events they just appended, so
a hook job exists exactly when the change does, whatever crashes. ``failed`` fires at each
failed run that leaves the job to retry (a timeout and a lost worker's run too); the run
that makes it dead fires ``dead``. A hook job's own end fires no hook: its id starts with
``hook:``, and the ``hook_jobs`` table says it is one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from queuectl import cascade, settings
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, next_seq, write
from queuectl.store import Db

STATES = ("completed", "failed", "dead", "cancelled")
PREFIX = "hook:"  # every hook job's id starts so: hook:NAME:SEQ
_NAME_LIMIT = 96  # a hook job's id is hook:NAME:SEQ, and ids are at most 128 characters


def check_name(name: str) -> str:
    if not cascade.ID.fullmatch(name) or len(name) > _NAME_LIMIT:
        raise InvalidInput(f"hook name {name!r} must be 1-{_NAME_LIMIT} letters, digits or "
                           "._:@/+- and start with a letter or digit")
    return name


def check_states(text: str) -> tuple[str, ...]:
    """``completed,dead`` -> the states, each once, in their order in ``STATES``."""
    given = {part.strip().lower() for part in text.split(",") if part.strip()}
    wrong = sorted(given - set(STATES))
    if wrong or not given:
        raise InvalidInput(f"--on {text!r}: give one or more of {', '.join(STATES)}, "
                           "separated by commas")
    return tuple(s for s in STATES if s in given)


def _check_queue(name: str | None, option: str) -> None:
    if name is not None and not cascade.ID.fullmatch(name):
        raise InvalidInput(f"{option} {name!r} must be 1-128 letters, digits or ._:@/+- and "
                           "start with a letter or digit")


# -- what people do -----------------------------------------------------------------------


def add(conn: Db, name: str, on: str, command: str, queue: str | None = None,
        to_queue: str | None = None) -> tuple[str, ...]:
    """Add a hook; returns the states it fires on."""
    check_name(name)
    states = check_states(on)
    _check_queue(queue, "-q")
    _check_queue(to_queue, "--to-queue")
    if not command.strip():
        raise InvalidInput("the hook's command is empty")
    if "\0" in command:
        raise InvalidInput("the hook's command contains a NUL character")
    with write(conn):
        if _row(conn, name) is not None:
            raise Conflict(f"Hook '{name}' already exists")
        append(conn, ev.HookAdded(name=name, on=states, command=command, queue=queue,
                                  to_queue=to_queue))
    return states


def remove(conn: Db, name: str) -> None:
    """Remove a hook; the jobs it made stay."""
    with write(conn):
        if _row(conn, name) is None:
            raise NotFound(f"Hook '{name}' not found")
        append(conn, ev.HookRemoved(name=name))


_COLUMNS = "name, states, queue, to_queue, command, created_at"


def listed(conn: Db) -> list[dict[str, Any]]:
    """Every hook, by name, as ``hook list --json`` gives it (``on``: a list of states)."""
    found = conn.execute(f"SELECT {_COLUMNS} FROM hooks ORDER BY name").fetchall()
    return [{"name": n, "on": s.split(","), "queue": q, "to_queue": t, "command": c,
             "created_at": at} for n, s, q, t, c, at in found]


def _row(conn: Db, name: str) -> tuple[Any, ...] | None:
    return conn.execute(f"SELECT {_COLUMNS} FROM hooks WHERE name = ?", (name,)).fetchone()


# -- firing -------------------------------------------------------------------------------


def _ends(events: Iterable[ev.Event]) -> list[tuple[str, str, int | None]]:
    """(job, state reached, exit code) for each change of state a hook may fire on. A
    retry or a death follows the event that ended the run, which gives the exit code."""
    ends: list[tuple[str, str, int | None]] = []
    code: dict[str, int | None] = {}
    for e in events:
        match e:
            case ev.Failed(job_id=j, exit_code=c):
                code[j] = c
            case ev.TimedOut(job_id=j) | ev.LeaseExpired(job_id=j):
                code[j] = None
            case ev.Completed(job_id=j):
                ends.append((j, "completed", 0))
            case ev.ScheduledRetry(job_id=j):
                ends.append((j, "failed", code.get(j)))
            case ev.Dead(job_id=j):
                ends.append((j, "dead", code.get(j)))
            case ev.Cancelled(job_id=j):
                ends.append((j, "cancelled", None))
    return ends


def fire(conn: Db, events: Sequence[ev.Event], at: str | None = None) -> list[ev.Event]:
    """Enqueue the hook jobs that ``events``, appended already in this write transaction,
    fire; returns their ``enqueued`` events (appended here, at ``at``)."""
    ends = _ends(events)
    if not ends:
        return []
    hooks = conn.execute(
        "SELECT name, states, queue, to_queue, command FROM hooks ORDER BY name").fetchall()
    if not hooks:
        return []
    ids = list(dict.fromkeys(job_id for job_id, _, _ in ends))
    jobs = {job_id: (queue, command) for job_id, queue, command in _jobs(conn, ids)}
    made_by_hooks = _hook_jobs(conn, [j for j in ids if j.startswith(PREFIX)])
    wanted: list[tuple[str, str, str, ev.HookOrigin]] = []  # (name, command, queue, origin)
    for job_id, state, code in ends:
        if job_id in made_by_hooks or job_id not in jobs:
            continue
        queue, command = jobs[job_id]
        for name, states, only, to_queue, hook_command in hooks:
            if state in states.split(",") and only in (None, queue):
                origin = ev.HookOrigin(name=name, job_id=job_id, state=state, queue=queue,
                                       command=command, exit_code=code)
                wanted.append((name, hook_command, to_queue or queue, origin))
    if not wanted:
        return []
    config = settings.load(conn)
    first = next_seq(conn)
    made = [f"{PREFIX}{name}:{cascade.spell(first + n)}" for n, (name, *_) in enumerate(wanted)]
    clashes = cascade.existing(conn, made)
    fired: list[ev.Event] = []
    for n, (name, command, queue, origin) in enumerate(wanted):
        job_id = made[n]
        if job_id in clashes:  # a user chose that id: rare
            job_id = cascade.made_id(first + n, lambda i: bool(cascade.existing(conn, [i])),
                                     f"{PREFIX}{name}:")
        fired.append(ev.Enqueued(
            job_id=job_id, command=command, queue=queue, hook=origin, by=f"hook:{name}",
            max_retries=int(config["max-retries"]),
            backoff_base=float(config["backoff-base"]),
            timeout=float(config["job-timeout"]),
            backoff_max=float(config["backoff-max"]),
            backoff_jitter=float(config["backoff-jitter"])))
    append(conn, *fired, at=at)
    return fired


def _jobs(conn: Db, ids: Sequence[str]) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for start in range(0, len(ids), cascade.BATCH):
        chunk = ids[start : start + cascade.BATCH]
        marks = ",".join("?" * len(chunk))
        found += conn.execute(f"SELECT id, queue, command FROM jobs WHERE id IN ({marks})",
                              chunk).fetchall()
    return found


def _hook_jobs(conn: Db, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), cascade.BATCH):
        chunk = ids[start : start + cascade.BATCH]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(
            f"SELECT job_id FROM hook_jobs WHERE job_id IN ({marks})", chunk))
    return found


def origin_of(conn: Db, job_id: str) -> ev.HookOrigin | None:
    """What fired a hook job (None for any other job)."""
    row = conn.execute("SELECT hook, source_job, state, exit_code, queue, command "
                       "FROM hook_jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    name, source, state, code, queue, command = row
    return ev.HookOrigin(name=name, job_id=source, state=state, queue=queue, command=command,
                         exit_code=code)


def env(origin: ev.HookOrigin) -> dict[bytes, bytes]:
    """The ``QUEUECTL_HOOK_*`` variables a hook job runs with."""
    code = "" if origin.exit_code is None else str(origin.exit_code)
    return {b"QUEUECTL_HOOK_NAME": origin.name.encode(),
            b"QUEUECTL_HOOK_JOB_ID": origin.job_id.encode(),
            b"QUEUECTL_HOOK_STATE": origin.state.encode(),
            b"QUEUECTL_HOOK_EXIT_CODE": code.encode(),
            b"QUEUECTL_HOOK_QUEUE": origin.queue.encode(),
            b"QUEUECTL_HOOK_COMMAND": origin.command.encode()}
