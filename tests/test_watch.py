"""``status --watch``: the figures of one frame, read from the projections within index
ranges and LIMITs; the frame drawn; and the live view driven in a pseudo-terminal, read
back as a screen, as a person would see it."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyte
import pytest
from conftest import by_hand, queuectl_cmd, spawn, wait_for

from queuectl import claims, clock, decisions, ledger, reads, watch
from queuectl import events as ev

COLUMNS, LINES = 120, 40


# -- pure parts -----------------------------------------------------------------------------


@pytest.mark.stores("sqlite")  # no store at all
def test_sparkline_scales_to_the_largest_and_keeps_none_apart_from_few():
    assert watch.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert watch.sparkline([0, 0, 0]) == "▁▁▁"
    assert watch.sparkline([]) == ""
    assert watch.sparkline([1, 1000]) == "▂█"  # a slow minute never looks idle
    assert watch.sparkline([5]) == "█"
    assert watch.sparkline([50, 100, 0]) == "▅█▁"


@pytest.mark.stores("sqlite")  # no store at all
def test_ages_fit_a_narrow_column():
    assert [watch.age(s) for s in (None, -1, 0.04, 9.96, 42, 185, 7380, 273600)] == [
        "-", "0.0s", "0.0s", "10.0s", "42s", "3m05s", "2h03m", "3d04h"]


# -- one frame ------------------------------------------------------------------------------


def _finish(conn: Any, worker: str, claim: claims.Claim | None, outcome: str) -> None:
    assert claim is not None
    kind = {"completed": ev.Completed, "failed": ev.Failed}[outcome]
    extra = {"exit_code": 3, "error": "exit status 3"} if outcome == "failed" else {}
    claims.finish(conn, claim, kind(job_id=claim.job_id, worker_id=worker,
                                    attempt=claim.attempt, **extra))


def test_a_frame_shows_counts_throughput_workers_and_failures(conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"ok{n}") for n in range(3)]
                      + [decisions.JobSpec(command="exit 3", id="bad", max_retries=0),
                         decisions.JobSpec(command="sleep 9", id="slow", queue="media")])
    wid = claims.worker_started(conn, 4242, "box")
    for outcome in ("completed", "completed", "completed", "failed"):
        _finish(conn, wid, claims.claim(conn, wid), outcome)
    running = claims.claim(conn, wid)
    assert running is not None and running.job_id == "slow"

    snap = watch.snapshot(conn)
    assert (snap.counts["completed"], snap.counts["dead"], snap.counts["processing"]) == (3, 1, 1)
    assert snap.last_minute == {"completed": 3, "failed": 1}
    assert snap.per_minute == [0] * 9 + [4]
    assert [(f.job_id, f.outcome, f.last_error) for f in snap.failures] == [
        ("bad", "failed", "exit status 3")]
    [worker] = snap.workers
    assert (worker.id, worker.host, worker.current_job, worker.jobs_done) == (
        wid, "box", "slow", 4)
    assert worker.job_since is not None and snap.tally["active"] == 1

    out = io.StringIO()
    from rich.console import Console

    Console(file=out, width=COLUMNS).print(watch.view(snap, 0.5, "q.db"))
    lines = [" ".join(line.split()) for line in out.getvalue().splitlines()]
    assert lines[0].startswith("queuectl status --watch q.db every 0.5s ")
    assert "Jobs pending: 0 scheduled: 0 waiting: 0 processing: 1 completed: 3 failed: 0 " \
           "dead: 1 cancelled: 0 (total: 5)" in lines
    assert "queue media processing: 1" in lines
    assert "Throughput 4 runs ended in the last minute: 3 completed, 1 failed" in lines
    assert "Last 10 min ▁▁▁▁▁▁▁▁▁█ runs ended a minute, peak 4" in lines
    assert "Workers: 1 active, 0 silent" in lines
    row = next(line for line in lines if line.startswith(wid))
    assert row.split()[:6] == [wid, "active", "box", "4242", "slow", row.split()[5]]
    assert row.split()[6] == "4" and row.endswith(" ago")
    failure = next(line for line in lines if line.startswith("bad "))
    assert failure.split()[:4] == ["bad", "default", "1", "failed"]
    assert failure.endswith("ago exit status 3")


def test_minutes_are_counted_back_from_now_and_old_runs_leave(conn, monkeypatch):
    """Each bar is one minute ending at a whole number of minutes before now; a run that
    finished more than ten minutes ago is in none, and the last minute's figures are
    the last bar's."""
    start = clock.parse("2026-01-01T00:00:00Z")
    offset = [0.0]

    def fake_now() -> str:
        from datetime import timedelta

        return clock.iso(start + timedelta(seconds=offset[0]))

    monkeypatch.setattr(clock, "now", fake_now)
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"j{n}") for n in range(6)])
    wid = claims.worker_started(conn, 1, "h")
    for at in (0, 29, 330, 335, 340, 600):  # seconds after start
        offset[0] = at
        _finish(conn, wid, claims.claim(conn, wid), "completed")
    offset[0] = 630  # now: the bars cover 30 s .. 630 s, a minute each
    snap = watch.snapshot(conn)
    assert snap.per_minute == [0, 0, 0, 0, 0, 3, 0, 0, 0, 1]
    assert snap.last_minute == {"completed": 1}


