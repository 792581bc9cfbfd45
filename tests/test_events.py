"""The event vocabulary and the ledger's guarantees: committed sample rows still decode,
events are immutable, the events table is append-only, and a failing projector takes its
event down with it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from queuectl import actor, decisions, ledger, store
from queuectl import events as ev
from queuectl.errors import CorruptLedger

# One file per event version: rows written by every earlier version must keep decoding.
SAMPLES = sorted((Path(__file__).parent / "data").glob("events-v*.jsonl"))
LINES = [
    line
    for sample in SAMPLES
    for line in sample.read_text(encoding="utf-8").splitlines()
    if line.strip()
]


def _count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM events").fetchone()[0]


# -- committed samples ---------------------------------------------------------------------


@pytest.mark.parametrize("line", LINES, ids=[f"line{n}" for n in range(1, len(LINES) + 1)])
@pytest.mark.stores("sqlite")  # no store involved
def test_sample_decodes_and_round_trips(line: str) -> None:
    event = ev.decode(line)
    assert isinstance(event, tuple(ev.TAGS.values()))
    assert event.type == msgspec.json.decode(line)["type"]
    assert ev.encode(event) == line


@pytest.mark.stores("sqlite")  # no store involved
def test_every_event_type_has_a_sample() -> None:
    tags = {msgspec.json.decode(line)["type"] for line in LINES}
    assert set(ev.TAGS) <= tags
    assert len(ev.TAGS) >= 12  # the card's floor: enqueued ... stop-requested


@pytest.mark.stores("sqlite")  # no store involved
def test_the_cards_event_names_exist() -> None:
    floor = {
        "enqueued",
        "claimed",
        "completed",
        "failed",
        "scheduled-retry",
        "dead",
        "requeued",
        "worker-started",
        "worker-heartbeat",
        "worker-stopped",
        "config-changed",
        "stop-requested",
    }
    assert floor <= set(ev.TAGS)


@pytest.mark.stores("sqlite")  # no store involved
def test_sample_without_optional_fields_gets_defaults() -> None:
    minimal = ev.decode(
        '{"type":"enqueued","job_id":"job1","command":"sleep 2","max_retries":3,"backoff_base":2.0}'
    )
    assert minimal == ev.Enqueued(
        job_id="job1", command="sleep 2", max_retries=3, backoff_base=2.0, timeout=0.0
    )
    done = ev.decode('{"type":"completed","job_id":"j","worker_id":"w","attempt":1}')
    assert (done.duration, done.output, done.truncated) == (0.0, "", False)


@pytest.mark.stores("sqlite")  # no store involved
def test_unknown_event_type_is_refused_not_skipped() -> None:
    with pytest.raises(msgspec.ValidationError):
        ev.decode('{"type":"teleported","job_id":"job1"}')
    with pytest.raises(CorruptLedger, match="seq 7.*'teleported'"):
        ledger.decode_row(7, "teleported", '{"type":"teleported","job_id":"job1"}')


@pytest.mark.parametrize("line", LINES[:1] + LINES[2:3] + LINES[-2:-1])
@pytest.mark.stores("sqlite")  # no store involved
def test_events_are_frozen(line: str) -> None:
    event = ev.decode(line)
    field = event.__struct_fields__[0]
    with pytest.raises(AttributeError):
        setattr(event, field, "changed")
    assert ev.encode(event) == line


def test_ledger_row_columns_match_the_event(run, conn) -> None:
    assert run("enqueue", "-c", "echo hi", "--id", "j1").exit_code == 0
    seq, type_, job_id, worker_id, body = conn.execute(
        "SELECT seq, type, job_id, worker_id, body FROM events WHERE job_id = 'j1'"
    ).fetchone()
    event = ev.decode(body)
    assert (type_, job_id, worker_id) == ("enqueued", "j1", None)
    assert event == ev.Enqueued(job_id="j1", command="echo hi", max_retries=3, backoff_base=2.0,
                                cwd=str(Path.cwd()),  # the CLI records where it was asked
                                by=actor.person())  # and who asked


# -- the ledger ------------------------------------------------------------------------------


@pytest.fixture
def seeded(conn: sqlite3.Connection) -> sqlite3.Connection:
    decisions.enqueue(
        conn, [decisions.JobSpec(command="echo a", id="a"), decisions.JobSpec(command="echo b", id="b")]
    )
    return conn


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE events SET body = '{}' WHERE job_id = 'a'",
        "UPDATE events SET type = 'dead'",
        "DELETE FROM events WHERE job_id = 'a'",
        "DELETE FROM events",
    ],
)
def test_ledger_refuses_update_and_delete(seeded, sql: str) -> None:
    before = seeded.execute("SELECT * FROM events ORDER BY seq").fetchall()
    assert len(before) == 2
    with pytest.raises(store.driver_errors(), match="append-only"):
        seeded.execute(sql)
    assert seeded.execute("SELECT * FROM events ORDER BY seq").fetchall() == before


def test_failed_projector_rolls_back_its_event(seeded) -> None:
    before = _count(seeded)
    with pytest.raises(LookupError), ledger.write(seeded):
        ledger.append(seeded, ev.Claimed(job_id="ghost", worker_id="w1", attempt=1))
    assert _count(seeded) == before
    assert not seeded.in_transaction


def test_failed_projector_rolls_back_earlier_events_of_the_transaction(seeded) -> None:
    before = _count(seeded)
    jobs_before = seeded.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    counts_before = seeded.execute("SELECT * FROM job_counts ORDER BY state").fetchall()
    with pytest.raises(LookupError), ledger.write(seeded):
        ledger.append(
            seeded,
            ev.Enqueued(job_id="c", command="echo c", max_retries=1, backoff_base=2.0),
            ev.Claimed(job_id="a", worker_id="w1", attempt=1),
            ev.Claimed(job_id="ghost", worker_id="w1", attempt=1),
        )
    assert _count(seeded) == before
    assert seeded.execute("SELECT * FROM jobs ORDER BY id").fetchall() == jobs_before
    assert seeded.execute("SELECT * FROM job_counts ORDER BY state").fetchall() == counts_before


def test_duplicate_enqueued_event_rolls_back(seeded) -> None:
    before = _count(seeded)
    with pytest.raises(store.driver_errors()), ledger.write(seeded):
        ledger.append(seeded, ev.Enqueued(job_id="a", command="x", max_retries=0, backoff_base=2.0))
    assert _count(seeded) == before
    assert seeded.execute("SELECT command FROM jobs WHERE id = 'a'").fetchone() == ("echo a",)


def test_append_outside_a_write_transaction_is_refused(seeded) -> None:
    before = _count(seeded)
    with pytest.raises(RuntimeError):
        ledger.append(seeded, ev.StopRequested())
    assert _count(seeded) == before


def test_append_writes_event_and_projection_together(seeded) -> None:
    with ledger.write(seeded), actor.acting_as("ops@db-1"):
        seq = ledger.append(seeded, ev.ConfigChanged(key="max-retries", value="7"))
    assert seeded.execute("SELECT type, body FROM events WHERE seq = ?", (seq,)).fetchone() == (
        "config-changed",
        '{"type":"config-changed","key":"max-retries","value":"7","by":"ops@db-1"}',
    )
    assert seeded.execute("SELECT value FROM config WHERE key = 'max-retries'").fetchone() == ("7",)
