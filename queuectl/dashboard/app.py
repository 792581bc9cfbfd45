"""The dashboard's web application: pages that read through ``reads``, actions that go
through ``decisions`` (so each is an event in the ledger like any other), and the checks
every request passes first.

Safe by default: the CLI binds it to loopback; beyond it a token is required. Every
request's Host must be one the dashboard was told it is reached by (DNS rebinding), every
POST must come from its own pages (``Sec-Fetch-Site`` or ``Origin``), and the CSP lets no
script run but its own file. Templates are autoescaped: commands, output and ids are
user text.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from queuectl import actor, clock, decisions, ledger, output, reads, render, watch
from queuectl import events as ev
from queuectl.dashboard import charts, http_api, probes
from queuectl.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    QueueError,
    StoreError,
    StoreUnavailable,
)
from queuectl.records import FailedRun, Run
from queuectl.states import CANCELLABLE, STATES, State
from queuectl.store import Db

HERE = Path(__file__).parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
DASHBOARD_ACTOR = "dashboard"  # who the pages' actions are recorded as (``by``)
TOKEN_COOKIE, FLASH_COOKIE = "queuectl_token", "queuectl_flash"
TIMELINE = 1000  # events of a job's timeline shown (the newest); history ID has them all
MAX_TEXT = 200  # characters of a search

STATUS_OF = {InvalidInput: 400, NotFound: 404, Conflict: 409, StoreError: 503}
T = TypeVar("T")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Dashboard:
    """One connection to the store, opened on first use and used by one request at a time
    (the pages run on the server's event loop: a local dashboard has few readers). Every
    page reads through ``read``."""

    def __init__(self, target: str, read_only: bool) -> None:
        self.target = target
        self.read_only = read_only
        self._conn: Db | None = None

    @property
    def conn(self) -> Db:
        if self._conn is None:
            self._conn = ledger.connect(self.target, create=False)
        return self._conn

    def read(self, build: Callable[[Db], T]) -> T:
        """``build`` in one read transaction, whose BEGIN is the first statement sent: a
        lost connection shows there, as StoreUnavailable. Then the reads run once more on
        a new connection: they change nothing, so a dashboard whose server restarted while
        it sat idle shows its next page as if nothing happened. Lost again, or no new
        connection (the server still away), the error stands: a 503 page, and the request
        after it connects anew."""
        try:
            return self._read_once(build)
        except StoreUnavailable:
            self.close()
        return self._read_once(build)

    def _read_once(self, build: Callable[[Db], T]) -> T:
        conn = self.conn
        with conn.snapshot():
            return build(conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def create_app(target: str, *, token: str | None = None, read_only: bool = False,
               hosts: Iterable[str] = LOOPBACK) -> Starlette:
    """The dashboard of the store ``target``. ``hosts``: the names it may be reached by
    (the Host header, without port); ``token``: if given, required on every request."""
    board = Dashboard(target, read_only)
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters.update(human=clock.human, seconds=charts.seconds, quote=_quote)
    env.globals.update(read_only=read_only, states=[s.value for s in STATES],
                       cancellable=[s.value for s in CANCELLABLE])

    def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        """A page, or for a poll only its live part, marked with the ledger's head."""
        context.setdefault("head", None)
        if request.headers.get("x-poll"):
            html = env.get_template(f"{name}.html").render(request=request, **context)
            return HTMLResponse(html, status, headers=_etag(context["head"]))
        flash = urllib.parse.unquote(request.cookies.get(FLASH_COOKIE, ""))[:500]
        html = env.get_template("page.html").render(
            request=request, fragment=f"{name}.html", flash=flash, **context)
        response = HTMLResponse(html, status, headers=_etag(context["head"]))
        if flash:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    def live(build: Callable[[Request, Db], dict[str, Any]], name: str
             ) -> Callable[[Request], Awaitable[Response]]:
        """A page that polls: unchanged since the head the poller saw, it answers 304
        after one small read, before anything else is read. (Only polls: a page a
        browser revalidates after an action that changed nothing must still show its
        message.) The head is read in the page's own snapshot: the ETag names exactly
        what the page shows."""
        def view(request: Request, conn: Db) -> tuple[int, dict[str, Any] | None]:
            head = reads.head(conn)
            if request.headers.get("x-poll") and \
                    request.headers.get("if-none-match") == _etag(head)["ETag"]:
                return head, None
            return head, build(request, conn)

        async def endpoint(request: Request) -> Response:
            head, context = board.read(lambda conn: view(request, conn))
            if context is None:
                return Response(status_code=304, headers=_etag(head))
            return page(request, name, head=head, **context)
        return endpoint

    async def output_since(request: Request) -> Response:
        return JSONResponse(board.read(lambda conn: live_output(request, conn)),
                            headers={"Cache-Control": "no-store"})

    async def act(request: Request) -> Response:
        if board.read_only:
            raise HTTPException(403, "This dashboard is read-only.")
        form = await _form(request)
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise HTTPException(404, f"No action {action!r}.")
        with actor.acting_as(DASHBOARD_ACTOR):
            message, back = ACTIONS[action](board.conn, form)
        response = RedirectResponse(back, status_code=303)
        response.set_cookie(FLASH_COOKIE, urllib.parse.quote(message), path="/",
                            httponly=True, samesite="strict")
        return response

    async def failed(request: Request, exc: Exception) -> Response:
        status, message = _status(exc)
        if status == 503:
            board.close()  # a lost connection: the next request opens a new one
        return page(request, "error", status, title=_TITLES.get(status, "Error"),
                    message=message)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            board.close()

    routes = [
        Route("/", live(overview, "overview")),
        Route("/jobs", live(jobs, "jobs")),
        Route("/jobs/{job_id:path}", live(job_detail, "job")),
        Route("/output/{job_id:path}", output_since),
        Route("/dlq", live(dlq, "dlq")),
        Route("/queues", live(queues, "queues")),
        Route("/schedules", live(schedules_page, "schedules")),
        Route("/workers", live(workers, "workers")),
        Route("/actions/{action}", act, methods=["POST"]),
        *probes.routes(board),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        Mount(http_api.PREFIX, app=http_api.create_api(board, token)),
    ]
    guard = Middleware(BaseHTTPMiddleware, dispatch=_guard(
        {h.lower().strip("[]") for h in hosts}, token, board))
    return Starlette(routes=routes, middleware=[guard], lifespan=lifespan,
                     exception_handlers={QueueError: failed, HTTPException: failed})


# -- what every request passes ------------------------------------------------------------


def _guard(hosts: set[str], token: str | None, board: Dashboard
           ) -> Callable[..., Awaitable[Response]]:
    async def dispatch(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                       ) -> Response:
        response = _refusal(request, hosts, token)
        if response is None and token and not _is_api(request) and \
                request.query_params.get("token") == token:
            # A link with the token: keep it in a cookie and show the address without it.
            query = urllib.parse.urlencode(
                [(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), 303)
            response.set_cookie(TOKEN_COOKIE, token, path="/", httponly=True,
                                samesite="strict")
        started = time.perf_counter()
        if response is None:
            try:
                response = await call_next(request)
            except Exception:  # a driver's error, a bug: logged, never shown as a traceback
                logging.getLogger("queuectl.dashboard").exception("%s %s", request.method,
                                                                  request.url.path)
                board.close()  # the connection may be what failed: the next request opens anew
                response = _plain(500, "Something went wrong on the server; its log has "
                                  "the details.")
        response.headers.update(HEADERS)
        # What the server took, for the browser's network panel and tools/bench.py.
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response
    return dispatch


def _refusal(request: Request, hosts: set[str], token: str | None) -> Response | None:
    """Why this request is refused, as the response to send; None: it may go on."""
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name.lower().strip("[]") not in hosts:
        return _plain(400, f"Host {host!r} is not one this dashboard answers to "
                      "(queuectl dashboard --allow-host NAME).")
    if _is_api(request):
        return None  # bearer tokens only, checked by the API itself: no cookie, no origin
    if token and not _has_token(request, token) and request.url.path not in probes.OPEN:
        return _plain(401, "This dashboard needs its token: open the address queuectl "
                      "dashboard printed (…/?token=TOKEN), or send Authorization: Bearer "
                      "TOKEN.")
    if request.method not in ("GET", "HEAD"):
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if site != "same-origin" and origin != f"{request.url.scheme}://{host}":
            return _plain(403, "Refused: this request did not come from the dashboard's own "
                          "pages (Sec-Fetch-Site / Origin).")
    return None


def _is_api(request: Request) -> bool:
    path = request.url.path
    return path == http_api.PREFIX or path.startswith(f"{http_api.PREFIX}/")


def _has_token(request: Request, token: str) -> bool:
    given = [request.cookies.get(TOKEN_COOKIE, ""), request.query_params.get("token", "")]
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given.append(bearer)
    return any(hmac.compare_digest(g.encode(), token.encode()) for g in given if g)


def _plain(status: int, message: str) -> Response:
    return Response(message + "\n", status, media_type="text/plain; charset=utf-8")


def _etag(head: int | None) -> dict[str, str]:
    return {} if head is None else {"ETag": f'"h{head}"', "Cache-Control": "no-cache"}


_TITLES = {400: "Bad request", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
           409: "Conflict", 503: "Store unavailable", 500: "Server error"}


def _status(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    for kind, status in STATUS_OF.items():
        if isinstance(exc, kind):
            return status, str(exc)
    return 400, str(exc)


def _quote(text: str) -> str:
    """A job id as a path segment (ids may hold / : @ +)."""
    return urllib.parse.quote(str(text), safe="")


async def _form(request: Request) -> dict[str, str]:
    """A POSTed HTML form (url-encoded, small): each field's last value."""
    if request.headers.get("content-type", "").split(";")[0] != \
            "application/x-www-form-urlencoded":
        raise InvalidInput("expected a form (application/x-www-form-urlencoded)")
    body = await request.body()
    if len(body) > 10_000:
        raise InvalidInput("form too large")
    try:
        return dict(urllib.parse.parse_qsl(body.decode(), strict_parsing=False))
    except UnicodeDecodeError:
        raise InvalidInput("form is not UTF-8") from None


# -- the pages ----------------------------------------------------------------------------


def _filters(request: Request) -> dict[str, str | None]:
    """The state, queue and search text of a job list, checked."""
    params = request.query_params
    state = params.get("state") or None
    if state is not None and state not in {s.value for s in STATES}:
        raise InvalidInput(f"unknown state {state!r}: one of {', '.join(STATES)}")
    queue = params.get("queue") or None
    if queue is not None:
        decisions.check_queue_name(queue)
    text = params.get("q") or None
    if text is not None and (len(text) > MAX_TEXT or "\0" in text):
        raise InvalidInput(f"search text: at most {MAX_TEXT} characters, no NUL")
    return {"state": state, "queue": queue, "q": text, "after": params.get("after") or None}


def overview(request: Request, conn: Db) -> dict[str, Any]:
    counts = reads.counts(conn)
    per_queue = reads.queue_counts(conn)
    active = reads.running_workers(conn)
    ended = reads.worker_counts(conn)
    activity = reads.activity(conn)
    return {"title": "Overview", "counts": counts, "queues": per_queue, "workers": active,
            "ended": ended, "failures": _failures(conn), "activity": activity,
            "throughput": charts.bars(activity), "wait": charts.lines(activity, "wait"),
            "run_time": charts.lines(activity, "run_time"), "total": sum(counts.values())}


def _failures(conn: Db) -> list[tuple[FailedRun, str, str]]:
    """The newest failed runs, as ``status --watch`` lists them: each with how long ago it
    ended and what went wrong, in the words the live view uses."""
    now = conn.now()
    return [(run, watch.age(clock.seconds_between(run.finished_at, now)), watch.failure(run))
            for run in reads.newest_failures(conn, watch.FAILURES)]


def jobs(request: Request, conn: Db) -> dict[str, Any]:
    f = _filters(request)
    found, cursor, walked = reads.find_jobs(conn, f["state"], f["queue"], f["q"], f["after"])
    exact = None
    if f["q"] and not f["after"]:
        try:
            exact = reads.get_job(conn, f["q"]).id
        except (NotFound, InvalidInput):
            pass
    return {"title": "Jobs", "jobs": found, "cursor": cursor, "walked": walked, "exact": exact,
            "filters": f, "queue_names": sorted(reads.queue_counts(conn)),
            "next_query": _query(f, after=cursor), "first_query": _query(f, after=None)}


def job_detail(request: Request, conn: Db) -> dict[str, Any]:
    job_id = request.path_params["job_id"]
    job = reads.get_job(conn, job_id)
    deps = {dep: _state_of(conn, dep) for dep in job.after}
    events = reads.history(conn, job_id)
    runs = reads.runs_of(conn, job_id)
    timeline = [{"seq": seq, "at": at, "type": event.type, "details": render.event_details(event),
                 "worker_id": getattr(event, "worker_id", None)}
                for seq, at, event in events[-TIMELINE:]]
    return {"title": f"Job {job_id}", "job": job, "deps": deps, "timeline": timeline,
            "events": len(events), "runs": _with_requeues(runs, events),
            "live": _running_output(conn, job_id, runs)}


LIVE_SHOWN = 65536  # characters of a running job's output a page starts with (its end)


def _running_output(conn: Db, job_id: str, runs: list[Run]) -> dict[str, Any] | None:
    """The output so far of the job's running run, and where the page's script goes on
    reading it (``live_output``)."""
    if not runs or runs[-1].finished_at is not None:
        return None
    reader = output.Reader(job_id, runs[-1])
    text = reader.more(conn)
    if len(text) > LIVE_SHOWN:
        text = f"[... earlier output: queuectl logs {job_id} --full ...]\n{text[-LIVE_SHOWN:]}"
    return {"run": runs[-1].run, "text": text, "seq": reader.seq, "end": reader.end}


def live_output(request: Request, conn: Db) -> dict[str, Any]:
    """``/output/ID?run=N&seq=S&end=E``: what run N of job ID wrote after chunk S (which
    ended at byte E), and whether it still runs; the job page's script polls it."""
    job_id = request.path_params["job_id"]
    given = [request.query_params.get(k, "0") for k in ("run", "seq", "end")]
    # ASCII digits, and no more than a 64-bit integer holds: int() takes '²' and ' -1 ',
    # and a store refuses a number past 2**63 with a driver error.
    if not all(g.isascii() and g.isdigit() and len(g) <= 18 for g in given):
        raise InvalidInput("run, seq and end are whole numbers")
    number, seq, end = map(int, given)
    runs = reads.runs_of(conn, job_id)
    if not 1 <= number <= len(runs):
        raise NotFound(f"Job {job_id!r} has no run {number}")
    run = runs[number - 1]
    reader = output.Reader(job_id, run)
    reader.seq, reader.end = seq, end
    return {"text": reader.more(conn), "seq": reader.seq, "end": reader.end,
            "running": run.finished_at is None}


def _with_requeues(runs: list[Run], events: list[tuple[int, str, ev.Event]]
                   ) -> list[Run | dict[str, Any]]:
    """The runs (one a ``claimed`` event), with each requeue from the DLQ between the runs
    before it and those after, as ``{"requeued": True, ...}``: a requeue starts the attempts
    again from 1."""
    shown: list[Run | dict[str, Any]] = []
    taken = claims = 0
    for _, at, event in events:
        if isinstance(event, ev.Claimed):
            claims += 1
        elif isinstance(event, ev.Requeued):
            shown += runs[taken:claims]
            taken = claims
            shown.append({"requeued": True, "at": at, "max_retries": event.max_retries})
    return shown + runs[taken:]


def dlq(request: Request, conn: Db) -> dict[str, Any]:
    f = _filters(request)
    found, cursor, _ = reads.find_jobs(conn, State.DEAD, f["queue"], None, f["after"])
    f["state"] = State.DEAD
    per_queue = reads.queue_counts(conn)  # what retry-all would take, from job_counts: O(1)
    dead = per_queue.get(f["queue"], {}).get(State.DEAD, 0) if f["queue"] \
        else reads.counts(conn)[State.DEAD]
    return {"title": "Dead letter queue", "jobs": found, "cursor": cursor, "filters": f,
            "dead": dead, "queue_names": sorted(per_queue),
            "next_query": _query({"queue": f["queue"]}, after=cursor),
            "first_query": _query({"queue": f["queue"]})}


def queues(request: Request, conn: Db) -> dict[str, Any]:
    return {"title": "Queues", "queues": reads.queues(conn)}


def schedules_page(request: Request, conn: Db) -> dict[str, Any]:
    from queuectl import schedules

    return {"title": "Schedules", "schedules": schedules.listed(conn)}


def workers(request: Request, conn: Db) -> dict[str, Any]:
    return {"title": "Workers", "workers": reads.running_workers(conn),
            "ended": reads.worker_counts(conn)}


def _state_of(conn: Db, job_id: str) -> str:
    try:
        return reads.get_job(conn, job_id).state
    except NotFound:
        return "pruned"


def _query(filters: dict[str, str | None], **more: str | None) -> str:
    given = {k: v for k, v in {**filters, **more}.items() if v}
    return urllib.parse.urlencode(given)


# -- the actions: each one decision, as the CLI makes it ----------------------------------


def _job_back(job_id: str) -> str:
    return f"/jobs/{_quote(job_id)}"


def retry(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    job_id = _field(form, "job")
    max_retries = decisions.dlq_retry(conn, job_id)
    return f"Job {job_id} requeued with max_retries = {max_retries}.", _job_back(job_id)


def retry_all(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    queue = form.get("queue") or None
    if queue is not None:
        decisions.check_queue_name(queue)
    requeued, skipped = decisions.dlq_retry_all(conn, queue)
    held = f"; {skipped:,} left dead (unique key held)" if skipped else ""
    return (f"Requeued {requeued:,} job{'s' if requeued != 1 else ''} from the dead letter "
            f"queue{held}.", "/dlq" + (f"?queue={_quote(queue)}" if queue else ""))


def cancel(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    job_id = _field(form, "job")
    if decisions.cancel(conn, job_id) == "requested":
        return f"Cancel requested for running job {job_id}; its worker will stop it.", \
            _job_back(job_id)
    return f"Job {job_id} cancelled.", _job_back(job_id)


def pause(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    name = _field(form, "queue")
    changed = decisions.pause_queue(conn, name)
    return (f"Queue '{name}' paused." if changed else f"Queue '{name}' was paused already.",
            "/queues")


def resume(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    name = _field(form, "queue")
    changed = decisions.pause_queue(conn, name, pause=False)
    return (f"Queue '{name}' resumed." if changed else f"Queue '{name}' was not paused.",
            "/queues")


def limit(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    from queuectl import limits

    name = _field(form, "queue")
    n = int(limits.parse("queue_limit", _field(form, "limit")))
    changed = decisions.limit_queue(conn, name, n)
    shown = f"at most {n} jobs at once" if n else "no limit"
    return (f"Queue '{name}': {shown}." if changed else f"Queue '{name}' had {shown} already.",
            "/queues")


def schedule_pause(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    from queuectl import schedules

    name = _field(form, "schedule")
    changed = schedules.pause(conn, name)
    return (f"Schedule '{name}' paused." if changed else
            f"Schedule '{name}' was paused already.", "/schedules")


def schedule_resume(conn: Db, form: dict[str, str]) -> tuple[str, str]:
    from queuectl import schedules

    name = _field(form, "schedule")
    changed = schedules.pause(conn, name, paused=False)
    return (f"Schedule '{name}' resumed." if changed else f"Schedule '{name}' was not paused.",
            "/schedules")


ACTIONS: dict[str, Callable[[Db, dict[str, str]], tuple[str, str]]] = {
    "retry": retry, "retry-all": retry_all, "cancel": cancel, "pause": pause,
    "resume": resume, "limit": limit, "schedule-pause": schedule_pause,
    "schedule-resume": schedule_resume}


def _field(form: dict[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise InvalidInput(f"the form has no {name}")
    return value
