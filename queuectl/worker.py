"""Workers: claim a job, run it as ``sh -c`` in its own process group, record the outcome.

One process runs N workers as threads, each with its own id, sharing one connection (one
at a time, under ``store.PROCESS_LOCK``): with a connection each, every commit by one
emptied the other's page cache (SQLite), which it then read back from the WAL. The store
gives the process one waker, so that idle workers pick up new work within milliseconds
instead of waiting out their poll interval.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from queuectl import claims, clock, ledger, render, runner, settings, store
from queuectl import events as ev
from queuectl.errors import StoreUnavailable
from queuectl.store import Db

T = TypeVar("T")

CANCEL_CHECK = 0.2  # seconds between checks for a cancel request while a job runs


@dataclass
class Options:
    verbose: bool = False
    concurrency: int = 1
    poll: float = 3.0  # fallback check interval; new work wakes workers at once anyway
    limit: int = 0  # jobs per worker, 0 = no limit
    burst: bool = False
    host_name: str | None = None  # the host the workers say they run on; None: this one


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
    signal, a database error, a bug), the job it holds is released (a released run is not
    counted as an attempt), its run's processes are killed, and ``worker-stopped`` records
    why. A crash also asks the process's other workers to finish their jobs and stop, so
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
        results: GroupCommit | None = None,
    ) -> None:
        self.conn = conn
        self.results = results or GroupCommit()
        self.options = options
        self.shutdown = shutdown
        self.waker = waker
        self.echo = echo
        self.silence = silence
        self.id = ""  # given by the ledger when the worker starts (see run)
        self.host = options.host_name or os.uname().nodename
        self.done = 0
        self.holding: claims.Claim | None = None  # claimed and not yet finished
        self.env = runner.base_env()
        self._next_beat = 0.0
        self._next_rescue = 0.0
        self._next_cancel_check = 0.0
        self._kill_reason: str | None = None
        self._connection = 0  # the connection generation this worker last reconciled
        self._next_try = 0.0  # while the store is away: the next time a run's tick tries it
        self.error: BaseException | None = None

    def db(self, call: Callable[..., T], *args: Any) -> T:
        """``call(conn, *args)`` on the shared connection, no other thread using it: every
        read and write transaction, and every fetch, happens inside.

        A lost connection (PostgreSQL restarted, the session killed) is opened again and the
        call made once more: every call is a read or one transaction, and a transaction that
        did not commit wrote nothing. One whose commit did succeed unseen may have claimed a
        job this worker does not know about: ``_reconcile`` releases such jobs first.
        StoreUnavailable means the server is still away; ``persist`` waits for it."""
        with store.PROCESS_LOCK:
            try:
                self._reconcile()
                return call(self.conn, *args)
            except StoreUnavailable:
                self.conn.reconnect()  # type: ignore[attr-defined]
                self._reconcile()
                return call(self.conn, *args)

    def _reconcile(self) -> None:
        generation = getattr(self.conn, "generation", 0)
        if generation != self._connection and self.id:
            keep = self.holding.job_id if self.holding else None
            for event in claims.release_strays(self.conn, self.id, keep):
                self._report(event)
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
            self.id = self.persist(claims.worker_started, os.getpid(), self.host)
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
        """Release the held job and record the stop, trying a few times: the database may
        be what failed (a full disk, a lock held too long)."""
        job = self.holding
        for attempt in range(3):
            try:
                if job is not None:
                    self.db(claims.finish, job, ev.Released(
                        job_id=job.job_id, worker_id=self.id, attempt=job.attempt,
                        reason=f"worker stopped while holding it: {reason}"))
                    job = self.holding = None
                self.db(claims.worker_stopped, self.id, reason)
                self.log(f"stopped ({reason})")
                return
            except Exception as exc:  # the first error is the one reported
                self.error = self.error or exc
                time.sleep(0.5 * (attempt + 1))

    def _beat_done(self) -> None:
        interval = float(self.config["heartbeat-interval"])
        self._next_beat = time.monotonic() + interval

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
                if now >= self._next_cancel_check:
                    self._next_cancel_check = now + CANCEL_CHECK
                    if self.db(claims.cancel_requested, job.job_id):
                        self._kill_reason = "cancel"
            except StoreUnavailable:
                self._next_try = now + 1.0
        return self._kill_reason is not None

    def _housekeeping(self, now: float) -> None:
        runner.LEFTOVERS.sweep()
        if now >= self._next_beat:
            self.config = self.db(settings.load)
            self.db(claims.heartbeat, self.id)
            self._beat_done()
        if now >= self._next_rescue:
            self._next_rescue = now + float(self.config["heartbeat-interval"])
            self._rescue()

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
        killed = {w: runner.stop_marked(runner.worker_mark(w))
                  for w, _, host in silent if host == self.host}
        for event in self.db(claims.rescue, silent, killed):
            self._report(event)

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
            if self.holding is not None:
                if self.shutdown.soft.is_set():  # claimed with the last result, not started
                    job, self.holding = self.holding, None
                    self.persist(claims.finish, job, ev.Released(
                        job_id=job.job_id, worker_id=self.id, attempt=job.attempt,
                        reason="worker shut down before the job started"))
                    return self.shutdown.reason
                self._tick()  # a streak of instant jobs still heartbeats and rescues
                self.holding = self._work(self.holding)
                continue
            reason = self._stop_reason()
            if reason:
                return reason
            self._tick()
            seen = self.waker.generation
            self.holding = self.persist(claims.claim, self.id)
            if self.holding is None:
                if self.options.burst and self.persist(claims.unfinished) == 0:
                    return "burst: queue empty"
                self.waker.wait(seen, self._idle_timeout())

    def _idle_timeout(self) -> float:
        timeout = min(self.options.poll, max(0.0, self._next_beat - time.monotonic()))
        run_at = self.persist(claims.next_run_at)
        if run_at is not None:
            timeout = min(timeout, max(0.0, clock.seconds_between(clock.now(), run_at)))
        return timeout

    def _work(self, job: claims.Claim) -> claims.Claim | None:
        """Run one job and record its result; returns the next job when the same
        transaction could claim one (a busy queue pays one commit per job, not two)."""
        verbose = self.options.verbose  # build no log line nobody will see
        if verbose:
            for line in render.worker_started_job(job):
                self.log(line)
        self._kill_reason = None
        self._next_cancel_check = time.monotonic() + CANCEL_CHECK
        result = runner.run_command(
            job.command,
            timeout=job.timeout,
            output_limit=int(self.config["output-limit"]) * 1024,
            tick=lambda: self._running_tick(job),
            env=runner.run_env(self.env, job.job_id, job.attempt, self.id),
        )
        self.done += 1
        go_on = not self.shutdown.soft.is_set() and not (
            self.options.limit and self.done >= self.options.limit
        )
        events, following = self.results.record(
            self, job, self._event(job, result), self.id if go_on else None)
        self.holding = following
        if verbose:
            for event in events:
                self._report(event, job)
        return following

    def _event(self, job: claims.Claim, r: runner.RunResult) -> ev.Event:
        """The event that records how this run ended."""
        j, w, a = job.job_id, self.id, job.attempt
        out, cut, took = r.output, r.truncated, r.duration
        if r.abandoned and self._kill_reason == "cancel":
            return ev.Cancelled(job_id=j, worker_id=w, attempt=a, output=out, truncated=cut,
                                duration=took, reason="cancelled by user while running")
        if r.abandoned:
            return ev.Released(job_id=j, worker_id=w, attempt=a,
                               reason="worker shut down while the job ran")
        if r.timed_out:
            return ev.TimedOut(job_id=j, worker_id=w, attempt=a, output=out, truncated=cut,
                               duration=took, timeout=job.timeout)
        if r.exit_code == 0:
            return ev.Completed(job_id=j, worker_id=w, attempt=a, output=out, truncated=cut,
                                duration=took)
        code = r.exit_code if r.exit_code is not None else -1
        return ev.Failed(job_id=j, worker_id=w, attempt=a, output=out, truncated=cut,
                         duration=took, exit_code=code, error=runner.describe_exit(code))

    def _report(self, event: ev.Event, job: claims.Claim | None = None) -> None:
        line = render.worker_line(event, 1 + job.max_retries if job else None)
        if line:
            self.log(line)


class GroupCommit:
    """The results of one process's workers, recorded together.

    While one worker writes a transaction, the results that other workers bring meanwhile
    wait; the next of them to go writes all of them in one transaction, each with the next
    job its worker asked for (``claims.finish_and_claim_many``). Nobody waits for a batch
    to fill: a lone result is written at once. On a store where a transaction costs round
    trips (PostgreSQL) this is what lets several workers share one; every rule is still
    that of one result at a time, in the order they arrived.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: list[_Result] = []
        self._writing = False

    def record(self, worker: Worker, job: claims.Claim, event: ev.Event, claimer: str | None
               ) -> tuple[list[ev.Event], claims.Claim | None]:
        mine = _Result(job, event, claimer)
        with self._cond:
            self._waiting.append(mine)
            while not mine.done and self._writing:
                self._cond.wait()
            if mine.done:
                return mine.outcome()
            self._writing = True
            batch, self._waiting = self._waiting, []
        try:
            outcomes, following = worker.persist(
                claims.finish_and_claim_many, [(r.job, r.event) for r in batch],
                [r.claimer for r in batch if r.claimer])
            claimed = iter(following)
            for result, events in zip(batch, outcomes, strict=True):
                result.events = events
                result.following = next(claimed) if result.claimer else None
        except BaseException as exc:
            for result in batch:
                result.error = exc
        finally:
            with self._cond:
                for result in batch:
                    result.done = True
                self._writing = False
                self._cond.notify_all()
        return mine.outcome()


