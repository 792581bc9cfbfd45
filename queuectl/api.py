"""The Python API: the same queue as the command line, for a program that hands shell work
to it (a web app's request handler, a script).

    from queuectl import Queue

    with Queue() as queue:                       # QUEUECTL_DB, else data/queue.db
        job_id = queue.enqueue("make report", queue="reports", max_retries=5)
        queue.get(job_id)["state"]               # 'pending'

A ``Queue`` holds one connection; every method is one call of the functions the CLI
calls (``decisions``, ``reads``, ``retention``), so what it does is an event in the ledger
like any other, and what it returns is what ``--json`` prints. Each ``enqueue`` commits
durably before it returns, as ``queuectl enqueue`` does. Errors are ``QueueError``s
(``InvalidInput``, ``NotFound``, ``Conflict``, ``StoreError``), each with the one line the
CLI would print. A ``Queue`` may be shared by the threads of one process (its calls take
turns); open one per process, not one per call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import msgspec

from queuectl import decisions, ledger, reads, render
from queuectl.errors import InvalidInput
from queuectl.store import Db

__all__ = ["Queue"]

Spec = Mapping[str, Any] | decisions.JobSpec


class Queue:
    """A queuectl database, SQLite or PostgreSQL (``db``: a path or a ``postgresql://``
    URL; default: ``QUEUECTL_DB``, else ``data/queue.db``, created on first use)."""

    def __init__(self, db: str | os.PathLike[str] | None = None) -> None:
        self._db: Db = ledger.connect(None if db is None else os.fspath(db))
        self._lock = threading.Lock()

    # -- adding work ------------------------------------------------------------------

    def enqueue(self, command: str, **options: Any) -> str:
        """Add one job and return its id. ``options`` are the JSON job fields: ``id``,
        ``queue``, ``priority``, ``max_retries``, ``backoff_base``, ``timeout``, ``delay``
        (seconds) or ``run_at`` (ISO-8601), ``after`` (ids), ``unique_key``. A job whose
        unique key an unfinished job holds is not added: that job's id is returned."""
        spec = _spec({**options, "command": command})
        with self._lock:
            return decisions.enqueue(self._db, [spec])[0]

    def enqueue_many(self, specs: Iterable[Spec]) -> list[str]:
        """Add many jobs in one transaction, all or none (each a mapping of JSON job fields,
        with ``command``, or a ``JobSpec``); returns their ids in order."""
        checked = [_spec(s, f" #{n}") for n, s in enumerate(specs, 1)]
        if not checked:
            return []
        with self._lock:
            return decisions.enqueue(self._db, checked)

    # -- reading ----------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any]:
        """One job's fields, as ``queuectl show --json`` gives them without its runs."""
        with self._lock:
            return render.job_json(reads.get_job(self._db, job_id))

    def jobs(self, state: str | None = None, queue: str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs, oldest first (``queuectl list --json``)."""
        if state is not None:
            reads.check_state(state)
        with self._lock:
            return [render.job_json(job)
                    for job in reads.list_jobs(self._db, state, limit, queue)]

    def history(self, job_id: str, archive: bool = False) -> list[dict[str, Any]]:
        """Every event of one job, in order (``queuectl history --json``); ``archive``: with
        those pruned to the archive."""
        with self._lock:
            rows = reads.history(self._db, job_id, archive)
        return _as_json(render.history_json(rows))  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        """Jobs per state and per queue, the running workers and how many ended
        (``queuectl status --json``)."""
        with self._lock:
            return _as_json(reads.status(self._db))  # type: ignore[no-any-return]

    # -- acting on jobs ---------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        """Cancel a job: ``"cancelled"``, or ``"requested"`` for a running one, which its
        worker then stops. Jobs waiting on it are cancelled too."""
        with self._lock:
            return decisions.cancel(self._db, job_id)

    def retry(self, job_id: str) -> None:
        """Move a dead job back to pending, with its attempts reset (``dlq retry``)."""
        with self._lock:
            decisions.dlq_retry(self._db, job_id)

    # -- the connection ---------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Queue({self._db.target!r})"


def _as_json(data: Any) -> Any:
    """``data`` as ``--json`` prints it: plain str keys and lists (not states, tuples)."""
    return msgspec.json.decode(msgspec.json.encode(data))


def _spec(given: Spec, where: str = "") -> decisions.JobSpec:
    """A job's fields checked as ``enqueue`` checks a JSON job."""
    if isinstance(given, decisions.JobSpec):
        return decisions.check_spec(given, where)
    try:
        spec = msgspec.convert(dict(given), decisions.JobSpec)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise InvalidInput(f"invalid job{where}: {exc}") from None
    return decisions.check_spec(spec, where)
