"""What ``reads`` returns: one frozen Struct per kind of row, typed as scripts see it.

The field order of each is the order of its keys in ``--json``: the CLI encodes these as
they are (``render.job_json`` picks a job's fields), so a new field goes where its key
should appear, and a field never changes type. Times are ISO-8601 UTC text as the ledger
writes them. Reads build them positionally from their rows, in this order.
"""

from __future__ import annotations

import msgspec


class Job(msgspec.Struct, frozen=True):
    """A job as the ``jobs`` projection holds it (``show --json`` without its runs)."""

    id: str
    command: str
    queue: str
    state: str
    priority: int
    attempts: int  # runs started so far
    max_retries: int  # runs allowed: 1 + max_retries
    backoff_base: float
    backoff_max: float
    backoff_jitter: float
    timeout: float  # seconds; 0: none
    run_at: str | None  # when a scheduled or failed job may run (stale in other states)
    after: list[str]  # the jobs it waits for, sorted
    unique_key: str | None
    exit_code: int | None
    last_error: str | None
    created_at: str
    updated_at: str
    worker_id: str | None
    cancel_requested: bool
    cwd: str | None = None  # where it runs; None: the worker's directory
    env: dict[str, str] = {}  # variables set over the worker's environment
    memory: int | None = None  # resource limits of each of its runs' processes; None: none
    cpu_time: int | None = None  # (bytes of address space, CPU seconds, open descriptors)
    open_files: int | None = None


class ListedJob(msgspec.Struct, frozen=True):
    """A job as a page of the dashboard lists it; ``seq`` orders pages."""

    seq: int
    id: str
    command: str
    queue: str
    state: str
    priority: int
    attempts: int
    max_retries: int
    run_at: str | None
    last_error: str | None
    created_at: str
    updated_at: str


class Run(msgspec.Struct, frozen=True):
    """One run of a job, from its events (``logs --json``): ``outcome`` is the event that
    ended it, or ``running``."""

    run: int  # 1, 2, ... over the job's whole life (a requeue does not restart it)
    attempt: int  # the attempt it was (a requeue from the DLQ starts again at 1)
    worker_id: str
    started_at: str
    finished_at: str | None
    outcome: str
    exit_code: int | None
    duration: float | None
    output: str  # its tail, as the ledger keeps it
    truncated: bool
    error: str | None


class Worker(msgspec.Struct, frozen=True):
    """A worker as the ``workers`` projection holds it; a running one whose heartbeat is
    older than the lease timeout reads ``silent``."""

    id: str
    state: str
    pid: int
    host: str
    started_at: str
    last_heartbeat: str
    current_job: str | None
    jobs_done: int


class WorkerAtWork(Worker, frozen=True):
    """A running worker with when its current job's run was claimed (``status --watch``)."""

    job_since: str | None


class Status(msgspec.Struct, frozen=True):
    """``status --json``: jobs per state, per queue and state, the running workers, and
    workers per state (active, silent, stopped, gone)."""

    jobs: dict[str, int]
    queues: dict[str, dict[str, int]]
    workers: list[Worker]
    worker_counts: dict[str, int]


class QueueRow(msgspec.Struct, frozen=True):
    """One queue (``queues --json``): its rules, its jobs per state, and how long its oldest
    pending job has waited (seconds; None when none is pending)."""

    queue: str
    paused: bool
    limit: int  # jobs of it running at once, at most; 0: no limit
    rate: str | None  # at most so many started a period: ``10/s``, ``100/m``, ``5000/h``
    jobs: dict[str, int]
    total: int
    oldest_pending_wait: float | None


class FailedRun(msgspec.Struct, frozen=True):
    """A run that failed, timed out or lost its worker, with its job's queue and last error
    (None for both once the job was pruned)."""

    job_id: str
    attempt: int
    worker_id: str
    finished_at: str
    outcome: str
    exit_code: int | None
    queue: str | None
    last_error: str | None


class Percentiles(msgspec.Struct, frozen=True):
    """Seconds; None when nothing was measured."""

    p50: float | None
    p95: float | None


class RunTimes(msgspec.Struct, frozen=True):
    p50: float | None
    p95: float | None
    max: float | None


class Stats(msgspec.Struct, frozen=True):
    """``stats --json``: over all time (``since`` None) or a window that starts at ``since``."""

    since: str | None
    completed: int
    failed: int  # failed runs: failed, timed out or lost with their worker
    dead: int
    success_rate: float | None
    throughput_per_min: float | None
    throughput_over_seconds: float | None  # the window, or all time's first claim to last end
    run_time: RunTimes
    queue_wait: Percentiles
