"""Workers: claim a job, run it as ``sh -c`` in its own process group, record the outcome.

One process runs N workers as threads, each with its own id, sharing one connection (one
at a time, under ``ledger.PROCESS_LOCK``): with a connection each, every commit by one
emptied the other's page cache, which it then read back from the WAL. A single waker thread
per process watches ``PRAGMA data_version`` (a few microseconds a read) so that idle workers
pick up new work within milliseconds instead of waiting out their poll interval.
"""

from __future__ import annotations

import fcntl
import functools
import os
import select
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from queuectl import clock, ledger, queue, settings
from queuectl import events as ev
from queuectl.render import safe

WAKE_POLL = 0.002  # seconds between data_version reads in the waker (without inotify)
LOOK_POLL = 0.0005  # the same while a commit is being written (inotify): a short window
WATCH_AFTER = 1.0  # seconds of workers waiting before the waker sets up inotify
CHECKPOINT_EVERY = 0.25  # seconds between the waker's WAL checkpoints
LOCKED_SHARE = 0.02  # at most this share of the time may the waker hold the process lock
WATCH_SAFETY_MS = 50  # with inotify, the waker still looks this often (ms), just in case
WATCH_LOOK = 0.25  # after a write to the WAL, the waker looks every LOOK_POLL for this long
T = TypeVar("T")

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a job's process group
CANCEL_CHECK = 0.2  # seconds between checks for a cancel request while a job runs


@dataclass
class Options:
    verbose: bool = False
    concurrency: int = 1
    poll: float = 3.0  # fallback check interval; new work wakes workers at once anyway
    limit: int = 0  # jobs per worker, 0 = no limit
    burst: bool = False


class Shutdown:
    """What a signal asked for: ``soft`` finishes the current job, ``hard`` abandons it."""

    def __init__(self) -> None:
        self.soft = threading.Event()
        self.hard = threading.Event()


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

    def __init__(self, path: Path) -> None:
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
        self._thread = threading.Thread(target=self._watch, name="waker", daemon=True)
        self._thread.start()

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


@dataclass
class RunResult:
    exit_code: int | None
    duration: float
    output: str
    truncated: bool
    timed_out: bool = False
    abandoned: bool = False


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Python ignores SIGPIPE and SIGXFSZ for itself; a job starts with the default actions, as
# subprocess's restore_signals would give it (else `yes | head` never ends).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@functools.cache
def _shell() -> str:
    """``sh`` as PATH finds it, looked up once per process: posix_spawnp would search PATH
    on every spawn, failing exec after exec in the child while the worker waits for it."""
    return shutil.which("sh") or "/bin/sh"


def _spawn(command: str, env: Mapping[str, str]) -> tuple[int, int]:
    """Start ``sh -c command`` as the leader of a new session, reading /dev/null, writing
    stdout and stderr into one pipe; returns its pid and the pipe's read end.

    os.posix_spawn (vfork and exec inside libc) costs the worker about 70 us of CPU per
    job, subprocess.Popen about 170 us, most of it Popen's own set-up in Python.
    Descriptors the job must not see are close-on-exec (see ``_close_on_exec``), which is
    what Popen's close_fds would otherwise do in the child.
    """
    read_end, write_end = os.pipe()
    if write_end < 3:  # the worker runs with stdout or stderr closed: keep off 0-2
        low, write_end = write_end, fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(low)
    try:
        pid = os.posix_spawn(
            _shell(),
            ["sh", "-c", command],
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_end, 1),
                (os.POSIX_SPAWN_DUP2, write_end, 2),
            ],
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return pid, read_end


def _close_on_exec() -> None:
    """Mark every descriptor above stderr close-on-exec, once per worker process: Python
    and SQLite open theirs that way, so only those the worker inherited could leak into
    jobs started by posix_spawn."""
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        if int(name) > 2:
            try:
                os.set_inheritable(int(name), False)
            except OSError:  # the directory listing's own descriptor, closed by now
                pass


def _reap(pid: int) -> int | None:
    """The exit code of ``pid`` (negative for a signal) once it has exited, else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # reaped behind our back (SIGCHLD ignored), as subprocess says
        return 0
    return os.waitstatus_to_exitcode(status) if done else None


def _wait(pid: int, timeout: float) -> int | None:
    """``_reap`` until ``pid`` exits or ``timeout`` passes, in growing sleeps as Popen.wait."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while (code := _reap(pid)) is None and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
    return code


