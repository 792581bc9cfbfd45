"""What the projections must say after every step of the machine: legal job rows, dependencies
that hold, counts and runs that agree with the rows and the ledger, and what the model
predicts."""

from __future__ import annotations

from collections import Counter, defaultdict

from hypothesis.stateful import invariant

from properties.model import HAS_RUN_AT, STATES
from queuectl import claims, reads, records, states


class Invariants:
    """Checked after every step, whatever the steps were."""

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
