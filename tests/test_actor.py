"""Who did it: every event a person or program causes names its actor (``by``): ``user@host``
for the CLI and the library, the worker's id for a worker's own events, ``schedule:NAME`` and
``hook:NAME`` for what they enqueue, whoever ``actor.acting_as`` names (``token:NAME`` for
the HTTP API). Events written before ``by`` existed still decode and replay."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path

from conftest import replay_problems
from helpers import FakeClock, added, burst, claim, complete, fail, ok, rows, workers

from queuectl import actor, decisions, reads, schedules

ME = f"{getpass.getuser()}@{socket.gethostname()}"


def by_type(conn, job_id: str) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(e.type, e.by) for _, _, e in reads.history(conn, job_id)]


def test_the_cli_acts_as_user_at_host(run, conn):
    job_id = added(run, "-c", "true")
    ok(run, "config", "set", "max-retries", "4")
    ok(run, "queue", "pause", "default")
    ok(run, "cancel", job_id)
    assert by_type(conn, job_id) == [("enqueued", ME), ("cancelled", ME)]
    assert [r["by"] for r in rows(conn, "config-changed")] == [ME]
    assert [r["by"] for r in rows(conn, "queue-paused")] == [ME]


def test_a_workers_own_events_name_it(run, conn):
    ok_id = added(run, "-c", "true")
    bad_id = added(run, "-c", "exit 3", "--max-retries", "0")
    with workers() as start:
        burst(start)
    worker_id = rows(conn, "worker-started")[0]["worker_id"]
    assert by_type(conn, ok_id) == [("enqueued", ME), ("claimed", worker_id),
                                    ("completed", worker_id)]
    assert by_type(conn, bad_id) == [("enqueued", ME), ("claimed", worker_id),
                                     ("failed", worker_id), ("dead", worker_id)]
    for type_ in ("worker-started", "worker-stopped"):
        assert [r["by"] for r in rows(conn, type_)] == [worker_id]


def test_library_results_are_their_workers(conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a", max_retries=1)])
    first = claim(conn, "w1", "a")
    assert first is not None
    events = fail(conn, first, "w1")
    assert [(e.type, e.by) for e in events] == [("failed", "w1"), ("scheduled-retry", "w1")]
    assert by_type(conn, "a")[-2:] == [("failed", "w1"), ("scheduled-retry", "w1")]


def test_a_rescuer_takes_back_in_its_own_name(conn):
    from conftest import rescued

    from queuectl import claims
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="a")])
    lost = claims.worker_started(conn, 1, "gone-host")
    claim(conn, lost, "a")
    with actor.acting_as("w-rescuer"):
        taken = rescued(conn, lease=5)
    assert [e.type for e in taken] == ["lease-expired", "scheduled-retry"]
    assert by_type(conn, "a")[-2:] == [("lease-expired", "w-rescuer"),
                                       ("scheduled-retry", "w-rescuer")]


def test_schedules_and_hooks_enqueue_in_their_own_names(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    schedules.add(conn, "sweep", "*/5 * * * *", decisions.JobSpec(command="true"))
    fake.set(300)
    made = schedules.fire_due(conn)[0].job_id  # type: ignore[union-attr]
    assert by_type(conn, made) == [("schedule-fired", "schedule:sweep"),
                                   ("enqueued", "schedule:sweep")]
    assert rows(conn, "schedule-added")[0]["by"] == ME

    ok(run, "hook", "add", "tell", "--on", "completed", "-c", "true")
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="b", priority=9)])
    c = claim(conn, "w1", "b")
    assert c is not None
    complete(conn, c, "w1", 0.1)
    hooked = [r for r in rows(conn, "enqueued") if "hook" in r]
    assert [r["by"] for r in hooked] == ["hook:tell"]
    assert rows(conn, "hook-added")[0]["by"] == ME


def test_acting_as_names_another_actor_on_this_thread_only(conn):
    import threading

    seen: list[str] = []
    with actor.acting_as("token:ci"):
        decisions.enqueue(conn, [decisions.JobSpec(command="true", id="t")])
        thread = threading.Thread(target=lambda: seen.append(actor.current()))
        thread.start()
        thread.join()
    assert seen == [ME]
    assert by_type(conn, "t") == [("enqueued", "token:ci")]
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="u")])
    assert by_type(conn, "u") == [("enqueued", ME)]


def test_history_shows_who(run, conn):
    job_id = added(run, "-c", "true")
    table = ok(run, "history", job_id)
    assert "By" in table.splitlines()[2] and ME in table
    shown = json.loads(ok(run, "history", job_id, "--json"))
    assert [e["by"] for e in shown] == [ME]


def test_events_without_an_actor_still_decode_and_replay(run, tmp_path: Path):
    """A ledger written before ``by`` existed (this one's export, every ``by`` taken out)
    imports, replays exactly, and shows no actor."""
    job_id = added(run, "-c", "true")
    ok(run, "config", "set", "max-retries", "2")
    exported = ok(run, "ledger", "export").splitlines()
    old = []
    for line in exported:
        row = json.loads(line)
        assert row["event"].pop("by") == ME
        old.append(json.dumps(row))
    source = tmp_path / "old.jsonl"
    source.write_text("\n".join(old) + "\n")
    target = tmp_path / "old.db"
    ok(run, "--db", str(target), "ledger", "import", str(source))
    assert replay_problems(target) == []
    shown = json.loads(ok(run, "--db", str(target), "history", job_id, "--json"))
    assert [(e["type"], e["by"]) for e in shown] == [("enqueued", "")]
