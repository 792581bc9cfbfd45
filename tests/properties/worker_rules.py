"""The machine's rules for workers and time: heartbeats, leases that run out as time passes,
rescue by the workers still alive, and workers that are killed, forced to stop, or stop
of their own accord."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from properties.model import CLOCK, DRAWS, RANDOM, Worker
from queuectl import claims, clock
from queuectl import events as ev


class WorkerRules:
    """Worker processes as the model sees them, and the clock that moves them."""

    def _lease(self) -> float:
        return float(self.config["lease-timeout"])

    def _held_by(self, wid: str) -> list[str]:
        return [i for i, j in self.jobs.items() if j.state == "processing" and j.worker == wid]

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

    def _start_worker(self) -> None:
        wid = self._name("w")
        claims.worker_started(self.conn, 1000 + self.serial, "test-host", worker_id=wid)
        self.workers[wid] = Worker(last_beat=CLOCK.now())

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
