"""The Python API: the same queue as the command line, for a program that hands shell work
to it (a web app's request handler, a script).

    from queuectl import Queue

    with Queue() as queue:                       # QUEUECTL_DB, else data/queue.db
        job_id = queue.enqueue("make report", queue="reports", max_retries=5)
        queue.get(job_id)["state"]               # 'pending'
        queue.wait([job_id], timeout=600)        # {'1': 'completed'}, once a worker ran it

A ``Queue`` holds one connection; every method is one call of the functions the CLI
calls (``decisions``, ``reads``, ``retention``), so what it does is an event in the ledger
like any other, and what it returns is what ``--json`` prints. Each ``enqueue`` commits
durably before it returns, as ``queuectl enqueue`` does. Errors are ``QueueError``s
(``InvalidInput``, ``NotFound``, ``Conflict``, ``StoreError``, ``WaitTimeout``), each with the one line the
CLI would print, whatever the arguments and on either store: every argument is checked
before a store sees it, as the CLI checks its flags. A ``Queue`` may be shared by the
threads of one process (its calls take turns); open one per process, not one per call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import msgspec

from queuectl import decisions, ledger, limits, reads, render, store
from queuectl.errors import InvalidInput, StoreError, WaitTimeout
from queuectl.states import FINAL
from queuectl.store import Db

__all__ = ["Queue"]

Spec = Mapping[str, Any] | decisions.JobSpec


class Queue:
    """A queuectl database, SQLite or PostgreSQL (``db``: a path or a ``postgresql://``
    URL; default: ``QUEUECTL_DB``, else ``data/queue.db``, created on first use)."""

    def __init__(self, db: str | os.PathLike[str] | None = None) -> None:
        target = _target(db)
        with _reported():
            self._db: Db | None = ledger.connect(target)
        self._shown = self._db.target
        self._lock = threading.Lock()

    @contextmanager
    def _open(self) -> Iterator[Db]:
        """The connection, one caller at a time; a driver's error as the CLI reports it."""
        with self._lock:
            if self._db is None:
                raise StoreError("the queue is closed")
            with _reported():
                yield self._db

    # -- adding work ------------------------------------------------------------------

    def enqueue(self, command: str, **options: Any) -> str:
        """Add one job and return its id. ``options`` are the JSON job fields: ``id``,
        ``queue``, ``priority``, ``max_retries``, ``backoff_base``, ``timeout``, ``delay``
        (seconds) or ``run_at`` (ISO-8601), ``after`` (ids), ``unique_key``, ``cwd`` (the
        directory it runs in, relative to this process's; without it, the worker's),
        ``env`` (variables set over the worker's environment) and the resource limits
        ``memory`` (bytes, or ``"64MiB"``), ``cpu_time`` (seconds) and ``open_files``
        (``"none"``: no limit). A job whose unique key an unfinished job holds is not added:
        that job's id is returned."""
        if options or type(command) is not str:
            spec = _spec({**options, "command": command})
        else:  # the command alone: every other field is its default, valid as it is
            _utf8("invalid job: command", command)
            spec = decisions.JobSpec(command=decisions.check_command(command))
        with self._lock:  # what _open does, without its two generators: this runs per job
            if self._db is None:
                raise StoreError("the queue is closed")
            try:
                return decisions.enqueue(self._db, [spec])[0]
            except store.driver_errors() as exc:
                raise _store_error(exc) from exc

    def enqueue_many(self, specs: Iterable[Spec]) -> list[str]:
        """Add many jobs in one transaction, all or none (each a mapping of JSON job fields,
        with ``command``, or a ``JobSpec``); returns their ids in order."""
        if isinstance(specs, str | bytes | Mapping) or not isinstance(specs, Iterable):
            raise InvalidInput("enqueue_many: expected an iterable of jobs, got "
                               f"{type(specs).__name__}")
        checked = [_spec(s, f" #{n}") for n, s in enumerate(specs, 1)]
        with self._open() as db:
            return decisions.enqueue(db, checked) if checked else []

    # -- reading ----------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any]:
        """One job's fields, as ``queuectl show --json`` gives them without its runs."""
        reads.check_job_id(job_id)
        with self._open() as db:
            return render.job_json(reads.get_job(db, job_id))

    def jobs(self, state: str | None = None, queue: str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs, oldest first (``queuectl list --json``)."""
        if state is not None:
            reads.check_state(state)
        if queue is not None:
            decisions.check_queue_name(_text("queue", queue))
        if limit is not None:
            _whole("limit", limit)
        with self._open() as db:
            return [render.job_json(job) for job in reads.list_jobs(db, state, limit, queue)]

    def history(self, job_id: str, archive: bool = False) -> list[dict[str, Any]]:
        """Every event of one job, in order (``queuectl history --json``); ``archive``: with
        those pruned to the archive."""
        reads.check_job_id(job_id)
        if not isinstance(archive, bool):
            raise InvalidInput(f"archive: expected True or False, got {type(archive).__name__}")
        with self._open() as db:
            rows = reads.history(db, job_id, archive)
        return _as_json(render.history_json(rows))  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        """Jobs per state and per queue, the running workers and how many ended
        (``queuectl status --json``)."""
        with self._open() as db:
            return _as_json(reads.status(db))  # type: ignore[no-any-return]

    def follow(self, job_id: str) -> Iterator[str]:
        """A job's output as it is written (``queuectl logs --follow``): chunks of text,
        from the start of its current run (once it starts, if it has not) through every
        retry, ending when the job is final. The queue is free for other calls (and
        threads) between chunks."""
        from queuectl import output

        reads.check_job_id(job_id)
        with self._open() as db:
            reads.get_job(db, job_id)  # an unknown id: NotFound now, not at the first chunk
            steps = output.steps(db, job_id)
        return self._followed(steps)

    def _followed(self, steps: Iterator[Any]) -> Iterator[str]:
        import time

        while True:
            with self._open():
                step = next(steps, None)
            if step is None:
                return
            if isinstance(step, float):
                time.sleep(step)
            elif isinstance(step, str):
                yield step

    # -- acting on jobs ---------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        """Cancel a job: ``"cancelled"``, or ``"requested"`` for a running one, which its
        worker then stops. Jobs waiting on it are cancelled too."""
        reads.check_job_id(job_id)
        with self._open() as db:
            return decisions.cancel(db, job_id)

    def retry(self, job_id: str) -> None:
        """Move a dead job back to pending, with its attempts reset (``dlq retry``)."""
        reads.check_job_id(job_id)
        with self._open() as db:
            decisions.dlq_retry(db, job_id)

    def restart(self, job_id: str) -> None:
        """Run a completed, dead or cancelled job again, as a fresh series of attempts
        (``queuectl restart``)."""
        reads.check_job_id(job_id)
        with self._open() as db:
            decisions.restart(db, job_id)

    def signal(self, job_id: str, signal: str | int) -> None:
        """Have the worker running a job send it ``signal`` (``"USR1"``, ``"SIGTERM"``,
        ``15``...) to its process group (``queuectl signal``)."""
        reads.check_job_id(job_id)
        sig = decisions.parse_signal(str(signal))
        with self._open() as db:
            decisions.signal(db, job_id, sig)

    # -- waiting ----------------------------------------------------------------------

    def wait(self, ids: str | Iterable[str], timeout: float | None = None) -> dict[str, str]:
        """Block until each job of ``ids`` (one id, or several) is final, as ``queuectl
        wait`` does; return each one's final state by id: ``completed``, ``dead`` or
        ``cancelled`` (``queuectl.outcome.exit_code`` turns one into an exit code).

        NotFound for an unknown id. When ``timeout`` seconds pass first: ``WaitTimeout``,
        a ``QueueError`` and a ``TimeoutError``, whose ``states`` holds each job's state
        then. The jobs are left as they are either way. Other threads may use this Queue
        meanwhile: the wait holds it only while it looks."""
        from queuectl import waiting

        wanted = [ids] if isinstance(ids, str) else _ids(ids)
        for job_id in wanted:
            reads.check_job_id(job_id)
        if timeout is not None:
            timeout = _seconds("timeout", timeout)
        with self._open() as db:
            jobs = waiting.watch(db, dict.fromkeys(wanted))
        if not waiting.until_final(self._open, jobs, timeout):
            late = [job_id for job_id, state in jobs.states.items() if state not in FINAL]
            shown = ", ".join(late[:5]) + (", ..." if len(late) > 5 else "")
            raise WaitTimeout(f"{len(late)} of {jobs.total} jobs not final after "
                              f"{timeout:g}s: {shown}", dict(jobs.states))
        return dict(jobs.states)

    # -- the connection ---------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; any later call raises StoreError. Closing twice is fine."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Queue({self._shown!r})"


def _target(db: object) -> str:
    """The store ``db`` names, held to what ``--db`` and ``QUEUECTL_DB`` may hold."""
    name = "db"
    if db is None:
        db, name = store.default_target(), "QUEUECTL_DB"
    elif isinstance(db, os.PathLike):
        db = os.fspath(db)
    if not isinstance(db, str):
        raise InvalidInput(f"db: expected a path or a postgresql:// URL, got {type(db).__name__}")
    if "\0" in db:
        raise InvalidInput(f"{name} contains a NUL character: {reads.printable(db)}")
    _utf8(name, db)
    return db


def _utf8(name: str, text: str) -> None:
    """Text that UTF-8 cannot hold (lone surrogates), refused as the CLI refuses such an
    argument: no store holds it, and no message could print it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not valid UTF-8: {reads.printable(text)}") from None


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: expected text, got {type(value).__name__}")
    return value


def _ids(ids: object) -> list[str]:
    if isinstance(ids, bytes | Mapping) or not isinstance(ids, Iterable):
        raise InvalidInput(f"ids: expected a job id or an iterable of them, got "
                           f"{type(ids).__name__}")
    return list(ids)


def _seconds(name: str, value: object) -> float:
    """Seconds held to ``name``'s range in ``limits``, as the CLI's flag holds them."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name}: expected {limits.describe(name)}, got "
                           f"{type(value).__name__}")
    try:
        return float(limits.check(name, value))
    except InvalidInput as exc:
        raise InvalidInput(f"{name}: {exc}") from None


def _whole(name: str, value: object) -> int:
    """A whole number held to ``name``'s range in ``limits``, as the CLI's flag holds it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name}: expected {limits.describe(name)}, got "
                           f"{type(value).__name__}")
    try:
        return int(limits.check(name, value))
    except InvalidInput as exc:
        raise InvalidInput(f"{name}: {exc}") from None


