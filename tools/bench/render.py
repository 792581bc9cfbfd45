"""The markdown table of a run, and the lines around it."""

from __future__ import annotations

import math
from typing import Any

from queuectl.store.postgres import without_password

from .rows import LEAST_PYTHON, NO_PYTHON, Row, ScenarioResult


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if unit in ("jobs/s", "events/s"):
        text = f"{x:,.0f}"
    elif abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 10:
        text = f"{x:.1f}"
    else:
        text = f"{x:.2f}"
    return f"{text} {unit}".strip()


def markdown(rows: list[Row], results: dict[str, ScenarioResult]) -> str:
    lines = [
        "| figure | value | baseline (same run) | ratio | target | pass/fail |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        unit = row.unit if row.unit != "modules" else ""
        if row.key == "enqueue_heavy_imports":
            value = row.note
        elif row.status == "n/a":
            value = row.note
        else:
            value = fmt(row.value, unit)
        baseline = (f"{fmt(row.baseline, row.unit)} ({row.baseline_label})"
                    if row.baseline is not None else (row.baseline_label or "-"))
        ratio = ratio_text(row.ratio, row) if row.ratio is not None else "-"
        verdict = {"pass": "pass", "fail": "**FAIL**", "bound": "**FAIL**, bound", "info": "info",
                   "n/a": "n/a", "error": "error"}[row.status]
        if row.ceiling is not None and row.status in ("fail", "bound"):
            shown = (ratio_text(row.ceiling, row) if row.target_on == "ratio"
                     else fmt(row.ceiling, row.unit))
            verdict += f" (with {row.ceiling_means}: {shown})"
        lines.append(f"| {row.figure} | {value} | {baseline} | {ratio} | {row.target or '-'} "
                     f"| {verdict} |")
    for name, res in results.items():
        if not res.ok:
            lines.append(f"| {name} | error: {res.error} | - | - | - | error |")
    return "\n".join(lines + summary(rows))


def ratio_text(x: float, row: Row) -> str:
    """``x`` as a ratio, ``0.62x``; against a ratio target, with as many more decimals as it
    takes not to print the target's own bar for a figure that is not on it (``<= 1.02x``
    missed at 1.0213 reads ``1.021x``, not ``1.02x``)."""
    bar = row.target_limit if row.target_on == "ratio" else None
    for digits in (2, 3, 4):
        text = f"{x:.{digits}f}"
        if bar is None or x == bar or float(text) != bar:
            break
    return f"{text}x"


def summary(rows: list[Row]) -> list[str]:
    """Below the table: how many targets were missed, and which of them no change to
    queuectl's Python could meet on this machine (the same work without it missed too)."""
    missed = [r for r in rows if r.status in ("fail", "bound")]
    if not missed:
        return []
    bound = [r for r in missed if r.status == "bound"]
    if not bound:
        return ["", f"{len(missed)} target{'s' if len(missed) != 1 else ''} missed; none bound."]
    ways = []
    for means, how in ((NO_PYTHON, "with no queuectl Python at all"),
                       (LEAST_PYTHON, "with the least Python it needs")):
        labels = sorted({r.ceiling_label for r in bound if r.ceiling_means == means})
        if labels:
            ways.append(f"{how} (its {', '.join(labels)})")
    text = (f"{len(missed)} target{'s' if len(missed) != 1 else ''} missed; "
            f"{len(bound)} of them bound: the same work {', or '.join(ways)} missed "
            f"{'it' if len(bound) == 1 else 'them'} too in this run ("
            f"{', '.join(r.key for r in bound)}).")
    return ["", text]


def text_report(rows: list[Row], results: dict[str, ScenarioResult], meta: dict[str, Any],
                elapsed: float, pg_admin: str) -> str:
    """The table, with the backend above it and how it was measured below."""
    server, code = meta["postgresql"], meta["code"]
    lines = []
    if server:
        lines += [f"Backend: PostgreSQL {server} (a fresh database per run on "
                  f"{without_password(pg_admin)}).", ""]
    stores = (f"PostgreSQL {server} (SQLite {meta['sqlite']} beside it)" if server
              else f"SQLite {meta['sqlite']}")
    lines += [
        markdown(rows, results), "",
        f"Medians of {meta['runs']} runs (latency: percentiles over all samples; start-up and "
        f"reads: {meta['sizes']['cli_reps_per_run']} invocations per run); ratios are medians "
        f"of per-run ratios against the baseline run beside them. `{meta['command']}` took "
        f"{elapsed:.0f} s on {meta['cpus']} CPUs, Python {meta['python']}, {stores}; "
        f"code {code['git']}, sources {code['fingerprint']}, bytecode {meta['bytecode']}.",
    ]
    if code["changed_during_run"]:
        lines.append("WARNING: queuectl's sources changed during this run: the figures mix "
                     "code versions; run again on a quiet tree.")
    return "\n".join(lines)
