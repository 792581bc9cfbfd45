"""Stateful property test of the queue's core (issue 3).

Random sequences of enqueue, claim, complete / fail / time out / release, time passing,
heartbeats, crashes, rescue, dlq retry, config set and stop run against a fresh database per
example and against a small model kept in Python. After every step the projections must obey
the queue's invariants and agree with the model; at the end of each example replaying the
ledger must give exactly the live projections, and draining the queue must leave no job
stuck in ``processing``.

Time is a fake clock (``queuectl.clock.now`` is patched) that only the ``time_passes`` rule
moves, so leases expire and retries come due without sleeping. Each example gets its own
temporary directory: function-scoped fixtures are not reset between hypothesis examples.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
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

from queuectl import clock, ledger, queue
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.settings import SETTINGS

START = datetime(2030, 1, 1, tzinfo=UTC)
STATES = {"pending", "processing", "completed", "failed", "dead"}

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


class FakeClock:
    """The only clock the core sees during this test; moved by ``time_passes`` alone."""

    def __init__(self) -> None:
        self.t = START

    def now(self) -> str:
        return clock.iso(self.t)

    def after(self, seconds: float) -> str:
        return clock.iso(self.t + timedelta(seconds=seconds))


CLOCK = FakeClock()


@dataclass
class Job:
    max_retries: int
    backoff_base: float
    timeout: float
    run_at: str | None
    state: str = "pending"
    attempts: int = 0
    worker: str | None = None


@dataclass
class Worker:
    last_beat: str
    state: str = "active"  # what the workers table must say: active, stopped or gone
    alive: bool = True  # the process still runs (a worker declared gone may not know it yet)
    stop_requested: bool = False
    claim: queue.Claim | None = None  # the job the process believes it holds


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        CLOCK.t = START
        self.dir = tempfile.mkdtemp(prefix="queuectl-properties-")
        self.conn = ledger.connect(Path(self.dir) / "queue.db", durable=False)
        self.jobs: dict[str, Job] = {}  # insertion order is enqueue order
        self.workers: dict[str, Worker] = {}
        self.config = {key: s.default for key, s in SETTINGS.items()}
        self.serial = 0
        self.rescue_may_act = True

    # -- helpers ---------------------------------------------------------------------------

    def _name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def _event_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])

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

    def _next_eligible(self) -> str | None:
        now = CLOCK.now()
        for job_id, job in self.jobs.items():
            if job.state in ("pending", "failed") and job.run_at is not None and job.run_at <= now:
                return job_id
        return None

    def _retry_or_dead(self, job_id: str, job: Job, reason: str) -> ev.Event:
        """The retry rule, as DESIGN.md states it, applied to the model."""
        k = job.attempts
        job.worker = None
        if k >= 1 + job.max_retries:
            job.state, job.run_at = "dead", None
            return ev.Dead(job_id=job_id, attempts=k, reason=reason)
        delay = job.backoff_base**k
        job.state, job.run_at = "failed", CLOCK.after(delay)
        return ev.ScheduledRetry(job_id=job_id, attempt=k, delay=delay, run_at=job.run_at)

    def _idle(self) -> list[str]:
        """Workers whose loop would claim: running, active, no stop requested, not busy."""
        return [
            wid
            for wid, w in self.workers.items()
            if w.alive and w.state == "active" and not w.stop_requested and w.claim is None
        ]

    def _unaware(self) -> list[str]:
        """Idle workers declared lost by another's rescue whose loop has not noticed yet."""
        return [
            wid
            for wid, w in self.workers.items()
            if w.alive and w.state == "gone" and w.claim is None
        ]

    def _waiting(self) -> list[str]:
        return [i for i, j in self.jobs.items() if j.state in ("pending", "failed")]

    def _busy(self) -> list[str]:
        return [wid for wid, w in self.workers.items() if w.alive and w.claim is not None]

    def _beating(self) -> list[str]:
        """Workers that send heartbeats: active ones, and lost ones still running a job."""
        return [
            wid
            for wid, w in self.workers.items()
            if w.alive and (w.state == "active" or w.claim is not None)
        ]

    def _new_specs(self, data: st.DataObject, n: int) -> list[queue.JobSpec]:
        return [
            queue.JobSpec(
                command="true",
                id=self._name("j"),
                max_retries=data.draw(st.sampled_from([0, 1, 2, 3, None]), label="max_retries"),
            )
            for _ in range(n)
        ]

    def _enqueued(self, specs: list[queue.JobSpec]) -> None:
        before = self._event_count()
        assert queue.enqueue(self.conn, specs) == [s.id for s in specs]
        assert self._event_count() == before + len(specs)
        for spec in specs:
            assert spec.id is not None
            self.jobs[spec.id] = Job(
                max_retries=spec.max_retries
                if spec.max_retries is not None
                else int(self.config["max-retries"]),
                backoff_base=float(self.config["backoff-base"]),
                timeout=float(self.config["job-timeout"]),
                run_at=CLOCK.now(),
            )

    def _start_worker(self) -> None:
        wid = self._name("w")
        queue.worker_started(self.conn, wid, 1000 + self.serial, "test-host")
        self.workers[wid] = Worker(last_beat=CLOCK.now())

    @initialize(
        data=st.data(),
        lease=st.sampled_from(["5", "12.5", "30"]),
        workers=st.integers(1, 3),
        jobs=st.integers(0, 4),
    )
    def some_workers_and_jobs(
        self, data: st.DataObject, lease: str, workers: int, jobs: int
    ) -> None:
        """Short leases too, so that time passing makes them expire often."""
        self._config_set("heartbeat-interval", "1", "1")
        self._config_set("lease-timeout", lease, lease)
        for _ in range(workers):
            self._start_worker()
        if jobs:
            self._enqueued(self._new_specs(data, jobs))

    # -- rules: jobs -----------------------------------------------------------------------

    @precondition(lambda self: len(self._waiting()) < 6)
    @rule(data=st.data(), n=st.integers(1, 3))
    def enqueue(self, data: st.DataObject, n: int) -> None:
        specs = self._new_specs(data, n)
        clashes = ["none"] * 3 + ["within"] + (["stored"] if self.jobs else [])
        clash = data.draw(st.sampled_from(clashes), label="duplicate id")
        if clash == "within":
            specs.append(queue.JobSpec(command="true", id=specs[0].id))
        elif clash == "stored":
            index = data.draw(st.integers(0, n - 1), label="replaced")
            stored = data.draw(st.sampled_from(list(self.jobs)), label="stored id")
            specs[index] = queue.JobSpec(command="true", id=stored)
        if clash == "none":
            self._enqueued(specs)
        else:
            self._refused(Conflict, queue.enqueue, specs)

    @precondition(lambda self: self._idle() or self._unaware())
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(self._idle() + self._unaware()), label="worker")
        if self.workers[wid].state == "gone":
            self._claim_by_lost_worker(wid)
            return
        expected = self._next_eligible()
        got = queue.claim(self.conn, wid)
        if expected is None:
            assert got is None
            return
        job = self.jobs[expected]
        assert got == queue.Claim(
            expected, "true", job.attempts + 1, job.max_retries, job.backoff_base, job.timeout
        )
        job.state, job.attempts, job.worker, job.run_at = "processing", got.attempt, wid, None
        worker = self.workers[wid]
        worker.claim, worker.last_beat = got, CLOCK.now()

    def _claim_by_lost_worker(self, wid: str) -> None:
        """Worker._loop reads its own state outside the claim's transaction: another worker's
        rescue can declare it lost in between (after a suspend, both wake at once). Rescue
        looks only at active workers, so a job handed to it now would stay ``processing``
        forever if it then died: the claim itself must refuse, and write nothing."""
        before = self._event_count()
        got = queue.claim(self.conn, wid)
        assert got is None, f"worker {wid}, declared lost, was given job {got.job_id}"
        assert self._event_count() == before
        self._loop_checks(wid)

    def _finish(self, wid: str, outcome: str, exit_code: int = 1) -> None:
        """The worker records how the run of the job it believes it holds ended."""
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
        }[outcome]()
        job = self.jobs[held.job_id]
        still_held = (job.state, job.worker, job.attempts) == ("processing", wid, held.attempt)
        expected: list[ev.Event] = []
        if still_held:  # else its lease expired: the job already went through the retry rule
            expected.append(result)
            if outcome == "completed":
                job.state, job.worker = "completed", None
            elif outcome == "released":
                job.state, job.worker, job.run_at = "pending", None, CLOCK.now()
                job.attempts = held.attempt - 1
            else:
                reason = f"exit {exit_code}" if outcome == "failed" else "timed out"
                expected.append(self._retry_or_dead(held.job_id, job, reason))
            if outcome != "released":
                worker.last_beat = CLOCK.now()
        before = self._event_count()
        assert queue.finish(self.conn, held, result) == expected
        assert self._event_count() == before + len(expected)

    @precondition(lambda self: self._busy())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(self._busy()), label="worker")
        self._finish(wid, "completed")
        self._loop_checks(wid)

    @precondition(lambda self: self._busy())
    @rule(data=st.data(), exit_code=st.integers(-15, 255).filter(bool), timed_out=st.booleans())
    def fail(self, data: st.DataObject, exit_code: int, timed_out: bool) -> None:
        wid = data.draw(st.sampled_from(self._busy()), label="worker")
        self._finish(wid, "timed-out" if timed_out else "failed", exit_code)
        self._loop_checks(wid)

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
            queue.heartbeat(self.conn, wid)
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
    @rule()
    def rescue(self) -> None:
        # Until time passes or the lease shrinks, a second rescue could only repeat this one.
        self.rescue_may_act = False
        lease = self._lease()
        cutoff = clock.iso(CLOCK.t + timedelta(seconds=-lease))
        expected: dict[str, list[ev.Event]] = {}
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
                expected[wid].append(self._retry_or_dead(job_id, job, "lease expired"))
        got: dict[str, list[ev.Event]] = {}
        current = ""
        for event in queue.rescue(self.conn, lease):
            if isinstance(event, ev.LeaseExpired | ev.WorkerLost):
                current = event.worker_id
            got.setdefault(current, []).append(event)
        assert got == expected

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
        queue.worker_stopped(self.conn, wid, reason)
        worker = self.workers[wid]
        worker.state, worker.alive, worker.last_beat = "stopped", False, CLOCK.now()

    # -- rules: what a person does at the command line -----------------------------------

    @rule(data=st.data(), action=st.sampled_from(["config set", "dlq retry", "worker --stop"]))
    def operator(self, data: st.DataObject, action: str) -> None:
        """One rule for all three, so that they do not crowd out the workers' steps."""
        if action == "config set":
            self._config_set(*data.draw(st.sampled_from(CONFIG_CASES), label="config"))
        elif action == "dlq retry":
            self._dlq_retry(data)
        else:
            self._request_stop()

    def _config_set(self, key: str, text: str, canonical: str | None) -> None:
        if canonical is not None:
            after = self.config | {key: canonical}
            if float(after["lease-timeout"]) <= float(after["heartbeat-interval"]):
                canonical = None
        if canonical is None:
            self._refused(InvalidInput, queue.set_config, key, text)
            return
        assert queue.set_config(self.conn, key, text) == canonical
        self.config[key] = canonical
        self.rescue_may_act = True

    def _dlq_retry(self, data: st.DataObject) -> None:
        dead = [i for i, j in self.jobs.items() if j.state == "dead"]
        if dead and data.draw(st.booleans(), label="retry a dead job"):
            job_id = data.draw(st.sampled_from(dead), label="dead job")
            job = self.jobs[job_id]
            assert queue.dlq_retry(self.conn, job_id) == job.max_retries
            job.state, job.attempts, job.run_at = "pending", 0, CLOCK.now()
            return
        others = [i for i, j in self.jobs.items() if j.state != "dead"]
        job_id = data.draw(st.sampled_from([*others, "no-such-job"]), label="job")
        self._refused(NotFound if job_id == "no-such-job" else Conflict, queue.dlq_retry, job_id)

    def _request_stop(self) -> None:
        active = [wid for wid, w in self.workers.items() if w.state == "active"]
        assert queue.request_stop(self.conn) == len(active)
        for wid in active:
            self.workers[wid].stop_requested = True
            self._loop_checks(wid)

    # -- invariants ------------------------------------------------------------------------

    def _rows(self) -> dict[str, dict[str, object]]:
        return {j["id"]: j for j in queue.list_jobs(self.conn)}

    @invariant()
    def job_rows_are_legal(self) -> None:
        holders: Counter[str] = Counter()
        for job_id, row in self._rows().items():
            assert row["state"] in STATES, (job_id, row["state"])
            assert 0 <= row["attempts"] <= 1 + row["max_retries"], (job_id, row)  # type: ignore
            if row["state"] == "processing":
                assert row["worker_id"] is not None, (job_id, row)
                holders[row["worker_id"]] += 1  # type: ignore[index]
            else:
                assert row["worker_id"] is None, (job_id, row)
            if row["state"] == "failed":
                assert row["run_at"] is not None, (job_id, row)
        assert all(n == 1 for n in holders.values()), holders
        # Rescue only looks at active workers: a job held by any other would never come back.
        active = {r["id"] for r in queue.workers(self.conn)}
        assert set(holders) <= active, (holders, active)

    @invariant()
    def counts_match_jobs(self) -> None:
        kept = dict(self.conn.execute("SELECT state, n FROM job_counts WHERE n != 0").fetchall())
        actual = dict(
            self.conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        )
        assert kept == actual
        assert queue.counts(self.conn) == {s: actual.get(s, 0) for s in queue.STATES}

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
            got = (row["state"], row["attempts"], row["max_retries"], row["worker_id"])
            assert got == (job.state, job.attempts, job.max_retries, job.worker), job_id
            assert (row["backoff_base"], row["timeout"]) == (job.backoff_base, job.timeout)
            if job.state in ("pending", "failed"):
                assert row["run_at"] == job.run_at, job_id
        workers = {r["id"]: r for r in queue.workers(self.conn, ("active", "stopped", "gone"))}
        stops = dict(self.conn.execute("SELECT id, stop_requested FROM workers").fetchall())
        assert set(workers) == set(self.workers)
        for wid, worker in self.workers.items():
            row = workers[wid]
            held = self._held_by(wid)
            assert row["state"] == worker.state, wid
            assert row["last_heartbeat"] == worker.last_beat, wid
            assert row["current_job"] == (held[0] if held else None), wid
            assert bool(stops[wid]) == worker.stop_requested, wid
        assert dict(self.conn.execute("SELECT key, value FROM config").fetchall()).items() <= (
            self.config.items()
        )

    # -- end of an example -----------------------------------------------------------------

    def _drain(self) -> None:
        """Every worker dies; a new one must take back every job and run each to the end."""
        CLOCK.t += timedelta(seconds=self._lease() + 1)
        queue.worker_started(self.conn, "drainer", 1, "test-host")
        queue.rescue(self.conn, self._lease())
        for _ in range(10 * len(self.jobs) + 10):  # each job: a few runs, a few backoffs
            got = queue.claim(self.conn, "drainer")
            if got is not None:
                done = ev.Completed(job_id=got.job_id, worker_id="drainer", attempt=got.attempt)
                queue.finish(self.conn, got, done)
                continue
            next_run = queue.next_run_at(self.conn)
            if next_run is None:
                break
            CLOCK.t = clock.parse(next_run)
            queue.heartbeat(self.conn, "drainer")
        left = self.conn.execute(
            "SELECT id, state FROM jobs WHERE state NOT IN ('completed', 'dead')"
        ).fetchall()
        assert left == [], f"jobs never finished: {left}"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is not None:
                return  # a step already failed: report that, not what follows from it
            assert ledger.check(self.conn) == []
            self._drain()
            assert ledger.check(self.conn) == []
        finally:
            self.conn.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def test_queue_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "now", CLOCK.now)
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            # QUEUECTL_PROPERTY_EXAMPLES=2000 for a long hunt; the default keeps CI fast.
            max_examples=int(os.environ.get("QUEUECTL_PROPERTY_EXAMPLES", "60")),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_a_worker_declared_lost_is_given_no_job(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine's shortest failing example for ``_claim_by_lost_worker``, kept as a plain
    test so that it fails on every run rather than on the runs that happen to find it."""
    monkeypatch.setattr(clock, "now", CLOCK.now)
    CLOCK.t = START
    queue.worker_started(conn, "w1", 1, "test-host")
    queue.worker_started(conn, "w2", 2, "test-host")
    queue.enqueue(conn, [queue.JobSpec(command="true", id="j1")])
    CLOCK.t += timedelta(seconds=31)  # the machine was suspended: both workers fell silent
    queue.heartbeat(conn, "w2")  # w2 wakes first ...
    assert [e.type for e in queue.rescue(conn, 30)] == ["worker-lost"]  # ... and loses w1
    # w1 had read its own state ("active") just before that rescue, and now claims:
    assert queue.claim(conn, "w1") is None
    claimed = queue.claim(conn, "w2")
    assert claimed is not None and claimed.job_id == "j1"
