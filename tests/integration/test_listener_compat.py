"""A replica of the previous release keeps working while the new schema is in place."""

from __future__ import annotations

import asyncpg
import pytest

from tests.support.users import add_stale_users

pytestmark = pytest.mark.anyio

# The two bulk queries exactly as the previous release's listener sends them
# (sql/queries/bulk.sql before migration 0004).
PREVIOUS_BATCH = "SELECT last_key, reset_count FROM public.token_reset_bulk_batch($1, $2, 'bulk')"
PREVIOUS_FINAL_PASS = "SELECT public.token_reset_bulk_final_pass('bulk')"


async def test_the_previous_releases_bulk_queries_still_run(conn: asyncpg.Connection) -> None:
    await add_stale_users(conn, 25, used=3)
    batch, final = PREVIOUS_BATCH, PREVIOUS_FINAL_PASS
    after = None
    total = 0
    while True:
        row = await conn.fetchrow(batch, after, 10)
        total += row["reset_count"]
        if row["last_key"] is None:
            break
        after = row["last_key"]
    total += await conn.fetchval(final)
    assert total == 25
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await conn.fetchrow("SELECT * FROM token_reset_bulk_batch(NULL, 10, 'x')")
