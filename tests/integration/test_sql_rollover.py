"""The month rollover in SQL: the seed story, the trigger, the view, the read answers."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from tests.support.users import add_user, reset_rows

pytestmark = pytest.mark.anyio


async def usage(conn: asyncpg.Connection, user_id: uuid.UUID) -> tuple[int, int]:
    """(used, limit) as stored."""
    row = await conn.fetchrow(
        "SELECT monthly_tokens_used, monthly_token_limit FROM user_tokens WHERE user_id = $1",
        user_id,
    )
    assert row is not None
    return row[0], row[1]


async def viewed(conn: asyncpg.Connection, user_id: uuid.UUID) -> int:
    """Usage as the view shows it."""
    value: int = await conn.fetchval(
        "SELECT monthly_tokens_used FROM user_tokens_with_auto_reset WHERE user_id = $1", user_id
    )
    return value


async def test_seed_story_77_on_the_28th_then_5_this_month(conn: asyncpg.Connection) -> None:
    """77/500 from the 28th of last month reads 0/500, and a deduction of 5 gives 5/500."""
    user = await add_user(conn, used=77, stale=True)

    assert await viewed(conn, user) == 0
    checked = json.loads(await conn.fetchval("SELECT check_user_tokens($1)", user))
    assert (checked["used"], checked["limit"], checked["remaining"]) == (0, 500, 500)

    result = json.loads(await conn.fetchval("SELECT deduct_tokens($1, 5, 'chat')", user))
    assert (result["used"], result["limit"], result["reset"]) == (5, 500, True)
    assert await usage(conn, user) == (5, 500)

    ledger = await conn.fetch(
        "SELECT operation, feature, amount, metadata FROM token_transactions"
        " WHERE user_id = $1 ORDER BY id",
        user,
    )
    assert [(r["operation"], r["feature"], r["amount"]) for r in ledger] == [
        ("reset", "monthly_rollover", 77),
        ("deduct", "chat", 5),
    ]
    meta = json.loads(ledger[0]["metadata"])
    period = await conn.fetchval("SELECT token_reset_period_label(now())")
    assert meta == {"period": period, "previous_used": 77, "source": "function"}


async def test_trigger_keeps_the_delta_of_the_write_that_woke_it(conn: asyncpg.Connection) -> None:
    """An app UPDATE adding 5 to a stale 77 stores 5 (never 82, never 0) and logs the reset."""
    user = await add_user(conn, used=77, stale=True)

    await conn.execute(
        "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 5 WHERE user_id = $1",
        user,
    )

    assert await usage(conn, user) == (5, 500)
    rows = await reset_rows(conn)
    assert [(r["user_id"], r["amount"]) for r in rows] == [(user, 77)]
    assert json.loads(rows[0]["metadata"])["source"] == "trigger"
    is_current = await conn.fetchval(
        "SELECT last_monthly_reset >= token_reset_period_start() FROM user_tokens"
        " WHERE user_id = $1",
        user,
    )
    assert is_current is True


async def test_trigger_on_a_write_that_does_not_touch_usage(conn: asyncpg.Connection) -> None:
    """Changing only the limit of a stale row still clears last period's usage."""
    user = await add_user(conn, used=40, stale=True)

    await conn.execute("UPDATE user_tokens SET monthly_token_limit = 900 WHERE user_id = $1", user)

    assert await usage(conn, user) == (0, 900)
    assert [r["amount"] for r in await reset_rows(conn)] == [40]


async def test_stale_row_without_usage_writes_no_ledger_row(conn: asyncpg.Connection) -> None:
    """A reset that clears nothing records nothing: cost follows active users."""
    user = await add_user(conn, used=0, stale=True)

    await conn.execute(
        "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 3 WHERE user_id = $1",
        user,
    )
    assert await usage(conn, user) == (3, 500)
    assert await reset_rows(conn) == []
    assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is False


async def test_current_rows_are_left_alone(conn: asyncpg.Connection) -> None:
    """Writes in the current period never reset anything."""
    user = await add_user(conn, used=10)

    await conn.execute(
        "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1 WHERE user_id = $1",
        user,
    )
    assert await usage(conn, user) == (11, 500)
    assert await viewed(conn, user) == 11
    assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is False
    assert await reset_rows(conn) == []


async def test_reset_user_tokens_if_needed_resets_once(conn: asyncpg.Connection) -> None:
    """True the first time for a stale user with usage, false the second."""
    user = await add_user(conn, used=12, stale=True)

    assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is True
    assert await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user) is False
    assert await usage(conn, user) == (0, 500)
    assert [r["amount"] for r in await reset_rows(conn)] == [12]


