"""The ledger partitioned by period: always a partition to write to, retention and
erasure by the owner only, and every guarantee holding across partitions."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from listener.migrate import apply_migrations
from listener.sql import query
from tests.integration.test_ledger_model import COUNTER_DRIFT, I1_VIOLATIONS
from tests.support.database import TestServer, unique_name
from tests.support.users import add_user

pytestmark = pytest.mark.anyio


async def partitions(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'token_transactions'::regclass ORDER BY 1"
    )
    return [r[0] for r in rows]


async def old_period(conn: asyncpg.Connection, period: str) -> None:
    """A partition for a past period, as a ledger running for years would have."""
    name = "token_transactions_" + period.replace("-", "_")
    upper = await conn.fetchval(
        "SELECT to_char(to_date($1 || '-01', 'YYYY-MM-DD') + interval '1 month', 'YYYY-MM')",
        period,
    )
    await conn.execute(
        f"CREATE TABLE {name} PARTITION OF token_transactions"
        f" FOR VALUES FROM ('{period}') TO ('{upper}')"
    )


async def test_this_period_and_three_ahead_exist_and_a_default_catches_the_rest(
    conn: asyncpg.Connection,
) -> None:
    labels = await conn.fetch(
        "SELECT to_char(to_date(token_reset_period_label(now()) || '-01', 'YYYY-MM-DD')"
        " + make_interval(months => k), 'YYYY_MM') FROM generate_series(0, 3) k"
    )
    names = await partitions(conn)
    for (label,) in labels:
        assert f"token_transactions_{label}" in names
    assert "token_transactions_default" in names
    assert await conn.fetchval("SELECT token_reset_ensure_partitions()") == []
    user = await add_user(conn)
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, amount, period)"
        " VALUES ($1, 'grant', 1, '2099-01')",
        user,
    )
    assert await conn.fetchval("SELECT count(*) FROM token_transactions_default") == 1


async def test_retention_drops_whole_old_periods_and_nothing_anyone_depends_on(
    conn: asyncpg.Connection,
) -> None:
    await old_period(conn, "2020-01")
    await old_period(conn, "2020-02")
    user = await add_user(conn, used=0)
    for period in ("2020-01", "2020-02"):
        await conn.execute(
            "INSERT INTO token_transactions (user_id, operation, amount, metadata, period)"
            " VALUES ($1, 'deduct', 5, jsonb_build_object('period', $2::text), $2),"
            "        ($1, 'reset', 5, token_reset_reset_metadata($2, 5, 'bulk'), $2)",
            user,
            period,
        )
    await conn.execute("SELECT token_reset_recount_usage()")
    await conn.fetchval("SELECT deduct_tokens($1, 7, 'chat')", user)
    carrying = await add_user(conn, used=0)
    await conn.execute(
        "UPDATE user_tokens SET monthly_tokens_used = 3, last_monthly_reset = '2020-01-15'"
        " WHERE user_id = $1",
        carrying,
    )
    with pytest.raises(asyncpg.ObjectInUseError, match="still carry usage"):
        await conn.fetchval("SELECT token_reset_drop_periods(2)")
    await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()")

    dropped = await conn.fetchval("SELECT token_reset_drop_periods(2)")
    assert dropped == ["token_transactions_2020_01", "token_transactions_2020_02"]
    assert "token_transactions_2020_01" not in await partitions(conn)
    assert await conn.fetchval("SELECT to_regclass('token_transactions_2020_01')") is None
    assert all(r[1] == r[2] for r in await conn.fetch(I1_VIOLATIONS, [user, carrying]))
    await conn.fetchval("SELECT token_reset_compact_counters()")
    assert await conn.fetch(COUNTER_DRIFT) == []
    # What stays is still append-only.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("DELETE FROM token_transactions WHERE user_id = $1", user)


async def test_archive_detaches_and_keeps_the_period_for_a_dump(conn: asyncpg.Connection) -> None:
    await old_period(conn, "2019-06")
    assert await conn.fetchval("SELECT token_reset_drop_periods(3, true)") == [
        "token_transactions_2019_06"
    ]
    assert "token_transactions_2019_06" not in await partitions(conn)
    assert await conn.fetchval("SELECT to_regclass('token_transactions_2019_06')") is not None
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await conn.fetchval("SELECT token_reset_drop_periods(1)")


async def test_erasure_removes_one_user_everywhere_and_nobody_else(
    conn: asyncpg.Connection,
) -> None:
    gone, kept = (
        await add_user(conn, used=20, stale=True),
        await add_user(conn, used=20, stale=True),
    )
    for user in (gone, kept):
        await conn.fetchval("SELECT deduct_tokens($1, 3, 'chat')", user)
        await conn.fetchval("SELECT grant_tokens($1, 1, 'refund')", user)
    erased = json.loads(await conn.fetchval("SELECT token_reset_erase_user($1)", gone))
    assert erased == {"user_id": str(gone), "ledger_rows": 3, "user_rows": 1}
    assert (
        await conn.fetchval("SELECT count(*) FROM token_transactions WHERE user_id = $1", gone) == 0
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM token_transactions WHERE user_id = $1", kept) == 3
    )
    assert all(r[1] == r[2] for r in await conn.fetch(I1_VIOLATIONS, [kept]))
    await conn.fetchval("SELECT token_reset_compact_counters()")
    assert await conn.fetch(COUNTER_DRIFT) == []
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("DELETE FROM token_transactions WHERE user_id = $1", kept)


async def test_one_reset_per_period_and_the_listener_cursor_span_partitions(
    conn: asyncpg.Connection,
) -> None:
    await old_period(conn, "2021-03")
    user = await add_user(conn, used=9, stale=True)
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, amount, metadata, period)"
        " VALUES ($1, 'reset', 4, token_reset_reset_metadata('2021-03', 4, 'bulk'), '2021-03')",
        user,
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "INSERT INTO token_transactions (user_id, operation, amount, metadata, period)"
            " VALUES ($1, 'reset', 4, token_reset_reset_metadata('2021-03', 4, 'bulk'), '2021-03')",
            user,
        )
    assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is True
    ids = [r[0] for r in await conn.fetch("SELECT id FROM token_transactions ORDER BY id")]
    assert ids == sorted(ids)
    async with conn.transaction():
        window = await conn.fetch(query("ledger_window"), "cursor-test", 0, ids[-1])
    assert sorted((r["period"], r["resets"]) for r in window) == sorted(
        [("2021-03", 1), (await conn.fetchval("SELECT token_reset_period_label(now())"), 1)]
    )


async def test_an_existing_ledger_moves_into_partitions_with_its_ids(
    pg_server: TestServer,
) -> None:
    name = unique_name("tr_part")
    url = await pg_server.create_database(name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn, target=5)
            users = [uuid.uuid4() for _ in range(3)]
            for user in users:
                await conn.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
                await conn.fetchval("SELECT deduct_tokens($1, 2, 'chat')", user)
            before = await conn.fetch(
                "SELECT id, user_id, amount FROM token_transactions ORDER BY id"
            )
            await apply_migrations(conn)
            after = await conn.fetch(
                "SELECT id, user_id, amount FROM token_transactions ORDER BY id"
            )
            assert [tuple(r) for r in after] == [tuple(r) for r in before]
            answer = json.loads(await conn.fetchval("SELECT deduct_tokens($1, 1, 'x')", users[0]))
            assert answer["transaction_id"] > before[-1]["id"]
            assert (
                await conn.fetchval(
                    "SELECT pg_get_serial_sequence('public.token_transactions', 'id')"
                )
                == "public.token_transactions_id_seq"
            )
        finally:
            await conn.close()
    finally:
        await pg_server.drop_database(name)
