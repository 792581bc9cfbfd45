"""Workers: claim a job, run it as ``sh -c`` in its own process group, record the outcome.

One process runs N workers as threads, each with its own id, sharing one connection (one
at a time, under ``ledger.PROCESS_LOCK``): with a connection each, every commit by one
emptied the other's page cache, which it then read back from the WAL. A single waker thread
per process watches ``PRAGMA data_version`` (a few microseconds a read) so that idle workers
pick up new work within milliseconds instead of waiting out their poll interval.
"""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from queuectl import clock, ledger, queue, render, runner, settings
from queuectl import events as ev

WAKE_POLL = 0.002  # seconds between data_version reads in the waker (without inotify)
LOOK_POLL = 0.0005  # the same while a commit is being written (inotify): a short window
WATCH_AFTER = 1.0  # seconds of workers waiting before the waker sets up inotify
CHECKPOINT_EVERY = 0.25  # seconds between the waker's WAL checkpoints
LOCKED_SHARE = 0.02  # at most this share of the time may the waker hold the process lock
WATCH_SAFETY_MS = 50  # with inotify, the waker still looks this often (ms), just in case
WATCH_LOOK = 0.25  # after a write to the WAL, the waker looks every LOOK_POLL for this long
T = TypeVar("T")

CANCEL_CHECK = 0.2  # seconds between checks for a cancel request while a job runs


@dataclass
class Options:
    verbose: bool = False
    concurrency: int = 1
    poll: float = 3.0  # fallback check interval; new work wakes workers at once anyway
    limit: int = 0  # jobs per worker, 0 = no limit
    burst: bool = False


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


def connect(path: Path) -> sqlite3.Connection:
    """A worker's connection: progress is written with synchronous=NORMAL (a lost result
    only means the job runs again) and checkpoints are left to the process's Waker."""
    conn = ledger.connect(path, durable=False)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


