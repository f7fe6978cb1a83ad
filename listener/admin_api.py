"""`/api/admin/reset-monthly-tokens` (issue 4).  STUB: interface fixed, body to be written."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from listener.config import Settings
from listener.metrics import Metrics

RESET_PATH = "/api/admin/reset-monthly-tokens"


def admin_routes(settings: Settings, metrics: Metrics) -> list[BaseRoute]:
    """The cron endpoint's routes, to mount on the service's one HTTP app."""

    async def reset(request: Request) -> Response:
        return JSONResponse({"success": False, "error": "not implemented yet"}, status_code=503)

    return [Route(RESET_PATH, reset, methods=["GET", "POST"])]
