"""``queuectl metrics``: the Prometheus text format, read back with prometheus_client's
own parser. Jobs by queue and state, runs by queue and outcome (all-time counters that
``prune`` leaves alone), the recent window's summaries, workers, lease expiries, the
ledger's head, queues' pause and limit, schedules' ticks; on both stores."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import rescued
from helpers import FakeClock, ok

from queuectl import claims, clock, ledger
from queuectl import events as ev
from queuectl import metrics

parser = pytest.importorskip("prometheus_client.parser")


def scrape(run: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``queuectl metrics``: (name, sorted labels) -> value."""
    text = ok(run, "metrics")
    found = {}
    for family in parser.text_string_to_metric_families(text):
        assert family.documentation, family.name  # every metric says what it is
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _claim(conn: Any, worker_id: str, expect: str) -> claims.Claim:
    got = claims.claim(conn, worker_id)
    assert got is not None and got.job_id == expect, got
    return got


def _finish(conn: Any, c: claims.Claim, worker: str, code: int, duration: float) -> None:
    if code == 0:
        claims.finish(conn, c, ev.Completed(job_id=c.job_id, worker_id=worker,
                                            attempt=c.attempt, duration=duration))
    else:
        claims.finish(conn, c, ev.Failed(job_id=c.job_id, worker_id=worker, attempt=c.attempt,
                                         exit_code=code, error=f"exit status {code}",
                                         duration=duration))


