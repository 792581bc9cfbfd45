"""The command line: which scenarios run, on which store, and the report they make."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from queuectl.store.postgres import without_password

from . import ROOT
from . import __doc__ as OVERVIEW
from .context import FULL, PG_ADMIN, QUICK, Context, Sizes, pg_execute
from .render import text_report
from .rows import Row, ScenarioResult
from .scenarios import BENCHES, PG_BENCHES, SCENARIOS

BACKENDS = ("sqlite", "postgres")


def ensure_bytecode() -> None:
    """Compile queuectl's modules once, as ``pip install`` does for an installed package.

    An editable checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every
    module at every start-up, a cost that no installed copy pays; the floor's own modules
    (click, msgspec) are precompiled by pip. Writes ``__pycache__``
    beside the sources (git ignores it).
    """
    import compileall

    for package in ("queuectl", "projections"):
        compileall.compile_dir(ROOT / package, quiet=2)  # queuectl/store too


def code_fingerprint() -> str:
    """A hash of the queuectl and projections sources this run measures."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("queuectl/*.py"), *ROOT.glob("projections/*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "queuectl", "projections"],
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (uncommitted changes)' if dirty else ''}"


def pg_server(admin: str) -> str:
    """The server's version, or ``error: ...`` saying why it cannot be used."""
    shown = without_password(admin)
    try:
        ((version,),) = pg_execute(admin, "SHOW server_version")
    except ImportError:
        return "error: --backend postgres needs psycopg (pip install -e '.[postgres]')"
    except Exception as exc:
        return f"error: cannot reach PostgreSQL at {shown}: {' '.join(str(exc).split())}"
    return str(version).split()[0]


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind, so temporary databases and children are cleaned up


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=OVERVIEW.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite",
                        help="the store the scenarios run on (default sqlite)")
    parser.add_argument("--pg-admin", metavar="URL",
                        default=os.environ.get("QUEUECTL_BENCH_PG", PG_ADMIN),
                        help="--backend postgres: a URL of the server, whose user may create "
                             "databases (default $QUEUECTL_BENCH_PG, else %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 2 runs: a smoke run under a minute")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, quick 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="also write the JSON document to FILE")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("QUEUECTL_BENCH_CACHE",
                                                    "/tmp/queuectl-bench-cache")),
                        help="where the big replay ledger is cached")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not precompile queuectl's bytecode first (measure cold compiles)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary databases")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser


def run_scenarios(ctx: Context, chosen: tuple[str, ...], backend: str
                  ) -> tuple[list[Row], dict[str, ScenarioResult]]:
    """Each chosen scenario in turn, on its own: one that fails records its error."""
    benches = PG_BENCHES if backend == "postgres" else BENCHES
    rows: list[Row] = []
    results: dict[str, ScenarioResult] = {}
    for name in SCENARIOS:
        if name not in chosen:
            continue
        result = results[name] = ScenarioResult(name)
        ctx.log(f"scenario {name} ...")
        t0 = time.perf_counter()
        try:
            rows += benches[name](ctx, result)
            result.ok = True
        except Exception as exc:  # one broken scenario must not hide the others
            result.error = f"{type(exc).__name__}: {exc}"
            result.details["traceback"] = traceback.format_exc()
            ctx.log(f"scenario {name} FAILED: {result.error}")
        result.seconds = round(time.perf_counter() - t0, 2)
        ctx.log(f"scenario {name} took {result.seconds:.1f} s")
    return rows, results


def run_meta(args: argparse.Namespace, command: str, runs: int, sizes: Sizes, elapsed: float,
             server: str | None, fingerprint: str, changed: bool) -> dict[str, Any]:
    """What was measured, how, and on what: the JSON document's ``meta``."""
    return {
        "command": command,
        "backend": args.backend,
        "code": {"root": str(ROOT), "git": git_describe(), "fingerprint": fingerprint,
                 "changed_during_run": changed},
        "bytecode": "cold (--no-compile)" if args.no_compile else "precompiled",
        "quick": args.quick,
        "runs": runs,
        "sizes": asdict(sizes),
        "seconds": round(elapsed, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": server,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    chosen = SCENARIOS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    runs = args.runs or (2 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    sizes = QUICK if args.quick else FULL
    server = pg_server(args.pg_admin) if args.backend == "postgres" else None
    if server and server.startswith("error: "):
        parser.exit(2, f"bench: {server[len('error: '):]}\n")
    signal.signal(signal.SIGTERM, _terminate)
    if not args.no_compile:
        ensure_bytecode()
    fingerprint = code_fingerprint()
    save = args.save.resolve() if args.save else None
    ctx = Context(sizes, runs, args.cache_dir.resolve(), args.quiet, args.backend,
                  args.pg_admin)
    # Every command runs in the run's own directory, wherever the bench was started: a job
    # takes its enqueuer's directory as its own, and the length of that path moved a bulk
    # enqueue's figures by a fifth before long appends held their pages (SQLite's page
    # cache); and `python -m queuectl` started in another checkout imports that one's code,
    # not ROOT's.
    home = os.getcwd()
    os.chdir(ctx.tmp)
    started = time.perf_counter()
    try:
        rows, results = run_scenarios(ctx, chosen, args.backend)
    finally:
        os.chdir(home)
        ctx.close(keep=args.keep_tmp)
    elapsed = time.perf_counter() - started
    changed = code_fingerprint() != fingerprint
    if changed:
        ctx.log("WARNING: queuectl's sources changed during the run; figures mix versions")

    command = shlex.join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])])
    meta = run_meta(args, command, runs, sizes, elapsed, server, fingerprint, changed)
    document = json.dumps({
        "meta": meta,
        "scenarios": {n: asdict(r) for n, r in results.items()},
        "rows": [asdict(r) for r in rows],
    }, indent=2, default=str)
    if save:
        save.write_text(document + "\n")
    print(document if args.json else text_report(rows, results, meta, elapsed, args.pg_admin))
    failed = any(not r.ok for r in results.values())
    missed = any(r.status in ("fail", "bound") for r in rows)
    return 1 if failed or (args.strict and missed) else 0
