"""Hooks: a job reaching a state a hook names makes one hook job, in the transaction that
records the change (exactly once, whatever crashes), with the firing job in its
environment; a hook job's own end fires nothing."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import spawn, wait_for
from helpers import (
    added,
    burst,
    claim,
    complete,
    fail,
    kill_leftovers,
    ok,
    one_error,
    rows,
    snapshot,
    state,
    workers,
)

from queuectl import claims
from queuectl import events as ev


def hook_jobs(conn) -> list[dict]:  # type: ignore[no-untyped-def]
    """The hook jobs' enqueued events, in order."""
    return [r for r in rows(conn, "enqueued") if "hook" in r]


def test_hook_add_list_remove(run, conn):
    assert ok(run, "hook", "list") == "Hooks: none\n"
    assert ok(run, "hook", "add", "n1", "--on", "dead, Failed", "-c", "echo hi") == \
        "Hook 'n1' added: on failed, dead.\n"
    ok(run, "hook", "add", "n2", "--on", "completed", "-q", "media", "--to-queue", "hooks",
       "-c", "curl -fsS example.com")
    listed = json.loads(ok(run, "hook", "list", "--json"))
    assert [{k: h[k] for k in ("name", "on", "queue", "to_queue", "command")} for h in listed] == [
        {"name": "n1", "on": ["failed", "dead"], "queue": None, "to_queue": None,
         "command": "echo hi"},
        {"name": "n2", "on": ["completed"], "queue": "media", "to_queue": "hooks",
         "command": "curl -fsS example.com"}]
    table = ok(run, "hook", "list")
    assert "n1" in table and "failed,dead" in table and "(every queue)" in table
    assert ok(run, "hook", "remove", "n1") == "Hook 'n1' removed.\n"
    assert [h["name"] for h in json.loads(ok(run, "hook", "list", "--json"))] == ["n2"]
    assert [r["name"] for r in rows(conn, "hook-added")] == ["n1", "n2"]
    assert [r["name"] for r in rows(conn, "hook-removed")] == ["n1"]


def test_hook_bad_input_is_one_error_and_writes_nothing(run, conn):
    ok(run, "hook", "add", "taken", "--on", "dead", "-c", "true")
    before = snapshot(conn)
    for args, message in (
        (["taken", "--on", "dead", "-c", "true"], "Hook 'taken' already exists"),
        (["x", "--on", "done", "-c", "true"], "--on 'done': give one or more of completed"),
        (["x", "--on", ",", "-c", "true"], "give one or more of"),
        (["_bad", "--on", "dead", "-c", "true"], "hook name '_bad' must be"),
        (["x" * 97, "--on", "dead", "-c", "true"], "must be 1-96 letters"),
        (["x", "--on", "dead", "-c", "  "], "the hook's command is empty"),
        (["x", "--on", "dead", "-q", "no queue", "-c", "true"], "queue 'no queue' must be"),
        (["x", "--on", "dead", "--to-queue", "/x", "-c", "true"], "queue '/x' must be"),
    ):
        one_error(run("hook", "add", *args), message)
        assert snapshot(conn) == before
    one_error(run("hook", "remove", "nope"), "Hook 'nope' not found")
    assert snapshot(conn) == before


def test_each_transition_fires_once_in_its_own_transaction(run, conn):
    ok(run, "hook", "add", "all", "--on", "completed,failed,dead,cancelled",
       "--to-queue", "hooks", "-c", "true")
    added(run, "--id", "ok", "-c", "true")
    added(run, "--id", "bad", "--max-retries", "1", "--backoff-base", "1", "-c", "false")
    added(run, "--id", "slow", "--max-retries", "1", "--timeout", "1", "-c", "sleep 9")
    added(run, "--id", "gone", "--delay", "3600", "-c", "true")
    added(run, "--id", "child", "--after", "gone", "-c", "true")

    complete(conn, claim(conn, "w", "ok"), "w", 0.1)
    fail(conn, claim(conn, "w", "bad"), "w", code=3)
    c = claim(conn, "w", "slow")
    claims.finish(conn, c, ev.TimedOut(job_id="slow", worker_id="w", attempt=1, timeout=1))
    again = wait_for(lambda: claims.claim(conn, "w", ["default"]), 5, "bad's retry")
    assert (again.job_id, again.attempt) == ("bad", 2)
    fail(conn, again, "w", code=4)
    ok(run, "cancel", "gone")  # and child with it

    made = hook_jobs(conn)
    fired = [(m["hook"]["job_id"], m["hook"]["state"], m["hook"].get("exit_code")) for m in made]
    assert fired == [("ok", "completed", 0), ("bad", "failed", 3), ("slow", "failed", None),
                     ("bad", "dead", 4), ("gone", "cancelled", None),
                     ("child", "cancelled", None)]
    # Each in the transaction of its change: same time, right after it in the ledger.
    for m in made:
        source = m["hook"]["job_id"]
        change = {"completed": "completed", "failed": "scheduled-retry", "dead": "dead",
                  "cancelled": "cancelled"}[m["hook"]["state"]]
        (changed,) = [r for r in rows(conn, change, source) if r["at"] == m["at"]]
        assert changed["seq"] < m["seq"]
        assert m["job_id"] == f"hook:all:{m['seq']}"
        assert m["queue"] == "hooks" and m["command"] == "true"
        assert state(conn, m["job_id"]) == "pending"

    # A hook job's own end fires nothing, whatever it reaches.
    count = len(made)
    hook_job = claims.claim(conn, "w", ["hooks"])
    assert hook_job.job_id == made[0]["job_id"]
    fail(conn, hook_job, "w")
    ok(run, "cancel", made[1]["job_id"])
    assert len(hook_jobs(conn)) == count


