"""The service's one HTTP port: /metrics, /healthz, /readyz and the admin endpoint.

Starlette on hypercorn: hypercorn's ``serve`` takes a ``shutdown_trigger`` and then
installs no signal handlers of its own, so anyio stays the single owner of SIGTERM
and SIGINT and one task group decides when everything stops.  We bind the socket
ourselves so HTTP_PORT=0 works (the kernel picks a port, we log the real one).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import cast

import anyio
import structlog
from anyio.abc import TaskStatus
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.admin_api import admin_routes
from listener.config import Settings
from listener.metrics import Metrics

# The logger name its events have always carried (the module was named http, which
# shadowed the standard library's): log queries keep matching.
log = structlog.get_logger("listener.http")

# Reasons the service is not ready; empty means ready.
Readiness = Callable[[], list[str]]
# Time hypercorn gives open requests to finish once shutdown starts.
GRACEFUL_SECONDS = 3.0


def create_app(settings: Settings, metrics: Metrics, readiness: Readiness) -> Starlette:
    """The ASGI app: probes, metrics from the injected registry, the admin routes."""

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        # Alive means the event loop answers; readiness is /readyz's question.
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        reasons = readiness()
        if reasons:
            return JSONResponse({"status": "not_ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready"})

    routes = [
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *admin_routes(settings, metrics),
    ]
    return Starlette(routes=routes)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: the kernel picks a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening now, so a client that read our port from the log is queued, not
        # refused, while hypercorn starts accepting.
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(
    app: Starlette,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; reports the bound port to start()."""
    try:
        sock = bind_socket(settings.http_host, settings.http_port)
    except OSError as exc:
        # The error says it all ("Address already in use"); a traceback would not help.
        log.error(  # noqa: TRY400
            "http_bind_failed", host=settings.http_host, port=settings.http_port, error=str(exc)
        )
        raise
    port = int(sock.getsockname()[1])
    config = Config()
    # hypercorn adopts the descriptor (and closes it); our socket object closes its own.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    sock.close()
    config.graceful_timeout = GRACEFUL_SECONDS
    config.accesslog = None
    # Its own records go through the stdlib root logger, i.e. our structlog renderer.
    config.errorlog = logging.getLogger("hypercorn.error")
    log.info("http_listening", host=settings.http_host, port=port)
    task_status.started(port)
    await serve(cast("ASGIFramework", app), config, shutdown_trigger=shutdown_trigger)


async def run_http(
    app: Starlette,
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop` is set or this task is cancelled; either way shut down gracefully.

    hypercorn runs under a shield, so a cancellation (a signal, a crashed sibling)
    becomes its orderly shutdown rather than an interrupted one; the shield gets a
    deadline of shutdown_timeout_seconds the moment shutdown begins.
    """
    shield = anyio.CancelScope(shield=True)

    async def serving(*, task_status: TaskStatus[int]) -> None:
        with shield:
            await serve_http(app, settings, shutdown_trigger=stop.wait, task_status=task_status)
        group.cancel_scope.cancel()  # hypercorn returned on its own: nothing left to wait for

    async with anyio.create_task_group() as group:
        task_status.started(await group.start(serving))
        try:
            await stop.wait()
        finally:
            stop.set()
            shield.deadline = anyio.current_time() + settings.shutdown_timeout_seconds
