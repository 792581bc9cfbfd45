"""The states a job and a worker can be in: one enum each, and the groups of job states
the queue's rules and its SQL speak of."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """A job's state (the ``jobs.state`` column)."""

    PENDING = "pending"  # may run now
    SCHEDULED = "scheduled"  # may run once its run_at comes
    WAITING = "waiting"  # a job it depends on has not completed
    PROCESSING = "processing"  # a worker holds it
    COMPLETED = "completed"
    FAILED = "failed"  # a run failed; it may run again once its run_at comes
    DEAD = "dead"  # every allowed run failed: the dead letter queue
    CANCELLED = "cancelled"


class WorkerState(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"
    GONE = "gone"  # declared lost by another worker


STATES = tuple(State)
CANCELLABLE = (State.PENDING, State.SCHEDULED, State.WAITING, State.FAILED, State.PROCESSING)
# What a worker may claim (a scheduled or failed job once its run_at has come).
CLAIMABLE = (State.PENDING, State.SCHEDULED, State.FAILED)
# Waiting for a time: their run_at says when they may run.
TIMED = (State.SCHEDULED, State.FAILED)
FINAL = (State.COMPLETED, State.DEAD, State.CANCELLED)
# What ``worker --burst`` waits for: jobs that will run without anyone's doing.
UNFINISHED = (State.PENDING, State.PROCESSING, State.FAILED)
# The states in which a job holds its unique key: every one before it is finished.
HOLDS_KEY = (State.PENDING, State.SCHEDULED, State.WAITING, State.PROCESSING, State.FAILED)


def any_of(*states: State) -> str:
    """``(state = 'pending' OR state = 'failed')``: an SQL predicate on ``state``, written as
    an OR chain (SQLite builds a table for an ``IN`` list each time it evaluates one, and a
    partial index is used only by a query that repeats its predicate word for word)."""
    return "(" + " OR ".join(f"state = '{s}'" for s in states) + ")"
