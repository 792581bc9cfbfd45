"""``/metrics`` and ``/healthz`` on the web server: the Prometheus text format of
``queuectl metrics`` and the checks of ``queuectl health``, read through the server's own
connection (``Dashboard.read``).

``/metrics`` passes the server's checks like any page (its token, when one is set:
``Authorization: Bearer TOKEN``). ``/healthz`` tells only healthy or not, so it needs no
token (``app._refusal``), and a probe cannot be given one in every orchestrator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from queuectl import health, metrics
from queuectl.errors import InvalidInput

if TYPE_CHECKING:
    from queuectl.dashboard.app import Dashboard

OPEN = ("/healthz",)  # paths served without the token


def routes(board: Dashboard) -> list[Route]:
    async def scrape(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        body = metrics.exposition(board.read)
        return Response(body, media_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        try:
            options = _options(request)
        except (InvalidInput, ValueError) as exc:
            return _line(400, f"Error: {exc}")
        try:
            found = board.read(lambda conn: health.check(conn, *options))
        except InvalidInput as exc:
            return _line(400, f"Error: {exc}")
        except health.store_errors() as exc:
            board.close()  # a lost connection: the next probe opens a new one
            found = health.unreachable(exc)
        return _line(200 if found.healthy else 503, found.message)

    return [Route("/metrics", scrape), Route("/healthz", healthz)]


def _options(request: Request) -> tuple[float, int, tuple[str, ...]]:
    """``max_ready_age``, ``min_workers`` and ``queue`` (repeatable) from the query, each
    optional, with ``queuectl health``'s defaults."""
    params = request.query_params
    age = float(params.get("max_ready_age", health.MAX_READY_AGE))
    workers = int(params.get("min_workers", health.MIN_WORKERS))
    health.check_options(age, workers)
    return age, workers, tuple(params.getlist("queue"))


def _line(status: int, text: str) -> Response:
    return Response(text + "\n", status, media_type="text/plain; charset=utf-8",
                    headers={"Cache-Control": "no-store"})
