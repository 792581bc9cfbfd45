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

The machine is one class put together from the rules of each area it drives, each in a
module of this folder: ``enqueue_rules``, ``claim_rules``, ``worker_rules``,
``command_rules``, and the ``invariants`` checked after every step; ``model`` holds the
model's records and the fake clock and random numbers.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from conftest import check_both_ways, pg_database, rescued
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, run_state_machine_as_test

from properties.claim_rules import ClaimRules
from properties.command_rules import CommandRules
from properties.enqueue_rules import EnqueueRules
from properties.invariants import Invariants
from properties.model import CLOCK, FINAL, RANDOM, START, Job, Run, Worker
from properties.worker_rules import WorkerRules

from queuectl import claims, clock, decisions, ledger, reads
from queuectl import events as ev
from queuectl.settings import SETTINGS


class QueueMachine(EnqueueRules, ClaimRules, WorkerRules, CommandRules, Invariants,
                   RuleBasedStateMachine):
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
        """The events written after ``seq``, without their actor (tests/test_actor.py checks
        who is named)."""
        return self._bare(e for _, _, e in ledger.read_events(self.conn, "WHERE seq > ?", (seq,)))

    @staticmethod
    def _bare(events: Iterable[ev.Event]) -> list[ev.Event]:
        return [msgspec.structs.replace(e, by="") for e in events]

    def _refused(self, error: type[Exception], call, *args) -> None:  # type: ignore[no-untyped-def]
        """``call`` must raise ``error`` and write nothing."""
        before = self._event_count()
        with pytest.raises(error):
            call(self.conn, *args)
        assert self._event_count() == before
        assert not self.conn.in_transaction

    def _open(self) -> list[str]:
        return [i for i, j in self.jobs.items() if j.state not in FINAL]

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
    # PostgreSQL example costs a database of its own before its first step.
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
