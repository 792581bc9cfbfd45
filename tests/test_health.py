"""``queuectl health`` and the served ``/healthz`` and ``/metrics``: exit 0 and one line
when the queue is served, else exit 1 (503) and one line saying what is wrong: the store
cannot be reached, too few live workers, a ready job waiting too long. On both stores; a
missing database is never created."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from helpers import FakeClock, ok, one_error, serving, workers

from queuectl import claims

parser = pytest.importorskip("prometheus_client.parser")


def health(run: Any, *args: str) -> tuple[int, str]:
    result = run("health", *args)
    assert result.stderr == "" and "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout


def test_a_missing_database_is_unhealthy_and_not_created(run: Any, tmp_path: Path) -> None:
    result = run("--db", "nowhere/queue.db", "health")
    assert (result.exit_code, result.stdout) == (1, (
        "unhealthy: the store cannot be reached: no queuectl database at nowhere/queue.db "
        "(commands that write, such as enqueue, create it)\n"))
    assert not (tmp_path / "nowhere").exists()
    result = run("--db", "nowhere/queue.db", "health", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["checks"] == {"store": {"ok": False, "detail": (
        "the store cannot be reached: no queuectl database at nowhere/queue.db (commands "
        "that write, such as enqueue, create it)")}, "workers": None, "ready_age": None}


@pytest.mark.stores("sqlite")
def test_an_unreachable_postgresql_is_unhealthy(run: Any) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("--db", f"postgresql://u:secret@127.0.0.1:{port}/q", "health")
    assert result.exit_code == 1
    assert result.stdout.startswith(
        f"unhealthy: the store cannot be reached: cannot connect to postgresql://u@127.0.0.1:{port}/q")
    assert "secret" not in result.stdout and len(result.stdout.splitlines()) == 1


def test_no_live_worker(run: Any, conn: Any) -> None:
    assert health(run) == (1, "unhealthy: no live worker\n")
    assert health(run, "--min-workers", "0") == (0, "healthy: no live worker, no ready job\n")
    claims.worker_started(conn, 11, "host-a", worker_id="w1")
    assert health(run) == (0, "healthy: 1 live worker, no ready job\n")
    assert health(run, "--min-workers", "2") == (
        1, "unhealthy: 1 live worker, fewer than 2\n")
    claims.worker_stopped(conn, "w1", "done")
    assert health(run, "--min-workers", "3") == (
        1, "unhealthy: no live worker (at least 3 wanted)\n")


@pytest.mark.stores("sqlite")  # the fake clock: PostgreSQL's times are the server's
def test_a_ready_job_waiting_too_long(run: Any, conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClock(monkeypatch)
    claims.worker_started(conn, 11, "host-a", worker_id="w1")
    ok(run, "enqueue", "--id", "old", "-c", "true", "-q", "mail")
    ok(run, "enqueue", "--id", "later", "-c", "true", "--run-at", "2026-01-01T00:10:00Z")
    fake.set(20)
    claims.heartbeat(conn, "w1")
    ok(run, "config", "set", "lease-timeout", "10000")
    fake.set(400)
    assert health(run) == (1, "unhealthy: the oldest ready job (queue mail) is 400.0 s old, "
                               "over 300 s\n")
    assert health(run, "--max-ready-age", "500") == (
        0, "healthy: 1 live worker, the oldest ready job (queue mail) is 400.0 s old\n")
    assert health(run, "-q", "default") == (0, "healthy: 1 live worker, no ready job\n")
    fake.set(700)  # "later" came due at 600 s
    assert health(run, "-q", "default") == (0, "healthy: 1 live worker, the oldest ready job "
                                                "(queue default) is 100.0 s old\n")
    assert health(run, "-q", "default", "--max-ready-age", "99.5", "--min-workers", "2") == (
        1, "unhealthy: 1 live worker, fewer than 2; the oldest ready job (queue default) is "
           "100.0 s old, over 99.5 s\n")
    ok(run, "queue", "pause", "mail")  # a paused queue's jobs wait on purpose
    code, out = health(run, "--json")
    assert code == 0
    assert json.loads(out) == {
        "healthy": True,
        "message": "healthy: 1 live worker, the oldest ready job (queue default) is 100.0 s old",
        "checks": {
            "store": {"ok": True, "detail": ""},
            "workers": {"ok": True, "detail": "1 live worker", "live": 1, "min": 1},
            "ready_age": {"ok": True, "detail": "the oldest ready job (queue default) is 100.0 s old",
                          "oldest_seconds": 100.0, "queue": "default", "max": 300.0}}}


def test_bad_options_are_usage_errors(run: Any, conn: Any) -> None:
    for args in (("--max-ready-age", "-1"), ("--max-ready-age", "nan"),
                 ("--max-ready-age", "inf"), ("--min-workers", "-1"), ("--min-workers", "x"),
                 ("-q", "bad name!")):
        result = run("health", *args)
        assert result.exit_code == 2, (args, result.output)
        one_error(result)


# -- served -------------------------------------------------------------------------------


def get(url: str, token: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read().decode()


@pytest.fixture
def served(conn: Any) -> Iterator[str]:
    """A ``queuectl dashboard`` process with a token, on the test's database: its address."""
    with serving("dashboard", "--token", "s3cret") as port:
        yield f"http://127.0.0.1:{port}"


