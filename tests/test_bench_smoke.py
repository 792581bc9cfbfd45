"""The benchmark suite runs: every scenario of ``tools/bench.py --quick --runs 1`` produces numbers, on
SQLite and on PostgreSQL.

Speed is not asserted here (CI machines vary); only that each figure was measured.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_ADMIN, _pg_admin

pytestmark = pytest.mark.stores("sqlite")  # no store of its own to test: run once

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "tools" / "bench.py"  # a launcher for the package tools/bench/ beside it
SCENARIOS = {"worker", "scaling", "cycle", "latency", "startup", "bulk", "replay", "reads",
             "dashboard", "memory", "prune", "api", "progress", "output", "metrics"}
PG_SKIPPED = {"startup", "replay", "memory"}  # one n/a row each on PostgreSQL
HUEY_ROWS = {"worker_vs_huey", "api_enqueue_vs_huey"}  # n/a where huey is not installed
CLI_PEER_ROWS = {"tsp_wall", "nq_wall"}  # n/a where task-spooler or nq is not installed
# Targets measured beside the same work with no queuectl Python (a "bound" when it misses too)
CEILINGED = {"worker_vs_spawn", "worker_vs_huey", "pg_worker_vs_sqlite", "api_enqueue_vs_huey",
             "api_enqueue_vs_commit", "ledger_cycle", "ledger_cycle_batched", "bulk_enqueue",
             "scaling_eight_vs_two", "replay", "complete_wall"}
# Rows every run measures on both stores, beside the targets they explain
EXPLAINING = {"scaling_eight_alone", "scaling_eight_launched_alone", "scaling_eight_first_claim",
              "scaling_eight_floors", "api_statements_vs_commit"}
# n/a where valgrind is not installed (it is on every machine of this project's kind)
COUNTED_ROWS = {"enqueue_instructions"} if shutil.which("valgrind") is None else set()


def quick_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--runs", "1", "--json", "--quiet",
         "--cache-dir", str(tmp_path / "bench-cache"), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    assert set(report["scenarios"]) == SCENARIOS
    for name, result in report["scenarios"].items():
        assert result["ok"], f"{name}: {result['error']}"
    assert {row["scenario"] for row in report["rows"]} == SCENARIOS
    return report


def assert_measured(row: dict[str, Any]) -> None:
    assert row["status"] in ("pass", "fail", "bound", "info"), row
    if row["key"] in CEILINGED and row["status"] != "info":
        assert isinstance(row["ceiling"], int | float) and math.isfinite(row["ceiling"]), row
    if row["status"] == "bound":
        assert row["key"] in CEILINGED, row
    assert isinstance(row["value"], int | float) and math.isfinite(row["value"]), row
    assert row["samples"], row
    if row["baseline_samples"]:
        assert isinstance(row["ratio"], int | float) and math.isfinite(row["ratio"]), row


def _bench_package() -> Any:
    sys.path.insert(0, str(ROOT))
    try:
        from tools.bench import measure, render, rows
    finally:
        sys.path.remove(str(ROOT))
    return rows, render, measure


def test_durable_commits_are_timed_once_the_wal_has_wrapped(tmp_path: Path) -> None:
    """A fresh WAL grows with each commit until its first checkpoint, and a durable commit
    that lengthens the file costs about twice one that does not: the bench times commits
    only once the WAL has wrapped. PostgreSQL recycles its WAL: nothing to wait for."""
    measure = _bench_package()[2]
    db = tmp_path / "t.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (x INTEGER)")
    wal = Path(f"{db}-wal")
    calls = measure.until_wal_wraps(lambda: conn.execute("INSERT INTO t VALUES (1)"), db)
    # one page a commit, and SQLite's first checkpoint comes at 1,000 pages
    assert 1000 <= calls <= 1000 + 3 * measure.WARM_CHUNK
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (calls,)
    size = wal.stat().st_size
    for _ in range(300):
        conn.execute("INSERT INTO t VALUES (2)")
    assert wal.stat().st_size == size  # the commits that follow overwrite it
    conn.close()

    def never() -> None:
        raise AssertionError("called on PostgreSQL")

    assert measure.until_wal_wraps(never, "postgresql://localhost/x") == 0


def test_pgbench_sends_the_recorded_enqueue_with_the_next_seq_each_time() -> None:
    """On PostgreSQL, ``Queue.enqueue``'s statements are also sent by pgbench (a client in
    C) as a ceiling: the second of two recorded calls, its one round trip as prepared, with
    the values that follow the seq a variable that steps, every other value as recorded and
    NULL as such. Another shape (another version's statements) is refused, not guessed
    at."""
    sys.path.insert(0, str(ROOT))
    try:
        from tools.bench import trace
        from tools.bench.scenarios import api
    finally:
        sys.path.remove(str(ROOT))

    class Command:
        def __init__(self, name: bytes, *values: bytes | None) -> None:
            self.name, self.values, self.text = name, list(values), None

    def call(seq: int, at: bytes) -> list[Command]:
        s = str(seq).encode()
        return [Command(b"q1", b"1", s, b"tok"), Command(b"q2", s, at, None, b"4", s)]

    recorded = trace.Trace()
    recorded.prepared = [
        "PREPARE q1 AS UPDATE queuectl_head SET seq = seq + $1 RETURNING "
        "queuectl_expect(seq, $2, $3)",
        "PREPARE q2 AS INSERT INTO jobs (seq, at, cwd, max_retries, id) VALUES ($1, $2, $3, "
        "$4, $5)"]
    recorded.steps = [call(3, b"t0"), call(4, b"t1")]
    script, given, seq = api.pgbench_script(recorded)
    assert seq == 4
    assert script.splitlines() == [
        r"\set s :s + 1", r"\startpipeline",
        "UPDATE queuectl_head SET seq = seq + :v1 RETURNING queuectl_expect(seq, :s, :v2);",
        "INSERT INTO jobs (seq, at, cwd, max_retries, id) VALUES (:s, :v3, NULL, :v4, :s);",
        r"\endpipeline"]
    # 4 retries are not the seq, though the last call's seq is 4: only what steps with it
    assert given == {"v1": "1", "v2": "tok", "v3": "t1", "v4": "4"}
    recorded.steps = [call(3, b"t0"), call(5, b"t1")]
    with pytest.raises(trace.Unfit, match="not a seq apart"):
        api.pgbench_script(recorded)
    recorded.steps = [call(3, b"t0"), [Command(b"q9", b"x")]]
    with pytest.raises(trace.Unfit):
        api.pgbench_script(recorded)
    # a call in two round trips (an older store's) would leave statements out of the script
    recorded.steps = [call(3, b"t0"), call(4, b"t1")[:1], call(4, b"t1")[1:]]
    with pytest.raises(trace.Unfit, match="3 round trips"):
        api.pgbench_script(recorded)


def test_the_least_python_worker_records_each_run_and_replays_exactly(tmp_path: Path) -> None:
    """The worker written by hand (the ceiling of the SQLite worker's targets) runs each
    job's shell in the job's directory, keeps its output and errors and its duration in
    the result, and leaves a store that replays to exactly its live tables; a job that
    does not succeed is not its work, and says so."""
    sys.path.insert(0, str(ROOT))
    try:
        from queuectl import decisions, ledger
        from tools.bench.scenarios import cycle, worker
    finally:
        sys.path.remove(str(ROOT))
    where = tmp_path / "here"
    where.mkdir()
    db = tmp_path / "least.db"
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command=f"echo {n}; pwd; echo e >&2",
                                                   cwd=str(where)) for n in range(3)])
    finally:
        conn.close()
    before = os.getcwd()
    try:
        with cycle.worker_connection(db) as conn:
            assert cycle.least_python(conn, worker.least_run()) == 3
            assert ledger.check(conn) == []
            rows = conn.execute("SELECT job_id, body FROM events WHERE type = 'completed' "
                                "ORDER BY seq").fetchall()
            runs = conn.execute("SELECT job_id, duration FROM runs ORDER BY seq").fetchall()
    finally:
        os.chdir(before)
    bodies = [json.loads(body) for _, body in rows]
    assert [b["output"] for b in bodies] == [f"{n}\n{where}\ne\n" for n in range(3)]
    assert all(b["duration"] > 0 for b in bodies)
    assert [(job, b["duration"]) for (job, _), b in zip(rows, bodies, strict=True)] == runs
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command="exit 3")])
    finally:
        conn.close()
    with cycle.worker_connection(db) as conn, pytest.raises(RuntimeError, match="status"):
        cycle.least_python(conn, worker.least_run())


def test_a_rebuild_with_its_rows_written_alone_leaves_the_same_tables(tmp_path: Path) -> None:
    """The replay's ceiling (its rows written by the store alone, in the rebuild's two
    processes and transaction) writes back exactly what a replay of the ledger makes, on
    a ledger with runs, dependencies and a worker: it replays to its projections still."""
    sys.path.insert(0, str(ROOT))
    try:
        from queuectl import decisions, ledger
        from tools.bench.scenarios import cycle, replay
    finally:
        sys.path.remove(str(ROOT))
    db = tmp_path / "rows.db"
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command="true") for _ in range(20)])
        decisions.enqueue(conn, [decisions.JobSpec(command="true", id="last", after=["1"])])
    finally:
        conn.close()
    with cycle.worker_connection(db) as conn:
        cycle.one_at_a_time(conn, True)
    conn = ledger.connect(db)
    try:
        before = replay.projection_rows(conn)
        assert len(before["runs"][1]) == 21 and before["job_deps"][1] == [("last", "1")]
        assert replay.rows_alone(conn, before) > 0
        assert replay.projection_rows(conn) == before
        assert ledger.check(conn) == []
    finally:
        conn.close()


def test_a_missed_target_whose_work_without_python_misses_too_is_bound() -> None:
    """A missed target is "bound" only when its ceiling (the same work with no queuectl
    Python, beside each run) misses it too; the table says so, and counts both kinds."""
    rows, render, _ = _bench_package()
    target = rows.Target(">= 0.65 x spawn baseline", "ratio", ">=", 0.65)
    base = [1000.0, 1000.0, 1000.0]
    bound = rows.make_row("worker", "a", "a", [500.0, 520.0, 510.0], "jobs/s", target,
                          baseline_samples=base, ceiling_samples=[600.0, 640.0, 620.0],
                          ceiling_label="statements alone")
    reachable = rows.make_row("worker", "b", "b", [500.0, 520.0, 510.0], "jobs/s", target,
                              baseline_samples=base, ceiling_samples=[700.0, 640.0, 720.0],
                              ceiling_label="statements alone")
    met = rows.make_row("worker", "c", "c", [700.0, 700.0, 700.0], "jobs/s", target,
                        baseline_samples=base, ceiling_samples=[800.0, 800.0, 800.0])
    by_value = rows.make_row("cycle", "d", "d", [4000.0], "jobs/s",
                             rows.Target(">= 8,000 jobs/s", "value", ">=", 8000),
                             ceiling_samples=[7900.0], ceiling_label="statements alone")
    assert (bound.status, bound.ceiling) == ("bound", 0.62)
    assert (reachable.status, reachable.ceiling) == ("fail", 0.7)
    assert (met.status, met.ceiling) == ("pass", 0.8)
    assert (by_value.status, by_value.ceiling) == ("bound", 7900.0)
    # a ratio whose baseline has queuectl in it too: its ceiling is a ratio of two ceilings
    eight = rows.make_row("scaling", "e", "e", [800.0], "jobs/s",
                          rows.Target(">= 0.85 x two", "ratio", ">=", 0.85),
                          baseline_samples=[1000.0], ceiling_samples=[900.0],
                          ceiling_baseline_samples=[1100.0], ceiling_label="alone")
    assert (eight.status, round(eight.ceiling, 3)) == ("bound", 0.818)
    # a ratio that misses its bar by less than the rounding says so in more decimals
    edge = rows.make_row("progress", "f", "f", [1.5659], "s",
                         rows.Target("<= 1.02x without the bar", "ratio", "<=", 1.02),
                         baseline_samples=[1.5333])
    near = rows.make_row("progress", "g", "g", [1.5600], "s",
                         rows.Target("<= 1.02x without the bar", "ratio", "<=", 1.02),
                         baseline_samples=[1.5333])
    assert (edge.status, near.status) == ("fail", "pass")
    edge_line, near_line = render.markdown([edge, near], {}).splitlines()[2:4]
    assert "| 1.021x | <= 1.02x without the bar | **FAIL** |" in edge_line
    assert "| 1.017x | <= 1.02x without the bar | pass |" in near_line
    table = render.markdown([bound, reachable, met, by_value], {}).splitlines()
    assert table[2].endswith("| **FAIL**, bound (with no queuectl Python: 0.62x) |")
    assert table[3].endswith("| **FAIL** (with no queuectl Python: 0.70x) |")
    assert table[4].endswith("| pass |")
    assert table[5].endswith("| **FAIL**, bound (with no queuectl Python: 7,900 jobs/s) |")
    assert table[-1] == ("3 targets missed; 2 of them bound: the same work with no queuectl "
                         "Python at all (its statements alone) missed them too in this run "
                         "(a, d).")
    # a ceiling that is the work with the least Python it needs, written by hand, says so
    by_hand = rows.make_row("cycle", "h", "h", [4000.0], "jobs/s",
                            rows.Target(">= 8,000 jobs/s", "value", ">=", 8000),
                            ceiling_samples=[7500.0], ceiling_label="cycle written by hand",
                            ceiling_means=rows.LEAST_PYTHON)
    assert (by_hand.status, by_hand.ceiling_means) == ("bound", "the least Python")
    table = render.markdown([bound, by_hand], {}).splitlines()
    assert table[3].endswith("| **FAIL**, bound (with the least Python: 7,500 jobs/s) |")
    assert table[-1] == ("2 targets missed; 2 of them bound: the same work with no queuectl "
                         "Python at all (its statements alone), or with the least Python it "
                         "needs (its cycle written by hand) missed them too in this run (a, h).")


@pytest.mark.parametrize("how", ["script", "module"])
def test_bench_starts_from_any_directory(tmp_path: Path, how: str) -> None:
    """The launcher and ``-m tools.bench`` both reach the package (not the launcher of the
    same name), wherever they are run from: an unknown scenario is a usage error."""
    if how == "script":
        command, env = [str(BENCH)], dict(os.environ)
    else:
        command, env = ["-m", "tools.bench"], {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *command, "--only", "nosuch"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].endswith("error: unknown scenario(s): nosuch")


@pytest.mark.slow
def test_quick_bench_measures_every_scenario(tmp_path: Path) -> None:
    report = quick_bench(tmp_path)
    assert EXPLAINING <= {row["key"] for row in report["rows"]}
    # SQLite's one-result cycle and its worker (two processes, and eight against two) are
    # also run with the least Python they need, and that is their targets' ceiling (what
    # they leave must replay exactly, or the scenario errs)
    by_key = {row["key"]: row for row in report["rows"]}
    # and so is Queue.enqueue against huey (where huey is installed)
    for target, least in (("ledger_cycle", "ledger_cycle_least_python"),
                          ("api_enqueue_vs_huey", "api_enqueue_least_python"),
                          ("worker_vs_spawn", "worker_least_python_vs_spawn"),
                          ("scaling_eight_vs_two", "scaling_eight_least_python")):
        assert by_key[least]["samples"]
        if by_key[target]["status"] in ("fail", "bound"):
            assert by_key[target]["ceiling_means"] == "the least Python"
    for row in report["rows"]:
        if row["status"] == "n/a":  # a peer that is not installed
            assert row["key"] in HUEY_ROWS | CLI_PEER_ROWS | COUNTED_ROWS
            continue
        assert_measured(row)


@pytest.mark.slow
def test_quick_bench_on_postgres_measures_its_scenarios(tmp_path: Path) -> None:
    _pg_admin().close()  # no server: skipped (failed in CI)
    report = quick_bench(tmp_path, "--backend", "postgres", "--pg-admin", PG_ADMIN)
    assert report["meta"]["backend"] == "postgres"
    assert EXPLAINING <= {row["key"] for row in report["rows"]}
    measured = set()
    for row in report["rows"]:
        if row["scenario"] in PG_SKIPPED:
            assert row["status"] == "n/a", row
            continue
        if row["status"] == "n/a":  # a peer that is not installed
            assert row["key"] in {"pg_worker_vs_procrastinate", *HUEY_ROWS}
            continue
        assert_measured(row)
        measured.add(row["scenario"])
    assert measured == SCENARIOS - PG_SKIPPED
    # where pgbench is at hand (beside every server of this project's machines), the
    # statements of Queue.enqueue are sent by it too, and judge its target against a commit
    if shutil.which("pgbench") is not None:
        by_key = {row["key"]: row for row in report["rows"]}
        assert by_key["api_statements_pgbench"]["samples"]
        assert by_key["api_statements_pgbench"]["baseline_samples"]
        if by_key["api_enqueue_vs_commit"]["status"] in ("fail", "bound"):
            assert "pgbench" in by_key["api_enqueue_vs_commit"]["ceiling_label"]
