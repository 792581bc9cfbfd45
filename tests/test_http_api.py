"""The HTTP API of ``queuectl serve`` (``/api/v1``), by real HTTP requests to a served
process, on both stores: tokens and scopes (401, 403), enqueue (201) and a worker running
the job, reads byte for byte equal to the CLI's ``--json``, admin actions, bad input (400,
404, 413, never a 500, nothing written), a revoked token failing on a running server,
``--read-only``, and the dashboard's cookie never authorizing the API."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import by_hand
from helpers import added, burst, ok, serving, workers

from queuectl import actor, decisions, ledger, tokens

pytest.importorskip("starlette", reason="pip install -e '.[test]' (the dashboard extra)")

SERVE_TOKEN = "serve-token-for-tests"
MiB = 1 << 20


@dataclass
class Served:
    """A ``queuectl serve`` process: ``call`` sends a request, ``tokens`` by scope."""

    port: int
    tokens: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, token: str | None = None, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """(status, headers, the body: decoded JSON if it is JSON, else bytes)."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            got = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        if got.get("content-type") == "application/json":
            return response.status, got, json.loads(data)
        return response.status, got, data

    def text(self, path: str, token: str) -> str:
        """A read's body as text, which must be a 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            return response.read().decode()
        finally:
            conn.close()


@pytest.fixture
def serve(db: Any) -> Iterator[Callable[..., Served]]:
    """Start ``queuectl serve`` (with ``--token``) on the test's database, created with a
    token of each scope; every server started is stopped at the end."""
    conn = ledger.connect(db)
    made = {scope: tokens.add(conn, scope, scope) for scope in tokens.SCOPES}
    conn.close()

    def start(*args: str) -> Served:
        port = stack.enter_context(serving("serve", "--token", SERVE_TOKEN, *args))
        return Served(port, dict(made))

    with ExitStack() as stack:
        yield start


def event_count(db: Any) -> int:
    with by_hand(db) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


# -- who may ---------------------------------------------------------------------------------


def test_no_or_unknown_token_is_401_and_a_narrow_scope_403(serve: Any) -> None:
    api = serve()
    read, enqueue = api.tokens["read"], api.tokens["enqueue"]
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer \xe9\xff"},
                    {"Authorization": "Bearer nope"},
                    {"Authorization": f"Bearer {read}x"}):
        status, got, body = api.call("GET", "/api/v1/status", headers=headers)
        assert status == 401, headers
        assert got["www-authenticate"].startswith("Bearer"), got
        assert set(body) == {"error"}
    assert api.call("GET", "/api/v1/status", read)[0] == 200
    assert api.call("GET", "/api/v1/status", enqueue)[0] == 200
    status, _, body = api.call("POST", "/api/v1/jobs", read, {"command": "true"})
    assert (status, body) == (403, {"error": "token 'read' has scope read; this needs enqueue"})
    for path in ("/api/v1/jobs/1/cancel", "/api/v1/queues/media/pause"):
        status, _, body = api.call("POST", path, enqueue)
        assert (status, body) == (403, {"error": "token 'enqueue' has scope enqueue; this "
                                                 "needs admin"})


def test_a_revoked_token_fails_on_the_running_server(serve: Any, run: Any) -> None:
    api = serve()
    assert api.call("GET", "/api/v1/queues", api.tokens["admin"])[0] == 200
    ok(run, "token", "revoke", "admin")
    status, _, body = api.call("GET", "/api/v1/queues", api.tokens["admin"])
    assert (status, body) == (401, {"error": "unknown or revoked token"})
    made = ok(run, "token", "add", "late", "--scope", "read").strip()
    assert api.call("GET", "/api/v1/queues", made)[0] == 200


def test_the_dashboards_cookie_never_authorizes_the_api(serve: Any, db: Any) -> None:
    api = serve()
    cookie = {"Cookie": f"queuectl_token={SERVE_TOKEN}", "Sec-Fetch-Site": "same-origin",
              "Origin": f"http://127.0.0.1:{api.port}"}
    before = event_count(db)
    status, _, _ = api.call("POST", "/api/v1/jobs", body={"command": "true"}, headers=cookie)
    assert status == 401
    status, _, _ = api.call("GET", f"/api/v1/status?token={SERVE_TOKEN}")
    assert status == 401
    assert event_count(db) == before
    # Without a token, a body is not even read: 401 before 400 or 413.
    assert api.call("POST", "/api/v1/jobs", body=b"not json")[0] == 401
    assert _declared(api.port, MiB + 1, None)[0] == 401
    # --token is an admin token of the API (sent as a bearer token, as any other).
    status, _, body = api.call("POST", "/api/v1/jobs", SERVE_TOKEN, {"command": "true"})
    assert status == 201
    with by_hand(db) as conn:
        (made,) = conn.execute("SELECT body FROM events WHERE job_id = ?",
                               (body["ids"][0],)).fetchone()
    assert json.loads(made)["by"] == "token:serve"
    # The pages still want it, and the Host allow-list guards the API too.
    assert api.call("GET", "/")[0] == 401
    status, _, _ = api.call("GET", "/api/v1/status", api.tokens["read"],
                            headers={"Host": "evil.example"})
    assert status == 400


def test_read_only_refuses_every_write_with_403(serve: Any, run: Any, db: Any) -> None:
    job_id = added(run, "-c", "true")
    api = serve("--read-only")
    before = event_count(db)
    for path, body in (("/api/v1/jobs", {"command": "true"}), (f"/api/v1/jobs/{job_id}/cancel",
                       None), ("/api/v1/queues/default/pause", None)):
        status, _, got = api.call("POST", path, api.tokens["admin"], body)
        assert (status, got) == (403, {"error": "this server is read-only (queuectl serve "
                                                "--read-only)"}), path
    assert event_count(db) == before
    assert api.call("GET", f"/api/v1/jobs/{job_id}", api.tokens["read"])[0] == 200


# -- enqueue and read ------------------------------------------------------------------------


def test_enqueue_is_201_with_the_ids_and_a_worker_runs_the_jobs(serve: Any, run: Any) -> None:
    api = serve()
    status, got, body = api.call("POST", "/api/v1/jobs", api.tokens["enqueue"],
                                 {"id": "one", "command": "echo from the api", "queue": "web"})
    assert (status, body) == (201, {"ids": ["one"]})
    assert got["content-type"] == "application/json"
    status, _, body = api.call("POST", "/api/v1/jobs", api.tokens["admin"], [
        {"command": "echo second", "after": ["one"]}, {"id": "third", "command": "exit 3",
                                                      "max_retries": 0, "cwd": "/"}])
    assert status == 201 and len(body["ids"]) == 2 and body["ids"][1] == "third"
    second = body["ids"][0]
    with workers() as start:
        burst(start)
    states = {j["id"]: j["state"] for j in json.loads(ok(run, "list", "--json"))}
    assert states == {"one": "completed", second: "completed", "third": "dead"}
    logs = json.loads(api.text("/api/v1/jobs/one/logs", api.tokens["read"]))
    assert logs[0]["output"] == "from the api\n"
    shown = json.loads(api.text("/api/v1/jobs/third", api.tokens["read"]))
    assert (shown["cwd"], shown["state"], shown["exit_code"]) == ("/", "dead", 3)
    # An API caller has no directory: a job without cwd runs in the worker's.
    assert json.loads(api.text("/api/v1/jobs/one", api.tokens["read"]))["cwd"] is None
    # Each event names who caused it: the token for the enqueue, the worker for its run.
    events = json.loads(api.text("/api/v1/jobs/one/history", api.tokens["read"]))
    assert [(e["type"], e["by"]) for e in events][0] == ("enqueued", "token:enqueue")
    assert events[-1]["type"] == "completed" and events[-1]["by"] == events[-1]["worker_id"]
    assert json.loads(api.text(f"/api/v1/jobs/{second}/history", api.tokens["read"]))[0][
        "by"] == "token:admin"


def test_every_read_is_byte_for_byte_what_the_cli_prints(serve: Any, run: Any) -> None:
    for n in range(4):
        added(run, "--id", f"j{n}", "-c", f"echo {n}", "-p", str(n % 2),
              "-q", "media" if n % 2 else "default")
    added(run, "--id", "deps/on-0", "-c", "true", "--after", "j0")
    ok(run, "queue", "pause", "media")
    with workers() as start:
        burst(start, "-q", "default")
    api = serve()
    read = api.tokens["read"]
    pairs = [
        ("/api/v1/jobs", ["list", "--json"]),
        ("/api/v1/jobs?state=pending", ["list", "--json", "-s", "pending"]),
        ("/api/v1/jobs?state=&queue=media&limit=1", ["list", "--json", "-q", "media",
                                                     "--limit", "1"]),
        ("/api/v1/jobs?limit=2&after=j1", ["list", "--json", "--limit", "2", "--after", "j1"]),
        ("/api/v1/jobs?state=pending&after=j1", ["list", "--json", "-s", "pending",
                                                 "--after", "j1"]),
        ("/api/v1/status", ["status", "--json"]),
        ("/api/v1/jobs/j0", ["show", "j0", "--json"]),
        ("/api/v1/jobs/deps/on-0", ["show", "deps/on-0", "--json"]),
        ("/api/v1/jobs/deps%2Fon-0/history", ["history", "deps/on-0", "--json"]),
        ("/api/v1/jobs/j0/history", ["history", "j0", "--json"]),
        ("/api/v1/jobs/j0/logs", ["logs", "j0", "--json"]),
        ("/api/v1/jobs/j1/logs", ["logs", "j1", "--json"]),
    ]
    for path, args in pairs:
        assert api.text(path, read) == ok(run, *args), path
    # How long a queue's oldest job has waited goes on growing between two reads.
    assert _waits_gone(api.text("/api/v1/queues", read)) == \
        _waits_gone(ok(run, "queues", "--json"))
    assert [j["id"] for j in json.loads(api.text("/api/v1/jobs?limit=2&after=j1", read))] == \
        ["j2", "j3"]
    assert [j["id"] for j in json.loads(api.text("/api/v1/jobs?state=pending&after=j1",
                                                 read))] == ["j3"]


def _waits_gone(text: str) -> list[dict[str, Any]]:
    rows = json.loads(text)
    for row in rows:
        row.pop("oldest_pending_wait")
    return rows


# -- admin -----------------------------------------------------------------------------------


def test_admin_cancels_retries_restarts_pauses_and_resumes(serve: Any, run: Any, db: Any
                                                           ) -> None:
    waiting = added(run, "-c", "true", "--delay", "3600")
    dead = added(run, "-c", "exit 2", "--max-retries", "0")
    done = added(run, "-c", "true")
    with workers() as start:
        burst(start)
    api = serve()
    admin = api.tokens["admin"]

    def post(path: str) -> tuple[int, Any]:
        status, _, body = api.call("POST", path, admin)
        return status, body

    assert post(f"/api/v1/jobs/{waiting}/cancel") == (200, {"id": waiting,
                                                            "result": "cancelled"})
    assert post(f"/api/v1/jobs/{dead}/retry") == (200, {"id": dead, "max_retries": 0})
    assert post(f"/api/v1/jobs/{done}/restart") == (200, {"id": done, "max_retries": 3})
    assert post("/api/v1/queues/media/pause") == (200, {"queue": "media", "paused": True,
                                                        "changed": True})
    assert post("/api/v1/queues/media/pause") == (200, {"queue": "media", "paused": True,
                                                        "changed": False})
    assert post("/api/v1/queues/media/resume") == (200, {"queue": "media", "paused": False,
                                                         "changed": True})
    states = {j["id"]: j["state"] for j in json.loads(ok(run, "list", "--json"))}
    assert states == {waiting: "cancelled", dead: "pending", done: "pending"}
    for job_id, made in ((waiting, "cancelled"), (dead, "requeued"), (done, "restarted")):
        last = json.loads(ok(run, "history", job_id, "--json"))[-1]
        assert (last["type"], last["by"]) == (made, "token:admin"), job_id
    with by_hand(db) as conn:
        paused = [r[0] for r in conn.execute(
            "SELECT body FROM events WHERE type IN ('queue-paused', 'queue-resumed') "
            "ORDER BY seq")]
    assert [json.loads(b)["by"] for b in paused] == ["token:admin", "token:admin"]
    status, body = post(f"/api/v1/jobs/{done}/retry")
    assert status == 409 and body == {"error": f"Job {done} is not in the dead letter queue "
                                                "(state: pending)"}
    for action in ("cancel", "retry", "restart"):
        assert post(f"/api/v1/jobs/nope/{action}") == (404, {"error": "Job 'nope' not found"})
    assert post("/api/v1/queues/media/drain")[0] == 404
    assert post("/api/v1/queues/team/media/pause") == (200, {"queue": "team/media",
                                                             "paused": True, "changed": True})
    assert post("/api/v1/queues/-bad/pause")[0] == 400
    assert api.call("GET", f"/api/v1/jobs/{done}/cancel", admin)[0] == 405
    assert api.call("POST", f"/api/v1/jobs/{done}", admin)[0] == 405


# -- bad input -------------------------------------------------------------------------------

BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "malformed JSON"),
    (b"\xff\xfe{}", "the body is not UTF-8"),
    (b'{"command": "\xe9"}', "the body is not UTF-8"),
    (b"not json", "malformed JSON"),
    (b"{", "malformed JSON"),
    (b"[]", "the list has no jobs"),
    (b"[", "malformed JSON"),
    (b"[" * 300_000 + b"]" * 300_000, "malformed JSON: nested too deeply"),
    (b"[" * 500_000, "malformed JSON"),
    (b'{"command": "true", "after": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "invalid job"),
    (b"\xef\xbb\xbf{}", "malformed JSON"),
    (b"{}", "invalid job: Object missing required field `command`"),
    (b'"echo"', "invalid job: Expected `object`, got `str`"),
    (b"42", "invalid job: Expected `object`, got `int`"),
    (b"null", "invalid job: Expected `object`, got `null`"),
    (b'{"command": "true", "priority": NaN}', "malformed JSON"),
    (b'{"command": "true", "timeout": 1e999}', "invalid job"),
    (b'{"command": "true", "max_retries": 1e400}', "invalid job"),
    (b'{"command": "true", "max_retries": 99999999999999999999999999}', "invalid job"),
    (b'{"command": "true", "priority": "high"}', "invalid job: Expected `int`, got `str`"),
    (b'{"command": ["ls"]}', "invalid job: Expected `str`, got `array`"),
    (b'{"command": "true", "colour": "red"}', "invalid job: Object contains unknown field"),
    (b'{"command": "true", "cwd": "relative/dir"}', "cwd must be an absolute path"),
    (b'{"command": "true", "env": {"1BAD": "x"}}', "environment variable name"),
    (b'{"command": "a\\u0000b"}', "command contains a NUL"),
    (b'{"command": "\\ud800"}', "malformed JSON"),
    (b'{"command": "true", "after": ["nope"]}', "dependency 'nope' is not a known job"),
    (b'[{"command": "true"}, {"command": ""}]', "invalid job #2: command is empty"),
    (b'[{"command": "true"}, 7]', "invalid job #2: Expected `object`, got `int`"),
    (b'{"command": "true", "run_at": "tomorrow"}', "is not an ISO-8601 time"),
]


def test_bad_bodies_are_400_with_one_error_and_write_nothing(serve: Any, db: Any) -> None:
    api = serve()
    before = event_count(db)
    for body, message in BAD_BODIES:
        status, got, answer = api.call("POST", "/api/v1/jobs", api.tokens["enqueue"], body)
        assert status == 400, (body, answer)
        assert got["content-type"] == "application/json"
        assert set(answer) == {"error"} and message in answer["error"], (body, answer)
    assert event_count(db) == before


def test_a_duplicate_id_is_409_and_bad_reads_are_400_or_404(serve: Any, run: Any) -> None:
    added(run, "--id", "taken", "-c", "true")
    api = serve()
    status, _, body = api.call("POST", "/api/v1/jobs", api.tokens["enqueue"],
                               {"id": "taken", "command": "true"})
    assert status == 409 and "taken" in body["error"]
    read = api.tokens["read"]
    for path, status in (
        ("/api/v1/jobs?state=bogus", 400), ("/api/v1/jobs?limit=0", 400),
        ("/api/v1/jobs?limit=1e99", 400), ("/api/v1/jobs?limit=-1", 400),
        ("/api/v1/jobs?queue=%00", 400), ("/api/v1/jobs?after=nope", 400),
        ("/api/v1/jobs?after=%00", 400), ("/api/v1/jobs?limit=99999999999999999999", 400),
        ("/api/v1/jobs?colour=red", 400), ("/api/v1/jobs?limit=%C2%B2", 400),
        ("/api/v1/jobs/nope", 404), ("/api/v1/jobs/nope/history", 404),
        ("/api/v1/jobs/nope/logs", 404), ("/api/v1/jobs/a%00b", 404),
        ("/api/v1/jobs/%FF%FE", 404), ("/api/v1/nothing", 404), ("/api/v1/", 404),
    ):
        got, headers, body = api.call("GET", path, read)
        assert got == status, (path, body)
        assert headers["content-type"] == "application/json" and set(body) == {"error"}


def test_a_body_over_a_mebibyte_is_413_by_its_length_or_as_it_is_read(serve: Any, db: Any
                                                                       ) -> None:
    api = serve()
    before = event_count(db)
    # Declared too long: refused before it is sent.
    assert _declared(api.port, MiB + 1, api.tokens["enqueue"]) == (
        413, {"error": f"the body is over {MiB} bytes"})
    # Chunked (no length): counted as it is read.
    padding = b" " * (MiB - 30)
    big = b'{"command": "true"}' + padding + b" " * 20

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    conn.request("POST", "/api/v1/jobs", body=chunks(), encode_chunked=True,
                 headers={"Authorization": f"Bearer {api.tokens['enqueue']}",
                          "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413, response.read()
    conn.close()
    assert event_count(db) == before
    # Just under the limit is fine.
    status, _, _ = api.call("POST", "/api/v1/jobs", api.tokens["enqueue"],
                            b'{"command": "true"}' + b" " * (MiB - 19))
    assert status == 201


def _declared(port: int, length: int, token: str | None) -> tuple[int, Any]:
    """The status and JSON answer to a POST that declares a body of ``length`` bytes and
    sends none."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/api/v1/jobs")
    if token is not None:
        conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    try:
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# -- who did it ------------------------------------------------------------------------------


