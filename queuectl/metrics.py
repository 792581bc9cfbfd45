"""Prometheus metrics: the figures a scrape reads from the projections, and the collector
that turns them into metric families (``queuectl metrics``, ``/metrics``).

Every figure comes from a projection kept current with the ledger, read in one snapshot:
counts of jobs and runs are rows of ``job_counts`` and ``run_counts`` (all-time totals that
``prune`` does not reset), the oldest ready job and the recent runs are index walks, so a
scrape costs about the same at a thousand jobs and at a million. prometheus_client is
imported only by the functions that build the metric families: ``health``, which reads
``oldest_ready`` from here, never loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec

from projections.jobs import CLAIMABLE_SQL, JOBS_READY_SINCE
from queuectl import clock, reads
from queuectl.states import STATES
from queuectl.store import Db

# The recent window the run time and queue wait summaries are taken over: of the newest
# WINDOW_RUNS runs (by claim), those that finished in the last WINDOW_SECONDS. Read by seq,
# they lie together at the table's end: a busy queue costs a scrape no more than an idle one,
# where walking runs by their end would look up each row apart.
WINDOW_SECONDS = 300
WINDOW_RUNS = 1000
QUANTILES = (0.5, 0.9, 0.99)
# The outcomes a run ends with (run_counts' other rows count starts, deaths and prunes).
OUTCOMES = ("completed", "failed", "timed-out", "lease-expired", "fenced", "released", "cancelled")

# The first entry of a queue's claimable jobs by run_at: ready if its time has come (a
# scheduled job's may lie ahead), and then the oldest ready.
_READY_SINCE = (f"SELECT min(run_at) FROM jobs {JOBS_READY_SINCE} "
                f"WHERE {CLAIMABLE_SQL} AND queue = ?")
_RECENT = ("SELECT queue, duration, wait FROM (SELECT queue, duration, wait, finished_at "
           "FROM runs ORDER BY seq DESC LIMIT ?) AS newest WHERE finished_at >= ?")


class QueueFigures(msgspec.Struct):
    paused: bool
    limit: int  # jobs of it processing at once; 0: none
    jobs: dict[str, int]  # per state
    oldest_ready: float | None  # seconds the oldest ready job has waited; None: none ready
    rate: int = 0  # starts allowed in any window of ``period`` seconds; 0: no rate
    period: int = 0


class Recent(msgspec.Struct):
    """One queue's runs of the window: their run times (those that have one) and waits."""

    durations: list[float] = msgspec.field(default_factory=list)
    waits: list[float] = msgspec.field(default_factory=list)


class ScheduleFigures(msgspec.Struct):
    name: str
    paused: bool
    last: float | None  # the last tick handled, seconds since the epoch
    next: float


class Figures(msgspec.Struct):
    """Everything one scrape reports, read in one snapshot."""

    now: str
    head: int
    queues: dict[str, QueueFigures]
    runs: dict[tuple[str, str], int]  # (queue, run_counts outcome) -> all-time count
    recent: dict[str, Recent]
    workers: dict[str, int]  # active, silent, stopped, gone
    schedules: list[ScheduleFigures]


def gather(conn: Db, now: str | None = None) -> Figures:
    """The figures of one scrape at ``now`` (the store's clock); the caller holds one
    snapshot around it."""
    now = now or conn.now()
    return Figures(now=now, head=reads.head(conn), queues=queue_figures(conn, now),
                   runs=run_counts(conn), recent=recent_runs(conn, now),
                   workers=reads.worker_tally(conn, reads.running_workers(conn)),
                   schedules=schedules(conn))


def queue_figures(conn: Db, now: str) -> dict[str, QueueFigures]:
    """Every queue that holds or held a job, or was paused or limited."""
    counted = reads.queue_counts(conn)
    rules = {name: (bool(paused), int(limit), int(rate), int(period))
             for name, paused, limit, rate, period in conn.execute(
                 "SELECT name, paused, job_limit, rate, period FROM queues").fetchall()}
    oldest = oldest_ready(conn, now, counted)
    return {name: QueueFigures(*rules.get(name, (False, 0, 0, 0))[:2],
                               counted.get(name) or dict.fromkeys(STATES, 0),
                               oldest.get(name), *rules.get(name, (False, 0, 0, 0))[2:])
            for name in sorted(counted.keys() | rules.keys())}