def test_failures_are_the_newest_few(conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="exit 3", id=f"f{n}", max_retries=0)
                             for n in range(7)])
    wid = claims.worker_started(conn, 1, "h")
    for _ in range(7):
        _finish(conn, wid, claims.claim(conn, wid), "failed")
    assert [f.job_id for f in reads.newest_failures(conn, 5)] == [
        "f6", "f5", "f4", "f3", "f2"]


@pytest.mark.stores("sqlite")  # the plans are SQLite's; PostgreSQL's differ by table size
def test_no_read_of_a_frame_scans_a_table(conn, monkeypatch):
    """Every query a frame runs searches an index (a range, a key, or the top of one under
    a LIMIT); none walks a whole table of jobs or runs. (The workers table is read whole,
    as plain status reads it: it grows with workers started, not with jobs.)"""
    plans: list[tuple[str, list[str]]] = []
    execute = conn.execute

    def explained(sql: str, params: Any = ()) -> Any:
        if sql.lstrip().upper().startswith("SELECT"):
            plan = [row[3] for row in execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()]
            plans.append((sql, plan))
        return execute(sql, params)

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(conn, name)

        execute = staticmethod(explained)

    watch.snapshot(Spy())  # type: ignore[arg-type]
    assert len(plans) >= 7
    for sql, plan in plans:
        scans = [step for step in plan if step.startswith("SCAN")
                 and not step.startswith(("SCAN workers", "SCAN config", "SCAN job_counts",
                                          "SCAN recent", "SCAN f", "SCAN CONSTANT ROW"))]
        assert not scans, (sql, plan)
    joined = "\n".join(step for _, plan in plans for step in plan)
    assert "USING INDEX runs_finished" in joined or "USING COVERING INDEX runs_finished" in joined
    assert "USING INDEX jobs_id" in joined


# -- the live view, in a terminal ----------------------------------------------------------


class Terminal:
    """A process whose standard input and output are a pseudo-terminal of a fixed size,
    read into a screen as a terminal would draw it; its standard error is a pipe."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        self.proc = subprocess.Popen(queuectl_cmd(*args), stdin=slave, stdout=slave,
                                     stderr=subprocess.PIPE, env=env)
        os.close(slave)
        self.master = master
        self.raw = bytearray()
        self.screen = pyte.Screen(COLUMNS, LINES)
        self.stream = pyte.ByteStream(self.screen)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the process closed its end
                return
            if not data:
                return
            with self.lock:
                self.raw += data
                self.stream.feed(data)

    def text(self) -> str:
        """The screen, each line's runs of spaces made one."""
        with self.lock:
            return "\n".join(" ".join(line.split()) for line in self.screen.display)

    def shows(self, *parts: str, timeout: float = 20) -> str:
        return wait_for(lambda: all(p in self.text() for p in parts) and self.text(), timeout,
                        f"the screen to show {parts}; it shows:\n{self.text()}")

    def end(self, timeout: float = 10) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        os.close(self.master)
        return code, self.proc.stderr.read().decode() if self.proc.stderr else ""


