"""The whole event vocabulary of the ledger.

Every event is a frozen, keyword-only msgspec Struct with an explicit tag. The tag is what
the ledger stores in its ``type`` column and inside the JSON body, so a class may be renamed
but a tag never changes. Events change by addition only: a new field always has a default,
so every row ever written still decodes.

Unlike the rest of the package, this module does not defer its annotations (``from
__future__ import annotations``): a decoder reads the annotation of every field of the
events it decodes, and deferred ones are strings that msgspec must evaluate one by one, a
large share of a command's start-up.
"""

from collections.abc import Callable

import msgspec

from queuectl.errors import InvalidInput


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    """Base of all events; ``job_id``/``worker_id`` are lifted into ledger columns.

    ``by`` names who caused it (``queuectl.actor``); events written before it existed
    have none."""

    by: str = ""

    @property
    def type(self) -> str:
        return self.__struct_config__.tag  # type: ignore[return-value]


# -- jobs -------------------------------------------------------------------------------


class HookOrigin(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What made a hook job: the hook, and the job whose change of state fired it. The
    runner gives it to the job as ``QUEUECTL_HOOK_*`` variables."""

    name: str
    job_id: str
    state: str  # completed, failed, dead or cancelled
    queue: str
    command: str
    exit_code: int | None = None  # None: the change had no exit code (a timeout, a cancel)


class Enqueued(_Event, tag="enqueued", frozen=True):
    job_id: str
    command: str
    max_retries: int
    backoff_base: float
    timeout: float = 0.0  # seconds; 0 means no timeout
    priority: int = 0  # higher runs first
    run_at: str | None = None  # not claimable before this time (ISO-8601 UTC)
    after: tuple[str, ...] = ()  # jobs that must complete first
    backoff_max: float = 0.0  # cap on one retry delay; 0 means none
    backoff_jitter: float = 0.0  # 0..1: a delay may be shortened by up to this fraction
    queue: str = "default"  # the named queue it waits in
    unique_key: str | None = None  # no other unfinished job may hold the same key
    cwd: str | None = None  # absolute directory the run starts in; None: the worker's
    env: dict[str, str] = msgspec.field(default_factory=dict)  # set over the worker's, sorted
    hook: HookOrigin | None = None  # a hook job: what fired it
    # Resource limits of each of its runs' processes (queuectl.resources); 0 means none.
    memory: int = 0  # bytes of address space
    cpu_time: int = 0  # CPU seconds
    open_files: int = 0  # open descriptors


class Claimed(_Event, tag="claimed", frozen=True):
    job_id: str
    worker_id: str
    attempt: int  # the run number this claim starts, 1-based
    eligible_at: str | None = None  # since when the job could run: its queue wait starts here
    ahead: bool = False  # held to run after its worker's current job: ``started`` follows
    queue: str | None = None  # the job's queue, for the runs per queue; None before it was kept
    # The queue whose rate (``queue limit --rate``) this start counts against: the job's, when
    # it had one at the claim ("": none). A claim ahead starts nothing: its ``started`` counts.
    rate_queue: str = ""


class Started(_Event, tag="started", frozen=True):
    """A job claimed ahead begins to run on the worker holding it."""

    job_id: str
    worker_id: str
    attempt: int
    rate_queue: str = ""  # as ``Claimed.rate_queue``


class Completed(_Event, tag="completed", frozen=True):
    job_id: str
    worker_id: str
    attempt: int
    duration: float = 0.0
    output: str = ""  # tail of stdout+stderr
    truncated: bool = False  # output was cut to its tail


class Failed(_Event, tag="failed", frozen=True):
    job_id: str
    worker_id: str
    attempt: int
    exit_code: int
    error: str
    duration: float = 0.0
    output: str = ""
    truncated: bool = False


class TimedOut(_Event, tag="timed-out", frozen=True):
    job_id: str
    worker_id: str
    attempt: int
    timeout: float
    duration: float = 0.0
    output: str = ""
    truncated: bool = False


class LeaseExpired(_Event, tag="lease-expired", frozen=True):
    job_id: str
    worker_id: str
    attempt: int
    last_heartbeat: str  # the holder's last sign of life, ISO-8601 UTC
    killed: int = 0  # processes of the run the rescuer found on its host and stopped


class Fenced(_Event, tag="fenced", frozen=True):
    """A worker that could not renew its lease stopped its own run before the lease could
    expire (``queuectl.fence``), and says so once it can write again. If it still held the
    job then, the run counts as a failed one (the retry rule follows, as after
    ``lease-expired``); if a rescuer had taken the job back first (``rescued``), this only
    records what became of the run: the rescuer's events decided the job's fate."""

    job_id: str
    worker_id: str
    attempt: int
    silence: float  # seconds from its last renewal to the run's SIGTERM, by its own clock
    lease_timeout: float  # the lease it kept to
    reason: str  # what kept it from renewing, as far as it saw
    duration: float = 0.0
    output: str = ""  # tail of stdout+stderr, up to the kill
    truncated: bool = False
    rescued: bool = False  # the job was no longer its own when this was written


class Released(_Event, tag="released", frozen=True):
    """A run abandoned by its own worker (forced shutdown); it does not count as an attempt."""

    job_id: str
    worker_id: str
    attempt: int
    reason: str
    ahead: bool = False  # claimed ahead and given back before it started


class Unblocked(_Event, tag="unblocked", frozen=True):
    """Every job a waiting job depends on has completed; it may now run."""

    job_id: str
    completed: str  # the dependency whose completion released it


class CancelRequested(_Event, tag="cancel-requested", frozen=True):
    """Cancel asked for a running job; its worker kills the run and records ``cancelled``."""

    job_id: str


class Cancelled(_Event, tag="cancelled", frozen=True):
    job_id: str
    reason: str
    worker_id: str | None = None  # set when a running job was stopped by its worker
    attempt: int = 0
    duration: float = 0.0
    output: str = ""
    truncated: bool = False


class ScheduledRetry(_Event, tag="scheduled-retry", frozen=True):
    job_id: str
    attempt: int  # failed runs so far
    delay: float  # seconds, decided when the run failed
    run_at: str  # ISO-8601 UTC; replay never recomputes it


class Dead(_Event, tag="dead", frozen=True):
    job_id: str
    attempts: int
    reason: str


class Requeued(_Event, tag="requeued", frozen=True):
    """A dead job sent back to pending by ``dlq retry`` with a fresh retry budget."""

    job_id: str
    max_retries: int


class Edited(_Event, tag="edited", frozen=True):
    """A job not yet started (pending, scheduled, waiting) given new values by ``edit``.
    Only what changed is set; ``env`` holds the variables set or changed, merged over the
    job's own. A new ``run_at`` makes a pending or scheduled job one or the other again."""

    job_id: str
    command: str | None = None
    priority: int | None = None
    run_at: str | None = None
    queue: str | None = None
    max_retries: int | None = None
    timeout: float | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    memory: int | None = None  # a resource limit's new value; 0: none from now on
    cpu_time: int | None = None
    open_files: int | None = None


class Restarted(_Event, tag="restarted", frozen=True):
    """A finished job (completed, dead or cancelled) sent back to pending to run again as
    a fresh series of attempts (``queuectl restart``); its history and runs stay."""

    job_id: str
    max_retries: int
    previous: str = ""  # the state it was in


class SignalRequested(_Event, tag="signal-requested", frozen=True):
    """A signal asked for a running job: its worker delivers it to the run's process group
    and records ``signalled``. ``run`` is the seq of the run's claim: the request is for
    that run only."""

    job_id: str
    worker_id: str  # the worker that ran the job when it was asked
    run: int
    signal: int


class Signalled(_Event, tag="signalled", frozen=True):
    """A worker delivered (or could not deliver) the signal ``request`` asked for."""

    job_id: str
    worker_id: str
    attempt: int
    request: int  # the seq of its signal-requested event
    signal: int
    delivered: bool = True
    error: str = ""


# -- workers ----------------------------------------------------------------------------


class WorkerStarted(_Event, tag="worker-started", frozen=True):
    worker_id: str
    pid: int
    host: str


class WorkerHeartbeat(_Event, tag="worker-heartbeat", frozen=True):
    worker_id: str


class WorkerStopped(_Event, tag="worker-stopped", frozen=True):
    worker_id: str
    reason: str = ""


class WorkerLost(_Event, tag="worker-lost", frozen=True):
    """A worker whose heartbeat stopped for longer than the lease timeout."""

    worker_id: str
    last_heartbeat: str


class StopRequested(_Event, tag="stop-requested", frozen=True):
    """Every worker running when this is appended finishes its job and exits."""


# -- config -----------------------------------------------------------------------------


class ConfigChanged(_Event, tag="config-changed", frozen=True):
    key: str
    value: str  # canonical text, already validated


# -- queues -----------------------------------------------------------------------------


class QueuePaused(_Event, tag="queue-paused", frozen=True):
    """No worker starts a job of this queue until it is resumed; it still takes jobs."""

    queue: str


class QueueResumed(_Event, tag="queue-resumed", frozen=True):
    queue: str


class QueueLimited(_Event, tag="queue-limited", frozen=True):
    """At most ``limit`` jobs of this queue processing at once, and at most ``rate`` of its
    jobs started in any ``period`` seconds, across every worker. Each event gives both (rows
    written before rates existed have none)."""

    queue: str
    limit: int  # 0: no limit
    rate: int = 0  # starts a period; 0: no rate limit
    period: int = 0  # seconds: 1, 60 or 3600 (0 with no rate)


# -- schedules --------------------------------------------------------------------------


class ScheduleAdded(_Event, tag="schedule-added", frozen=True):
    """A periodic job: ``command`` enqueued at each tick of ``cron`` (in ``timezone``)."""

    name: str
    cron: str
    command: str
    next_at: str  # its first tick (UTC)
    timezone: str = "UTC"
    queue: str = "default"
    priority: int = 0
    max_retries: int | None = None  # None: the settings' default when a job is made
    backoff_base: float | None = None
    timeout: float | None = None
    cwd: str | None = None  # where its jobs run (enqueued with it); None: the worker's
    env: dict[str, str] = msgspec.field(default_factory=dict)
    memory: int | None = None  # its jobs' resource limits; None: the settings' default
    cpu_time: int | None = None  # (0: none)
    open_files: int | None = None


class ScheduleRemoved(_Event, tag="schedule-removed", frozen=True):
    name: str


class SchedulePaused(_Event, tag="schedule-paused", frozen=True):
    name: str


class ScheduleResumed(_Event, tag="schedule-resumed", frozen=True):
    """Ticks missed while it was paused are not caught up: it goes on from ``next_at``."""

    name: str
    next_at: str


class ScheduleFired(_Event, tag="schedule-fired", frozen=True):
    """A tick made a job (``job_id``, enqueued with it). ``missed``: ticks that passed
    before it with no job made (no worker was running); this one is their catch-up."""

    name: str
    tick: str
    job_id: str
    next_at: str
    missed: int = 0


class ScheduleSkipped(_Event, tag="schedule-skipped", frozen=True):
    """A tick made no job: the one its schedule made before was still unfinished (``held``),
    or the id it would have had was taken."""

    name: str
    tick: str
    reason: str
    next_at: str
    held: str | None = None
    missed: int = 0


# -- hooks ------------------------------------------------------------------------------------


class HookAdded(_Event, tag="hook-added", frozen=True):
    """From now on, each job (of ``queue``, or of any) that reaches one of ``on`` makes a
    job running ``command`` in ``to_queue`` (None: the job's own queue)."""

    name: str
    on: tuple[str, ...]
    command: str
    queue: str | None = None
    to_queue: str | None = None


class HookRemoved(_Event, tag="hook-removed", frozen=True):
    name: str


# -- API tokens ---------------------------------------------------------------------------


class TokenAdded(_Event, tag="token-added", frozen=True):
    """A bearer token for the HTTP API: ``hash`` is the SHA-256 (hex) of the token, which
    itself is shown once and never stored. ``scope``: read, enqueue or admin."""

    name: str
    scope: str
    hash: str


class TokenRevoked(_Event, tag="token-revoked", frozen=True):
    """The token ``name`` no longer authorizes anything, from this event on."""

    name: str


# -- retention -----------------------------------------------------------------------------


class PrunedWorker(msgspec.Struct, frozen=True, array_like=True):
    """A worker's row as it stood when events that shaped it left the ledger."""

    worker_id: str
    state: str
    last_heartbeat: str
    stopped_at: str | None
    stop_requested: int
    current_job: str | None
    jobs_done: int


class Pruned(_Event, tag="pruned", frozen=True):
    """``events`` ledger rows moved to the archive (``queuectl prune``): every event of the
    ``jobs`` (finished before ``before``), and heartbeats superseded by a later one. It is
    appended before they leave, so every seq they had lies below its own. What a replay can
    no longer work out from them, it says here: the queues those jobs were in (their count
    rows stay), their runs' share of the all-time run counts, and the rows of the workers
    their events named, as they stood."""

    before: str
    events: int
    jobs: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    runs: dict[str, int] = msgspec.field(default_factory=dict)
    workers: tuple[PrunedWorker, ...] = ()
    # ``runs`` by the queue the runs were claimed in (``Claimed.queue``); absent from pruned
    # events written before runs were counted per queue, whose runs count under queue "".
    queue_runs: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    # The recent starts (seq, at) of each rate-limited queue some of whose counted starts
    # left with these events, all of them as they stood (``projections.queues``).
    starts: dict[str, tuple[tuple[int, str], ...]] = msgspec.field(default_factory=dict)


Event = (
    Enqueued
    | Claimed
    | Started
    | Completed
    | Failed
    | TimedOut
    | LeaseExpired
    | Fenced
    | Released
    | ScheduledRetry
    | Unblocked
    | CancelRequested
    | Cancelled
    | Dead
    | Requeued
    | Edited
    | Restarted
    | SignalRequested
    | Signalled
    | WorkerStarted
    | WorkerHeartbeat
    | WorkerStopped
    | WorkerLost
    | StopRequested
    | ConfigChanged
    | QueuePaused
    | QueueResumed
    | QueueLimited
    | ScheduleAdded
    | ScheduleRemoved
    | SchedulePaused
    | ScheduleResumed
    | ScheduleFired
    | ScheduleSkipped
    | HookAdded
    | HookRemoved
    | TokenAdded
    | TokenRevoked
    | Pruned
)

TAGS: dict[str, type] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in Event.__args__  # type: ignore[attr-defined]
}
TAG_OF: dict[type, str] = {cls: tag for tag, cls in TAGS.items()}  # ``event.type``, by lookup

