"""The ledger is the truth at the month boundary: each test is one way it was not.

Every scenario moves data or opens transactions at the right moments; nothing fakes
the database's clock.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import anyio
import asyncpg
import pytest

import listener.migrate as migrate_module
from listener.bulk import run_bulk_reset
from listener.migrate import apply_migrations
from listener.sql import Migration, migrations
from tests.support.bulk import bulk_waiting_on_lock
from tests.support.database import TestServer, unique_name
from tests.support.env import settings_for
from tests.support.users import LAST_MONTH_28TH, add_user
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def reset_row_count(conn: asyncpg.Connection, user: uuid.UUID) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM token_transactions WHERE user_id = $1 AND operation = 'reset'", user
    )
    return count


async def test_a_transaction_begun_before_another_ones_reset_never_drags_it_back(
    database_url: str,
) -> None:
    """A begins; B's deduction resets the stale row and commits; A's deduction then keeps
    the row's reset time (it used to clamp it to A's start, so a transaction that began
    before midnight made the row stale again and the next write wiped the new month)."""
    owner = await asyncpg.connect(database_url)
    a = await asyncpg.connect(database_url)
    try:
        user = await add_user(owner, used=77, stale=True)
        async with a.transaction():
            a_start = await a.fetchval("SELECT now()")
            b = json.loads(await owner.fetchval("SELECT deduct_tokens($1, 10, 'chat')", user))
            assert b["reset"] is True
            b_reset = await owner.fetchval(
                "SELECT last_monthly_reset FROM user_tokens WHERE user_id = $1", user
            )
            assert b_reset > a_start
            a_result = json.loads(await a.fetchval("SELECT deduct_tokens($1, 5, 'chat')", user))
            assert (a_result["used"], a_result["reset"]) == (15, False)
        after = await owner.fetchrow(
            "SELECT last_monthly_reset, monthly_tokens_used FROM user_tokens WHERE user_id = $1",
            user,
        )
        assert after["last_monthly_reset"] >= b_reset, "A moved last_monthly_reset backwards"
        assert after["monthly_tokens_used"] == 15
        c = json.loads(await owner.fetchval("SELECT deduct_tokens($1, 1, 'chat')", user))
        assert (c["used"], c["reset"]) == (16, False)
        assert await reset_row_count(owner, user) == 1
    finally:
        await a.close()
        await owner.close()


async def test_a_user_already_reset_this_period_is_never_cleared_again_silently(
    conn: asyncpg.Connection,
) -> None:
    """Moving a row back into last month after its reset used to clear it a second time
    with the ledger row dropped by ON CONFLICT DO NOTHING: "reset": true, no row, usage
    gone.  Now every path keeps the usage, answers "reset": false and writes no row."""
    user = await add_user(conn, used=40, stale=True)
    assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is True
    await conn.fetchval("SELECT deduct_tokens($1, 490, 'chat')", user)
    for path in ("deduct", "function", "trigger", "bulk"):
        await conn.execute(
            f"UPDATE user_tokens SET last_monthly_reset = {LAST_MONTH_28TH} WHERE user_id = $1",
            user,
        )
        used = await conn.fetchval(
            "SELECT monthly_tokens_used FROM user_tokens WHERE user_id = $1", user
        )
        if path == "deduct":
            answer = json.loads(await conn.fetchval("SELECT deduct_tokens($1, 1, 'chat')", user))
            assert answer["reset"] is False
            assert answer["used"] == used + 1
        elif path == "function":
            assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is False
        elif path == "trigger":
            await conn.execute("UPDATE user_tokens SET updated_at = now() WHERE user_id = $1", user)
        else:
            run = json.loads(await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"))
            assert run["reset_count"] == 0
        assert await reset_row_count(conn, user) == 1, path
        row = await conn.fetchrow(
            "SELECT monthly_tokens_used, last_monthly_reset >= token_reset_period_start() AS cur"
            " FROM user_tokens WHERE user_id = $1",
            user,
        )
        assert row["monthly_tokens_used"] >= used, f"{path} cleared usage without a ledger row"
        assert row["cur"], f"{path} left the row stale"


async def test_changing_the_zone_never_clears_usage_counted_this_period(
    conn: asyncpg.Connection,
) -> None:
    """Users reset minutes after the UTC month began stay current when the zone becomes
    New York (whose month began hours later): the change waits for the next boundary."""
    users = [uuid.uuid4() for _ in range(3)]
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
        " SELECT u, 50, token_reset_period_start() + interval '5 minutes'"
        " FROM unnest($1::uuid[]) u",
        users,
    )
    before_start = await conn.fetchval("SELECT token_reset_period_start()")
    configured = json.loads(await conn.fetchval("SELECT token_reset_configure('America/New_York')"))
    shown = await conn.fetch(
        "SELECT monthly_tokens_used FROM user_tokens_with_auto_reset WHERE user_id = ANY($1)",
        users,
    )
    assert [r[0] for r in shown] == [50, 50, 50]
    answer = json.loads(await conn.fetchval("SELECT deduct_tokens($1, 1, 'chat')", users[0]))
    assert (answer["used"], answer["reset"]) == (51, False)
    assert (
        await conn.fetchval("SELECT count(*) FROM token_transactions WHERE operation = 'reset'")
        == 0
    )
    assert await conn.fetchval("SELECT token_reset_period_start()") == before_start
    effective = dt.datetime.fromisoformat(configured["effective_at"])
    assert effective > await conn.fetchval("SELECT now()")
    assert effective == await conn.fetchval("SELECT token_reset_next_period_start()")


async def test_the_new_zone_takes_over_at_the_later_boundary_without_a_gap(
    conn: asyncpg.Connection,
) -> None:
    """The change takes effect at the later of the two zones' next period starts: the
    current period ends where it would have without the change, and the next one carries
    one label from its start through the switch (no gap, no month twice)."""
    await add_user(conn, used=1)
    for zone in ("Pacific/Kiritimati", "America/Los_Angeles"):
        configured = json.loads(await conn.fetchval("SELECT token_reset_configure($1)", zone))
        effective = dt.datetime.fromisoformat(configured["effective_at"])
        utc_next = await conn.fetchval(
            "SELECT token_reset_month_start(date_trunc('month', now(), 'UTC')"
            " + interval '1 month 1 day', 'UTC')"
        )
        zone_next = await conn.fetchval(
            "SELECT token_reset_month_start($1::timestamptz + interval '1 day', $2)",
            utc_next,
            zone,
        )
        assert effective == max(utc_next, zone_next), zone
        labels = await conn.fetchrow(
            "SELECT token_reset_period_label(now()),"
            " token_reset_period_label($1::timestamptz - interval '1 microsecond'),"
            " token_reset_period_label($1::timestamptz),"
            " token_reset_period_label($2::timestamptz - interval '1 microsecond'),"
            " token_reset_period_label($2::timestamptz)",
            utc_next,
            effective,
        )
        current, before_boundary, at_boundary, before_switch, at_switch = labels
        assert before_boundary == current, zone
        assert at_boundary != current, zone
        assert at_boundary == at_switch, zone
        if effective > utc_next:
            assert before_switch == at_switch, zone
        # Cancelling the pending change is configuring the zone in force.
        await conn.fetchval("SELECT token_reset_configure('UTC')")


async def test_a_zone_on_an_empty_database_takes_effect_at_once(conn: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT token_reset_configure('Asia/Tokyo')")
    assert await conn.fetchval("SELECT token_reset_zone()") == "Asia/Tokyo"
    assert await conn.fetchval(
        "SELECT token_reset_period_start() = token_reset_month_start(now(), 'Asia/Tokyo')"
    )


async def test_dst_fall_back_at_midnight_starts_the_month_at_the_first_midnight(
    conn: asyncpg.Connection,
) -> None:
    """Havana falls back at 01:00 on 2026-11-01, so local midnight happens twice; the
    period starts at the first one (04:00 UTC), not at date_trunc's second (05:00)."""
    start = await conn.fetchval(
        "SELECT token_reset_month_start('2026-11-20 12:00+00', 'America/Havana')"
    )
    assert start == dt.datetime(2026, 11, 1, 4, 0, tzinfo=dt.UTC)
    assert (
        await conn.fetchval(
            "SELECT token_reset_month_start('2026-11-01 04:30+00', 'America/Havana')"
        )
        == start
    ), "a row reset at 04:30 UTC on the 1st is in November"


