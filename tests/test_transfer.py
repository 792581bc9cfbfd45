"""Moving a queue between stores: the ledger exported as JSON lines and imported into an
empty store of either kind gives back exactly the same projections."""

from __future__ import annotations

import json

import pytest
from conftest import by_hand, pg_database

import projections
from queuectl import claims, decisions, ledger
from queuectl import events as ev


def ok(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 0, result.output
    return str(result.stdout)


def one_error(result, message: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert message in result.stderr, result.stderr


def tables(target: object) -> dict[str, list[tuple[object, ...]]]:
    """Every projection table's rows, in key order: what two stores must agree on."""
    with by_hand(target) as conn:
        return {table: [tuple(r) for r in conn.execute(
                    f"SELECT * FROM {table} ORDER BY {', '.join(key)}").fetchall()]
                for p in projections.REGISTRY for table, key in p.TABLES.items()}


def a_busy_ledger(target: object) -> None:
    """Jobs in every state, retries, dependencies, a worker lost and one stopped."""
    conn = ledger.connect(target)
    try:
        decisions.set_config(conn, "backoff-jitter", "0.5")
        decisions.enqueue(conn, [
            decisions.JobSpec(command="true", id="ok"),
            decisions.JobSpec(command="false", id="flaky", max_retries=1, priority=3),
            decisions.JobSpec(command="true", id="child", after=["ok"]),
            decisions.JobSpec(command="true", id="later", delay=3600),
            decisions.JobSpec(command="true", id="gone", after=["later"]),
        ])
        wid = claims.worker_started(conn, 1, "host-a")
        while (job := claims.claim(conn, wid)) is not None:
            if job.job_id == "flaky":
                result: ev.Event = ev.Failed(job_id=job.job_id, worker_id=wid,
                                             attempt=job.attempt, exit_code=1,
                                             error="exit status 1", output="nope\n")
            else:
                result = ev.Completed(job_id=job.job_id, worker_id=wid, attempt=job.attempt,
                                      duration=0.01, output="yes\n")
            claims.finish(conn, job, result)
        decisions.cancel(conn, "later")
        claims.worker_stopped(conn, wid, "done")
    finally:
        conn.close()


@pytest.mark.stores("sqlite")
def test_a_round_trip_sqlite_postgres_sqlite_keeps_every_projection(run, db, tmp_path):
    a_busy_ledger(db)
    first = ok(run("ledger", "export"))
    (tmp_path / "ledger.jsonl").write_text(first)
    with pg_database() as url:
        assert ok(run("--db", url, "ledger", "import", str(tmp_path / "ledger.jsonl"))) == (
            f"Imported {len(first.splitlines())} events; projections rebuilt.\n")
        second = ok(run("--db", url, "ledger", "export"))
        assert second == first  # the same events, byte for byte
        assert tables(url) == tables(db)
        assert ok(run("--db", url, "rebuild", "--check")) == "Projections match the ledger.\n"
        back = tmp_path / "back.db"
        ok(run("--db", str(back), "ledger", "import", "-", input=second))
    assert tables(back) == tables(db)
    assert ok(run("--db", str(back), "ledger", "export")) == first


def test_export_since_a_seq_gives_what_follows(run, db):
    a_busy_ledger(db)
    lines = ok(run("ledger", "export")).splitlines()
    later = ok(run("ledger", "export", "--since", "5")).splitlines()
    assert later == lines[5:]
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, len(lines) + 1))


@pytest.mark.parametrize("text, message", [
    ('{"seq":1,"at":"x","event":{"type":"stop-requested"}}\nnot json\n', "line 2: "),
    ('{"seq":2,"at":"x","event":{"type":"stop-requested"}}\n', "line 1: seq 2 where 1 was due"),
    ('{"seq":1,"at":"x","event":{"type":"from-the-future"}}\n', "line 1: "),
    ('{"seq":1,"at":"x","event":{"type":"enqueued","job_id":"a"}}\n', "line 1: "),
    ('{"seq":1,"at":"x","event":{"type":"stop-requested"},"extra":1}\n', "line 1: "),
])
def test_a_bad_export_is_one_error_line_and_writes_nothing(run, db, text, message):
    one_error(run("ledger", "import", "-", input=text), message)
    with by_hand(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_import_refuses_a_store_that_already_holds_a_ledger(run, db):
    ok(run("enqueue", "--id", "a", "-c", "true"))
    exported = ok(run("ledger", "export"))
    one_error(run("ledger", "import", "-", input=exported), "already holds a ledger")
    with by_hand(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1
