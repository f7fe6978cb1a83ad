"""`token-reset reset`, `status`, the bulk runner and the app's SQL functions behind PgBouncer.

Transaction mode is run with `server_round_robin = 1` and a pool warmed to several
server connections, so consecutive transactions of one client land on different
server connections, as they do on a busy production pool (PgBouncer's default LIFO
hands a lone client the same one back, which hides the problem).  That is what
breaks asyncpg's named prepared statements before PgBouncer 1.21: a statement
prepared on one server connection is executed on another.  With
statement_cache_size=0 asyncpg uses the unnamed statement and sends Parse, Describe
(then Flush, not Sync), Bind and Execute before the one Sync, so the pair never
straddles two server connections.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import anyio
import asyncpg
import pytest

from listener.bulk import BulkResult, run_bulk_reset
from tests.pgbouncer.support import PgBouncer, PoolMode, running_pgbouncer
from tests.support.bulk import bulk_waiting_on_lock, row_lock, runs
from tests.support.cli import cli as run
from tests.support.env import cli_env, settings_for
from tests.support.users import add_stale_users, carrying_usage
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.pgbouncer]

MODES: list[PoolMode] = ["session", "transaction"]
WARM_SERVERS = 3
# Transaction mode, rotating: see the module docstring.
ROTATING = {"server_round_robin": "1"}


async def warm_pool(url: str, servers: int = WARM_SERVERS) -> None:
    """Make PgBouncer open `servers` server connections (then idle in its pool)."""
    clients = [await asyncpg.connect(url, statement_cache_size=0) for _ in range(servers)]
    try:
        for client in clients:  # each open transaction holds its own server connection
            await client.execute("BEGIN; SELECT 1")
        for client in clients:
            await client.execute("ROLLBACK")
    finally:
        for client in clients:
            await client.close()


async def cli(url: str, *args: str) -> tuple[int, str, str]:
    """`python -m listener <args>` against `url`; (exit code, stdout, stderr)."""
    return await run(*args, env=cli_env(url))


def bouncer_for(
    database_url: str, tmp_path: Path, mode: PoolMode
) -> contextlib.AbstractAsyncContextManager[PgBouncer]:
    """A pgbouncer for the mode (rotating in transaction mode)."""
    extra = ROTATING if mode == "transaction" else {}
    return running_pgbouncer(database_url, tmp_path, pool_mode=mode, **extra)


@pytest.mark.parametrize("mode", MODES)
async def test_reset_and_status_commands_work_through_pgbouncer(
    mode: PoolMode, database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Stock PgBouncer in either mode: reset in 9 batches, status, a second reset of 0."""
    await add_stale_users(conn, 41)
    async with bouncer_for(database_url, tmp_path, mode) as bouncer:
        url = bouncer.url_for(database_url)
        await warm_pool(url)
        code, out, err = await cli(url, "reset", "--batch-size", "5")
        assert code == 0, err
        first = json.loads(out)
        code, out, err = await cli(url, "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        code, out, err = await cli(url, "reset")
        assert code == 0, err
        second = json.loads(out)
    assert (first["reset_count"], first["batches"]) == (41, 9)
    assert status["stale_users"] == 0
    assert status["period_resets"] == 41
    assert status["last_bulk_run"]["outcome"] == "success"
    assert status["last_bulk_run"]["reset_count"] == 41
    # Not "skipped": the first run's lock did not stay behind on a pooled server.
    assert (second["skipped"], second["reset_count"]) == (False, 0)
    assert await carrying_usage(conn) == 0
    assert [r["outcome"] for r in await runs(conn)] == ["success", "success"]


@pytest.mark.parametrize("mode", MODES)
async def test_one_bulk_run_at_a_time_through_pgbouncer(
    mode: PoolMode, database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """A second caller is skipped while a run holds the lock; the lock goes with the run."""
    stale = await add_stale_users(conn, 30)
    first: list[BulkResult] = []
    async with bouncer_for(database_url, tmp_path, mode) as bouncer:
        settings = settings_for(bouncer.url_for(database_url))
        await warm_pool(bouncer.url_for(database_url))

        async def run_first() -> None:
            first.append(await run_bulk_reset(settings, source="schedule", batch_size=4))

        async with anyio.create_task_group() as group, row_lock(database_url, stale[0]):
            group.start_soon(run_first)
            await wait_until(lambda: bulk_waiting_on_lock(conn), what="the first run to block")
            with anyio.fail_after(10):
                second = await run_bulk_reset(settings, source="endpoint")
            running = await conn.fetchval(
                "SELECT run_id FROM token_reset_bulk_runs WHERE outcome = 'running'"
            )
            # The session holding the run's lock pins nothing: no transaction id, no
            # snapshot (vacuum keeps cleaning up behind a long run).
            holder = await conn.fetchrow(
                "SELECT a.backend_xid, a.backend_xmin FROM pg_stat_activity a "
                "WHERE a.application_name = 'token-reset:bulk-lock' "
                "AND a.datname = current_database() AND EXISTS (SELECT 1 FROM pg_locks l "
                "WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)"
            )
        with anyio.fail_after(10):
            third = await run_bulk_reset(settings, source="cli")
    assert (second.outcome, second.skip_reason) == ("skipped", "already_running")
    assert second.other_run_id == running
    assert holder is not None
    assert (holder["backend_xid"], holder["backend_xmin"]) == (None, None)
    assert (first[0].outcome, first[0].run_id, first[0].reset_count) == ("success", running, 30)
    assert (third.outcome, third.reset_count) == ("success", 0)


async def test_app_functions_through_transaction_mode_need_statement_cache_size_0(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """deduct_tokens/check_user_tokens from asyncpg: its default cache fails, size 0 works.

    Documents the exact error an application sees (README, Deployment); nothing in
    this project can change it: it is asyncpg's named statements against PgBouncer
    < 1.21 in transaction mode.
    """
    (user,) = await add_stale_users(conn, 1)
    deduct = "SELECT deduct_tokens($1, 5, 'chat')"
    check = "SELECT check_user_tokens($1)"
    async with running_pgbouncer(
        database_url, tmp_path, pool_mode="transaction", **ROTATING
    ) as bouncer:
        url = bouncer.url_for(database_url)
        await warm_pool(url)
        default = await asyncpg.connect(url)  # asyncpg's default statement cache (100)
        try:
            await default.fetchval(deduct, user)
            with pytest.raises(
                asyncpg.InvalidSQLStatementNameError,
                match=r'prepared statement "__asyncpg_stmt_[0-9a-f]+__" does not exist',
            ):
                await default.fetchval(deduct, user)
        finally:
            await default.close()
        uncached = await asyncpg.connect(url, statement_cache_size=0)
        try:
            answers = []
            for _ in range(6):
                await uncached.fetchval(deduct, user)
                answers.append(json.loads(await uncached.fetchval(check, user)))
        finally:
            await uncached.close()
    assert [answer["used"] for answer in answers] == [10, 15, 20, 25, 30, 35]
    assert answers[-1]["remaining"] == answers[-1]["limit"] - 35


async def test_app_functions_through_session_mode_work_with_the_default_cache(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Session mode pins one server connection per client: asyncpg's defaults just work."""
    (user,) = await add_stale_users(conn, 1)
    async with running_pgbouncer(database_url, tmp_path, pool_mode="session") as bouncer:
        url = bouncer.url_for(database_url)
        await warm_pool(url)
        clients = [await asyncpg.connect(url) for _ in range(2)]
        try:
            for _ in range(3):
                for client in clients:
                    await client.fetchval("SELECT deduct_tokens($1, 1, 'chat')", user)
            answer = json.loads(await clients[0].fetchval("SELECT check_user_tokens($1)", user))
        finally:
            for client in clients:
                await client.close()
    assert answer["used"] == 6
