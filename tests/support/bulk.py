"""Helpers shared by the bulk-run tests: held row locks, sessions waiting on a lock, the runs."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from uuid import UUID

import asyncpg

from listener.embedded import free_port
from tests.support.database import open_transaction, sessions_waiting_on_lock

# Sessions of the runner are tagged so tests can find (and kill) them.
BULK_APPLICATION_NAME = "token-reset:bulk"


async def bulk_waiting_on_lock(conn: asyncpg.Connection) -> bool:
    """True when a runner session is blocked on a row lock (its final pass)."""
    return await sessions_waiting_on_lock(conn, BULK_APPLICATION_NAME) > 0


def row_lock(database_url: str, user_id: UUID) -> AbstractAsyncContextManager[asyncpg.Connection]:
    """Hold one user's row lock, as a long application transaction would."""
    return open_transaction(
        database_url, "SELECT 1 FROM user_tokens WHERE user_id = $1 FOR UPDATE", user_id
    )


async def runs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every recorded bulk run, oldest first."""
    return await conn.fetch("SELECT * FROM token_reset_bulk_runs ORDER BY id")


def unreachable_url() -> str:
    """A database URL nobody listens on (a port the OS just handed out and we let go)."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
