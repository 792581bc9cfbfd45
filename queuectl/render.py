"""Turning core results into what people and scripts read: rich tables, seed-style lines, JSON.

Commands and job output are user text: they are always passed to rich as ``Text`` (never as
markup) and control characters are shown escaped, so a job can't restyle or drive the terminal.
rich is imported only by the functions that draw tables.
"""

from __future__ import annotations

from typing import Any

import msgspec

from queuectl import clock
from queuectl import events as ev

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def safe(text: str | None) -> str:
    """User text with every control character escaped (``\\x1b``, ``\\n``...)."""
    return (text or "").translate(_CONTROL)


def to_json(data: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def _table(title: str, columns: list[str], rows: list[list[Any]], wide: set[str] = set()) -> None:
    """A table of user text; only the ``wide`` columns (commands, errors) may wrap."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for name in columns:
        if name in wide:
            table.add_column(name, overflow="fold", ratio=1, min_width=len(name))
        else:
            table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*(Text(safe(str(cell))) for cell in row))
    _console().print(table)


# -- jobs ---------------------------------------------------------------------------------

JOB_JSON_FIELDS = (
    "id", "command", "state", "attempts", "max_retries", "backoff_base", "timeout",
    "run_at", "exit_code", "last_error", "created_at", "updated_at",
)


def job_json(job: dict[str, Any]) -> dict[str, Any]:
    return {key: job[key] for key in JOB_JSON_FIELDS}


def jobs_table(jobs: list[dict[str, Any]], title: str) -> None:
    if not jobs:
        print(f"{title}: no jobs")
        return
    waiting = any(j["state"] == "failed" for j in jobs)
    columns = ["ID", "State", "Attempts", "Max retries", "Command", "Updated (UTC)"]
    if waiting:
        columns.append("Retry at")
    rows = []
    for j in jobs:
        row = [j["id"], j["state"], j["attempts"], j["max_retries"], j["command"],
               clock.human(j["updated_at"])]
        if waiting:
            row.append(clock.human(j["run_at"]) if j["state"] == "failed" else "")
        rows.append(row)
    _table(title, columns, rows, wide={"Command"})


def dlq_table(jobs: list[dict[str, Any]]) -> None:
    if not jobs:
        print("Dead letter queue is empty")
        return
    rows = [
        [j["id"], j["command"], j["attempts"], j["max_retries"], j["last_error"] or "",
         clock.human(j["updated_at"])]
        for j in jobs
    ]
    columns = ["ID", "Command", "Attempts", "Max retries", "Last error", "Updated (UTC)"]
    _table("Dead letter queue", columns, rows, wide={"Command", "Last error"})


def status(counts: dict[str, int], workers: list[dict[str, Any]], stale_before: str) -> None:
    from rich.text import Text

    console = _console()
    line = "  ".join(f"{state}: {n}" for state, n in counts.items())
    console.print(Text(f"Jobs  {line}  (total: {sum(counts.values())})"))
    if not workers:
        print("Workers: none active")
        return
    rows = [
        [
            w["id"],
            worker_state(w, stale_before),
            w["pid"],
            w["current_job"] or "-",
            w["jobs_done"],
            clock.human(w["last_heartbeat"]),
        ]
        for w in workers
    ]
    _table("Workers", ["Worker", "State", "PID", "Job", "Done", "Heartbeat"], rows)


def worker_state(worker: dict[str, Any], stale_before: str) -> str:
    """``active`` workers whose heartbeat is older than the lease timeout show as ``silent``."""
    if worker["state"] == "active" and worker["last_heartbeat"] < stale_before:
        return "silent"
    return str(worker["state"])


# -- history ------------------------------------------------------------------------------


def event_details(event: ev.Event) -> str:
    """One line saying what an event recorded, for ``history``."""
    match event:
        case ev.Enqueued(command=c, max_retries=m, backoff_base=b, timeout=t):
            limit = f", timeout {t:g}s" if t else ""
            return f"command: {c} (max_retries {m}, backoff_base {b:g}{limit})"
        case ev.Claimed(attempt=a):
            return f"attempt {a}"
        case ev.Completed(attempt=a, duration=d, output=o):
            return f"attempt {a} succeeded in {d:.3f}s" + (f"; output: {o.strip()}" if o else "")
        case ev.Failed(attempt=a, error=e, duration=d, output=o):
            return f"attempt {a}: {e} after {d:.3f}s" + (f"; output: {o.strip()}" if o else "")
        case ev.TimedOut(attempt=a, timeout=t):
            return f"attempt {a} killed after its {t:g}s timeout"
        case ev.LeaseExpired(attempt=a, worker_id=w, last_heartbeat=h):
            return f"attempt {a}: worker {w} silent since {clock.human(h)}"
        case ev.Released(attempt=a, reason=r):
            return f"attempt {a} abandoned: {r}"
        case ev.ScheduledRetry(delay=d, run_at=r):
            return f"retry in {d:g}s, at {clock.human(r)}"
        case ev.Dead(attempts=a, reason=r):
            return f"moved to the DLQ after {a} attempts: {r}"
        case ev.Requeued(max_retries=m):
            return f"requeued from the DLQ with max_retries {m}"
    return ""


def history_json(rows: list[tuple[int, str, ev.Event]]) -> list[dict[str, Any]]:
    return [
        {"seq": seq, "at": at, "type": event.type, **msgspec.structs.asdict(event)}
        for seq, at, event in rows
    ]


def history_table(job_id: str, rows: list[tuple[int, str, ev.Event]]) -> None:
    table_rows = [
        [seq, at.replace("T", " ").rstrip("Z")[:23], event.type,
         getattr(event, "worker_id", "") or "", event_details(event)]
        for seq, at, event in rows
    ]
    columns = ["Seq", "Time (UTC)", "Event", "Worker", "Details"]
    _table(f"History of job {job_id}", columns, table_rows, wide={"Details"})
