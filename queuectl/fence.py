"""Self-fencing: a worker that cannot renew its lease stops its own run before the lease can
expire, so that a rescuer, on any host, never starts a job while its previous run lives.

A rescuer takes a job back once it has watched the holder's heartbeat stay the same for
``lease-timeout`` seconds of its own clock, counted from a look that came after the
heartbeat's commit. The holder counts from a moment just before that commit
(``claims.heartbeat`` gives it), on its monotonic clock, so its deadline always falls first.
The deadline is kept by a thread of the process's own, since the worker's thread may be
blocked inside a database call (a lock held by another process, a server that does not
answer) for longer than the lease: this thread touches no database and takes no lock a
database call holds.

At ``TERM`` of the lease after the last renewal the run's process group gets SIGTERM; at
``KILL``, SIGKILL, with every process still carrying the run's mark (one that left the
group but kept its environment). A run whose shell ends in between has the rest of its
group killed at once. Only a run still alive is fenced: one that ended by itself meanwhile
is reported as it ended.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Mapping

import msgspec

from queuectl import runner

TERM = 0.7  # share of the lease, after the last renewal, at which the run gets SIGTERM
KILL = 0.8  # ... and SIGKILL: dead with a fifth of the lease to spare
RENEW = 0.4  # a worker renews its lease at least this often (share of the lease)


class Watched(msgspec.Struct):
    """One running job's process group and what its deadline is counted from."""

    group: int  # the shell's pid, the leader of the run's process group (unreaped)
    env: Mapping[bytes, bytes]  # the run's environment, whose mark its processes carry
    renewed: float  # monotonic time just before the last renewal's commit
    lease: float  # lease-timeout, seconds
    fenced: float | None = None  # seconds from the renewal to the SIGTERM, once sent
    killed: bool = False  # SIGKILL sent

    def due(self) -> float:
        """When this run must next be acted on."""
        return self.renewed + (KILL if self.fenced is not None else TERM) * self.lease


class Fence:
    """The deadlines of one process's running jobs, and the thread that keeps them.

    The thread sleeps until the earliest deadline and is woken only when a deadline comes
    earlier than the one it sleeps for, so a busy worker's many short runs cost it nothing.
    """

    def __init__(self, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._cond = threading.Condition()
        self._runs: dict[object, Watched] = {}
        self._sweep: list[Mapping[bytes, bytes]] = []  # runs whose marked processes to kill
        self._wake_at = math.inf  # when the thread will look next
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, key: object, group: int, env: Mapping[bytes, bytes], renewed: float,
              lease: float) -> None:
        """A run of ``key`` (a worker) started: its deadline counts from ``renewed``."""
        with self._cond:
            self._runs[key] = Watched(group, env, renewed, lease)
            self._wake(self._runs[key].due())

    def renewed(self, key: object, at: float, lease: float) -> None:
        """``key`` renewed its lease just before ``at``: its run's deadline moves on, unless
        the run has been fenced already (that run is over, whatever the store says now)."""
        with self._cond:
            run = self._runs.get(key)
            if run is not None and run.fenced is None:
                run.renewed, run.lease = max(run.renewed, at), lease
                self._wake(run.due())  # a shorter lease may bring it closer

    def ended(self, key: object) -> Watched | None:
        """``key``'s run is ending: call before its shell is reaped (the group's number is
        ours only until then). Returns what the fence did to it, if anything; what is left of
        a fenced run (its group, its marked processes) is killed now."""
        with self._cond:
            run = self._runs.pop(key, None)
            if run is not None and run.fenced is not None and not run.killed:
                runner.kill_group(run.group, signal.SIGKILL)
                run.killed = True
                self._sweep.append(run.env)
                self._cond.notify_all()
        return run

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _wake(self, at: float) -> None:
        """(Under the lock.) Have the thread look at ``at`` at the latest."""
        if at >= self._wake_at:
            return
        self._wake_at = at
        if self._thread is None:
            self._thread = threading.Thread(target=self._keep, name="fence", daemon=True)
            self._thread.start()
        else:
            self._cond.notify_all()

    def _keep(self) -> None:
        killed: list[Mapping[bytes, bytes]] = []
        while True:
            with self._cond:
                if self._closed:
                    return
                now = self._clock()
                killed += self._sweep
                self._sweep.clear()
                for run in self._runs.values():
                    if not run.killed and now >= run.due() and self._act(run, now):
                        killed.append(run.env)
                self._wake_at = min((r.due() for r in self._runs.values() if not r.killed),
                                    default=math.inf)
                if not killed:
                    self._cond.wait(None if self._wake_at == math.inf
                                    else max(0.0, self._wake_at - self._clock()))
                    continue
            # Outside the lock: reading /proc takes a while, and a pidfd never hits a
            # reused pid, so these need no protection from the run's end.
            for env in killed:
                mark = runner.mark_of(env)
                if mark is not None:
                    for pid in runner.marked_processes(mark):
                        runner.signal_marked(pid, mark, signal.SIGKILL)
            killed.clear()

    def _act(self, run: Watched, now: float) -> bool:
        """(Under the lock.) SIGTERM or SIGKILL the run, as its deadline says; True when
        it was killed now."""
        if run.fenced is None:
            if runner.shell_exited(run.group):
                run.killed = True  # it ended by itself: reported as it ended, not fenced
                return False
            run.fenced = round(now - run.renewed, 3)
            runner.kill_group(run.group, signal.SIGTERM)
            return False
        if not run.killed:
            runner.kill_group(run.group, signal.SIGKILL)
            run.killed = True
            return True
        return False
