"""The HTTP API that ``queuectl serve`` mounts under ``/api/v1``: JSON in and out, each
request authorized by ``Authorization: Bearer TOKEN``.

Reads answer exactly what the matching ``--json`` command prints (``queuectl.views``, the
same functions, through the same ``render.to_json``); writes are the CLI's decisions, each
run as the token's actor (``token:NAME``) so the ledger says who did it. Only the bearer
header authorizes: no cookie, so the dashboard's session can never make an API write, and
a page elsewhere cannot send the header without the browser asking this server first
(which allows no other origin). A token is looked up on every request: a revoked token
fails at once. Bad input of any kind is a 4xx with ``{"error": "..."}``, never a 500.
"""

from __future__ import annotations

import hmac
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from queuectl import actor, decisions, limits, reads, render, tokens, views
from queuectl.errors import Conflict, InvalidInput, NotFound, QueueError, StoreError
from queuectl.store import Db

if TYPE_CHECKING:
    from queuectl.dashboard.app import Dashboard

PREFIX = "/api/v1"
MAX_BODY = 1 << 20  # bytes of a request's body: a MiB holds thousands of jobs
JOB_READS = {"history": views.history, "logs": views.logs}
JOB_ACTIONS = ("cancel", "retry", "restart")
LIST_PARAMS = {"state", "queue", "limit", "after"}

_jobs_list = msgspec.json.Decoder(list[msgspec.Raw])
Endpoint = Callable[[Request], Awaitable[Response]]


