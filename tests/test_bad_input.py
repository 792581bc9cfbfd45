"""Bad input, case by case: each gets exactly one ``Error: ...`` line on stderr, a non-zero
exit, no traceback, and writes nothing at all."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import by_hand
from helpers import added, one_error, snapshot

from queuectl import claims, decisions, ledger
from queuectl import events as ev


class Case(NamedTuple):
    args: Callable[[Path], list[str]] | list[str]
    message: str  # a part of the one error line that says what was wrong
    input: str | None = None


def _file(text: str) -> Callable[[Path], list[str]]:
    def args(tmp: Path) -> list[str]:
        path = tmp / "jobs.jsonl"
        path.write_text(text, encoding="utf-8")
        return ["enqueue", "--file", str(path)]

    return args


def _bytes_file(data: bytes) -> Callable[[Path], list[str]]:
    def args(tmp: Path) -> list[str]:
        path = tmp / "latin1.jsonl"
        path.write_bytes(data)
        return ["enqueue", "--file", str(path)]

    return args


GOOD = '{"id":"g1","command":"echo one"}\n'
GOOD2 = '{"id":"g2","command":"echo two"}\n'

CASES: dict[str, Case] = {
    # enqueue: JSON
    "malformed-json": Case(["enqueue", '{"id":"x","command":'], "malformed JSON"),
    "malformed-json-quotes": Case(["enqueue", "{'command': 'ls'}"], "malformed JSON"),
    "json-array": Case(["enqueue", '["echo hi"]'], "Expected `object`"),
    "json-string": Case(["enqueue", '"echo hi"'], "Expected `object`"),
    "json-number": Case(["enqueue", "42"], "Expected `object`"),
    "json-null": Case(["enqueue", "null"], "Expected `object`"),
    "json-missing-command": Case(["enqueue", '{"id":"job1"}'], "command"),
    "json-empty-command": Case(["enqueue", '{"command":""}'], "command is empty"),
    "json-whitespace-command": Case(["enqueue", '{"command":" \\t "}'], "command is empty"),
    "json-nul-in-command": Case(["enqueue", '{"command":"echo a\\u0000b"}'], "NUL character"),
    "json-command-not-string": Case(["enqueue", '{"command":5}'], "command"),
    "json-unknown-field": Case(["enqueue", '{"command":"ls","priority_x":1}'], "priority_x"),
    "json-negative-max-retries": Case(
        ["enqueue", '{"command":"ls","max_retries":-1}'], "max_retries"
    ),
    "json-fractional-max-retries": Case(
        ["enqueue", '{"command":"ls","max_retries":1.5}'], "max_retries"
    ),
    "json-negative-timeout": Case(["enqueue", '{"command":"ls","timeout":-2}'], "timeout"),
    "json-bad-id": Case(["enqueue", '{"id":"my job","command":"ls"}'], "'my job'"),
    "json-existing-id": Case(["enqueue", '{"id":"p1","command":"ls"}'], "'p1' already exists"),
    # enqueue: flags
    "empty-command": Case(["enqueue", "-c", ""], "command is empty"),
    "whitespace-command": Case(["enqueue", "-c", "   "], "command is empty"),
    "bad-id-spaces": Case(["enqueue", "-c", "ls", "--id", "a b"], "'a b'"),
    "bad-id-leading-dot": Case(["enqueue", "-c", "ls", "--id", ".hidden"], "'.hidden'"),
    "existing-id": Case(["enqueue", "-c", "ls", "--id", "p1"], "'p1' already exists"),
    "negative-max-retries-flag": Case(
        ["enqueue", "-c", "ls", "--max-retries", "-1"], "--max-retries"
    ),
    "negative-timeout-flag": Case(["enqueue", "-c", "ls", "--timeout", "-1"], "--timeout"),
    "no-source": Case(["enqueue"], "exactly one of"),
    "two-sources-json-and-command": Case(
        ["enqueue", '{"command":"a"}', "-c", "b"], "exactly one of"
    ),
    "two-sources-file-and-command": Case(
        lambda tmp: [*_file(GOOD)(tmp), "-c", "b"], "exactly one of"
    ),
    # enqueue: files
    "file-bad-line-among-good": Case(_file(GOOD + '{"id":"bad",\n' + GOOD2), "line 2"),
    "file-missing-command-line": Case(_file(GOOD + GOOD2 + '{"id":"g3"}\n'), "line 3"),
    "file-empty-command-line": Case(_file(GOOD + '{"command":"  "}\n'), "line 2"),
    "file-duplicate-id": Case(_file(GOOD + GOOD2 + '{"id":"g1","command":"echo again"}\n'), "'g1'"),
    "file-existing-id": Case(_file(GOOD + '{"id":"d1","command":"echo"}\n'), "'d1' already exists"),
    "file-empty": Case(_file("\n  \n"), "no jobs"),
    "file-missing": Case(["enqueue", "--file", "no-such-file.jsonl"], "no-such-file.jsonl"),
    "stdin-bad-line": Case(["enqueue", "--file", "-"], "line 2", input=GOOD + "not json\n" + GOOD2),
    # reads and the DLQ
    "list-unknown-state": Case(["list", "-s", "bogus"], "bogus"),
    "list-zero-limit": Case(["list", "--limit", "0"], "--limit"),
    "dlq-retry-unknown-id": Case(["dlq", "retry", "unknown-id"], "'unknown-id' not found"),
    "dlq-retry-not-dead": Case(["dlq", "retry", "p1"], "not in the dead letter queue"),
    "history-unknown-id": Case(["history", "unknown-id"], "'unknown-id' not found"),
    "history-json-unknown-id": Case(["history", "unknown-id", "--json"], "'unknown-id' not found"),
    # config
    "config-negative-max-retries": Case(
        ["config", "set", "max-retries", "-1"], "invalid value for max-retries: expected a whole number from 0 to 1000000, got '-1'"
    ),
    "config-max-retries-not-int": Case(["config", "set", "max-retries", "abc"], "'abc'"),
    "config-max-retries-fraction": Case(["config", "set", "max-retries", "1.5"], "'1.5'"),
    "config-backoff-below-one": Case(["config", "set", "backoff-base", "0.5"], "0.5"),
    "config-backoff-not-number": Case(["config", "set", "backoff-base", "fast"], "'fast'"),
    "config-backoff-nan": Case(["config", "set", "backoff-base", "nan"], "nan"),
    "config-backoff-inf": Case(["config", "set", "backoff-base", "inf"], "inf"),
    "config-unknown-key": Case(["config", "set", "nope", "3"], "'nope'"),
    "config-get-unknown-key": Case(["config", "get", "nope"], "'nope'"),
    "config-set-missing-value": Case(["config", "set", "max-retries"], "VALUE"),
    # workers
    "worker-zero-concurrency": Case(["worker", "-c", "0"], "--concurrency"),
    "worker-start-zero-concurrency": Case(["worker", "start", "-c", "0"], "--concurrency"),
    "worker-zero-poll": Case(["worker", "-s", "0"], "--poll"),
    "worker-negative-limit": Case(["worker", "-l", "-1"], "-1"),
    "worker-negative-ahead": Case(["worker", "--ahead", "-1"], "--ahead"),
    "worker-huge-ahead": Case(["worker", "--ahead", "65"], "--ahead"),
    "worker-nan-ahead": Case(["worker", "--ahead", "nan"], "--ahead"),
    "worker-fractional-ahead": Case(["worker", "--ahead", "1.5"], "--ahead"),
    # named queues: names follow the job-id rules
    "enqueue-queue-with-space": Case(["enqueue", "-c", "ls", "--queue", "my queue"], "queue"),
    "enqueue-queue-empty": Case(["enqueue", "-c", "ls", "-q", ""], "queue"),
    "enqueue-queue-leading-dot": Case(["enqueue", "-c", "ls", "-q", ".hidden"], "queue"),
    "json-queue-bad-name": Case(["enqueue", '{"command":"ls","queue":"a b"}'], "queue"),
    "json-queue-not-string": Case(["enqueue", '{"command":"ls","queue":7}'], "queue"),
    "json-queue-null": Case(["enqueue", '{"command":"ls","queue":null}'], "queue"),
    "file-queue-bad-name": Case(_file(GOOD + '{"command":"ls","queue":"x/../ y"}\n'), "line 2"),
    "list-queue-bad-name": Case(["list", "-q", "no such"], "queue"),
    "worker-queue-bad-name": Case(["worker", "-q", "ok", "-q", "not ok"], "queue"),
    "worker-queue-too-long": Case(["worker", "-q", "q" * 129], "queue"),
    # unique jobs
    "unique-key-empty": Case(["enqueue", "-c", "ls", "--unique-key", ""], "unique_key"),
    "unique-key-too-long": Case(["enqueue", "-c", "ls", "--unique-key", "k" * 256], "unique_key"),
    "unique-key-control": Case(["enqueue", "-c", "ls", "--unique-key", "a\tb"], "unique_key"),
    "json-unique-key-not-string": Case(["enqueue", '{"command":"ls","unique_key":1}'],
                                       "unique_key"),
    "on-duplicate-unknown": Case(["enqueue", "-c", "ls", "--on-duplicate", "maybe"],
                                 "--on-duplicate"),
    # schedules
    "schedule-bad-cron": Case(["schedule", "add", "s", "--cron", "61 * * * *", "-c", "x"],
                              "cron expression"),
    "schedule-six-fields": Case(["schedule", "add", "s", "--cron", "0 * * * * *", "-c", "x"],
                                "5 fields"),
    "schedule-reboot": Case(["schedule", "add", "s", "--cron", "@reboot", "-c", "x"], "aliases"),
    "schedule-never-fires": Case(["schedule", "add", "s", "--cron", "0 0 31 2 *", "-c", "x"],
                                 "never fires"),
    "schedule-empty-cron": Case(["schedule", "add", "s", "--cron", "", "-c", "x"], "5 fields"),
    "schedule-bad-timezone": Case(["schedule", "add", "s", "--cron", "@daily", "-c", "x",
                                   "--timezone", "Mars/Olympus"], "time zone"),
    "schedule-timezone-path": Case(["schedule", "add", "s", "--cron", "@daily", "-c", "x",
                                    "--timezone", "../../etc/passwd"], "time zone"),
    "schedule-name-with-at": Case(["schedule", "add", "a@b", "--cron", "@daily", "-c", "x"],
                                  "schedule name"),
    "schedule-empty-command": Case(["schedule", "add", "s", "--cron", "@daily", "-c", " "],
                                   "command is empty"),
    "schedule-no-cron": Case(["schedule", "add", "s", "-c", "x"], "--cron"),
    "schedule-bad-retries": Case(["schedule", "add", "s", "--cron", "@daily", "-c", "x",
                                  "--max-retries", "-1"], "--max-retries"),
    "schedule-bad-queue": Case(["schedule", "add", "s", "--cron", "@daily", "-c", "x",
                                "-q", "a b"], "queue"),
    "schedule-remove-unknown": Case(["schedule", "remove", "nope"], "not found"),
    "schedule-pause-unknown": Case(["schedule", "pause", "nope"], "not found"),
    # retention
    "prune-no-cutoff": Case(["prune"], "--before"),
    "prune-bad-age": Case(["prune", "--before", "soon"], "--before"),
    "prune-negative-age": Case(["prune", "--before", "-3d"], "--before"),
    "prune-nan-age": Case(["prune", "--before", "nand"], "--before"),
    "prune-huge-age": Case(["prune", "--before", "1e300d"], "--before"),
    "prune-bad-date": Case(["prune", "--before", "2026-02-30"], "--before"),
    "history-archive-unknown": Case(["history", "nope", "--archive"], "not found"),
    # bulk actions
    "cancel-nothing": Case(["cancel"], "job ID or --state"),
    "cancel-id-and-state": Case(["cancel", "x", "--state", "pending"], "job ID or --state"),
    "cancel-finished-state": Case(["cancel", "--state", "completed"], "--state"),
    "cancel-id-with-queue": Case(["cancel", "x", "-q", "media"], "--state"),
    "cancel-id-dry-run": Case(["cancel", "x", "--dry-run"], "--state"),
    "cancel-state-bad-queue": Case(["cancel", "--state", "pending", "-q", "a b"], "queue"),
    "dlq-retry-nothing": Case(["dlq", "retry"], "job ID or --all"),
    "dlq-retry-id-and-all": Case(["dlq", "retry", "x", "--all"], "job ID or --all"),
    "dlq-retry-id-dry-run": Case(["dlq", "retry", "x", "--dry-run"], "--all"),
    "dlq-retry-all-bad-queue": Case(["dlq", "retry", "--all", "-q", "a b"], "queue"),
    "queue-pause-bad-name": Case(["queue", "pause", "a b"], "queue"),
    "queue-resume-bad-name": Case(["queue", "resume", "x:y z"], "queue"),
    "queue-limit-negative": Case(["queue", "limit", "media", "-1"], "N"),
    "queue-limit-fractional": Case(["queue", "limit", "media", "1.5"], "N"),
    "queue-limit-nan": Case(["queue", "limit", "media", "nan"], "N"),
    "queue-limit-huge": Case(["queue", "limit", "media", "1000001"], "N"),
    "queue-limit-not-a-number": Case(["queue", "limit", "media", "two"], "N"),
    "queue-limit-bad-name": Case(["queue", "limit", "a/ b", "2"], "queue"),
    "queue-limit-missing": Case(["queue", "limit", "media"], "N"),
    "unknown-command": Case(["frobnicate"], "frobnicate"),
    # numbers: every one is finite and in range, wherever it comes from
    "delay-inf": Case(["enqueue", "-c", "ls", "--delay", "inf"], "--delay"),
    "delay-nan": Case(["enqueue", "-c", "ls", "--delay", "nan"], "--delay"),
    "delay-huge": Case(["enqueue", "-c", "ls", "--delay", "1e20"], "--delay"),
    "timeout-inf": Case(["enqueue", "-c", "ls", "--timeout", "inf"], "--timeout"),
    "timeout-nan": Case(["enqueue", "-c", "ls", "--timeout", "nan"], "--timeout"),
    "backoff-inf": Case(["enqueue", "-c", "ls", "--backoff-base", "inf"], "--backoff-base"),
    "priority-huge": Case(["enqueue", "-c", "ls", "-p", "18446744073709551616"], "--priority"),
    "max-retries-exponent": Case(["enqueue", "-c", "ls", "--max-retries", "1e20"], "--max-retries"),
    "json-delay-huge": Case(["enqueue", '{"command":"ls","delay":1e300}'], "$.delay"),
    "json-timeout-overflow": Case(["enqueue", '{"command":"ls","timeout":1e999}'], "$.timeout"),
    "json-priority-huge": Case(["enqueue", '{"command":"ls","priority":18446744073709551616}'],
                               "$.priority"),
    "run-at-year-1": Case(["enqueue", "-c", "ls", "--run-at", "0001-01-01T00:00:00+01:00"],
                          "outside 1970-01-01 to 9999-12-31"),
    "run-at-year-999": Case(["enqueue", "-c", "ls", "--run-at", "0999-06-01T00:00:00"],
                            "outside 1970-01-01 to 9999-12-31"),
    "since-nan": Case(["stats", "--since", "nan"], "--since"),
    "since-inf": Case(["stats", "--since", "inf"], "--since"),
    "list-huge-limit": Case(["list", "--limit", "100000000000000000000"], "--limit"),
    "watch-zero-interval": Case(["status", "--watch", "-n", "0"],
                                "expected a number from 0.1 to 3600 seconds, got '0'"),
    "watch-nan-interval": Case(["status", "--watch", "-n", "nan"], "--interval"),
    "watch-negative-interval": Case(["status", "--watch", "-n", "-1"], "--interval"),
    "watch-text-interval": Case(["status", "--watch", "-n", "abc"], "--interval"),
    "watch-huge-interval": Case(["status", "--watch", "--interval", "3601"], "--interval"),
    "watch-with-json": Case(["status", "--watch", "--json"], "give one"),
    "interval-without-watch": Case(["status", "-n", "2"], "-n goes with --watch"),
    "watch-without-terminal": Case(["status", "--watch"], "needs a terminal"),
    "logs-huge-attempt": Case(["logs", "p1", "--attempt", "1e20"], "--attempt"),
    "worker-nan-poll": Case(["worker", "-s", "nan"], "--poll"),
    "worker-huge-concurrency": Case(["worker", "-c", "100000"], "--concurrency"),
    "config-backoff-huge": Case(["config", "set", "backoff-base", "1e100"], "backoff-base"),
    "config-lease-huge": Case(["config", "set", "lease-timeout", "1e11"], "lease-timeout"),
    "config-max-retries-huge": Case(["config", "set", "max-retries", "99999999999999999999"],
                                    "max-retries"),
    # bytes that are not UTF-8 (Python hands them over as lone surrogates)
    "command-not-utf8": Case(["enqueue", "-c", "cat caf\udce9.txt"],
                             "argument 3 is not valid UTF-8: cat caf\\xe9.txt"),
    "id-not-utf8": Case(["show", "\udcff"], "argument 2 is not valid UTF-8: \\xff"),
    "json-not-utf8": Case(["enqueue", '{"command":"caf\udce9"}'], "not valid UTF-8"),
    "file-latin1": Case(_bytes_file(b'{"command":"echo one"}\n{"command":"cat caf\xe9"}\n'),
                        "line 2 is not valid UTF-8 (byte 0xe9 at column 20)"),
}


def _count(target: Any) -> int:
    with by_hand(target) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def _jobs(target: Any) -> list[tuple[object, ...]]:
    with by_hand(target) as conn:
        return [tuple(row) for row in conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()]


def _assert_one_error_line(result, message: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert message in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture
def seeded(db: Path) -> Path:
    """A database holding a pending job ``p1`` and a dead job ``d1``."""
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command="exit 1", id="d1", max_retries=0)])
        claim = claims.claim(conn, "w-test")
        assert claim is not None
        claims.finish(
            conn,
            claim,
            ev.Failed(
                job_id="d1", worker_id="w-test", attempt=1, exit_code=1, error="exit status 1"
            ),
        )
        decisions.enqueue(conn, [decisions.JobSpec(command="echo hi", id="p1")])
    finally:
        conn.close()
    return db


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(run, seeded: Path, tmp_path: Path, case: Case) -> None:
    args = case.args(tmp_path) if callable(case.args) else case.args
    before = _count(seeded), _jobs(seeded)
    result = run(*args, input=case.input)
    _assert_one_error_line(result, case.message)
    assert (_count(seeded), _jobs(seeded)) == before


# -- databases that cannot be used -----------------------------------------------------------


def _directory(tmp: Path) -> Path:
    path = tmp / "a-directory"
    path.mkdir()
    return path


def _under_a_file(tmp: Path) -> Path:
    parent = tmp / "regular-file"
    parent.write_text("not a directory\n")
    return parent / "queue.db"


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.db"
    path.write_bytes(bytes(range(256)) * 16)
    return path


def _foreign(tmp: Path) -> Path:
    path = tmp / "someone-elses.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        raw.execute("INSERT INTO invoices (total) VALUES (12.5)")
    raw.close()
    return path


def _foreign_with_events(tmp: Path) -> Path:
    """Someone else's database that happens to have an ``events`` table."""
    path = tmp / "calendar.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, title TEXT)")
        raw.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
    raw.close()
    return path


