"""What ``enqueue`` stores: a run_at in UTC whatever zone it was given in, the same job
whether it came as flags, a JSON object or a line of a file, and a file written whole or
not at all."""

from __future__ import annotations

import gc
import json
import sqlite3
from typing import Any

from helpers import (
    FakeClock,
    T,
    _meanwhile,
    added,
    job,
    ok,
    one_error,
    rows,
    snapshot,
    state,
    table_row,
)

from queuectl import decisions


def test_run_at_with_and_without_zone_is_stored_in_utc(run, conn):
    added(run, "--id", "zoned", "--run-at", "2030-01-01T02:00:00+02:00", "-c", "true")
    added(run, "--id", "naive", "--run-at", "2030-01-01T00:00:00", "-c", "true")
    added(run, "--id", "zulu", "--run-at", "2030-01-01T00:00:00Z", "-c", "true")
    ok(run, "enqueue", '{"id":"json","command":"true","run_at":"2029-12-31T19:00:00-05:00"}')
    for job_id in ("zoned", "naive", "zulu", "json"):
        assert job(conn, job_id).run_at == "2030-01-01T00:00:00.000000Z", job_id
        assert state(conn, job_id) == "scheduled"
        assert rows(conn, "enqueued", job_id)[0]["run_at"] == "2030-01-01T00:00:00.000000Z"
    listed = ok(run, "list")
    for job_id in ("zoned", "naive", "zulu", "json"):
        assert "2030-01-01 00:00" in table_row(listed, job_id)
    assert "2030-01-01 00:00" in ok(run, "list", "-s", "scheduled")
    assert json.loads(ok(run, "status", "--json"))["jobs"]["scheduled"] == 4
    # A time already past is no schedule at all: the job is pending at once.
    added(run, "--id", "past", "--run-at", "2020-01-01T00:00:00", "-c", "true")
    assert state(conn, "past") == "pending"


STORED = ("command", "state", "priority", "attempts", "max_retries", "backoff_base",
          "backoff_max", "backoff_jitter", "timeout", "run_at", "created_at", "after")


def _stored(conn: sqlite3.Connection, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's row (minus its id) and its enqueued event body (minus its id)."""
    row = {k: getattr(job(conn, job_id), k) for k in STORED}
    body = {k: v for k, v in rows(conn, "enqueued", job_id)[0].items()
            if k not in ("seq", "job_id")}
    return row, body


def test_json_forms_store_the_same_job_as_the_flags(run, conn, tmp_path, monkeypatch):
    FakeClock(monkeypatch, start=100)
    added(run, "--id", "a", "-c", "true")
    added(run, "--id", "flags", "-c", "x", "-p", "2", "--delay", "5", "--after", "a",
          "--backoff-base", "3", "--timeout", "4", "--max-retries", "1")
    ok(run, "enqueue", '{"id":"json","command":"x","priority":2,"delay":5,"after":["a"],'
       '"backoff_base":3,"timeout":4,"max_retries":1}')
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"id":"line","command":"x","priority":2,"delay":5,"after":["a"],"backoff_base":3,'
        '"timeout":4,"max_retries":1}\n'
        '{"id":"line-run-at","command":"x","priority":2,"run_at":"'
        + T(105)[:19] + '","after":["a"],"backoff_base":3,"timeout":4,"max_retries":1}\n'
    )
    assert ok(run, "enqueue", "--file", str(path)) == "2 jobs added successfully.\n"
    added(run, "--id", "flags-run-at", "-c", "x", "-p", "2", "--run-at", T(105), "--after", "a",
          "--backoff-base", "3", "--timeout", "4", "--max-retries", "1")

    reference = _stored(conn, "flags")
    assert reference[0]["priority"] == 2 and reference[0]["run_at"] == T(105)
    assert reference[0]["after"] == ["a"] and reference[0]["state"] == "waiting"
    assert reference[1].items() >= {
        "at": T(100), "type": "enqueued", "command": "x", "max_retries": 1,
        "backoff_base": 3.0, "timeout": 4.0, "priority": 2, "run_at": T(105), "after": ["a"],
    }.items()
    for job_id in ("json", "line", "line-run-at", "flags-run-at"):
        assert _stored(conn, job_id) == reference, job_id