@contextmanager
def _reported() -> Iterator[None]:
    """A driver's error as the CLI reports one: a StoreError of one line."""
    try:
        yield
    except store.driver_errors() as exc:
        raise _store_error(exc) from exc


def _store_error(exc: BaseException) -> StoreError:
    return StoreError(f"database error: {' '.join(str(exc).split())}")


def _as_json(data: Any) -> Any:
    """``data`` as ``--json`` prints it: plain str keys and lists (not states, tuples)."""
    return msgspec.json.decode(msgspec.json.encode(data))


def _spec(given: object, where: str = "") -> decisions.JobSpec:
    """A job's fields checked as ``enqueue`` checks a JSON job (a ``JobSpec`` too: its
    fields may hold anything, as it is not checked when made)."""
    if isinstance(given, decisions.JobSpec):
        given = msgspec.structs.asdict(given)
    if not isinstance(given, Mapping):
        raise InvalidInput(f"invalid job{where}: expected a mapping of job fields or a "
                           f"JobSpec, got {type(given).__name__}")
    try:
        spec = msgspec.convert(dict(given), decisions.JobSpec)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid job{where}: {exc}") from None
    for name in ("command", "id", "queue", "run_at", "unique_key"):
        value = getattr(spec, name)
        if value is not None:
            _utf8(f"invalid job{where}: {name}", value)
    for dependency in spec.after:
        _utf8(f"invalid job{where}: after", dependency)
    return decisions.check_spec(spec, where)
