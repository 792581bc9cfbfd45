"""Turning core results into what people and scripts read: rich tables, seed-style lines, JSON.

Commands and job output are user text: they are always passed to rich as ``Text`` (never as
markup) and control characters are shown escaped, so a job can't restyle or drive the terminal.
rich is imported only by the functions that draw tables.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import msgspec

from queuectl import clock
from queuectl import events as ev

if TYPE_CHECKING:
    from queuectl.records import Job, QueueRow, Run, Stats, Worker
    from queuectl.waiting import Watch

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def safe(text: str | None) -> str:
    """User text with every control character escaped (``\\x1b``, ``\\n``...)."""
    return (text or "").translate(_CONTROL)


def to_json(data: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()


def console():  # type: ignore[no-untyped-def]
    import sys

    from rich.console import Console

    from queuectl.limits import from_env

    # COLUMNS wins where set (checked: rich would draw nothing at 0); else a terminal's own
    # width; piped output is never wrapped: a script reads each row as one line.
    width = int(from_env("COLUMNS", "columns", 0)) or (None if sys.stdout.isatty() else PIPED)
    return Console(highlight=False, soft_wrap=False, width=width)


PIPED = 100_000  # the width piped output is laid out for: as wide as its longest row


def _print(renderable: Any) -> None:
    """``renderable`` as rich draws it; piped, without the spaces that pad each line to the
    table's width (a terminal shows none of them; a file or a script would)."""
    import sys

    out = console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _table(
    title: str | None, columns: list[str], rows: list[list[Any]], wide: frozenset[str] = frozenset()
) -> None:
    """A table of user text. On a narrow terminal the ``wide`` columns (commands, errors)
    and then the others wrap; the first column (the id) never does."""
    if len(rows) > RICH_ROWS:
        return _long_table(title, columns, rows, wide)
    _print(table(title, columns, rows, wide))