@pytest.fixture
def busy(run: Any, conn: Any, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Under a fake clock: runs of three outcomes in two queues, a lease taken back from a
    worker that went silent, a paused and limited queue, a schedule."""
    fake = FakeClock(monkeypatch)
    for pid, name in ((11, "w1"), (12, "w2")):
        claims.worker_started(conn, pid, "host-a", worker_id=name)
    ok(run, "enqueue", "--id", "a", "-c", "true")
    ok(run, "enqueue", "--id", "b", "-c", "exit 3", "--max-retries", "0")
    ok(run, "enqueue", "--id", "lost", "-c", "sleep 9", "--max-retries", "0")
    ok(run, "enqueue", "--id", "m1", "-c", "true", "-q", "media")
    fake.set(2)
    _finish(conn, _claim(conn, "w1", "a"), "w1", 0, 1.0)
    _finish(conn, _claim(conn, "w1", "b"), "w1", 3, 3.0)
    _claim(conn, "w2", "lost")
    _finish(conn, _claim(conn, "w1", "m1"), "w1", 0, 2.0)
    fake.set(4)

    def beat() -> None:
        claims.heartbeat(conn, "w1")

    assert [e.type for e in rescued(conn, 30, meanwhile=beat)] == ["lease-expired", "dead"]
    ok(run, "enqueue", "--id", "m2", "-c", "true", "-q", "media")
    ok(run, "queue", "pause", "media")
    ok(run, "queue", "limit", "media", "2", "--rate", "100/m")
    ok(run, "schedule", "add", "nightly", "--cron", "0 2 * * *", "-c", "backup.sh")
    fake.set(10)
    claims.heartbeat(conn, "w1")
    return fake


@pytest.mark.stores("sqlite")  # the fake clock: PostgreSQL's times are the server's
def test_every_metric_after_runs_of_each_outcome(run: Any, conn: Any, busy: FakeClock) -> None:
    busy.set(42)
    got = scrape(run)
    runs = "queuectl_runs_total"
    assert value(got, runs, queue="default", outcome="completed") == 1
    assert value(got, runs, queue="default", outcome="failed") == 1
    assert value(got, runs, queue="default", outcome="lease-expired") == 1
    assert value(got, runs, queue="default", outcome="timed-out") == 0
    assert value(got, runs, queue="media", outcome="completed") == 1
    assert value(got, "queuectl_runs_started_total", queue="default") == 3
    assert value(got, "queuectl_runs_dead_total", queue="default") == 2
    assert value(got, "queuectl_lease_expiries_total") == 1
    assert value(got, "queuectl_worker_crashes_total") == 1  # w2, declared gone
    assert value(got, "queuectl_workers", state="active") == 0  # w1 silent since 10 s
    assert value(got, "queuectl_workers", state="silent") == 1
    assert value(got, "queuectl_workers", state="gone") == 1
    assert value(got, "queuectl_jobs", queue="default", state="dead") == 2
    assert value(got, "queuectl_jobs", queue="media", state="pending") == 1
    # m2 enqueued at 4 s and still pending at 42 s, its queue paused: ready all the same
    assert value(got, "queuectl_oldest_ready_job_age_seconds", queue="media") == 38
    assert value(got, "queuectl_oldest_ready_job_age_seconds", queue="default") == 0
    assert value(got, "queuectl_queue_paused", queue="media") == 1
    assert value(got, "queuectl_queue_paused", queue="default") == 0
    assert value(got, "queuectl_queue_concurrency_limit", queue="media") == 2
    assert value(got, "queuectl_queue_rate_limit", queue="media") == 100
    assert value(got, "queuectl_queue_rate_period_seconds", queue="media") == 60
    assert value(got, "queuectl_queue_rate_limit", queue="default") == 0
    with_ledger = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    assert value(got, "queuectl_ledger_head_seq") == with_ledger
    tick = clock.parse("2026-01-01T02:00:00Z").timestamp()
    assert value(got, "queuectl_schedule_next_fire_timestamp_seconds", schedule="nightly") == tick
    assert value(got, "queuectl_schedule_last_fire_timestamp_seconds", schedule="nightly") is None
    assert value(got, "queuectl_schedule_paused", schedule="nightly") == 0
    # The window (the last 300 s) holds every run: three with a run time, four waits.
    d = "queuectl_run_duration_seconds"
    assert value(got, d + "_count", queue="default") == 2
    assert value(got, d + "_sum", queue="default") == 4.0
    assert value(got, d, queue="default", quantile="0.5") == 1.0
    assert value(got, d, queue="default", quantile="0.99") == 3.0
    assert value(got, "queuectl_queue_wait_seconds_count", queue="default") == 3
    assert value(got, "queuectl_queue_wait_seconds", queue="media", quantile="0.5") == 2.0
    busy.set(10 + metrics.WINDOW_SECONDS)  # the runs ended at 2 and 4 s: out of the window
    later = scrape(run)
    assert value(later, d + "_count", queue="default") == 0
    assert value(later, d, queue="default", quantile="0.5") is None
    assert value(later, runs, queue="default", outcome="completed") == 1


def test_run_counters_do_not_fall_after_prune(run: Any, conn: Any, busy: FakeClock) -> None:
    before = scrape(run)
    result = run("prune", "--before", "0s")
    assert result.exit_code == 0, result.stderr
    after = scrape(run)
    counters = {k: v for k, v in before.items() if k[0].endswith("_total")}
    assert counters, before
    for key, n in counters.items():
        assert after.get(key) == n, key
    # The pruned jobs leave the gauges; m2, pending, stays.
    assert value(after, "queuectl_jobs", queue="default", state="completed") == 0
    assert value(after, "queuectl_jobs", queue="media", state="pending") == 1
    assert value(after, "queuectl_ledger_head_seq") > value(before, "queuectl_ledger_head_seq")


def test_a_real_worker_s_runs_are_counted_per_queue(run: Any, conn: Any) -> None:
    from helpers import burst, workers

    ok(run, "enqueue", "-c", "true")
    ok(run, "enqueue", "-c", "exit 2", "--max-retries", "1", "--backoff-base", "1")
    ok(run, "enqueue", "-c", "true", "-q", "mail")
    with workers() as start:
        burst(start, "-q", "default", "-q", "mail")
    got = scrape(run)
    assert value(got, "queuectl_runs_total", queue="default", outcome="completed") == 1
    assert value(got, "queuectl_runs_total", queue="default", outcome="failed") == 2
    assert value(got, "queuectl_runs_total", queue="mail", outcome="completed") == 1
    assert value(got, "queuectl_runs_dead_total", queue="default") == 1
    assert value(got, "queuectl_workers", state="stopped") == 1
    assert value(got, "queuectl_run_duration_seconds_count", queue="default") == 3
    assert value(got, "queuectl_jobs", queue="mail", state="completed") == 1
    assert run("prune", "--before", "0s").exit_code == 0
    assert scrape(run)["queuectl_runs_total", (("outcome", "failed"), ("queue", "default"))] == 2


def test_metrics_of_an_empty_store_and_a_missing_one(run: Any, conn: Any) -> None:
    got = scrape(run)
    assert value(got, "queuectl_jobs", queue="default", state="pending") == 0
    assert value(got, "queuectl_runs_total", queue="default", outcome="completed") == 0
    assert value(got, "queuectl_ledger_head_seq") is not None
    missing = run("--db", "nowhere/queue.db", "metrics")
    assert missing.exit_code == 1
    assert missing.stderr.startswith("Error: no queuectl database at nowhere/queue.db")
    assert "Traceback" not in missing.output


def test_quantiles_are_nearest_rank() -> None:
    assert metrics.quantiles([]) == {}
    assert metrics.quantiles([3.0, 1.0, 2.0]) == {0.5: 2.0, 0.9: 3.0, 0.99: 3.0}
    assert metrics.quantiles([float(n) for n in range(1, 101)]) == {0.5: 50.0, 0.9: 90.0,
                                                                    0.99: 99.0}


def test_runs_of_claims_that_name_no_queue_count_under_queue_empty(run: Any, conn: Any) -> None:
    """Claims written before they named their job's queue: their runs keep counting, under
    queue "", and a replay gives the same (the fixture checks it)."""
    ok(run, "enqueue", "--id", "old", "-c", "true", "-q", "mail")
    wid = claims.worker_started(conn, 1, "h")
    with ledger.write(conn):
        ledger.append(conn, ev.Claimed(job_id="old", worker_id=wid, attempt=1))
        ledger.append(conn, ev.Completed(job_id="old", worker_id=wid, attempt=1, duration=0.5))
    got = scrape(run)
    assert value(got, "queuectl_runs_total", queue="", outcome="completed") == 1
    assert value(got, "queuectl_runs_started_total", queue="") == 1
    assert value(got, "queuectl_runs_total", queue="mail", outcome="completed") == 0
    assert run("prune", "--before", "0s").exit_code == 0
    assert value(scrape(run), "queuectl_runs_total", queue="", outcome="completed") == 1
