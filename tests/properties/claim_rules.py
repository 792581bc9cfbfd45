"""The machine's rules for claims and the ends of runs: ``claims.claim``, ``finish`` and
``finish_and_claim`` against the model's claim order, retry rule and release of waiting
jobs."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from properties.model import CLOCK, DRAWS, RANDOM, Job, Run
from queuectl import claims, clock
from queuectl import events as ev


class ClaimRules:
    """Claims, and runs that complete, fail, time out, are released or cancelled."""

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
        assert {e.by for e in got} <= {wid}, got  # all of it the worker's doing
        got = self._bare(got)
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
