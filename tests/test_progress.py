"""Progress bars of long work (rebuild, ledger import and export, prune, enqueue --file):
drawn on standard error when it is a terminal, read back from a pseudo-terminal as a
screen; nothing at all when it is a pipe or with --json; the results the same either way."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pyte
import pytest
from conftest import by_hand, queuectl_cmd, wait_for
from helpers import event_count, snapshot

from queuectl import decisions, ledger, progress
from queuectl import events as ev

COLUMNS, LINES = 150, 20
N = 2500  # above progress.SMALL, the least work that draws a bar


class Run:
    """``queuectl ARGS`` with standard error on a pseudo-terminal (or, ``piped``, on a pipe
    like standard output), its screen read back as a terminal would draw it."""

    def __init__(self, *args: str, stdin: Any = subprocess.DEVNULL, piped: bool = False
                 ) -> None:
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        self.raw = bytearray()
        self.screen = pyte.Screen(COLUMNS, LINES)
        self.stream = pyte.ByteStream(self.screen)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        if piped:
            self.proc = subprocess.Popen(queuectl_cmd(*args), stdin=stdin, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.reader = None
            return
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(queuectl_cmd(*args), stdin=stdin, env=env,
                                     stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        self.master = master
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
        with self.lock:
            return "\n".join(" ".join(line.split()) for line in self.screen.display).strip()

    def end(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit status, standard output, and standard error: the screen, or the pipe's text."""
        out, err = self.proc.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        if self.reader is None:
            return self.proc.returncode, out.decode(), err.decode()
        self.reader.join(5)
        os.close(self.master)
        return self.proc.returncode, out.decode(), self.text()


def both(*args: str, stdin: Path | None = None) -> tuple[tuple[int, str, str], Run]:
    """The command piped, then (on what it left) on a terminal: the piped run's results,
    and the terminal run."""
    def start(piped: bool) -> Run:
        return Run(*args, stdin=stdin.open("rb") if stdin else subprocess.DEVNULL,
                   piped=piped)

    piped = start(piped=True).end()
    return piped, start(piped=False)


def frames(raw: bytes) -> int:
    """How many times the display was drawn: each frame first returns to the line's start
    and erases it."""
    return raw.count(b"\r\x1b[2K")


def jobs_file(path: Path, n: int = N) -> Path:
    path.write_text("".join(json.dumps({"command": "true", "id": f"j{i}"}) + "\n"
                            for i in range(n)))
    return path


def enqueued(conn: Any, n: int = N) -> None:
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"j{i}") for i in range(n)])


def source_db(tmp_path: Path) -> Any:
    return by_hand(str(ledger.connect(tmp_path / "source.db").close() or tmp_path / "source.db"))


# -- the bar itself -------------------------------------------------------------------------


