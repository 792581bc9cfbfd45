"""The machine's enqueue rule: ``decisions.enqueue`` given well-formed jobs in every form of
timing and dependency, and requests it must refuse whole."""

from __future__ import annotations

from datetime import timedelta, timezone

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from properties.model import CLOCK, FAULTS, TIMINGS, Job
from queuectl import clock, decisions
from queuectl.errors import Conflict, InvalidInput, NotFound


class EnqueueRules:
    """New jobs, as the CLI hands them to the core, and what the model expects of them."""

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
