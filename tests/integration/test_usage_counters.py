"""The watchdog's and `status`'s counts follow the writes, not the size of user_tokens."""

from __future__ import annotations

import json
import uuid

import anyio
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
from tests.support.waiting import wait_until

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


async def test_a_deduction_on_a_row_dated_in_the_future_is_counted_where_it_lands(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A row loaded with a reset time ahead of the clock (a load with the triggers off, a
    clock stepped back): the write pulls it back to now, into another period, and that
    move must be counted (found by a review of deduct_tokens counting its own write)."""
    user = uuid.uuid4()
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_token_limit, monthly_tokens_used,"
        " last_monthly_reset) VALUES ($1, 100, 10, now() + interval '40 days')",
        user,
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute("SELECT token_reset_recount_usage()")
    async with login_role(conn, database_url, "token_reset_app") as url:
        app = await asyncpg.connect(url)
        try:
            await app.fetchval("SELECT deduct_tokens($1, 5, 'f')", user)
        finally:
            await app.close()
    await conn.fetchval("SELECT token_reset_compact_counters()")
    assert await conn.fetch(COUNTER_DRIFT) == []


async def test_a_deduction_waiting_on_a_row_another_transaction_moves_back_counts_the_move(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """The slow path waits for the row's lock while the owner moves the row back a period
    and commits: the deduction must reset the row it then writes (not last period's
    usage against this period's limit), and every count must follow."""
    user = uuid.uuid4()
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_token_limit, monthly_tokens_used)"
        " VALUES ($1, 100, 95)",
        user,
    )
    mover = await asyncpg.connect(database_url)
    try:
        async with login_role(conn, database_url, "token_reset_app") as url:
            app = await asyncpg.connect(url)
            try:
                moving = mover.transaction()
                await moving.start()
                await mover.execute(
                    "UPDATE user_tokens SET last_monthly_reset = token_reset_period_start()"
                    " - interval '5 days', monthly_tokens_used = 10 WHERE user_id = $1",
                    user,
                )
                answers: list[str] = []
                app_pid = await app.fetchval("SELECT pg_backend_pid()")

                async def deduct() -> None:
                    answers.append(await app.fetchval("SELECT deduct_tokens($1, 20, 'race')", user))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(deduct)

                    async def blocked() -> bool:
                        return bool(
                            await conn.fetchval(
                                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity"
                                " WHERE pid = $1",
                                app_pid,
                            )
                        )

                    await wait_until(blocked, what="the deduction waiting for the row")
                    await moving.commit()
            finally:
                await app.close()
    finally:
        await mover.close()
    answer = json.loads(answers[0])
    assert (answer["used"], answer["reset"]) == (20, True)
    await conn.fetchval("SELECT token_reset_compact_counters()")
    assert await conn.fetch(COUNTER_DRIFT) == []
