"""Retention (issue 13, point 6): ``queuectl prune --before AGE|TIME`` moves the events of
finished jobs, and superseded heartbeats, out of the ledger into its archive, records one
``pruned`` event a batch, and leaves a ledger that still replays exactly (the fixture checks
that after every test) and still refuses every other UPDATE or DELETE. Every test runs on
both stores unless it says otherwise."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import by_hand, pg_database, wait_for
from helpers import one_error, workers

from queuectl import claims, decisions, ledger, reads, retention, store
from queuectl import events as ev


def ok(result: Any) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return str(result.stdout)


def run_all(conn: Any, worker: str, fail: frozenset[str] = frozenset()) -> None:
    """Claim and finish every claimable job in-process: those in ``fail`` fail."""
    while (job := claims.claim(conn, worker)) is not None:
        if job.job_id in fail:
            result: ev.Event = ev.Failed(job_id=job.job_id, worker_id=worker,
                                         attempt=job.attempt, exit_code=3, error="exit status 3")
        else:
            result = ev.Completed(job_id=job.job_id, worker_id=worker, attempt=job.attempt,
                                  duration=0.01, output="ok\n")
        claims.finish(conn, job, result)


def ledger_seqs(conn: Any) -> list[int]:
    return [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq").fetchall()]


def archived_rows(conn: Any) -> list[tuple[Any, ...]]:
    """Every row of the archive, whichever store keeps it."""
    if conn.kind == "postgres":
        return [tuple(r) for r in conn.execute(
            "SELECT seq, at, type, job_id, worker_id, body FROM archived_events ORDER BY seq"
        ).fetchall()]
    path = Path(conn.archive_target)
    if not path.exists():
        return []
    with sqlite3.connect(path) as archive:
        return archive.execute("SELECT seq, at, type, job_id, worker_id, body "
                               "FROM archived_events ORDER BY seq").fetchall()


def pruned_events(conn: Any) -> list[ev.Pruned]:
    return [e for _, _, e in ledger.read_events(conn, "WHERE type = 'pruned'")]


def assert_seqs_accounted_for(conn: Any) -> None:
    """Ledger and archive together hold seq 1..N, each once; every gap in the ledger is
    counted by a pruned event numbered above it."""
    live, gone = ledger_seqs(conn), [r[0] for r in archived_rows(conn)]
    assert sorted(live + gone) == list(range(1, len(live) + len(gone) + 1))
    marks = pruned_events(conn)
    assert sum(p.events for p in marks) == len(gone)
    if gone:
        last_pruned = conn.execute("SELECT max(seq) FROM events WHERE type = 'pruned'").fetchone()[0]
        assert max(gone) < last_pruned


def busy(conn: Any) -> str:
    """Finished jobs of every kind (completed, dead, cancelled) in two queues, a job waiting
    on the dead one, and one still pending; returns the worker's id."""
    decisions.enqueue(conn, [
        decisions.JobSpec(command="true", id="a"),
        decisions.JobSpec(command="true", id="b", queue="media"),
        decisions.JobSpec(command="false", id="bad", max_retries=0),
        decisions.JobSpec(command="true", id="child", after=["bad"]),
        decisions.JobSpec(command="true", id="gone"),
    ])
    decisions.cancel(conn, "gone")
    worker = claims.worker_started(conn, 1, "host-a")
    run_all(conn, worker, fail=frozenset({"bad"}))
    claims.worker_stopped(conn, worker, "done")
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="later", delay=3600)])
    return worker


