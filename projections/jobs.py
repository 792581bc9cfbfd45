"""The ``jobs`` projection: one row per job, ``job_deps`` (its dependencies) and
``job_counts`` (jobs per queue and state).

Rules it enforces: a job's state follows only from its events. It starts ``waiting`` while a
job it depends on has not completed, ``scheduled`` while its ``run_at`` lies ahead, else
``pending``; a claim makes it ``processing``; then ``completed``, ``failed`` (waiting out its
backoff until ``run_at``), ``dead`` or ``cancelled``. ``attempts`` is the number of runs
started (a released run is given back). A job claimed ahead of its worker's current one is
``processing`` with ``ahead`` set until its ``started``: held, not running, so it counts
against no queue's limit. ``job_counts`` always equals
``SELECT queue, state, count(*) FROM jobs GROUP BY queue, state`` (with a row for every
state of every queue ever used), so ``status`` and ``queues`` are O(1).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgspec

import projections
from queuectl import events as ev
from queuectl.states import CLAIMABLE, HOLDS_KEY, TIMED, State, any_of
from queuectl.store import Db, index
from queuectl.store.statements import Change

NAME = "jobs"
VERSION = 17
TABLES = {"jobs": ("id",), "job_deps": ("job_id", "depends_on"),
          "job_counts": ("queue", "state")}
DEFAULT_QUEUE = "default"

# Partial-index predicates are OR chains (``states.any_of``), and a query uses such an index
# only when it repeats the predicate word for word, so queries take these constants too.
CLAIMABLE_SQL = any_of(*CLAIMABLE)
TIMED_SQL = any_of(*TIMED)
# Named queues' ready jobs. The default queue's are in jobs_ready already: a second entry
# for each of them would slow every bulk enqueue (bench scenario bulk).
NAMED_READY_SQL = f"{CLAIMABLE_SQL} AND queue != '{DEFAULT_QUEUE}'"


# Where a query reads jobs through one of INDEXES (see store.index).
JOBS_READY = index("jobs_ready")
JOBS_READY_SINCE = index("jobs_ready_since")
JOBS_QUEUE_READY = index("jobs_queue_ready")
JOBS_RUN_AT = index("jobs_run_at")
JOBS_STATE = index("jobs_state")
JOBS_UNIQUE_KEY = index("jobs_unique_key")

# A job's dependencies as a JSON array of ids, sorted, as each store writes one (its
# ``kind``): the ``after`` of a job read from ``jobs``.
DEPENDENCIES = {
    # The primary key (job_id, depends_on) is walked in order: the ids come sorted.
    "sqlite": "(SELECT json_group_array(depends_on) FROM job_deps "
              "WHERE job_deps.job_id = jobs.id)",
    "postgres": "(SELECT coalesce(json_agg(depends_on ORDER BY depends_on), '[]')::text "
                "FROM job_deps WHERE job_deps.job_id = jobs.id)",
}


def ready_of(queue: str) -> tuple[str, str]:
    """The index mark and the condition (with one ``?``, the queue) that find one queue's
    ready jobs through the index that holds them."""
    if queue == DEFAULT_QUEUE:
        return JOBS_READY, f"queue = ? AND {CLAIMABLE_SQL}"
    return JOBS_QUEUE_READY, f"queue = ? AND {NAMED_READY_SQL}"
# Unfinished jobs hold their unique keys: the predicate of the jobs_unique_key index.
UNIQUE_HELD = f"unique_key IS NOT NULL AND ({any_of(*HOLDS_KEY)})"
# Jobs in the rarer states (list -s, rescue). Pending jobs are in jobs_ready and completed
# ones lie in seq order: leaving both out spares each run several index pages.
INDEXED_STATES = any_of(State.PROCESSING, State.FAILED, State.SCHEDULED, State.WAITING,
                        State.DEAD, State.CANCELLED)

DDL = (
    # seq (the enqueued event's) is the rowid: rows lie oldest first, so listing in
    # enqueue order needs no index and no sort.
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        command TEXT NOT NULL,
        queue TEXT NOT NULL DEFAULT 'default',
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL,
        backoff_base REAL NOT NULL,
        backoff_max REAL NOT NULL DEFAULT 0,
        backoff_jitter REAL NOT NULL DEFAULT 0,
        timeout REAL NOT NULL DEFAULT 0,
        run_at TEXT,
        worker_id TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        ahead INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        last_error TEXT,
        unique_key TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        cwd TEXT,
        env TEXT,
        limits TEXT
    )""",
    """CREATE TABLE job_deps (
        job_id TEXT NOT NULL,
        depends_on TEXT NOT NULL,
        PRIMARY KEY (job_id, depends_on)
    )""",
    """CREATE TABLE job_counts (
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (queue, state)
    )""",
    "INSERT INTO job_counts (queue, state, n) VALUES "
    + ", ".join(f"('{DEFAULT_QUEUE}', '{s}', 0)" for s in State),
)