def run_command(
    command: str,
    *,
    timeout: float,
    output_limit: int,
    tick: Callable[[], bool],
    env: Mapping[str, str] | None = None,
) -> RunResult:
    """Run ``sh -c command`` in a new process group, keeping only the tail of its output.

    ``tick`` is called about every 50 ms while it runs (heartbeats, cancel checks); when it
    returns True the group is killed at once. On timeout the group gets SIGTERM, then
    SIGKILL after a grace. ``env`` defaults to the worker's own environment. A shell that
    cannot be started (a command over the kernel's 128 KiB argument limit, no processes
    left) is a run that failed with status 126, not the worker's end.
    """
    start = time.monotonic()
    try:
        pid, fd = _spawn(command, os.environ if env is None else env)
    except OSError as exc:
        why = f"queuectl: cannot start sh: {exc.strerror or exc}"
        return RunResult(exit_code=126, duration=round(time.monotonic() - start, 6),
                         output=why[-output_limit:] if output_limit else "", truncated=False)
    tail = bytearray()
    total = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    pipe_open = True
    # A pidfd turns readable when the shell exits, so one poll() waits for output, end of
    # output and exit alike, with no sleeping in between (Linux >= 5.3; else we poll).
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = None

    def read() -> bool:
        nonlocal total, pipe_open
        chunk = os.read(fd, 65536)
        if not chunk:
            pipe_open = False
            poller.unregister(fd)
            return False
        total += len(chunk)
        tail.extend(chunk)
        if len(tail) > output_limit + 65536:  # memory stays bounded, whatever the job prints
            del tail[: len(tail) - output_limit]
        return True

    timed_out = abandoned = False
    code: int | None = None
    try:
        while True:
            ready = poller.poll(50)
            if pipe_open and any(f == fd for f, _ in ready):
                read()
            code = _wait(pid, 0.05) if pidfd is None and not pipe_open else _reap(pid)
            if code is not None:
                # The shell is done. A background grandchild may still hold the pipe
                # open: take what is already there and stop reading.
                for _ in range(64):
                    if not (pipe_open and poller.poll(0) and read()):
                        break
                _kill_group(pid, signal.SIGTERM)  # leftovers of a finished job go too
                break
            abandoned = tick()
            timed_out = bool(timeout) and time.monotonic() - start > timeout
            if abandoned or timed_out:
                _kill_group(pid, signal.SIGTERM)
                code = _wait(pid, 0 if abandoned else KILL_GRACE)
                _kill_group(pid, signal.SIGKILL)  # and any grandchild that ignored TERM
                if code is None:
                    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                break
    finally:
        if pidfd is not None:
            os.close(pidfd)
        os.close(fd)
    kept = bytes(tail[-output_limit:]) if output_limit else b""
    return RunResult(
        exit_code=code,
        duration=round(time.monotonic() - start, 6),
        output=kept.decode("utf-8", "replace"),
        truncated=total > len(kept),
        timed_out=timed_out,
        abandoned=abandoned,
    )


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    note = {126: " (command not executable)", 127: " (command not found)"}.get(code, "")
    return f"exit status {code}{note}"


