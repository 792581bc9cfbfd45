"""queuectl's benchmark suite: every figure of the performance issue, against its target.

    python tools/bench.py [--backend sqlite|postgres] [--quick] [--runs N] [--json]
                          [--only NAME,...] [--save FILE] [--strict]
    python -m tools.bench ...      the same, with the checkout's root on the path

Scenarios (``--only`` takes these names), each a module of ``scenarios/`` whose docstring says
what it measures: worker, scaling, cycle, latency, startup, bulk, replay, reads, dashboard,
memory, prune, api, progress, output, metrics.

Every figure is the median of several runs (``--runs``, default 5; ``--quick``: 2 runs and
small sizes, a smoke run). Ratios are taken against a baseline measured in the same run,
interleaved with the figure itself, because the machine is shared and noisy. Every scenario
uses its own fresh temporary database; the big replay ledger is built once and cached under
``$QUEUECTL_BENCH_CACHE`` (default ``/tmp/queuectl-bench-cache``), keyed by its size and by the
event/ledger code that shapes its rows.

``--backend postgres`` runs worker, scaling, cycle, latency, bulk, reads, prune, api, progress,
output, metrics and dashboard on PostgreSQL instead (startup, replay and memory give one n/a
row each): each run gets a fresh database ``queuectl_bench_<random>`` on the server
``--pg-admin`` (or ``$QUEUECTL_BENCH_PG``) names, dropped afterwards. Its worker is compared
with the SQLite worker, run beside it, and with procrastinate (a PostgreSQL job queue,
``pip install .[bench]``). The reads ledger is the replay ledger imported once and kept on the
server as a template database, keyed like the SQLite one.

Output: a markdown table on stdout (``--json``: one JSON document instead); progress on stderr.
Exit status 1 when a scenario could not run (or, with ``--strict``, when a target is missed).

The package: ``runner`` (the command line), ``scenarios`` (one module each), ``context`` (a
run's sizes, temporary databases and child processes), ``rows`` (figures against targets),
``measure`` (timing a command, the start-up floor), ``stores`` (the bench's own reads and
writes), ``ledgers`` (the cached replay ledger), ``peers`` (huey, procrastinate, task-spooler
and nq, set up as their users would) and ``render`` (the table).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bench the checkout this package lives in
