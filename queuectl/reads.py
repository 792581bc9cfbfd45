"""Reads of the projections, for the CLI and the tools: jobs, counts, workers, a job's
history and runs, and the figures of ``stats``, as the Structs of ``records``. Nothing here
writes."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any, TypeVar

import msgspec

from projections.jobs import (
    CLAIMABLE_SQL,
    DEPENDENCIES,
    INDEXED_STATES,
    JOBS_READY,
    JOBS_STATE,
    LIMITS,
    ready_of,
)
from projections.runs import PRUNED, RUNS_FINISHED
from queuectl import clock, limits, settings
from queuectl import events as ev
from queuectl.errors import InvalidInput, NotFound
from queuectl.ledger import decode_row, read_events
from queuectl.records import (
    FailedRun,
    Job,
    ListedJob,
    Percentiles,
    QueueRow,
    Run,
    RunTimes,
    Stats,
    Status,
    Worker,
    WorkerAtWork,
)
from queuectl.states import STATES, State, WorkerState
from queuectl.store import Db

EVERY = 2**62  # a LIMIT that every store reads as "no limit"
INDEXED = (State.PROCESSING, State.FAILED, State.SCHEDULED, State.WAITING, State.DEAD,
           State.CANCELLED)  # the states jobs_state holds

# What a job read gives, in the order of ``Job``'s fields, by store kind: its dependencies
# are a JSON array of ids, which each store writes its own way (projections.jobs.DEPENDENCIES).
JOB_FIELDS = {kind: "id, command, queue, state, priority, attempts, max_retries, backoff_base, "
              f"backoff_max, backoff_jitter, timeout, run_at, {deps} AS after, unique_key, "
              "exit_code, last_error, created_at, updated_at, worker_id, cancel_requested, cwd, "
              "env, limits"
              for kind, deps in DEPENDENCIES.items()}
_decode_ids = msgspec.json.Decoder(list[str]).decode
_decode_env = msgspec.json.Decoder(dict[str, str]).decode
_decode_limits = msgspec.json.Decoder(dict[str, int]).decode


def _jobs(rows: Iterable[Any]) -> list[Job]:
    """Jobs from rows of ``JOB_FIELDS``: ``after`` (the 13th), ``env`` and ``limits`` (the
    last two) decoded from their JSON, and ``cancel_requested`` a bool whichever way the
    store holds it."""
    return [Job(*(*row[:12], _decode_ids(row[12]), *row[13:19], bool(row[19]), row[20],
                  _decode_env(row[21]) if row[21] else {}, *_limits(row[22])))
            for row in rows]


def _limits(text: str | None) -> tuple[int | None, ...]:
    """A job's resource limits from its ``limits`` column, None for each not set."""
    given = _decode_limits(text) if text else {}
    return tuple(given.get(name) for name in LIMITS)


def printable(text: str) -> str:
    """Text as one line of a message: control characters and lone surrogates as escapes
    (``\\xe9`` for one that stands for a byte that is not UTF-8, as Python reads argv)."""
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    if "\udc80" <= c <= "\udcff":
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c.encode("unicode_escape").decode("ascii")


def check_job_id(job_id: object) -> str:
    """A job id as every store takes it. Text that no store can hold (a NUL, a lone
    surrogate) names no job: NotFound, before any store sees it."""
    if not isinstance(job_id, str):
        raise InvalidInput(f"job id: expected text, got {type(job_id).__name__}")
    if "\0" in job_id or not _is_utf8(job_id):
        raise NotFound(f"Job '{printable(job_id)}' not found")
    return job_id


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def get_job(conn: Db, job_id: str) -> Job:
    check_job_id(job_id)
    sql = conn.dialect.sql(f"SELECT {JOB_FIELDS[conn.kind]} FROM jobs WHERE id = ?")
    rows = _jobs(conn.execute(sql, (job_id,)))
    if not rows:
        raise _not_found(conn, job_id)
    return rows[0]


