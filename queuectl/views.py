"""What each reading command's ``--json`` prints, built from one connection: ``list``,
``show``, ``history``, ``logs``, ``status`` and ``queues``. The command line and the HTTP
API (``queuectl serve``'s ``/api/v1``) both print these, through ``render.to_json``, so
the two cannot drift apart."""

from __future__ import annotations

from typing import Any

from queuectl import reads, render
from queuectl.store import Db


def jobs(conn: Db, state: str | None = None, queue: str | None = None,
         limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
    """``list --json``."""
    return [render.job_json(j) for j in reads.list_jobs(conn, state, limit, queue, after)]


def job(conn: Db, job_id: str) -> dict[str, Any]:
    """``show ID --json``."""
    found = reads.get_job(conn, job_id)
    deps = {dep: reads.get_job(conn, dep).state for dep in found.after}
    return render.show_json(found, deps, reads.runs_of(conn, job_id))


def history(conn: Db, job_id: str, archive: bool = False) -> list[dict[str, Any]]:
    """``history ID --json``."""
    return render.history_json(reads.history(conn, job_id, archive))


def logs(conn: Db, job_id: str, attempt: int | None = None) -> list[Any]:
    """``logs ID --json``: each run (of ``attempt`` only, if given)."""
    runs = reads.runs_of(conn, job_id)
    return runs if attempt is None else [r for r in runs if r.attempt == attempt]


def status(conn: Db) -> Any:
    """``status --json``."""
    return reads.status(conn)


def queues(conn: Db) -> Any:
    """``queues --json``."""
    return reads.queues(conn)
