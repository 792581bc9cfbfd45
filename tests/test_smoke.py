from __future__ import annotations

import json

import pytest


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


@pytest.mark.stores("sqlite")  # about the files, not a store: once
def test_every_package_is_in_the_distribution():
    """A plain ``pip install .`` (the README's quick start) ships only the packages
    pyproject.toml lists: a subpackage left out works in the editable install the tests
    use and fails on a user's machine."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for top in ("queuectl", "projections") for p in (root / top).rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
