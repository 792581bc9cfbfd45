"""The output store and following a job's output, on both stores, black-box through the CLI:
chunks written while a job runs (``logs --follow`` sees the first line before the job
ends), ``--full``, the gap kept past ``log-limit``, retries, exit codes, Ctrl-C, ``prune``,
``ledger export``, ``enqueue --follow``, ``Queue.follow`` and the dashboard's live output."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest
from conftest import by_hand, spawn, wait_for
from helpers import WAIT, added, burst, one_error, ok, state, workers

from queuectl import Queue


def stored(db: Any, job_id: str) -> list[tuple[int, int, int, str]]:
    """The job's chunks in the output store: (attempt, seq, size, data)."""
    with by_hand(db) as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT attempt, seq, size, data FROM output WHERE job_id = ? ORDER BY attempt, seq",
            (job_id,)).fetchall()]


def follower(*args: str) -> subprocess.Popen[str]:
    return spawn("logs", *args, "--follow")


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline()


@pytest.mark.slow
def test_follow_sees_the_first_line_before_the_job_ends(run, conn, db):
    job_id = added(run, "-c", "echo first; sleep 2; echo second")
    with workers() as start:
        start("-s", "0.2")
        proc = follower(job_id)
        assert first_line(proc) == "first\n"
        assert state(conn, job_id) == "processing"  # seen while it still runs
        assert [c[3] for c in stored(db, job_id)] == ["first\n"]  # written as it ran
        out, err = proc.communicate(timeout=WAIT)
    assert (proc.returncode, out, err) == (0, "second\n", "")
    assert ok(run, "logs", job_id, "--full") == "first\nsecond\n"
    assert state(conn, job_id) == "completed"


@pytest.mark.slow
def test_follow_waits_for_the_job_to_start_and_follows_every_retry(run, db):
    job_id = added(run, "-c", 'echo "try $QUEUECTL_ATTEMPT"; sleep 0.6; exit 3',
                   "--max-retries", "1", "--backoff-base", "1")
    proc = follower(job_id)
    time.sleep(0.5)  # following a job no worker has started
    assert proc.poll() is None
    with workers() as start:
        start("-s", "0.2")
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 3  # dead: its last run's exit code
    assert out == "try 1\ntry 2\n"
    assert err == (f"==> job {job_id}: attempt 1 failed (exit status 3); "
                   "attempt 2 follows <==\n")
    assert ok(run, "logs", job_id, "--full", "--attempt", "1") == "try 1\n"
    assert ok(run, "logs", job_id, "--full") == "try 2\n"


@pytest.mark.parametrize(("command", "flags", "code"), [
    ("echo done", (), 0),
    ("echo no; exit 7", (), 7),
    ("echo slow; sleep 5", ("--timeout", "0.5"), 124),
])
def test_enqueue_follow_exits_with_the_jobs_exit_code(run, db, command, flags, code):
    ok(run, "config", "set", "max-retries", "0")
    with workers() as start:
        start("-s", "0.2")
        proc = spawn("enqueue", "-c", command, "--follow", *flags)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == code, err
    assert out == command.split(";")[0].removeprefix("echo ") + "\n"
    assert err.startswith("Job added successfully with ID: ")  # stdout is the job's own


def test_a_cancelled_job_ends_the_follow_with_1(run, db):
    job_id = added(run, "-c", "true", "--delay", "3600")
    proc = follower(job_id)
    time.sleep(0.3)
    ok(run, "cancel", job_id)
    assert proc.wait(timeout=WAIT) == 1


def test_ctrl_c_stops_following_and_leaves_the_job_alone(run, conn):
    job_id = added(run, "-c", "true")
    proc = follower(job_id)
    time.sleep(1.5)  # following by now (a signal during Python's start-up is Python's)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT)
    assert (proc.returncode, out, err) == (130, "", "")
    assert state(conn, job_id) == "pending"