# Indexes the readers and the queue's decisions use. The projector itself only needs the
# primary keys, so a replay builds INDEXES once at the end instead of row by row; the
# EARLY_INDEXES are created with the tables, for each holds a few of the jobs (those in a
# rarer state) and keeping it as rows go in costs a look at each row's state, where
# building it after would read the whole table again, once for each (bench scenario replay).
EARLY_INDEXES = (
    # The claim query walks this index in order: highest priority first, then oldest.
    f"CREATE INDEX jobs_ready ON jobs (priority DESC, seq) WHERE {CLAIMABLE_SQL}",
    # A worker given named queues (worker -q) walks each one's ready jobs in the same order.
    f"CREATE INDEX jobs_queue_ready ON jobs (queue, priority DESC, seq) WHERE {NAMED_READY_SQL}",
    # Since when each queue's oldest claimable job could run: its first entry, one seek a
    # queue (a metrics scrape, health), where min(run_at) over jobs_ready reads every one.
    f"CREATE INDEX jobs_ready_since ON jobs (queue, run_at) WHERE {CLAIMABLE_SQL}",
    # When the next scheduled job or retry is due (pending jobs are due already).
    f"CREATE INDEX jobs_run_at ON jobs (run_at) WHERE {TIMED_SQL}",
    f"CREATE INDEX jobs_state ON jobs (state, seq) WHERE {INDEXED_STATES}",
)
INDEXES = (
    # Sorted once at the end of a replay, not grown row by row in random id order.
    "CREATE UNIQUE INDEX jobs_id ON jobs (id)",
    # At most one unfinished job per unique key: the database holds to it too. Built at
    # the end: a replay writes a flush's new rows before the rows it read back, so a job
    # that took over a key would meet its old holder's row not yet written back.
    f"CREATE UNIQUE INDEX jobs_unique_key ON jobs (unique_key) WHERE {UNIQUE_HELD}",
    "CREATE INDEX job_deps_depends_on ON job_deps (depends_on)",
)

COLUMNS = ("seq", "id", "command", "queue", "state", "priority", "attempts", "max_retries",
           "backoff_base", "backoff_max", "backoff_jitter", "timeout", "run_at", "worker_id",
           "cancel_requested", "ahead", "exit_code", "last_error", "unique_key", "created_at",
           "updated_at", "cwd", "env", "limits")
# What an enqueued event sets; the other columns start at their defaults (_UNSET).
_ENQUEUED = ("seq", "id", "command", "queue", "state", "priority", "max_retries", "backoff_base",
             "backoff_max", "backoff_jitter", "timeout", "run_at", "unique_key", "created_at",
             "updated_at", "cwd", "env", "limits")
_UNSET = {"attempts": 0, "worker_id": None, "cancel_requested": 0, "ahead": 0,
          "exit_code": None, "last_error": None}
# The columns' DDL defaults (NULL: None), which a replay may leave out of an insert.
_DEFAULTS = {"queue": DEFAULT_QUEUE, "priority": 0, "attempts": 0, "backoff_max": 0.0,
             "backoff_jitter": 0.0, "timeout": 0.0, "cancel_requested": 0, "ahead": 0,
             "run_at": None, "worker_id": None, "exit_code": None, "last_error": None,
             "unique_key": None, "cwd": None, "env": None, "limits": None}
_COUNT_KEY = ("queue", "state")
_UNFINISHED_DEPS = """SELECT count(*) FROM job_deps d JOIN jobs j ON j.id = d.depends_on
    WHERE d.job_id = ? AND j.state != '""" + State.COMPLETED + "'"

