"""The scenarios, one module each, in the order they run; on PostgreSQL the worker is its
own, and the scenarios measured on SQLite only give one n/a row each."""

from __future__ import annotations

from collections.abc import Callable

from ..context import Context
from ..rows import Row, ScenarioResult
from .api import bench_api
from .bulk import bench_bulk
from .cycle import bench_cycle
from .dashboard import bench_dashboard
from .latency import bench_latency
from .memory import bench_memory
from .metrics import bench_metrics
from .output import bench_output
from .progress import bench_progress
from .prune import bench_prune
from .reads import bench_reads
from .replay import bench_replay
from .scaling import bench_scaling
from .startup import bench_startup
from .worker import bench_pg_worker, bench_worker

SCENARIOS = ("worker", "scaling", "cycle", "latency", "startup", "bulk", "replay", "reads",
             "dashboard", "memory", "prune", "api", "progress", "output", "metrics")
# What a postgres run leaves out, and why: one n/a row each.
PG_SKIPPED = {
    "startup": "`enqueue -c true` start-up against the import floor",
    "replay": "`ledger.rebuild` of the replay ledger",
    "memory": "worker peak RSS, `-c 4`",
}


def skipped_on_pg(name: str) -> Callable[[Context, ScenarioResult], list[Row]]:
    def bench(ctx: Context, result: ScenarioResult) -> list[Row]:
        return [Row(scenario=name, key=f"{name}_skipped", figure=PG_SKIPPED[name], value=None,
                    unit="", status="n/a", note="n/a: measured on SQLite only")]

    return bench


BENCHES: dict[str, Callable[[Context, ScenarioResult], list[Row]]] = {
    "worker": bench_worker,
    "scaling": bench_scaling,
    "cycle": bench_cycle,
    "latency": bench_latency,
    "startup": bench_startup,
    "bulk": bench_bulk,
    "replay": bench_replay,
    "reads": bench_reads,
    "dashboard": bench_dashboard,
    "memory": bench_memory,
    "prune": bench_prune,
    "api": bench_api,
    "progress": bench_progress,
    "output": bench_output,
    "metrics": bench_metrics,
}
# scaling, cycle, latency, bulk, reads, dashboard, prune, api, progress, output and metrics run
# the same code on either store (``ctx.backend``).
PG_BENCHES = {**BENCHES, "worker": bench_pg_worker,
              **{name: skipped_on_pg(name) for name in PG_SKIPPED}}