def oldest_ready(conn: Db, now: str, queues: Iterable[str] | None = None) -> dict[str, float]:
    """For each queue with a ready job (one a worker may claim now: pending, or scheduled
    or failed whose run_at has come, paused queue or not), how long its oldest has been
    ready, in seconds. ``queues``: those to look at (None: every queue that holds a job)."""
    if queues is None:
        queues = reads.queue_counts(conn)
    sql = conn.dialect.sql(_READY_SINCE)
    found = {}
    for queue in queues:
        (at,) = conn.execute(sql, (queue,)).fetchone()
        if at is not None and at <= now:
            found[queue] = round(max(0.0, clock.seconds_between(at, now)), 3)
    return found


def run_counts(conn: Db) -> dict[tuple[str, str], int]:
    return {(queue, outcome): int(n) for queue, outcome, n in conn.execute(
        "SELECT queue, outcome, n FROM run_counts").fetchall()}


def recent_runs(conn: Db, now: str) -> dict[str, Recent]:
    """The window's runs (WINDOW_RUNS, WINDOW_SECONDS), by queue."""
    since = clock.after(now, -WINDOW_SECONDS)
    found: dict[str, Recent] = {}
    for queue, duration, wait in conn.execute(_RECENT, (WINDOW_RUNS, since)):
        recent = found.setdefault(queue, Recent())
        if duration is not None:
            recent.durations.append(float(duration))
        recent.waits.append(float(wait))
    return found


def schedules(conn: Db) -> list[ScheduleFigures]:
    return [ScheduleFigures(name, bool(paused), _epoch(last), _epoch(next_at) or 0.0)
            for name, paused, last, next_at in conn.execute(
                "SELECT name, paused, last_tick, next_at FROM schedules ORDER BY name")]


def _epoch(text: str | None) -> float | None:
    return None if text is None else clock.parse(text).timestamp()


# -- the metric families ------------------------------------------------------------------


