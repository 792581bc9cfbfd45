"""Where and with what a job runs: the directory it was enqueued from (or ``--cwd``, JSON
``cwd``), the variables ``--env`` and ``--pass-env`` name over the worker's environment, a
directory missing on the worker's host as a failed attempt naming it and the host, and
``enqueue --commands`` (a job a line, in one transaction)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from helpers import FakeClock, added, burst, job, ok, one_error, rows, snapshot, workers

from queuectl import schedules
from queuectl.api import Queue

SHOW = 'pwd; echo "A=$A B=$B HOME_COPY=$HOME_COPY ID=$QUEUECTL_JOB_ID"'


def _output(run, job_id: str) -> str:  # type: ignore[no-untyped-def]
    (found,) = json.loads(ok(run, "logs", job_id, "--json"))
    return str(found["output"])


@pytest.mark.slow
def test_a_job_runs_where_it_was_enqueued_with_the_variables_it_names(run, conn, tmp_path,
                                                                       monkeypatch):
    (tmp_path / "app" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "app")
    monkeypatch.setenv("HOME_COPY", "from the caller")
    monkeypatch.setenv("B", "not passed")  # the caller's environment is not captured
    here = added(run, "-c", SHOW, "--id", "here", "--env", "A=1 2", "--pass-env", "HOME_COPY")
    sub = added(run, "-c", SHOW, "--id", "sub", "--cwd", "sub", "--env", "QUEUECTL_JOB_ID=x")
    ok(run, "enqueue", json.dumps({"id": "json", "command": SHOW, "cwd": str(tmp_path),
                                   "env": {"B": "b"}}))
    Path("jobs.jsonl").write_text(json.dumps({"id": "line", "command": SHOW,
                                              "env": {"A": "line"}}) + "\n")
    ok(run, "enqueue", "--file", "jobs.jsonl", "--env", "B=flag")
    assert job(conn, here).cwd == str(tmp_path / "app")
    monkeypatch.delenv("HOME_COPY")  # the worker's environment has neither
    monkeypatch.delenv("B")
    with workers() as start:
        burst(start)
    assert _output(run, "here") == f"{tmp_path}/app\nA=1 2 B= HOME_COPY=from the caller ID=here\n"
    # The run's own QUEUECTL_ variables win over the job's.
    assert _output(run, sub) == f"{tmp_path}/app/sub\nA= B= HOME_COPY= ID=sub\n"
    assert _output(run, "json") == f"{tmp_path}\nA= B=b HOME_COPY= ID=json\n"
    # Flags beside a file apply to every line; --env adds to a line's env.
    assert _output(run, "line") == f"{tmp_path}/app\nA=line B=flag HOME_COPY= ID=line\n"
    (enqueued,) = rows(conn, "enqueued", "here")
    assert (enqueued["cwd"], enqueued["env"]) == (f"{tmp_path}/app",
                                                 {"A": "1 2", "HOME_COPY": "from the caller"})


def test_show_gives_the_directory_and_the_variables(run, tmp_path):
    added(run, "-c", "true", "--id", "j", "--env", "Z=last", "--env", "A=it's")
    shown = json.loads(ok(run, "show", "j", "--json"))
    assert (shown["cwd"], shown["env"]) == (str(tmp_path), {"A": "it's", "Z": "last"})
    text = ok(run, "show", "j")
    assert f"Directory:    {tmp_path}\n" in text
    assert "Environment:  A='it'\"'\"'s' Z=last\n" in text
    assert "env A='it'\"'\"'s' Z=last" in ok(run, "history", "j")
    # list --json keeps its fields; show gives where and with what a job runs.
    assert "cwd" not in json.loads(ok(run, "list", "--json"))[0]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["missing", "a-file"])
def test_a_directory_that_cannot_be_entered_fails_the_attempt(run, conn, tmp_path, where):
    Path("a-file").write_text("")
    target = tmp_path / where
    added(run, "-c", "echo ran", "--id", "j", "--cwd", where, "--max-retries", "1",
          "--backoff-base", "1")
    with workers() as start:
        burst(start)
    reason = {"missing": "No such file or directory", "a-file": "Not a directory"}[where]
    line = f"queuectl: cannot enter directory {target} on {socket.gethostname()}: {reason}"
    found = json.loads(ok(run, "logs", "j", "--json"))
    assert [(r["outcome"], r["exit_code"], r["output"]) for r in found] == \
        [("failed", 1, line + "\n")] * 2  # each counted as an attempt, then dead
    shown = job(conn, "j")
    assert (shown.state, shown.attempts, shown.last_error) == ("dead", 2, line[10:])


@pytest.mark.parametrize("args, message", [
    (("--env", "NOEQUALS"), "--env 'NOEQUALS': expected KEY=VALUE"),
    (("--env", "1A=b"), "'1A' is not a variable name"),
    (("--env", "A-B=c"), "'A-B' is not a variable name"),
    (("--env", "=c"), "'' is not a variable name"),
    (("--pass-env", "QUEUECTL_TEST_UNSET"), "--pass-env QUEUECTL_TEST_UNSET: the variable is not set"),
    (("--pass-env", "A=B"), "not a variable name"),
])
def test_bad_variables_are_one_error_and_nothing_is_enqueued(run, conn, args, message):
    added(run, "-c", "true")
    before = snapshot(conn)
    one_error(run("enqueue", "-c", "true", *args), message)
    one_error(run("enqueue", "--commands", "-", *args, input="true\n"), message)
    one_error(run("edit", "1", *args), message)
    assert snapshot(conn) == before


def test_json_variables_and_directories_are_checked(run, conn):
    before = snapshot(conn)
    one_error(run("enqueue", '{"command":"true","env":{"9":"x"}}'), "'9'")
    one_error(run("enqueue", '{"command":"true","env":{"A":"x\\u0000"}}'), "without NUL")
    one_error(run("enqueue", '{"command":"true","env":{"A":1}}'), "Expected `str`")
    one_error(run("enqueue", '{"command":"true","cwd":""}'), "cwd")
    assert snapshot(conn) == before


def test_commands_make_a_job_a_line_with_the_flags_in_one_transaction(run, conn, tmp_path):
    Path("media").mkdir()
    script = "flac 'a b.wav'\n\n# a comment\n   \nflac c.wav\r\n"
    out = ok(run, "enqueue", "--commands", "-", "-q", "media", "-p", "3", "--cwd", "media",
             "--env", "LEVEL=8", input=script)
    assert out == "2 jobs added successfully.\n"
    listed = json.loads(ok(run, "list", "--json"))
    assert [(j["command"], j["queue"], j["priority"]) for j in listed] == \
        [("flac 'a b.wav'", "media", 3), ("flac c.wav", "media", 3)]
    for found in listed:
        shown = job(conn, found["id"])
        assert (shown.cwd, shown.env) == (str(tmp_path / "media"), {"LEVEL": "8"})
    Path("cmds.txt").write_text("echo from a file\n")
    assert ok(run, "enqueue", "--commands", "cmds.txt") == "1 job added successfully.\n"
    before = snapshot(conn)
    # One transaction: a bad line (not UTF-8) or a flag refused writes nothing.
    Path("bad.txt").write_bytes(b"echo fine\necho \xff\n")
    one_error(run("enqueue", "--commands", "bad.txt"), "line 2 is not valid UTF-8")
    Path("dup.txt").write_text("echo one\necho two\n")
    one_error(run("enqueue", "--commands", "dup.txt", "--after", "nosuchjob"), "nosuchjob")
    one_error(run("enqueue", "--commands", "-", input="# only a comment\n\n"), "no commands")
    one_error(run("enqueue", "--commands", "-", "--id", "x", input="true\n"), "--id")
    one_error(run("enqueue", "--commands", "-", "-c", "true", input="true\n"), "exactly one")
    assert snapshot(conn) == before


def test_the_api_keeps_the_workers_directory_unless_given_one(conn, tmp_path):
    queue = Queue()
    plain = queue.enqueue("true")
    placed = queue.enqueue("true", cwd="sub", env={"A": "1"})
    assert (job(conn, plain).cwd, job(conn, plain).env) == (None, {})
    assert (job(conn, placed).cwd, job(conn, placed).env) == (str(tmp_path / "sub"), {"A": "1"})
    assert "cwd" not in rows(conn, "enqueued", plain)[0]  # old rows and new look alike


def test_a_schedule_records_its_directory_and_its_jobs_run_there(run, conn, tmp_path,
                                                                 monkeypatch):
    fake = FakeClock(monkeypatch)
    ok(run, "schedule", "add", "sweep", "--cron", "*/5 * * * *", "-c", "true", "--env", "K=v")
    ok(run, "schedule", "add", "there", "--cron", "*/5 * * * *", "-c", "true", "--cwd", "/srv")
    (added_event,) = rows(conn, "schedule-added")[:1]
    assert (added_event["cwd"], added_event["env"]) == (str(tmp_path), {"K": "v"})
    listed = json.loads(ok(run, "schedule", "list", "--json"))
    assert [(s["cwd"], s["env"]) for s in listed] == [(str(tmp_path), {"K": "v"}), ("/srv", {})]
    fake.set(300)
    schedules.fire_due(conn)
    made = [job(conn, r["job_id"]) for r in rows(conn, "enqueued")]
    assert sorted((j.cwd, j.env) for j in made) == [("/srv", {}), (str(tmp_path), {"K": "v"})]


def test_a_caller_in_a_removed_directory_is_told_to_give_one(run, conn, tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    one_error(run("enqueue", "-c", "true"), "the current directory no longer exists")
    assert added(run, "-c", "true", "--cwd", str(tmp_path))
