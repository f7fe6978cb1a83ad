"""Helpers shared by the bulk-run tests: held row locks, sessions waiting on a lock, the runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from uuid import UUID

import anyio
import anyio.abc
import asyncpg

from listener.embedded import free_port
from tests.support.database import open_transaction, sessions_waiting_on_lock
from tests.support.waiting import wait_until

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


@asynccontextmanager
async def blocked_run(
    conn: asyncpg.Connection,
    database_url: str,
    user_id: UUID,
    start: Callable[[], Awaitable[None]],
    *,
    what: str = "the run to block",
    deadline: float = 15.0,
) -> AsyncIterator[anyio.abc.TaskGroup]:
    """`start` in a task of its own, its bulk run held mid-way on one user's row lock:
    the block runs while that run is provably in progress.  Leaving the block releases
    the lock and waits for `start` to finish; the task group is the block's to cancel."""
    async with anyio.create_task_group() as group, row_lock(database_url, user_id):
        group.start_soon(start)
        await wait_until(lambda: bulk_waiting_on_lock(conn), deadline=deadline, what=what)
        yield group


async def running_run_id(conn: asyncpg.Connection) -> UUID | None:
    """The id of the bulk run recorded as running, if one is."""
    run_id: UUID | None = await conn.fetchval(
        "SELECT run_id FROM token_reset_bulk_runs WHERE outcome = 'running'"
    )
    return run_id


async def kill_bulk_sessions(conn: asyncpg.Connection) -> None:
    """Terminate the runner's sessions in this database: its connection lost mid-run."""
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = $1 AND datname = current_database()",
        BULK_APPLICATION_NAME,
    )


async def runs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every recorded bulk run, oldest first."""
    return await conn.fetch("SELECT * FROM token_reset_bulk_runs ORDER BY id")


def unreachable_url() -> str:
    """A database URL nobody listens on (a port the OS just handed out and we let go)."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