# job_counts follows every change of state through a trigger, inside the database: cheaper
# than a statement from Python per move. A replay creates it (with INDEXES) after its last
# row, having counted in memory instead; inserts are counted by the enqueue handlers, per
# batch. Each store writes the same trigger in its own language.
TRIGGERS = {
    "sqlite": (
        # Two updates, each of one row found by its key: a single UPDATE of the rows of
        # either state (an OR, or IN) first gathers them aside, and cost several times more.
        """CREATE TRIGGER job_counts_move AFTER UPDATE OF state ON jobs
        WHEN old.state <> new.state BEGIN
            UPDATE job_counts SET n = n + 1 WHERE queue = new.queue AND state = new.state;
            UPDATE job_counts SET n = n - 1 WHERE queue = new.queue AND state = old.state;
        END""",
        # A job moved to another queue by ``edit`` takes its (old) state's count along;
        # should its state change in the same UPDATE, job_counts_move moves it within the
        # new queue, so the two add up whichever fires first.
        """CREATE TRIGGER job_counts_queue AFTER UPDATE OF queue ON jobs
        WHEN old.queue <> new.queue BEGIN
            UPDATE job_counts SET n = n + CASE queue WHEN new.queue THEN 1 ELSE -1 END
            WHERE state = old.state AND (queue = new.queue OR queue = old.queue);
        END""",
        # Jobs leave the table only when pruned.
        """CREATE TRIGGER job_counts_gone AFTER DELETE ON jobs BEGIN
            UPDATE job_counts SET n = n - 1 WHERE queue = old.queue AND state = old.state;
        END""",
    ),
    # Once a statement, from its transition tables: a batch's claims are one UPDATE of
    # many jobs, and their counts move in one step (a row trigger a job was much of the
    # server's time in the batched ledger cycle). A trigger with transition tables may
    # not name columns, so it runs after every UPDATE of jobs and moves what changed.
    "postgres": (
        """CREATE OR REPLACE FUNCTION job_counts_move() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE job_counts SET n = job_counts.n + moved.delta FROM (
                SELECT queue, state, sum(delta) AS delta FROM (
                    SELECT queue, state, 1 AS delta FROM moved_to
                    UNION ALL SELECT queue, state, -1 FROM moved_from) AS each
                GROUP BY queue, state HAVING sum(delta) <> 0) AS moved
            WHERE job_counts.queue = moved.queue AND job_counts.state = moved.state;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER job_counts_move AFTER UPDATE ON jobs
        REFERENCING OLD TABLE AS moved_from NEW TABLE AS moved_to
        FOR EACH STATEMENT EXECUTE FUNCTION job_counts_move()""",
        """CREATE OR REPLACE FUNCTION job_counts_gone() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE job_counts SET n = job_counts.n - gone.n FROM (
                SELECT queue, state, count(*) AS n FROM pruned GROUP BY queue, state) AS gone
            WHERE job_counts.queue = gone.queue AND job_counts.state = gone.state;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER job_counts_gone AFTER DELETE ON jobs REFERENCING OLD TABLE AS pruned
        FOR EACH STATEMENT EXECUTE FUNCTION job_counts_gone()""",
    ),
}


def _values(seq: int, at: str, e: ev.Enqueued, blocked: bool = False) -> tuple[Any, ...]:
    """The new job's row: its ``_ENQUEUED`` columns, in that order."""
    # Written out (no calls of _ready_state or env_text): a bulk enqueue makes one a job.
    if e.run_at and e.run_at > at:
        run_at, state = e.run_at, _SCHEDULED
    else:
        run_at, state = at, _PENDING
    return (seq, e.job_id, e.command, e.queue, _WAITING if blocked else state, e.priority,
            e.max_retries, e.backoff_base, e.backoff_max, e.backoff_jitter, e.timeout, run_at,
            e.unique_key, at, at, e.cwd, _encode(e.env).decode() if e.env else None,
            limits_text(e.memory, e.cpu_time, e.open_files)
            if e.memory or e.cpu_time or e.open_files else None)


_PENDING, _SCHEDULED, _WAITING = State.PENDING, State.SCHEDULED, State.WAITING


_encode = msgspec.json.encode
LIMITS = ("memory", "cpu_time", "open_files")  # a run's resource limits (queuectl.resources)


