"""Retention: ``queuectl prune`` moves old events out of the ledger into its archive.

What leaves: every event of a job that finished (completed, dead or cancelled) before the
cutoff, unless an unfinished job depends on it; and each worker's heartbeats from before
the cutoff that a later heartbeat of the same worker superseded. What stays: everything
else, the schedules' own events included (a ``schedule-fired`` event names the job it made
and is the schedule's history, not the job's).

Each batch is one write transaction, so that workers get the lock between them: it appends
one ``pruned`` event, then moves the rows (``Db.archive``; on SQLite to a file beside the
database, on PostgreSQL to a table). The event comes first, so its seq lies above every seq
that leaves, and it carries what a replay can no longer work out from the events gone (see
``events.Pruned``): ``rebuild --check`` stays exact. Pruned jobs leave ``list`` and
``status``; the all-time run counts of ``stats`` and each worker's jobs done keep them.
Their output (the output store) is deleted with them: it is data, and the archive keeps
events only.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from queuectl import clock, limits, output, progress
from queuectl import events as ev
from queuectl.errors import InvalidInput
from queuectl.ledger import append, write
from queuectl.states import FINAL
from queuectl.store import Db

JOB_BATCH = 1000  # jobs a transaction
HEARTBEAT_BATCH = 5000  # heartbeats a transaction
_CHUNK = 500  # values in one IN (...) list

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_FINAL = ", ".join(f"'{state}'" for state in FINAL)
# Finished before the cutoff, and no unfinished job waits on it.
_PRUNABLE = f"""state IN ({_FINAL}) AND updated_at < ?
      AND NOT EXISTS (SELECT 1 FROM job_deps d JOIN jobs w ON w.id = d.job_id
                      WHERE d.depends_on = jobs.id AND w.state NOT IN ({_FINAL}))"""
_CANDIDATES = f"SELECT seq, id, queue FROM jobs WHERE seq > ? AND {_PRUNABLE} ORDER BY seq LIMIT ?"
_COUNT_CANDIDATES = f"SELECT count(*) FROM jobs WHERE {_PRUNABLE}"
# A schedule's events stay (see above); every other event naming a pruned job leaves.
_EVENTS_OF = ("SELECT seq, worker_id FROM events WHERE job_id IN ({}) "
              "AND type != 'schedule-fired'")
_RUNS_OF = ("SELECT queue, outcome, count(*), sum(dead) FROM runs WHERE job_id IN ({}) "
            "GROUP BY queue, outcome")
_WORKERS = ("SELECT id, state, last_heartbeat, stopped_at, stop_requested, current_job, "
            "jobs_done FROM workers WHERE id IN ({})")
_LATEST_BEAT = ("SELECT max(seq) FROM events WHERE worker_id = ? "
                "AND type = 'worker-heartbeat'")
_COUNT_BEATS = """SELECT count(*) FROM events WHERE worker_id = ? AND type = 'worker-heartbeat'
    AND at < ? AND seq < ?"""
_OLD_BEATS = """SELECT seq FROM events WHERE worker_id = ? AND type = 'worker-heartbeat'
    AND at < ? AND seq > ? AND seq < ? ORDER BY seq LIMIT ?"""


@dataclass
class Report:
    """What a prune moved (or, with ``dry_run``, would move)."""

    before: str
    jobs: int = 0
    job_events: int = 0
    heartbeats: int = 0
    batches: int = 0

    @property
    def events(self) -> int:
        return self.job_events + self.heartbeats


def cutoff(conn: Db, text: str) -> str:
    """``--before``: a duration back from now (``30d``, ``12h``, ``90m``, ``0s``; ``w`` for
    weeks) or a UTC date or time (``2026-11-01``, ``2026-11-01T12:00:00Z``), as a ledger
    time."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    if unit is not None:
        try:
            seconds = limits.check("before", float(text[:-1]) * unit)
        except (ValueError, InvalidInput):
            pass
        else:
            return clock.after(conn.now(), -seconds)
    try:
        moment = clock.within_range(clock.parse(text))
    except ValueError:
        raise InvalidInput(
            f"--before {text!r}: expected a duration like 30d, 12h or 90m (up to 100 years), "
            "or a UTC date or time like 2026-11-01 or 2026-11-01T12:00:00Z") from None
    return clock.iso(moment)


def prune(conn: Db, before: str, *, dry_run: bool = False, job_batch: int = JOB_BATCH,
          heartbeat_batch: int = HEARTBEAT_BATCH) -> Report:
    """Move out of the ledger the events of jobs finished before ``before`` (a ledger time)
    and the heartbeats superseded before then; ``dry_run`` counts them and writes nothing."""
    report = Report(before=before)
    _prune_jobs(conn, report, dry_run, job_batch)
    _prune_heartbeats(conn, report, dry_run, heartbeat_batch)
    return report


def _batch(conn: Db, dry_run: bool) -> AbstractContextManager[Any]:
    """One batch's transaction: a write one, or for a dry run a read of the same rows."""
    return conn.snapshot() if dry_run else write(conn)


def _chunks(values: Sequence[str]) -> list[Sequence[str]]:
    return [values[i:i + _CHUNK] for i in range(0, len(values), _CHUNK)]