@dataclass
class _Result:
    job: claims.Claim
    event: ev.Event
    claimer: str | None
    done: bool = False
    events: list[ev.Event] | None = None
    following: claims.Claim | None = None
    error: BaseException | None = None

    def outcome(self) -> tuple[list[ev.Event], claims.Claim | None]:
        if self.error is not None:
            raise self.error
        return self.events or [], self.following


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


def run_workers(target: str | Path, options: Options, echo: Callable[[str], None]
                ) -> list[str]:
    """Run ``options.concurrency`` workers until they stop; returns their error messages.

    The first SIGINT/SIGTERM lets every worker finish its current job; a second SIGINT
    kills running jobs' process groups and releases them back to the queue.
    """
    shutdown = Shutdown()
    echo = output_that_never_fails(echo)

    def on_signal(signum: int, frame: object) -> None:
        if shutdown.soft.is_set() and signum == signal.SIGINT:
            shutdown.hard.set()
        shutdown.stop("signal")
        waker.poke()

    def on_waker_crash(exc: BaseException) -> None:
        shutdown.stop("the process's waker thread crashed")  # the join loop below pokes

    ledger.connect(target).close()  # create or migrate once, before the threads race to
    runner.close_on_exec()
    conn = ledger.connect(target, durable=False)
    conn.for_worker()
    waker = conn.waker(on_waker_crash)
    silence = claims.Silence()
    results = GroupCommit()
    workers = [Worker(conn, options, shutdown, waker, echo, silence, results)
               for _ in range(options.concurrency)]
    previous = {
        sig: signal.signal(sig, on_signal)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread()
    }
    threads = [threading.Thread(target=w.run, name=f"worker-{n}") for n, w in enumerate(workers)]
    try:
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
        runner.LEFTOVERS.sweep(everything=True)
        waker.close()
        conn.close()
    errors = [f"worker {w.id}: {render.one_line(w.error)}" for w in workers if w.error is not None]
    if waker.error is not None:
        errors.append(f"waker: {render.one_line(waker.error)}")
    return errors