def list_jobs(
    conn: Db, state: str | None = None, limit: int | None = None, queue: str | None = None,
    after: str | None = None,
) -> list[Job]:
    """Jobs oldest first, optionally of one state and one queue; pending jobs in the order
    they will run (highest priority first, then oldest). ``after``: only the jobs after
    that one in this order (the next page, by keyset: the same cost at any depth)."""
    params: tuple[Any, ...] = (state,) if state else ()
    if state == State.PENDING and queue:
        index, ready = ready_of(queue)
        where, order = f"{index} WHERE state = ? AND {ready}", "priority DESC, seq"
        params, queue = (state, queue), None  # the queue is in the condition already
    elif state == State.PENDING:
        where, order = f"{JOBS_READY} WHERE state = ? AND {CLAIMABLE_SQL}", "priority DESC, seq"
    elif state in INDEXED:
        where, order = f"{JOBS_STATE} WHERE state = ? AND {INDEXED_STATES}", "seq"
    else:  # all jobs, or completed ones: rows are stored oldest first
        where, order = ("WHERE state = ?" if state else "WHERE 1 = 1"), "seq"
    if queue:
        where, params = f"{where} AND queue = ?", (*params, queue)
    if after is not None:
        seq, priority = _position(conn, after)
        if order == "seq":
            where, params = f"{where} AND seq > ?", (*params, seq)
        else:
            where = f"{where} AND (priority < ? OR (priority = ? AND seq > ?))"
            params = (*params, priority, priority, seq)
    sql = conn.dialect.sql(f"SELECT {JOB_FIELDS[conn.kind]} FROM jobs {where} ORDER BY {order} LIMIT ?")
    return _jobs(conn.execute(sql, (*params, EVERY if limit is None else limit)))


