"""The benchmark suite runs: every scenario of ``tools/bench.py --quick`` produces numbers.

Speed is not asserted here (CI machines vary); only that each figure was measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stores("sqlite")  # no store of its own to test

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"
SCENARIOS = {"worker", "cycle", "latency", "startup", "bulk", "replay", "reads", "memory"}


@pytest.mark.slow
def test_quick_bench_measures_every_scenario(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "--quiet",
         "--cache-dir", str(tmp_path / "bench-cache")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)

    scenarios = report["scenarios"]
    assert set(scenarios) == SCENARIOS
    for name, result in scenarios.items():
        assert result["ok"], f"{name}: {result['error']}"

    rows = report["rows"]
    assert {row["scenario"] for row in rows} == SCENARIOS
    for row in rows:
        if row["status"] == "n/a":  # the huey peer, when huey is not installed
            assert row["key"] == "worker_vs_huey"
            continue
        assert row["status"] in ("pass", "fail", "info"), row
        assert isinstance(row["value"], int | float) and math.isfinite(row["value"]), row
        assert row["samples"], row
        if row["baseline_samples"]:
            assert isinstance(row["ratio"], int | float) and math.isfinite(row["ratio"]), row
