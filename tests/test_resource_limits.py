"""Resource limits on a job's runs: ``--memory``, ``--cpu-time`` and ``--open-files`` (JSON
``memory``, ``cpu_time``, ``open_files``; ``edit``; ``schedule add``; ``config set``
defaults), set on every process of a run from its first instruction, and a run that fails on
reaching one failing with a reason that names it, in its output and in ``show``."""

from __future__ import annotations

import json
import resource
import signal
import socket
from pathlib import Path

import pytest
from conftest import spawn
from helpers import FakeClock, WAIT, added, burst, job, ok, one_error, rows, snapshot, workers

from queuectl import resources, schedules
from queuectl.api import Queue
from queuectl.resources import Limits

MEMORY_HOG = "python3 -c 'bytearray(200 * 2**20)'"  # 200 MiB at once
# Two CPU seconds of work, then done: without a limit it completes.
BUSY = ("python3 -c 'import time\nt = time.process_time()\n"
        "while time.process_time() - t < 2: pass'")
FILE_HOG = "python3 -c 'files = [open(\"/dev/null\") for _ in range(100)]'"
SHOW_LIMITS = ("python3 -c 'import resource as r; print(*(r.getrlimit(x) for x in "
               "(r.RLIMIT_AS, r.RLIMIT_CPU, r.RLIMIT_NOFILE)))'")


def _runs(run, job_id: str) -> list[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    return [(r["outcome"], r["exit_code"], r["output"])
            for r in json.loads(ok(run, "logs", job_id, "--json"))]


@pytest.mark.slow
def test_a_job_over_a_limit_fails_naming_it_and_without_the_limit_completes(run, conn):
    for name, command, limit in (("memory", MEMORY_HOG, ("--memory", "64MiB")),
                                 ("cpu", BUSY, ("--cpu-time", "1")),
                                 ("files", FILE_HOG, ("--open-files", "16"))):
        added(run, "-c", command, "--id", name, *limit, "--max-retries", "0")
        added(run, "-c", command, "--id", f"{name}-free", "--max-retries", "0")
    with workers() as start:
        burst(start, "-c", "3")
    reasons = {"memory": ("memory limit 64 MiB reached (exit status 1)", 1, "MemoryError\n"),
               "cpu": ("cpu time 1 s reached (exit status 152)", 152, ""),
               "files": ("open files 16 reached (exit status 1)", 1, "Too many open files")}
    for name, (reason, code, said) in reasons.items():
        ((outcome, exit_code, output),) = _runs(run, name)
        assert (outcome, exit_code) == ("failed", code)
        assert said in output
        assert output.endswith(f"\nqueuectl: {reason}\n"), output
        shown = job(conn, name)
        assert (shown.state, shown.last_error, shown.exit_code) == ("dead", reason, code)
        assert f"Last error:   {reason}\n" in ok(run, "show", name)
        assert f"failed: {reason}" in ok(run, "logs", name)
        (failed,) = rows(conn, "failed", name)
        assert failed["error"] == reason
        assert _runs(run, f"{name}-free") == [("completed", 0, "")]


@pytest.mark.slow
def test_the_cpu_limit_ends_a_process_that_execs_or_ignores_sigxcpu(run, conn):
    """SIGXCPU at the limit; a process that ignores it gets SIGKILL a second later."""
    loop = "while 1: pass"
    added(run, "-c", f"exec python3 -c '{loop}'", "--id", "exec", "--cpu-time", "1",
          "--max-retries", "0")
    added(run, "-c", "python3 -c 'import signal\nsignal.signal(signal.SIGXCPU, "
          f"signal.SIG_IGN)\n{loop}'", "--id", "stubborn", "--cpu-time", "1",
          "--max-retries", "0")
    with workers() as start:
        burst(start, "-c", "2")
    shown = job(conn, "exec")
    assert (shown.exit_code, shown.last_error) == (
        -signal.SIGXCPU, "cpu time 1 s reached (killed by signal SIGXCPU)")
    shown = job(conn, "stubborn")
    assert (shown.exit_code, shown.last_error) == (137, "cpu time 1 s reached (exit status 137)")
    assert _runs(run, "stubborn")[0][2] == \
        "Killed\nqueuectl: cpu time 1 s reached (exit status 137)\n"


@pytest.mark.slow
def test_limits_hold_from_the_first_instruction_and_others_run_as_before(run, conn):
    added(run, "-c", SHOW_LIMITS, "--id", "limited", "--memory", "64MiB", "--cpu-time", "5",
          "--open-files", "16")
    added(run, "-c", SHOW_LIMITS, "--id", "memory-only", "--memory", "1.5G")
    added(run, "-c", SHOW_LIMITS, "--id", "free")
    added(run, "-c", "sleep 0", "--id", "under", "--memory", "64MiB", "--cpu-time", "5",
          "--open-files", "16")
    with workers() as start:
        burst(start)
    mine = [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU,
                                            resource.RLIMIT_NOFILE)]
    as_text = " ".join(str(x) for x in mine)
    assert _runs(run, "limited") == [
        ("completed", 0, "(67108864, 67108864) (5, 6) (16, 16)\n")]
    assert _runs(run, "memory-only") == [
        ("completed", 0, f"(1610612736, 1610612736) {mine[1]} {mine[2]}\n")]
    assert _runs(run, "free") == [("completed", 0, as_text + "\n")]
    assert _runs(run, "under") == [("completed", 0, "")]  # limits kept are no failure


