"""Workers: claim a job, run it as ``sh -c`` in its own process group, record the outcome.

One process runs N workers as threads, each with its own id, sharing one connection (one
at a time, under ``store.PROCESS_LOCK``): with a connection each, every commit by one
emptied the other's page cache (SQLite), which it then read back from the WAL. The store
gives the process one waker, so that idle workers pick up new work within milliseconds
instead of waiting out their poll interval.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

import projections
from queuectl import (
    actor,
    claims,
    clock,
    fence,
    hooks,
    ledger,
    output,
    render,
    runner,
    schedules,
    settings,
    store,
)
from queuectl import events as ev
from queuectl.errors import CorruptLedger, StoreError, StoreUnavailable
from queuectl.store import Db

if TYPE_CHECKING:
    from pathlib import Path

    from queuectl.resources import Limits

T = TypeVar("T")

CANCEL_CHECK = 0.2  # seconds between checks for a cancel or signal request while a job runs
SCHEDULE_LOOK = 1.0  # seconds between looks for a due schedule tick, by each worker
DRAIN_LOOK = 0.05  # a burst worker's first look again while others finish the last jobs


class Options(msgspec.Struct):
    verbose: bool = False
    concurrency: int = 1
    poll: float = 3.0  # fallback check interval; new work wakes workers at once anyway
    limit: int = 0  # jobs per worker, 0 = no limit
    burst: bool = False
    host_name: str | None = None  # the host the workers say they run on; None: this one
    ahead: int = 0  # jobs claimed for each worker beyond its running one (Pipeline)
    queues: tuple[str, ...] = ()  # the queues it takes jobs from, in order; (): every queue



def _now(conn: store.Db) -> str:
    """The store's clock (the server's, on PostgreSQL), which ``run_at`` times are on."""
    return conn.now()


class Shutdown:
    """Why the process's workers stop: ``soft`` lets each finish its current job, ``hard``
    abandons it; ``reason`` is what each records in its ``worker-stopped`` event."""

    def __init__(self) -> None:
        self.soft = threading.Event()
        self.hard = threading.Event()
        self.reason = "signal"

    def stop(self, reason: str) -> None:
        if not self.soft.is_set():
            self.reason = reason
        self.soft.set()


class Worker:
    """One worker: its own id, one job at a time, on its process's shared connection.

    Supervision, the one rule for every worker thread: whatever ends the thread (a stop, a
    signal, a database error, a bug), the jobs it holds (the one it runs, those claimed
    ahead for it, those whose result could not be written) are released (a released run is
    not counted as an attempt), its run's processes are killed, and ``worker-stopped``
    records why. A crash also asks the process's other workers to finish their jobs and stop, so
    that the process exits 1 and a supervisor (systemd, say) can start it afresh.
    """

    def __init__(
        self,
        conn: Db,
        options: Options,
        shutdown: Shutdown,
        waker: store.Waker,
        echo: Callable[[str], None],
        silence: claims.Silence,
        results: Pipeline,
        fences: fence.Fence,
    ) -> None:
        self.conn = conn
        self.fence = fences
        self.results = results
        self.options = options
        self.shutdown = shutdown
        self.waker = waker
        self.echo = echo
        self.silence = silence
        self.id = ""  # given by the ledger when the worker starts (see run)
        self.host = options.host_name or os.uname().nodename
        self.done = 0
        self.running: claims.Claim | None = None  # the job its shell runs now
        # What the results thread changes, under its lock (results.cond):
        self.ahead: deque[claims.Claim] = deque()  # claimed for it, not yet started
        self.unsettled: dict[str, claims.Claim] = {}  # held, with no outcome written yet
        self.asked = 0  # jobs asked for ahead and not yet answered
        self.in_flight = 0  # handed in and not yet written
        self.quick = False  # its last job ran under Pipeline.QUICK seconds
        self.failure: BaseException | None = None  # why what it handed in was not written
        self.env = runner.worker_env(conn.identity)
        self._next_beat = 0.0
        self._drain = 0.0  # burst: how long it waits before it looks again for the end
        self._next_rescue = 0.0
        self._next_schedules = 0.0
        self._next_cancel_check = 0.0
        self._started = 0.0  # when the running job started, on the monotonic clock
        self._kill_reason: str | None = None
        self._sink: output.Sink | None = None  # the running job's output, on its way to the store
        self._group = 0  # the running job's process group, once started
        self._signalled: set[int] = set()  # signal requests delivered to the running job
        self._connection = 0  # the connection generation this worker last reconciled
        self._next_try = 0.0  # while the store is away: the next time a run's tick tries it
        # The lease, as the fence sees it: the monotonic time just before the last renewal
        # known to have committed, and the last trouble the store gave (when, what).
        self._renewed = -math.inf
        self._trouble: tuple[float, str] = (-math.inf, "")
        self._watched: fence.Watched | None = None  # the running job, as the fence saw it
        self._fenced: ev.Fenced | None = None  # its last run stopped by the fence
        self.error: BaseException | None = None

    def db(self, call: Callable[..., T], *args: Any) -> T:
        """``call(conn, *args)`` on the shared connection, no other thread using it: every
        read and write transaction, and every fetch, happens inside.

        A lost connection (PostgreSQL restarted, the session killed) is opened again and the
        call made once more: every call is a read or one transaction, and a transaction that
        did not commit wrote nothing. One whose commit did succeed unseen may have claimed a
        job this worker does not know about: ``_reconcile`` releases such jobs first.
        StoreUnavailable means the server is still away; ``persist`` waits for it."""
        with store.PROCESS_LOCK, actor.acting_as(self.id):
            try:
                self._reconcile()
                return call(self.conn, *args)
            except StoreUnavailable:
                self.conn.reconnect()
                self._reconcile()
                return call(self.conn, *args)

    def _reconcile(self) -> None:
        generation = self.conn.generation
        if generation != self._connection and self.id:
            for event in claims.release_strays(self.conn, self.id, set(self.unsettled)):
                self.report(event)
        self._connection = generation

    def persist(self, call: Callable[..., T], *args: Any) -> T:
        """``db``, waiting out an unavailable store: workers outlive a restart of the server."""
        return self._patiently(lambda: self.db(call, *args))

    def _patiently(self, action: Callable[[], T]) -> T:
        """``action()``, tried again with back-off (0.1 s to 5 s) while the store is
        unavailable, as long as no hard stop is asked for."""
        delay = 0.1
        while True:
            try:
                return action()
            except StoreUnavailable as exc:
                if self.shutdown.hard.is_set():
                    raise
                self.echo(f"[{self.id or 'starting'}] waiting {delay:g}s for the database: "
                          f"{render.one_line(exc)}")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def log(self, text: str) -> None:
        if self.options.verbose:
            self.echo(f"[{self.id}] {text}")

    def run(self) -> None:
        reason = "crashed"
        try:
            self.config = self.persist(settings.load)
            before = time.monotonic()  # its start is its first renewal, committed after this
            self.id = self.persist(claims.worker_started, os.getpid(), self.host)
            self._renewed = before
            self.echo(f"Worker started: {self.id}")
            self._beat_done()
            reason = self._loop()
        except BaseException as exc:  # reported by the pool as one line
            self.error = exc
            reason = f"crashed: {render.one_line(exc)}"
            self.shutdown.stop(f"worker {self.id or '(starting)'} of this process crashed")
        finally:
            if self.id:
                self._settle(reason)

    def _settle(self, reason: str) -> None:
        """Release the jobs it holds (the one it ran, those claimed ahead, those whose
        result could not be written) and record the stop, trying a few times: the database
        may be what failed (a full disk, a lock held too long)."""
        self.results.drain(self)
        jobs = list(self.unsettled.values())
        for attempt in range(3):
            try:
                if jobs:
                    self.db(claims.finish_and_claim_many, [(job, self._fenced_run(job) or
                        ev.Released(job_id=job.job_id, worker_id=self.id, attempt=job.attempt,
                                    reason=f"worker stopped while holding it: {reason}"))
                        for job in jobs], [])
                    jobs = []
                    self.unsettled.clear()
                self.db(claims.worker_stopped, self.id, reason)
                self.log(f"stopped ({reason})")
                return
            except Exception as exc:  # the first error is the one reported
                self.error = self.error or exc
                time.sleep(0.5 * (attempt + 1))

    def _fenced_run(self, job: claims.Claim) -> ev.Fenced | None:
        """The fence's record of ``job``'s run, if the fence stopped it."""
        done = self._fenced
        if done is not None and (done.job_id, done.attempt) == (job.job_id, job.attempt):
            return done
        return None

    def _beat_done(self) -> None:
        # However long the heartbeat interval, the lease is renewed well before the fence's
        # deadline (fence.RENEW of it), with time left to try again.
        interval = min(float(self.config["heartbeat-interval"]),
                       fence.RENEW * float(self.config["lease-timeout"]))
        self._next_beat = time.monotonic() + interval

    def _renew(self) -> None:
        """Heartbeat; once it has committed, the fence counts the lease from it."""
        renewed = self.db(claims.heartbeat, self.id)
        self._renewed = renewed
        self.fence.renewed(self, renewed, float(self.config["lease-timeout"]))

    def _tick(self) -> None:
        """Housekeeping between jobs: heartbeat, and rescue silent workers' jobs."""
        self._patiently(lambda: self._housekeeping(time.monotonic()))

    def _running_tick(self, job: claims.Claim) -> bool:
        """Housekeeping while a job runs; True when the run must be killed now. While the
        store is away the run goes on (its timeout still counts), and the store is tried
        again every second, not on every tick."""
        now = time.monotonic()
        if self.shutdown.hard.is_set():
            self._kill_reason = "shutdown"
        elif now >= self._next_try:
            try:
                self._housekeeping(now)
                if self.ahead and now - self._started > Pipeline.HOLD:
                    self.quick = False
                    self._release_ahead(self.db, f"the job before it ran over {Pipeline.HOLD:g}s")
                if now >= self._next_cancel_check:
                    self._next_cancel_check = now + CANCEL_CHECK
                    if self.db(claims.cancel_requested, job.job_id):
                        self._kill_reason = "cancel"
                    else:
                        self._deliver_signals(job)
                if self._sink is not None and self._sink.due(now):
                    self.db(output.write, self._sink)
            except StoreError as exc:  # away, or locked past the lock timeout
                if isinstance(exc, CorruptLedger):
                    raise
                # The run goes on, and the fence stops it if the lease cannot be renewed.
                self._trouble = (time.monotonic(), render.one_line(exc))
                self._next_try = now + 1.0
        return self._kill_reason is not None

    def _deliver_signals(self, job: claims.Claim) -> None:
        """Send the running job's process group the signals asked for it, and record each;
        one whose record could not be written is not sent again."""
        for request, sig in self.db(claims.signals_asked, job.job_id):
            error = ""
            if request not in self._signalled and self._group:
                try:
                    os.killpg(self._group, sig)
                except ProcessLookupError:
                    pass  # the shell has exited and its group with it: the run is ending
                except OSError as exc:
                    error = exc.strerror or str(exc)
                self._signalled.add(request)
            self.db(claims.signalled, job, self.id, request, sig, error)
            self.log(f"Job {job.job_id}: signal {sig} {'not sent: ' + error if error else 'sent'}")

    def _housekeeping(self, now: float) -> None:
        runner.LEFTOVERS.sweep()
        if now >= self._next_beat:
            self.config = self.db(settings.load)
            self._renew()
            self._beat_done()
        if now >= self._next_rescue:
            self._next_rescue = now + float(self.config["heartbeat-interval"])
            self._rescue()
        if now >= self._next_schedules:  # a due tick waits for this look, a second at most
            self._next_schedules = now + SCHEDULE_LOOK
            for event in self.db(schedules.fire_due):
                self.report(event)

    def _rescue(self) -> None:
        """Take back the jobs of workers this process has watched fall silent. Their runs
        still alive on this host are stopped first, so no job runs twice here at once."""
        lease = float(self.config["lease-timeout"])
        # This process looks every heartbeat interval; a longer gap between two looks is a
        # clock that jumped or a process that was paused, and counts as twice the interval.
        gap = 2 * float(self.config["heartbeat-interval"])
        silent = [w for w in self.db(claims.silent_workers, lease, self.silence, gap)
                  if w[0] != self.id]
        if not silent:
            return
        killed = {w: runner.stop_marked(runner.worker_mark(w, self.conn.identity))
                  for w, _, host in silent if host == self.host}
        for event in self.db(claims.rescue, silent, killed):
            self.report(event)

    def _stop_reason(self) -> str | None:
        if self.shutdown.soft.is_set():
            return self.shutdown.reason
        if self.options.limit and self.done >= self.options.limit:
            return "job limit reached"
        state, stop = self.persist(claims.worker_state, self.id)
        if stop:
            return "stop requested"
        if state == "gone":
            return "declared lost by another worker"
        return None

    def _loop(self) -> str:
        while True:
            job = self.results.next_job(self)
            # A job claimed ahead starts only once the store says so (``Pipeline.begin``);
            # one claimed here, or with its worker's last result, starts with its claim.
            held_ahead = job is not None and bool(self.results.ahead)
            if job is None:
                reason = self._stop_reason()
                if reason:
                    return reason
                self._tick()
                seen = self.waker.generation
                tried = self.persist(_now)
                job = self.persist(claims.claim, self.id, self.options.queues)
                if job is None:
                    timeout = self._idle_timeout(tried)
                    if self.options.burst:
                        if self.persist(claims.unfinished, self.options.queues) == 0:
                            return "burst: queue empty"
                        # Other workers run the last jobs, and their results wake no one in
                        # another process (on PostgreSQL they send no NOTIFY): look again
                        # soon, then less and less often, up to the poll interval.
                        self._drain = min(max(2 * self._drain, DRAIN_LOOK), self.options.poll)
                        timeout = min(timeout, self._drain)
                    self.waker.wait(seen, timeout)
                    continue
                self._drain = 0.0
                self.unsettled[job.job_id] = job
            if self.shutdown.soft.is_set():
                self._give_back(job)
                return self.shutdown.reason
            if held_ahead and not self.results.begin(self, job):
                continue  # it went back to the queue, or is no longer this worker's
            lease = self._renewed  # the lease the job was claimed (or started) under
            self._tick()  # a streak of instant jobs still heartbeats and rescues
            if self._lapsed(job, lease):
                continue
            self._work(job, asked=held_ahead)

    def _lapsed(self, job: claims.Claim, renewed: float) -> bool:
        """Whether the lease ``job`` was taken under ran out before it could start (this
        process paused, the store blocked the tick): a rescuer may have it by now, so it
        goes back unstarted, unless the store says it has been taken back already."""
        silence = time.monotonic() - renewed
        if silence < fence.TERM * float(self.config["lease-timeout"]):
            return False
        with self.results.cond:
            self.running = None  # set by a start (Pipeline.begin): this one never ran
        self.results.submit(self, job, ev.Released(
            job_id=job.job_id, worker_id=self.id, attempt=job.attempt,
            reason=f"not started: its worker's lease went {silence:.3g}s without a renewal"))
        return True

    def _give_back(self, job: claims.Claim) -> None:
        """Release ``job`` and every job claimed ahead, none of them started: the
        process is shutting down."""
        self.results.drain(self)  # the claims on their way come back too
        self._release_ahead(self.persist, "worker shut down before the job started", job)

    def _release_ahead(self, call: Callable[..., Any], reason: str,
                       *first: claims.Claim) -> None:
        """Release the jobs claimed ahead for this worker (and ``first``), through ``call``
        (``db`` or ``persist``); if that fails, they stay held."""
        with self.results.cond:
            jobs = [*first, *self.ahead]
            self.ahead.clear()
        if not jobs:
            return
        try:
            call(claims.finish_and_claim_many, [(j, ev.Released(
                job_id=j.job_id, worker_id=self.id, attempt=j.attempt, reason=reason,
                ahead=bool(self.results.ahead))) for j in jobs], [])
        except BaseException:
            with self.results.cond:
                self.ahead.extendleft(reversed(jobs[len(first):]))
            raise
        for j in jobs:
            self.unsettled.pop(j.job_id, None)

    def wanted(self) -> int:
        """How many jobs to claim for this worker now (under ``results.cond``): enough to
        hold one to run next and, after a quick job, ``ahead`` more, within ``--limit``;
        none once stopping."""
        if self.shutdown.soft.is_set():
            return 0
        held = (self.running is not None) + len(self.ahead) + self.asked
        want = 1 + (self.results.ahead if self.quick else 0) - held
        if self.options.limit:
            want = min(want, self.options.limit - self.done - held)
        return max(0, want)

    def _idle_timeout(self, tried: str) -> float:
        """How long to wait for work: until the next heartbeat, the fallback poll, the
        next job coming due, or a rated queue's window letting one more start. A job due before the claim that just found nothing was left
        for a reason (its queue at its limit): it is not waited for, or the worker would
        spin; the wake-up of the run that frees a place brings it back."""
        timeout = min(self.options.poll, max(0.0, self._next_beat - time.monotonic()))
        run_at = self.persist(claims.next_run_at, self.options.queues)
        if run_at is not None and run_at > tried:
            timeout = min(timeout, max(0.0, clock.seconds_between(self.persist(_now), run_at)))
        frees = self.persist(claims.next_start_at, self.options.queues)
        if frees is not None:  # a queue's rate lets one more start then: always later
            timeout = min(timeout, max(0.0, clock.seconds_between(self.persist(_now), frees)))
        tick = self.persist(schedules.next_due)
        if tick is not None:  # looked for at the first housekeeping after it is due
            until = max(clock.seconds_between(self.persist(_now), tick),
                        self._next_schedules - time.monotonic())
            timeout = min(timeout, max(0.0, until))
        return timeout

    def _work(self, job: claims.Claim, asked: bool) -> None:
        """Run one job and hand its result in; the write happens on the results thread (or
        with the next start) while this worker goes on. ``asked``: the jobs to hold ahead
        of this one were asked for as it began; otherwise they are asked for now."""
        if self.options.verbose:  # build no log line nobody will see
            for line in render.worker_started_job(job):
                self.log(line)
        self._kill_reason, self._watched = None, None
        self._next_cancel_check = time.monotonic() + CANCEL_CHECK
        self.running = job
        self._started = time.monotonic()
        self._group, self._signalled = 0, set()
        if not asked:
            self.results.submit(self, None, None)
        tail = int(self.config["output-limit"]) * 1024
        limit = int(self.config["log-limit"])  # 0: the run goes as if there were no store
        self._sink = output.Sink(job.job_id, job.attempt, self.id, limit, tail) if limit else None
        env = runner.run_env(self.env, job.job_id, job.attempt, self.id, _job_env(job))
        if job.job_id.startswith(hooks.PREFIX):  # others pay nothing for hooks
            origin = self.persist(hooks.origin_of, job.job_id)
            if origin is not None:
                env.update(hooks.env(origin))
        result = runner.run_command(
            job.command,
            timeout=job.timeout,
            output_limit=tail,
            tick=lambda: self._running_tick(job),
            env=env,
            cwd=job.cwd,
            sink=self._sink.add if self._sink is not None else None,
            started=lambda group: self._started_group(group, env),
            ending=self._ending,
            limits=_limits(job) if job.limits is not None else None,
            shared=self.options.concurrency > 1 or self.results.ahead > 0,
        )
        self._end_output(result)
        self.done += 1
        self.running = None
        self.quick = result.duration < Pipeline.QUICK
        # With a job held next, its start goes in the same transaction as this result.
        self.results.submit(self, job, self._event(job, result), wake=not self.ahead)

    def _end_output(self, result: runner.RunResult) -> None:
        """Write the end of the run's output before its result, so that whoever sees the
        run ended finds all of it in the store. With the store away, the ledger's tail is
        what remains of it."""
        sink, self._sink = self._sink, None
        if sink is not None and sink.needed_at_end(result.truncated):
            try:
                self.db(output.write, sink, True)
            except StoreUnavailable:
                pass
    def _started_group(self, group: int, env: dict[bytes, bytes]) -> None:
        self._group = group
        self.fence.watch(self, group, env, self._renewed, float(self.config["lease-timeout"]))

    def _ending(self) -> None:
        self._watched = self.fence.ended(self)

    def _event(self, job: claims.Claim, r: runner.RunResult) -> ev.Event:
        """The event that records how this run ended, this worker's (``by``) as the store
        would stamp it."""
        j, w, a = job.job_id, self.id, job.attempt
        out, cut, took = r.output, r.truncated, r.duration
        watched, self._watched = self._watched, None
        if watched is not None and watched.fenced is not None:
            self._fenced = ev.Fenced(
                job_id=j, worker_id=w, attempt=a, by=w, silence=watched.fenced,
                lease_timeout=watched.lease, reason=self._why_fenced(watched),
                duration=took, output=out, truncated=cut)
            return self._fenced
        if r.abandoned and self._kill_reason == "cancel":
            return ev.Cancelled(job_id=j, worker_id=w, attempt=a, by=w, output=out, truncated=cut,
                                duration=took, reason="cancelled by user while running")
        if r.abandoned:
            return ev.Released(job_id=j, worker_id=w, attempt=a, by=w,
                               reason="worker shut down while the job ran")
        if r.timed_out:
            return ev.TimedOut(job_id=j, worker_id=w, attempt=a, by=w, output=out, truncated=cut,
                               duration=took, timeout=job.timeout)
        if r.exit_code == 0:
            return ev.Completed(job_id=j, worker_id=w, attempt=a, by=w, output=out, truncated=cut,
                                duration=took)
        code = r.exit_code if r.exit_code is not None else -1
        return ev.Failed(job_id=j, worker_id=w, attempt=a, by=w, output=out, truncated=cut,
                         duration=took, exit_code=code,
                         error=r.error or runner.describe_exit(code))

    def _why_fenced(self, watched: fence.Watched) -> str:
        """What kept the lease from being renewed, as far as this worker saw."""
        seen, trouble = self._trouble
        if seen >= watched.renewed:
            return trouble
        return "a renewal did not commit in time: the database call was still waiting"

    def report(self, event: ev.Event, job: claims.Claim | None = None) -> None:
        line = render.worker_line(event, 1 + job.max_retries if job else None)
        if line:
            self.log(line)