@pytest.mark.stores("sqlite")  # no store at all
def test_lines_are_counted_in_regular_files_only_and_the_file_is_left_where_it_was(tmp_path):
    path = tmp_path / "f"
    for text, lines in ((b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\n\nb\n", 3)):
        path.write_bytes(text)
        with path.open("rb") as f:
            assert progress.count_lines(f) == lines
            assert f.read() == text
    path.write_bytes(b"x\n" * 3_000_000)  # several reads
    with path.open("rb") as f:
        f.readline()
        assert progress.count_lines(f) == 2_999_999
        assert f.readline() == b"x\n"
    read, write = os.pipe()
    with os.fdopen(read, "rb") as pipe, os.fdopen(write, "wb"):
        assert progress.count_lines(pipe) is None
    assert progress.count_lines(io.BytesIO(b"a\n")) is None


@pytest.mark.stores("sqlite")  # no store at all
def test_a_bars_display_is_waited_for_until_it_ends_and_no_longer_than_allowed():
    ended = subprocess.Popen([*queuectl_cmd()[:1], "-c", "pass"])
    progress._wait(ended, 30)
    assert ended.returncode == 0
    stuck = subprocess.Popen([*queuectl_cmd()[:1], "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            progress._wait(stuck, 0.2)
        assert stuck.poll() is None  # still running: the caller kills it
    finally:
        stuck.kill()
        stuck.wait()


@pytest.mark.stores("sqlite")  # no store at all
def test_nothing_is_drawn_or_even_imported_off_a_terminal():
    """Under pytest standard error is captured, as in a pipe: the bar is the no-op one and
    steps told to it cost a method call."""
    with progress.progress(10**6, "Work", unit="items") as bar:
        assert bar is progress.NO_BAR and progress.current() is bar
        bar.update(500_000)
        assert list(progress.counted(range(5))) == list(range(5))
    assert progress.current() is progress.NO_BAR
    done = subprocess.run(
        [*queuectl_cmd()[:1], "-c", "import sys, queuectl.progress as p, queuectl.ledger;"
         "print('rich' in sys.modules or any(m.startswith('rich.') for m in sys.modules))"],
        capture_output=True, text=True, timeout=30)
    assert done.stdout == "False\n", done.stderr


# -- each command ---------------------------------------------------------------------------


def test_rebuild_shows_the_events_replayed_and_prints_the_same(conn):
    enqueued(conn)
    conn.close()
    piped, term = both("rebuild")
    assert piped == (0, f"Projections rebuilt from {N:,} events.\n", "")
    code, out, screen = term.end()
    assert (code, out) == (0, piped[1])
    assert f"✓ Replaying the ledger ━" in screen
    assert f" {N:,}/{N:,} events " in screen and " events/s " in screen
    assert "✓ Building indexes" in screen
    assert "Error" not in screen and "Traceback" not in screen
    # Redrawn on a timer, at most ten times a second (plus the first and last frame).
    assert 2 <= frames(bytes(term.raw)) <= 10 * term.seconds + 4


def test_rebuild_check_shows_the_replay_and_its_comparison(conn):
    enqueued(conn)
    conn.close()
    piped, term = both("rebuild", "--check")
    assert piped == (0, "Projections match the ledger.\n", "")
    code, out, screen = term.end()
    assert (code, out) == (0, piped[1])
    assert f" {N:,}/{N:,} events " in screen
    assert "✓ Comparing with the live tables" in screen


def test_a_small_ledger_draws_no_bar(conn):
    enqueued(conn, 10)
    conn.close()
    code, out, screen = Run("rebuild").end()
    assert (code, out, screen) == (0, "Projections rebuilt from 10 events.\n", "")


def test_enqueue_file_shows_lines_read_then_jobs_added(db, tmp_path):
    path = jobs_file(tmp_path / "jobs.jsonl")
    run = Run("enqueue", "--file", str(path))
    code, out, screen = run.end()
    assert (code, out) == (0, f"{N} jobs added successfully.\n")
    assert f"✓ Reading jobs ━" in screen and f" {N:,}/{N:,} lines " in screen
    assert f"✓ Adding jobs ━" in screen and f" {N:,}/{N:,} jobs " in screen
    # Both steps on one display (a process of its own, which hides the cursor as it starts
    # drawing and shows it again as it ends), not one display a step.
    assert run.raw.count(b"\x1b[?25l") == run.raw.count(b"\x1b[?25h") == 1
    with by_hand(db) as conn:
        assert event_count(conn) == N
        ids = [r[0] for r in conn.execute("SELECT id FROM jobs ORDER BY seq").fetchall()]
    assert ids == [f"j{i}" for i in range(N)]  # the jobs, in order, as without a bar


def test_enqueue_file_piped_draws_nothing_and_writes_the_same_jobs(db, tmp_path):
    path = jobs_file(tmp_path / "jobs.jsonl")
    code, out, err = Run("enqueue", "--file", "-", stdin=path.open("rb"), piped=True).end()
    assert (code, out, err) == (0, f"{N} jobs added successfully.\n", "")
    with by_hand(db) as conn:
        assert event_count(conn) == N


def test_a_bad_line_after_the_bar_began_is_one_error_and_nothing_is_added(db, conn, tmp_path):
    path = jobs_file(tmp_path / "jobs.jsonl")
    with path.open("a") as f:
        f.write("{not json\n")
    before = snapshot(conn)
    code, out, screen = Run("enqueue", "--file", str(path)).end()
    assert (code, out) == (1, "")
    lines = screen.splitlines()
    assert lines[-1].startswith(f"Error: malformed JSON on line {N + 1}: "), screen
    assert [line for line in lines if "Error" in line or "Traceback" in line] == [lines[-1]]
    with by_hand(db) as conn:
        assert snapshot(conn) == before


def test_export_shows_events_written_when_its_lines_go_to_a_file(conn):
    enqueued(conn)
    conn.close()
    piped, term = both("ledger", "export")
    code, out, screen = term.end()
    assert piped[0] == code == 0 and piped[2] == ""
    assert out == piped[1] and len(out.splitlines()) == N  # the same lines, byte for byte
    assert f"✓ Exporting the ledger ━" in screen and f" {N:,}/{N:,} events " in screen


def test_export_to_the_terminal_itself_draws_no_bar_between_its_lines(conn):
    """Standard output on the same terminal: a bar drawn there would garble the lines."""
    enqueued(conn)
    conn.close()
    master, slave = pty.openpty()
    proc = subprocess.Popen(queuectl_cmd("ledger", "export"), stdout=slave,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    raw = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        raw += data
    proc.wait(60)
    os.close(master)
    assert proc.returncode == 0 and proc.stderr and proc.stderr.read() == b""
    assert raw.count(b"\n") == N and b"\x1b[" not in raw


def test_import_from_a_file_counts_against_its_lines(db, tmp_path):
    with source_db(tmp_path) as source:
        enqueued(source)
        lines = list(ledger.export(source))
    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    code, out, screen = Run("ledger", "import", str(path)).end()
    assert (code, out) == (0, f"Imported {N} events; projections rebuilt.\n")
    assert f"✓ Reading events ━" in screen and f" {N:,}/{N:,} events " in screen
    assert f"✓ Replaying the ledger ━" in screen
    with by_hand(db) as conn:
        assert list(ledger.export(conn)) == lines


def test_import_from_a_pipe_counts_without_a_total_until_it_ends(db, tmp_path):
    """A pipe's length is unknown: the bar counts what came so far, with no total, while
    the rest is still to come."""
    with source_db(tmp_path) as source:
        enqueued(source)
        lines = [line + "\n" for line in ledger.export(source)]
    read, write = os.pipe()
    term = Run("ledger", "import", "-", stdin=read)
    os.close(read)
    with os.fdopen(write, "w") as feed:
        feed.write("".join(lines[:1500]))
        feed.flush()
        screen = wait_for(lambda: "1,024 events" in term.text() and term.text(), 30,
                          "the bar to count 1,024 events")
        row = next(line for line in screen.splitlines() if "Reading events" in line)
        assert "1,024 events" in row and "/" not in row  # no total yet
        feed.write("".join(lines[1500:]))
    code, out, screen = term.end()
    assert (code, out) == (0, f"Imported {N} events; projections rebuilt.\n")
    assert f" {N:,}/{N:,} events " in screen  # the total, once known


def test_prune_shows_what_it_removes_and_json_draws_nothing(conn):
    wid = "w1"
    with ledger.write(conn):
        ledger.append(conn, ev.WorkerStarted(worker_id=wid, pid=1, host="h"))
        ledger.append(conn, *[ev.WorkerHeartbeat(worker_id=wid)] * N)
    conn.close()
    code, out, screen = Run("prune", "--before", "0s", "--dry-run").end()
    assert code == 0 and out.startswith("Would prune 0 jobs ")
    assert f"✓ Pruning superseded heartbeats ━" in screen
    assert f" {N - 1:,}/{N - 1:,} heartbeats " in screen
    code, out, screen = Run("prune", "--before", "0s", "--json").end()
    assert (code, screen) == (0, "")
    assert json.loads(out)["heartbeats"] == N - 1