def _position(conn: Db, job_id: str) -> tuple[int, int]:
    """Where a job stands in a list: its seq and priority (``list --after``)."""
    try:
        check_job_id(job_id)
    except NotFound:
        row = None
    else:
        row = conn.execute("SELECT seq, priority FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise InvalidInput(f"after: no job '{printable(job_id)}'")
    return int(row[0]), int(row[1])


def counts(conn: Db) -> dict[str, int]:
    """Jobs per state, every state present (from the ``job_counts`` projection: O(1))."""
    found = dict(conn.execute(
        "SELECT state, sum(n) FROM job_counts GROUP BY state").fetchall())
    return {state: int(found.get(state, 0)) for state in STATES}


def queue_counts(conn: Db) -> dict[str, dict[str, int]]:
    """Jobs per state of each queue that holds or held a job, by name (the default queue
    always); from ``job_counts``, O(queues)."""
    found: dict[str, dict[str, int]] = {}
    for queue, state, n in conn.execute(
            "SELECT queue, state, n FROM job_counts ORDER BY queue").fetchall():
        found.setdefault(queue, {s: 0 for s in STATES})[state] = int(n)
    return found


def queues(conn: Db) -> list[QueueRow]:
    """Every queue: paused or not, its limit (0: none), its rate (None: none), its jobs per
    state and how long its oldest pending job has waited (seconds, None when nothing is
    pending)."""
    now = conn.now()

    def oldest(name: str) -> str:
        index, ready = ready_of(name)
        return conn.dialect.sql(f"SELECT min(run_at) FROM jobs {index} WHERE {ready} "
                                f"AND state = '{State.PENDING}'")

    rules = {name: (bool(paused), int(limit), limits.rate_of(int(n), int(period)))
             for name, paused, limit, n, period in conn.execute(
                 "SELECT name, paused, job_limit, rate, period FROM queues").fetchall()}
    counted = queue_counts(conn)
    for name in rules.keys() - counted.keys():  # paused or limited before its first job
        counted[name] = {s: 0 for s in STATES}
    found = []
    for name, per_state in sorted(counted.items()):
        paused, limit, rate = rules.get(name, (False, 0, limits.NO_RATE))
        wait = None
        if per_state[State.PENDING]:
            since = conn.execute(oldest(name), (name,)).fetchone()[0]
            if since is not None:
                wait = round(max(0.0, clock.seconds_between(since, now)), 3)
        found.append(QueueRow(name, paused, limit, str(rate) if rate.n else None, per_state,
                              sum(per_state.values()), wait))
    return found


def workers(conn: Db, states: Iterable[str] = ("active",)) -> list[Worker]:
    states = tuple(states)
    marks = ",".join("?" * len(states))
    return [Worker(*row) for row in conn.execute(
        f"""SELECT id, state, pid, host, started_at, last_heartbeat, current_job, jobs_done
        FROM workers WHERE state IN ({marks}) ORDER BY started_at, id""", states)]


def worker_counts(conn: Db) -> dict[str, int]:
    """Workers per projected state (active, stopped, gone)."""
    return dict(conn.execute("SELECT state, count(*) FROM workers GROUP BY state").fetchall())


def status(conn: Db) -> Status:
    """Jobs per state and per queue, the running workers (an active one whose heartbeat is
    older than the lease timeout shows as ``silent``) and how many ended: ``status``."""
    running = running_workers(conn)
    return Status(counts(conn), queue_counts(conn), running, worker_tally(conn, running))


def running_workers(conn: Db) -> list[Worker]:
    """The active workers, those whose heartbeat is older than the lease timeout marked
    ``silent``."""
    return _silent_marked(conn, workers(conn, (WorkerState.ACTIVE,)))


_W = TypeVar("_W", bound=Worker)


def _silent_marked(conn: Db, running: list[_W]) -> list[_W]:
    """``running``, those whose heartbeat is older than the lease timeout as ``silent``."""
    lease = float(settings.load(conn)["lease-timeout"])
    stale_before = clock.after(conn.now(), -lease)
    return [msgspec.structs.replace(w, state="silent") if w.last_heartbeat < stale_before else w
            for w in running]


def worker_tally(conn: Db, running: Iterable[Worker]) -> dict[str, int]:
    """Workers per state: the running ones (``running_workers``) active or silent, and how
    many stopped or were declared gone."""
    ended = worker_counts(conn)
    tally = {"active": 0, "silent": 0, "stopped": ended.get(WorkerState.STOPPED, 0),
             "gone": ended.get(WorkerState.GONE, 0)}
    for worker in running:
        tally[worker.state] += 1
    return tally


def check_state(state: str) -> State:
    """A job state by name, or InvalidInput listing the states."""
    try:
        return State(state)
    except ValueError:
        raise InvalidInput(f"unknown state {state!r} (known: "
                           f"{', '.join(s.value for s in STATES)})") from None


def history(conn: Db, job_id: str, archive: bool = False) -> list[tuple[int, str, ev.Event]]:
    """Every event of one job, in order, with those pruned to the archive if ``archive``;
    NotFound when there are none."""
    check_job_id(job_id)
    rows = list(read_events(conn, "WHERE job_id = ?", (job_id,)))
    if archive:
        seen = {seq for seq, _, _ in rows}  # a prune cut short may leave rows in both
        rows += [(seq, at, decode_row(seq, type_, body))
                 for seq, at, type_, body in conn.archived(job_id) if seq not in seen]
        rows.sort(key=lambda row: row[0])
    if not rows:
        raise _not_found(conn, job_id, archive)
    return rows


def _not_found(conn: Db, job_id: str, archived: bool = False) -> NotFound:
    """NotFound for a job id, saying so if the job was pruned to the archive."""
    if not archived and conn.archived(job_id):
        return NotFound(f"Job '{job_id}' was pruned: its events are in the archive "
                        f"(queuectl history {job_id} --archive)")
    return NotFound(f"Job '{job_id}' not found")


def runs_of(conn: Db, job_id: str) -> list[Run]:
    """Each run of a job, from its events: when, by whom, how it ended, and its output."""
    runs: list[Run] = []
    for _, at, event in history(conn, job_id):
        match event:
            case ev.Claimed(attempt=a, worker_id=w):
                runs.append(Run(len(runs) + 1, a, w, at, None, "running", None, None, "", False,
                                None))
            case ev.Completed() | ev.Failed() | ev.TimedOut() | ev.Cancelled() | \
                    ev.Released() | ev.LeaseExpired() | ev.Fenced(rescued=False) \
                    if runs and runs[-1].finished_at is None:
                runs[-1] = _ended(runs[-1], at, event)
    return runs


def _ended(run: Run, at: str, event: ev.Event) -> Run:
    """``run`` as the event that ended it says."""
    error = getattr(event, "error", None) or getattr(event, "reason", None)
    if isinstance(event, ev.TimedOut):
        error = f"killed after its {event.timeout:g}s timeout"
    elif isinstance(event, ev.LeaseExpired):
        error = f"worker {event.worker_id} stopped heartbeating"
    elif isinstance(event, ev.Fenced):
        error = f"stopped by its worker, which could not renew its lease: {event.reason}"
    return msgspec.structs.replace(
        run, finished_at=at, outcome=event.type,
        exit_code=getattr(event, "exit_code", 0 if event.type == "completed" else None),
        duration=getattr(event, "duration", None), output=getattr(event, "output", ""),
        truncated=getattr(event, "truncated", False), error=error)


def parse_since(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    unit = units.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
        return limits.check("since", value)
    except (ValueError, InvalidInput):
        raise InvalidInput(
            f"--since {text!r}: expected a duration like 90s, 15m, 2h or 1d, from 1ms to "
            "100 years") from None


def _percentile(conn: Db, column: str, where: str, params: tuple[Any, ...],
                n: int, p: float) -> float | None:
    """Nearest-rank percentile, walked along the column's index (no sort in Python)."""
    if n == 0:
        return None
    rank = max(0, -(-int(p * 1000) * n // 1000) - 1)  # ceil(p * n) - 1
    row = conn.execute(
        f"SELECT {column} FROM runs WHERE {column} IS NOT NULL {where} "
        f"ORDER BY {column} LIMIT 1 OFFSET ?",
        (*params, rank),
    ).fetchone()
    return row[0] if row else None


def stats(conn: Db, since_seconds: float | None = None) -> Stats:
    """Completed / failed / dead, success rate, throughput, run time and queue wait
    percentiles, from the ``runs`` projection (all time, or the last ``since_seconds``)."""
    now = conn.now()
    with conn.snapshot():  # one snapshot for every figure
        if since_seconds is None:
            found = dict(conn.execute(
                "SELECT outcome, sum(n) FROM run_counts GROUP BY outcome").fetchall())
            first = conn.execute("SELECT claimed_at FROM runs ORDER BY seq LIMIT 1").fetchone()
            last = conn.execute(
                "SELECT max(finished_at) FROM runs WHERE finished_at IS NOT NULL").fetchone()
            span = (first[0] if first else None, last[0])
            fin_where, fin_params = "", ()  # type: tuple[str, tuple[str, ...]]
            wait_where, wait_params = "", ()  # type: tuple[str, tuple[str, ...]]
        else:
            since = clock.after(now, -since_seconds)
            found = dict(conn.execute(
                "SELECT outcome, count(*) FROM runs WHERE finished_at >= ? GROUP BY outcome",
                (since,)).fetchall())
            found["dead"] = conn.execute(
                "SELECT count(*) FROM runs WHERE dead = 1 AND finished_at >= ?", (since,)
            ).fetchone()[0]
            # Within a window, queue wait is taken over the runs that finished in it.
            found["claimed"] = sum(found.values()) - found["dead"]
            span = (since, now)
            fin_where, fin_params = "AND finished_at >= ?", (since,)
            wait_where, wait_params = fin_where, fin_params
        # Percentiles and throughput are taken over the runs the table holds: not those
        # that were pruned (queuectl prune), which only the all-time counts keep.
        held = {k: int(n) - int(found.get(PRUNED + k, 0)) for k, n in found.items()}
        completed = int(found.get("completed", 0))
        failed = sum(int(found.get(k, 0)) for k in FAILED_RUNS)
        timed = sum(held.get(k, 0) for k in ("completed", "failed", "timed-out"))
        claims = held.get("claimed", 0)
        minutes = (clock.seconds_between(span[0], span[1]) / 60) if span[0] and span[1] else 0
        # Within a window, walk the window's runs: the planner would rather walk runs_duration
        # down from its top, which passes every run when the window holds none.
        within = RUNS_FINISHED if fin_where else ""
        max_run = conn.execute(conn.dialect.sql(
            f"SELECT max(duration) FROM runs {within} WHERE duration IS NOT NULL {fin_where}"),
            fin_params,
        ).fetchone()[0]
        return Stats(
            since=None if since_seconds is None else span[0],
            completed=completed,
            failed=failed,
            dead=int(found.get("dead", 0)),
            success_rate=round(completed / (completed + failed), 4)
            if completed + failed else None,
            throughput_per_min=round(held.get("completed", 0) / minutes, 2)
            if minutes > 0 else None,
            # What the throughput is taken over: the window, or all time's span of runs
            # (the first claim to the last end), which may be minutes of a week.
            throughput_over_seconds=round(minutes * 60, 3) if minutes > 0 else None,
            run_time=RunTimes(
                p50=_percentile(conn, "duration", fin_where, fin_params, timed, 0.50),
                p95=_percentile(conn, "duration", fin_where, fin_params, timed, 0.95),
                max=max_run,
            ),
            queue_wait=Percentiles(
                p50=_percentile(conn, "wait", wait_where, wait_params, claims, 0.50),
                p95=_percentile(conn, "wait", wait_where, wait_params, claims, 0.95),
            ),
        )


# -- the dashboard's pages ----------------------------------------------------------------

PAGE = 50  # jobs a page of find_jobs shows
SCAN = 50_000  # jobs a filtered page looks through at most before it offers to go on
ACTIVITY_RUNS = 10_000  # runs the activity charts read at most (the newest)
LIST_FIELDS = ("seq, id, command, queue, state, priority, attempts, max_retries, run_at, "
               "last_error, created_at, updated_at")  # ListedJob's fields


def head(conn: Db) -> int:
    """The seq of the ledger's last event. Every change appends an event, so whatever was
    read at one head is still current while the head stays: the dashboard's ETag."""
    return conn.next_seq() - 1


def find_jobs(conn: Db, state: str | None = None, queue: str | None = None,
              text: str | None = None, cursor: str | None = None, limit: int = PAGE
              ) -> tuple[list[ListedJob], str | None, int]:
    """One page of jobs, newest first (pending ones in the order they will run), optionally
    of one state and queue, and whose id or command contains ``text``.

    Pages follow each other by keyset (``cursor``: where the last one ended), so a page
    costs the same at any depth. A filter no index serves walks at most ``SCAN`` jobs a
    page. Returns (jobs, the cursor of the next page or None, jobs walked when a filter
    walked all ``SCAN`` without filling the page, else 0)."""
    if state is not None and state not in STATES:
        raise InvalidInput(f"unknown state {state!r}")
    if state == State.PENDING and not text:
        return _pending_page(conn, queue, cursor, limit)
    params: list[Any] = [_cursor_seq(cursor)]
    where = "seq < ?"
    if state in INDEXED:
        where, params = f"state = ? AND {INDEXED_STATES} AND {where}", [state, *params]
        index = JOBS_STATE
    else:
        index = ""  # every job, or pending or completed ones: rows lie in seq order
    found, found_params = [], []
    if state is not None and state not in INDEXED:
        found.append("state = ?")
        found_params.append(state)
    if queue:
        found.append("queue = ?")
        found_params.append(queue)
    if text:
        # Case-sensitive on both stores, in SQL both speak (SQLite has no strpos, nor
        # PostgreSQL instr).
        found.append("(replace(id, ?, '') <> id OR replace(command, ?, '') <> command)")
        found_params += [text, text]

    def page(condition: str, values: list[Any]) -> list[ListedJob]:
        return [ListedJob(*row) for row in conn.execute(conn.dialect.sql(
            f"SELECT {LIST_FIELDS} FROM jobs {index} WHERE {condition} "
            "ORDER BY seq DESC LIMIT ?"), (*values, limit + 1))]

    if not found:
        rows = page(where, params)
        return rows[:limit], str(rows[limit - 1].seq) if len(rows) > limit else None, 0
    # A filter no index serves: how far back SCAN jobs reach (an index walk), then only
    # those jobs are looked at.
    walked, floor = conn.execute(conn.dialect.sql(
        f"SELECT count(*), min(seq) FROM (SELECT seq FROM jobs {index} WHERE {where} "
        f"ORDER BY seq DESC LIMIT {SCAN}) AS walked"), params).fetchone()
    if not walked:
        return [], None, 0
    rows = page(f"{where} AND seq >= ? AND {' AND '.join(found)}", [*params, floor, *found_params])
    if len(rows) > limit:
        return rows[:limit], str(rows[limit - 1].seq), 0
    if walked < SCAN:
        return rows, None, 0
    return rows, str(floor), int(walked)


def _cursor_seq(cursor: str | None) -> int:
    if not cursor:
        return EVERY
    if not _seq_text(cursor):
        raise InvalidInput(f"bad page cursor {cursor!r}")
    return int(cursor)


def _seq_text(text: str) -> bool:
    """ASCII digits only: ``isdigit`` also takes ``²`` (which ``int`` refuses) and ``١``
    (which it reads), and ``int`` alone takes ``1_0`` and spaces."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _pending_page(conn: Db, queue: str | None, cursor: str | None, limit: int
                  ) -> tuple[list[ListedJob], str | None, int]:
    """Pending jobs in run order (highest priority first, then oldest) through the index
    the claim query walks; a cursor ``priority:seq`` starts after that job."""
    if queue:
        index, ready = ready_of(queue)
        where, params = f"{index} WHERE state = ? AND {ready}", [State.PENDING, queue]
    else:
        where, params = f"{JOBS_READY} WHERE state = ? AND {CLAIMABLE_SQL}", [State.PENDING]

    def page(after: str, *more: Any) -> list[ListedJob]:
        sql = f"SELECT {LIST_FIELDS} FROM jobs {where} {after} ORDER BY priority DESC, seq LIMIT ?"
        return [ListedJob(*row) for row in conn.execute(conn.dialect.sql(sql),
                                                        (*params, *more, limit + 1 - len(rows)))]

    rows: list[ListedJob] = []
    if cursor:
        priority, seq = _pending_cursor(cursor)
        # Two index ranges, each a seek: the rest of this priority, then the lower ones.
        rows = page("AND priority = ? AND seq > ?", priority, seq)
        if len(rows) <= limit:
            rows += page("AND priority < ?", priority)
    else:
        rows = page("")
    if len(rows) > limit:
        last = rows[limit - 1]
        return rows[:limit], f"{last.priority}:{last.seq}", 0
    return rows, None, 0


def _pending_cursor(cursor: str) -> tuple[int, int]:
    priority, _, seq = cursor.partition(":")
    try:
        if not _seq_text(seq) or not _seq_text(priority.removeprefix("-")):
            raise ValueError(seq)
        return int(limits.check("priority", int(priority))), int(seq)
    except (ValueError, InvalidInput):
        raise InvalidInput(f"bad page cursor {cursor!r}") from None


def activity(conn: Db, minutes: int = 60, buckets: int = 12) -> dict[str, Any]:
    """The last ``minutes`` in ``buckets`` slices: runs that ended in each (completed, or
    failed, timed out or lost) and the p50 / p95 of their queue wait and run time. Reads
    the newest ``ACTIVITY_RUNS`` runs at most; ``capped`` says when there were more."""
    now = conn.now()
    since = clock.after(now, -minutes * 60)
    rows = conn.execute(conn.dialect.sql(
        f"SELECT finished_at, outcome, wait, duration FROM runs {RUNS_FINISHED} "
        "WHERE finished_at >= ? ORDER BY finished_at DESC LIMIT ?"),
        (since, ACTIVITY_RUNS + 1)).fetchall()
    capped = len(rows) > ACTIVITY_RUNS
    width = minutes * 60 / buckets
    starts = [clock.after(since, i * width) for i in range(buckets)]
    slices: list[dict[str, Any]] = [{"start": start, "completed": 0, "failed": 0,
                                     "waits": [], "durations": []} for start in starts]
    for finished_at, outcome, wait, duration in rows[:ACTIVITY_RUNS]:
        # ISO times in one format sort as text: no parsing per run.
        one = slices[max(0, bisect.bisect_right(starts, finished_at) - 1)]
        if outcome == "completed":
            one["completed"] += 1
        elif outcome in FAILED_RUNS:
            one["failed"] += 1
        else:
            continue  # released or cancelled: neither done nor failed
        one["waits"].append(wait)
        if duration is not None:
            one["durations"].append(duration)
    for one in slices:
        one["wait"] = _nearest_ranks(one.pop("waits"))
        one["run_time"] = _nearest_ranks(one.pop("durations"))
    return {"since": since, "until": now, "minutes": minutes, "slices": slices,
            "capped": capped, "runs": min(len(rows), ACTIVITY_RUNS)}


def _nearest_ranks(values: list[float]) -> dict[str, float | None]:
    values.sort()
    n = len(values)

    def rank(p: float) -> float | None:
        return values[max(0, -(-int(p * 1000) * n // 1000) - 1)] if n else None

    return {"p50": rank(0.50), "p95": rank(0.95)}


# -- the live view (status --watch) -------------------------------------------------------
# Each read is an index range or a LIMIT: the view costs the same at ten jobs and at millions.

FAILED_RUNS = ("failed", "timed-out", "lease-expired", "fenced")
RECENT_RUNS = 5000  # the newest finished runs the failure list looks among, at most


def workers_at_work(conn: Db) -> list[WorkerAtWork]:
    """The running workers, as ``running_workers`` gives them, each with ``job_since``: when
    its current job's run was claimed (one probe of ``runs_job`` a worker)."""
    return _silent_marked(conn, [WorkerAtWork(*row) for row in conn.execute(
        """SELECT id, state, pid, host, started_at, last_heartbeat, current_job, jobs_done,
            (SELECT claimed_at FROM runs WHERE runs.job_id = workers.current_job
             ORDER BY seq DESC LIMIT 1) AS job_since
        FROM workers WHERE state = 'active' ORDER BY started_at, id""")])


def finished_per_minute(conn: Db, now: str, minutes: int = 10) -> list[int]:
    """Runs finished in each of the last ``minutes`` minutes, oldest first, the last one
    ending at ``now``: a count of one range of ``runs_finished`` a minute, read from the
    index alone. One statement each: as one statement, PostgreSQL without statistics on
    runs estimates it past its JIT threshold and compiles it, which costs more than the
    counting."""
    ends = [clock.after(now, -60.0 * k) for k in range(minutes, -1, -1)]
    sql = conn.dialect.sql(f"SELECT count(*) FROM runs {RUNS_FINISHED} "
                           "WHERE finished_at >= ? AND finished_at < ?")
    return [int(conn.execute(sql, (start, end)).fetchone()[0])
            for start, end in zip(ends, ends[1:], strict=False)]


def finished_since(conn: Db, since: str, now: str) -> dict[str, int]:
    """Runs finished from ``since`` to ``now``, per outcome (a range of ``runs_finished``).
    Both ends are given: without statistics, PostgreSQL's planner takes a range open at one
    end for a large share of the table (its default guess) and scans it all."""
    return {outcome: int(n) for outcome, n in conn.execute(conn.dialect.sql(
        f"SELECT outcome, count(*) FROM runs {RUNS_FINISHED} "
        "WHERE finished_at >= ? AND finished_at <= ? GROUP BY outcome"), (since, now)).fetchall()}


def newest_failures(conn: Db, limit: int = 5) -> list[FailedRun]:
    """The newest failed runs (failed, timed out, or lost with their worker), newest first,
    with their job's queue and last error: looked for among the newest ``RECENT_RUNS``
    finished runs only, so that a quiet error log never walks the whole table."""
    outcomes = ", ".join(f"'{o}'" for o in FAILED_RUNS)
    return [FailedRun(*row) for row in conn.execute(conn.dialect.sql(
        f"""SELECT f.job_id, f.attempt, f.worker_id, f.finished_at, f.outcome, f.exit_code,
            j.queue, j.last_error
        FROM (SELECT * FROM (SELECT job_id, attempt, worker_id, finished_at, outcome, exit_code
                             FROM runs {RUNS_FINISHED} WHERE finished_at IS NOT NULL
                             ORDER BY finished_at DESC LIMIT ?) AS recent
              WHERE outcome IN ({outcomes}) ORDER BY finished_at DESC LIMIT ?) AS f
        LEFT JOIN jobs AS j ON j.id = f.job_id
        ORDER BY f.finished_at DESC"""), (RECENT_RUNS, limit))]