@pytest.mark.stores("sqlite")
def test_each_api_write_runs_as_its_token(db: Any, run: Any, monkeypatch: Any) -> None:
    """The write runs inside ``actor.acting_as("token:NAME")``, on the request's thread:
    ``ledger.append`` stamps what it appends there with that name."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using `httpx`")
        from starlette.testclient import TestClient

    from queuectl.dashboard.app import create_app

    job_id = added(run, "-c", "true", "--delay", "600")
    conn = ledger.connect(db)
    made = tokens.add(conn, "ci", "admin")
    conn.close()
    seen: list[str] = []
    for name in ("enqueue_unique", "cancel", "pause_queue"):
        real = getattr(decisions, name)
        monkeypatch.setattr(decisions, name, lambda *a, _real=real, **k: (
            seen.append(actor.current()), _real(*a, **k))[1])
    headers = {"Authorization": f"Bearer {made}"}
    with TestClient(create_app(str(db), token=SERVE_TOKEN),
                    base_url="http://127.0.0.1:8765") as client:
        assert client.post("/api/v1/jobs", json={"command": "true"},
                           headers=headers).status_code == 201
        assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
        assert client.post("/api/v1/queues/q/pause", headers={
            "Authorization": f"Bearer {SERVE_TOKEN}"}).status_code == 200
    assert seen == ["token:ci", "token:ci", "token:serve"]
    assert actor.current() != "token:ci"
