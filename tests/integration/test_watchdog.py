"""The watchdog against a real database: stale rows raise the missed-month gauge, a bulk
reset clears it, and a database outage keeps the last values without crashing.

The month never comes from the wall clock: users are made stale by moving
last_monthly_reset, and the listener's clock is the database's period start plus hours.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from listener.assessment import Assessment
from listener.bulk import run_bulk_reset
from listener.clock import utc_now
from listener.metrics import Metrics
from listener.watchdog import Watchdog, run_watchdog
from tests.support.database import TestServer
from tests.support.env import settings_for
from tests.support.metrics import sample
from tests.support.users import add_current_users, add_stale_users

pytestmark = pytest.mark.anyio

DEADLINE_SECONDS = 15.0


async def period_start(conn: asyncpg.Connection) -> datetime:
    """The current period's start, as the database defines it."""
    value: datetime = await conn.fetchval("SELECT token_reset_period_start()")
    return value


async def make_stale(conn: asyncpg.Connection, count: int) -> None:
    """`count` users still carrying last period's usage, plus two current ones."""
    await add_stale_users(conn, count, used=77)
    await add_current_users(conn, 2, used=5)


def clock_at(start: datetime, hours: float) -> Callable[[], datetime]:
    """A listener clock `hours` into the period that then runs with real time."""
    offset = start + timedelta(hours=hours) - utc_now()
    return lambda: utc_now() + offset


async def check(database_url: str, metrics: Metrics, clock: Callable[[], datetime]) -> Assessment:
    """One check by a fresh watchdog (as right after a restart)."""
    with closing(Watchdog(settings_for(database_url), metrics, clock=clock)) as watchdog:
        assessment = await watchdog.check_once()
    assert assessment is not None
    return assessment


def value(metrics: Metrics, name: str) -> float:
    """A gauge's current value from the registry (what /metrics would show)."""
    found = sample(metrics, name)
    assert found is not None, f"{name} is not exported"
    return found


async def test_stale_users_past_grace_raise_and_bulk_reset_clears(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """7 h into the month with stale users is a missed reset; the bulk backup fixes it."""
    await make_stale(conn, 3)
    metrics = Metrics.fresh()
    clock = clock_at(await period_start(conn), hours=7)
    with (
        capture_logs() as logs,
        closing(Watchdog(settings_for(database_url), metrics, clock=clock)) as watchdog,
    ):
        raised = await watchdog.check_once()
        assert raised is not None
        assert raised.reasons == ("stale_users", "no_resets")
        assert value(metrics, "token_reset_missed_month") == 1
        assert value(metrics, "token_reset_stale_users") == 3
        assert value(metrics, "token_reset_month_resets") == 0
        assert value(metrics, "token_reset_last_reset_timestamp_seconds") == 0

        result = await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()")
        assert '"reset_count": 3' in result
        cleared = await watchdog.check_once()
        await watchdog.check_once()
    assert cleared is not None
    assert not cleared.missed
    assert value(metrics, "token_reset_missed_month") == 0
    assert value(metrics, "token_reset_stale_users") == 0
    assert value(metrics, "token_reset_month_resets") == 3
    newest = await conn.fetchval("SELECT max(created_at) FROM token_transactions")
    assert value(metrics, "token_reset_last_reset_timestamp_seconds") == newest.timestamp()
    events = [entry["event"] for entry in logs if entry["event"].startswith("missed_reset")]
    assert events == ["missed_reset_alert_raised", "missed_reset_alert_cleared"]


async def test_one_hour_into_the_month_is_grace(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Stale users 1 h after midnight on the 1st are expected: counted, not paged."""
    await make_stale(conn, 4)
    metrics = Metrics.fresh()
    clock = clock_at(await period_start(conn), hours=1)
    assessment = await check(database_url, metrics, clock)
    assert assessment.in_grace
    assert value(metrics, "token_reset_stale_users") == 4
    assert value(metrics, "token_reset_missed_month") == 0


async def test_zero_resets_although_last_period_had_usage(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Usage wiped outside the ledger (nobody stale, no reset row) still pages."""
    await add_current_users(conn, 1, used=0)
    user_id = await conn.fetchval("SELECT user_id FROM user_tokens")
    # A deduction last period (the ledger accepts explicit times; rows are append-only).
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, created_at, period) "
        "VALUES ($1, 'deduct', 'chat', 9, token_reset_period_start() - interval '3 days',"
        " token_reset_period_label(token_reset_period_start() - interval '3 days'))",
        user_id,
    )
    metrics = Metrics.fresh()
    clock = clock_at(await period_start(conn), hours=7)
    assessment = await check(database_url, metrics, clock)
    assert assessment.snapshot.previous_period_had_usage
    assert assessment.reasons == ("no_resets",)
    assert value(metrics, "token_reset_missed_month") == 1


