"""startup: CLI start-up, ``queuectl enqueue -c true`` (the console script pip writes, and
``python -m queuectl`` beside it) against ``python -c "import click, msgspec, sqlite3"``;
whether rich / sqlite_utils load on that path; a shell completion of job ids (``queuectl
show <Tab>``), wall time; and, for scale, one call of the command-line queues task-spooler
(``tsp true``) and nq (``nq true``), each on a queue of its own."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from queuectl import ledger

from ..context import Context
from ..measure import FLOOR_CODE, instructions, measure_floor, run_timed
from ..peers import nq_queue, task_spooler
from ..rows import Row, ScenarioResult, Target, make_row, median


def import_report(ctx: Context, db: Path) -> tuple[list[str], list[tuple[str, float]]]:
    """Heavy modules the enqueue path loads, and its slowest imports (cumulative ms)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *ctx.queuectl(db, "enqueue", "-c", "true")[1:]],
        env=ctx.env_for(db), capture_output=True, text=True, check=True,
    )
    loaded: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                loaded[name.strip()] = int(cumulative) / 1000
    heavy = sorted(
        {name.split(".")[0] for name in loaded} & {"rich", "sqlite_utils"}
    )
    top = sorted(loaded.items(), key=lambda kv: -kv[1])[:12]
    return heavy, top


# Each peer: its command, its Debian package, how its queue of this run's own is set up,
# and what its figure says.
ONE_CALL_PEERS = (
    ("tsp", "task-spooler", task_spooler, "task-spooler `tsp true` wall (its server running)"),
    ("nq", "nq", nq_queue, "nq `nq true` wall"),
)


def peer_rows(walls: dict[str, list[float]], floor: list[float]) -> list[Row]:
    """One info row a peer: its one-call wall beside the floor, or n/a where it is not
    installed (no samples)."""
    rows = []
    for command, package, _, figure in ONE_CALL_PEERS:
        if command not in walls:
            rows.append(Row(scenario="startup", key=f"{command}_wall", figure=figure, value=None,
                            unit="ms", status="n/a",
                            note=f"n/a: `{command}` not installed (Debian package {package})"))
            continue
        rows.append(make_row("startup", f"{command}_wall", figure, walls[command], "ms", None,
                             baseline_samples=floor,
                             baseline_label=f'`python -c "{FLOOR_CODE}"`',
                             note="a compiled peer: no interpreter to start"))
    return rows


def instructions_row(counted: float | None, floor: float | None) -> Row:
    """The enqueue's instructions against the floor's: the same figure run after run, where
    the wall ratio moves by several percent (n/a without valgrind)."""
    figure = "`queuectl enqueue -c true` instructions (callgrind)"
    if counted is None or floor is None:
        return Row(scenario="startup", key="enqueue_instructions", figure=figure, value=None,
                   unit="M", status="n/a", note="n/a: valgrind not installed")
    return make_row("startup", "enqueue_instructions", figure, [counted], "M", None,
                    baseline_samples=[floor], baseline_label=f'`python -c "{FLOOR_CODE}"`',
                    note="one run each, hash seed 0: the count does not depend on the machine's load")


# What any completion of job ids in Python needs: click's completion, and the store's
# module to read the ids. The completion's ceiling with no queuectl Python.
COMPLETION_FLOOR = "import click, sqlite3"


def bench_startup(ctx: Context, result: ScenarioResult) -> list[Row]:
    floor, wall, wall_m, completion = [], [], [], []
    bare: list[float] = []  # an interpreter with only what a completion needs
    with ctx.fresh_db("startup") as db, ExitStack() as peers:
        ledger.connect(db).close()
        enqueue_cmd = ctx.console_script(db, "enqueue", "-c", "true")
        enqueue_m = ctx.queuectl(db, "enqueue", "-c", "true")  # as earlier passes measured it
        # What bash runs on a Tab after `queuectl show `: the ids come from the database.
        complete_cmd = [sys.executable, "-m", "queuectl"]
        complete_env = ctx.env_for(db, _QUEUECTL_COMPLETE="bash_complete",
                                   COMP_WORDS="queuectl show ", COMP_CWORD="2")
        peer_env = {command: env for command, _, setup, _ in ONE_CALL_PEERS
                    if (env := peers.enter_context(setup(ctx))) is not None}
        peer_wall: dict[str, list[float]] = {command: [] for command in peer_env}
        measure_floor(ctx)  # warm the page cache for all of them (and start tsp's server)
        run_timed(ctx, enqueue_cmd, db)
        run_timed(ctx, enqueue_m, db)
        for command, env in peer_env.items():
            run_timed(ctx, [command, "true"], env=env)
        for _ in range(ctx.runs * ctx.sizes.cli_reps_per_run):
            floor.append(measure_floor(ctx))
            wall.append(run_timed(ctx, enqueue_cmd, db) * 1000)
            wall_m.append(run_timed(ctx, enqueue_m, db) * 1000)
            completion.append(run_timed(ctx, complete_cmd, env=complete_env) * 1000)
            bare.append(measure_floor(ctx, COMPLETION_FLOOR))
            for command, env in peer_env.items():
                peer_wall[command].append(run_timed(ctx, [command, "true"], env=env) * 1000)
        heavy, top = import_report(ctx, db)
        counted = instructions(ctx, enqueue_cmd, db)
        floor_counted = instructions(ctx, [sys.executable, "-c", FLOOR_CODE])
    ctx.floor_ms.extend(floor)
    ctx.log(f"startup: enqueue {median(wall):.1f} ms, completion {median(completion):.1f} ms, "
            f"floor {median(floor):.1f} ms, heavy imports: {heavy or 'none'}"
            + "".join(f"; {command} true {median(w):.1f} ms" for command, w in peer_wall.items()))
    result.details["slowest_imports_ms"] = top
    heavy_row = make_row(
        "startup", "enqueue_heavy_imports", "rich / sqlite_utils imported by `enqueue`",
        [float(len(heavy))], "modules", Target("none", "value", "<=", 0),
        note=", ".join(heavy) if heavy else "neither is imported")
    return [
        make_row("startup", "enqueue_wall", "`queuectl enqueue -c true` wall", wall, "ms",
                 Target("<= 1.05 x import floor", "ratio", "<=", 1.05),
                 baseline_samples=floor, baseline_label=f'`python -c "{FLOOR_CODE}"`'),
        make_row("startup", "enqueue_wall_m", "`python -m queuectl enqueue -c true` wall",
                 wall_m, "ms", None, baseline_samples=floor,
                 baseline_label=f'`python -c "{FLOOR_CODE}"`',
                 note="the same command through runpy, as the third pass measured it"),
        instructions_row(counted, floor_counted),
        heavy_row,
        make_row("startup", "complete_wall", "`queuectl show <Tab>` (bash completion of job "
                 "ids) wall", completion, "ms", Target("<= 100 ms", "value", "<=", 100),
                 baseline_samples=floor, baseline_label=f'`python -c "{FLOOR_CODE}"`',
                 note="on PostgreSQL importing psycopg alone takes about 100 ms more",
                 ceiling_samples=bare,
                 ceiling_label="interpreter importing only click and sqlite3"),
        *peer_rows(peer_wall, floor),
    ]