class Refused(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


STATUS_OF = ((InvalidInput, 400), (NotFound, 404), (Conflict, 409), (StoreError, 503))


def create_api(board: Dashboard, token: str | None = None) -> Starlette:
    """The API over ``board``'s store; ``token``: ``serve --token``, an admin token too
    (acting as ``token:serve``)."""

    def holder(request: Request, scope: str) -> tokens.Holder:
        """Who the request's bearer token names, if it may act in ``scope``."""
        kind, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if kind.lower() != "bearer" or not given:
            raise Refused(401, "send Authorization: Bearer TOKEN (queuectl token add)",
                          {"WWW-Authenticate": "Bearer"})
        found = None
        if token and hmac.compare_digest(given.encode(errors="replace"), token.encode()):
            found = tokens.Holder(tokens.SERVE, "admin")
        else:
            found = board.read(lambda conn: tokens.holder(conn, given))
        if found is None:
            raise Refused(401, "unknown or revoked token",
                          {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if not found.allows(scope):
            raise Refused(403, f"token '{found.name}' has scope {found.scope}; this needs "
                          f"{scope}")
        return found

    def writer(request: Request, scope: str) -> tokens.Holder:
        """Who may write, checked before the request's body is read."""
        who = holder(request, scope)
        if board.read_only:
            raise Refused(403, "this server is read-only (queuectl serve --read-only)")
        return who

    def write(who: tokens.Holder, change: Callable[[Db], Any]) -> Any:
        """``change`` as the token's actor, on this thread: its events record who."""
        with actor.acting_as(f"token:{who.name}"):
            return change(board.conn)

    def read(request: Request, build: Callable[[Db], Any]) -> Response:
        holder(request, "read")
        return _json(board.read(build))

    async def jobs(request: Request) -> Response:
        if request.method == "POST":
            who = writer(request, "enqueue")
            specs = _specs(await _body(request))
            try:
                ids, _ = write(who, lambda conn: decisions.enqueue_unique(conn, specs))
            except NotFound as exc:  # a dependency: a value of the body, not this address
                raise InvalidInput(str(exc)) from None
            return _json({"ids": ids}, 201)
        given = _list_params(request)
        return read(request, lambda conn: views.jobs(conn, **given))

    async def job(request: Request) -> Response:
        job_id, part = _job_path(request)
        if request.method == "GET":
            if part in JOB_ACTIONS:
                raise Refused(405, f"{part} takes POST")
            show = JOB_READS.get(part or "", views.job)
            return read(request, lambda conn: show(conn, job_id))
        if part not in JOB_ACTIONS:
            raise Refused(405, "this address takes GET")
        return _json(write(writer(request, "admin"), lambda conn: _act(conn, part, job_id)))

    async def queue_action(request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in ("pause", "resume"):
            raise Refused(404, f"no action {action!r} (pause or resume)")
        who = writer(request, "admin")
        decisions.check_queue_name(name)
        pause = action == "pause"
        changed = write(who, lambda conn: decisions.pause_queue(conn, name, pause=pause))
        return _json({"queue": name, "paused": pause, "changed": changed})

    async def status(request: Request) -> Response:
        return read(request, views.status)

    async def queues(request: Request) -> Response:
        return read(request, views.queues)

    def guarded(endpoint: Endpoint) -> Endpoint:
        async def answer(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Refused as exc:
                return _error(exc.status, str(exc), exc.headers)
            except QueueError as exc:
                status = next(s for kind, s in (*STATUS_OF, (QueueError, 400))
                              if isinstance(exc, kind))
                if status == 503:
                    board.close()  # a lost connection: the next request opens a new one
                return _error(status, str(exc))
            except Exception:  # a driver's error, a bug: logged, never shown
                logging.getLogger("queuectl.api").exception("%s %s", request.method,
                                                            request.url.path)
                board.close()
                return _error(500, "something went wrong on the server; its log has the "
                              "details")
        return answer

    async def not_routed(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return _error(status, "no such address in the API" if status == 404 else
                      "this address does not take that method" if status == 405 else
                      "something went wrong on the server")

    routes = [
        Route("/jobs", guarded(jobs), methods=["GET", "POST"]),
        Route("/jobs/{rest:path}", guarded(job), methods=["GET", "POST"]),
        Route("/status", guarded(status), methods=["GET"]),
        Route("/queues", guarded(queues), methods=["GET"]),
        Route("/queues/{name:path}/{action}", guarded(queue_action), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_routed})


def _json(data: Any, status: int = 200) -> Response:
    """``data`` as the CLI's ``--json`` prints it, byte for byte (a newline at the end)."""
    return Response(render.to_json(data) + "\n", status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = msgspec.json.encode({"error": " ".join(reads.printable(message).split())})
    return Response(body + b"\n", status, media_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


# -- what a request says -----------------------------------------------------------------


async def _body(request: Request) -> bytes:
    """The body, at most MAX_BODY bytes: refused by its Content-Length before it is read,
    and counted while it is read (a chunked body has none)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise Refused(400, "Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise Refused(413, f"the body is over {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(413, f"the body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _specs(body: bytes) -> list[decisions.JobSpec]:
    """``enqueue``'s JSON job, or a list of them, checked by the code that checks the
    CLI's; a ``cwd`` must be absolute (an API caller has no directory of its own)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the body is not UTF-8 (byte {exc.start + 1})") from None
    if not text.lstrip(" \t\r\n").startswith("["):
        return [decisions.parse_spec(text, remote=True)]
    try:
        items = _jobs_list.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("malformed JSON: nested too deeply") from None
    if not items:
        raise InvalidInput("the list has no jobs")
    return [decisions.parse_spec(bytes(raw).decode(), f" #{n}", remote=True)
            for n, raw in enumerate(items, 1)]


def _list_params(request: Request) -> dict[str, Any]:
    """``GET /jobs``'s filters, checked as ``list``'s flags are; empty means not given."""
    params = request.query_params
    unknown = sorted(set(params) - LIST_PARAMS)
    if unknown:
        raise InvalidInput(f"unknown parameter {unknown[0]!r} (state, queue, limit, after)")
    given: dict[str, Any] = {k: v for k in LIST_PARAMS if (v := params.get(k))}
    if "state" in given:
        given["state"] = reads.check_state(given["state"]).value
    if "queue" in given:
        decisions.check_queue_name(given["queue"])
    if "limit" in given:
        given["limit"] = int(limits.parse("limit", given["limit"]))
    return given


def _job_path(request: Request) -> tuple[str, str | None]:
    """The job id and what of it (``history``, ``cancel``...) an address names. Ids may
    hold ``/``: the last segment is the part when it names one, and an id that ends like
    one is sent with its slashes as ``%2F``."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    _, _, rest = raw.partition(f"{PREFIX}/jobs/".encode())
    segments = rest.split(b"/") if rest else request.path_params["rest"].encode().split(b"/")
    part = None
    if len(segments) > 1 and segments[-1].decode(errors="replace") in (*JOB_READS,
                                                                       *JOB_ACTIONS):
        part = segments.pop().decode()
    job_id = urllib.parse.unquote_to_bytes(b"/".join(segments)).decode("utf-8",
                                                                        "surrogateescape")
    if not job_id:
        raise Refused(404, "no job id in the address")
    return reads.check_job_id(job_id), part


def _act(conn: Db, action: str, job_id: str) -> dict[str, Any]:
    if action == "cancel":
        return {"id": job_id, "result": decisions.cancel(conn, job_id)}
    if action == "retry":
        return {"id": job_id, "max_retries": decisions.dlq_retry(conn, job_id)}
    return {"id": job_id, "max_retries": decisions.restart(conn, job_id)}