def families(f: Figures) -> Iterator[Any]:
    """The figures as prometheus_client metric families (names per Prometheus' naming
    guide: ``queuectl_`` first, the unit last, ``_total`` on counters)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        return GaugeMetricFamily(name, doc, labels=labels)

    jobs = gauge("queuectl_jobs", "Jobs by queue and state.", ("queue", "state"))
    ready = gauge("queuectl_oldest_ready_job_age_seconds",
                  "How long the oldest job a worker may claim now (pending, or scheduled or "
                  "failed whose time has come) has waited, by queue; 0 when none is ready.",
                  ("queue",))
    paused = gauge("queuectl_queue_paused", "1 if the queue is paused, else 0.", ("queue",))
    limit = gauge("queuectl_queue_concurrency_limit",
                  "Jobs of the queue that may run at once, across every worker; 0 is no limit.",
                  ("queue",))
    rate = gauge("queuectl_queue_rate_limit",
                 "Starts of the queue's jobs allowed in any window of its rate period "
                 "(queue limit --rate N/PERIOD), across every worker; 0 is no rate.",
                 ("queue",))
    period = gauge("queuectl_queue_rate_period_seconds",
                   "The window of the queue's rate limit; 0 when it has none.", ("queue",))
    for name, q in f.queues.items():
        for state, n in q.jobs.items():
            jobs.add_metric([name, state], n)
        ready.add_metric([name], q.oldest_ready or 0.0)
        paused.add_metric([name], int(q.paused))
        limit.add_metric([name], q.limit)
        rate.add_metric([name], q.rate)
        period.add_metric([name], q.period)
    yield from (jobs, ready, paused, limit, rate, period)
    yield from _run_families(f, CounterMetricFamily)
    yield from _recent_families(f)

    workers = gauge("queuectl_workers", "Workers by state: active (heartbeating), silent "
                    "(active, heartbeat older than the lease timeout), stopped, gone.",
                    ("state",))
    for state, n in f.workers.items():
        workers.add_metric([state], n)
    yield workers
    yield CounterMetricFamily("queuectl_worker_crashes", "Workers declared lost (gone): "
                              "they stopped heartbeating without stopping.",
                              value=f.workers.get("gone", 0))
    head = gauge("queuectl_ledger_head_seq", "The seq of the ledger's newest event.")
    head.add_metric([], f.head)
    yield head
    yield from _schedule_families(f, GaugeMetricFamily)


def _run_families(f: Figures, counter: Any) -> Iterator[Any]:
    runs = counter("queuectl_runs", "Runs ended, by queue and outcome, all time (prune does "
                   "not reset it; queue \"\" is runs claimed before claims named their queue).",
                   labels=("queue", "outcome"))
    started = counter("queuectl_runs_started", "Runs started (claims), by queue, all time.",
                      labels=("queue",))
    dead = counter("queuectl_runs_dead", "Runs that used up their job's retries (the job went "
                   "to the dead letter queue), by queue, all time.", labels=("queue",))
    queues = sorted({queue for queue, _ in f.runs} | set(f.queues))
    for queue in queues:
        for outcome in OUTCOMES:
            runs.add_metric([queue, outcome], f.runs.get((queue, outcome), 0))
        started.add_metric([queue], f.runs.get((queue, "claimed"), 0))
        dead.add_metric([queue], f.runs.get((queue, "dead"), 0))
    expired = sum(n for (_, outcome), n in f.runs.items() if outcome == "lease-expired")
    yield from (runs, started, dead)
    yield counter("queuectl_lease_expiries", "Runs taken back from a worker that stopped "
                  "heartbeating (lease expired), all time.", value=expired)


def _recent_families(f: Figures) -> Iterator[Any]:
    from prometheus_client.core import SummaryMetricFamily

    window = f"the newest {WINDOW_RUNS} runs that finished in the last {WINDOW_SECONDS} s; " \
             "_count and _sum are over that window too"
    duration = SummaryMetricFamily("queuectl_run_duration_seconds",
                                   f"Run time by queue, over {window}.", labels=("queue",))
    wait = SummaryMetricFamily("queuectl_queue_wait_seconds",
                               f"How long runs waited to be claimed once they could run, by "
                               f"queue, over {window}.", labels=("queue",))
    for queue in sorted(set(f.queues) | set(f.recent)):
        recent = f.recent.get(queue, Recent())
        for family, values in ((duration, recent.durations), (wait, recent.waits)):
            family.add_metric([queue], len(values), round(sum(values), 6))
            for q, value in quantiles(values).items():
                family.add_sample(family.name, {"queue": queue, "quantile": str(q)}, value)
    yield from (duration, wait)


def quantiles(values: list[float]) -> dict[float, float]:
    """Nearest-rank quantiles (QUANTILES) of ``values``; none of an empty list."""
    if not values:
        return {}
    ordered = sorted(values)
    return {q: ordered[max(0, -(-int(q * 1000) * len(ordered) // 1000) - 1)] for q in QUANTILES}


def _schedule_families(f: Figures, gauge: Any) -> Iterator[Any]:
    last = gauge("queuectl_schedule_last_fire_timestamp_seconds",
                 "When the schedule's last tick was handled (a job made or skipped), seconds "
                 "since the epoch; absent before its first.", labels=("schedule",))
    next_ = gauge("queuectl_schedule_next_fire_timestamp_seconds",
                  "When the schedule's next tick is due, seconds since the epoch.",
                  labels=("schedule",))
    paused = gauge("queuectl_schedule_paused", "1 if the schedule is paused, else 0.",
                   labels=("schedule",))
    for s in f.schedules:
        if s.last is not None:
            last.add_metric([s.name], s.last)
        next_.add_metric([s.name], s.next)
        paused.add_metric([s.name], int(s.paused))
    yield from (last, next_, paused)


# -- the collector --------------------------------------------------------------------------

Read = Callable[[Callable[[Db], Figures]], Figures]


class Collector:
    """A prometheus_client custom collector: each ``collect`` reads the figures anew,
    through ``read`` (which runs its argument in one snapshot of the store)."""

    def __init__(self, read: Read) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        yield from families(self.read(gather))


def exposition(read: Read) -> bytes:
    """One scrape in the Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(read))  # type: ignore[arg-type]
    return generate_latest(registry)


def reader(conn: Db) -> Read:
    """``read`` for a connection held by the caller: each scrape in a snapshot of its own."""
    def read(build: Callable[[Db], Figures]) -> Figures:
        with conn.snapshot():
            return build(conn)
    return read