BAD_DBS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "directory": (_directory, "directory"),
    "parent-is-a-file": (_under_a_file, "regular-file"),
    "not-sqlite": (_garbage, "not a SQLite database"),
    "foreign-sqlite": (_foreign, "not a queuectl database"),
    "foreign-sqlite-with-events-table": (_foreign_with_events, "not a queuectl database"),
}


def _snapshot(path: Path) -> tuple[bytes | None, list[str]]:
    data = path.read_bytes() if path.is_file() else None
    siblings = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    return data, siblings


def _tables(path: Path) -> list[str] | None:
    """The schema of a SQLite file (None when it is not one)."""
    if not path.is_file():
        return None
    raw = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in raw.execute("SELECT name FROM sqlite_master"))
    except sqlite3.DatabaseError:
        return None
    finally:
        raw.close()


@pytest.mark.parametrize(
    "command",
    [["enqueue", "-c", "echo hi"], ["list"], ["status"]],
    ids=["enqueue", "list", "status"],
)
@pytest.mark.parametrize("kind", BAD_DBS.keys())
@pytest.mark.stores("sqlite")  # files that are not queuectl databases
def test_unusable_db(run, seeded: Path, tmp_path: Path, kind: str, command: list[str]) -> None:
    make, message = BAD_DBS[kind]
    (tmp_path / "bad").mkdir()
    path = make(tmp_path / "bad")
    before = _count(seeded)
    tables = _tables(path)
    result = run("--db", str(path), *command)
    _assert_one_error_line(result, message)
    assert _tables(path) == tables  # no queuectl tables added to someone else's file
    assert _count(seeded) == before  # and the QUEUECTL_DB database was not touched either


