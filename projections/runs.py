"""The ``runs`` projection: one row per run of a job, for ``stats`` and ``logs``.

Indexes are kept to what ``stats`` needs, since every run touches each of them.

Rules it enforces: a claim opens a run whose ``wait`` is how long the job had been eligible
(claim time minus its ``run_at``); the run's outcome event (completed, failed, timed-out,
lease-expired, fenced, released, cancelled) closes it with its duration; a ``dead`` event
marks the run that exhausted the job's retries. A run is of the queue its claim names.
``run_counts`` keeps all-time totals per queue and outcome, so that ``stats`` without
``--since`` and a metrics scrape read no more than a few rows plus two index walks; of them,
``pruned:<outcome>`` rows count the runs that ``queuectl prune`` took out of the table.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import projections
from queuectl import events as ev
from queuectl.store import Db, index
from queuectl.store.statements import Change, Insert

NAME = "runs"
VERSION = 9
TABLES = {"runs": ("seq",), "run_counts": ("queue", "outcome")}

DDL = (
    """CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker_id TEXT NOT NULL,
        claimed_at TEXT NOT NULL,
        wait REAL NOT NULL,
        finished_at TEXT,
        outcome TEXT,
        exit_code INTEGER,
        duration REAL,
        dead INTEGER NOT NULL DEFAULT 0,
        queue TEXT NOT NULL DEFAULT ''
    )""",
    # queue '': runs claimed before claims named their queue.
    """CREATE TABLE run_counts (
        queue TEXT NOT NULL,
        outcome TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (queue, outcome)
    )""",
)

# Built once at the end of a replay. runs_finished leaves open
# runs out: they would all share the NULL end of the index, a page every claim touches.
INDEXES = (
    "CREATE INDEX runs_job ON runs (job_id, seq)",  # the live path closes a job's open run
    "CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL",
    "CREATE INDEX runs_duration ON runs (duration) WHERE duration IS NOT NULL",
    "CREATE INDEX runs_wait ON runs (wait)",
)

RUNS_FINISHED = index("runs_finished")  # where a query reads runs by their end (INDEXES)

COLUMNS = ("seq", "job_id", "attempt", "worker_id", "claimed_at", "wait", "finished_at",
           "outcome", "exit_code", "duration", "dead", "queue")
# Where a replay's row (a list in COLUMNS' order) holds these; the four from finished_at
# to duration are what a run's end sets, together.
_FINISHED_AT, _DEAD = COLUMNS.index("finished_at"), COLUMNS.index("dead")
# The columns' DDL defaults (NULL: None), which a replay may leave out of an insert.
_DEFAULTS = {"finished_at": None, "outcome": None, "exit_code": None, "duration": None,
             "dead": 0, "queue": ""}
fromisoformat = datetime.fromisoformat
PRUNED = "pruned:"  # run_counts of runs pruned (queuectl prune) from the table: pruned:<outcome>
_LATEST = "SELECT max(seq) FROM runs WHERE job_id = ?"

# run_counts follows the rows through these triggers, inside the database. A replay creates
# them after its last row, having counted in memory instead.
_UPSERT = ("INSERT INTO run_counts (queue, outcome, n) VALUES ({}, {}, 1) "
           "ON CONFLICT (queue, outcome) DO UPDATE SET n = run_counts.n + 1")
_ADD = ("INSERT INTO run_counts (queue, outcome, n) {} "
        "ON CONFLICT (queue, outcome) DO UPDATE SET n = run_counts.n + excluded.n")
_OPENED_ROWS = "SELECT queue, 'claimed', count(*) FROM opened GROUP BY queue"
TRIGGERS = {
    "sqlite": (
        f"""CREATE TRIGGER run_counts_claimed AFTER INSERT ON runs BEGIN
            {_UPSERT.format("new.queue", "'claimed'")}; END""",
        f"""CREATE TRIGGER run_counts_closed AFTER UPDATE OF outcome ON runs
        WHEN old.outcome IS NULL AND new.outcome IS NOT NULL BEGIN
            {_UPSERT.format("new.queue", "new.outcome")}; END""",
        f"""CREATE TRIGGER run_counts_dead AFTER UPDATE OF dead ON runs
        WHEN new.dead = 1 AND old.dead = 0 BEGIN
            {_UPSERT.format("new.queue", "'dead'")}; END""",
    ),
    # The runs a batch opens are one INSERT, counted once a statement from its transition
    # table (see job_counts_move); a run is closed by one UPDATE of its own (a job's runs
    # are found by job id, which is no row's key), counted by a row trigger, which costs
    # less than a statement trigger's transition tables for one row.
    "postgres": (
        f"""CREATE OR REPLACE FUNCTION run_counts_opened() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN {_ADD.format(_OPENED_ROWS)}; RETURN NULL; END $$""",
        """CREATE TRIGGER run_counts_opened AFTER INSERT ON runs REFERENCING NEW TABLE AS opened
        FOR EACH STATEMENT EXECUTE FUNCTION run_counts_opened()""",
        f"""CREATE OR REPLACE FUNCTION run_counts_closed() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN {_UPSERT.format("NEW.queue", "NEW.outcome")}; RETURN NULL; END $$""",
        """CREATE TRIGGER run_counts_closed AFTER UPDATE OF outcome ON runs
        FOR EACH ROW WHEN (OLD.outcome IS NULL AND NEW.outcome IS NOT NULL)
        EXECUTE FUNCTION run_counts_closed()""",
        f"""CREATE OR REPLACE FUNCTION run_counts_dead() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN {_UPSERT.format("NEW.queue", "'dead'")}; RETURN NULL; END $$""",
        """CREATE TRIGGER run_counts_dead AFTER UPDATE OF dead ON runs
        FOR EACH ROW WHEN (NEW.dead = 1 AND OLD.dead = 0) EXECUTE FUNCTION run_counts_dead()""",
    ),
}


# A run as its claim opens it: the columns left out hold their defaults (NULL, and not
# dead), which an insert then need not bind.
_OPEN = Insert("runs", ("seq", "job_id", "attempt", "worker_id", "claimed_at", "wait", "queue"))


def _opened(seq: int, at: str, e: ev.Claimed) -> tuple[Any, ...]:
    """The run a claim opens: the values of ``_OPEN``'s columns."""
    return (seq, e.job_id, e.attempt, e.worker_id, at,
            _wait(at, e.eligible_at) if e.eligible_at else 0.0, e.queue or "")


