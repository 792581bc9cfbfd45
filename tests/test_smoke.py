from __future__ import annotations

import json


def test_enqueue_and_list(run, conn):
    result = run("enqueue", "-c", "echo hi", "--id", "j1")
    assert result.exit_code == 0
    assert result.stdout == "Job added successfully with ID: j1\n"
    jobs = json.loads(run("list", "--json").stdout)
    assert [(j["id"], j["state"], j["attempts"]) for j in jobs] == [("j1", "pending", 0)]


def test_worker_burst_runs_job(run, conn):
    run("enqueue", "-c", "echo hi", "--id", "j1")
    result = run("worker", "--burst")
    assert result.exit_code == 0, result.output
    assert json.loads(run("list", "--json").stdout)[0]["state"] == "completed"
