"""``stats``: counts, success rate, throughput and the percentiles of run time and queue
wait, all time and over a window, against a ledger built under a fake clock so that every
figure can be computed by hand."""

from __future__ import annotations

import json
import re
import sqlite3

from helpers import FakeClock, T, added, claim, complete, fail, ok, rows, state

from queuectl import claims, decisions
from queuectl import events as ev


def _stats_ledger(conn: sqlite3.Connection, run, fake: FakeClock) -> None:  # type: ignore[no-untyped-def]
    """A ledger whose every time and duration is known (see the timeline below).

    t=0   enqueue c01..c20, f (max_retries 1), to (timeout 4, max_retries 0), x, p
    t=i   claim c_i (wait i), complete at i + d_i with duration d_i = 0.05*i   (i = 1..20)
    t=21  claim f (wait 21); t=24 f fails, duration 3.0 -> retry in 2 s (run_at 26)
    t=25  claim to (wait 25: f is not eligible yet); t=29 timed out, duration 4.0 -> dead
    t=30  claim f (wait 30 - 26 = 4); t=30.5 fails, duration 0.5 -> dead
    t=31  claim x (wait 31); t=31.5 cancel requested; t=32 cancelled by its worker
    p is never claimed.
    """
    fake.set(0)
    for i in range(1, 21):
        added(run, "--id", f"c{i:02d}", "-c", "true")
    added(run, "--id", "f", "--max-retries", "1", "--backoff-base", "2", "-c", "false")
    added(run, "--id", "to", "--max-retries", "0", "--timeout", "4", "-c", "sleep 9")
    added(run, "--id", "x", "-c", "sleep 9")
    added(run, "--id", "p", "-c", "true")
    claims.worker_started(conn, 1, "host", worker_id="w")
    for i in range(1, 21):
        fake.set(i)
        c = claim(conn, "w", f"c{i:02d}")
        d = round(0.05 * i, 2)
        fake.set(i + d)
        complete(conn, c, "w", d)
    fake.set(21)
    c = claim(conn, "w", "f")
    fake.set(24)
    fail(conn, c, "w", 3.0)
    assert rows(conn, "scheduled-retry", "f")[0]["run_at"] == T(26)
    fake.set(25)
    c = claim(conn, "w", "to")
    fake.set(29)
    claims.finish(conn, c, ev.TimedOut(job_id="to", worker_id="w", attempt=1, timeout=4,
                                      duration=4.0))
    fake.set(30)
    c = claim(conn, "w", "f")
    fake.set(30.5)
    fail(conn, c, "w", 0.5)
    fake.set(31)
    c = claim(conn, "w", "x")
    fake.set(31.5)
    assert decisions.cancel(conn, "x") == "requested"
    fake.set(32)
    claims.finish(conn, c, ev.Cancelled(job_id="x", worker_id="w", attempt=1,
                                       reason="cancelled by user while running", duration=1.0))
    assert [state(conn, j) for j in ("c20", "f", "to", "x", "p")] == \
        ["completed", "dead", "dead", "cancelled", "pending"]