def _wait(at: str, eligible_at: str) -> float:
    """Seconds from when a job could run to its claim. Ledger times are UTC ISO strings,
    which fromisoformat reads as such; whole microseconds divided by 10**6 are already the
    nearest float at 6 decimal places."""
    wait = (fromisoformat(at) - fromisoformat(eligible_at)).total_seconds()
    return wait if wait > 0.0 else 0.0  # as max(0.0, wait), without a call of max


def _run(seq: int, at: str, e: ev.Claimed) -> list[Any]:
    """The whole row of ``_opened`` as a replay holds it: a list in ``COLUMNS``' order,
    written out (a replay makes one a claim)."""
    return [seq, e.job_id, e.attempt, e.worker_id, at,
            _wait(at, e.eligible_at) if e.eligible_at else 0.0,
            None, None, None, None, 0, e.queue or ""]


# How each outcome event closes the job's open run: (outcome, exit code, duration).
# A cancel closes a run only when a worker stopped it running, and its time is not a run
# time: the run was cut short.
_OUTCOMES: dict[type, Callable[..., tuple[str, int | None, float | None] | None]] = {
    ev.Completed: lambda e: ("completed", 0, e.duration),
    ev.Failed: lambda e: ("failed", e.exit_code, e.duration),
    ev.TimedOut: lambda e: ("timed-out", None, e.duration),
    ev.LeaseExpired: lambda e: ("lease-expired", None, None),
    # A run its own worker stopped when it could not renew its lease; one recorded after a
    # rescuer took the job back was closed by that rescuer's lease-expired.
    ev.Fenced: lambda e: None if e.rescued else ("fenced", None, e.duration),
    ev.Released: lambda e: ("released", None, None),
    ev.Cancelled: lambda e: ("cancelled", None, None) if e.worker_id is not None else None,
}

HANDLES = frozenset({ev.Claimed, ev.Dead, ev.Pruned, *_OUTCOMES})  # the rest pass by
# A job's open run closed: finished_at, outcome, exit_code and duration, by the job's id.
_CLOSE = Change("runs", "job_id", given=("finished_at", "outcome", "exit_code", "duration"),
                null=("finished_at",), unique=False)


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    kind = type(e)
    if kind is ev.Claimed:
        tx.add(_OPEN, _opened(seq, at, e))
    elif kind is ev.Pruned:
        # Their runs leave the table; run_counts keep them, as all-time totals, and count
        # them again under pruned:<outcome>, so that stats knows which runs it still holds.
        tx.delete("runs", "job_id", e.jobs)
        for (queue, outcome), n in pruned_runs(e).items():
            tx.insert("run_counts", {"queue": queue, "outcome": PRUNED + outcome, "n": n},
                      key=("queue", "outcome"), clash="add")
    elif kind is ev.Dead:
        # A dead event always follows the event that closed the job's latest run.
        (latest,) = tx.execute(_LATEST, (e.job_id,)).fetchone()
        if latest is not None:
            tx.update("runs", {"seq": latest}, {"dead": 1})
    elif kind in _OUTCOMES:
        _close(tx, at, e, _OUTCOMES[kind])


