"""Stateful property test of the queue's core (issues 3 and 5).

Random sequences of enqueue (with priorities, delays, run_at times and dependencies, and
requests that must be refused), claim, complete / fail / time out / release / cancel (through
``finish`` and through ``finish_and_claim``), cancel from the command line, time passing,
heartbeats, crashes, rescue, dlq retry, config set and stop run against a fresh database per
example and against a small model kept in Python. After every step the projections must obey
the queue's invariants and agree with the model; at the end of each example replaying the
ledger must give exactly the live projections, and draining the queue (with a DLQ retry of
every dead job) must leave every job completed or cancelled.

Time is a fake clock (``queuectl.clock.now`` is patched) that only the ``time_passes`` rule
moves, so leases expire, retries and scheduled jobs come due without sleeping. Backoff jitter
draws ``random.random()``, which is patched too: the machine picks the value and predicts
the delay. Each example gets its own temporary directory: function-scoped fixtures are not
reset between hypothesis examples.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import check_both_ways, pg_database, rescued
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from queuectl import claims, clock, decisions, ledger, reads, records, states
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.settings import SETTINGS

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


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        CLOCK.t = START
        self.dir = tempfile.mkdtemp(prefix="queuectl-properties-")
        self.database = None
        if STORE == "postgres":  # a fresh database per example, as the SQLite file is
            self.database = pg_database()
            self.conn = ledger.connect(self.database.__enter__(), durable=False)
        else:
            self.conn = ledger.connect(Path(self.dir) / "queue.db", durable=False)
        self.jobs: dict[str, Job] = {}  # insertion order is enqueue (seq) order
        self.workers: dict[str, Worker] = {}
        self.runs: list[Run] = []
        self.config = {key: s.default for key, s in SETTINGS.items()}
        self.serial = 0
        self.draws = 0  # random numbers the model expects the current step to draw
        self.rescue_may_act = True
        # The rescuer's own clock is the fake one, and it watches after every step, so the
        # silence it measures is exactly the time since each worker's last sign of life.
        self.silence = claims.Silence(clock=lambda: CLOCK.t.timestamp())

    # -- helpers ---------------------------------------------------------------------------

    def _name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def _event_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])

    def _last_seq(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def _since(self, seq: int) -> list[ev.Event]:
        return [e for _, _, e in ledger.read_events(self.conn, "WHERE seq > ?", (seq,))]

    def _refused(self, error: type[Exception], call, *args) -> None:  # type: ignore[no-untyped-def]
        """``call`` must raise ``error`` and write nothing."""
        before = self._event_count()
        with pytest.raises(error):
            call(self.conn, *args)
        assert self._event_count() == before
        assert not self.conn.in_transaction

    def _lease(self) -> float:
        return float(self.config["lease-timeout"])

    def _held_by(self, wid: str) -> list[str]:
        return [i for i, j in self.jobs.items() if j.state == "processing" and j.worker == wid]

    def _claimable(self, job: Job, now: str) -> bool:
        return job.state == "pending" or (
            job.state in ("scheduled", "failed") and job.run_at is not None and job.run_at <= now
        )

    def _next_eligible(self) -> str | None:
        """The job a claim must take now: highest priority, then oldest."""
        now, best = CLOCK.now(), None
        for job_id, job in self.jobs.items():
            if not self._claimable(job, now):
                continue
            if best is None or job.priority > self.jobs[best].priority:  # ties: the oldest
                best = job_id
        return best

    def _open_run(self, job_id: str) -> Run:
        (run,) = [r for r in self.runs if r.job_id == job_id and r.outcome is None]
        return run

    def _close_run(self, job_id: str, outcome: str, exit_code: int | None = None) -> None:
        run = self._open_run(job_id)
        run.outcome, run.exit_code = outcome, exit_code

    def _retry_or_dead(self, job_id: str, job: Job, reason: str) -> ev.Event:
        """The retry rule, as DESIGN.md and issue 5 state it, applied to the model: after the
        k-th failed run wait ``base ** k`` seconds, capped by backoff-max, shortened by up to
        backoff-jitter (a fraction drawn now); after ``1 + max_retries`` runs, dead."""
        k = job.attempts
        job.worker, job.cancel_requested = None, False
        if k >= 1 + job.max_retries:
            job.state, job.run_at = "dead", None
            [r for r in self.runs if r.job_id == job_id][-1].dead = True
            return ev.Dead(job_id=job_id, attempts=k, reason=reason)
        delay = job.backoff_base**k
        if job.backoff_max:
            delay = min(delay, job.backoff_max)
        if job.backoff_jitter:
            self.draws += 1
            delay = round(delay * (1 - job.backoff_jitter * RANDOM.value), 3)
            assert 0 <= delay <= job.backoff_base**k
        job.state, job.run_at = "failed", CLOCK.after(delay)
        return ev.ScheduledRetry(job_id=job_id, attempt=k, delay=delay, run_at=job.run_at)

    def _unblock(self, completed: str) -> list[ev.Event]:
        """Waiting jobs whose last unfinished dependency just completed, oldest first."""
        now, events = CLOCK.now(), []
        for job_id, job in self.jobs.items():
            if job.state == "waiting" and completed in job.after and all(
                self.jobs[d].state == "completed" for d in job.after
            ):
                assert job.run_at is not None
                job.run_at = max(job.run_at, now)
                job.state = "scheduled" if job.run_at > now else "pending"
                events.append(ev.Unblocked(job_id=job_id, completed=completed))
        return events

    def _dependents(self, roots: set[str]) -> set[str]:
        """Waiting jobs that depend on any of ``roots``, directly or not."""
        found: set[str] = set()
        grew = True
        while grew:
            grew = False
            for job_id, job in self.jobs.items():
                if job_id not in found and job.state == "waiting" and any(
                    d in roots or d in found for d in job.after
                ):
                    found.add(job_id)
                    grew = True
        return found

    def _cancel(self, root: str) -> set[str]:
        """``root`` becomes cancelled, and so does every job waiting on it; returns those."""
        cascaded = self._dependents({root})
        for job_id in {root} | cascaded:
            job = self.jobs[job_id]
            job.state, job.worker, job.run_at, job.cancel_requested = "cancelled", None, None, False
        return cascaded

    def _check_cascade(self, events: list[ev.Event], root: str, cascaded: set[str]) -> None:
        """One ``cancelled`` event per dependent, each naming a dependency cancelled before it."""
        assert all(isinstance(e, ev.Cancelled) and e.worker_id is None for e in events), events
        assert sorted(e.job_id for e in events) == sorted(cascaded), (events, cascaded)
        gone = {root}
        for event in events:
            assert isinstance(event, ev.Cancelled)
            named = event.reason.removeprefix("dependency ").removesuffix(" was cancelled")
            assert named in gone and named in self.jobs[event.job_id].after, event
            gone.add(event.job_id)

    def _cancel_outlived_run(self, job_id: str, held_attempt: int, ended: str) -> None:
        """A cancel was requested while the job ran, and the run then ended some other way
        than completing or being cancelled by its worker (it failed or timed out first, the
        worker was shut down hard, or the worker was lost). The user asked for the job to
        stop and was told its worker would stop it: it must not run again. It is cancelled,
        with the jobs waiting on it (or dead, if that run was its last by the retry rule)."""
        job = self.jobs[job_id]
        row = reads.get_job(self.conn, job_id)
        allowed = {"cancelled", "dead"} if held_attempt >= 1 + job.max_retries else {"cancelled"}
        assert row.state in allowed, (
            f"job {job_id}: its cancel was requested while it ran and the run then ended "
            f"({ended}); the job is now {row.state!r}, so it will run again"
        )
        assert row.attempts in (held_attempt, held_attempt - 1), row
        job.attempts = row.attempts
        if row.state == "dead":
            job.state, job.worker, job.run_at, job.cancel_requested = "dead", None, None, False
            [r for r in self.runs if r.job_id == job_id][-1].dead = True
        else:
            self._cancel(job_id)

    def _idle(self) -> list[str]:
        """Workers whose loop would claim: running, active, no stop requested, not busy."""
        return [
            wid
            for wid, w in self.workers.items()
            if w.alive and w.state == "active" and not w.stop_requested and w.claim is None
        ]

    def _unaware(self) -> list[str]:
        """Idle workers declared lost by another's rescue, or asked to stop, whose loop has
        not noticed yet."""
        return [
            wid
            for wid, w in self.workers.items()
            if w.alive and (w.state == "gone" or w.stop_requested) and w.claim is None
        ]

    def _open(self) -> list[str]:
        return [i for i, j in self.jobs.items() if j.state not in FINAL]

    def _busy(self) -> list[str]:
        return [wid for wid, w in self.workers.items() if w.alive and w.claim is not None]

    def _cancelling(self) -> list[str]:
        """Busy workers whose job has a cancel request: their next check will see it."""
        return [
            wid for wid in self._busy()
            if self.jobs[self.workers[wid].claim.job_id].cancel_requested  # type: ignore[union-attr]
        ]

    def _beating(self) -> list[str]:
        """Workers that send heartbeats: active ones, and lost ones still running a job."""
        return [
            wid
            for wid, w in self.workers.items()
            if w.alive and (w.state == "active" or w.claim is not None)
        ]

    def _spec(self, data: st.DataObject, pool: list[str]) -> decisions.JobSpec:
        """A well-formed new job, as the CLI hands it to the core (through check_spec)."""
        after: list[str] = []
        if pool and data.draw(st.booleans(), label="after existing jobs"):
            after = data.draw(
                st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True),
                label="after",
            )
        # A job that waits is often due later too: unblocking must keep its run_at.
        timing = data.draw(st.sampled_from(TIMINGS[4:] if after else TIMINGS), label="timing")
        delay: float | None = None
        run_at: str | None = None
        if timing == "delay":
            delay = data.draw(st.sampled_from([0, 0.25, 1, 3, 7.5, 30, 120]), label="delay")
        elif timing != "now":
            seconds = data.draw(st.sampled_from([0.5, 2, 10, 45, 150]), label="seconds")
            moment = CLOCK.t + timedelta(seconds=-seconds if timing == "past" else seconds)
            run_at = {
                "naive run_at": moment.replace(tzinfo=None).isoformat(),
                "offset run_at": moment.astimezone(timezone(timedelta(hours=2))).isoformat(),
            }.get(timing, clock.iso(moment))
        spec = decisions.JobSpec(
            command="true",
            id=self._name("j"),
            priority=data.draw(st.integers(-2, 2), label="priority"),
            max_retries=data.draw(st.sampled_from([0, 1, 2, 3, None]), label="max_retries"),
            backoff_base=data.draw(st.sampled_from([None, None, 1.0, 1.5, 3.0]), label="base"),
            run_at=run_at,
            delay=delay,
            after=after,
        )
        if run_at is not None:  # every form names the same instant, stored canonically
            canonical = decisions.check_spec(spec).run_at
            assert canonical == clock.iso(clock.parse(run_at)) and canonical.endswith("Z")
        return spec

    def _enqueued(self, specs: list[decisions.JobSpec]) -> None:
        specs = [decisions.check_spec(s) for s in specs]
        now = CLOCK.now()
        before = self._event_count()
        assert decisions.enqueue(self.conn, specs) == [s.id for s in specs]
        assert self._event_count() == before + len(specs)
        new = {s.id: s for s in specs}
        marks = ",".join("?" * len(new))
        stored = [r[0] for r in self.conn.execute(
            f"SELECT id FROM jobs WHERE id IN ({marks}) ORDER BY seq", list(new))]
        assert sorted(stored) == sorted(new)  # type: ignore[type-var]
        if not any(d in new for s in specs for d in s.after):
            assert stored == [s.id for s in specs]  # in the order given
        for n, job_id in enumerate(stored):  # else dependencies first
            assert all(d in stored[:n] for d in new[job_id].after if d in new), stored
        for job_id in stored:
            spec = new[job_id]
            wanted = CLOCK.after(spec.delay) if spec.delay else spec.run_at
            run_at = wanted if wanted is not None and wanted > now else now
            if any(self.jobs[d].state != "completed" for d in spec.after):
                state = "waiting"
            else:
                state = "scheduled" if run_at > now else "pending"
            self.jobs[job_id] = Job(
                max_retries=spec.max_retries
                if spec.max_retries is not None
                else int(self.config["max-retries"]),
                backoff_base=float(self.config["backoff-base"])
                if spec.backoff_base is None
                else spec.backoff_base,
                timeout=float(self.config["job-timeout"]),
                run_at=run_at,
                priority=spec.priority,
                backoff_max=float(self.config["backoff-max"]),
                backoff_jitter=float(self.config["backoff-jitter"]),
                after=tuple(spec.after),
                state=state,
            )

    def _start_worker(self) -> None:
        wid = self._name("w")
        claims.worker_started(self.conn, 1000 + self.serial, "test-host", worker_id=wid)
        self.workers[wid] = Worker(last_beat=CLOCK.now())

    @initialize(
        data=st.data(),
        lease=st.sampled_from(["5", "12.5", "30"]),
        backoff_max=st.sampled_from(["0", "1.5", "3"]),
        jitter=st.sampled_from(["0", "0.5", "1"]),
        workers=st.integers(1, 3),
        jobs=st.integers(0, 4),
    )
    def some_workers_and_jobs(
        self, data: st.DataObject, lease: str, backoff_max: str, jitter: str, workers: int,
        jobs: int,
    ) -> None:
        """Short leases too, so that time passing makes them expire often; capped and
        jittered backoff in most examples."""
        self._config_set("heartbeat-interval", "1", "1")
        self._config_set("lease-timeout", lease, lease)
        self._config_set("backoff-max", backoff_max, backoff_max)
        self._config_set("backoff-jitter", jitter, jitter)
        for _ in range(workers):
            self._start_worker()
        if jobs:
            self._enqueued([self._spec(data, []) for _ in range(jobs)])

    # -- rules: jobs -----------------------------------------------------------------------

    @precondition(lambda self: len(self._open()) < 8)
    @rule(data=st.data(), n=st.integers(1, 3))
    def enqueue(self, data: st.DataObject, n: int) -> None:
        """New jobs, or a request the core must refuse whole, writing nothing."""
        # Dependencies mostly on unfinished jobs: those make jobs wait, then release or
        # cancel them.
        pool = self._open() if data.draw(st.integers(0, 3), label="pool") else []
        pool = pool or [i for i, j in self.jobs.items() if j.state != "cancelled"]
        specs = [self._spec(data, pool) for _ in range(n)]
        faults = list(FAULTS)
        if self.jobs:
            faults.append("duplicate stored")
        if any(j.state == "cancelled" for j in self.jobs.values()):
            faults += ["cancelled dependency"] * 2
        if n > 1:
            faults.append("cycle")
        fault = data.draw(st.sampled_from(faults), label="fault")
        i = data.draw(st.integers(0, n - 1), label="which")
        if fault in ("none", "dependency within"):
            if fault == "dependency within" and n > 1:
                j = data.draw(st.sampled_from([j for j in range(n) if j != i]), label="on")
                specs[i].after.append(specs[j].id)  # type: ignore[arg-type]
            self._enqueued(specs)
            return
        if fault == "duplicate within":
            specs.append(decisions.JobSpec(command="true", id=specs[0].id))
            error: type[Exception] = Conflict
        elif fault == "duplicate stored":
            stored = data.draw(st.sampled_from(list(self.jobs)), label="stored id")
            specs[i] = decisions.JobSpec(command="true", id=stored)
            error = Conflict
        elif fault == "self dependency":
            specs[i].after.append(specs[i].id)  # type: ignore[arg-type]
            error = InvalidInput
        elif fault == "unknown dependency":
            specs[i].after.append(self._name("nope"))
            error = NotFound
        elif fault == "cancelled dependency":
            cancelled = [k for k, j in self.jobs.items() if j.state == "cancelled"]
            specs[i].after.append(data.draw(st.sampled_from(cancelled), label="cancelled"))
            error = Conflict
        else:  # a cycle through every job of the request
            for k in range(n):
                specs[k].after.append(specs[(k + 1) % n].id)  # type: ignore[arg-type]
            error = InvalidInput
        self._refused(error, decisions.enqueue, [decisions.check_spec(s) for s in specs])

    def _expect_claim(self, wid: str, got: claims.Claim | None) -> None:
        """``got`` is what ``wid`` was given by a claim made now: the model's next eligible
        job, or nothing for a worker that is not active or was asked to stop."""
        worker = self.workers[wid]
        expected = None
        if worker.state == "active" and not worker.stop_requested:
            expected = self._next_eligible()
        if expected is None:
            assert got is None, f"{wid} was given {got}, expected nothing"
            return
        assert got is not None and got.job_id == expected, (
            f"{wid} was given {got and got.job_id}, expected {expected}: "
            f"{ {i: (j.state, j.priority, j.run_at) for i, j in self.jobs.items()} }"
        )
        job, now = self.jobs[expected], CLOCK.now()
        assert got == claims.Claim(
            expected, "true", job.attempts + 1, job.max_retries, job.backoff_base, job.timeout,
            job.backoff_max, job.backoff_jitter,
        )
        assert job.run_at is not None
        wait = max(0.0, round(clock.seconds_between(job.run_at, now), 6))
        self.runs.append(Run(expected, got.attempt, wid, now, wait))
        job.state, job.attempts, job.worker, job.run_at = "processing", got.attempt, wid, None
        worker.claim, worker.last_beat = got, now

    @precondition(lambda self: (self._idle() and self._open()) or self._unaware())
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(self._idle() + self._unaware()), label="worker")
        if wid in self._unaware():
            self._claim_refused(wid)
            return
        before = self._last_seq()
        got = claims.claim(self.conn, wid)
        self._expect_claim(wid, got)
        assert len(self._since(before)) == (got is not None)

    def _claim_refused(self, wid: str) -> None:
        """Worker._loop reads its own state outside the claim's transaction: another worker's
        rescue can declare it lost in between (after a suspend, both wake at once), or a
        stop be requested. Rescue looks only at active workers, so a job handed to a lost
        one would stay ``processing`` forever if it then died, and one asked to stop must
        not start anything new: the claim itself must refuse, and write nothing."""
        before = self._event_count()
        got = claims.claim(self.conn, wid)
        worker = self.workers[wid]
        assert got is None, (
            f"worker {wid} ({worker.state}, stop requested: {worker.stop_requested}) was "
            f"given job {got.job_id}"
        )
        assert self._event_count() == before
        self._loop_checks(wid)

    def _finish(self, wid: str, outcome: str, exit_code: int = 1, chained: bool = False) -> None:
        """The worker records how the run of the job it believes it holds ended; ``chained``
        is the worker's busy path, ``finish_and_claim``, which also claims its next job."""
        worker = self.workers[wid]
        held = worker.claim
        assert held is not None
        worker.claim = None
        common = {"job_id": held.job_id, "worker_id": wid, "attempt": held.attempt}
        result: ev.Event = {
            "completed": lambda: ev.Completed(**common),
            "failed": lambda: ev.Failed(**common, exit_code=exit_code, error=f"exit {exit_code}"),
            "timed-out": lambda: ev.TimedOut(**common, timeout=held.timeout),
            "released": lambda: ev.Released(**common, reason="hard shutdown"),
            "cancelled": lambda: ev.Cancelled(**common, reason="cancelled by user while running"),
        }[outcome]()
        job = self.jobs[held.job_id]
        still_held = (job.state, job.worker, job.attempts) == ("processing", wid, held.attempt)
        expected: list[ev.Event] = []
        cascaded: set[str] | None = None  # when the worker cancelled its job: the dependents
        outlived = False  # a cancel request that this run's end does not honour by itself
        self.draws = 0
        if still_held:  # else its lease expired: the job already went through the retry rule
            expected.append(result)
            code = {"completed": 0, "failed": exit_code}.get(outcome)
            self._close_run(held.job_id, outcome, code)
            if outcome == "completed":
                job.state, job.worker, job.cancel_requested = "completed", None, False
                expected += self._unblock(held.job_id)
            elif outcome == "cancelled":
                cascaded = self._cancel(held.job_id)
            elif job.cancel_requested:
                outlived = True
            elif outcome == "released":
                job.state, job.worker, job.run_at = "pending", None, CLOCK.now()
                job.attempts = held.attempt - 1
            else:
                reason = f"exit {exit_code}" if outcome == "failed" else "timed out"
                expected.append(self._retry_or_dead(held.job_id, job, reason))
            if outcome != "released":
                worker.last_beat = CLOCK.now()
        before = self._last_seq()
        RANDOM.draws = 0
        if chained:
            got, following = claims.finish_and_claim(self.conn, held, result, wid)
        else:
            got, following = claims.finish(self.conn, held, result), None
        written = self._since(before)
        assert written == got + ([written[-1]] if following else [])  # what it says it wrote
        if outlived:
            assert got[:1] == [result], got
            self._cancel_outlived_run(held.job_id, held.attempt, outcome)
        elif cascaded is not None:
            assert got[:1] == [result], got
            self._check_cascade(got[1:], held.job_id, cascaded)
        else:
            assert got == expected
            assert RANDOM.draws == self.draws
        if chained:
            self._expect_claim(wid, following)
            if following:
                assert written[-1] == ev.Claimed(
                    job_id=following.job_id, worker_id=wid, attempt=following.attempt,
                    eligible_at=written[-1].eligible_at,  # type: ignore[union-attr]
                )

    def _run_ends(self, data: st.DataObject, outcome: str, exit_code: int, chained: bool) -> None:
        """A busy worker's run ends. When its job has a cancel request, the worker's check
        (every 0.2 s) mostly sees it first: it kills the run and records ``cancelled``."""
        wid = data.draw(st.sampled_from(self._busy()), label="worker")
        if wid in self._cancelling() and data.draw(st.sampled_from([True, True, False])):
            outcome = "cancelled"
        self._finish(wid, outcome, exit_code, chained)
        self._loop_checks(wid)

    @precondition(lambda self: self._busy())
    @rule(data=st.data(), chained=st.booleans())
    def complete(self, data: st.DataObject, chained: bool) -> None:
        self._run_ends(data, "completed", 0, chained)

    @precondition(lambda self: self._busy())
    @rule(
        data=st.data(),
        exit_code=st.integers(-15, 255).filter(bool),
        timed_out=st.booleans(),
        chained=st.booleans(),
        draw=DRAWS,
    )
    def fail(
        self, data: st.DataObject, exit_code: int, timed_out: bool, chained: bool, draw: float
    ) -> None:
        RANDOM.value = draw
        self._run_ends(data, "timed-out" if timed_out else "failed", exit_code, chained)

    # -- rules: workers and time -----------------------------------------------------------

    @precondition(lambda self: not self._idle())
    @rule()
    def start_worker(self) -> None:
        """Only when no worker is free to claim: more would just thin out the work."""
        self._start_worker()

    @precondition(lambda self: self._beating())
    @rule(data=st.data(), every=st.booleans())
    def heartbeat(self, data: st.DataObject, every: bool) -> None:
        beating = self._beating()
        for wid in beating if every else [data.draw(st.sampled_from(beating), label="worker")]:
            claims.heartbeat(self.conn, wid)
            self.workers[wid].last_beat = CLOCK.now()

    @rule(
        seconds=st.integers(0, 20) | st.integers(1, 3000).map(lambda ms: ms / 1000),
        past_lease=st.sampled_from([False, False, False, True]),
    )
    def time_passes(self, seconds: float, past_lease: bool) -> None:
        if past_lease:  # long enough for every worker that does not beat to lose its lease
            seconds += self._lease() + 1
        CLOCK.t += timedelta(seconds=seconds)
        self.rescue_may_act = True

    @precondition(lambda self: self.rescue_may_act)
    @rule(draw=DRAWS)
    def rescue(self, draw: float) -> None:
        # Until time passes or the lease shrinks, a second rescue could only repeat this one.
        self.rescue_may_act = False
        RANDOM.value, self.draws = draw, 0
        lease = self._lease()
        cutoff = clock.iso(CLOCK.t + timedelta(seconds=-lease))
        expected: dict[str, list[ev.Event]] = {}
        outlived: dict[str, int] = {}  # cancel-requested jobs taken back: their attempt
        for wid, worker in self.workers.items():
            if worker.state != "active" or not worker.last_beat < cutoff:
                continue
            worker.state, beat, held = "gone", worker.last_beat, self._held_by(wid)
            expected[wid] = [] if held else [ev.WorkerLost(worker_id=wid, last_heartbeat=beat)]
            for job_id in held:
                job = self.jobs[job_id]
                expected[wid].append(
                    ev.LeaseExpired(
                        job_id=job_id, worker_id=wid, attempt=job.attempts, last_heartbeat=beat
                    )
                )
                self._close_run(job_id, "lease-expired")
                if job.cancel_requested:
                    outlived[job_id] = job.attempts
                else:
                    expected[wid].append(self._retry_or_dead(job_id, job, "lease expired"))
        # What follows the lease-expired event of an outlived job is judged by its result.
        judged_apart = set(outlived) | self._dependents(set(outlived))
        got: dict[str, list[ev.Event]] = {}
        current = ""
        before = self._last_seq()
        RANDOM.draws = 0
        events = claims.rescue(self.conn, claims.silent_workers(self.conn, lease, self.silence))
        assert self._since(before) == events
        for event in events:
            if isinstance(event, ev.LeaseExpired | ev.WorkerLost):
                current = event.worker_id
            elif getattr(event, "job_id", None) in judged_apart:
                continue
            got.setdefault(current, []).append(event)
        assert got == expected
        if not outlived:
            assert RANDOM.draws == self.draws
        for job_id, attempt in outlived.items():
            self._cancel_outlived_run(job_id, attempt, "lease expired")

    @precondition(lambda self: any(w.alive for w in self.workers.values()))
    @rule(data=st.data(), how=st.sampled_from(["kill -9", "double ctrl-c", "job limit reached"]))
    def worker_exits(self, data: st.DataObject, how: str) -> None:
        """A worker process ends: killed (recording nothing), forced (releasing its job), or
        of its own accord between jobs."""
        alive = [wid for wid, w in self.workers.items() if w.alive]
        wid = data.draw(st.sampled_from(alive), label="worker")
        worker = self.workers[wid]
        if how == "kill -9":
            # The database still says it holds its job: only rescue can take it back.
            worker.alive, worker.claim = False, None
            return
        if worker.claim is not None:
            if how != "double ctrl-c":
                return  # only a forced stop abandons a running job
            self._finish(wid, "released")
        self._stop(wid, "signal" if how == "double ctrl-c" else how)

    def _loop_checks(self, wid: str) -> None:
        """An idle worker that was asked to stop, or was declared lost, stops at once."""
        worker = self.workers[wid]
        if worker.alive and worker.claim is None:
            if worker.stop_requested:
                self._stop(wid, "stop requested")
            elif worker.state == "gone":
                self._stop(wid, "declared lost by another worker")

    def _stop(self, wid: str, reason: str) -> None:
        claims.worker_stopped(self.conn, wid, reason)
        worker = self.workers[wid]
        worker.state, worker.alive, worker.last_beat = "stopped", False, CLOCK.now()

    # -- rules: what a person does at the command line -----------------------------------

    @rule(
        data=st.data(),
        action=st.sampled_from(["config set", "dlq retry", "worker --stop", "cancel", "cancel"]),
    )
    def operator(self, data: st.DataObject, action: str) -> None:
        """One rule for them all, so that they do not crowd out the workers' steps."""
        if action == "cancel":
            self._cancel_by_user(data)
        elif action == "config set":
            self._config_set(*data.draw(st.sampled_from(CONFIG_CASES), label="config"))
        elif action == "dlq retry":
            self._dlq_retry(data)
        else:
            self._request_stop(data)

    def _cancel_by_user(self, data: st.DataObject) -> None:
        """``queuectl cancel ID`` on a job in any state (mostly unfinished ones, often a
        running one), or on no job at all."""
        which = data.draw(st.sampled_from(["running", "running", "unfinished", "any"]))
        choices = {
            "running": [i for i, j in self.jobs.items() if j.state == "processing"],
            "unfinished": self._open(),
        }.get(which, [])
        job_id = data.draw(st.sampled_from(choices or [*self.jobs, "no-such-job"]), label="job")
        if job_id not in self.jobs:
            self._refused(NotFound, decisions.cancel, job_id)
            return
        job = self.jobs[job_id]
        if job.state in FINAL:
            self._refused(Conflict, decisions.cancel, job_id)
            return
        before = self._last_seq()
        if job.state == "processing":
            assert decisions.cancel(self.conn, job_id) == "requested"
            written = self._since(before)
            assert written == ([] if job.cancel_requested else [ev.CancelRequested(job_id=job_id)])
            job.cancel_requested = True
            return
        assert decisions.cancel(self.conn, job_id) == "cancelled"
        cascaded = self._cancel(job_id)
        written = self._since(before)
        assert written[:1] == [ev.Cancelled(job_id=job_id, reason="cancelled by user")]
        self._check_cascade(written[1:], job_id, cascaded)

    def _config_set(self, key: str, text: str, canonical: str | None) -> None:
        if canonical is not None:
            after = self.config | {key: canonical}
            if float(after["lease-timeout"]) <= float(after["heartbeat-interval"]):
                canonical = None
        if canonical is None:
            self._refused(InvalidInput, decisions.set_config, key, text)
            return
        assert decisions.set_config(self.conn, key, text) == canonical
        self.config[key] = canonical
        self.rescue_may_act = True

    def _dlq_retry(self, data: st.DataObject) -> None:
        dead = [i for i, j in self.jobs.items() if j.state == "dead"]
        if dead and data.draw(st.booleans(), label="retry a dead job"):
            job_id = data.draw(st.sampled_from(dead), label="dead job")
            job = self.jobs[job_id]
            assert decisions.dlq_retry(self.conn, job_id) == job.max_retries
            job.state, job.attempts, job.run_at = "pending", 0, CLOCK.now()
            return
        others = [i for i, j in self.jobs.items() if j.state != "dead"]
        job_id = data.draw(st.sampled_from([*others, "no-such-job"]), label="job")
        self._refused(NotFound if job_id == "no-such-job" else Conflict, decisions.dlq_retry, job_id)

    def _request_stop(self, data: st.DataObject) -> None:
        active = [wid for wid, w in self.workers.items() if w.state == "active"]
        assert decisions.request_stop(self.conn) == len(active)
        noticed = data.draw(st.booleans(), label="idle workers notice at once")
        for wid in active:
            self.workers[wid].stop_requested = True
            if noticed:
                self._loop_checks(wid)

    # -- invariants ------------------------------------------------------------------------

    def _rows(self) -> dict[str, records.Job]:
        return {j.id: j for j in reads.list_jobs(self.conn)}

    @invariant()
    def rescuer_watches(self) -> None:
        claims.silent_workers(self.conn, float("inf"), self.silence)

    @invariant()
    def job_rows_are_legal(self) -> None:
        holders: Counter[str] = Counter()
        for job_id, row in self._rows().items():
            state = row.state
            assert state in STATES, (job_id, state)
            assert 0 <= row.attempts <= 1 + row.max_retries, (job_id, row)
            if state == "processing":
                assert row.worker_id is not None, (job_id, row)
                holders[row.worker_id] += 1
            else:
                assert row.worker_id is None, (job_id, row)
                # A cancel request lives as long as the run it asks to stop.
                assert not row.cancel_requested, (job_id, row)
            assert (row.run_at is not None) == (state in HAS_RUN_AT), (job_id, row)
        assert all(n == 1 for n in holders.values()), holders
        # No job is processing without an active holder: rescue only looks at active
        # workers, so a job held by any other would never come back.
        active = {r.id for r in reads.workers(self.conn)}
        assert set(holders) <= active, (holders, active)

    @invariant()
    def dependencies_hold(self) -> None:
        rows = self._rows()
        deps: dict[str, set[str]] = defaultdict(set)
        for job_id, dep in self.conn.execute("SELECT job_id, depends_on FROM job_deps"):
            deps[job_id].add(dep)
        for job_id, row in rows.items():
            after = set(row.after)
            assert after == deps[job_id] == set(self.jobs[job_id].after), job_id
            unfinished = [d for d in deps[job_id] if rows[d].state != "completed"]
            if row.state == "waiting":  # it waits for something
                assert unfinished, (job_id, {d: rows[d].state for d in deps[job_id]})
            elif row.state != "cancelled":  # nothing else runs before its dependencies
                assert not unfinished, (job_id, row.state, unfinished)
            for dep in deps[job_id]:  # the dependents of a cancelled job are cancelled
                if rows[dep].state == "cancelled":
                    assert row.state == "cancelled", (job_id, row.state, dep)

    @invariant()
    def counts_match_jobs(self) -> None:
        kept = dict(self.conn.execute("SELECT state, n FROM job_counts").fetchall())
        actual = dict(
            self.conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        )
        assert set(actual) <= STATES, actual
        assert kept == {s: actual.get(s, 0) for s in states.STATES}
        assert reads.counts(self.conn) == kept

    @invariant()
    def runs_match(self) -> None:
        """The runs projection holds one row per claim, closed by its outcome; run_counts
        equals the same totals counted over it."""
        rows = self.conn.execute(
            "SELECT job_id, attempt, worker_id, claimed_at, wait, outcome, exit_code, dead "
            "FROM runs ORDER BY seq"
        ).fetchall()
        assert rows == [r.row() for r in self.runs]
        kept = dict(self.conn.execute("SELECT outcome, n FROM run_counts").fetchall())
        (claimed, dead) = self.conn.execute(
            "SELECT count(*), coalesce(sum(dead), 0) FROM runs"
        ).fetchone()
        counted = dict(self.conn.execute(
            "SELECT outcome, count(*) FROM runs WHERE outcome IS NOT NULL GROUP BY outcome"
        ).fetchall()) | {"claimed": claimed, "dead": dead}
        assert kept == {k: n for k, n in counted.items() if n}
        unfinished = {r[0] for r in self.conn.execute(
            "SELECT job_id FROM runs WHERE finished_at IS NULL")}
        processing = {r[0] for r in self.conn.execute(
            "SELECT id FROM jobs WHERE state = 'processing'")}
        assert unfinished == processing

    @invariant()
    def attempts_match_claims(self) -> None:
        """Runs started since the last requeue = claimed - released events."""
        runs: Counter[str] = Counter()
        for job_id, type_ in self.conn.execute(
            "SELECT job_id, type FROM events WHERE type IN ('claimed', 'released', 'requeued') "
            "ORDER BY seq"
        ):
            runs[job_id] = {"claimed": runs[job_id] + 1, "released": runs[job_id] - 1}.get(type_, 0)
        for job_id, attempts in self.conn.execute("SELECT id, attempts FROM jobs"):
            assert runs[job_id] == attempts, (job_id, runs[job_id], attempts)

    @invariant()
    def model_agrees(self) -> None:
        rows = self._rows()
        assert list(rows) == list(self.jobs)  # same ids, same (enqueue) order
        for job_id, job in self.jobs.items():
            row = rows[job_id]
            got = (row.state, row.attempts, row.max_retries, row.worker_id, row.run_at,
                   row.priority, row.cancel_requested)
            assert got == (job.state, job.attempts, job.max_retries, job.worker, job.run_at,
                           job.priority, job.cancel_requested), job_id
            assert (row.backoff_base, row.timeout, row.backoff_max, row.backoff_jitter) == (
                job.backoff_base, job.timeout, job.backoff_max, job.backoff_jitter), job_id
        # Each state's listing: pending jobs in the order they will be claimed, others
        # oldest first; the next due time is the earliest run_at of a scheduled or failed job.
        for state in states.STATES:
            listed = [j.id for j in reads.list_jobs(self.conn, state)]
            expected = [i for i, j in self.jobs.items() if j.state == state]
            if state == "pending":
                expected.sort(key=lambda i: -self.jobs[i].priority)  # stable: then oldest
            assert listed == expected, state
        due = [j.run_at for j in self.jobs.values() if j.state in ("scheduled", "failed")]
        assert claims.next_run_at(self.conn) == min(due, default=None)  # type: ignore[type-var]
        assert claims.unfinished(self.conn) == sum(
            j.state in ("pending", "processing", "failed") for j in self.jobs.values())
        workers = {r.id: r for r in reads.workers(self.conn, ("active", "stopped", "gone"))}
        stops = dict(self.conn.execute("SELECT id, stop_requested FROM workers").fetchall())
        assert set(workers) == set(self.workers)
        for wid, worker in self.workers.items():
            row = workers[wid]
            held = self._held_by(wid)
            assert row.state == worker.state, wid
            assert row.last_heartbeat == worker.last_beat, wid
            assert row.current_job == (held[0] if held else None), wid
            assert bool(stops[wid]) == worker.stop_requested, wid
        assert dict(self.conn.execute("SELECT key, value FROM config").fetchall()).items() <= (
            self.config.items()
        )

    # -- end of an example -----------------------------------------------------------------

    def _drain_once(self) -> None:
        for _ in range(10 * len(self.jobs) + 10):  # each job: a few runs, a few backoffs
            got = claims.claim(self.conn, "drainer")
            if got is not None:
                done = ev.Completed(job_id=got.job_id, worker_id="drainer", attempt=got.attempt)
                claims.finish(self.conn, got, done)
                continue
            next_run = claims.next_run_at(self.conn)
            if next_run is None:
                break
            CLOCK.t = max(CLOCK.t, clock.parse(next_run))
            claims.heartbeat(self.conn, "drainer")

    def _drain(self) -> None:
        """Every worker dies; a new one must take back every job and run each to the end.
        Jobs waiting on a dead one run once a DLQ retry of it has succeeded."""
        CLOCK.t += timedelta(seconds=self._lease() + 1)
        claims.worker_started(self.conn, 1, "test-host", worker_id="drainer")
        claims.rescue(self.conn, claims.silent_workers(self.conn, self._lease(), self.silence))
        for _ in range(3):
            self._drain_once()
            dead = [r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE state = 'dead'")]
            if not dead:
                break
            for job_id in dead:
                decisions.dlq_retry(self.conn, job_id)
        left = self.conn.execute(
            "SELECT id, state FROM jobs WHERE state NOT IN ('completed', 'cancelled')"
        ).fetchall()
        assert left == [], f"jobs never finished: {left}"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is not None:
                return  # a step already failed: report that, not what follows from it
            RANDOM.draws = 0
            assert check_both_ways(self.conn) == []
            assert RANDOM.draws == 0  # replay never draws a random number
            self._drain()
            assert check_both_ways(self.conn) == []
        finally:
            self.conn.close()
            if self.database is not None:
                self.database.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)