def limits_text(memory: int, cpu_time: int, open_files: int) -> str | None:
    """A job's resource limits as its ``limits`` column holds them: a JSON object of those
    set (``{"memory":67108864}``), NULL for none, so that a job without any costs its
    claims nothing."""
    if not (memory or cpu_time or open_files):
        return None
    given = {"memory": memory, "cpu_time": cpu_time, "open_files": open_files}
    return _encode({name: value for name, value in given.items() if value}).decode()


def env_text(env: dict[str, str] | None) -> str | None:
    """A job's variables as its ``env`` column holds them: a JSON object, NULL for none."""
    return _encode(env).decode() if env else None


def _row(seq: int, at: str, e: ev.Enqueued, blocked: bool) -> dict[str, Any]:
    """The new job's whole row as a replay holds it: ``_values`` by column, and ``_UNSET``.
    Written out, as a copy of ``_BLANK`` with the event's values set in it: copying a dict
    and setting 18 of its keys costs a third of building one of 24 (a replay makes one a
    job)."""
    if e.run_at and e.run_at > at:
        run_at, state = e.run_at, _SCHEDULED
    else:
        run_at, state = at, _PENDING
    row = _BLANK.copy()
    row["seq"] = seq
    row["id"] = e.job_id
    row["command"] = e.command
    row["queue"] = e.queue
    row["state"] = _WAITING if blocked else state
    row["priority"] = e.priority
    row["max_retries"] = e.max_retries
    row["backoff_base"] = e.backoff_base
    row["backoff_max"] = e.backoff_max
    row["backoff_jitter"] = e.backoff_jitter
    row["timeout"] = e.timeout
    row["run_at"] = run_at
    row["unique_key"] = e.unique_key
    row["created_at"] = row["updated_at"] = at
    row["cwd"] = e.cwd
    row["env"] = _encode(e.env).decode() if e.env else None
    row["limits"] = (limits_text(e.memory, e.cpu_time, e.open_files)
                     if e.memory or e.cpu_time or e.open_files else None)
    return row


_BLANK: dict[str, Any] = {**dict.fromkeys(COLUMNS), **_UNSET}  # every column, in order


def _ready_state(run_at: str, at: str) -> State:
    return State.SCHEDULED if run_at > at else State.PENDING


# -- how each event changes its job's row ------------------------------------------------
# One function per event type: how the event changes its job's row, from the event, its
# time and the row's current values (``row``, read only where a rule needs it). Most give a
# change declared once (``Changed``: a ``statements.Change`` and its values, the job's id
# last); one whose columns depend on the event (an edit) gives them as a dict. The live
# path makes either one UPDATE; a replay applies it to rows held in memory (``Replay``).
# One rule, two writers.

Row = Mapping[str, Any]
Changed = tuple[Change, tuple[Any, ...]]


class _Unknown(LookupError):
    """An event for a job the table does not hold (raised by the store if no row
    matched), its message written only when asked for."""

    def __str__(self) -> str:
        return f"event for unknown job {self.args[0]!r}"


def _job(fixed: Mapping[str, Any], *given: str) -> Change:
    """A change of one job's row: ``fixed`` values, the ``given`` columns', and the time of
    the event in ``updated_at``."""
    return Change("jobs", "id", fixed, (*given, "updated_at"), missing=_Unknown)


_CLAIM = _job({"state": State.PROCESSING, "run_at": None}, "attempts", "worker_id", "ahead")


def _claimed(e: ev.Claimed, at: str, row: Row) -> Changed:
    return _CLAIM, (e.attempt, e.worker_id, 1 if e.ahead else 0, at, e.job_id)


_START = _job({"ahead": 0})


def _started(e: ev.Started, at: str, row: Row) -> Changed:
    return _START, (at, e.job_id)


# Every event that ends a run or gives a held job back clears ``ahead`` with ``worker_id``.
_COMPLETE = _job({"state": State.COMPLETED, "worker_id": None, "exit_code": 0,
                  "last_error": None, "cancel_requested": 0, "ahead": 0})


def _completed(e: ev.Completed, at: str, row: Row) -> Changed:
    return _COMPLETE, (at, e.job_id)


# The state moves with the scheduled-retry or dead event appended with a failed run's.
_FAIL = _job({"worker_id": None, "ahead": 0}, "exit_code", "last_error")
_STOP = _job({"worker_id": None, "exit_code": None, "ahead": 0}, "last_error")