async def test_every_zone_2000_to_2040_starts_each_month_at_its_first_local_instant(
    conn: asyncpg.Connection,
) -> None:
    """For every zone and month: the start's local date is the 1st, and the microsecond
    before it is still in the previous month (date_trunc alone fails 22 of these)."""
    wrong = await conn.fetch(
        """
        WITH cases AS (
            SELECT z.name AS zone, m.mid,
                   token_reset_month_start(timezone(z.name, m.mid), z.name) AS start
              FROM pg_timezone_names z,
                   generate_series(timestamp '2000-01-15', timestamp '2040-12-15',
                                   interval '1 month') AS m(mid)
        )
        SELECT zone, mid, start FROM cases
         WHERE timezone(zone, start)::date <> date_trunc('month', mid)::date
            OR timezone(zone, start - interval '1 microsecond') >= date_trunc('month', mid)
         LIMIT 10
        """
    )
    assert wrong == []


async def test_a_migration_that_recreates_the_period_functions_cannot_split_the_month(
    pg_server: TestServer,
) -> None:
    """The zone lives in the settings row; `migrate` regenerates every object that spells
    it out, so a later migration re-creating them from 0001's UTC text changes nothing."""
    name = unique_name("tr_zone")
    url = await pg_server.create_database(name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn)
            await conn.fetchval("SELECT token_reset_configure('America/New_York')")
            stale_text = _period_functions_of_0001()
            shipped = migrations()
            extra = Migration(len(shipped) + 1, "recreate_period_functions", stale_text)
            original = migrate_module.migrations
            migrate_module.migrations = lambda: (*shipped, extra)  # type: ignore[assignment]
            try:
                report = await apply_migrations(conn)
            finally:
                migrate_module.migrations = original  # type: ignore[assignment]
            assert report.applied == (extra.version,)
            agree = await conn.fetchrow(
                """
                SELECT token_reset_zone() AS zone,
                       token_reset_period_start()
                         = token_reset_month_start(now(), 'America/New_York') AS start_agrees,
                       token_reset_period_label(now())
                         = to_char(timezone('America/New_York', now()), 'YYYY-MM')
                         AS label_agrees,
                       token_reset_next_period_start()
                         = token_reset_month_start(
                               token_reset_period_start() + interval '32 days',
                               'America/New_York') AS next_agrees,
                       (SELECT pg_get_triggerdef(oid) FROM pg_trigger
                         WHERE tgname = 'user_tokens_reset_on_write') AS trigger_def
                """
            )
            assert agree["zone"] == "America/New_York"
            assert agree["start_agrees"]
            assert agree["label_agrees"]
            assert agree["next_agrees"]
            assert "America/New_York" in agree["trigger_def"]
            assert "'UTC'" not in agree["trigger_def"]
        finally:
            await conn.close()
    finally:
        await pg_server.drop_database(name)


