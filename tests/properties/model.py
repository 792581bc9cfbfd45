"""The state machine's model of the queue (its jobs, runs and workers), the clock and the
random numbers the core sees during the test, and the inputs the machine draws from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from queuectl import claims, clock, states

START = datetime(2030, 1, 1, tzinfo=UTC)
STATES = set(states.STATES)  # all eight
FINAL = ("completed", "dead", "cancelled")
HAS_RUN_AT = ("pending", "scheduled", "waiting", "failed")

# (key, text, the canonical value stored, or None when the value must be refused).
# lease-timeout and heartbeat-interval are also refused when lease <= heartbeat: the model
# decides that part from the values set so far.
CONFIG_CASES = [
    ("max-retries", "0", "0"),
    ("max-retries", "2", "2"),
    ("max-retries", " 3 ", "3"),
    ("max-retries", "-1", None),
    ("max-retries", "1.5", None),
    ("max-retries", "three", None),
    ("max-retries", "", None),
    ("backoff-base", "1", "1"),
    ("backoff-base", "1.5", "1.5"),
    ("backoff-base", "3.0", "3"),
    ("backoff-base", "0.5", None),
    ("backoff-base", "nan", None),
    ("backoff-base", "inf", None),
    ("backoff-max", "0", "0"),
    ("backoff-max", "3", "3"),
    ("backoff-max", "1.5", "1.5"),
    ("backoff-max", "2.5", "2.5"),
    ("backoff-max", "-1", None),
    ("backoff-jitter", "0", "0"),
    ("backoff-jitter", "0.5", "0.5"),
    ("backoff-jitter", "1", "1"),
    ("backoff-jitter", "1.5", None),
    ("backoff-jitter", "-0.1", None),
    ("lease-timeout", "5", "5"),
    ("lease-timeout", "12.5", "12.5"),
    ("lease-timeout", "60", "60"),
    ("lease-timeout", "0.1", None),
    ("heartbeat-interval", "1", "1"),
    ("heartbeat-interval", "4", "4"),
    ("heartbeat-interval", "20", "20"),
    ("heartbeat-interval", "0", None),
    ("job-timeout", "0", "0"),
    ("job-timeout", "2.5", "2.5"),
    ("job-timeout", "-1", None),
    ("output-limit", "8", "8"),
    ("output-limit", "2048", None),
    ("no-such-key", "1", None),
]

# How a new job asks to be run: now (most often), after a delay, or at a time given in
# each form the CLI accepts (canonical UTC, without a zone, with an offset, in the past).
TIMINGS = ["now"] * 6 + ["delay", "delay", "run_at", "naive run_at", "offset run_at", "past"]
# What an enqueue request holds besides well-formed new jobs: mostly nothing.
FAULTS = ["none"] * 9 + ["dependency within", "duplicate within", "self dependency",
                         "unknown dependency"]
# Values random.random() returns to a jittered retry.
DRAWS = st.sampled_from([0.0, 0.3, 0.75, 0.9999])


class FakeClock:
    """The only clock the core sees during this test; moved by ``time_passes`` alone."""

    def __init__(self) -> None:
        self.t = START

    def now(self) -> str:
        return clock.iso(self.t)

    def after(self, seconds: float) -> str:
        return clock.iso(self.t + timedelta(seconds=seconds))


class FakeRandom:
    """``random.random`` as the core sees it: the machine sets each step's value and counts
    the draws (made when a jittered retry is decided, never on replay)."""

    def __init__(self) -> None:
        self.value = 0.5
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self.value


CLOCK = FakeClock()
RANDOM = FakeRandom()


@dataclass
class Job:
    max_retries: int
    backoff_base: float
    timeout: float
    run_at: str | None
    priority: int = 0
    backoff_max: float = 0.0
    backoff_jitter: float = 0.0
    after: tuple[str, ...] = ()
    state: str = "pending"
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False


@dataclass
class Run:
    """One row the ``runs`` projection must hold."""

    job_id: str
    attempt: int
    worker_id: str
    claimed_at: str
    wait: float
    outcome: str | None = None
    exit_code: int | None = None
    dead: bool = False

    def row(self) -> tuple[object, ...]:
        return (self.job_id, self.attempt, self.worker_id, self.claimed_at, self.wait,
                self.outcome, self.exit_code, int(self.dead))


@dataclass
class Worker:
    last_beat: str
    state: str = "active"  # what the workers table must say: active, stopped or gone
    alive: bool = True  # the process still runs (a worker declared gone may not know it yet)
    stop_requested: bool = False
    claim: claims.Claim | None = None  # the job the process believes it holds
