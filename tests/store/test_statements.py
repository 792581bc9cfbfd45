"""The statements both stores make of a projector's changes (``queuectl.store.statements``):
declared changes, their merging, and the constants written into them."""

from __future__ import annotations

import math

import pytest

from queuectl.states import State
from queuectl.store.statements import Change, literal


def test_a_change_writes_its_fixed_values_into_its_statement_and_binds_the_rest():
    change = Change("jobs", "id", {"state": State.DEAD, "run_at": None, "ahead": 0},
                    ("updated_at",), ("attempts",), null=("worker_id",))
    assert change.sql == ("UPDATE jobs SET state = 'dead', run_at = NULL, ahead = 0, "
                          "updated_at = ?, attempts = attempts + ? "
                          "WHERE id = ? AND worker_id IS NULL")


@pytest.mark.parametrize(("value", "text"), [
    (None, "NULL"), (True, "1"), (False, "0"), (7, "7"), (-2, "-2"), (0.5, "0.5"),
    ("it's", "'it''s'"), (State.PENDING, "'pending'"),
])
def test_a_constant_is_written_as_sql_reads_it(value, text):
    assert literal(value) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, b"bytes", object()])
def test_a_value_sql_cannot_read_back_exactly_is_refused(value):
    with pytest.raises(ValueError, match="cannot be written"):
        literal(value)


def test_a_change_names_each_column_once():
    with pytest.raises(ValueError, match="names a column twice"):
        Change("jobs", "id", {"state": "dead"}, ("state",))
    with pytest.raises(ValueError, match="names a column twice"):
        Change("workers", "id", {}, ("jobs_done",), ("jobs_done",))


def test_a_change_applied_to_a_row_in_memory_sets_and_adds_as_its_statement_does():
    change = Change("workers", "id", {"current_job": None}, ("last_heartbeat",),
                    ("jobs_done",))
    row = {"id": "w1", "current_job": "j", "last_heartbeat": "t0", "jobs_done": 4}
    change.into(row, ("t1", 2, "w1"))
    assert row == {"id": "w1", "current_job": None, "last_heartbeat": "t1", "jobs_done": 6}
    assert change.set_values(("t1", 2, "w1")) == {"current_job": None, "last_heartbeat": "t1"}


def test_two_changes_of_a_row_merge_as_if_written_one_after_the_other():
    first = Change("workers", "id", {"state": "active"}, ("current_job", "last_heartbeat"),
                   ("jobs_done",))
    later = Change("workers", "id", {"current_job": None}, ("state", "stopped_at"),
                   ("jobs_done",))
    then = first.then(later)
    row = {"id": "w1", "state": "gone", "current_job": "x", "last_heartbeat": "t0",
           "stopped_at": None, "jobs_done": 1}
    one_by_one = dict(row)
    first.into(one_by_one, ("j", "t1", 2, "w1"))
    later.into(one_by_one, ("stopped", "t2", 3, "w1"))
    values = then.values(("j", "t1", 2, "w1"), ("stopped", "t2", 3, "w1"))
    assert values[-1] == "w1"
    merged = dict(row)
    then.merged.into(merged, values)
    assert merged == one_by_one == {"id": "w1", "state": "stopped", "current_job": None,
                                    "last_heartbeat": "t1", "stopped_at": "t2",
                                    "jobs_done": 6}


def test_changes_of_other_rows_do_not_merge():
    with pytest.raises(ValueError, match="do not change the same row"):
        Change("workers", "id", {}, ("a",)).then(Change("jobs", "id", {}, ("a",)))


def test_a_value_set_after_an_addition_replaces_it_and_an_addition_after_a_set_is_refused():
    adds = Change("workers", "id", {}, (), ("jobs_done",))
    sets = Change("workers", "id", {}, ("jobs_done",))
    then = adds.then(sets)
    row = {"id": "w1", "jobs_done": 4}
    then.merged.into(row, then.values((2, "w1"), (9, "w1")))
    assert row == {"id": "w1", "jobs_done": 9}
    with pytest.raises(ValueError, match="not merged"):
        sets.then(adds)
