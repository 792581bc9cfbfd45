"""Named queues, pause and limits, unique jobs (issue 13): ``enqueue --queue``, ``list -q``,
``status`` per queue, ``worker -q`` in strict order, ``queuectl queues``, ``queue
pause|resume|limit`` and ``enqueue --unique-key``. Every test runs on both stores unless
it says otherwise."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from conftest import spawn, wait_for
from helpers import burst, rows, workers

from queuectl import claims, decisions, reads
from queuectl import events as ev


def added(run: Any, *args: str) -> str:
    result = run("enqueue", *args)
    assert result.exit_code == 0, result.output
    return result.output.rsplit(" ", 1)[-1].strip()


def test_a_job_waits_in_the_queue_it_names(run, conn):
    added(run, "--id", "a", "-c", "true")
    added(run, "--id", "m", "-c", "true", "--queue", "media")
    assert run("enqueue", '{"id": "j", "command": "true", "queue": "media"}').exit_code == 0
    assert [(j.id, j.queue) for j in reads.list_jobs(conn)] == \
        [("a", "default"), ("m", "media"), ("j", "media")]
    # The enqueued event says so, and history shows it (the default queue goes unsaid).
    assert [r.get("queue") for r in rows(conn, "enqueued")] == [None, "media", "media"]
    assert "queue media" in run("history", "m").output
    assert "queue default" not in run("history", "a").output

    listed = json.loads(run("list", "-q", "media", "--json").output)
    assert [(j["id"], j["queue"]) for j in listed] == [("m", "media"), ("j", "media")]
    assert [j["id"] for j in json.loads(run("list", "-q", "media", "-s", "pending",
                                            "--json").output)] == ["m", "j"]
    assert json.loads(run("list", "-q", "nothing", "--json").output) == []
    table = run("list", "-q", "media").output
    assert "Jobs (queue media)" in table and "media" in table and " a " not in table

    status = json.loads(run("status", "--json").output)
    assert status["jobs"]["pending"] == 3
    assert status["queues"]["default"]["pending"] == 1
    assert status["queues"]["media"]["pending"] == 2
    text = run("status").output
    assert "queue default  pending: 1" in text and "queue media  pending: 2" in text


def test_status_shows_no_queue_lines_while_only_the_default_queue_is_used(run):
    added(run, "-c", "true")
    assert "queue default" not in run("status").output


def test_worker_takes_its_queues_in_strict_order_and_leaves_the_others(run, conn):
    # Priority orders jobs inside a queue, never across the worker's queues.
    added(run, "--id", "d1", "-c", "true", "-p", "9")
    added(run, "--id", "h1", "-c", "true", "-q", "high")
    added(run, "--id", "l1", "-c", "true", "-q", "low", "-p", "5")
    added(run, "--id", "h2", "-c", "true", "-q", "high", "-p", "3")
    added(run, "--id", "d2", "-c", "true")
    added(run, "--id", "o1", "-c", "true", "-q", "other")

    with workers() as start:
        burst(start, "-q", "high", "-q", "default", "-q", "low")  # -c 1: one claim at a time

    assert [r["job_id"] for r in rows(conn, "claimed")] == ["h2", "h1", "d1", "d2", "l1"]
    # --burst ended with "other" still pending: it waits only for its own queues.
    assert reads.get_job(conn, "o1").state == "pending"


def test_worker_without_queues_takes_every_queue_by_priority_then_age(run, conn):
    added(run, "--id", "a", "-c", "true", "-q", "x")
    added(run, "--id", "b", "-c", "true", "-q", "y", "-p", "2")
    added(run, "--id", "c", "-c", "true")
    with workers() as start:
        burst(start)
    assert [r["job_id"] for r in rows(conn, "claimed")] == ["b", "a", "c"]


def test_concurrent_workers_of_one_queue_never_touch_another(run, conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", queue="a") for _ in range(30)]
                      + [decisions.JobSpec(command="true", queue="b") for _ in range(30)])
    with workers() as start:
        burst(start, "-c", "3", "-q", "a")
    counts = reads.queue_counts(conn)
    assert counts["a"]["completed"] == 30 and counts["b"]["pending"] == 30
    assert counts["b"]["completed"] == 0


def test_queues_lists_every_queue_with_counts_and_oldest_wait(run, conn):
    added(run, "--id", "a", "-c", "true", "-q", "media")
    added(run, "--id", "b", "-c", "exit 3", "-q", "media", "--max-retries", "0")
    added(run, "--id", "c", "-c", "true", "-q", "mail")
    with workers() as start:
        burst(start, "-q", "mail")
    found = {q["queue"]: q for q in json.loads(run("queues", "--json").output)}
    assert list(found) == ["default", "mail", "media"]
    assert found["media"]["jobs"]["pending"] == 2 and found["media"]["total"] == 2
    assert found["mail"]["jobs"]["completed"] == 1 and found["mail"]["total"] == 1
    assert found["mail"]["oldest_pending_wait"] is None
    assert found["media"]["oldest_pending_wait"] >= 0
    assert found["default"]["total"] == 0

    with workers() as start:
        burst(start, "-q", "media")
    found = {q["queue"]: q for q in json.loads(run("queues", "--json").output)}
    assert found["media"]["jobs"]["dead"] == 1 and found["media"]["jobs"]["completed"] == 1
    table = run("queues").output
    assert "media" in table and "mail" in table and "Oldest pending" in table
    assert "1 completed, 1 dead" in table


def test_queue_counts_replay_exactly_after_jobs_move(run, conn):
    """job_counts holds a row for every state of every queue used; a replay writes the same
    rows (the fixture compares them after each test; here also by hand)."""
    added(run, "--id", "a", "-c", "exit 1", "-q", "q1", "--max-retries", "0")
    added(run, "--id", "b", "-c", "true", "-q", "q2")
    with workers() as start:
        burst(start)
    assert run("rebuild", "--check").exit_code == 0
    assert conn.execute("SELECT count(*) FROM job_counts WHERE queue = 'q1'").fetchone()[0] \
        == len(reads.STATES)


# -- pause, resume, limits -----------------------------------------------------------------

_ENDS_A_RUN = ("completed", "failed", "timed-out", "lease-expired", "released", "cancelled")


def most_at_once(conn: Any, queue: str) -> int:
    """The most jobs of ``queue`` processing at any moment, read from the ledger: a claim
    starts holding a job, the event that ends its run stops it."""
    ours = {j.id for j in reads.list_jobs(conn, queue=queue)}
    holding: set[str] = set()
    most = 0
    for kind, job_id in conn.execute(
            "SELECT type, job_id FROM events WHERE job_id IS NOT NULL ORDER BY seq"):
        if job_id not in ours:
            continue
        if kind == "claimed":
            holding.add(job_id)
            most = max(most, len(holding))
        elif kind in _ENDS_A_RUN:
            holding.discard(job_id)
    return most


def test_a_paused_queue_takes_jobs_but_no_worker_starts_them(run, conn):
    added(run, "--id", "m1", "-c", "true", "-q", "media")
    assert run("queue", "pause", "media").output == "Queue 'media' paused.\n"
    assert run("queue", "pause", "media").output == "Queue 'media' was paused already.\n"
    assert [r["queue"] for r in rows(conn, "queue-paused")] == ["media"]  # one event only
    added(run, "--id", "m2", "-c", "true", "-q", "media")  # still accepts jobs
    added(run, "--id", "d1", "-c", "true")

    with workers() as start:
        burst(start, "-c", "2")  # ends: a paused queue's pending jobs are not waited for
    assert [r["job_id"] for r in rows(conn, "claimed")] == ["d1"]
    found = {q["queue"]: q for q in json.loads(run("queues", "--json").output)}
    assert found["media"]["paused"] is True and found["media"]["jobs"]["pending"] == 2
    assert found["default"]["paused"] is False
    assert "paused" in run("queues").output

    with workers() as start:
        burst(start, "-q", "media")  # a worker given only the paused queue ends too
    assert reads.get_job(conn, "m1").state == "pending"

    assert run("queue", "resume", "media").output == "Queue 'media' resumed.\n"
    assert run("queue", "resume", "media").output == "Queue 'media' was not paused.\n"
    with workers() as start:
        burst(start)
    assert [r["job_id"] for r in rows(conn, "claimed")] == ["d1", "m1", "m2"]
    assert [r["queue"] for r in rows(conn, "queue-resumed")] == ["media"]


def test_pausing_lets_running_jobs_finish(run, conn, tmp_path):
    gate = tmp_path / "gate"
    added(run, "--id", "slow", "-q", "media", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    added(run, "--id", "next", "-q", "media", "-c", "true")
    with workers() as start:
        proc = start("-s", "0.2")
        wait_for(lambda: reads.get_job(conn, "slow").state == "processing", what="slow runs")
        assert run("queue", "pause", "media").exit_code == 0
        gate.touch()
        wait_for(lambda: reads.get_job(conn, "slow").state == "completed", what="slow ends")
        # The queue is paused: the next job stays pending while the worker idles.
        time.sleep(0.5)
        assert reads.get_job(conn, "next").state == "pending"
        assert run("queue", "resume", "media").exit_code == 0
        wait_for(lambda: reads.get_job(conn, "next").state == "completed", what="next runs")
        proc.terminate()


def test_a_queue_limit_holds_across_worker_processes(run, conn):
    """Three worker processes of -c 4 on a queue limited to 2: never more than 2 of its
    jobs processing at once (read from the ledger), while another queue's jobs run freely."""
    assert run("queue", "limit", "media", "2").output == "Queue 'media': at most 2 jobs at once.\n"
    assert run("queue", "limit", "media", "2").output == \
        "Queue 'media' had at most 2 jobs at once already.\n"
    decisions.enqueue(conn, [decisions.JobSpec(command="sleep 0.1", queue="media")
                             for _ in range(24)]
                      + [decisions.JobSpec(command="sleep 0.1") for _ in range(24)])
    with workers() as start:
        procs = [start("--burst", "-s", "0.2", "-c", "4") for _ in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    counts = reads.queue_counts(conn)
    assert counts["media"]["completed"] == 24 and counts["default"]["completed"] == 24
    assert most_at_once(conn, "media") == 2
    assert most_at_once(conn, "default") > 2
    found = {q["queue"]: q for q in json.loads(run("queues", "--json").output)}
    assert found["media"]["limit"] == 2 and found["default"]["limit"] == 0


def test_a_limit_holds_for_a_worker_given_its_queues(run, conn):
    assert run("queue", "limit", "media", "1").exit_code == 0
    decisions.enqueue(conn, [decisions.JobSpec(command="sleep 0.05", queue="media")
                             for _ in range(6)]
                      + [decisions.JobSpec(command="sleep 0.05", queue="low") for _ in range(6)])
    with workers() as start:
        burst(start, "-c", "3", "-q", "media", "-q", "low")
    assert most_at_once(conn, "media") == 1
    assert reads.queue_counts(conn)["low"]["completed"] == 6
    # 0 lifts the limit.
    assert run("queue", "limit", "media", "0").output == "Queue 'media': no limit.\n"
    assert [r["limit"] for r in rows(conn, "queue-limited")] == [1, 0]


@pytest.mark.stores("postgres")  # SQLite's workers wake at every commit already
def test_a_run_ending_under_a_limit_wakes_idle_workers(conn, db):
    """A result in a limited queue may leave a place for a job other workers could not
    take: its commit notifies them, as an enqueue does (PostgreSQL)."""
    import psycopg

    decisions.limit_queue(conn, "media", 1)
    decisions.enqueue(conn, [decisions.JobSpec(command="true", queue="media", id=f"m{n}")
                             for n in range(2)])
    claims.worker_started(conn, 1, "h", worker_id="w")
    job = claims.claim(conn, "w")
    assert job is not None and claims.claim(conn, "w") is None  # the limit holds
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN queuectl")
        claims.finish(conn, job, ev.Completed(job_id=job.job_id, worker_id="w",
                                              attempt=job.attempt))
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == ["queuectl"]
# -- unique jobs -----------------------------------------------------------------------------


def test_a_unique_key_keeps_one_unfinished_job(run, conn):
    first = run("enqueue", "-c", "echo report", "--unique-key", "report:today", "--id", "r1")
    assert first.output == "Job added successfully with ID: r1\n"
    again = run("enqueue", "-c", "echo report", "--unique-key", "report:today")
    assert again.exit_code == 0
    assert again.output == "Job already queued with ID: r1 (unique key 'report:today')\n"
    refused = run("enqueue", "-c", "echo report", "--unique-key", "report:today",
                  "--on-duplicate", "error")
    assert refused.exit_code == 1
    assert refused.stderr == ("Error: unique key 'report:today' is held by unfinished job "
                              "'r1'\n")
    assert [r["job_id"] for r in rows(conn, "enqueued")] == ["r1"]  # nothing else written
    assert reads.get_job(conn, "r1").unique_key == "report:today"
    # JSON and files say the same: the key is held, whichever way a job comes.
    assert run("enqueue", '{"command": "true", "unique_key": "report:today"}').output == \
        "Job already queued with ID: r1 (unique key 'report:today')\n"
    lines = '{"command": "echo a", "unique_key": "k2"}\n{"command": "echo b", "unique_key": "k2"}\n' \
            '{"command": "echo c", "unique_key": "report:today"}\n{"command": "echo d"}\n'
    out = run("enqueue", "--file", "-", input=lines).output
    assert out == "2 jobs added successfully; 2 already queued (unique keys held).\n"

    # Once the job is finished, the key is free again.
    with workers() as start:
        burst(start)
    assert run("enqueue", "-c", "echo report", "--unique-key", "report:today",
               "--id", "r2").output == "Job added successfully with ID: r2\n"


def test_a_failed_job_waiting_to_retry_still_holds_its_key(run, conn):
    added(run, "--id", "f", "-c", "exit 1", "--unique-key", "k", "--max-retries", "1",
          "--backoff-base", "1000")
    with workers() as start:
        burst(start, "-l", "1")  # one run, then it waits 1,000 s to retry
    assert reads.get_job(conn, "f").state == "failed"
    assert "Job already queued with ID: f" in run("enqueue", "-c", "x", "--unique-key", "k").output


def test_a_dead_job_whose_key_was_taken_cannot_be_retried(run, conn):
    added(run, "--id", "d", "-c", "exit 1", "--unique-key", "k", "--max-retries", "0")
    with workers() as start:
        burst(start)
    assert reads.get_job(conn, "d").state == "dead"
    added(run, "--id", "n", "-c", "sleep 60", "--unique-key", "k", "--delay", "600")
    refused = run("dlq", "retry", "d")
    assert refused.exit_code == 1
    assert "unique key 'k' is held by unfinished job 'n'" in refused.stderr
    assert reads.get_job(conn, "d").state == "dead"


def test_concurrent_enqueuers_of_one_key_make_one_job(conn, tmp_path):
    """Eight processes enqueue the same unique key at once: exactly one job is made, and
    every process prints its id."""
    procs = [spawn("enqueue", "-c", "true", "--unique-key", "only-once") for _ in range(8)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(out.strip().split(": ")[1].split()[0])
    made = [r["job_id"] for r in rows(conn, "enqueued")]
    assert len(made) == 1
    assert set(outs) == set(made)


# -- bulk actions ----------------------------------------------------------------------------


def test_cancel_by_state_and_queue_with_a_dry_run_first(run, conn):
    for n in range(3):
        added(run, "--id", f"m{n}", "-c", "true", "-q", "media")
    added(run, "--id", "d0", "-c", "true")
    added(run, "--id", "after-m0", "-c", "true", "-q", "other", "--after", "m0")
    before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    # A dry run is the real decision, rolled back: the job waiting on m0 is counted too.
    dry = run("cancel", "--state", "pending", "-q", "media", "--dry-run")
    assert dry.output == "Would cancel 4 jobs (dry run: nothing written).\n"
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == before
    assert reads.get_job(conn, "after-m0").state == "waiting"
    # The job waiting on m0 is cancelled with it, and counted.
    assert run("cancel", "--state", "pending", "-q", "media").output == "Cancelled 4 jobs.\n"
    assert [reads.get_job(conn, j).state for j in ("m0", "m1", "m2", "after-m0", "d0")] \
        == ["cancelled"] * 4 + ["pending"]
    assert run("cancel", "--state", "pending", "-q", "media").output == "Cancelled 0 jobs.\n"


def test_a_bulk_cancel_goes_in_batches(conn, monkeypatch):
    """1,200 jobs in batches of 500: three transactions that cancel, each short enough
    that workers get the lock between them, and one that finds none left."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(1200)])
    transactions = []
    real = decisions.write

    def counted(db: Any) -> Any:
        transactions.append(1)
        return real(db)

    monkeypatch.setattr(decisions, "write", counted)
    assert decisions.cancel_all(conn, "pending", batch=500) == (1200, 0)
    assert len(transactions) == 4
    assert reads.counts(conn)["cancelled"] == 1200


def test_cancel_every_running_job_asks_their_workers(run, conn):
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"r{n}") for n in range(3)])
    claims.worker_started(conn, 1, "h", worker_id="w")
    held = [claims.claim(conn, "w") for _ in range(2)]
    assert all(held)
    out = run("cancel", "--state", "processing").output
    assert out == "Cancel requested for 2 running jobs; their workers will stop them.\n"
    assert sorted(r["job_id"] for r in rows(conn, "cancel-requested")) == ["r0", "r1"]
    # Asked once: a second run finds none left to ask.
    assert run("cancel", "--state", "processing").output.startswith(
        "Cancel requested for 0 running jobs")


def test_dlq_retry_all_of_a_queue(run, conn):
    for job_id, queue in (("a", "media"), ("b", "media"), ("c", "default")):
        added(run, "--id", job_id, "-c", "exit 1", "-q", queue, "--max-retries", "0")
    added(run, "--id", "k1", "-c", "exit 1", "-q", "media", "--max-retries", "0",
          "--unique-key", "k")
    with workers() as start:
        burst(start)
    assert reads.counts(conn)["dead"] == 4
    added(run, "--id", "k2", "-c", "true", "--unique-key", "k", "--delay", "600")
    before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert run("dlq", "retry", "--all", "-q", "media", "--dry-run").output == \
        "Would requeue 2 jobs; 1 job would stay dead (unique key held) (dry run: nothing " \
        "written).\n"
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == before
    out = run("dlq", "retry", "--all", "-q", "media").output
    assert out == ("Requeued 2 jobs from the dead letter queue; 1 job left dead "
                   "(unique key held).\n")
    assert {j: reads.get_job(conn, j).state for j in ("a", "b", "c", "k1")} == \
        {"a": "pending", "b": "pending", "c": "dead", "k1": "dead"}
    assert [r["job_id"] for r in rows(conn, "requeued")] == ["a", "b"]
    assert run("dlq", "retry", "--all").output == "Requeued 1 job from the dead letter queue; " \
        "1 job left dead (unique key held).\n"


def test_a_dry_run_of_dlq_retry_counts_the_keys_the_requeues_before_it_take(run, conn):
    """Two dead jobs share a unique key: the first requeued takes it, so the second stays
    dead, in the dry run as in the real one."""
    for job_id, key in (("k1", "k"), ("k2", "k"), ("free", None)):
        flags = ["--unique-key", key] if key else []
        added(run, "--id", job_id, "-c", "exit 1", "--max-retries", "0", *flags)
        with workers() as start:
            burst(start)
    assert reads.counts(conn)["dead"] == 3
    assert run("dlq", "retry", "--all", "--dry-run").output == \
        "Would requeue 2 jobs; 1 job would stay dead (unique key held) (dry run: nothing " \
        "written).\n"
    assert reads.counts(conn)["dead"] == 3
    assert run("dlq", "retry", "--all").output == "Requeued 2 jobs from the dead letter " \
        "queue; 1 job left dead (unique key held).\n"


def test_cancel_every_running_job_cancels_those_held_ahead_at_once(run, conn):
    """Of the jobs processing, those claimed ahead of their worker's current one have not
    started: they are cancelled at once (and never run), the running one is asked to stop;
    the dry run says the same."""
    decisions.enqueue(conn, [decisions.JobSpec(command="true", id=f"r{n}") for n in range(3)])
    claims.worker_started(conn, 1, "h", worker_id="w")
    assert claims.claim(conn, "w").job_id == "r0"
    claims.finish_and_claim_many(conn, [], ["w", "w"], ahead=True)
    said = "Cancelled 2 jobs held ahead, not yet started{}.\n{}\n"
    assert run("cancel", "--state", "processing", "--dry-run").output == said.format(
        " (dry run: nothing written)",
        "Would ask 1 running job to stop (dry run: nothing written).").replace(
        "Cancelled", "Would cancel")
    assert run("cancel", "--state", "processing").output == said.format(
        "", "Cancel requested for 1 running job; their workers will stop them.")
    assert [reads.get_job(conn, j).state for j in ("r0", "r1", "r2")] == \
        ["processing", "cancelled", "cancelled"]
