"""PostgreSQL restarted (pg_ctl stop + start of a cluster the test owns) while resets happen."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import pytest

from listener.embedded import EmbeddedPostgres, private_data_root
from listener.migrate import apply_migrations
from tests.support.database import TEST_SERVER_SETTINGS
from tests.support.env import listener_env
from tests.support.processes import running_listener, wait_counts_equal_ledger
from tests.support.users import add_stale_users, reset_by_bulk, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

# What a client sees while the server stops, is down, or is starting up again.
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    # asyncpg's answer, at times, on a connection whose server said goodbye while idle.
    asyncpg.InternalClientError,
)
# Resets per phase: enough that each source is exercised before and after the restart.
RESETS_PER_PHASE = 30


@asynccontextmanager
async def owned_cluster() -> AsyncIterator[EmbeddedPostgres]:
    """A migrated PostgreSQL cluster of this test's own, on its own port; destroyed after."""
    # Not in tmp_path: as root the server's user cannot enter pytest's 0700 basetemp.
    with private_data_root("token-reset-restart-") as root:
        async with _cluster(root) as server:
            yield server


@asynccontextmanager
async def _cluster(root: Path) -> AsyncIterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(data_dir=root / "pgdata", settings=TEST_SERVER_SETTINGS)
    try:
        await anyio.to_thread.run_sync(server.start)
        conn = await asyncpg.connect(server.dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.destroy)


class Producer:
    """Resets by every path, one transaction each, reconnecting whenever the server is away."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done = 0
        self.errors = 0
        self.stop = anyio.Event()
        self._conn: asyncpg.Connection | None = None

    async def run(self) -> None:
        """Produce until stopped; connection errors are retried, anything else fails."""
        try:
            while not self.stop.is_set():
                try:
                    if self._conn is None:
                        self._conn = await asyncpg.connect(self.url, timeout=2)
                    await self._reset(self._conn, self.done % 3)
                    self.done += 1
                except CONNECTION_ERRORS:
                    self.errors += 1
                    self._drop()
                    # A retry pause while the server is down, not synchronisation.
                    await anyio.sleep(0.05)
        finally:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    @staticmethod
    async def _reset(conn: asyncpg.Connection, kind: int) -> None:
        if kind == 0:  # the row trigger (source trigger)
            await reset_by_trigger(conn, await add_stale_users(conn, 1))
        elif kind == 1:  # deduct_tokens (source function)
            (user,) = await add_stale_users(conn, 1)
            await conn.execute("SELECT deduct_tokens($1, 1, 'fault')", user)
        else:  # the bulk backup over whoever is stale now (source bulk)
            await add_stale_users(conn, 5)
            await reset_by_bulk(conn)


async def test_restart_while_resets_happen_reconnects_and_counts_equal_the_ledger(
    tmp_path: Path,
) -> None:
    """A restart cuts every connection and drops doorbells; the catch-up read loses nothing."""
    async with owned_cluster() as server:
        env = listener_env(server.dsn, name="fault-restart")
        async with running_listener(env, tmp_path) as listener:
            await listener.wait_ready()
            producer = Producer(server.dsn)
            mark = listener.mark()
            async with anyio.create_task_group() as group:
                group.start_soon(producer.run)
                await wait_until(
                    lambda: producer.done >= RESETS_PER_PHASE, deadline=30, what="resets before"
                )
                before = producer.done
                await anyio.to_thread.run_sync(server.restart)
                after_restart = producer.done
                await wait_until(
                    lambda: producer.done >= after_restart + RESETS_PER_PHASE,
                    deadline=30,
                    what="resets after the restart",
                )
                producer.stop.set()
            assert producer.errors > 0, "the producer never saw the restart: nothing was tested"
            await listener.wait_event("listener_disconnected", start=mark)
            await listener.wait_event("listener_connected", start=mark, reconnect=True)
            conn = await asyncpg.connect(server.dsn)
            try:
                truth = await wait_counts_equal_ledger(listener, conn)
            finally:
                await conn.close()
            scrape = await listener.scrape()
            assert await listener.readyz() == 200
    assert (scrape.connected, scrape.reconnects >= 1) == (1, True)
    assert min(truth.values()) > 0, truth  # every path was counted across the restart
    print(
        f"restart: {before} resets before, {producer.done - before} during/after, "
        f"{producer.errors} producer errors, ledger {truth}, reconnects {scrape.reconnects}"
    )