def test_prune_moves_finished_jobs_to_the_archive_and_keeps_the_rest(run, conn):
    worker = busy(conn)
    before = {job_id: [tuple(r) for r in conn.execute(
        "SELECT seq, at, type, job_id, worker_id, body FROM events WHERE job_id = ? ORDER BY seq",
        (job_id,)).fetchall()] for job_id in ("a", "b", "gone", "bad", "child", "later")}
    stats = reads.stats(conn)
    done = reads.workers(conn, ("stopped",))[0].jobs_done

    out = ok(run("prune", "--before", "0s"))
    # bad is dead but child waits on it, so bad stays; child and later are unfinished.
    assert out.startswith("Pruned 3 jobs finished before ")
    assert "(8 events)" in out and f"archive: {conn.archive_target}." in out

    remaining = [j.id for j in reads.list_jobs(conn)]
    assert remaining == ["bad", "child", "later"]
    for job_id in ("a", "b", "gone"):
        assert conn.execute("SELECT count(*) FROM events WHERE job_id = ?",
                            (job_id,)).fetchone()[0] == 0
        assert [r for r in archived_rows(conn) if r[3] == job_id] == before[job_id]
        assert conn.execute("SELECT count(*) FROM runs WHERE job_id = ?",
                            (job_id,)).fetchone()[0] == 0
    for job_id in ("bad", "child", "later"):
        assert [tuple(r) for r in conn.execute(
            "SELECT seq, at, type, job_id, worker_id, body FROM events WHERE job_id = ? "
            "ORDER BY seq", (job_id,)).fetchall()] == before[job_id]

    # Counts follow the jobs still held; the queue whose jobs all left keeps its rows.
    status = json.loads(ok(run("status", "--json")))
    assert status["jobs"]["completed"] == 0 and status["jobs"]["cancelled"] == 0
    assert status["jobs"]["dead"] == 1 and sum(status["jobs"].values()) == 3
    assert reads.queue_counts(conn)["media"] == {s: 0 for s in reads.queue_counts(conn)["media"]}
    # All-time figures keep what was pruned: run counts, and each worker's jobs done.
    after = reads.stats(conn)
    assert (after.completed, after.failed, after.dead) == \
        (stats.completed, stats.failed, stats.dead) == (2, 1, 1)
    assert reads.workers(conn, ("stopped",))[0].jobs_done == done == 3

    (mark,) = pruned_events(conn)
    assert mark.jobs == ("a", "b", "gone") and mark.queues == ("default", "media")
    assert mark.events == 8 and mark.runs == {"claimed": 2, "completed": 2}
    assert [w.worker_id for w in mark.workers] == [worker]
    assert_seqs_accounted_for(conn)
    assert ok(run("rebuild", "--check")) == "Projections match the ledger.\n"
    rebuilt = json.loads(ok(run("status", "--json")))
    ok(run("rebuild"))
    assert json.loads(ok(run("status", "--json")))["jobs"] == rebuilt["jobs"]


def test_history_reads_a_pruned_job_from_the_archive(run, conn):
    busy(conn)
    whole = ok(run("history", "a", "--json"))
    ok(run("prune", "--before", "0s"))

    one_error(run("history", "a"), "Job 'a' was pruned: its events are in the archive "
                                   "(queuectl history a --archive)")
    one_error(run("show", "a"), "Job 'a' was pruned")
    assert ok(run("history", "a", "--archive", "--json")) == whole
    assert "completed" in ok(run("history", "a", "--archive"))
    one_error(run("history", "nobody", "--archive"), "Job 'nobody' not found")
    # A job that stayed reads the same with --archive.
    assert ok(run("history", "bad", "--archive")) == ok(run("history", "bad"))


def test_a_pruned_jobs_id_may_be_used_again_and_history_shows_both_lives(run, conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="echo first", id="x")])
    run_all(conn, claims.worker_started(conn, 1, "h"))
    ok(run("prune", "--before", "0s"))
    ok(run("enqueue", "--id", "x", "-c", "echo second"))
    assert reads.get_job(conn, "x").command == "echo second"
    assert "echo first" not in ok(run("history", "x"))
    lives = json.loads(ok(run("history", "x", "--archive", "--json")))
    assert [e["type"] for e in lives] == ["enqueued", "claimed", "completed", "enqueued"]


def test_only_what_finished_before_the_cutoff_goes(run, conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="old")])
    worker = claims.worker_started(conn, 1, "h")
    run_all(conn, worker)
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id="new")])
    (cut,) = conn.execute("SELECT at FROM events WHERE job_id = 'new'").fetchone()
    run_all(conn, worker)

    out = ok(run("prune", "--before", cut))
    assert out.startswith("Pruned 1 job finished before ")
    assert [j.id for j in reads.list_jobs(conn)] == ["new"]
    # Nothing finished 30 days ago: nothing to move, and no event says otherwise.
    assert ok(run("prune", "--before", "30d")).startswith("Pruned 0 jobs")
    assert len(pruned_events(conn)) == 1
    assert_seqs_accounted_for(conn)