@pytest.mark.slow
def test_a_limit_above_the_workers_own_fails_the_run_without_starting_it(run, conn):
    added(run, "-c", "echo ran", "--id", "j", "--open-files", "4096", "--max-retries", "0")

    def lowered() -> None:  # the worker's own hard limit, below the job's
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = spawn("worker", "--burst", "-s", "0.2", start_new_session=True, preexec_fn=lowered)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    line = (f"queuectl: cannot set open files 4096: above this worker's own hard limit (256) "
            f"on {socket.gethostname()}")
    assert _runs(run, "j") == [("failed", 1, line + "\n")]
    assert job(conn, "j").last_error == line.removeprefix("queuectl: ")


# -- given ---------------------------------------------------------------------------------


@pytest.mark.parametrize("given, memory", [
    ("64MiB", 64 * 2**20), ("2048K", 2048 * 1024), ("1GiB", 2**30), ("1.5G", 3 * 2**29),
    ("1048576", 2**20), ("2 MB", 2 * 2**20), ("1TiB", 2**40)])
def test_sizes_take_bytes_or_units(run, conn, given, memory):
    added(run, "-c", "true", "--id", "j", "--memory", given)
    assert job(conn, "j").memory == memory
    assert json.loads(ok(run, "show", "j", "--json"))["memory"] == memory


@pytest.mark.parametrize("args, message", [
    (("--memory", "0"), "expected a size such as 64MiB, 1GiB or 1048576 (bytes), from 1 MiB "
                        "to 256 TiB, or none, got '0'"),
    (("--memory", "-1"), "got '-1'"),
    (("--memory", "64XB"), "got '64XB'"),
    (("--memory", "nan"), "got 'nan'"),
    (("--memory", "inf"), "got 'inf'"),
    (("--memory", "1e9"), "got '1e9'"),
    (("--memory", "512KiB"), "from 1 MiB"),  # too small for any program
    (("--memory", "300TiB"), "to 256 TiB"),
    (("--memory", "99999999999999999999999"), "got '99999999999999999999999'"),
    (("--cpu-time", "0"), "expected a whole number from 1 to 315360000 seconds, or none, got "
                          "'0'"),
    (("--cpu-time", "1.5"), "got '1.5'"),
    (("--cpu-time", "-3"), "got '-3'"),
    (("--cpu-time", "inf"), "got 'inf'"),
    (("--open-files", "0"), "expected a whole number from 1 to 1048576, or none, got '0'"),
    (("--open-files", "2000000"), "got '2000000'"),
])
def test_bad_limits_are_one_error_and_nothing_is_written(run, conn, args, message):
    added(run, "-c", "true", "--id", "j")
    ok(run, "schedule", "add", "s", "--cron", "@daily", "-c", "true")
    before = snapshot(conn)
    assert one_error(run("enqueue", "-c", "true", *args), message).startswith(
        f"Error: Invalid value for '{args[0]}': ")
    one_error(run("enqueue", "--commands", "-", *args, input="true\n"), message)
    one_error(run("edit", "j", *args), message)
    one_error(run("schedule", "add", "t", "--cron", "@daily", "-c", "true", *args), message)
    assert snapshot(conn) == before
    assert [s["name"] for s in schedules.listed(conn)] == ["s"]