STORE = "sqlite"  # the store the machine's examples run on; set by the test


def test_queue_state_machine(monkeypatch: pytest.MonkeyPatch, db: object) -> None:
    monkeypatch.setattr(clock, "now", CLOCK.now)
    monkeypatch.setattr(random, "random", RANDOM.random)
    monkeypatch.setattr(sys.modules[__name__], "STORE",
                        "postgres" if str(db).startswith("postgresql://") else "sqlite")
    # QUEUECTL_PROPERTY_EXAMPLES=2000 for a long hunt; the default keeps CI fast. A
    # PostgreSQL example costs a database of its own (about 0.3 s) before its first step.
    examples = int(os.environ.get("QUEUECTL_PROPERTY_EXAMPLES", "200"))
    if STORE == "postgres":
        examples = max(1, examples // 4)
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_a_worker_declared_lost_is_given_no_job(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine's shortest failing example for ``_claim_refused``, kept as a plain
    test so that it fails on every run rather than on the runs that happen to find it."""
    monkeypatch.setattr(clock, "now", CLOCK.now)
    CLOCK.t = START
    claims.worker_started(conn, 1, "test-host", worker_id="w1")
    claims.worker_started(conn, 2, "test-host", worker_id="w2")
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="j1")])
    watched = [0.0]
    silence = claims.Silence(clock=lambda: watched[0])
    claims.silent_workers(conn, 30, silence)
    CLOCK.t += timedelta(seconds=31)  # the machine was suspended: both workers fell silent
    watched[0] = 31
    claims.heartbeat(conn, "w2")  # w2 wakes first ...
    lost = claims.rescue(conn, claims.silent_workers(conn, 30, silence))
    assert [e.type for e in lost] == ["worker-lost"]  # ... and loses w1
    # w1 had read its own state ("active") just before that rescue, and now claims:
    assert claims.claim(conn, "w1") is None
    claimed = claims.claim(conn, "w2")
    assert claimed is not None and claimed.job_id == "j1"


@pytest.mark.parametrize("ending", ["lease expired", "run failed", "released"])
def test_a_cancel_requested_while_the_job_runs_is_not_lost(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The machine's shortest failing examples for ``_cancel_outlived_run``. ``cancel`` of a
    running job says its worker will stop it; if the run ends another way first (its worker
    is lost, the command fails before the worker's next cancel check, a hard shutdown
    releases it), the job must still end cancelled, with the jobs waiting on it: not be
    retried, and not go back to pending still flagged, to be started and killed again."""
    monkeypatch.setattr(clock, "now", CLOCK.now)
    CLOCK.t = START
    claims.worker_started(conn, 1, "test-host", worker_id="w1")
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="j", max_retries=1),
                         decisions.JobSpec(command="true", id="d", after=["j"])])
    held = claims.claim(conn, "w1")
    assert held is not None
    assert decisions.cancel(conn, "j") == "requested"
    common = {"job_id": "j", "worker_id": "w1", "attempt": 1}
    if ending == "lease expired":
        CLOCK.t += timedelta(seconds=31)
        claims.worker_started(conn, 2, "test-host", worker_id="w2")
        assert [e.type for e in rescued(conn, 30)][0] == "lease-expired"
    elif ending == "run failed":
        claims.finish(conn, held, ev.Failed(**common, exit_code=1, error="exit 1"))
    else:
        claims.finish(conn, held, ev.Released(**common, reason="hard shutdown"))
    assert [(j.id, j.state, j.cancel_requested) for j in reads.list_jobs(conn)] \
        == [("j", "cancelled", False), ("d", "cancelled", False)]