async def test_usage_two_periods_ago_does_not_count_as_last_period(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Only the previous period's ledger rows say 'last month had usage'."""
    await add_current_users(conn, 1, used=0)
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, created_at, period) "
        "SELECT user_id, 'deduct', 'chat', 9, token_reset_period_start() - interval '45 days', "
        "token_reset_period_label(token_reset_period_start() - interval '45 days') "
        "FROM user_tokens"
    )
    metrics = Metrics.fresh()
    clock = clock_at(await period_start(conn), hours=7)
    assessment = await check(database_url, metrics, clock)
    assert not assessment.snapshot.previous_period_had_usage
    assert value(metrics, "token_reset_missed_month") == 0


async def wait_for_gauge(metrics: Metrics, name: str, expected: float) -> None:
    """Wait (with a deadline) until the gauge shows the expected value."""
    with anyio.fail_after(DEADLINE_SECONDS):
        # A gauge has no event to await; re-reading it under a deadline is the condition.
        while sample(metrics, name) != expected:  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_run_watchdog_in_a_task_group(conn: asyncpg.Connection, database_url: str) -> None:
    """The service's entry point: raises on its interval, clears after the bulk reset."""
    await make_stale(conn, 2)
    metrics = Metrics.fresh()
    settings = settings_for(database_url, watchdog_interval_seconds=0.05)
    clock = clock_at(await period_start(conn), hours=7)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_watchdog(settings, metrics, clock=clock))
        await wait_for_gauge(metrics, "token_reset_missed_month", 1)
        assert value(metrics, "token_reset_stale_users") == 2
        await conn.execute("SELECT reset_monthly_tokens_for_all_users()")
        await wait_for_gauge(metrics, "token_reset_missed_month", 0)
        assert value(metrics, "token_reset_month_resets") == 2
        tg.cancel_scope.cancel()


async def test_database_outage_keeps_last_values_and_logs_once(
    conn: asyncpg.Connection, database_url: str, pg_server: TestServer
) -> None:
    """An unreachable database is logged once, the gauges keep their values, it recovers."""
    await make_stale(conn, 5)
    database = urlsplit(database_url).path.lstrip("/")
    metrics = Metrics.fresh()
    clock = clock_at(await period_start(conn), hours=7)
    admin = await pg_server.admin()
    try:
        with (
            capture_logs() as logs,
            closing(Watchdog(settings_for(database_url), metrics, clock=clock)) as watchdog,
        ):
            assert await watchdog.check_once() is not None
            # A real outage: no new connections, and the watchdog's own one is killed.
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = 'token-reset:watchdog'",
                database,
            )
            assert killed == 1
            outcomes = [await watchdog.check_once() for _ in range(3)]
            assert outcomes == [None, None, None]
            assert value(metrics, "token_reset_missed_month") == 1
            assert value(metrics, "token_reset_stale_users") == 5
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            assert await watchdog.check_once() is not None
    finally:
        await admin.close()
    events = [entry["event"] for entry in logs if entry["event"].startswith("watchdog_db")]
    assert events == ["watchdog_db_unavailable", "watchdog_db_recovered"]
    # Still raised: the outage neither cleared nor re-raised it.
    raised = [entry for entry in logs if entry["event"] == "missed_reset_alert_raised"]
    assert len(raised) == 1


async def test_period_boundaries_follow_the_configured_zone(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """With the month defined in UTC+14, grace counts from that zone's midnight, not UTC's."""
    await conn.execute("SELECT token_reset_configure('Pacific/Kiritimati')")
    await make_stale(conn, 2)
    start = await period_start(conn)
    assert start.utcoffset() == timedelta(0)  # an instant; asyncpg hands it over in UTC
    assert (start.hour, start.day) != (0, 1), "Kiritimati's midnight is not UTC's"
    metrics = Metrics.fresh()
    inside = await check(database_url, metrics, clock_at(start, hours=5))
    assert not inside.missed
    past = await check(database_url, metrics, clock_at(start, hours=7))
    assert past.missed
    assert past.snapshot.stale_users == 2


async def test_last_bulk_success_comes_from_the_database(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """A bulk run by another process (cron calling `token-reset reset`) moves this replica's
    last-success gauge, schedule or no schedule, restart or no restart."""
    metrics = Metrics.fresh()
    start = await period_start(conn)
    await check(database_url, metrics, clock_at(start, 1))
    assert value(metrics, "token_reset_bulk_last_success_timestamp_seconds") == 0

    result = await run_bulk_reset(settings_for(database_url), source="cli", metrics=None)
    await check(database_url, metrics, clock_at(start, 1))

    finished = await conn.fetchval(
        "SELECT extract(epoch FROM finished_at)::float8 FROM token_reset_bulk_runs"
        " WHERE run_id = $1",
        result.run_id,
    )
    assert value(metrics, "token_reset_bulk_last_success_timestamp_seconds") == pytest.approx(
        finished
    )
