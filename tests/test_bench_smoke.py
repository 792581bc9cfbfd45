"""The benchmark suite runs: every scenario of ``tools/bench.py --quick --runs 1`` produces numbers, on
SQLite and on PostgreSQL.

Speed is not asserted here (CI machines vary); only that each figure was measured.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
    assert row["status"] in ("pass", "fail", "info"), row
    assert isinstance(row["value"], int | float) and math.isfinite(row["value"]), row
    assert row["samples"], row
    if row["baseline_samples"]:
        assert isinstance(row["ratio"], int | float) and math.isfinite(row["ratio"]), row


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
    for row in quick_bench(tmp_path)["rows"]:
        if row["status"] == "n/a":  # a peer that is not installed
            assert row["key"] in HUEY_ROWS | CLI_PEER_ROWS | COUNTED_ROWS
            continue
        assert_measured(row)


@pytest.mark.slow
def test_quick_bench_on_postgres_measures_its_scenarios(tmp_path: Path) -> None:
    _pg_admin().close()  # no server: skipped (failed in CI)
    report = quick_bench(tmp_path, "--backend", "postgres", "--pg-admin", PG_ADMIN)
    assert report["meta"]["backend"] == "postgres"
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