@contextmanager
def terminal(*args: str) -> Iterator[Terminal]:
    term = Terminal(*args)
    try:
        yield term
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.end()


def _restored(raw: bytes) -> bool:
    """The view left the alternate screen and showed the cursor again, last of all."""
    return raw.rstrip().endswith(b"\x1b[?25h\x1b[?1049l")


def test_the_live_view_follows_the_queue_and_ctrl_c_leaves_cleanly(run, conn):
    with terminal("status", "--watch", "-n", "0.2") as term:
        term.shows("Jobs pending: 0", "Workers: none active", "Newest failures: none",
                   "every 0.2s")
        for n in range(3):
            run("enqueue", "-c", "true", "--id", f"ok{n}")
        run("enqueue", "-c", "sleep 2", "--id", "slow")
        run("enqueue", "-c", "exit 3", "--id", "bad", "--max-retries", "0")
        term.shows("Jobs pending: 5 ", "(total: 5)")
        worker = spawn("worker", "--burst", "-s", "0.1")
        try:
            screen = term.shows(" slow ", "Workers: 1 active, 0 silent")
            row = next(line for line in screen.splitlines() if " slow " in line)
            assert row.split()[1:4] == ["active", row.split()[2], str(worker.pid)]
            # The failure's row drawn whole too: the screen may be read mid-frame.
            screen = term.shows("completed: 4 ", "dead: 1 ",
                                "runs ended in the last minute: 4 completed, 1 failed",
                                "Workers: none active (1 stopped, not shown)", "exit status 3")
        finally:
            worker.communicate(timeout=60)
        # A job claimed ahead (worker --ahead) behind the slow one may be given back first.
        ended = int(re.search(r"Throughput (\d+) runs ended", screen)[1])  # type: ignore[index]
        back = re.search(r"(\d+) given back unstarted", screen)
        assert ended == 5 + (int(back[1]) if back else 0)
        assert f"▁▁▁▁▁▁▁▁▁█ runs ended a minute, peak {ended}" in screen
        failure = next(line for line in screen.splitlines() if line.startswith("bad "))
        assert failure.split()[:4] == ["bad", "default", "1", "failed"]
        assert failure.endswith("exit status 3")
        term.proc.send_signal(signal.SIGINT)
        code, stderr = term.end()
    assert (code, stderr) == (0, "")
    assert _restored(bytes(term.raw))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_stop_leaves_the_terminal_as_it_was(conn, sig):
    with terminal("status", "--watch", "-n", "0.1") as term:
        term.shows("Jobs pending: 0")
        term.proc.send_signal(sig)
        code, stderr = term.end()
    assert (code, stderr) == (0, "")
    assert _restored(bytes(term.raw))


def test_a_database_error_while_watching_is_one_line_and_a_restored_terminal(db, conn):
    """A projection dropped by hand under the view (then rebuilt from the ledger)."""
    with terminal("status", "--watch", "-n", "0.2") as term:
        term.shows("Jobs pending: 0")
        with by_hand(db) as conn:
            conn.execute("DROP TABLE job_counts")
        code, stderr = term.end(timeout=20)
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("Error: database error: "), stderr
    assert "job_counts" in stderr
    assert _restored(bytes(term.raw))
    with by_hand(db) as conn:
        ledger.rebuild(conn)


@pytest.mark.stores("sqlite")  # the same on every store
def test_watch_needs_a_terminal():
    done = subprocess.run(queuectl_cmd("status", "--watch"), capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("Error: --watch needs a terminal, and standard output is not one "
                           "(status --json gives scripts the figures)\n")