async def test_view_has_the_same_columns_as_the_table(conn: asyncpg.Connection) -> None:
    """Readers can swap the table for the view without changing their queries."""
    columns = """
        SELECT array_agg(column_name::text ORDER BY ordinal_position)
          FROM information_schema.columns WHERE table_name = $1
    """
    assert await conn.fetchval(columns, "user_tokens_with_auto_reset") == await conn.fetchval(
        columns, "user_tokens"
    )


async def test_rate_limit_answer_is_read_only(conn: asyncpg.Connection) -> None:
    """check_token_rate_limit answers from effective usage and writes nothing."""
    user = await add_user(conn, used=480, stale=True)
    before = await conn.fetchrow("SELECT * FROM user_tokens WHERE user_id = $1", user)

    answer = json.loads(await conn.fetchval("SELECT check_token_rate_limit($1, 30)", user))

    assert answer["allowed"] is True
    assert (answer["used"], answer["remaining"], answer["limit"]) == (0, 500, 500)
    assert await conn.fetchrow("SELECT * FROM user_tokens WHERE user_id = $1", user) == before
    assert await conn.fetchval("SELECT count(*) FROM token_transactions") == 0
    next_start = await conn.fetchval("SELECT token_reset_next_period_start()")
    assert answer["resets_at"] == next_start.isoformat()


async def test_rate_limit_refuses_what_exceeds_the_allowance(conn: asyncpg.Connection) -> None:
    """A current user at 490/500 may not take 11 more."""
    user = await add_user(conn, used=490)

    answer = json.loads(await conn.fetchval("SELECT check_token_rate_limit($1, 11)", user))
    assert answer["allowed"] is False
    assert answer["remaining"] == 10


async def test_future_last_reset_is_clamped_to_server_time(conn: asyncpg.Connection) -> None:
    """No client can claim a reset in the future to dodge the next ones."""
    user = uuid.uuid4()
    await conn.execute(
        "INSERT INTO user_tokens (user_id, last_monthly_reset) VALUES ($1, now() + interval '1 y')",
        user,
    )
    await conn.execute(
        "UPDATE user_tokens SET last_monthly_reset = now() + interval '5 years' WHERE user_id = $1",
        user,
    )
    assert await conn.fetchval(
        "SELECT last_monthly_reset <= now() FROM user_tokens WHERE user_id = $1", user
    )


async def test_ledger_is_append_only(conn: asyncpg.Connection) -> None:
    """History cannot be rewritten: UPDATE, DELETE and TRUNCATE are refused."""
    user = await add_user(conn, used=5)
    await conn.fetchval("SELECT deduct_tokens($1, 1, 'x')", user)

    for statement in (
        "UPDATE token_transactions SET amount = 0",
        "DELETE FROM token_transactions",
        "TRUNCATE token_transactions",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM token_transactions") == 1


async def test_one_reset_per_user_per_period_is_enforced_by_an_index(
    conn: asyncpg.Connection,
) -> None:
    """A second reset row for the same user and period is refused by the database itself."""
    user = await add_user(conn, used=9, stale=True)
    await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", user)

    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "INSERT INTO token_transactions (user_id, operation, feature, amount, metadata)"
            " VALUES ($1, 'reset', 'monthly_rollover', 1,"
            " token_reset_reset_metadata(token_reset_period_label(now()), 1, 'function'))",
            user,
        )


async def test_ledger_constraints_refuse_bad_rows(conn: asyncpg.Connection) -> None:
    """Unknown operations, negative amounts and reset rows without a period are impossible."""
    user = uuid.uuid4()
    bad_rows = [
        ("refund", 1, '{"period": "2026-01"}'),
        ("deduct", -1, None),
        ("reset", 1, '{"source": "bulk"}'),
        ("reset", 1, '{"period": "2026-13", "source": "bulk"}'),
        # The source is a closed set (the listener labels metrics with it).
        ("reset", 1, '{"period": "2026-01", "source": "' + "x" * 10_000 + '"}'),
        ("reset", 1, '{"period": "2026-01"}'),
    ]
    for operation, amount, metadata in bad_rows:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO token_transactions (user_id, operation, amount, metadata)"
                " VALUES ($1, $2, $3, $4::jsonb)",
                user,
                operation,
                amount,
                metadata,
            )


async def test_usage_can_never_go_negative(conn: asyncpg.Connection) -> None:
    """The table refuses negative usage outright."""
    user = await add_user(conn, used=1)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "UPDATE user_tokens SET monthly_tokens_used = -1 WHERE user_id = $1", user
        )
