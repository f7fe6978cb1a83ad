"""The watchdog's and `status`'s counts follow the writes, not the size of user_tokens."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from listener.commands.status import gather_status
from listener.metrics import Metrics
from listener.sql import query
from listener.watchdog import Watchdog
from tests.integration.role_support import login_role
from tests.integration.test_ledger_model import COUNTER_DRIFT
from tests.support.env import settings_for
from tests.support.metrics import sample
from tests.support.users import add_stale_users, add_user

pytestmark = pytest.mark.anyio


async def relations_read(conn: asyncpg.Connection, name: str) -> set[str]:
    """Every relation a named query's plan reads."""
    plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query(name)}"))

    def walk(node: dict[str, object]) -> set[str]:
        found = {str(node["Relation Name"])} if "Relation Name" in node else set()
        for child in node.get("Plans", []):  # type: ignore[attr-defined]
            found |= walk(child)
        return found

    return walk(plan[0]["Plan"])


@pytest.mark.parametrize("name", ["watchdog_snapshot", "status_summary"])
async def test_periodic_queries_never_read_user_tokens(conn: asyncpg.Connection, name: str) -> None:
    """They used to scan every user (4-7 s at 10M users); the counters make the cost the
    writes since the last fold, whatever the number of users."""
    await add_stale_users(conn, 50, used=3)
    await conn.execute("ANALYZE")
    read = await relations_read(conn, name)
    assert "user_tokens" not in read
    assert "token_reset_usage_deltas" in read


async def test_counts_match_a_full_scan_after_every_kind_of_write(
    conn: asyncpg.Connection,
) -> None:
    await add_stale_users(conn, 30, used=4)
    idle = await add_user(conn, used=0, stale=True)
    busy = await add_user(conn, used=9)
    await conn.fetchval("SELECT deduct_tokens($1, 2, 'chat')", idle)
    await conn.execute("UPDATE user_tokens SET updated_at = now() WHERE user_id <> $1", busy)
    await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()")
    await conn.execute("DELETE FROM user_tokens WHERE user_id = $1", busy)
    await conn.fetchval("SELECT token_reset_compact_counters()")
    assert await conn.fetch(COUNTER_DRIFT) == []
    status = await gather_status(conn)
    assert status["users_total"] == 31
    assert status["stale_users"] == 0
    assert status["period_resets"] == 30  # the idle user had nothing to clear
    assert status["users_active_this_period"] == 1
    assert status["users_near_limit_this_period"] == 0


async def test_a_session_cannot_switch_counting_off_for_the_functions_it_calls(
    conn: asyncpg.Connection, database_url: str
) -> None:
    async with login_role(conn, database_url, "token_reset_app") as url:
        app = await asyncpg.connect(url)
        try:
            user = uuid.uuid4()
            await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
            await app.execute("SET token_reset.counting = 'self'")
            await app.fetchval("SELECT deduct_tokens($1, 5, 'chat')", user)
        finally:
            await app.close()
    assert await conn.fetch(COUNTER_DRIFT) == []


async def test_a_load_with_triggers_off_is_put_right_by_a_recount(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("SET session_replication_role = replica")
    await add_stale_users(conn, 20, used=7)
    await conn.execute("RESET session_replication_role")
    assert await conn.fetch(COUNTER_DRIFT) != []
    await conn.execute("SELECT token_reset_recount_usage()")
    assert await conn.fetch(COUNTER_DRIFT) == []


async def test_active_users_this_period_is_exported_and_equals_sql(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """token_reset_period_active_users: users with usage this period, as SQL over
    user_tokens says, read from the counters at a cost that does not grow with users."""
    await add_stale_users(conn, 5, used=4)
    for _ in range(3):
        user = await add_user(conn, used=0)
        await conn.fetchval("SELECT deduct_tokens($1, 2, 'chat')", user)
    await add_user(conn, used=0)
    watchdog = Watchdog(settings_for(database_url), Metrics.fresh())
    try:
        await watchdog.check_once()
    finally:
        watchdog.close()
    truth = await conn.fetchval(
        "SELECT count(*) FROM user_tokens WHERE monthly_tokens_used > 0"
        " AND last_monthly_reset >= token_reset_period_start()"
    )
    assert truth == 3
    assert sample(watchdog.metrics, "token_reset_period_active_users") == truth