@pytest.mark.parametrize("kind", BAD_DBS.keys())
@pytest.mark.stores("sqlite")  # files that are not queuectl databases
def test_unusable_db_is_left_byte_for_byte(run, tmp_path: Path, kind: str) -> None:
    """Refusing a file must not write to it: no journal-mode switch, no -wal/-shm beside it."""
    make, message = BAD_DBS[kind]
    (tmp_path / "bad").mkdir()
    path = make(tmp_path / "bad")
    snapshot = _snapshot(path)
    result = run("--db", str(path), "list")
    _assert_one_error_line(result, message)
    assert _snapshot(path) == snapshot


@pytest.mark.parametrize("variable, value, message", [
    ("QUEUECTL_LOCK_TIMEOUT", "abc", "QUEUECTL_LOCK_TIMEOUT: expected a number from 0 to 86400"),
    ("QUEUECTL_LOCK_TIMEOUT", "nan", "QUEUECTL_LOCK_TIMEOUT"),
    ("QUEUECTL_LOCK_TIMEOUT", "-1", "QUEUECTL_LOCK_TIMEOUT"),
    ("COLUMNS", "abc", "COLUMNS: expected a whole number from 20 to 10000, got 'abc'"),
    ("COLUMNS", "0", "COLUMNS"),
    ("QUEUECTL_DB", "/tmp/caf\udce9.db", "QUEUECTL_DB is not valid UTF-8: /tmp/caf\\xe9.db"),
])
@pytest.mark.parametrize("command", [["list"], ["enqueue", "-c", "true"]], ids=["list", "enqueue"])
def test_bad_environment_values(run, seeded, monkeypatch, variable, value, message, command):
    before = _count(seeded), _jobs(seeded)
    monkeypatch.setenv(variable, value)
    result = run(*command)
    monkeypatch.delenv(variable)  # before the fixture's replay check opens the database
    _assert_one_error_line(result, message)
    assert (_count(seeded), _jobs(seeded)) == before