def test_a_quick_run_is_kept_by_its_ledger_tail_alone(run, db):
    job_id = added(run, "-c", "echo hello")
    with workers() as start:
        burst(start)
    assert stored(db, job_id) == []  # its finished event holds all of it
    assert ok(run, "logs", job_id, "--full") == "hello\n"
    assert ok(run, "logs", job_id, "--follow") == "hello\n"  # final: prints and exits 0


def test_output_past_the_ledger_tail_is_all_in_the_store(run, db):
    job_id = added(run, "-c", "echo START-$((1+1)); seq 1 5000; echo END")  # ~24 KiB; tail 4
    with workers() as start:
        burst(start)
    full = ok(run, "logs", job_id, "--full")
    assert full == "START-2\n" + "".join(f"{n}\n" for n in range(1, 5001)) + "END\n"
    assert sum(c[2] for c in stored(db, job_id)) == len(full)
    # The ledger, and so its export, keeps the tail only: the store is left out.
    export = ok(run, "ledger", "export")
    assert "START-2" not in export and "4999\\n5000\\nEND" in export


@pytest.mark.parametrize(("limit", "size", "count"), [
    ("8KiB", 8192, 100_000),  # 588,895 bytes: every chunk cut to the limit
    ("1MiB", 2**20, 400_000),  # 2,788,895 bytes: several whole chunks kept at once
])
def test_past_log_limit_the_end_is_kept_and_the_gap_marked(run, db, limit, size, count):
    assert ok(run, "config", "set", "log-limit", limit).startswith(
        f"Configuration updated: log-limit = {size}\n")
    job_id = added(run, "-c", f"seq 1 {count}")
    with workers() as start:
        burst(start)
    full = ok(run, "logs", job_id, "--full")
    first, rest = full.split("\n", 1)
    assert first.startswith("[... ") and first.endswith(" of output dropped ...]")
    assert rest.endswith(f"{count - 1}\n{count}\n")
    kept = sum(c[2] for c in stored(db, job_id))
    assert size <= kept <= size + 256 * 1024  # the limit, and one chunk at most beyond it
    assert len(rest) == kept and kept < len("".join(f"{n}\n" for n in range(1, count + 1)))


def test_log_limit_0_keeps_no_output_beyond_the_tail(run, db):
    ok(run, "config", "set", "log-limit", "0")
    job_id = added(run, "-c", "seq 1 5000")
    with workers() as start:
        burst(start)
    assert stored(db, job_id) == []
    full = ok(run, "logs", job_id, "--full")
    assert full.startswith("[... earlier output not kept ...]\n") and full.endswith("5000\n")


@pytest.mark.parametrize("value", ["ten", "-1", "2GiB", "1.5TB"])
def test_a_bad_log_limit_is_one_error(run, value):
    one_error(run("config", "set", "log-limit", value), "invalid value for log-limit")


def test_log_limit_takes_sizes(run):
    assert ok(run, "config", "set", "log-limit", "512KiB").splitlines() == [
        "Configuration updated: log-limit = 524288",
        "Each run's output will be kept up to 512 KiB (its end)"]
    assert '"log-limit": 524288' in ok(run, "config", "get", "--json")


def test_prune_removes_a_jobs_output_with_it(run, conn, db):
    job_id = added(run, "-c", "seq 1 5000")
    kept = added(run, "-c", "seq 1 5000", "--delay", "3600")
    with workers() as start:
        burst(start)
    assert stored(db, job_id)
    ok(run, "prune", "--before", "0s")
    assert stored(db, job_id) == []
    with by_hand(db) as other:
        assert other.execute("SELECT count(*) FROM output").fetchone()[0] == 0
    assert state(conn, kept) == "scheduled"


def test_bad_follow_and_full_requests_are_one_error(run):
    job_id = added(run, "-c", "true")
    one_error(run("logs", job_id, "--follow", "--json"), "--follow goes with none of")
    one_error(run("logs", job_id, "--full", "--json"), "--full prints the output itself")
    one_error(run("logs", "nope", "--follow"), "Job 'nope' not found")
    one_error(run("logs", job_id, "--full"), f"Job {job_id} has not run yet")
    one_error(run("enqueue", "--file", "-", "--follow", input='{"command": "true"}\n'),
              "--follow follows one job")