@pytest.mark.parametrize("fields, message", [
    ({"memory": 0}, "invalid job: memory: expected a size such as 64MiB"),
    ({"memory": "64 furlongs"}, "got '64 furlongs'"),
    ({"memory": 2**60}, "to 256 TiB"),
    ({"memory": 1.5e9}, "Expected `int | str | null`, got `float`"),
    ({"cpu_time": 1.5}, "Expected `int | str | null`, got `float`"),
    ({"cpu_time": "1.5"}, "invalid job: cpu_time: expected a whole number"),
    ({"open_files": True}, "Expected `int | str | null`, got `bool`"),
    ({"open_files": -1}, "invalid job: open_files: expected a whole number from 1"),
])
def test_bad_json_limits_are_one_error_and_nothing_is_written(run, conn, tmp_path, fields,
                                                              message):
    before = snapshot(conn)
    line = json.dumps({"command": "true", **fields})
    one_error(run("enqueue", line), message)
    Path("jobs.jsonl").write_text(json.dumps({"command": "true"}) + "\n" + line + "\n")
    one_error(run("enqueue", "--file", "jobs.jsonl"), "on line 2")
    assert snapshot(conn) == before


def test_json_flags_files_and_the_api_give_the_same_limits(run, conn):
    ok(run, "enqueue", json.dumps({"id": "json", "command": "true", "memory": "64MiB",
                                   "cpu_time": 10, "open_files": "32"}))
    Path("jobs.jsonl").write_text(json.dumps({"id": "line", "command": "true",
                                              "memory": 67108864}) + "\n")
    ok(run, "enqueue", "--file", "jobs.jsonl", "--cpu-time", "10")  # flags beside a file
    Queue().enqueue("true", id="api", memory="64MiB", cpu_time=10, open_files=32)
    for name, files in (("json", 32), ("line", None), ("api", 32)):
        shown = json.loads(ok(run, "show", name, "--json"))
        assert (shown["memory"], shown["cpu_time"], shown["open_files"]) == (2**26, 10, files)
    (enqueued,) = rows(conn, "enqueued", "json")
    assert (enqueued["memory"], enqueued["cpu_time"], enqueued["open_files"]) == (2**26, 10, 32)
    plain = added(run, "-c", "true")
    assert "memory" not in rows(conn, "enqueued", plain)[0]  # old rows and new look alike
    assert json.loads(ok(run, "show", plain, "--json"))["memory"] is None
    assert "Limits:       none\n" in ok(run, "show", plain)
    assert "Limits:       memory limit 64 MiB, cpu time 10 s, open files 32\n" in \
        ok(run, "show", "json")
    assert "(max_retries 3, backoff_base 2, memory limit 64 MiB, cpu time 10 s, open files " \
        "32)" in ok(run, "history", "json")
    assert "memory" not in json.loads(ok(run, "list", "--json"))[0]  # show's alone


def test_config_gives_new_jobs_their_limits_and_a_job_keeps_its_own(run, conn):
    assert ok(run, "config", "set", "memory-limit", "64MiB") == (
        "Configuration updated: memory-limit = 67108864\n"
        "New jobs will run with a memory limit 64 MiB\n")
    assert ok(run, "config", "set", "cpu-time-limit", "30") == (
        "Configuration updated: cpu-time-limit = 30\n"
        "New jobs will run with a cpu time 30 s limit\n")
    assert ok(run, "config", "set", "open-files-limit", "none") == (
        "Configuration updated: open-files-limit = 0\n"
        "New jobs will run without an open files limit\n")
    got = json.loads(ok(run, "config", "get", "--json"))
    assert (got["memory-limit"], got["cpu-time-limit"], got["open-files-limit"]) == (2**26, 30, 0)
    assert "memory-limit" in ok(run, "config", "get", "memory-limit")
    defaulted = added(run, "-c", "true")
    free = added(run, "-c", "true", "--memory", "none", "--cpu-time", "5")
    ok(run, "config", "set", "memory-limit", "0")
    later = added(run, "-c", "true")
    assert [(job(conn, j).memory, job(conn, j).cpu_time) for j in (defaulted, free, later)] == \
        [(2**26, 30), (None, 5), (None, 30)]
    for key, value in (("memory-limit", "-1"), ("memory-limit", "64 bananas"),
                       ("cpu-time-limit", "1.5"), ("open-files-limit", "nan")):
        before = snapshot(conn)
        one_error(run("config", "set", key, value), f"invalid value for {key}: expected")
        assert snapshot(conn) == before