def test_queue_filter_target_queue_and_removal(run, conn):
    ok(run, "hook", "add", "media", "--on", "completed", "-q", "media", "--to-queue", "notes",
       "-c", "echo media")
    ok(run, "hook", "add", "mine", "--on", "completed", "-c", "echo mine")
    added(run, "--id", "m", "-q", "media", "-c", "true")
    added(run, "--id", "d", "-c", "true")
    c = claims.claim(conn, "w", ["media"])
    complete(conn, c, "w", 0.1)
    complete(conn, claims.claim(conn, "w", ["default"]), "w", 0.1)
    made = [(m["hook"]["name"], m["hook"]["job_id"], m["queue"]) for m in hook_jobs(conn)]
    assert made == [("media", "m", "notes"), ("mine", "m", "media"), ("mine", "d", "default")]
    ok(run, "hook", "remove", "mine")
    ok(run, "hook", "remove", "media")
    added(run, "--id", "later", "-q", "z", "-c", "true")
    complete(conn, claims.claim(conn, "w", ["z"]), "w", 0.1)
    assert len(hook_jobs(conn)) == 3


def test_a_worker_runs_hook_jobs_with_the_firing_job_in_their_environment(run, conn, tmp_path):
    record = "env | grep ^QUEUECTL_HOOK_ | sort > hook-$QUEUECTL_HOOK_JOB_ID-$QUEUECTL_HOOK_STATE"
    ok(run, "hook", "add", "rec", "--on", "completed,dead", "-c", record)
    added(run, "--id", "fine", "-c", "echo fine")
    added(run, "--id", "broken", "--max-retries", "0", "-c", "exit 7")
    with workers() as start:
        burst(start)
    assert (tmp_path / "hook-fine-completed").read_text().splitlines() == [
        "QUEUECTL_HOOK_COMMAND=echo fine", "QUEUECTL_HOOK_EXIT_CODE=0",
        "QUEUECTL_HOOK_JOB_ID=fine", "QUEUECTL_HOOK_NAME=rec", "QUEUECTL_HOOK_QUEUE=default",
        "QUEUECTL_HOOK_STATE=completed"]
    assert (tmp_path / "hook-broken-dead").read_text().splitlines() == [
        "QUEUECTL_HOOK_COMMAND=exit 7", "QUEUECTL_HOOK_EXIT_CODE=7",
        "QUEUECTL_HOOK_JOB_ID=broken", "QUEUECTL_HOOK_NAME=rec", "QUEUECTL_HOOK_QUEUE=default",
        "QUEUECTL_HOOK_STATE=dead"]
    made = hook_jobs(conn)
    assert len(made) == 2 and all(state(conn, m["job_id"]) == "completed" for m in made)
    assert "made by hook rec: job fine completed" in ok(run, "history", made[0]["job_id"])
    # A plain job sees none of these variables.
    added(run, "--id", "plain", "-c", "env | grep -c ^QUEUECTL_HOOK_ > plain.txt; true")
    with workers() as start:
        burst(start)
    assert (tmp_path / "plain.txt").read_text() == "0\n"


@pytest.mark.slow
def test_a_crashed_workers_job_fires_its_hook_once_when_taken_back(run, conn, tmp_path):
    """kill -9 of a worker mid-job: the rescuer's lease-expired ends the job (dead here,
    failed with retries left), and that transaction enqueues the hook job."""
    ok(run, "config", "set", "heartbeat-interval", "0.3")
    ok(run, "config", "set", "lease-timeout", "1.5")
    ok(run, "hook", "add", "rec", "--on", "failed,dead",
       "-c", "echo $QUEUECTL_HOOK_STATE:$QUEUECTL_HOOK_EXIT_CODE >> hooks.txt")
    unique = "30.5129"
    added(run, "--id", "once", "--max-retries", "1", "--backoff-base", "1",
          "-c", f"sleep {unique}")
    try:
        with workers() as start:
            for expect in ("failed", "dead"):
                first = start("-s", "0.2")
                wait_for(lambda: state(conn, "once") == "processing", 20, "the claim")
                os.killpg(first.pid, signal.SIGKILL)  # the worker and its job
                rescuer = spawn("worker", "--burst", "-s", "0.2", start_new_session=True)
                try:
                    wait_for(lambda: state(conn, "once") in ("failed", "dead"), 30,
                             f"the rescue to make it {expect}")
                finally:
                    if expect == "dead":
                        rescuer.communicate(timeout=30)
                    else:  # once it ran the hook job (it would run it again if killed in it)
                        wait_for(lambda: [state(conn, m["job_id"]) for m in hook_jobs(conn)]
                                 == ["completed"], 20, "the hook job")
                        os.killpg(rescuer.pid, signal.SIGKILL)
                        rescuer.wait()
                assert state(conn, "once") == expect
                kill_leftovers(f"sleep {unique}")
            burst(start)
    finally:
        kill_leftovers(f"sleep {unique}")
    made = hook_jobs(conn)
    assert [(m["hook"]["state"], m["hook"].get("exit_code")) for m in made] == \
        [("failed", None), ("dead", None)]
    for m in made:
        (expired,) = [r for r in rows(conn, "lease-expired", "once") if r["at"] == m["at"]]
        assert expired["seq"] < m["seq"]
    assert sorted((tmp_path / "hooks.txt").read_text().splitlines()) == ["dead:", "failed:"]