def _failed(e: ev.Failed, at: str, row: Row) -> Changed:
    return _FAIL, (e.exit_code, e.error, at, e.job_id)


def _timed_out(e: ev.TimedOut, at: str, row: Row) -> Changed:
    return _STOP, (f"timed out after {e.timeout:g}s", at, e.job_id)


def _lease_expired(e: ev.LeaseExpired, at: str, row: Row) -> Changed:
    return _STOP, (f"lease expired: worker {e.worker_id} stopped heartbeating", at, e.job_id)


def _fenced(e: ev.Fenced, at: str, row: Row) -> Changed | None:
    # Written late, after a rescuer took the job back: the rescuer's events decided.
    if e.rescued:
        return None
    return _STOP, (f"fenced: worker {e.worker_id} could not renew its lease for "
                   f"{e.silence:g}s and stopped the run ({e.reason})", at, e.job_id)


_RELEASE = _job({"state": State.PENDING, "worker_id": None, "ahead": 0}, "attempts", "run_at")


def _released(e: ev.Released, at: str, row: Row) -> Changed:
    return _RELEASE, (e.attempt - 1, at, at, e.job_id)


_RETRY = _job({"state": State.FAILED, "cancel_requested": 0}, "run_at")


def _scheduled_retry(e: ev.ScheduledRetry, at: str, row: Row) -> Changed:
    return _RETRY, (e.run_at, at, e.job_id)


_DIE = _job({"state": State.DEAD, "run_at": None, "cancel_requested": 0})


def _dead(e: ev.Dead, at: str, row: Row) -> Changed:
    return _DIE, (at, e.job_id)


# A fresh series of attempts, at once: a restarted job does not wait for its dependencies
# again.
_AGAIN = _job({"state": State.PENDING, "attempts": 0}, "max_retries", "run_at")


def _requeued(e: ev.Requeued, at: str, row: Row) -> Changed:
    return _AGAIN, (e.max_retries, at, at, e.job_id)


def _restarted(e: ev.Restarted, at: str, row: Row) -> Changed:
    return _AGAIN, (e.max_retries, at, at, e.job_id)


_UNBLOCK = _job({}, "state", "run_at")


def _unblocked(e: ev.Unblocked, at: str, row: Row) -> Changed:
    run_at = max(row["run_at"] or at, at)
    return _UNBLOCK, (_ready_state(run_at, at), run_at, at, e.job_id)


_ASK_CANCEL = _job({"cancel_requested": 1})


def _cancel_requested(e: ev.CancelRequested, at: str, row: Row) -> Changed:
    return _ASK_CANCEL, (at, e.job_id)


def _edited(e: ev.Edited, at: str, row: Row) -> dict[str, Any]:
    changes = {name: value for name in _EDITABLE if (value := getattr(e, name)) is not None}
    if e.env:
        changes["env"] = env_text({**_decode_env(row["env"] or "{}"), **e.env})
    if e.memory is not None or e.cpu_time is not None or e.open_files is not None:
        now = _decode_limits(row["limits"] or "{}")
        new = [now.get(name, 0) if (value := getattr(e, name)) is None else value
               for name in LIMITS]
        changes["limits"] = limits_text(*new)
    if e.run_at is not None:  # as when enqueued: a time gone by is now
        changes["run_at"] = run_at = max(e.run_at, at)
        if row["state"] != State.WAITING:
            changes["state"] = _ready_state(run_at, at)
    return changes


_EDITABLE = ("command", "priority", "queue", "max_retries", "timeout", "cwd")
_decode_env = msgspec.json.Decoder(dict[str, str]).decode
_decode_limits = msgspec.json.Decoder(dict[str, int]).decode


_CANCEL = _job({"state": State.CANCELLED, "worker_id": None, "run_at": None,
                "cancel_requested": 0, "ahead": 0}, "last_error")


def _cancelled(e: ev.Cancelled, at: str, row: Row) -> Changed:
    return _CANCEL, (e.reason, at, e.job_id)


