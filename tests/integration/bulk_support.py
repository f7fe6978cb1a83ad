"""Helpers shared by the bulk-run tests: users in known states, waiting on conditions."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import UUID

import asyncpg

from listener.config import Settings
from listener.embedded import free_port

# Sessions of the runner are tagged so tests can find (and kill) them.
BULK_APPLICATION_NAME = "token-reset:bulk"
# Where `python -m listener` runs from in the subprocess tests.
REPO = Path(__file__).resolve().parents[2]


async def add_stale_users(conn: asyncpg.Connection, count: int, used: int = 7) -> list[UUID]:
    """Users carrying last period's usage (their last reset 40 days ago)."""
    rows = await conn.fetch(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset) "
        "SELECT gen_random_uuid(), $2, now() - interval '40 days' "
        "FROM generate_series(1, $1) RETURNING user_id",
        count,
        used,
    )
    return [row["user_id"] for row in rows]


async def add_current_users(conn: asyncpg.Connection, count: int, used: int = 3) -> None:
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


async def bulk_waiting_on_lock(conn: asyncpg.Connection) -> bool:
    """True when a runner session is blocked on a row lock (its final pass)."""
    waiting: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1 "
        "AND datname = current_database() AND wait_event_type = 'Lock')",
        BULK_APPLICATION_NAME,
    )
    return waiting


@asynccontextmanager
async def row_lock(database_url: str, user_id: UUID) -> AsyncIterator[asyncpg.Connection]:
    """Hold one user's row lock, as a long application transaction would."""
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM user_tokens WHERE user_id = $1 FOR UPDATE", user_id)
        try:
            yield holder
        finally:
            await transaction.rollback()
    finally:
        await holder.close()


async def runs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every recorded bulk run, oldest first."""
    return await conn.fetch("SELECT * FROM token_reset_bulk_runs ORDER BY id")


def unreachable_url() -> str:
    """A database URL nobody listens on (a port the OS just handed out and we let go)."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


def settings_for(database_url: str, **changes: object) -> Settings:
    """Settings pointing at a test database."""
    return Settings(database_url=database_url).with_overrides(**changes)


def cli_env(database_url: str) -> dict[str, str]:
    """The parent's environment with only our database configured (for subprocesses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CRON_"))}
    env.update(DATABASE_URL=database_url, LOG_FORMAT="json", LOG_LEVEL="INFO")
    return env