def test_served_metrics_and_healthz(run: Any, conn: Any, served: str) -> None:
    ok(run, "enqueue", "-c", "true", "-q", "mail")
    status, kind, body = get(served + "/metrics")
    assert status == 401  # /metrics needs the token
    status, kind, body = get(served + "/metrics", token="s3cret")
    assert status == 200 and kind.startswith("text/plain; version=")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in parser.text_string_to_metric_families(body) for s in f.samples}
    assert samples["queuectl_jobs", (("queue", "mail"), ("state", "pending"))] == 1
    assert samples["queuectl_runs_total", (("outcome", "completed"), ("queue", "mail"))] == 0

    # /healthz is open: a probe may not be able to send a token
    assert get(served + "/healthz") == (503, "text/plain; charset=utf-8",
                                        "unhealthy: no live worker\n")
    status, _, body = get(served + "/healthz?min_workers=0")
    assert status == 200 and body.startswith("healthy: no live worker, the oldest ready job "
                                             "(queue mail) is ")
    status, _, body = get(served + "/healthz?min_workers=0&max_ready_age=0&queue=mail")
    assert status == 503 and body.startswith("unhealthy: the oldest ready job (queue mail)")
    assert get(served + "/healthz?min_workers=0&queue=default")[:3:2] == (
        200, "healthy: no live worker, no ready job\n")
    for bad in ("min_workers=x", "max_ready_age=-1", "max_ready_age=nan"):
        status, _, body = get(served + "/healthz?" + bad)
        assert status == 400 and body.startswith("Error: ") and body.count("\n") == 1, bad
    with workers() as start:
        proc = start("-s", "0.2")
        wait_for(lambda: get(served + "/healthz")[1:] == (
            "text/plain; charset=utf-8", "healthy: 1 live worker, no ready job\n"), 30,
            "a live worker, the mail job run")
        assert get(served + "/healthz")[0] == 200
        assert run("health").exit_code == 0
        proc.terminate()
        proc.wait(timeout=30)
    assert run("health").stdout == "unhealthy: no live worker\n"


def test_a_ready_job_over_the_bound_on_either_store(run: Any, conn: Any) -> None:
    ok(run, "enqueue", "-c", "true", "-q", "mail")
    wait_for(lambda: health(run, "--min-workers", "0", "--max-ready-age", "0")[0] == 1, 10,
             "the job to be older than 0 s")
    code, out = health(run, "--min-workers", "0", "--max-ready-age", "0")
    assert out.startswith("unhealthy: the oldest ready job (queue mail) is ")
    assert out.endswith(" s old, over 0 s\n") and len(out.splitlines()) == 1
    assert health(run, "--min-workers", "0", "-q", "default") == (
        0, "healthy: no live worker, no ready job\n")


@pytest.mark.stores("sqlite")
def test_a_postgresql_database_that_does_not_exist_is_not_created(run: Any) -> None:
    url = "postgresql://127.0.0.1:5432/queuectl_health_nowhere"
    for _ in range(2):
        result = run("--db", url, "health")
        assert result.exit_code == 1
        assert result.stdout == (f"unhealthy: the store cannot be reached: cannot connect to "
                                 f"{url}: connection failed: connection to server at "
                                 '"127.0.0.1", port 5432 failed: FATAL: database '
                                 '"queuectl_health_nowhere" does not exist\n')