@pytest.mark.slow
def test_queue_follow_yields_the_output_as_it_is_written(run, db):
    job_id = added(run, "-c", "echo one; sleep 1.5; echo two")
    with workers() as start, Queue(db) as queue:
        start("-s", "0.2")
        chunks = queue.follow(job_id)
        assert next(chunks) == "one\n"
        assert queue.get(job_id)["state"] == "processing"  # the queue is free meanwhile
        assert "".join(chunks) == "two\n"


@pytest.mark.slow
def test_the_dashboard_shows_a_running_jobs_output_live(run, db):
    pytest.importorskip("starlette")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using `httpx`")
        from starlette.testclient import TestClient

    from queuectl.dashboard.app import create_app

    job_id = added(run, "-c", "echo first; sleep 2; echo second")
    with workers() as start, TestClient(create_app(str(db), read_only=True),
                                        base_url="http://127.0.0.1:8765") as client:
        start("-s", "0.2")
        wait_for(lambda: stored(db, job_id), WAIT, "the first chunk")
        page = client.get(f"/jobs/{job_id}")
        assert page.status_code == 200
        assert 'id="live-output"' in page.text and "first\n</pre>" in page.text
        more = client.get(f"/output/{job_id}?run=1&seq=1&end=6")
        assert more.json() == {"text": "", "seq": 1, "end": 6, "running": True}
        wait_for(lambda: state_of(client, job_id) == "completed", WAIT, "the job's end")
        whole = client.get(f"/output/{job_id}?run=1").json()
        assert whole == {"text": "first\nsecond\n", "seq": 2, "end": 13, "running": False}
        assert client.get(f"/output/{job_id}?run=2").status_code == 404
        # Bad cursors are a 400, never a 500: Unicode digits, signs, past a store's integer.
        for query in ("run=²", "run=1&seq=-1", "run=1&end=+5", "run=1&seq=" + "9" * 30):
            bad = client.get(f"/output/{job_id}?{query}")
            assert bad.status_code == 400, (query, bad.status_code, bad.text)


def state_of(client: Any, job_id: str) -> str:
    page = client.get(f"/jobs/{job_id}").text
    return "completed" if 'id="live-output"' not in page and "second" in page else "running"


def test_nul_and_bytes_that_are_not_utf8_are_kept_as_u_fffd_on_both_stores(run, db):
    job_id = added(run, "-c", r"printf 'a\000b\377c\n'; seq 1 2000")  # past the tail: stored
    with workers() as start:
        burst(start)
    assert stored(db, job_id)
    full = ok(run, "logs", job_id, "--full")
    assert full.startswith("a\ufffdb\ufffdc\n1\n2\n") and full.endswith("\n2000\n")


@pytest.mark.slow
def test_each_life_of_a_restarted_job_keeps_its_own_output(run, conn, db):
    from queuectl import output, reads

    job_id = added(run, "-c", 'n=$(($(cat lives 2>/dev/null || echo 0) + 1)); echo $n > lives; '
                              'echo "life $n"; seq 1 2000')  # past the tail: stored
    with workers() as start:
        start("-s", "0.2")  # one worker runs both lives: the same attempt, the same worker
        wait_for(lambda: state(conn, job_id) == "completed", WAIT, "the first life")
        ok(run, "restart", job_id)
        wait_for(lambda: len(reads.runs_of(conn, job_id)) == 2 and
                 state(conn, job_id) == "completed", WAIT, "the second life")
    first, second = reads.runs_of(conn, job_id)
    assert (first.attempt, first.worker_id) == (second.attempt, second.worker_id)
    body = "".join(f"{n}\n" for n in range(1, 2001))
    assert output.full(conn, job_id, first) == "life 1\n" + body
    assert output.full(conn, job_id, second) == "life 2\n" + body
    assert ok(run, "logs", job_id, "--full") == "life 2\n" + body
