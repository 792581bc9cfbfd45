"""The machine's rule for what a person does at the command line: ``cancel`` (and its
cascade to waiting jobs), ``config set``, ``dlq retry`` and ``worker --stop``."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import rule

from properties.model import CLOCK, CONFIG_CASES, FINAL
from queuectl import decisions, reads
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound


class CommandRules:
    """Commands a person types, and the cancels they cause."""

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