# A rule that returns None leaves the row as it is (not even ``updated_at`` moves).
_CHANGES: dict[type, Callable[..., Changed | Mapping[str, Any] | None]] = {
    ev.Claimed: _claimed,
    ev.Started: _started,
    ev.Completed: _completed,
    ev.Failed: _failed,
    ev.TimedOut: _timed_out,
    ev.LeaseExpired: _lease_expired,
    ev.Fenced: _fenced,
    ev.Released: _released,
    ev.ScheduledRetry: _scheduled_retry,
    ev.Dead: _dead,
    ev.Requeued: _requeued,
    ev.Restarted: _restarted,
    ev.Unblocked: _unblocked,
    ev.CancelRequested: _cancel_requested,
    ev.Cancelled: _cancelled,
    ev.Edited: _edited,
}

HANDLES = frozenset({ev.Enqueued, ev.Pruned, *_CHANGES})  # event types this projection reads


# -- the live path: one statement per event ----------------------------------------------


def _enqueued(tx: Db, seq: int, at: str, e: ev.Enqueued) -> None:
    for dep in e.after:
        tx.insert("job_deps", {"job_id": e.job_id, "depends_on": dep})
    blocked = bool(e.after) and tx.execute(_UNFINISHED_DEPS, (e.job_id,)).fetchone()[0] > 0
    row = _values(seq, at, e, blocked)
    tx.insert("jobs", dict(zip(_ENQUEUED, row, strict=True)))
    _count(tx, e.queue, row[4], 1)


def _count(tx: Db, queue: str, state: str, n: int) -> None:
    if queue != DEFAULT_QUEUE:
        # A queue's first job gives it a row for every state (the default queue has them
        # from the start), so that the counts' triggers only ever update rows.
        for each in State:
            tx.insert("job_counts", {"queue": queue, "state": each.value, "n": 0},
                      key=_COUNT_KEY, clash="ignore")
    tx.insert("job_counts", {"queue": queue, "state": state, "n": n}, key=_COUNT_KEY,
              clash="add")


def _enqueued_many(tx: Db, batch: list[tuple[int, str, ev.Enqueued]]) -> None:
    """Many plain enqueues (no dependencies) at once: one executemany, one count per state."""
    rows = [_values(seq, at, e) for seq, at, e in batch]
    tx.insert_many("jobs", _ENQUEUED, rows)
    for (queue, state), n in Counter((row[3], row[4]) for row in rows).items():
        _count(tx, queue, state, n)


class _Current(Mapping[str, Any]):
    """A job's row in the table, read column by column only if a rule asks."""

    def __init__(self, tx: Db, job_id: str) -> None:
        self.tx, self.job_id = tx, job_id

    def __getitem__(self, column: str) -> Any:
        found = self.tx.execute(f"SELECT {column} FROM jobs WHERE id = ?", (self.job_id,))
        row = found.fetchone()
        if row is None:
            raise _Unknown(self.job_id)
        return row[0]

    def __iter__(self) -> Iterator[str]:
        return iter(COLUMNS)

    def __len__(self) -> int:
        return len(COLUMNS)


def _pruned(tx: Db, e: ev.Pruned) -> None:
    """Pruned jobs leave the tables (their counts with them, by trigger); their queues'
    count rows stay."""
    tx.delete("job_deps", "job_id", e.jobs)
    tx.delete("jobs", "id", e.jobs)


def apply(tx: Db, seq: int, at: str, e: Any) -> None:  # e: of HANDLES
    if type(e) is ev.Enqueued:
        _enqueued(tx, seq, at, e)
        return
    if type(e) is ev.Pruned:
        _pruned(tx, e)
        return
    job_id = e.job_id
    if type(e) is ev.Edited and e.queue is not None:
        _count(tx, e.queue, State.PENDING, 0)  # the queue's count rows, for the triggers
    rule = _CHANGES[type(e)]
    changes = rule(e, at, _Current(tx, job_id) if rule in _READS_ROW else _NO_ROW)
    if changes is None:
        return
    if isinstance(changes, tuple):  # a Change declared once, and its values
        tx.change(*changes)
        return
    tx.update("jobs", {"id": job_id}, {**changes, "updated_at": at}, missing=_Unknown(job_id))


# The rules that read the job's current row; the others are given none.
_READS_ROW = frozenset({_unblocked, _edited})
_NO_ROW: Row = {}


