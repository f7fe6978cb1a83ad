"""Unauthenticated calls to the cron endpoint: every one refused and counted, few logged.

Before, each refused request wrote a log line: 500 requests, 500 lines in 3 s, a
cheap way for anyone who can reach the port to flood the log pipeline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from structlog.testing import capture_logs

from listener.admin_api import RESET_PATH, admin_routes
from listener.config import Settings
from listener.metrics import Metrics
from tests.support.bulk import unreachable_url
from tests.support.metrics import sample

pytestmark = pytest.mark.anyio

SECRET = "unauthorized-storm-secret-9b2e41c7"
REQUESTS = 500
# One line per interval (10 s): a run of a few seconds logs once, at most a few times.
MAX_LINES = 3
WRONG: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-secret-of-some-length"},
    {"Authorization": f"Basic {SECRET}"},
    {"Authorization": "Bearer"},
]


@asynccontextmanager
async def endpoint(settings: Settings, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app that mounts only the admin routes (no database is ever reached)."""
    app = Starlette(routes=admin_routes(settings, metrics))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def storm(client: httpx.AsyncClient) -> list[int]:
    """REQUESTS refused calls, concurrently, POST and GET as cron services use them."""
    statuses: list[int] = []

    async def one(number: int) -> None:
        method = "GET" if number % 2 else "POST"
        response = await client.request(method, RESET_PATH, headers=WRONG[number % len(WRONG)])
        statuses.append(response.status_code)

    async with anyio.create_task_group() as group:
        for number in range(REQUESTS):
            group.start_soon(one, number)
    return statuses


async def test_wrong_credentials_are_all_refused_counted_and_barely_logged() -> None:
    """500 bad calls: 500 x 401, the counter says 500, a handful of log lines at most."""
    metrics = Metrics.fresh()
    settings = Settings(database_url=unreachable_url(), cron_secret=SECRET)
    with capture_logs() as logs:
        async with endpoint(settings, metrics) as client:
            statuses = await storm(client)
    assert statuses == [401] * REQUESTS
    counted = sample(metrics, "token_reset_admin_unauthorized_total")
    assert counted == REQUESTS
    lines = [entry for entry in logs if entry["event"] == "admin_reset_unauthorized"]
    assert 1 <= len(lines) <= MAX_LINES
    assert len(logs) == len(lines)  # nothing else was logged either: no database work
    assert lines[0]["suppressed"] == 0  # the first one is always told


async def test_calls_to_a_disabled_endpoint_are_refused_and_barely_logged() -> None:
    """CRON_SECRET unset: 503 for everyone, and the same log throttle."""
    with capture_logs() as logs:
        async with endpoint(Settings(database_url=unreachable_url()), Metrics.fresh()) as client:
            statuses = await storm(client)
    assert statuses == [503] * REQUESTS
    lines = [entry for entry in logs if entry["event"] == "admin_reset_refused"]
    assert 1 <= len(lines) <= MAX_LINES