class WalWatch:
    """Linux inotify on the database's ``-wal`` file: its descriptor turns readable as soon
    as any connection, in any process, writes a commit there. Idle workers then sleep in
    poll() instead of waking every 2 ms to look (about 5% of a core per process)."""

    IN_MODIFY = 0x2

    def __init__(self, wal: Path) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(fd, os.fsencode(wal), self.IN_MODIFY) < 0:
            os.close(fd)
            raise OSError(ctypes.get_errno(), f"cannot watch {wal}")
        self.fd = fd

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class Waker:
    """Wakes idle workers whenever another connection commits to the database.

    ``PRAGMA data_version`` says whether anything changed. The waker looks every 2 ms while
    a worker waits; once workers have waited a second in all, inotify on the WAL file (where
    available) says when to look instead. Short waits, such as the end of a burst, never
    pay for setting inotify up (ctypes) or for taking it down (about 13 ms in close()).
    """

    def __init__(self, path: Path, on_crash: Callable[[BaseException], None] | None = None
                 ) -> None:
        self._on_crash = on_crash
        self.error: BaseException | None = None
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA data_version").fetchone()  # the WAL file exists from here
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # workers wait here for a new generation
        self._wanted = threading.Condition(lock)  # the waker waits here for a waiting worker
        self._waiting = 0
        self._generation = 0
        self._closed = False
        self._wal = Path(f"{path}-wal")
        self._next_locked = 0.0  # monotonic time of the next locked checkpoint pass
        self._watch_fd: WalWatch | None = None
        self._thread = threading.Thread(target=self._supervised, name="waker", daemon=True)
        self._thread.start()

    def _supervised(self) -> None:
        """The waker's thread. If it dies, the process stops as if a worker had crashed:
        its workers would otherwise go on with wake-ups and checkpoints silently gone."""
        try:
            self._watch()
        except BaseException as exc:
            self.error = exc
            if self._on_crash is not None:
                self._on_crash(exc)

    def _watch(self) -> None:
        last = None
        next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
        look_until = 0.0
        polled = 0.0  # seconds of looking every WAKE_POLL, up to WATCH_AFTER
        poller = select.poll()
        while not self._closed:
            self._until_wanted(next_checkpoint)
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != last:
                last = version
                self.poke()
            if time.monotonic() >= next_checkpoint:
                self._checkpoint()
                next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
            if self._watch_fd is None:
                slept = time.monotonic()
                time.sleep(WAKE_POLL)
                polled += time.monotonic() - slept if self._waiting else 0.0
                if polled >= WATCH_AFTER:
                    polled = float("-inf")  # one try: without inotify, go on looking
                    self._start_watching(poller)
            elif time.monotonic() < look_until:
                time.sleep(LOOK_POLL)
            elif poller.poll(WATCH_SAFETY_MS):  # the WAL is being written to
                # The first page of a commit reaches the WAL before the commit is visible:
                # look again and again for a while (a loaded machine may pause the writer),
                # rather than once.
                look_until = time.monotonic() + WATCH_LOOK
            if self._watch_fd is not None:
                self._watch_fd.drain()

    def _start_watching(self, poller: select.poll) -> None:
        try:
            self._watch_fd = WalWatch(self._wal)
        except (OSError, AttributeError):  # not Linux, or no inotify watches left
            return
        poller.register(self._watch_fd.fd, select.POLLIN)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database, all of it, so that the next commit writes the WAL
        from its start again.

        Workers turn automatic checkpoints off (they ran inside a worker's COMMIT, holding
        the write lock while pages were copied and synced). This thread copies beside the
        workers, then what they committed meanwhile while holding the process lock (about
        2 ms in 250 here). A checkpoint that never catches up cannot restart the WAL: under
        busy workers it grew by some 50 MB a second, and the last close had to checkpoint
        and delete it all (about 40 ms). Where syncing is slow (a disk, not a VM's cache),
        the locked pass comes less often, holding the lock no more than LOCKED_SHARE of
        the time: the WAL then grows for longer instead of the workers stalling.
        """
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if time.monotonic() < self._next_locked:
            return
        with ledger.PROCESS_LOCK:
            start = time.monotonic()
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            held = time.monotonic() - start
        self._next_locked = time.monotonic() + held / LOCKED_SHARE

    def _until_wanted(self, deadline: float) -> None:
        """Sleep while no worker waits, until ``deadline`` at the latest (the checkpoint).

        Busy workers claim their next job as they record a result, so on a busy queue
        nobody needs waking: looking every 2 ms and waking at every commit then only took
        the GIL and CPU from the workers. A worker that starts to wait wakes this thread,
        whose first look sees any commit made while it slept (``data_version`` moved).
        """
        with self._wanted:
            self._wanted.wait_for(
                lambda: self._waiting or self._closed, max(0.0, deadline - time.monotonic())
            )

    @property
    def watching(self) -> bool:
        """Whether inotify tells this waker when to look (else it looks every 2 ms)."""
        return self._watch_fd is not None

    @property
    def generation(self) -> int:
        return self._generation

    def poke(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the database changes after generation ``seen``, or ``timeout``."""
        with self._cond:
            self._waiting += 1
            self._wanted.notify()
            try:
                self._cond.wait_for(lambda: self._generation != seen or self._closed, timeout)
            finally:
                self._waiting -= 1

    def close(self) -> None:
        self._closed = True
        self.poke()
        with self._wanted:
            self._wanted.notify()
        self._thread.join()
        if self._watch_fd is not None:
            self._watch_fd.close()
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._conn.close()


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
        conn: sqlite3.Connection,
        options: Options,
        shutdown: Shutdown,
        waker: Waker,
        echo: Callable[[str], None],
        silence: queue.Silence,
    ) -> None:
        self.conn = conn
        self.options = options
        self.shutdown = shutdown
        self.waker = waker
        self.echo = echo
        self.silence = silence
        self.id = ""  # given by the ledger when the worker starts (see run)
        self.host = os.uname().nodename
        self.done = 0
        self.holding: queue.Claim | None = None  # claimed and not yet finished
        self.env = runner.base_env()
        self._next_beat = 0.0
        self._next_rescue = 0.0
        self._next_cancel_check = 0.0
        self._kill_reason: str | None = None
        self.error: BaseException | None = None

    def db(self, call: Callable[..., T], *args: Any) -> T:
        """``call(conn, *args)`` on the shared connection, no other thread using it: every
        read and write transaction, and every fetch, happens inside."""
        with ledger.PROCESS_LOCK:
            return call(self.conn, *args)

    def log(self, text: str) -> None:
        if self.options.verbose:
            self.echo(f"[{self.id}] {text}")

    def run(self) -> None:
        reason = "crashed"
        try:
            self.config = self.db(settings.load)
            self.id = self.db(queue.worker_started, os.getpid(), self.host)
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
                    self.db(queue.finish, job, ev.Released(
                        job_id=job.job_id, worker_id=self.id, attempt=job.attempt,
                        reason=f"worker stopped while holding it: {reason}"))
                    job = self.holding = None
                self.db(queue.worker_stopped, self.id, reason)
                self.log(f"stopped ({reason})")
                return
            except Exception as exc:  # the first error is the one reported
                self.error = self.error or exc
                time.sleep(0.5 * (attempt + 1))

    def _beat_done(self) -> None:
        interval = float(self.config["heartbeat-interval"])
        self._next_beat = time.monotonic() + interval

    def _tick(self) -> None:
        """Housekeeping while running or idle: heartbeat, and rescue silent workers' jobs."""
        self._housekeeping(time.monotonic())

    def _running_tick(self, job: queue.Claim) -> bool:
        """Housekeeping while a job runs; True when the run must be killed now."""
        now = time.monotonic()
        self._housekeeping(now)
        if self.shutdown.hard.is_set():
            self._kill_reason = "shutdown"
        elif now >= self._next_cancel_check:
            self._next_cancel_check = now + CANCEL_CHECK
            if self.db(queue.cancel_requested, job.job_id):
                self._kill_reason = "cancel"
        return self._kill_reason is not None

    def _housekeeping(self, now: float) -> None:
        runner.LEFTOVERS.sweep()
        if now >= self._next_beat:
            self.config = self.db(settings.load)
            self.db(queue.heartbeat, self.id)
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
        silent = [w for w in self.db(queue.silent_workers, lease, self.silence, gap)
                  if w[0] != self.id]
        if not silent:
            return
        killed = {w: runner.stop_marked(runner.worker_mark(w))
                  for w, _, host in silent if host == self.host}
        for event in self.db(queue.rescue, silent, killed):
            self._report(event)

    def _stop_reason(self) -> str | None:
        if self.shutdown.soft.is_set():
            return self.shutdown.reason
        if self.options.limit and self.done >= self.options.limit:
            return "job limit reached"
        state, stop = self.db(queue.worker_state, self.id)
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
                    self.db(queue.finish, job, ev.Released(
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
            self.holding = self.db(queue.claim, self.id)
            if self.holding is None:
                if self.options.burst and self.db(queue.unfinished) == 0:
                    return "burst: queue empty"
                self.waker.wait(seen, self._idle_timeout())

    def _idle_timeout(self) -> float:
        timeout = min(self.options.poll, max(0.0, self._next_beat - time.monotonic()))
        run_at = self.db(queue.next_run_at)
        if run_at is not None:
            timeout = min(timeout, max(0.0, clock.seconds_between(clock.now(), run_at)))
        return timeout

    def _work(self, job: queue.Claim) -> queue.Claim | None:
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
        events, following = self.db(
            queue.finish_and_claim, job, self._event(job, result), self.id if go_on else None
        )
        self.holding = following
        if verbose:
            for event in events:
                self._report(event, job)
        return following

    def _event(self, job: queue.Claim, r: runner.RunResult) -> ev.Event:
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

    def _report(self, event: ev.Event, job: queue.Claim | None = None) -> None:
        line = render.worker_line(event, 1 + job.max_retries if job else None)
        if line:
            self.log(line)


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


def run_workers(path: Path, options: Options, echo: Callable[[str], None]) -> list[str]:
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

    ledger.connect(path).close()  # create or migrate once, before the threads race to
    runner.close_on_exec()
    waker = Waker(path, on_waker_crash)
    conn = connect(path)
    silence = queue.Silence()
    workers = [Worker(conn, options, shutdown, waker, echo, silence)
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
