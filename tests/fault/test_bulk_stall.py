"""A bulk run whose backend goes silent mid-run (half-open TCP) fails at its deadline and
lets go of the bulk lock, instead of making every other caller answer "skipped"."""

from __future__ import annotations

import time

import asyncpg
import pytest

from listener.bulk import BulkResetError, run_bulk_reset
from tests.fault.proxy import tcp_proxy
from tests.support.env import settings_for
from tests.support.users import add_stale_users
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

DEADLINE_SECONDS = 2.0


async def test_a_stalled_run_fails_at_its_deadline_and_the_next_run_works(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await add_stale_users(conn, 30)
    with tcp_proxy(database_url) as proxy:
        stalled = settings_for(
            proxy.url_for(database_url), bulk_run_timeout_seconds=DEADLINE_SECONDS
        )
        proxy.pause_after("token-reset:bulk", b"token_reset_bulk_batch")
        started = time.monotonic()
        with pytest.raises(BulkResetError, match="BULK_RUN_TIMEOUT_SECONDS"):
            await run_bulk_reset(stalled, source="cli", batch_size=10)
        assert time.monotonic() - started < DEADLINE_SECONDS + 5
        proxy.resume()

        async def lock_free() -> bool:
            held: bool = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND objid = (hashtext('token_reset.bulk')::bigint & 4294967295)::oid)"
            )
            return not held

        await wait_until(lock_free, deadline=15, what="the stalled backend's lock released")
    result = await run_bulk_reset(settings_for(database_url), source="cli", batch_size=10)
    assert result.outcome == "success"
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM user_tokens WHERE last_monthly_reset < token_reset_period_start()"
            " AND monthly_tokens_used > 0"
        )
        == 0
    )
    outcomes = [
        r[0] for r in await conn.fetch("SELECT outcome FROM token_reset_bulk_runs ORDER BY id")
    ]
    assert outcomes == ["failure", "success"]