@pytest.mark.stores("sqlite")  # files that are not queuectl databases
def test_unusable_db_from_environment(run, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bad").mkdir()
    path = _garbage(tmp_path / "bad")
    monkeypatch.setenv("QUEUECTL_DB", str(path))
    snapshot = _snapshot(path)
    result = run("enqueue", "-c", "echo hi")
    _assert_one_error_line(result, "not a SQLite database")
    assert _snapshot(path) == snapshot


@pytest.mark.stores("sqlite")  # files that are not queuectl databases
def test_bad_input_on_a_fresh_database_creates_nothing(run, db: Path) -> None:
    result = run("enqueue", '{"command":')
    _assert_one_error_line(result, "malformed JSON")
    assert not db.exists() or _count(db) == 0


BAD: dict[str, tuple[list[str], str]] = {
    "run-at-yesterday": (["enqueue", "-c", "x", "--run-at", "yesterday"], "yesterday"),
    "json-run-at-garbage": (["enqueue", '{"command":"x","run_at":"soon"}'], "soon"),
    "priority-high-json": (["enqueue", '{"command":"x","priority":"high"}'], "priority"),
    "priority-high-flag": (["enqueue", "-c", "x", "-p", "high"], "high"),
    "priority-fraction-json": (["enqueue", '{"command":"x","priority":1.5}'], "priority"),
    "negative-delay-flag": (["enqueue", "-c", "x", "--delay", "-1"], "--delay"),
    "negative-delay-json": (["enqueue", '{"command":"x","delay":-1}'], "delay"),
    "run-at-and-delay-json": (
        ["enqueue", '{"command":"x","delay":5,"run_at":"2030-01-01T00:00:00"}'], "not both"),
    "run-at-and-delay-flags": (
        ["enqueue", "-c", "x", "--delay", "5", "--run-at", "2030-01-01T00:00:00"], "not both"),
    "after-not-a-list": (["enqueue", '{"command":"x","after":"p1"}'], "after"),
    "after-bad-id": (["enqueue", "-c", "x", "--after", "not an id"], "'not an id'"),
    "backoff-base-below-one": (["enqueue", "-c", "x", "--backoff-base", "0.5"], "--backoff-base"),
    "backoff-base-below-one-json": (["enqueue", '{"command":"x","backoff_base":0.5}'],
                                    "backoff_base"),
    "negative-timeout-json": (["enqueue", '{"command":"x","timeout":-1}'], "timeout"),
    "since-bogus": (["stats", "--since", "bogus"], "bogus"),
    "since-zero": (["stats", "--since", "0"], "from 1ms to 100 years"),
    "since-negative": (["stats", "--since", "-5m"], "-5m"),
    "logs-unknown": (["logs", "nope"], "'nope' not found"),
    "logs-json-unknown": (["logs", "nope", "--json"], "'nope' not found"),
    "logs-attempt-not-run": (["logs", "p1", "--attempt", "1"], "no attempt 1"),
    "logs-attempt-zero": (["logs", "p1", "--attempt", "0"], "--attempt"),
    "cancel-unknown": (["cancel", "nope"], "'nope' not found"),
    "show-unknown": (["show", "nope"], "'nope' not found"),
    "jitter-above-one": (["config", "set", "backoff-jitter", "2"], "from 0 to 1, got '2'"),
    "jitter-negative": (["config", "set", "backoff-jitter", "-0.1"], "backoff-jitter"),
    "backoff-max-negative": (["config", "set", "backoff-max", "-1"], "backoff-max"),
    "backoff-max-word": (["config", "set", "backoff-max", "lots"], "'lots'"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_values_are_refused_with_one_line(run, conn, args, message):
    added(run, "--id", "p1", "-c", "true")
    before = snapshot(conn), conn.execute("SELECT * FROM config").fetchall()
    one_error(run(*args), message)
    assert (snapshot(conn), conn.execute("SELECT * FROM config").fetchall()) == before