_encoder = msgspec.json.Encoder()
_checkers: dict[type, Callable[[bytes], _Event]] = {}  # each event type's own decoder


def encode(event: _Event) -> str:
    """The event's ledger body. Refuses (InvalidInput) an event that would not decode back
    to an equal event: a non-finite float becomes ``null``, which no reader could ever
    decode again, and the ledger is append-only."""
    try:
        body = _encoder.encode(event)
        # A non-finite float is what encodes to a value that reads back otherwise (null):
        # a body without a null reads back as written, and is not decoded to say so.
        same = b"null" not in body or _checker(type(event))(body) == event
    except (msgspec.MsgspecError, UnicodeEncodeError, OverflowError) as exc:
        raise InvalidInput(f"refused an event ({event.type}) that cannot be stored: {exc}") from exc
    if not same:
        raise InvalidInput(
            f"refused an event ({event.type}) that would not read back as written: "
            f"{body.decode(errors='replace')[:200]}")
    return body.decode()


def _checker(cls: type) -> Callable[[bytes], _Event]:
    """A decoder of one event type: what ``encode`` reads its body back with. A writer
    (``queuectl enqueue``) needs the one of the types it writes, and never pays for
    ``decode``'s, which makes one for every type at once."""
    try:
        return _checkers[cls]
    except KeyError:
        check: Callable[[bytes], _Event] = msgspec.json.Decoder(cls).decode
        _checkers[cls] = check
        return check


# ``decode``: the body of any event back into its event. It is the decoder's own method, not
# a wrapper (a replay calls it once per event), made on first use (``__getattr__``).
decode: Callable[[str | bytes], Event]


def __getattr__(name: str) -> object:
    if name == "decode":
        global decode
        decode = msgspec.json.Decoder(Event).decode
        return decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