def test_edit_changes_or_removes_a_limit_before_the_job_starts(run, conn):
    added(run, "-c", "true", "--id", "j", "--memory", "64MiB", "--cpu-time", "5")
    assert ok(run, "edit", "j", "--memory", "1GiB", "--cpu-time", "none",
              "--open-files", "64") == \
        "Job j edited: memory limit 1 GiB; no cpu time limit; open files 64.\n"
    shown = job(conn, "j")
    assert (shown.memory, shown.cpu_time, shown.open_files) == (2**30, None, 64)
    assert ok(run, "edit", "j", "--memory", "1024MiB") == \
        "Job j unchanged: it has these values already.\n"
    assert ok(run, "edit", "j", "--open-files", "none") == "Job j edited: no open files limit.\n"
    assert (job(conn, "j").memory, job(conn, "j").open_files) == (2**30, None)
    (last,) = rows(conn, "edited", "j")[-1:]
    assert {k: v for k, v in last.items() if k in resources.NAMES} == {"open_files": 0}
    assert "changed: no open files limit" in ok(run, "history", "j")


def test_a_schedule_gives_its_jobs_its_limits(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    ok(run, "config", "set", "cpu-time-limit", "60")
    ok(run, "schedule", "add", "own", "--cron", "*/5 * * * *", "-c", "true", "--memory",
       "64MiB", "--cpu-time", "none")
    ok(run, "schedule", "add", "plain", "--cron", "*/5 * * * *", "-c", "true")
    listed = {s["name"]: s for s in json.loads(ok(run, "schedule", "list", "--json"))}
    assert [(listed[n]["memory"], listed[n]["cpu_time"], listed[n]["open_files"])
            for n in ("own", "plain")] == [(2**26, 0, None), (None, None, None)]
    fake.set(300)
    schedules.fire_due(conn)
    made = [job(conn, r["job_id"]) for r in rows(conn, "enqueued")]
    assert sorted((j.memory or 0, j.cpu_time or 0) for j in made) == [(0, 60), (2**26, 0)]


# -- what a run's end tells ----------------------------------------------------------------


@pytest.mark.stores("sqlite")  # no store involved
@pytest.mark.parametrize("code, cpu, output, reason", [
    (152, 0.9, "", "cpu time 1 s"),  # the shell's command died of SIGXCPU
    (-signal.SIGXCPU, 0.9, "", "cpu time 1 s"),
    (137, 2.0, "", "cpu time 1 s"),  # SIGKILL at the hard limit
    (137, 0.1, "", None),  # SIGKILL from someone else, long before the limit
    (-signal.SIGKILL, 0.1, "", None),
    (1, 0.1, "Traceback ...\nMemoryError\n", "memory limit 64 MiB"),
    (1, 0.1, "sort: Cannot allocate memory\n", "memory limit 64 MiB"),
    (134, 0.1, "terminate called after throwing an instance of 'std::bad_alloc'\n",
     "memory limit 64 MiB"),
    (2, 0.1, "fatal error: runtime: out of memory\n", "memory limit 64 MiB"),
    (1, 0.1, "OSError: [Errno 24] Too many open files: 'x'\n", "open files 16"),
    (1, 0.1, "make: *** [all] Error 1\n", None),  # nothing says a limit was reached
    (-signal.SIGSEGV, 0.1, "", None),
])
def test_which_limit_a_failed_run_reached(code, cpu, output, reason):
    given = Limits(memory=2**26, cpu_time=1, open_files=16)
    assert resources.reached(given, code, cpu, output) == reason
    # A limit not set is never named.
    assert resources.reached(Limits(), code, cpu, output) is None


@pytest.mark.stores("sqlite")  # no store involved
def test_the_shell_sets_them_soft_cpu_first():
    script = resources.script(Limits(memory=2**26 + 100, cpu_time=3, open_files=16))
    assert script.startswith("{ ulimit -S -t 3 && ulimit -H -t 4 && ulimit -v 65536 && "
                             "ulimit -n 16; } 2>/dev/null || ")
