"""One replica runs the watchdog's check; the others serve its answer, and take over
when it stops renewing its lease."""

from __future__ import annotations

import asyncpg
import pytest

from listener.metrics import Metrics
from listener.watchdog import Watchdog
from tests.support.env import settings_for
from tests.support.metrics import sample
from tests.support.users import add_stale_users
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

INTERVAL_SECONDS = 1.0  # the lease lasts three of these


def replica(database_url: str, name: str) -> Watchdog:
    settings = settings_for(
        database_url, listener_name=name, watchdog_interval_seconds=INTERVAL_SECONDS
    )
    return Watchdog(settings, Metrics.fresh())


def stale_gauge(watchdog: Watchdog) -> float | None:
    return sample(watchdog.metrics, "token_reset_stale_users")


async def test_one_replica_checks_and_every_replica_exports_its_answer(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await add_stale_users(conn, 4, used=2)
    a, b = replica(database_url, "replica-a"), replica(database_url, "replica-b")
    try:
        await a.check_once()
        await b.check_once()
        assert (a.led_checks, b.led_checks) == (1, 0)
        assert stale_gauge(a) == stale_gauge(b) == 4
        # A change is seen by the follower once the holder has checked again.
        await add_stale_users(conn, 3, used=2)
        await b.check_once()
        assert stale_gauge(b) == 4
        await a.check_once()
        await b.check_once()
        assert stale_gauge(b) == 7
        assert b.led_checks == 0

        # The holder stops (crashed): once its lease runs out the other takes over.
        async def b_leads() -> bool:
            await b.check_once()
            return b.led_checks > 0

        await wait_until(b_leads, deadline=20, interval=0.2, what="takeover")
        assert stale_gauge(b) == 7
        led_before = a.led_checks
        await a.check_once()
        assert a.led_checks == led_before  # a follows now
    finally:
        a.close()
        b.close()