def test_superseded_heartbeats_go_and_each_workers_latest_stays(run, conn):
    w1 = claims.worker_started(conn, 1, "h1")
    w2 = claims.worker_started(conn, 2, "h2")
    for _ in range(4):
        claims.heartbeat(conn, w1)
        claims.heartbeat(conn, w2)
    claims.heartbeat(conn, w1)
    rows = [tuple(r) for r in conn.execute("SELECT * FROM workers ORDER BY id").fetchall()]
    latest = conn.execute("SELECT worker_id, max(seq) FROM events WHERE type = "
                          "'worker-heartbeat' GROUP BY worker_id ORDER BY worker_id").fetchall()

    assert ok(run("prune", "--before", "0s", "--json")).count('"heartbeats": 7') == 1
    assert conn.execute("SELECT worker_id, seq FROM events WHERE type = 'worker-heartbeat' "
                        "ORDER BY worker_id").fetchall() == latest
    assert [tuple(r) for r in conn.execute("SELECT * FROM workers ORDER BY id").fetchall()] == rows
    (mark,) = pruned_events(conn)
    assert mark.events == 7 and mark.jobs == () and mark.workers == ()
    assert_seqs_accounted_for(conn)


def test_batches_each_append_their_own_pruned_event(conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"j{n}") for n in range(7)])
    worker = claims.worker_started(conn, 1, "h")
    run_all(conn, worker)
    for _ in range(5):
        claims.heartbeat(conn, worker)
    report = retention.prune(conn, retention.cutoff(conn, "0s"), job_batch=3, heartbeat_batch=2)
    assert (report.jobs, report.job_events, report.heartbeats) == (7, 21, 4)
    assert [len(p.jobs) for p in pruned_events(conn)] == [3, 3, 1, 0, 0]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert_seqs_accounted_for(conn)


def test_rebuild_after_a_prune_counts_the_events_it_replayed(run, conn):
    """Not the last seq: the pruned events are in the archive, not replayed."""
    busy(conn)
    ok(run("prune", "--before", "0s"))
    held, last = conn.execute("SELECT count(*), max(seq) FROM events").fetchone()
    assert held < last
    assert ok(run("rebuild")) == (f"Projections rebuilt from {held} events (seq 1 to {last}; "
                                  "the others were pruned to the archive).\n")


def test_a_dry_run_counts_what_would_go_and_writes_nothing(run, conn):
    busy(conn)
    worker = claims.worker_started(conn, 1, "h")
    claims.heartbeat(conn, worker)
    claims.heartbeat(conn, worker)
    seqs = ledger_seqs(conn)
    said = json.loads(ok(run("prune", "--before", "0s", "--dry-run", "--json")))
    assert ledger_seqs(conn) == seqs and archived_rows(conn) == []
    assert "Would prune 3 jobs" in ok(run("prune", "--before", "0s", "--dry-run"))
    done = json.loads(ok(run("prune", "--before", "0s", "--json")))
    assert {k: said[k] for k in ("jobs", "job_events", "heartbeats")} == \
        {k: done[k] for k in ("jobs", "job_events", "heartbeats")} == \
        {"jobs": 3, "job_events": 8, "heartbeats": 1}
    assert said["dry_run"] is True and done["dry_run"] is False


def test_the_ledger_still_refuses_any_other_delete_or_update(conn, db):
    busy(conn)
    ok_prune = retention.prune(conn, retention.cutoff(conn, "0s"))
    assert ok_prune.jobs == 3
    with by_hand(db) as hand:
        for sql in ("DELETE FROM events WHERE job_id = 'bad'", "DELETE FROM events",
                    "UPDATE events SET body = '{}'"):
            with pytest.raises(store.driver_errors(), match="append-only"):
                hand.execute(sql)
        if hand.kind == "sqlite":
            assert hand.execute("SELECT count(*) FROM ledger_permit").fetchone()[0] == 0
        else:
            with pytest.raises(store.driver_errors(), match="append-only"):
                hand.execute("DELETE FROM archived_events")


def test_an_unfinished_prune_leaves_the_ledger_whole_and_the_next_one_finishes(
        run, conn, monkeypatch):
    """The archive commits first: a prune that fails after it leaves rows in both places
    (never in neither), and the next prune moves them once."""
    busy(conn)
    seqs = ledger_seqs(conn)
    real = type(conn).delete

    def failing(self: Any, table: str, column: str, keys: Any, **options: Any) -> None:
        if table == "events":
            raise OSError("disk gone")
        real(self, table, column, keys, **options)

    with monkeypatch.context() as patch, pytest.raises(OSError):
        patch.setattr(type(conn), "delete", failing)
        retention.prune(conn, retention.cutoff(conn, "0s"))
    assert ledger_seqs(conn) == seqs
    assert [j.id for j in reads.list_jobs(conn)] == ["a", "b", "bad", "child", "gone", "later"]
    ok(run("prune", "--before", "0s"))
    assert_seqs_accounted_for(conn)
    assert len(json.loads(ok(run("history", "a", "--archive", "--json")))) == 3