def _row(conn: Any, job_id: str) -> dict[str, Any]:
    """A job's whole row, less what differs between two jobs added apart."""
    cursor = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
    names = [d[0] for d in cursor.description]
    return {k: v for k, v in zip(names, cursor.fetchone(), strict=True)
            if k not in ("id", "seq", "run_at", "created_at", "updated_at")}


def test_a_file_stores_each_job_as_it_would_be_stored_alone(run, conn, tmp_path):
    """A file's jobs go in together: each row is still the one its job gets when added
    alone, whether all of the file's jobs keep a default or only some do."""
    plain = {"command": "true"}
    fancy = {"command": "x", "queue": "q2", "priority": 5, "timeout": 3, "unique_key": "k",
             "cwd": str(tmp_path), "env": {"A": "1"}, "memory": "64MiB"}
    files = {"all-plain": [plain, plain], "mixed": [plain, fancy, {**plain, "queue": "q2"}]}
    for name, jobs in files.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**spec, "id": f"{name}-{n}"}) + "\n"
                                for n, spec in enumerate(jobs)))
        ok(run, "enqueue", "--file", str(path))
    for n, spec in enumerate([plain, fancy, {**plain, "queue": "q2"}]):
        alone = {**spec, "id": f"alone-{n}"} | ({"unique_key": "k2"} if n == 1 else {})
        ok(run, "enqueue", json.dumps(alone))
    assert _row(conn, "all-plain-0") == _row(conn, "all-plain-1") == _row(conn, "alone-0")
    assert _row(conn, "mixed-0") == _row(conn, "alone-0")
    assert _row(conn, "mixed-1") == {**_row(conn, "alone-1"), "unique_key": "k"}
    assert _row(conn, "mixed-1")["queue"] == "q2" and _row(conn, "mixed-1")["priority"] == 5
    assert _row(conn, "mixed-2") == _row(conn, "alone-2")


def test_a_file_of_jobs_is_added_with_the_cyclic_collector_off(run, conn, tmp_path,
                                                               monkeypatch):
    """A bulk makes a few objects a line, none of them in a cycle: the collector is off
    while they are read and written, and on again afterwards."""
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"command":"true"}\n' * 300)
    collecting: list[bool] = []  # gc.isenabled() as each line is read and as jobs are added

    def watched(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            collecting.append(gc.isenabled())
            return real(*args, **kwargs)
        return call

    for name in ("parse_spec", "enqueue_unique"):
        monkeypatch.setattr(decisions, name, watched(getattr(decisions, name)))
    assert gc.isenabled()
    ok(run, "enqueue", "--file", str(path))
    assert collecting == [False] * 301
    assert gc.isenabled()
    assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (300,)


def test_flags_beside_a_json_job_win(run, conn, monkeypatch):
    FakeClock(monkeypatch)
    ok(run, "enqueue", '{"id":"j","command":"x","priority":1,"delay":5}', "-p", "9",
       "--run-at", T(50))
    assert (job(conn, "j").priority, job(conn, "j").run_at) == (9, T(50))


def test_a_file_is_written_whole_or_not_at_all(run, conn, db, tmp_path, monkeypatch):
    """A duplicate id that appears while a big file is being written refuses the whole file:
    no batch before the clash is committed."""
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"id": f"j{n}", "command": "true"}) + "\n"
                            for n in range(6000)))
    _meanwhile(monkeypatch, db, lambda other: decisions.enqueue(
        other, [decisions.JobSpec(command="echo elsewhere", id="j5999")]))
    one_error(run("enqueue", "--file", str(path)), "Job with ID 'j5999' already exists")
    assert conn.execute("SELECT id FROM jobs").fetchall() == [("j5999",)]


def test_bad_line_in_a_file_of_new_fields_writes_nothing(run, conn, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"id":"ok1","command":"x","priority":3}\n'
        '{"id":"ok2","command":"x","after":["ok1"]}\n'
        '{"id":"bad","command":"x","delay":-2}\n'
    )
    before = snapshot(conn)
    one_error(run("enqueue", "--file", str(path)), "line 3")
    assert snapshot(conn) == before