class Worker:
    """One worker: its own id, one job at a time, on its process's shared connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        options: Options,
        shutdown: Shutdown,
        waker: Waker,
        echo: Callable[[str], None],
    ) -> None:
        self.conn = conn
        self.options = options
        self.shutdown = shutdown
        self.waker = waker
        self.echo = echo
        self.id = ""  # given by the ledger when the worker starts (see run)
        self.done = 0
        # Jobs get the environment the worker started with; os.environ itself would be
        # re-encoded, variable by variable, at every spawn (about 40 us).
        self.env = dict(os.environ)
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
        try:
            self.config = self.db(settings.load)
            self.id = self.db(queue.worker_started, os.getpid(), os.uname().nodename)
            self.echo(f"Worker started: {self.id}")
            self._beat_done()
            reason = self._loop()
            self.db(queue.worker_stopped, self.id, reason)
            self.log(f"stopped ({reason})")
        except BaseException as exc:  # reported by the pool as one line
            self.error = exc

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
        if now >= self._next_beat:
            self.config = self.db(settings.load)
            self.db(queue.heartbeat, self.id)
            self._beat_done()
        if now >= self._next_rescue:
            self._next_rescue = now + float(self.config["heartbeat-interval"])
            for event in self.db(queue.rescue, float(self.config["lease-timeout"])):
                self._report(event)

    def _stop_reason(self) -> str | None:
        if self.shutdown.soft.is_set():
            return "signal"
        if self.options.limit and self.done >= self.options.limit:
            return "job limit reached"
        state, stop = self.db(queue.worker_state, self.id)
        if stop:
            return "stop requested"
        if state == "gone":
            return "declared lost by another worker"
        return None

    def _loop(self) -> str:
        job: queue.Claim | None = None
        while True:
            if job is not None:
                if self.shutdown.soft.is_set():  # claimed with the last result, not started
                    self.db(queue.finish, job, ev.Released(
                        job_id=job.job_id, worker_id=self.id, attempt=job.attempt,
                        reason="worker shut down before the job started"))
                    return "signal"
                self._tick()  # a streak of instant jobs still heartbeats and rescues
                job = self._work(job)
                continue
            reason = self._stop_reason()
            if reason:
                return reason
            self._tick()
            seen = self.waker.generation
            job = self.db(queue.claim, self.id)
            if job is None:
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
        if verbose and job.attempt == 1:
            self.log(f"Picked up NEW job: {job.job_id} (Command: {safe(job.command)})")
        elif verbose:
            self.log(f"RETRYING job {job.job_id} (Attempt {job.attempt})")
        if verbose:
            self.log(f"Job {job.job_id} state: processing")
        self._kill_reason = None
        self._next_cancel_check = time.monotonic() + CANCEL_CHECK
        result = run_command(
            job.command,
            timeout=job.timeout,
            output_limit=int(self.config["output-limit"]) * 1024,
            tick=lambda: self._running_tick(job),
            env=self.env,
        )
        self.done += 1
        go_on = not self.shutdown.soft.is_set() and not (
            self.options.limit and self.done >= self.options.limit
        )
        events, following = self.db(
            queue.finish_and_claim, job, self._event(job, result), self.id if go_on else None
        )
        if verbose:
            for event in events:
                self._report(event, job)
        return following

    def _event(self, job: queue.Claim, r: RunResult) -> ev.Event:
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
                         duration=took, exit_code=code, error=describe_exit(code))

    def _report(self, event: ev.Event, job: queue.Claim | None = None) -> None:
        total = 1 + job.max_retries if job else None
        match event:
            case ev.Completed(job_id=j):
                self.log(f"Job {j} state: completed")
            case ev.Failed(job_id=j, attempt=a, error=error):
                self.log(f"Job {j} FAILED (Attempt {a}/{total}): {error}")
            case ev.TimedOut(job_id=j, attempt=a, timeout=t):
                self.log(f"Job {j} FAILED (Attempt {a}/{total}): timed out after {t:g}s")
            case ev.LeaseExpired(job_id=j, worker_id=w):
                self.log(f"Job {j} taken back: worker {w} stopped heartbeating")
            case ev.WorkerLost(worker_id=w):
                self.log(f"Worker {w} is gone: no heartbeat")
            case ev.Released(job_id=j):
                self.log(f"Job {j} released back to the queue")
            case ev.Cancelled(job_id=j, reason=r):
                self.log(f"Job {j} state: cancelled ({r})")
            case ev.Unblocked(job_id=j):
                self.log(f"Job {j} unblocked: its dependencies completed")
            case ev.ScheduledRetry(job_id=j, delay=d):
                self.log(f"Job {j} state: failed - Will retry in {d:g}s")
            case ev.Dead(job_id=j):
                self.log(f"Job {j} state: DEAD")


def run_workers(path: Path, options: Options, echo: Callable[[str], None]) -> list[str]:
    """Run ``options.concurrency`` workers until they stop; returns their error messages.

    The first SIGINT/SIGTERM lets every worker finish its current job; a second SIGINT
    kills running jobs' process groups and releases them back to the queue.
    """
    shutdown = Shutdown()

    def on_signal(signum: int, frame: object) -> None:
        if shutdown.soft.is_set() and signum == signal.SIGINT:
            shutdown.hard.set()
        shutdown.soft.set()
        waker.poke()

    ledger.connect(path).close()  # create or migrate once, before the threads race to
    _close_on_exec()
    waker = Waker(path)
    conn = connect(path)
    workers = [Worker(conn, options, shutdown, waker, echo) for _ in range(options.concurrency)]
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        waker.close()
        conn.close()
    return [f"worker {w.id}: {w.error}" for w in workers if w.error is not None]