def test_stats_all_time_match_the_hand_computed_figures(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    _stats_ledger(conn, run, fake)
    fake.set(40)
    figures = json.loads(ok(run, "stats", "--json"))
    # Timed runs (23): c durations 0.05..1.0, f 3.0 and 0.5, to 4.0. Sorted, 0.5 appears
    # twice (c10 and f), so index 11 holds c11's 0.55; nearest rank: p50 -> ceil(11.5)-1 = 11,
    # p95 -> ceil(21.85)-1 = 21 -> 3.0 (index 22 is the max, 4.0).
    # Claims (24): waits 1..20, 21, 25, 4, 31 -> sorted 1,2,3,4,4,5,...,20,21,25,31:
    # p50 -> ceil(12)-1 = 11 -> 11; p95 -> ceil(22.8)-1 = 22 -> 25.
    # Success: 20 completed of 23 finished runs -> 0.8696. Throughput: 20 completed over the
    # span from the first claim (t=1) to the last finished run (t=32): 31 s -> 38.71/min.
    assert figures == {
        "since": None,
        "completed": 20,
        "failed": 3,
        "dead": 2,
        "success_rate": 0.8696,
        "throughput_per_min": 38.71,
        "throughput_over_seconds": 31.0,
        "run_time": {"p50": 0.55, "p95": 3.0, "max": 4.0},
        "queue_wait": {"p50": 11.0, "p95": 25.0},
    }
    text = ok(run, "stats")
    assert re.search(r"^Completed:\s+20$", text, re.MULTILINE), text
    assert re.search(r"^Failed runs:\s+3$", text, re.MULTILINE), text
    assert re.search(r"^Dead:\s+2$", text, re.MULTILINE), text
    assert "87.0%" in text
    # All time's throughput says what it is taken over: not the last hour, not forever.
    assert "Throughput:    38.71 jobs/min (over 31s, first claim to last end)" in text
    assert "p50 0.550s" in text and "p95 3.000s" in text and "max 4.000s" in text
    assert "p50 11.000s" in text and "p95 25.000s" in text


def test_stats_since_counts_only_the_window(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    _stats_ledger(conn, run, fake)
    fake.set(40)
    # A window holds the runs that finished in it; every figure is taken over those runs.
    # Last 14 s: since t=26. Finished since: to (29, timed out; claimed at 25 with wait 25),
    # f's 2nd run (30.5, wait 4), x (32, cancelled: a wait but no run time).
    # Run times 0.5, 4.0: p50 -> ceil(1)-1 = 0 -> 0.5, p95 -> ceil(1.9)-1 = 1 -> 4.0.
    # Waits 4, 25, 31: p50 -> ceil(1.5)-1 = 1 -> 25, p95 -> ceil(2.85)-1 = 2 -> 31.
    # No completions: rate 0, throughput 0 over 14 s.
    assert json.loads(ok(run, "stats", "--since", "14s", "--json")) == {
        "since": T(26),
        "completed": 0,
        "failed": 2,
        "dead": 2,
        "success_rate": 0.0,
        "throughput_per_min": 0.0,
        "throughput_over_seconds": 14.0,
        "run_time": {"p50": 0.5, "p95": 4.0, "max": 4.0},
        "queue_wait": {"p50": 25.0, "p95": 31.0},
    }
    # Last 30 s: since t=10. Finished since: c10..c20 (c10 at 10.5), f (24), to, f, x.
    # Run times (14): 0.5 (c10), 0.5 (f), 0.55..1.0, 3.0, 4.0 -> p50 index 6 -> 0.75,
    # p95 index ceil(13.3)-1 = 13 -> 4.0. Their waits (15): 10..20, 21, 25, 4, 31 ->
    # sorted 4,10,...,20,21,25,31: p50 index ceil(7.5)-1 = 7 -> 16, p95 index 14 -> 31.
    # Rate 11/14 = 0.7857; throughput 11 per half minute -> 22.0.
    half = json.loads(ok(run, "stats", "--since", "30s", "--json"))
    assert half == {
        "since": T(10),
        "completed": 11,
        "failed": 3,
        "dead": 2,
        "success_rate": 0.7857,
        "throughput_per_min": 22.0,
        "throughput_over_seconds": 30.0,
        "run_time": {"p50": 0.75, "p95": 4.0, "max": 4.0},
        "queue_wait": {"p50": 16.0, "p95": 31.0},
    }
    # Units: 1m is 60 s and covers everything; 1d too.
    everything = json.loads(ok(run, "stats", "--since", "1m", "--json"))
    assert (everything["since"], everything["completed"], everything["failed"]) == (T(-20), 20, 3)
    assert everything["run_time"] == {"p50": 0.55, "p95": 3.0, "max": 4.0}
    assert everything["queue_wait"] == {"p50": 11.0, "p95": 25.0}
    assert json.loads(ok(run, "stats", "--since", "1d", "--json"))["completed"] == 20
    assert json.loads(ok(run, "stats", "--since", "0.5m", "--json")) == half
    assert "last 30s" in ok(run, "stats", "--since", "30s")
    assert "Throughput:    22 jobs/min (over the last 30s)" in ok(run, "stats", "--since", "30s")


def test_stats_of_an_empty_queue(run, conn):
    assert json.loads(ok(run, "stats", "--json")) == {
        "since": None, "completed": 0, "failed": 0, "dead": 0, "success_rate": None,
        "throughput_per_min": None, "throughput_over_seconds": None,
        "run_time": {"p50": None, "p95": None, "max": None},
        "queue_wait": {"p50": None, "p95": None},
    }
    assert re.search(r"^Completed:\s+0$", ok(run, "stats"), re.MULTILINE)
