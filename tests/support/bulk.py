"""Helpers shared by the bulk-run tests: held row locks, sessions waiting on a lock, the runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

import asyncpg

from listener.embedded import free_port

# Sessions of the runner are tagged so tests can find (and kill) them.
BULK_APPLICATION_NAME = "token-reset:bulk"


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
