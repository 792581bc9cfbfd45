"""Shell completion: job ids, queue names, schedule names and config keys, completed from
the database through click's own machinery, in-process and as the shell runs it; nothing
offered (and nothing printed or created) when there is no database to ask."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from click.shell_completion import ShellComplete
from conftest import queuectl_cmd, replay_problems

from queuectl import claims, complete, decisions, ledger
from queuectl import events as ev
from queuectl.cli import cli
from queuectl.store import libpq


def offered(*args: str, incomplete: str = "") -> list[str]:
    """What a Tab after ``queuectl ARGS INCOMPLETE`` offers."""
    completion = ShellComplete(cli, {}, "queuectl", "_QUEUECTL_COMPLETE")
    return [item.value for item in completion.get_completions(list(args), incomplete)]


def _jobs(conn: Any) -> None:
    """Jobs a1, a2, b1 (pending) and dead1 (dead), in queues default and media."""
    decisions.enqueue(conn, [decisions.JobSpec(command="exit 1", id="dead1", max_retries=0)])
    claim = claims.claim(conn, "w")
    assert claim is not None
    claims.finish(conn, claim, ev.Failed(job_id="dead1", worker_id="w", attempt=1,
                                         exit_code=1, error="exit status 1"))
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=i) for i in ("b1", "a2")]
                      + [decisions.JobSpec(command="true", id="a1", queue="media")])


def test_job_ids_complete_from_what_is_typed(conn):
    _jobs(conn)
    for command in (["show"], ["history"], ["logs"], ["cancel"], ["enqueue", "--after"]):
        assert offered(*command, incomplete="a") == ["a1", "a2"], command
    assert offered("show") == ["a1", "a2", "b1", "dead1"]
    assert offered("show", incomplete="zz") == []
    completion = ShellComplete(cli, {}, "queuectl", "_QUEUECTL_COMPLETE")
    states = {item.value: item.help for item in completion.get_completions(["show"], "")}
    assert states == {"a1": "pending", "a2": "pending", "b1": "pending", "dead1": "dead"}


def test_dlq_retry_completes_dead_jobs_only(conn):
    _jobs(conn)
    assert offered("dlq", "retry") == ["dead1"]
    assert offered("dlq", "retry", incomplete="a") == []


def test_queue_names_complete_wherever_a_queue_is_named(run, conn):
    _jobs(conn)
    run("queue", "pause", "later")  # a queue with rules but no jobs yet
    for command in (["list", "-q"], ["enqueue", "-q"], ["worker", "-q"], ["worker", "start", "-q"],
                    ["cancel", "--state", "pending", "-q"], ["dlq", "retry", "--all", "-q"],
                    ["queue", "pause"], ["queue", "resume"], ["queue", "limit"],
                    ["schedule", "add", "s", "-q"]):
        assert offered(*command) == ["default", "later", "media"], command
    assert offered("queue", "resume", incomplete="l") == ["later"]


def test_schedule_names_and_config_keys_complete(run, conn):
    run("schedule", "add", "nightly", "--cron", "@daily", "-c", "backup.sh")
    run("schedule", "add", "hourly", "--cron", "@hourly", "-c", "poll.sh")
    for command in ("pause", "resume", "remove"):
        assert offered("schedule", command, incomplete="n") == ["nightly"]
    assert offered("schedule", "remove") == ["hourly", "nightly"]
    assert offered("config", "set", incomplete="backoff-") == [
        "backoff-base", "backoff-max", "backoff-jitter"]
    assert offered("config", "get", incomplete="lease") == ["lease-timeout"]


def test_at_most_a_screenful_is_offered(conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"j{n:03d}")
                             for n in range(complete.LIMIT + 10)])
    assert offered("show") == [f"j{n:03d}" for n in range(complete.LIMIT)]


@pytest.mark.stores("sqlite")  # SQLite files, or no store at all
def test_no_database_offers_nothing_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo" / "q.db"
    assert offered("--db", str(missing), "show") == []
    assert offered("--db", str(tmp_path), "queue", "pause") == []  # a directory, not a file
    assert not missing.parent.exists()


@pytest.mark.stores("postgres")
def test_a_database_that_does_not_answer_offers_nothing(db):
    assert offered("--db", f"{db}_missing", "show") == []


def _shell(words: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``queuectl`` as bash runs it on a Tab after ``words``."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    return subprocess.run(queuectl_cmd(), capture_output=True, text=True, timeout=30,
                          env={**os.environ, "_QUEUECTL_COMPLETE": "bash_complete",
                               "COMP_WORDS": words, "COMP_CWORD": str(cword), **(env or {})})


def test_the_shell_gets_the_ids_and_nothing_else(conn):
    _jobs(conn)
    done = _shell("queuectl show a")
    assert (done.returncode, done.stdout, done.stderr) == (0, "plain,a1\nplain,a2\n", "")
    done = _shell("queuectl --db nowhere/q.db show ")
    assert (done.returncode, done.stdout, done.stderr) == (0, "\n", "")  # click's empty answer
    assert not Path("nowhere").exists()


@pytest.mark.stores("postgres")
def test_postgres_completion_asks_libpq_itself_and_psycopg_where_there_is_none(
        db, conn, monkeypatch):
    """Importing psycopg would take most of a Tab's time: where the system has libpq, a
    completion asks through it (ctypes) and never imports psycopg; elsewhere psycopg answers
    the same."""
    _jobs(conn)
    probe = ("import sys; from queuectl import complete, store; "
             f"print(store.read_once({db!r}, complete.JOBS, ('a', 'a\\U0010ffff', 50)), "
             "'psycopg' in sys.modules)")
    done = subprocess.run([*queuectl_cmd()[:1], "-c", probe], capture_output=True, text=True,
                          timeout=30, check=True)
    has_libpq = libpq.load() is not None
    assert done.stdout == f"[('a1', 'pending'), ('a2', 'pending')] {not has_libpq}\n"
    monkeypatch.setattr(libpq, "load", lambda: None)
    assert offered("show", incomplete="a") == ["a1", "a2"]
    assert offered("--db", f"{db}_missing", "show") == []


@pytest.mark.stores("postgres")
def test_postgres_completion_reads_the_schema_the_url_names(db, conn, run, monkeypatch):
    """A URL's ``options`` may name another schema (``-c search_path=other``): another
    queue in the same database. A completion must offer what the commands read there, on
    both of its paths (libpq itself, psycopg), never the default schema's ids."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="public1")])
    with __import__("psycopg").connect(db, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA other")
    other = f"{db}?options=-csearch_path%3Dother"
    with closing(ledger.connect(other)) as elsewhere:
        decisions.enqueue(elsewhere, [decisions.JobSpec(command="true", id="other1")])
    assert [j["id"] for j in json.loads(run("--db", other, "list", "--json").stdout)] == [
        "other1"]
    for path in ("libpq", "psycopg"):
        if path == "psycopg":
            monkeypatch.setattr(libpq, "load", lambda: None)
        elif libpq.load() is None:
            continue  # no system libpq: psycopg is the only path
        assert offered("--db", other, "show") == ["other1"], path
        assert offered("--db", db, "show") == ["public1"], path
    assert not replay_problems(other)
