"""The listener against a real database: every reset path is counted exactly once."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.support.metrics import counted, notifications
from tests.support.service import (
    force_read,
    ready_listener,
    wait_counts_match_ledger,
)
from tests.support.users import (
    add_stale_users,
    ledger_counts,
    reset_by_bulk,
    reset_by_function,
    reset_by_trigger,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def test_trigger_function_and_bulk_resets_are_counted_exactly_once(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Each path's resets appear in token_reset_users_total once, matching the ledger."""
    users = await add_stale_users(conn, 30)
    async with ready_listener(database_url) as service:
        await reset_by_trigger(conn, users[:10])
        await reset_by_function(conn, users[10:15])
        assert await reset_by_bulk(conn) == 15
        truth = await wait_counts_match_ledger(service, conn)
        assert truth == {"trigger": 10, "function": 5, "bulk": 15}
        # Duplicate doorbells and a fresh read must not count anything twice.
        await force_read(service, conn)
        assert counted(service.metrics) == truth


async def test_gauges_and_lag_come_from_the_ledger(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The last-reset gauge is the newest ledger row's time; every batch observes lag."""
    users = await add_stale_users(conn, 3)
    async with ready_listener(database_url) as service:
        await reset_by_trigger(conn, users)
        await wait_counts_match_ledger(service, conn)
        registry = service.metrics.registry
        newest = await conn.fetchval(
            "SELECT extract(epoch FROM max(created_at))::float8 FROM token_transactions"
            " WHERE operation = 'reset'"
        )
        assert registry.get_sample_value("token_reset_last_reset_timestamp_seconds") == newest
        observed = registry.get_sample_value("token_reset_event_lag_seconds_count")
        assert observed is not None
        assert observed >= 1


async def test_a_smaller_id_committed_late_is_still_counted(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Ids are drawn at INSERT but visible at COMMIT: the cursor must not skip the early one."""
    first, second = await add_stale_users(conn, 2)
    async with ready_listener(database_url) as service:
        slow = await asyncpg.connect(database_url)
        try:
            transaction = slow.transaction()
            await transaction.start()
            await reset_by_trigger(slow, [first])  # draws the smaller id, stays open
            await reset_by_trigger(conn, [second])  # larger id, committed, doorbell rings
            await force_read(service, conn)
            # Counting the larger id now would move the cursor past the open one.
            assert counted(service.metrics)["trigger"] == 0
            await transaction.commit()
        finally:
            await slow.close()
        truth = await wait_counts_match_ledger(service, conn)
        assert truth["trigger"] == 2


async def test_malformed_and_forged_doorbells_never_change_counts(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Garbage is counted as malformed; a forged id range causes only a harmless read."""
    users = await add_stale_users(conn, 4)
    async with ready_listener(database_url) as service:
        await reset_by_trigger(conn, users)
        truth = await wait_counts_match_ledger(service, conn)
        reads = service.ledger.reads
        bad = [
            "garbage",
            '{"v": 2, "first_id": 1, "last_id": 2, "count": 2}',
            '{"v": 1, "first_id": 9, "last_id": 3, "count": 1}',
            '{"v": 1, "first_id": -1, "last_id": 3, "count": 1}',
            '{"v": 1, "first_id": "1", "last_id": 3, "count": 1}',
            "x" * 2000,
            # Forged: claims a million resets the ledger never handed out ids for.
            '{"v": 1, "first_id": 1, "last_id": 999999, "count": 999999}',
        ]
        for payload in bad:
            await conn.execute("SELECT pg_notify('token_resets', $1)", payload)
        await wait_until(
            lambda: notifications(service.metrics, "malformed") == len(bad),
            what="every bad payload counted as malformed",
        )
        await wait_until(lambda: service.ledger.reads > reads, what="the harmless read")
        assert counted(service.metrics) == truth == await ledger_counts(conn)


async def test_a_burst_of_10000_doorbells_costs_a_handful_of_reads(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Doorbells are coalesced: one read drains any number of pending ones."""
    users = await add_stale_users(conn, 1)
    async with ready_listener(database_url) as service:
        await reset_by_trigger(conn, users)
        await wait_counts_match_ledger(service, conn)
        reads = service.ledger.reads
        # Distinct payloads: PostgreSQL folds identical ones within a transaction.
        await conn.execute(
            "SELECT pg_notify('token_resets', json_build_object("
            "'v', 1, 'first_id', 1, 'last_id', 1, 'count', 1, 'n', g)::text)"
            " FROM generate_series(1, 10000) AS g"
        )

        def delivered() -> int:
            return sum(
                notifications(service.metrics, outcome)
                for outcome in ("ok", "malformed", "overflow")
            )

        await wait_until(lambda: delivered() >= 10_000, what="10,000 doorbells handled")
        await force_read(service, conn)
        spent = service.ledger.reads - reads
        assert spent <= 30, f"{spent} ledger reads for 10,000 doorbells"
        assert counted(service.metrics) == await ledger_counts(conn)


async def test_http_endpoints_report_health_readiness_and_metrics(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """/healthz answers, /readyz is 200 once caught up, /metrics has the contract's names."""
    async with ready_listener(database_url) as service:
        base = f"http://127.0.0.1:{service.state.http_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 200
            readyz = await client.get("/readyz")
            assert (readyz.status_code, readyz.json()) == (200, {"status": "ready"})
            scraped = await client.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        assert 'token_reset_users_total{source="trigger"} 0.0' in scraped.text
        assert "token_reset_listener_connected 1.0" in scraped.text