def _period_functions_of_0001() -> str:
    """The period functions and trigger exactly as 0001 created them (UTC spelled out)."""
    text = migrations()[0].sql
    start = text.index("CREATE FUNCTION public.token_reset_period_start()")
    end = text.index("-- 'YYYY-MM' of the period containing p_at")
    trigger_start = text.index("CREATE TRIGGER user_tokens_reset_on_write")
    trigger_end = text.index("CREATE TRIGGER user_tokens_no_future_reset")
    functions = text[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
    trigger = text[trigger_start:trigger_end].replace("CREATE TRIGGER", "CREATE OR REPLACE TRIGGER")
    return functions + trigger


async def test_amounts_beyond_int32_get_a_range_error(conn: asyncpg.Connection) -> None:
    user = await add_user(conn)
    for call in (
        "SELECT deduct_tokens($1, 3000000000, 'chat')",
        "SELECT check_token_rate_limit($1, 3000000000)",
        "SELECT grant_tokens($1, 3000000000, 'refund')",
        "SELECT set_token_limit($1, 3000000000)",
    ):
        with pytest.raises(asyncpg.NumericValueOutOfRangeError):
            await conn.fetchval(call, user)
    assert await conn.fetchval("SELECT count(*) FROM token_transactions") == 0


async def test_hints_name_only_functions_that_exist(conn: asyncpg.Connection) -> None:
    """The append-only refusal tells the reader how to correct usage, with a real function."""
    user = await add_user(conn, used=0)
    await conn.fetchval("SELECT deduct_tokens($1, 3, 'chat')", user)
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
        await conn.execute("DELETE FROM token_transactions")
    hint = refused.value.hint or ""
    assert "grant_tokens()" in hint
    assert await conn.fetchval("SELECT to_regprocedure('grant_tokens(uuid, bigint, text)')")


async def test_a_bulk_run_under_serializable_retries_a_serialization_failure(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """With default_transaction_isolation = serializable, the final pass waits for a row a
    writer holds; when the writer commits, PostgreSQL fails the pass with 40001.  The
    runner tries it again (it used to fail the whole run) and records the retry."""
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(
        f"ALTER DATABASE {database} SET default_transaction_isolation = serializable"
    )
    writer = await asyncpg.connect(database_url)
    try:
        held = await add_user(conn, used=30, stale=True)
        for _ in range(5):
            await add_user(conn, used=5, stale=True)
        tx = writer.transaction()
        await tx.start()
        assert await writer.fetchval("SHOW transaction_isolation") == "serializable"
        await writer.fetchval("SELECT deduct_tokens($1, 1, 'chat')", held)
        async with anyio.create_task_group() as tg:
            results = []

            async def run() -> None:
                results.append(
                    await run_bulk_reset(settings_for(database_url), source="cli", batch_size=2)
                )

            tg.start_soon(run)
            await wait_until(lambda: bulk_waiting_on_lock(conn), what="final pass waiting")
            await tx.commit()
        assert results[0].outcome == "success"
        assert results[0].reset_count == 5
        row = await conn.fetchrow("SELECT outcome, retries FROM token_reset_bulk_runs")
        assert (row["outcome"], row["retries"]) == ("success", 1)
    finally:
        await writer.close()
        await conn.execute(f"ALTER DATABASE {database} RESET default_transaction_isolation")
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM user_tokens WHERE last_monthly_reset < token_reset_period_start()"
            " AND monthly_tokens_used > 0"
        )
        == 0
    )
