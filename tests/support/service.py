"""An in-process service for tests: running in the test's task group, ready, counting right."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg

from listener.config import Settings
from listener.metrics import Metrics
from listener.service import Service
from tests.support.env import listener_settings
from tests.support.metrics import counted
from tests.support.users import ledger_counts
from tests.support.waiting import wait_until


@asynccontextmanager
async def running(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Service]:
    """The service running in this test's task group; stopped (and awaited) on exit."""
    async with anyio.create_task_group() as group:
        service: Service = await group.start(
            Service(settings, metrics or Metrics.fresh(), handle_signals=False).run
        )
        try:
            yield service
        finally:
            service.stop()


async def ready(service: Service) -> None:
    """Wait until the service is connected, listening and caught up."""
    await wait_until(lambda: not service.state.not_ready(), what="service readiness")


@asynccontextmanager
async def ready_listener(database_url: str) -> AsyncIterator[Service]:
    """The service with the tests' listener settings, running and ready (connected,
    listening, caught up) before the block starts; stopped on exit."""
    async with running(listener_settings(database_url)) as service:
        await ready(service)
        yield service


async def wait_counts_match_ledger(
    service: Service, conn: asyncpg.Connection, *, within: float = 15.0
) -> dict[str, int]:
    """Wait until the exported counters equal the ledger; returns the ledger counts."""
    truth: dict[str, int] = {}

    async def matches() -> bool:
        truth.update(await ledger_counts(conn))
        return counted(service.metrics) == truth

    await wait_until(matches, deadline=within, what="counters to equal the ledger")
    return truth


async def force_read(service: Service, conn: asyncpg.Connection) -> None:
    """Ring the doorbell with a valid payload and wait until the ledger was read again."""
    before = service.ledger.reads
    await conn.execute(
        "SELECT pg_notify('token_resets', json_build_object("
        "'v', 1, 'first_id', 1, 'last_id', 1, 'count', 1, 'nonce', gen_random_uuid())::text)"
    )
    await wait_until(lambda: service.ledger.reads > before, what="one more ledger read")