def table(title: str | None, columns: list[str], rows: list[list[Any]],
          wide: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    """The rich ``Table`` that ``_table`` prints (every cell user text, made safe)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    drawn = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for n, name in enumerate(columns):
        if n == 0:
            drawn.add_column(name, no_wrap=True)
        else:
            width = max(len(name), 12) if name in wide else None
            drawn.add_column(name, overflow="fold", min_width=width)
    for row in rows:
        drawn.add_row(*(Text(_cut(safe(str(cell)))) for cell in row))
    return drawn


LONGEST_CELL = 300  # characters of one table cell; `show ID` and --json give the whole text
# rich lays out a whole table before it draws a row, at a cost per row that a long history
# makes people wait for (bench scenario reads, history_10k); past this many rows a table is
# written row by row in the same layout instead.
RICH_ROWS = 500


def _long_table(title: str | None, columns: list[str], rows: list[list[Any]],
                wide: frozenset[str]) -> None:
    """``_table``'s layout, written as it goes: columns as wide as their longest cell,
    the ``wide`` ones (then the others, never the first) folded to fit the width."""
    import sys
    import textwrap

    cells = [[_cut(safe(str(cell))) for cell in row] for row in rows]
    widths = [max([len(name)] + [len(row[n]) for row in cells]) for n, name in enumerate(columns)]
    floor = [max(len(name), 12) if name in wide else len(name) for name in columns]
    room = console().width
    order = [n for n, name in enumerate(columns) if name in wide]
    order += [n for n in range(1, len(columns)) if n not in order]
    for n in order:  # shrink the foldable columns, wide ones first, until the row fits
        excess = 1 + sum(w + 3 for w in widths) - room
        if excess <= 0:
            break
        widths[n] = max(floor[n], widths[n] - excess)

    def lines(values: list[str]) -> list[str]:
        parts = [textwrap.wrap(v, w, break_long_words=True, break_on_hyphens=False,
                               drop_whitespace=True) or [""] if len(v) > w else [v]
                 for v, w in zip(values, widths, strict=True)]
        return [" " + "".join(f" {(p[i] if i < len(p) else ''):<{w}}  "
                              for p, w in zip(parts, widths, strict=True)).rstrip()
                for i in range(max(map(len, parts)))]

    out = sys.stdout
    if title:
        out.write(f"{title}\n")
    out.write("\n" + "\n".join(lines(columns)) + "\n")
    out.write(" " + "─" * (sum(w + 3 for w in widths) - 1) + "\n")
    for row in cells:
        out.write("\n".join(lines(row)) + "\n")
    out.write("\n")


def _cut(text: str) -> str:
    """A cell no longer than LONGEST_CELL: a 200 KB command must not flood a listing."""
    if len(text) <= LONGEST_CELL:
        return text
    return f"{text[:LONGEST_CELL - 1]}… ({len(text) - LONGEST_CELL + 1:,} more characters)"


# -- jobs ---------------------------------------------------------------------------------

_TIMED = ("scheduled", "failed", "pending")
# What only show gives of a job.
_HELD = ("worker_id", "cancel_requested", "cwd", "env", "memory", "cpu_time", "open_files")


def job_json(job: Job) -> dict[str, Any]:
    """A job as ``list --json`` gives it: its fields up to ``updated_at``."""
    data = msgspec.structs.asdict(job)
    for key in _HELD:
        del data[key]
    if job.state not in _TIMED:
        data["run_at"] = None  # only meaningful while the job waits for its time
    return data


def _waits_for(job: Job) -> str:
    if job.state in ("scheduled", "failed"):
        return clock.short(job.run_at)
    if job.state == "waiting":
        return ", ".join(job.after)
    return ""


def jobs_table(jobs: list[Job], title: str) -> None:
    """Attempts read ``runs started/runs allowed`` (1 + max_retries); ``Waits for`` is the
    time a scheduled or failed job may run again, or the jobs a waiting job depends on.
    Times are UTC, shown as HH:MM:SS when today."""
    if not jobs:
        print(f"{title}: no jobs")
        return
    waiting = any(j.state in ("scheduled", "failed", "waiting") for j in jobs)
    prioritised = any(j.priority for j in jobs)
    queued = any(j.queue != "default" for j in jobs)
    columns = ["ID"] + ["Queue"] * queued + ["State", "Attempts"] + ["Pri"] * prioritised
    columns += ["Command"]
    columns += ["Waits for"] * waiting + ["Updated (UTC)"]
    rows = []
    for j in jobs:
        row: list[Any] = [j.id, *[j.queue] * queued, j.state, f"{j.attempts}/{1 + j.max_retries}"]
        row += [j.priority] * prioritised + [j.command]
        row += [_waits_for(j)] * waiting + [clock.short(j.updated_at)]
        rows.append(row)
    _table(title, columns, rows, wide=frozenset({"Command"}))


def dlq_table(jobs: list[Job]) -> None:
    if not jobs:
        print("Dead letter queue is empty")
        return
    rows = [[j.id, j.command, j.attempts, j.max_retries, j.last_error or "",
             clock.short(j.updated_at)] for j in jobs]
    columns = ["ID", "Command", "Attempts", "Max retries", "Last error", "Updated (UTC)"]
    _table("Dead letter queue", columns, rows, wide=frozenset({"Command", "Last error"}))


def status(counts: dict[str, int], queues: dict[str, dict[str, int]],
           workers: list[Worker], tally: dict[str, int]) -> None:
    """Job counts (and each queue's, when there is more than the default one), then the
    running workers (``state`` already active or silent); the workers that stopped or are
    gone are counted on one line, never listed."""
    for line in counts_lines(counts, queues):  # never wrapped: "(total: n)" stays whole
        print(line)
    ended = ", ".join(f"{tally[k]} {k}" for k in ("stopped", "gone") if tally[k])
    if not workers:
        print("Workers: none active" + (f" ({ended}, not shown)" if ended else ""))
        return
    rows = [[w.id, w.state, w.host, w.pid, w.current_job or "-", w.jobs_done,
             clock.short(w.last_heartbeat)] for w in workers]
    summary = f"Workers: {tally['active']} active, {tally['silent']} silent"
    print(summary + (f" ({ended}, not shown)" if ended else ""))
    _table(None, ["Worker", "State", "Host", "PID", "Job", "Done", "Heartbeat"], rows)


def counts_lines(counts: dict[str, int], queues: dict[str, dict[str, int]]) -> list[str]:
    """``Jobs  pending: 0  ...  (total: n)``, then a line for each queue that holds jobs when
    there is more than the default one."""
    line = "  ".join(f"{state}: {n}" for state, n in counts.items())
    lines = [f"Jobs  {line}  (total: {sum(counts.values())})"]
    used = {name: per for name, per in queues.items() if any(per.values())}
    if set(used) - {"default"}:
        for name, per in used.items():
            shown = "  ".join(f"{state}: {n}" for state, n in per.items() if n)
            lines.append(f"  queue {name}  {shown}")
    return lines


def queues_table(queues: list[QueueRow]) -> None:
    """One row per queue: running or paused, its limit and rate, its jobs (the states it has any
    in), and its oldest pending job's wait."""
    if not queues:
        print("Queues: none")
        return
    rows = [[q.queue, "paused" if q.paused else "running", q.limit or "-", q.rate or "-",
             ", ".join(f"{n} {state}" for state, n in q.jobs.items() if n) or "-",
             "-" if q.oldest_pending_wait is None else f"{q.oldest_pending_wait:.1f}s"]
            for q in queues]
    _table("Queues", ["Queue", "State", "Limit", "Rate", "Jobs", "Oldest pending"], rows,
           wide=frozenset({"Jobs"}))


def schedules_table(found: list[dict[str, Any]]) -> None:
    """One row per schedule: when it ticks (and in which zone), its next tick or that it is
    paused, its queue and command, its last job and how many ticks made one."""
    if not found:
        print("Schedules: none")
        return
    rows = []
    for s in found:
        when = s["cron"] + ("" if s["timezone"] == "UTC" else f" ({s['timezone']})")
        made = str(s["fired"]) + (f" ({s['skipped']} skipped)" if s["skipped"] else "")
        rows.append([s["name"], when, "paused" if s["paused"] else clock.human(s["next_at"]),
                     s["queue"], s["command"], s["last_job"] or "-", made])
    _table("Schedules", ["Name", "Cron", "Next (UTC)", "Queue", "Command", "Last job", "Made"],
           rows, wide=frozenset({"Command", "Cron"}))


def hooks_table(found: list[dict[str, Any]]) -> None:
    """One row per hook: the states it fires on, whose jobs fire it, where its jobs go."""
    if not found:
        print("Hooks: none")
        return
    rows = [[h["name"], ",".join(h["on"]), h["queue"] or "(every queue)",
             h["to_queue"] or "(the job's)", h["command"]] for h in found]
    _table("Hooks", ["Name", "On", "Jobs of", "Runs in", "Command"], rows,
           wide=frozenset({"Command"}))


def tokens_table(found: list[dict[str, Any]]) -> None:
    if not found:
        print("Tokens: none")
        return
    rows = [[t["name"], t["scope"], clock.short(t["created_at"]), t["by"] or "-"] for t in found]
    _table("Tokens", ["Name", "Scope", "Created (UTC)", "By"], rows)


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# -- history ------------------------------------------------------------------------------


def event_details(event: ev.Event) -> str:
    """One line saying what an event recorded, for ``history``."""
    match event:
        case ev.Enqueued(command=c, max_retries=m, backoff_base=b, timeout=t):
            extras = [f"max_retries {m}", f"backoff_base {b:g}"]
            extras += [f"timeout {t:g}s"] * bool(t)
            extras += [f"priority {event.priority}"] * bool(event.priority)
            extras += [f"queue {event.queue}"] * (event.queue != "default")
            extras += [f"unique key {event.unique_key}"] * (event.unique_key is not None)
            extras += [f"run at {clock.human(event.run_at)}"] * bool(event.run_at)
            extras += [f"after {', '.join(event.after)}"] * bool(event.after)
            extras += [f"env {_assignments(event.env)}"] * bool(event.env)
            if event.memory or event.cpu_time or event.open_files:
                extras += _limit_changes(event)
            made = f"; made by hook {event.hook.name}: job {event.hook.job_id} " \
                f"{event.hook.state}" if event.hook else ""
            return f"command: {c} ({', '.join(extras)}){made}"
        case ev.Edited():
            return "changed: " + "; ".join(edits(event))
        case ev.Unblocked(completed=c):
            return f"released: dependency {c} completed"
        case ev.CancelRequested():
            return "cancel requested while running"
        case ev.Cancelled(reason=r, attempt=a, worker_id=w):
            return f"attempt {a} stopped: {r}" if w else r
        case ev.Claimed(attempt=a, ahead=True):
            return f"attempt {a}, to run after its worker's current job"
        case ev.Claimed(attempt=a) | ev.Started(attempt=a):
            return f"attempt {a}"
        case ev.Completed(attempt=a, duration=d, output=o):
            return f"attempt {a} succeeded in {d:.3f}s" + (f"; output: {o.strip()}" if o else "")
        case ev.Failed(attempt=a, error=e, duration=d, output=o):
            return f"attempt {a}: {e} after {d:.3f}s" + (f"; output: {o.strip()}" if o else "")
        case ev.TimedOut(attempt=a, timeout=t):
            return f"attempt {a} killed after its {t:g}s timeout"
        case ev.LeaseExpired(attempt=a, worker_id=w, last_heartbeat=h, killed=k):
            stopped = f"; {_count(k, 'process')} of its run stopped on this host" if k else ""
            return f"attempt {a}: worker {w} silent since {clock.human(h)}{stopped}"
        case ev.Fenced(attempt=a, silence=s, lease_timeout=t, reason=r, rescued=late):
            taken = "; the job had been taken back already" if late else ""
            return (f"attempt {a} stopped by its own worker {s:g}s after its last renewal "
                    f"(lease {t:g}s): {r}{taken}")
        case ev.Released(attempt=a, reason=r, ahead=True):
            return f"attempt {a} given back before it started: {r}"
        case ev.Released(attempt=a, reason=r):
            return f"attempt {a} abandoned: {r}"
        case ev.ScheduledRetry(delay=d, run_at=r):
            return f"retry in {d:g}s, at {clock.human(r)}"
        case ev.Dead(attempts=a, reason=r):
            return f"moved to the DLQ after {_count(a, 'attempt')}: {r}"
        case ev.Requeued(max_retries=m):
            return f"requeued from the DLQ with max_retries {m}"
        case ev.Restarted(max_retries=m, previous=p):
            return f"restarted ({p or 'finished'}) with max_retries {m}: attempts count from 0"
        case ev.SignalRequested(signal=s):
            return f"{signal_name(s)} asked for"
        case ev.Signalled(attempt=a, signal=s, delivered=True):
            return f"{signal_name(s)} sent to attempt {a}'s process group"
        case ev.Signalled(attempt=a, signal=s, error=e):
            return f"{signal_name(s)} not sent to attempt {a}: {e}"
        case ev.ScheduleFired(name=n, tick=t, missed=m):
            caught = f", the catch-up of {_count(m, 'missed tick')} before it" if m else ""
            return f"made by schedule {n} for its {clock.human(t)} tick{caught}"
    return ""


def _assignments(env: dict[str, str]) -> str:
    """Variables as a shell would set them: ``A=1 B='two words'``."""
    import shlex  # not on a worker's path, which renders only its log lines

    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def edits(e: ev.Edited) -> list[str]:
    """What an ``edited`` event changed, one item a field."""
    said = {"command": "command {}", "priority": "priority {}", "queue": "queue {}",
            "max_retries": "max_retries {}", "timeout": "timeout {:g}s", "cwd": "directory {}"}
    items = [form.format(value) for name, form in said.items()
             if (value := getattr(e, name)) is not None]
    if e.run_at is not None:
        items.append(f"run at {clock.human(e.run_at)}")
    if e.env:
        items.append(f"env {_assignments(e.env)}")
    if e.memory is not None or e.cpu_time is not None or e.open_files is not None:
        items += _limit_changes(e)
    return items


def _limit_changes(e: ev.Enqueued | ev.Edited) -> list[str]:
    """The resource limits an event set (``memory limit 64 MiB``) or removed."""
    from queuectl import resources

    return [resources.label(name, value) if value else f"no {resources.NOUNS[name]}"
            for name in resources.NAMES if (value := getattr(e, name)) is not None
            and (value or isinstance(e, ev.Edited))]


def _count(n: int, noun: str) -> str:
    """``1 attempt``, ``3 attempts``, ``2 processes``."""
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{n} {noun if n == 1 else plural}"


def one_line(exc: BaseException) -> str:
    """An error as one line of text: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- the worker's log (worker -v) ---------------------------------------------------------


def worker_started_job(job: Any) -> list[str]:
    """What ``worker -v`` says as a run starts (the seed's wording)."""
    if job.attempt == 1:
        first = f"Picked up NEW job: {job.job_id} (Command: {safe(job.command)})"
    else:
        first = f"RETRYING job {job.job_id} (Attempt {job.attempt})"
    return [first, f"Job {job.job_id} state: processing"]


def worker_line(event: ev.Event, total: int | None = None) -> str:
    """What ``worker -v`` says of an event it appended; ``total`` is the runs allowed."""
    match event:
        case ev.Completed(job_id=j):
            return f"Job {j} state: completed"
        case ev.Failed(job_id=j, attempt=a, error=error):
            return f"Job {j} FAILED (Attempt {a}/{total}): {error}"
        case ev.TimedOut(job_id=j, attempt=a, timeout=t):
            return f"Job {j} FAILED (Attempt {a}/{total}): timed out after {t:g}s"
        case ev.LeaseExpired(job_id=j, worker_id=w, killed=k):
            stopped = f" ({_count(k, 'process')} of its run stopped)" if k else ""
            return f"Job {j} taken back: worker {w} stopped heartbeating{stopped}"
        case ev.Fenced(job_id=j, attempt=a, silence=s):
            return f"Job {j} FENCED (Attempt {a}/{total}): no lease renewal for {s:g}s, run stopped"
        case ev.WorkerLost(worker_id=w):
            return f"Worker {w} is gone: no heartbeat"
        case ev.Released(job_id=j):
            return f"Job {j} released back to the queue"
        case ev.Cancelled(job_id=j, reason=r):
            return f"Job {j} state: cancelled ({r})"
        case ev.Unblocked(job_id=j):
            return f"Job {j} unblocked: its dependencies completed"
        case ev.ScheduledRetry(job_id=j, delay=d):
            return f"Job {j} state: failed - Will retry in {d:g}s"
        case ev.Dead(job_id=j):
            return f"Job {j} state: DEAD"
        case ev.ScheduleFired(name=n, job_id=j, missed=m):
            caught = f" (catching up {_count(m, 'missed tick')})" if m else ""
            return f"Schedule {n} enqueued job {j}{caught}"
        case ev.ScheduleSkipped(name=n, tick=t, reason=r):
            return f"Schedule {n} skipped its {clock.human(t)} tick: {r}"
    return ""


def history_json(rows: list[tuple[int, str, ev.Event]]) -> list[dict[str, Any]]:
    return [
        {"seq": seq, "at": at, "type": event.type, **msgspec.structs.asdict(event)}
        for seq, at, event in rows
    ]


def history_table(job_id: str, rows: list[tuple[int, str, ev.Event]]) -> None:
    table_rows = [
        [seq, at.replace("T", " ").rstrip("Z")[:23], event.type,
         getattr(event, "worker_id", "") or "", event.by, event_details(event)]
        for seq, at, event in rows
    ]
    columns = ["Seq", "Time (UTC)", "Event", "Worker", "By", "Details"]
    _table(f"History of job {job_id}", columns, table_rows, wide=frozenset({"Details"}))


# -- show, logs, stats --------------------------------------------------------------------


def safe_block(text: str) -> str:
    """Multi-line user text (job output): newlines and tabs kept, other controls escaped."""
    return "\n".join(safe(line).replace("\\t", "\t") for line in text.split("\n"))


def _next_run(job: Job) -> str | None:
    if job.state in ("pending",):
        return "now (waiting for a worker)"
    if job.state in ("scheduled", "failed"):
        return job.run_at
    if job.state == "waiting":
        return "after its dependencies complete"
    return None


def show_json(job: Job, deps: dict[str, str], runs: list[Run]) -> dict[str, Any]:
    """A job as ``show --json`` gives it: ``job_json``'s fields, what only show gives, its
    dependencies' states, when it runs next and how many runs it had."""
    data = job_json(job)
    data.update(
        worker_id=job.worker_id, cancel_requested=job.cancel_requested,
        cwd=job.cwd, env=job.env, memory=job.memory, cpu_time=job.cpu_time,
        open_files=job.open_files,
        dependencies=[{"id": dep, "state": state} for dep, state in deps.items()],
        next_run=_next_run(job), runs=len(runs),
    )
    return data


def show(job: Job, deps: dict[str, str], runs: list[Run]) -> None:
    policy = f"max_retries {job.max_retries}, backoff_base {job.backoff_base:g}"
    if job.backoff_max:
        policy += f", backoff_max {job.backoff_max:g}s"
    if job.backoff_jitter:
        policy += f", backoff_jitter {job.backoff_jitter:g}"
    lines = [
        ("ID", job.id),
        ("Command", job.command),
        ("Queue", job.queue),
        ("Unique key", job.unique_key or "-"),
        ("State", job.state + (" (cancel requested)" if job.cancel_requested else "")),
        ("Priority", job.priority),
        ("Attempts", f"{job.attempts} of {1 + job.max_retries} allowed runs"),
        ("Retry policy", policy),
        ("Timeout", f"{job.timeout:g}s" if job.timeout else "none"),
        ("Directory", job.cwd or "the worker's"),
        ("Environment", _assignments(job.env) or "-"),
        ("Limits", _limits(job)),
        ("After", ", ".join(f"{d} ({s})" for d, s in deps.items()) or "-"),
        ("Worker", job.worker_id or "-"),
        ("Last error", job.last_error or "-"),
        ("Exit code", "-" if job.exit_code is None else job.exit_code),
        ("Next run", _next_run(job) or "-"),
        ("Runs", len(runs)),
        ("Created", job.created_at),
        ("Updated", job.updated_at),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {safe(str(value))}")


def _limits(job: Job) -> str:
    """A job's resource limits, ``memory limit 64 MiB, cpu time 1 s``, or ``none``."""
    if job.memory is None and job.cpu_time is None and job.open_files is None:
        return "none"
    from queuectl import resources

    return resources.summary(resources.Limits(
        memory=job.memory or 0, cpu_time=job.cpu_time or 0, open_files=job.open_files or 0))


def logs(job_id: str, runs: list[Run]) -> None:
    if not runs:
        print(f"Job {job_id} has not run yet")
        return
    for run in runs:
        ended = run.outcome
        if run.error:
            ended += f": {run.error}"
        elif run.exit_code is not None:
            ended += f" (exit code {run.exit_code})"
        took = f", {run.duration:.3f}s" if run.duration is not None else ""
        # After a restart (or a requeue) attempts count from 1 again; runs never do.
        which = f"attempt {run.attempt}" if run.run == run.attempt else \
            f"run {run.run}, attempt {run.attempt}"
        print(f"=== {which} on worker {run.worker_id} at "
              f"{clock.human(run.started_at)}: {safe(ended)}{took} ===")
        if run.truncated:
            print(f"[output cut: only its last {len(run.output.encode())} bytes are shown; "
                  f"logs {safe(job_id)} --full --attempt {run.attempt} prints all that was kept]")
        output = safe_block(run.output)
        print(output, end="" if output.endswith("\n") or not output else "\n")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def stats(figures: Stats, since: str | None) -> None:
    rate = figures.success_rate
    throughput = figures.throughput_per_min
    run, wait = figures.run_time, figures.queue_wait
    print(f"===== STATS ({'last ' + since if since else 'all time'}) =====")
    print(f"Completed:     {figures.completed}")
    print(f"Failed runs:   {figures.failed}")
    print(f"Dead:          {figures.dead}")
    print(f"Success rate:  {'-' if rate is None else f'{rate:.1%}'}")
    if throughput is None:
        print("Throughput:    -")
    elif since:
        print(f"Throughput:    {throughput:g} jobs/min (over the last {since})")
    else:  # all time: over the span the runs took, which says how far to trust it
        print(f"Throughput:    {throughput:g} jobs/min (over "
              f"{clock.age(figures.throughput_over_seconds)}, first claim to last end)")
    print(f"Run time:      p50 {_seconds(run.p50)}  p95 {_seconds(run.p95)}  "
          f"max {_seconds(run.max)}")
    print(f"Queue wait:    p50 {_seconds(wait.p50)}  p95 {_seconds(wait.p95)}")


# -- waiting (wait, enqueue --wait) ---------------------------------------------------------


def waited_line(jobs: Watch, finished: bool, timeout: float | None,
                codes: dict[str, int | None] | None = None) -> str:
    """What ``wait`` prints at its end: ``3 jobs: 2 completed, 1 dead``; one job by its id,
    ``Job 7 dead (exit code 3)``; ``..., 1 unfinished after 5s`` (``Job 7 still pending
    after 5s``) when the timeout ran out."""
    counts = jobs.counts()
    late = f" after {timeout:g}s" if not finished and timeout is not None else ""
    if jobs.total == 1:
        (job_id, state), = jobs.states.items()
        if not finished:
            return f"Job {job_id} still {state}{late}"
        code = (codes or {}).get(job_id)
        return f"Job {job_id} {state}" + (f" (exit code {code})" if state == "dead" else "")
    parts = [f"{n} {state}" for state, n in counts.items() if n or state == "completed"]
    return f"{_count(jobs.total, 'job')}: {', '.join(parts)}{late}"


def waited_json(jobs: Watch, finished: bool, codes: dict[str, int | None],
                status: int) -> dict[str, Any]:
    """``wait --json``: each job's state and exit code (``queuectl.outcome``; null while
    unfinished), the totals, whether the timeout ran out and the exit code."""
    return {"jobs": [{"id": job_id, "state": state, "exit_code": codes.get(job_id)}
                     for job_id, state in jobs.states.items()],
            "total": jobs.total, **jobs.counts(), "timed_out": not finished,
            "exit_code": status}


class WaitBar:
    """A progress bar on stderr while ``wait`` blocks: done/total, and the failures."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.progress import TimeElapsedColumn

        self._bar = Progress(TextColumn("Waiting"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[failed]}"), TimeElapsedColumn(),
                             console=Console(stderr=True), transient=True)
        self._task = self._bar.add_task("wait", total=total, failed="")

    def __enter__(self) -> WaitBar:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, jobs: Watch) -> None:
        failed = f"[red]{jobs.failed} failed[/]" if jobs.failed else ""
        self._bar.update(self._task, completed=jobs.done, failed=failed)
