"""Bad input to the SQL functions: a clear error, and nothing written."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.support.users import add_user

pytestmark = pytest.mark.anyio


async def snapshot(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], int]:
    """Every user row and the ledger size: what 'nothing written' compares."""
    users = await conn.fetch("SELECT * FROM user_tokens ORDER BY user_id")
    ledger = await conn.fetchval("SELECT count(*) FROM token_transactions")
    return users, ledger


async def test_unknown_user_is_refused(conn: asyncpg.Connection) -> None:
    """Deducting from, or asking about, a user who does not exist names the user."""
    stranger = uuid.uuid4()
    before = await snapshot(conn)
    with pytest.raises(asyncpg.NoDataFoundError, match=f"unknown user: {stranger}"):
        await conn.fetchval("SELECT deduct_tokens($1, 5, 'chat')", stranger)
    with pytest.raises(asyncpg.NoDataFoundError, match="unknown user"):
        await conn.fetchval("SELECT check_user_tokens($1)", stranger)
    with pytest.raises(asyncpg.NoDataFoundError, match="unknown user"):
        await conn.fetchval("SELECT check_token_rate_limit($1, 1)", stranger)
    assert await snapshot(conn) == before
    with pytest.raises(asyncpg.NoDataFoundError, match="unknown user"):
        await conn.fetchval("SELECT reset_user_tokens_if_needed($1)", stranger)


@pytest.mark.parametrize("amount", [0, -1, -500])
async def test_non_positive_amount_is_refused(conn: asyncpg.Connection, amount: int) -> None:
    """Zero and negative deductions would mint tokens; they are refused."""
    user = await add_user(conn, used=10, stale=True)
    before = await snapshot(conn)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="positive"):
        await conn.fetchval("SELECT deduct_tokens($1, $2, 'chat')", user, amount)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="positive"):
        await conn.fetchval("SELECT check_token_rate_limit($1, $2)", user, amount)
    assert await snapshot(conn) == before


async def test_null_amount_and_user_are_refused(conn: asyncpg.Connection) -> None:
    """NULLs get an error, not a silent no-op."""
    user = await add_user(conn)
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await conn.fetchval("SELECT deduct_tokens($1, NULL, 'chat')", user)
    with pytest.raises(asyncpg.NullValueNotAllowedError):
        await conn.fetchval("SELECT deduct_tokens(NULL, 1, 'chat')")


async def test_over_the_allowance_is_refused_and_rolls_back_the_reset(
    conn: asyncpg.Connection,
) -> None:
    """A stale user asking for more than a month's allowance keeps last month's row untouched."""
    user = await add_user(conn, used=77, stale=True)
    before = await snapshot(conn)

    with pytest.raises(asyncpg.CheckViolationError, match="allowance exceeded") as caught:
        await conn.fetchval("SELECT deduct_tokens($1, 501, 'chat')", user)

    assert '"limit": 500' in (caught.value.detail or "")
    assert await snapshot(conn) == before


async def test_exactly_the_allowance_is_allowed(conn: asyncpg.Connection) -> None:
    """The boundary is inclusive: 500 of 500 is fine, one more is not."""
    user = await add_user(conn)
    await conn.fetchval("SELECT deduct_tokens($1, 500, 'chat')", user)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.fetchval("SELECT deduct_tokens($1, 1, 'chat')", user)
    assert (
        await conn.fetchval("SELECT monthly_tokens_used FROM user_tokens WHERE user_id = $1", user)
        == 500
    )


async def test_bad_time_zone_is_refused(conn: asyncpg.Connection) -> None:
    """Configuring a zone PostgreSQL does not know changes nothing."""
    before = await conn.fetchval("SELECT token_reset_period_start()")
    with pytest.raises(asyncpg.PostgresError, match="time zone"):
        await conn.fetchval("SELECT token_reset_configure('Mars/Olympus_Mons')")
    assert await conn.fetchval("SELECT token_reset_period_start()") == before