def _rows_in(conn: Db, template: str, values: Sequence[str]) -> list[tuple]:  # type: ignore[type-arg]
    found = []
    for chunk in _chunks(values):
        found += conn.execute(template.format(", ".join("?" * len(chunk))), tuple(chunk)).fetchall()
    return found


def _prune_jobs(conn: Db, report: Report, dry_run: bool, batch: int) -> None:
    after = 0
    bar = progress.current()
    bar.task("Pruning finished jobs", lambda: _count_jobs(conn, report.before), "jobs")
    while True:
        bar.update(report.jobs)
        with _batch(conn, dry_run):
            jobs = conn.execute(_CANDIDATES, (after, report.before, batch)).fetchall()
            if not jobs:
                return
            after = jobs[-1][0]
            ids = [job_id for _, job_id, _ in jobs]
            events = _rows_in(conn, _EVENTS_OF, ids)
            report.jobs += len(ids)
            report.job_events += len(events)
            report.batches += 1
            if dry_run:
                continue
            runs: dict[str, int] = {}
            queue_runs: dict[str, dict[str, int]] = {}
            for queue, outcome, n, dead in _rows_in(conn, _RUNS_OF, ids):
                for counts in (runs, queue_runs.setdefault(queue, {})):
                    counts["claimed"] = counts.get("claimed", 0) + n
                    counts["dead"] = counts.get("dead", 0) + int(dead or 0)
                    if outcome is not None:
                        counts[outcome] = counts.get(outcome, 0) + n
            named = sorted({worker for _, worker in events if worker is not None})
            workers = tuple(ev.PrunedWorker(*row) for row in sorted(_rows_in(conn, _WORKERS, named)))
            append(conn, ev.Pruned(
                before=report.before, events=len(events), jobs=tuple(ids),
                queues=tuple(sorted({queue for _, _, queue in jobs})),
                runs=_nonzero(runs), workers=workers,
                queue_runs={queue: _nonzero(counts) for queue, counts in sorted(queue_runs.items())},
                starts=_counted_starts(conn, [seq for seq, _ in events])))
            conn.archive(sorted(seq for seq, _ in events))
            output.delete(conn, ids)  # data, not events: it goes, not to the archive


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: n for k, n in sorted(counts.items()) if n}


def _counted_starts(conn: Db, seqs: Sequence[int]) -> dict[str, tuple[tuple[int, str], ...]]:
    """The recent starts of each rate-limited queue that counts a start among ``seqs``."""
    if conn.execute("SELECT 1 FROM queue_starts LIMIT 1").fetchone() is None:
        return {}  # no queue has a rate: nothing to look for
    hit: set[str] = set()
    for i in range(0, len(seqs), _CHUNK):
        chunk = seqs[i:i + _CHUNK]
        hit.update(queue for (queue,) in conn.execute(
            f"SELECT DISTINCT queue FROM queue_starts WHERE seq IN ({', '.join('?' * len(chunk))})",
            tuple(chunk)).fetchall())
    return {queue: tuple((int(seq), at) for seq, at in conn.execute(
        "SELECT seq, at FROM queue_starts WHERE queue = ? ORDER BY at, seq", (queue,)).fetchall())
        for queue in sorted(hit)}


def _prune_heartbeats(conn: Db, report: Report, dry_run: bool, batch: int) -> None:
    """Each worker's heartbeats before the cutoff but its latest, ``batch`` a transaction
    across workers. A superseded heartbeat changes no projection: a later one sets the same
    column, so the pruned event needs to carry nothing for them."""
    workers = [row[0] for row in conn.execute("SELECT id FROM workers ORDER BY id").fetchall()]
    bar = progress.current()
    bar.task("Pruning superseded heartbeats",
             lambda: _count_heartbeats(conn, workers, report.before), "heartbeats")
    position, after = 0, 0  # the worker, and the seq within its heartbeats, reached so far
    while position < len(workers):
        bar.update(report.heartbeats)
        with _batch(conn, dry_run):
            seqs: list[int] = []
            while position < len(workers) and len(seqs) < batch:
                worker = workers[position]
                (latest,) = conn.execute(_LATEST_BEAT, (worker,)).fetchone()
                wanted = batch - len(seqs)
                found = [row[0] for row in conn.execute(
                    _OLD_BEATS, (worker, report.before, after, latest or 0, wanted)).fetchall()]
                seqs += found
                if len(found) < wanted:
                    position, after = position + 1, 0
                else:
                    after = found[-1]
            if not seqs:
                return
            report.heartbeats += len(seqs)
            report.batches += 1
            if not dry_run:
                append(conn, ev.Pruned(before=report.before, events=len(seqs)))
                conn.archive(seqs)


# What a bar counts down from (only when one is drawn): what is there to prune now. Workers
# may finish jobs meanwhile, but only before the cutoff counts, so it holds but for a job
# whose last dependant has just ended.


def _count_jobs(conn: Db, before: str) -> int:
    return int(conn.execute(_COUNT_CANDIDATES, (before,)).fetchone()[0])


def _count_heartbeats(conn: Db, workers: list[str], before: str) -> int:
    total = 0
    for worker in workers:
        (latest,) = conn.execute(_LATEST_BEAT, (worker,)).fetchone()
        total += conn.execute(_COUNT_BEATS, (worker, before, latest or 0)).fetchone()[0]
    return total