def live(kind: type) -> Callable[[Db, int, str, Any], None]:
    """What ``apply`` does with an event of ``kind``: for a rule that gives a declared
    change and reads no row, that change written, with nothing to look up first."""
    rule = _CHANGES.get(kind)
    if rule is None or rule in _READS_ROW:
        return apply

    def changed(tx: Db, seq: int, at: str, e: Any) -> None:
        changes = rule(e, at, _NO_ROW)
        if changes is not None:
            tx.change(*changes)  # type: ignore[misc]

    return changed


MANY_FOR = frozenset({ev.Enqueued})  # apply_many is for a bulk enqueue's runs of them


def apply_many(tx: Db, batch: list[tuple[int, str, ev.Event]]) -> None:
    """``apply`` over events in ledger order, with runs of plain enqueues inserted together
    (bulk enqueue). The rows are exactly those ``apply`` would write."""
    plain: list[tuple[int, str, ev.Enqueued]] = []
    for seq, at, event in batch:
        if type(event) is ev.Enqueued and not event.after:
            plain.append((seq, at, event))
            continue
        if plain:
            _enqueued_many(tx, plain)
            plain = []
        apply(tx, seq, at, event)
    if plain:
        _enqueued_many(tx, plain)


# -- the replay path: rows in memory, written in bulk ------------------------------------


class Replay:
    """``apply`` for a replay into empty tables: the same rules on rows held in memory
    (``projections.Rows``); counts and triggers come after the last event."""

    def __init__(self, tx: Db, find: projections.Find) -> None:
        self.tx = tx
        self.counts: Counter[tuple[str, str]] = Counter()  # jobs per (queue, state) written
        self.queues: set[str] = set()  # queues whose every job may have been pruned
        # A job's row is the one its enqueued event made: jobs.seq is that event's seq.
        self.rows = projections.Rows(tx, "jobs", COLUMNS, "id", rowid="seq",
                                     locate=lambda job_id: find(job_id, "enqueued"),
                                     defaults=_DEFAULTS)

    def handler(self, kind: type) -> Callable[[int, str, Any], None]:
        """What to call with ``(seq, at, event)`` for events of this type."""
        if kind is ev.Pruned:
            return self._pruned
        if kind is ev.Enqueued:
            return self._enqueued
        rule = _CHANGES[kind]
        # held: the usual case, in one call; then a row read back earlier, then the table
        held, again, get = self.rows.new.get, self.rows.read.get, self.rows.get

        def changed(seq: int, at: str, e: Any) -> None:
            row = held(e.job_id) or again(e.job_id) or get(e.job_id)
            if row is None:
                raise _Unknown(e.job_id)
            changes = rule(e, at, row)
            if isinstance(changes, tuple):
                changes[0].into(row, changes[1])
            elif changes is not None:
                row.update(changes)
                row["updated_at"] = at

        return changed

    def _pruned(self, seq: int, at: str, e: ev.Pruned) -> None:
        # The pruned jobs' events left the ledger with them: a replay never made their rows.
        self.queues.update(e.queues)

    def _enqueued(self, seq: int, at: str, e: ev.Enqueued) -> None:
        blocked = False
        if e.after:
            self.tx.insert_many("job_deps", ("job_id", "depends_on"),
                                [(e.job_id, dep) for dep in e.after])
            for dep in e.after:  # as _UNFINISHED_DEPS: an unknown dependency holds nothing
                row = self.rows.get(dep)
                blocked = blocked or (row is not None and row["state"] != State.COMPLETED)
        self.rows.add(_row(seq, at, e, blocked))

    def flush(self) -> None:
        rows = self.rows
        self.counts.update(map(_QUEUE_STATE, rows.new.values()))
        self.counts.update(map(_QUEUE_STATE, rows.read.values()))
        self.counts.subtract(map(_QUEUE_STATE, rows.before))
        rows.flush()

    def close(self) -> None:
        """Write what is held, then ``job_counts``, counted once instead of per event."""
        self.flush()
        queues = {DEFAULT_QUEUE} | {queue for queue, _ in self.counts} | self.queues
        self.tx.insert_many("job_counts", ("queue", "state", "n"),
                            [(queue, state.value, self.counts[queue, state.value])
                             for queue in sorted(queues) for state in State],
                            key=_COUNT_KEY, clash="set")


_QUEUE_STATE = operator.itemgetter("queue", "state")