def test_prune_beside_a_running_worker_loses_no_job(conn, db):
    """Batches take turns with a worker at the lock: every job runs once, completed jobs
    leave as they finish, and the ledger still replays (the fixture)."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(200)])
    stop = threading.Event()
    moved = [0]

    def pruning() -> None:
        with by_hand(db) as mine:
            while not stop.is_set():
                moved[0] += retention.prune(mine, retention.cutoff(mine, "0s"), job_batch=25).jobs

    pruner = threading.Thread(target=pruning)
    pruner.start()
    try:
        with workers() as start:
            proc = start("--burst", "-c", "2", "-s", "0.2")
            assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        stop.set()
        pruner.join()
    assert moved[0] > 0  # some went while the worker ran
    moved[0] += retention.prune(conn, retention.cutoff(conn, "0s")).jobs
    assert moved[0] == 200
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    completed = [r for r in archived_rows(conn) if r[2] == "completed"]
    assert len(completed) == len({r[3] for r in completed}) == 200
    assert reads.stats(conn).completed == 200
    assert_seqs_accounted_for(conn)


@pytest.mark.stores("sqlite")
def test_a_pruned_ledger_moves_between_stores(run, conn, tmp_path):
    busy(conn)
    retention.prune(conn, retention.cutoff(conn, "0s"))
    exported = ok(run("ledger", "export"))
    (tmp_path / "ledger.jsonl").write_text(exported)
    with pg_database() as url:
        assert ok(run("--db", url, "ledger", "import", str(tmp_path / "ledger.jsonl")))
        assert ok(run("--db", url, "status", "--json")) == ok(run("status", "--json"))
        assert ok(run("--db", url, "ledger", "export")) == exported
    # A gap that no pruned event accounts for is refused.
    lines = exported.splitlines()
    cut = [line for line in lines if json.loads(line)["seq"] != 7]
    (tmp_path / "cut.jsonl").write_text("\n".join(cut) + "\n")
    one_error(run("--db", str(tmp_path / "other.db"), "ledger", "import",
                  str(tmp_path / "cut.jsonl")), "events are missing where pruned events")


@pytest.mark.parametrize("before", [
    "yesterday", "-1d", "nand", "infd", "1e999d", "36600000d", "", "2026-13-01", "0000-01-01",
    "1d2h",
])
def test_a_bad_cutoff_is_one_error_line_and_writes_nothing(run, conn, before):
    busy(conn)
    seqs = ledger_seqs(conn)
    one_error(run("prune", "--before", before), "--before")
    assert ledger_seqs(conn) == seqs


def test_prune_needs_a_cutoff(run):
    result = run("prune")
    assert result.exit_code == 2 and "Missing option '--before'" in result.stderr


@pytest.mark.stores("sqlite")
def test_an_archive_that_cannot_be_written_is_one_error_line_and_moves_nothing(run, conn):
    busy(conn)
    Path(conn.archive_target).mkdir()
    seqs = ledger_seqs(conn)
    one_error(run("prune", "--before", "0s"), f"the archive {conn.archive_target}")
    assert ledger_seqs(conn) == seqs
    assert len(reads.list_jobs(conn)) == 6


def test_a_scheduled_jobs_schedule_fired_event_stays(run, conn, monkeypatch):
    """A schedule's events are its own history: they stay when the job they made goes."""
    from queuectl import clock, schedules

    t = ["2026-01-01T00:00:30.000000Z"]
    monkeypatch.setattr(clock, "now", lambda: t[0])
    schedules.add(conn, "tick", "* * * * *", decisions.JobSpec(command="true"))
    t[0] = "2026-01-01T00:01:30.000000Z"
    schedules.fire_due(conn)
    (job_id,) = [j.id for j in reads.list_jobs(conn)]
    run_all(conn, claims.worker_started(conn, 1, "h"))
    t[0] = "2026-01-01T00:02:00.000000Z"
    assert retention.prune(conn, retention.cutoff(conn, "1s")).jobs == 1
    assert [r[0] for r in conn.execute("SELECT type FROM events WHERE job_id = ?",
                                       (job_id,)).fetchall()] == ["schedule-fired"]
    assert wait_for(lambda: reads.history(conn, job_id, archive=True))[-1][2].type == "completed"