def _job_env(job: claims.Claim) -> dict[str, str] | None:
    """The variables a job was enqueued with, decoded only for a job that has some."""
    return msgspec.json.decode(job.env, type=dict[str, str]) if job.env else None


def _limits(job: claims.Claim) -> Limits:
    """The resource limits a job was enqueued with (``resources.Limits``), decoded only for
    a job that has some: others never import the module."""
    from queuectl import resources

    assert job.limits is not None
    return resources.decode(job.limits)


class Pipeline:
    """How a process's workers record their results and get their next jobs, in one of
    two ways (``worker --ahead``).

    Without jobs ahead (``ahead`` 0, the default), a result claims its worker's next job in
    the same transaction, which the worker writes itself and waits for, taking along the
    results other workers handed in meanwhile (a group commit). The claim is the start.

    With jobs ahead, each worker holds up to ``ahead`` jobs claimed beyond the one it
    runs, and a thread of the process's own writes what workers hand in (``submit``), with
    the claims of the jobs each worker asked for, many in one transaction
    (``claims.finish_and_claim_many``). Jobs are claimed ahead only for a worker whose last
    job was quick (under ``QUICK`` seconds), and a job that runs longer than ``HOLD``
    seconds gives them back, so that a long job never keeps others from idle workers for
    long. A job held ahead is not started until the store says, at that moment, that its
    worker still holds it and may start it (``begin``): the worker hands in the start with
    its last result and waits for that one transaction. A job cancelled, of a queue paused
    or at its limit, or held by a worker asked to stop, goes back without running; one
    taken back meanwhile (its worker paused past its lease) is not run twice. Since every
    start waits for a transaction either way, holding jobs ahead saves only the claims'
    share of the work.

    Either way the rules are those of one result at a time, in the order handed in, and
    nobody waits for a batch to fill (holding results back a few milliseconds to gather
    more made the PostgreSQL worker slower, not faster).
    """

    QUICK = 0.1  # a job that ran less than this (seconds) lets its worker claim ahead
    HOLD = 1.0  # a job running longer than this gives back the jobs claimed behind it
    BATCH = 64  # results a transaction writes at most

    def __init__(self, ahead: int = 0) -> None:
        self.ahead = ahead
        self.cond = threading.Condition()
        self._queue: list[_Handed] = []
        self._closed = False
        self._writing = False  # without a thread: a worker is writing
        self._thread = threading.Thread(target=self._supervised, name="results", daemon=True)
        self.error: BaseException | None = None  # what ended this thread, if not close()

    def start(self) -> None:
        if self.ahead:
            self._thread.start()

    def close(self) -> None:
        """Write what is still handed in, then end the thread."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- what workers call ----------------------------------------------------------------

    def submit(self, worker: Worker, job: claims.Claim | None, event: ev.Event | None,
               wake: bool = True) -> _Handed | None:
        """Hand in ``worker``'s result of ``job`` (None: only ask for jobs ahead), with the
        jobs it wants claimed next; returns at once. ``wake=False`` leaves the writer
        asleep: the worker's next call (a ``begin``, a wait) wakes it, so that both go in
        one transaction."""
        with self.cond:
            self._alive()
            want = worker.wanted()
            if job is None and not want:
                return None
            worker.asked += want
            worker.in_flight += 1
            handed = _Handed(worker, job, event, want)
            self._queue.append(handed)
            if wake:
                self.cond.notify_all()
            return handed

    def begin(self, worker: Worker, job: claims.Claim) -> bool:
        """Ask the store to start ``job``, held ahead for ``worker``, and wait for its
        answer: True when ``started`` is recorded and the run may begin; False when the job
        went back to the queue or is no longer the worker's."""
        started = ev.Started(job_id=job.job_id, worker_id=worker.id, attempt=job.attempt)
        with self.cond:
            worker.running = job  # held while it is asked for: counted by wanted()
        handed = self.submit(worker, job, started)
        assert handed is not None
        with self.cond:
            try:
                self._wait(worker, lambda: handed.verdict is None)
                if worker.failure is not None:
                    raise worker.failure
                if handed.verdict is None:  # the thread is gone
                    self._alive()
                    raise RuntimeError("the results thread ended")
            finally:
                if not handed.verdict:
                    worker.running = None
            return bool(handed.verdict)

    def next_job(self, worker: Worker) -> claims.Claim | None:
        """The next job claimed for ``worker``, waiting for the claims it asked for; None
        when none is held or coming."""
        with self.cond:
            self._wait(worker, lambda: not worker.ahead and worker.asked)
            if worker.failure is not None:
                raise worker.failure
            return worker.ahead.popleft() if worker.ahead else None

    def drain(self, worker: Worker) -> None:
        """Until nothing ``worker`` handed in is waiting to be written (unless the thread
        is gone, and with it anything still waiting)."""
        with self.cond:
            self._wait(worker, lambda: worker.in_flight)

    def _wait(self, worker: Worker, waiting: Callable[[], Any]) -> None:
        """(Under ``cond``.) Until ``waiting()`` is false or what the worker handed in
        failed; without a thread, the worker writes the batch when nobody else is."""
        if self.ahead:
            self.cond.notify_all()  # what it handed in without waking the writer goes now
        while waiting() and worker.failure is None:
            if not self.ahead:
                if self._writing:
                    self.cond.wait()
                    continue
                self._writing = True
                batch = self._take()
                self.cond.release()
                try:
                    self._write(batch)
                finally:
                    self.cond.acquire()
                    self._writing = False
                    self.cond.notify_all()
                continue
            if not self._thread.is_alive():
                self._alive()
                return
            self.cond.wait(0.5)

    def _take(self) -> list[_Handed]:
        batch, self._queue = self._queue[:self.BATCH], self._queue[self.BATCH:]
        return batch

    def _alive(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the results thread crashed: {render.one_line(self.error)}")

    # -- this thread ------------------------------------------------------------------------

    def _supervised(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug here: every worker hears of it and stops
            with self.cond:
                self.error = exc
                for handed in self._queue:
                    handed.worker.failure = handed.worker.failure or exc
                self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._queue and not self._closed:
                    self.cond.wait()
                if not self._queue:
                    return
                batch = self._take()
            self._write(batch)

    def _write(self, batch: list[_Handed]) -> None:
        if not batch:
            return
        finished = [h for h in batch if h.job is not None]
        claimers = [h.worker.id for h in batch for _ in range(h.want)]
        try:
            outcomes, following = batch[0].worker.persist(
                claims.finish_and_claim_many,
                [(h.job, h.event) for h in finished], claimers, bool(self.ahead),
                batch[0].worker.options.queues)
        except BaseException as exc:
            with self.cond:
                for handed in batch:
                    worker = handed.worker
                    worker.failure = worker.failure or exc
                    worker.asked -= handed.want
                    worker.in_flight -= 1
                self.cond.notify_all()
            return
        claimed = iter(following)
        with self.cond:
            for handed, events in zip(finished, outcomes, strict=True):
                assert handed.job is not None
                if isinstance(handed.event, ev.Started):
                    handed.verdict = any(isinstance(e, ev.Started) for e in events)
                    if handed.verdict:
                        continue  # held still, and running now
                handed.worker.unsettled.pop(handed.job.job_id, None)
            for handed in batch:
                worker = handed.worker
                for _ in range(handed.want):
                    job = next(claimed)
                    if job is not None:
                        worker.ahead.append(job)
                        worker.unsettled[job.job_id] = job
                worker.asked -= handed.want
                worker.in_flight -= 1
            self.cond.notify_all()
        if finished and batch[0].worker.options.burst:
            # A worker of this process that found nothing to claim waits for the queue to
            # drain; these results may be what it waits for, and they send no NOTIFY (on
            # PostgreSQL it would sleep out its poll interval, 3 s, before it looked again).
            batch[0].worker.waker.poke()
        for handed, events in zip(finished, outcomes, strict=True):
            if handed.worker.options.verbose:
                for event in events:
                    handed.worker.report(event, handed.job)


class _Handed(msgspec.Struct):
    worker: Worker
    job: claims.Claim | None
    event: ev.Event | None
    want: int
    verdict: bool | None = None  # for a start: whether the store recorded it


def _interrupted(signum: int, frame: object) -> None:
    """SIGURG's handler in a worker process: none. The signal only ends a system call
    (see ``Db.for_worker``)."""


def output_that_never_fails(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo``, made safe for worker threads: once output cannot be written (a closed pipe,
    as in ``worker -v | head``, or a full disk) it is dropped, and the workers go on."""
    broken = threading.Event()

    def safe_echo(line: str) -> None:
        if broken.is_set():
            return
        try:
            echo(line)
        except (OSError, ValueError):  # ValueError: the stream was closed
            broken.set()

    return safe_echo


def _connect(target: str | Path) -> Db:
    """The store, created or migrated before any thread starts, with every projection
    loaded: a worker appends events of most kinds, and importing a projection in the write
    transaction of the first event that needs it would hold every other writer back."""
    conn = ledger.connect(target, durable=False)
    projections.registry()
    return conn


def prepare(target: str | Path) -> None:
    """What a process that forks worker processes does first (``queuectl.processes``):
    each then finds the store ready and the projections imported, and opens its own
    connection."""
    _connect(target).close()


def run_workers(target: str | Path, options: Options, echo: Callable[[str], None],
                hard: int | None = None, listening: Callable[[], object] | None = None
                ) -> list[str]:
    """Run ``options.concurrency`` workers until they stop; returns their error messages.

    The first SIGINT/SIGTERM lets every worker finish its current job; a second SIGINT
    kills running jobs' process groups and releases them back to the queue. ``hard``: the
    signal that does that instead, SIGINT then only asking for the first (a process forked
    by ``queuectl.processes``, whose first process counts the SIGINTs). ``listening``:
    called once the handlers are in place (that process holds the signals back till then).
    """
    shutdown = Shutdown()
    echo = output_that_never_fails(echo)

    # A handler runs in the main thread between two bytecodes, whatever it holds then, and
    # a second signal's handler can run inside the first's: one that arrived while another
    # was being handled is left to it, and the waker is poked only if its lock is free (the
    # join loop below pokes it anyway). Two signals at once (a Ctrl-C reaching a forked
    # worker beside the first process's SIGTERM) took the same lock twice and hung.
    pending: list[int] = []
    busy = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal busy
        pending.append(signum)
        while pending and not busy:
            busy = True
            try:
                while pending:
                    sig = pending.pop(0)
                    if sig == hard or (hard is None and shutdown.soft.is_set()
                                       and sig == signal.SIGINT):
                        shutdown.hard.set()
                    shutdown.stop("signal")
                    waker.poke(wait=False)
            finally:
                busy = False

    def on_waker_crash(exc: BaseException) -> None:
        shutdown.stop("the process's waker thread crashed")  # the join loop below pokes

    runner.close_on_exec()
    conn = _connect(target)
    # A signal that only interrupts: the store ends a wait in a system call with it (the
    # writers' queue on SQLite). Handlers are the main thread's to set.
    in_main = threading.current_thread() is threading.main_thread()
    interrupted = signal.signal(signal.SIGURG, _interrupted) if in_main else None
    conn.for_worker(signal.SIGURG if in_main else None)
    waker = conn.waker(on_waker_crash)
    silence = claims.Silence()
    results = Pipeline(options.ahead)
    fences = fence.Fence()
    workers = [Worker(conn, options, shutdown, waker, echo, silence, results, fences)
               for _ in range(options.concurrency)]
    previous = {
        sig: signal.signal(sig, on_signal)
        for sig in (signal.SIGINT, signal.SIGTERM, *((hard,) if hard else ()))
        if threading.current_thread() is threading.main_thread()
    }
    if listening is not None:
        listening()
    threads = [threading.Thread(target=w.run, name=f"worker-{n}") for n, w in enumerate(workers)]
    try:
        results.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
                if shutdown.soft.is_set():
                    waker.poke()  # idle workers see the stop at once
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        results.close()
        fences.close()
        runner.LEFTOVERS.sweep(everything=True)
        waker.close()
        conn.close()  # its writers' waits in place end with it
        if in_main:
            signal.signal(signal.SIGURG, interrupted)
    errors = [f"worker {w.id}: {render.one_line(w.error)}" for w in workers if w.error is not None]
    if waker.error is not None:
        errors.append(f"waker: {render.one_line(waker.error)}")
    return errors
