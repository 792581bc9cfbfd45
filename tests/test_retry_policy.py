"""Each job's retry policy, under a fake clock: its own backoff base and max retries, delays
of exactly ``base ** k`` by default, capped by backoff-max, shortened by a jitter that is
drawn once, recorded in the ledger and never drawn again on replay."""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import pytest
from helpers import FakeClock, T, added, claim, fail, job, ok, rows, state

from queuectl import clock, ledger


def _fail_until_dead(conn: sqlite3.Connection, fake: FakeClock, job_id: str) -> list[dict[str, Any]]:
    """Run a job under the fake clock, failing every run at once, until it is dead; returns
    its scheduled-retry events."""
    c = claim(conn, "w", job_id)
    while True:
        fail(conn, c, "w")
        if state(conn, job_id) == "dead":
            return rows(conn, "scheduled-retry", job_id)
        run_at = job(conn, job_id).run_at
        fake.set(clock.seconds_between(T(0), run_at))
        c = claim(conn, "w", job_id)


def test_per_job_backoff_base_and_max_retries(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "j", "--backoff-base", "3", "--max-retries", "1", "-c", "false")
    assert (job(conn, "j").backoff_base, job(conn, "j").max_retries) == (3, 1)
    c = claim(conn, "w", "j")
    fake.set(1)
    fail(conn, c, "w")
    (retry,) = rows(conn, "scheduled-retry", "j")
    assert (retry["attempt"], retry["delay"], retry["run_at"]) == (1, 3, T(4))
    assert (state(conn, "j"), job(conn, "j").run_at) == ("failed", T(4))
    fake.set(3.99)
    claim(conn, "w", None)
    fake.set(4)
    c = claim(conn, "w", "j")
    fail(conn, c, "w")
    (dead,) = rows(conn, "dead", "j")
    assert dead["attempts"] == 2 and state(conn, "j") == "dead"


def test_default_policy_without_jitter_is_exactly_base_to_the_k(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "j", "-c", "false")  # config defaults: 3 retries, base 2, no jitter
    retries = _fail_until_dead(conn, fake, "j")
    assert [r["delay"] for r in retries] == [2, 4, 8]
    assert all(r["run_at"] == clock.after(r["at"], r["delay"]) for r in retries)


def test_backoff_max_caps_each_delay(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    added(run, "--id", "before", "--backoff-base", "10", "--max-retries", "1", "-c", "false")
    assert ok(run, "config", "set", "backoff-max", "2") == \
        "Configuration updated: backoff-max = 2\nRetry delays will be capped at 2s\n"
    added(run, "--id", "capped", "--backoff-base", "10", "--max-retries", "2", "-c", "false")
    assert job(conn, "capped").backoff_max == 2
    assert [r["delay"] for r in _fail_until_dead(conn, fake, "before")] == [10]
    assert [r["delay"] for r in _fail_until_dead(conn, fake, "capped")] == [2, 2]
    assert ok(run, "config", "set", "backoff-max", "0") == \
        "Configuration updated: backoff-max = 0\nRetry delays will not be capped\n"


def test_backoff_jitter_is_recorded_and_replay_reuses_it(run, conn, monkeypatch):
    fake = FakeClock(monkeypatch)
    ok(run, "config", "set", "backoff-jitter", "0.5")
    ids = [added(run, "--id", f"j{i}", "--max-retries", "3", "-c", "false") for i in range(10)]
    retries = [r for job_id in ids for r in _fail_until_dead(conn, fake, job_id)]
    assert len(retries) == 30
    for r in retries:
        k = r["attempt"]
        assert 2**k * 0.5 <= r["delay"] <= 2**k, r
        # The gap the job actually waited is exactly the recorded delay.
        assert r["run_at"] == clock.after(r["at"], r["delay"])
        assert clock.seconds_between(r["at"], r["run_at"]) == pytest.approx(r["delay"], abs=1e-6)
        claimed = [c for c in rows(conn, "claimed", r["job_id"]) if c["attempt"] == k + 1]
        assert claimed[0]["at"] == r["run_at"]  # the fake clock jumped right to it
    assert len({r["delay"] for r in retries if r["attempt"] == 1}) > 1  # really random

    # The failed state's run_at comes from the event; replay must never draw again.
    added(run, "--id", "waiting-out", "--max-retries", "3", "-c", "false")
    fail(conn, claim(conn, "w", "waiting-out"), "w")
    recorded = rows(conn, "scheduled-retry", "waiting-out")[0]["run_at"]
    assert job(conn, "waiting-out").run_at == recorded
    before = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()

    def no_random() -> float:
        raise AssertionError("replay drew a random number")

    monkeypatch.setattr(random, "random", no_random)
    ledger.rebuild(conn)
    assert conn.execute("SELECT * FROM jobs ORDER BY id").fetchall() == before
    assert job(conn, "waiting-out").run_at == recorded
