"""Test data: users at a given usage, moved into the previous period by data, not clocks."""

from __future__ import annotations

import uuid

import asyncpg

# 28th of the previous period, in the configured zone: the seed story's date.
LAST_MONTH_28TH = """
    public.token_reset_period_start()
    - interval '1 month' + interval '27 days'
"""


async def add_user(
    conn: asyncpg.Connection, *, used: int = 0, limit: int = 500, stale: bool = False
) -> uuid.UUID:
    """Insert one user; stale=True dates its last reset to the 28th of last period."""
    user_id = uuid.uuid4()
    if stale:
        await conn.execute(
            "INSERT INTO user_tokens (user_id, monthly_tokens_used, monthly_token_limit,"
            f" last_monthly_reset) VALUES ($1, $2, $3, {LAST_MONTH_28TH})",
            user_id,
            used,
            limit,
        )
    else:
        await conn.execute(
            "INSERT INTO user_tokens (user_id, monthly_tokens_used, monthly_token_limit)"
            " VALUES ($1, $2, $3)",
            user_id,
            used,
            limit,
        )
    return user_id


async def add_stale_users(conn: asyncpg.Connection, count: int, *, used: int = 10) -> None:
    """Insert `count` users carrying last period's usage, in one statement."""
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
        f" SELECT gen_random_uuid(), $2, {LAST_MONTH_28TH} FROM generate_series(1, $1)",
        count,
        used,
    )


async def make_stale(conn: asyncpg.Connection, *, used: int) -> int:
    """Move every user into the previous period with `used` tokens; returns rows moved."""
    status = await conn.execute(
        f"UPDATE user_tokens SET monthly_tokens_used = $1, last_monthly_reset = {LAST_MONTH_28TH}",
        used,
    )
    return int(status.split()[-1])


async def reset_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Ledger reset rows in id order."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, user_id, amount, feature, metadata FROM token_transactions"
        " WHERE operation = 'reset' ORDER BY id"
    )
    return rows