def _close(tx: Db, at: str, e: Any, outcome: Callable[..., Any]) -> None:
    closed = outcome(e)
    if closed is not None:  # a job has one open run at most: its latest
        tx.change(_CLOSE, (at, *closed, e.job_id))


def live(kind: type) -> Callable[[Db, int, str, Any], None]:
    """What ``apply`` does with an event of ``kind``, looked up once: a claim opens a run,
    an outcome closes its job's open one."""
    if kind is ev.Claimed:
        return _open
    outcome = _OUTCOMES.get(kind)
    if outcome is None:
        return apply

    def close(tx: Db, seq: int, at: str, e: Any) -> None:
        _close(tx, at, e, outcome)

    return close


def _open(tx: Db, seq: int, at: str, e: ev.Claimed) -> None:
    tx.add(_OPEN, _opened(seq, at, e))


def pruned_runs(e: ev.Pruned) -> dict[tuple[str, str], int]:
    """The pruned runs per (queue, outcome); an older pruned event's, under queue ""."""
    if not e.queue_runs:
        return {("", outcome): n for outcome, n in e.runs.items()}
    return {(queue, outcome): n for queue, runs in e.queue_runs.items()
            for outcome, n in runs.items()}


class Replay:
    """``apply`` for a replay into empty tables, on rows held in memory (a job has at most
    one open run, its latest, so closing "the open runs" is closing the latest if open)."""

    def __init__(self, tx: Db, find: projections.Find) -> None:
        self.tx, self.find = tx, find
        self.rows = projections.Rows(tx, "runs", COLUMNS, "seq", defaults=_DEFAULTS,
                                     lists=True)
        self.latest: dict[str, int] = {}  # job id -> seq of its latest run, while held
        self.counts: Counter[tuple[str, str | None]] = Counter()  # run_counts, over the rows written

    def handler(self, kind: type) -> Callable[[int, str, Any], None]:
        """What to call with ``(seq, at, event)`` for events of this type."""
        if kind is ev.Claimed:
            return self._claimed
        if kind is ev.Dead:
            return self._dead
        if kind is ev.Pruned:
            return self._pruned
        outcome, find, latest = _OUTCOMES[kind], self.find, self.latest.get
        held, again, get = self.rows.new.get, self.rows.read.get, self.rows.get  # _latest's

        def closed(seq: int, at: str, e: Any) -> None:
            claim = latest(e.job_id) or find(e.job_id, "claimed")
            run = None if claim is None else held(claim) or again(claim) or get(claim)
            if run is not None and run[_FINISHED_AT] is None:
                ended = outcome(e)
                if ended is not None:  # finished_at, outcome, exit_code, duration
                    run[_FINISHED_AT:_DEAD] = (at, *ended)

        return closed

    def _latest(self, job_id: str) -> list[Any] | None:
        seq = self.latest.get(job_id) or self.find(job_id, "claimed")  # a run's seq is its claim's
        return None if seq is None else self.rows.new.get(seq) or self.rows.get(seq)

    def _claimed(self, seq: int, at: str, e: ev.Claimed) -> None:
        self.rows.add(_run(seq, at, e))
        self.latest[e.job_id] = seq

    def _dead(self, seq: int, at: str, e: ev.Dead) -> None:
        run = self._latest(e.job_id)
        if run is not None:
            run[_DEAD] = 1

    def _pruned(self, seq: int, at: str, e: ev.Pruned) -> None:
        # A replay never made the pruned jobs' runs: the event gives their share of the totals.
        runs = pruned_runs(e)
        self.counts.update(runs)
        self.counts.update({(queue, PRUNED + outcome): n for (queue, outcome), n in runs.items()})

    def flush(self) -> None:
        rows = self.rows
        for held, sign in ((rows.new.values(), 1), (rows.read.values(), 1), (rows.before, -1)):
            for (queue, outcome, dead), n in Counter(map(_COUNTED, held)).items():
                self.counts[queue, "claimed"] += sign * n
                self.counts[queue, "dead"] += sign * n * dead
                self.counts[queue, outcome] += sign * n
        rows.flush()
        self.latest.clear()

    def close(self) -> None:
        """Write what is held, then ``run_counts``, counted once instead of per event."""
        self.flush()
        self.tx.insert_many(
            "run_counts", ("queue", "outcome", "n"),
            [(queue, outcome, n) for (queue, outcome), n in self.counts.items()
             if outcome is not None and n > 0])


_COUNTED = operator.itemgetter(*map(COLUMNS.index, ("queue", "outcome", "dead")))
