"""Test data: users in known states, and what the ledger says of them.

The one stale-user factory: a stale user's last reset is the 28th of the previous
period in the configured zone (data, not clocks), and it carries `used` tokens.
Resets by each path (trigger, function, bulk) and the ledger's count of them by source
are here too, so every kind of test makes and checks users the same way.
"""

from __future__ import annotations

import uuid

import asyncpg

from listener.metrics import RESET_SOURCES

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


async def add_stale_users(
    conn: asyncpg.Connection, count: int, *, used: int = 7
) -> list[uuid.UUID]:
    """Insert `count` users carrying last period's usage, in one statement; their ids."""
    rows = await conn.fetch(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
        f" SELECT gen_random_uuid(), $2, {LAST_MONTH_28TH} FROM generate_series(1, $1)"
        " RETURNING user_id",
        count,
        used,
    )
    return [row["user_id"] for row in rows]


async def add_current_users(conn: asyncpg.Connection, count: int, *, used: int = 3) -> None:
    """Users already in this period (nothing to reset)."""
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used) "
        "SELECT gen_random_uuid(), $2 FROM generate_series(1, $1)",
        count,
        used,
    )


async def carrying_usage(conn: asyncpg.Connection) -> int:
    """How many users still carry a previous period's usage."""
    value: int = await conn.fetchval(
        "SELECT count(*) FROM user_tokens "
        "WHERE last_monthly_reset < token_reset_period_start() AND monthly_tokens_used > 0"
    )
    return value


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


async def reset_by_trigger(conn: asyncpg.Connection, users: list[uuid.UUID]) -> None:
    """A write to each stale row: the row trigger resets it (source trigger)."""
    await conn.execute(
        "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1"
        " WHERE user_id = ANY($1::uuid[])",
        users,
    )


async def reset_by_function(conn: asyncpg.Connection, users: list[uuid.UUID]) -> None:
    """deduct_tokens on each stale user: it resets first (source function)."""
    for user in users:
        await conn.execute("SELECT deduct_tokens($1, 1, 'test')", user)


async def reset_by_bulk(conn: asyncpg.Connection) -> int:
    """The bulk backup over everyone still stale (source bulk)."""
    result = await conn.fetchval("SELECT (reset_monthly_tokens_for_all_users() ->> 'reset_count')")
    return int(result)


async def ledger_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """The truth: reset rows per source."""
    rows = await conn.fetch(
        "SELECT metadata ->> 'source' AS source, count(*) AS n FROM token_transactions"
        " WHERE operation = 'reset' GROUP BY 1"
    )
    counts = dict.fromkeys(RESET_SOURCES, 0)
    counts.update({row["source"]: int(row["n"]) for row in rows})
    return counts
